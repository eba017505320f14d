"""How far one set of outputs drifts from another: errors, cosine, KL, top-1 agreement, perplexity."""
from __future__ import annotations

import numpy as np


def tensor_errors(got: np.ndarray, ref: np.ndarray) -> dict:
    """Max and mean absolute error and cosine similarity of two same-shaped tensors."""
    got = np.asarray(got, dtype=np.float64).ravel()
    ref = np.asarray(ref, dtype=np.float64).ravel()
    if got.shape != ref.shape:
        raise ValueError(f"shapes differ: {got.shape} vs {ref.shape}")
    diff = np.abs(got - ref)
    denom = np.linalg.norm(got) * np.linalg.norm(ref)
    return {
        "max_abs_error": float(diff.max()) if diff.size else 0.0,
        "mean_abs_error": float(diff.mean()) if diff.size else 0.0,
        "cosine": float(got @ ref / denom) if denom else 1.0,
    }


def log_softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64) - logits.max(axis=-1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def teacher_forced(got_logits: np.ndarray, ref_logits: np.ndarray, targets: np.ndarray) -> dict:
    """Next-token agreement over a fixed text. logits [T, V] predict targets [T] (the next ids).

    KL is KL(reference || build) per position, averaged; perplexity is of the targets under each.
    """
    got_lp, ref_lp = log_softmax(got_logits), log_softmax(ref_logits)
    kl = (np.exp(ref_lp) * (ref_lp - got_lp)).sum(axis=-1)
    rows = np.arange(len(targets))
    return {
        "positions": int(len(targets)),
        "top1_agreement": float((got_lp.argmax(-1) == ref_lp.argmax(-1)).mean()),
        "kl_mean": float(kl.mean()),
        "kl_max": float(kl.max()),
        "perplexity": float(np.exp(-got_lp[rows, targets].mean())),
        "reference_perplexity": float(np.exp(-ref_lp[rows, targets].mean())),
    }


def sequence_match(got: list[int], ref: list[int]) -> dict:
    """Greedy continuations compared: identical or not, and the first position where they part."""
    first = next((i for i, (a, b) in enumerate(zip(got, ref)) if a != b), None)
    if first is None and len(got) != len(ref):
        first = min(len(got), len(ref))
    return {"identical": first is None, "first_divergence": first, "length": len(got), "reference_length": len(ref)}
