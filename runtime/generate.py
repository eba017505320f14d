"""The decoder graph with its KV cache, and the token-by-token generation loop over it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort

from .sampling import GenerationSettings, TokenChooser


class Decoder:
    """Runs `decoder_model_merged`: names of the cache come from the manifest, shapes from the session."""

    def __init__(self, session: ort.InferenceSession, text: dict):
        self.session = session
        layers = range(text["num_layers"])
        self.past_names = [(text["past_key_name"] % i, text["past_value_name"] % i) for i in layers]
        self.present_names = [(text["present_key_name"] % i, text["present_value_name"] % i) for i in layers]
        inputs = {i.name: i for i in session.get_inputs()}
        self.input_names = set(inputs)
        first_past = inputs[self.past_names[0][0]]
        # [batch_size, kv_heads, past_sequence_length, head_dim]: heads and head size are fixed numbers.
        self.kv_heads, self.head_dim = int(first_past.shape[1]), int(first_past.shape[3])
        self.output_names = ["logits"] + [n for pair in self.present_names for n in pair]

    def empty_cache(self, batch: int) -> list[np.ndarray]:
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * len(self.past_names))

    def __call__(self, embeds, attention_mask, position_ids, cache):
        """embeds [B, T, D], attention_mask [B, past+T], position_ids [B, T] -> logits [B, T, V], new cache."""
        feed = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids}
        feed.update(zip((n for pair in self.past_names for n in pair), cache))
        outputs = self.session.run(self.output_names, {k: v for k, v in feed.items() if k in self.input_names})
        return outputs[0], outputs[1:]


@dataclass
class Timings:
    """Where the time of one generation went, in milliseconds unless named otherwise."""

    preprocess_ms: float = 0.0
    vision_ms: float = 0.0
    prefill_ms: float = 0.0
    ttft_ms: float = 0.0
    decode_ms: float = 0.0
    prompt_tokens: int = 0
    new_tokens: int = 0
    extra: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        decode_steps = max(self.new_tokens - 1, 0)  # the first token comes from prefill
        return {
            "preprocess_ms": round(self.preprocess_ms, 2),
            "vision_ms": round(self.vision_ms, 2),
            "prefill_ms": round(self.prefill_ms, 2),
            "ttft_ms": round(self.ttft_ms, 2),
            "decode_ms": round(self.decode_ms, 2),
            "prompt_tokens": self.prompt_tokens,
            "new_tokens": self.new_tokens,
            "prefill_tokens_per_s": round(1000 * self.prompt_tokens / self.prefill_ms, 2) if self.prefill_ms else None,
            "decode_tokens_per_s": round(1000 * decode_steps / self.decode_ms, 2) if self.decode_ms and decode_steps else None,
            **self.extra,
        }


def position_ids_for(attention_mask: np.ndarray) -> np.ndarray:
    """Positions count only real tokens, so left padding does not shift them (as transformers does)."""
    positions = np.cumsum(attention_mask, axis=-1) - 1
    return np.where(attention_mask == 0, 0, positions).astype(np.int64)


def generate_tokens(
    decoder: Decoder,
    embed: Callable[[np.ndarray], np.ndarray],
    prompt_embeds: np.ndarray,
    attention_mask: np.ndarray,
    input_ids: np.ndarray,
    settings: GenerationSettings,
    stop_ids: frozenset[int],
    pad_id: int,
    timings: Timings,
    started: float,
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (next ids [B], still-running mask [B]) each step, until every row stops or the budget ends.

    Rows that already stopped receive `pad_id`, as transformers' generate does.
    """
    batch = prompt_embeds.shape[0]
    choose = TokenChooser(settings)
    seen = input_ids
    running = np.ones(batch, dtype=bool)
    stop = np.array(sorted(stop_ids), dtype=np.int64)

    # Prefill: the whole prompt at once, from an empty cache.               # [B, T, D]
    t0 = time.perf_counter()
    positions = position_ids_for(attention_mask)                            # [B, T]
    logits, cache = decoder(prompt_embeds, attention_mask, positions, decoder.empty_cache(batch))
    timings.prefill_ms = 1000 * (time.perf_counter() - t0)
    positions = positions[:, -1:]

    decode_started = None
    for step in range(settings.max_new_tokens):
        next_ids = choose(logits[:, -1, :], seen)                               # [B]
        next_ids = np.where(running, next_ids, pad_id)
        if step == 0:
            timings.ttft_ms = 1000 * (time.perf_counter() - started)
            decode_started = time.perf_counter()
        timings.new_tokens = step + 1
        emitted_running = running.copy()
        running = running & ~np.isin(next_ids, stop)
        yield next_ids, emitted_running
        if not running.any() or step + 1 == settings.max_new_tokens:
            break
        # Decode: one new token per row, attending to the cache.
        seen = np.concatenate([seen, next_ids[:, None]], axis=1)
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = positions + 1
        logits, cache = decoder(embed(next_ids[:, None]), attention_mask, positions, cache)
    if decode_started is not None:
        timings.decode_ms = 1000 * (time.perf_counter() - decode_started)
