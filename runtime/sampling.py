"""Generation settings and next-token choice (greedy and sampling), in numpy, as transformers does it."""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from .errors import SettingsError

# transformers counts max_length (default 20) from the start of the prompt, which is always longer
# than that for an image prompt; we default to new tokens instead when the checkpoint says nothing.
DEFAULT_MAX_NEW_TOKENS = 128


@dataclass(frozen=True)
class GenerationSettings:
    """What `generate` does; defaults come from generation_config.json like in transformers."""

    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: int | None = None

    @classmethod
    def from_dir(cls, path: str | Path) -> "GenerationSettings":
        file = Path(path) / "generation_config.json"
        cfg = json.loads(file.read_text()) if file.is_file() else {}
        known = {k: cfg[k] for k in ("do_sample", "temperature", "top_k", "top_p", "repetition_penalty") if cfg.get(k) is not None}
        if cfg.get("max_new_tokens"):
            known["max_new_tokens"] = int(cfg["max_new_tokens"])
        return cls(**known)

    def updated(self, **overrides) -> "GenerationSettings":
        """A copy with the given fields replaced; None means 'keep the default'."""
        settings = replace(self, **{k: v for k, v in overrides.items() if v is not None})
        settings.validate()
        return settings

    def validate(self) -> None:
        if self.max_new_tokens < 1:
            raise SettingsError(f"max_new_tokens must be at least 1, got {self.max_new_tokens}")
        if self.do_sample and self.temperature <= 0:
            raise SettingsError(f"temperature must be > 0 when sampling, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise SettingsError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise SettingsError(f"top_k must be >= 0, got {self.top_k}")
        if self.repetition_penalty <= 0:
            raise SettingsError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")


def apply_repetition_penalty(scores: np.ndarray, seen_ids: np.ndarray, penalty: float) -> np.ndarray:
    """Scale down the logits of every token already in the sequence. scores [B, V], seen_ids [B, T]."""
    if penalty == 1.0:
        return scores
    scores = scores.copy()
    rows = np.arange(scores.shape[0])[:, None]
    picked = scores[rows, seen_ids]
    scores[rows, seen_ids] = np.where(picked < 0, picked * penalty, picked / penalty)
    return scores


def top_k_filter(scores: np.ndarray, k: int) -> np.ndarray:
    if k <= 0 or k >= scores.shape[-1]:
        return scores
    kth = np.partition(scores, -k, axis=-1)[:, -k][:, None]
    return np.where(scores < kth, -np.inf, scores)


def top_p_filter(scores: np.ndarray, p: float) -> np.ndarray:
    """Keep the smallest set of tokens whose probability reaches p (nucleus sampling)."""
    if p >= 1.0:
        return scores
    order = np.argsort(scores, axis=-1, kind="stable")  # ascending, as transformers sorts
    sorted_scores = np.take_along_axis(scores, order, axis=-1)
    cumulative = np.cumsum(softmax(sorted_scores), axis=-1)
    remove_sorted = cumulative <= (1 - p)
    remove_sorted[:, -1] = False  # always keep the most likely token
    remove = np.zeros_like(remove_sorted)
    np.put_along_axis(remove, order, remove_sorted, axis=-1)
    return np.where(remove, -np.inf, scores)


def softmax(x: np.ndarray) -> np.ndarray:
    z = x - np.max(x, axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


class TokenChooser:
    """Picks the next token per row from last-position logits, in transformers' processor order."""

    def __init__(self, settings: GenerationSettings):
        self.settings = settings
        self.rng = np.random.default_rng(settings.seed)

    def __call__(self, logits: np.ndarray, seen_ids: np.ndarray) -> np.ndarray:
        """logits [B, V] float32, seen_ids [B, T] -> next ids [B] int64."""
        s = self.settings
        scores = apply_repetition_penalty(logits.astype(np.float32), seen_ids, s.repetition_penalty)
        if not s.do_sample:
            return np.argmax(scores, axis=-1).astype(np.int64)
        if s.temperature != 1.0:
            scores = scores / s.temperature
        scores = top_p_filter(top_k_filter(scores, s.top_k), s.top_p)
        probs = softmax(scores.astype(np.float64))
        return np.array([self.rng.choice(probs.shape[-1], p=row) for row in probs], dtype=np.int64)
