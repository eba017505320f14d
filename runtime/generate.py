"""The decoder graph with its KV cache, and the token-by-token generation loop over it."""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import onnxruntime as ort

from .errors import PromptError
from .sampling import GenerationSettings, TokenChooser


KEEP_LOGITS = "num_logits_to_keep"  # export/fused_decoder.py's scalar input (the runtime cannot import export)
# A fused decoder reads a long prompt this many positions at a time (0: all at once). Measured on the
# 256M q4 decoder, 256-token prompt: see issue 4's note.
PREFILL_CHUNK = 64


class Decoder:
    """Runs `decoder_model_merged`: names of the cache come from the manifest, shapes from the session.

    A plain graph takes the cache as growing tensors (past in, past + new out). A fused graph
    (manifest text.attention == "fused": GroupQueryAttention) writes each step's keys and values
    in place into buffers sized once per generation (`InPlaceCache`), so no step copies the cache;
    it takes no left padding, so each row of a batch runs on its own cache.
    """

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
        self.flat_past = [n for pair in self.past_names for n in pair]
        self.flat_present = [n for pair in self.present_names for n in pair]
        self.output_names = ["logits"] + self.flat_present
        self.fused = text.get("attention") == "fused"
        self.max_length = int(text["max_position_embeddings"])
        # The fused graph's scalar input: logits for the last N positions only (0: all; generation reads one).
        self.takes_keep = KEEP_LOGITS in self.input_names
        self.prefill_chunk = PREFILL_CHUNK if self.fused else 0
        self.cache_device = cache_device(session)  # where an InPlaceCache's buffers go

    def empty_cache(self, batch: int, capacity: int = 0):
        """An empty cache for `batch` rows; a fused graph's buffers hold `capacity` positions (grown if needed)."""
        if self.fused:
            return InPlaceCache(self, batch, min(capacity, self.max_length))
        empty = np.zeros((batch, self.kv_heads, 0, self.head_dim), dtype=np.float32)
        return [empty] * (2 * len(self.past_names))

    def __call__(self, embeds, attention_mask, position_ids, cache, last_only: bool = False):
        """embeds [B, T, D], attention_mask [B, past+T], position_ids [B, T] -> logits [B, T, V], new cache.

        `last_only`: logits [B, 1, V] of the last position (computed alone where the graph allows)."""
        if isinstance(cache, InPlaceCache):
            return cache.run(embeds, attention_mask, last_only), cache
        feed = {"inputs_embeds": embeds, "attention_mask": attention_mask, "position_ids": position_ids,
                KEEP_LOGITS: np.array(1 if last_only else 0, dtype=np.int64)}
        feed.update(zip(self.flat_past, cache))
        outputs = self.session.run(self.output_names, {k: v for k, v in feed.items() if k in self.input_names})
        return (outputs[0][:, -1:] if last_only else outputs[0]), outputs[1:]


def chunk_bounds(steps: int, chunk: int) -> list[tuple[int, int]]:
    """(start, end) of each call's positions: `chunk` at a time (0: all at once), the last call taking a
    remainder shorter than half a chunk along. Every call streams all the weights once, so a short tail
    costs nearly a whole call: an 81-position prompt runs 8 % faster as one call than as 64 + 17."""
    if not chunk or steps <= chunk:
        return [(0, steps)]
    starts = list(range(0, steps, chunk))
    if steps - starts[-1] < chunk // 2:
        starts.pop()
    return list(zip(starts, starts[1:] + [steps]))


def cache_device(session: ort.InferenceSession) -> tuple[str, int]:
    """Where a fused decoder's cache buffers live: on the GPU when CUDA runs the graph, so no step copies
    the cache between host and device (only the new embeddings in and the last logits out); else in host memory."""
    if session.get_providers()[0] == "CUDAExecutionProvider":
        options = session.get_provider_options().get("CUDAExecutionProvider", {})
        return "cuda", int(options.get("device_id", 0))
    return "cpu", 0


class InPlaceCache:
    """Per row: key/value buffers [1, kv_heads, capacity, head_dim] bound as both past and present,
    allocated on the session's device (`cache_device`)."""

    def __init__(self, decoder: Decoder, batch: int, capacity: int):
        self.decoder = decoder
        self.device = decoder.cache_device
        self.lengths = [0] * batch  # valid positions per row
        self.capacities = [max(capacity, 1)] * batch
        self.values = [self._buffers(c) for c in self.capacities]
        self.bindings: list = [None] * batch  # per row, made once: rebinding 2 x layers buffers every step costs
        # Last-position logits [1, 1, V] land in one host buffer per row, bound once: a freshly allocated output
        # would need get_outputs(), which wraps every present tensor too (~0.2 ms per decode step, measured).
        self.last_logits: list = [None] * batch
        self.bound_to_last: list[bool] = [False] * batch

    def _buffers(self, capacity: int, keep: list | None = None, length: int = 0) -> list:
        """Zeroed buffers on the cache's device; `keep`'s first `length` positions copied in (growing)."""
        shape = (1, self.decoder.kv_heads, capacity, self.decoder.head_dim)
        buffers = []
        for i in range(2 * len(self.decoder.past_names)):
            host = np.zeros(shape, dtype=np.float32)
            if keep is not None:
                host[:, :, :length] = keep[i].numpy()[:, :, :length]
            buffers.append(ort.OrtValue.ortvalue_from_numpy(host, *self.device))  # on the CPU: this very array
        return buffers

    def _grow(self, row: int, needed: int) -> None:
        """Rare: a caller went past the capacity it asked for. Copy once into buffers twice as long."""
        if needed > self.decoder.max_length:
            raise PromptError(f"the sequence needs {needed} positions; the model has {self.decoder.max_length}")
        capacity = min(max(needed, 2 * self.capacities[row]), self.decoder.max_length)
        self.values[row] = self._buffers(capacity, self.values[row], self.lengths[row])
        self.capacities[row] = capacity
        self.bindings[row] = None
        self.bound_to_last[row] = False

    def run(self, embeds: np.ndarray, attention_mask: np.ndarray, last_only: bool = False) -> np.ndarray:
        batch, steps = embeds.shape[:2]
        logits = None
        for row in range(batch):
            new = attention_mask[row, -steps:]
            start = int(steps - new.sum())  # left padding of this row (prefill only)
            if not (new[:start] == 0).all() or not (new[start:] == 1).all() or \
                    attention_mask[row, :-steps].sum() != self.lengths[row]:
                raise ValueError("the fused decoder takes left padding only (mask rows of 0...0 1...1)")
            out = self._run_row(row, embeds[row:row + 1, start:], last_only)
            if logits is None:
                logits = np.zeros((batch, 1 if last_only else steps, out.shape[-1]), dtype=out.dtype)
            kept = out[0, -logits.shape[1]:]  # this row's positions (no padding), or its last one
            logits[row, -len(kept):] = kept
        return logits

    def _run_row(self, row: int, embeds: np.ndarray, last_only: bool) -> np.ndarray:
        """One row's positions, in chunks of `decoder.prefill_chunk` (chunk_bounds; GQA attends to the cache
        written by the chunks before): a long prompt's activations then never all live at once."""
        parts = [embeds[:, start:end] for start, end in chunk_bounds(embeds.shape[1], self.decoder.prefill_chunk)]
        outputs = [self._run_chunk(row, part, last_only) for part in parts]
        return outputs[-1] if last_only else np.concatenate(outputs, axis=1)

    def _run_chunk(self, row: int, embeds: np.ndarray, last_only: bool) -> np.ndarray:
        decoder, steps = self.decoder, embeds.shape[1]
        total = self.lengths[row] + steps
        if total > self.capacities[row]:
            self._grow(row, total)
        binding = self.bindings[row] or self._binding(row)
        into_buffer = last_only and decoder.takes_keep and self.last_logits[row] is not None
        if into_buffer and not self.bound_to_last[row]:
            binding.bind_ortvalue_output("logits", self.last_logits[row][1])
        elif not into_buffer:
            binding.bind_output("logits")  # rebound each call: a new output of this call's length
        self.bound_to_last[row] = into_buffer
        binding.bind_cpu_input("inputs_embeds", np.ascontiguousarray(embeds, dtype=np.float32))
        binding.bind_cpu_input("attention_mask", np.ones((1, total), dtype=np.int64))
        if decoder.takes_keep:
            binding.bind_cpu_input(KEEP_LOGITS, np.array(1 if last_only else 0, dtype=np.int64))
        if "position_ids" in decoder.input_names:  # declared by the contract, derived from the mask by GQA
            binding.bind_cpu_input("position_ids", np.arange(self.lengths[row], total, dtype=np.int64)[None])
        decoder.session.run_with_iobinding(binding)
        self.lengths[row] = total
        if into_buffer:
            return self.last_logits[row][0]
        logits = binding.get_outputs()[0].numpy()
        if last_only and decoder.takes_keep:  # the row's buffer for the next steps' logits
            buffer = np.empty_like(logits)
            self.last_logits[row] = (buffer, ort.OrtValue.ortvalue_from_numpy(buffer))
        return logits

    def _binding(self, row: int):
        """The row's IO binding with its cache buffers bound as past and present (logits first: outputs keep order)."""
        decoder = self.decoder
        binding = decoder.session.io_binding()
        binding.bind_output("logits")
        for past, present, value in zip(decoder.flat_past, decoder.flat_present, self.values[row]):
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.bindings[row] = binding
        return binding


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
    cache = decoder.empty_cache(batch, capacity=attention_mask.shape[1] + settings.max_new_tokens)
    logits, cache = decoder(prompt_embeds, attention_mask, positions, cache, last_only=True)
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
        running = running & ~(next_ids[:, None] == stop).any(axis=1)  # np.isin sorts: 70 us a step
        yield next_ids, emitted_running
        if not running.any() or step + 1 == settings.max_new_tokens:
            break
        # Decode: one new token per row, attending to the cache.
        seen = np.concatenate([seen, next_ids[:, None]], axis=1)
        attention_mask = np.concatenate([attention_mask, np.ones((batch, 1), dtype=np.int64)], axis=1)
        positions = positions + 1
        logits, cache = decoder(embed(next_ids[:, None]), attention_mask, positions, cache, last_only=True)
    if decode_started is not None:
        timings.decode_ms = 1000 * (time.perf_counter() - decode_started)
