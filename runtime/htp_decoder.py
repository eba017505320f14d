"""The qdq decoder on the QNN HTP backend: static shapes, one position per call over a fixed-size KV cache."""
from __future__ import annotations

import platform
from pathlib import Path

import numpy as np
import onnxruntime as ort

from .errors import PromptError, ProviderError
from .generate import Decoder
from .providers import DEFAULT_PROVIDER_OPTIONS, make_qnn_htp_session

# The HTP simulator (onnxruntime-qnn on x86) finalizes a decoder only for a named, newer target (with its
# default one, even the tiny decoder fails with QNN_COMMON_ERROR_MEM_ALLOC): Snapdragon 8 Gen 3. A phone
# detects its own SoC, so the target is named on x86 only, and only where the provider options name none.
SIMULATOR_HTP_TARGET = {"htp_arch": "75", "soc_model": "57"}
# Positions in the fixed-size KV cache of a decoder on HTP (static shapes): prompt plus new tokens.
QNN_CONTEXT = 1024


def qnn_session_options(options: dict | None = None) -> dict[str, str]:
    """QNN provider options for this machine: the defaults, the simulator's target on x86, then `options`."""
    merged = dict(DEFAULT_PROVIDER_OPTIONS["qnn"])
    if platform.machine().lower() in ("x86_64", "amd64") and not {"htp_arch", "soc_model"} & set(options or {}):
        merged.update(SIMULATOR_HTP_TARGET)
    return {**merged, **{str(k): str(v) for k, v in (options or {}).items()}}


def decode_step_dims(capacity: int) -> dict[str, int]:
    """The contract's dynamic decoder axes fixed for one position over a cache of `capacity` positions."""
    return {"batch_size": 1, "sequence_length": 1, "past_sequence_length": capacity,
            "total_sequence_length": capacity + 1}


def open_htp_decoder(path: Path, capacity: int, fallback: bool, options: dict | None = None,
                     threads: int | None = None) -> ort.InferenceSession:
    """The qdq decoder on HTP as a static decode step (HTP takes no dynamic shape: the graph's own sequence
    axes refuse the session with 'Dynamic shape is not supported'). The axes are fixed by onnxruntime's
    free-dimension overrides, so no second graph file is needed. The session records which EP got which node."""
    if capacity < 1:
        raise ProviderError(f"qnn_context must be at least 1 position, got {capacity}")
    so = ort.SessionOptions()
    so.log_severity_level = 3
    if threads:  # the CPU's share of a split graph
        so.intra_op_num_threads = threads
    so.add_session_config_entry("session.record_ep_graph_assignment_info", "1")
    for dim, size in decode_step_dims(capacity).items():
        so.add_free_dimension_override_by_name(dim, size)
    try:
        session = make_qnn_htp_session(Path(path), fallback=fallback, options=options, session_options=so)
    except ProviderError as exc:
        if fallback:
            raise
        raise ProviderError(f"{exc}; a qdq decoder has nodes HTP refuses: let the CPU run them with "
                            "qnn_fallback=True (--qnn-fallback)") from exc
    past = next(i for i in session.get_inputs() if i.name.startswith("past_"))
    if past.shape[2] != capacity:
        raise ProviderError(f"the decoder {path} does not name its cache axis past_sequence_length (shape "
                            f"{past.shape}): it was not exported by this toolkit; re-export it")
    return session


class StaticStepDecoder(Decoder):
    """A decoder session of static shapes (an NPU's): one position per call, over a KV cache of fixed size.

    The past inputs hold `capacity` slots; the graph appends the new position after them (present:
    capacity + 1) and its keys and values are copied into the row's next free slot. The mask hides the
    free slots, so attention sees the filled ones and the new position. The prompt goes through the same
    graph one position at a time: one static graph (one HTP finalize) serves prefill and decode.
    """

    def __init__(self, session: ort.InferenceSession, text: dict):
        super().__init__(session, text)
        self.capacity = int({i.name: i for i in session.get_inputs()}[self.flat_past[0]].shape[2])

    def empty_cache(self, batch: int, capacity: int = 0) -> "StaticCache":
        if capacity > self.capacity:
            raise PromptError(f"the prompt and max_new_tokens need {capacity} positions, but the decoder on HTP "
                              f"holds {self.capacity} (qnn_context); open the model with a larger qnn_context, "
                              "ask for fewer new tokens, or do not split images (--no-split)")
        return StaticCache(self, batch)

    def __call__(self, embeds, attention_mask, position_ids, cache, last_only: bool = False):
        return cache.run(embeds, attention_mask, position_ids, last_only), cache


class StaticCache:
    """Per row: key/value arrays [1, kv_heads, capacity, head_dim] and how many slots are filled."""

    def __init__(self, decoder: StaticStepDecoder, batch: int):
        shape = (1, decoder.kv_heads, decoder.capacity, decoder.head_dim)
        self.decoder = decoder
        self.arrays = [[np.zeros(shape, dtype=np.float32) for _ in decoder.flat_past] for _ in range(batch)]
        self.lengths = [0] * batch

    def run(self, embeds, attention_mask, position_ids, last_only: bool) -> np.ndarray:
        """embeds [B, T, D] -> logits [B, T, V] (zeros at left padding), or [B, 1, V] with `last_only`."""
        batch, steps = embeds.shape[:2]
        logits = None
        for row in range(batch):
            for t in np.flatnonzero(attention_mask[row, -steps:]):  # left padding never enters the cache
                out = self._step(row, embeds[row:row + 1, t:t + 1], int(position_ids[row, t]))
                if logits is None:
                    logits = np.zeros((batch, steps, out.shape[-1]), dtype=np.float32)
                logits[row, t] = out
        return logits[:, -1:] if last_only else logits

    def _step(self, row: int, embed: np.ndarray, position: int) -> np.ndarray:
        decoder, filled = self.decoder, self.lengths[row]
        if filled >= decoder.capacity:
            raise PromptError(f"the decoder on HTP holds {decoder.capacity} positions (qnn_context) and they are full")
        mask = np.zeros((1, decoder.capacity + 1), dtype=np.int64)
        mask[0, :filled] = 1
        mask[0, -1] = 1  # the new position itself
        feed = {"inputs_embeds": np.ascontiguousarray(embed, dtype=np.float32), "attention_mask": mask,
                "position_ids": np.array([[position]], dtype=np.int64)}
        feed.update(zip(decoder.flat_past, self.arrays[row]))
        outputs = decoder.session.run(decoder.output_names, {k: v for k, v in feed.items() if k in decoder.input_names})
        for cache, present in zip(self.arrays[row], outputs[1:]):
            cache[:, :, filled] = present[:, :, -1]
        self.lengths[row] = filled + 1
        return outputs[0][0, -1]
