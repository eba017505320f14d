"""Int4 block grids chosen without data: a searched integer zero point, or the exact grid a weight already sits on.

A block of `block` weights along K is stored as codes q in 0..15, a scale s and a zero point z:
w ~ (q - z) s. onnxruntime runs integer zero points in its fast int4 kernels, float ones only through
the block-bias rewrite of weights.py (~1.25x slower decode on the 256M model). So:

- `search_grid`: integer z, with the scale searched per block (15 shrink factors of the min-max range,
  the zero point that centres the block, the scale refit by least squares, the smallest squared error
  kept). On weights moved off any grid it matches HQQ's quality (benchmarks/quality.py --off-grid).
- `exact_grid`: min-max with a float zero point, which reproduces a weight that was dequantized from an
  asymmetric 4-bit format (GGUF Q4_1: w = d q + m) exactly, as the demo checkpoint's language layers were;
  `reproduces` says whether that is so (a searched integer grid would lose it: 96 % -> 71 % top-1).
"""
from __future__ import annotations

import numpy as np

LEVELS = 15
# Relative error (L2) below which a weight counts as sitting on its min-max grid. A Q4_1 weight dequantized
# in float32 reproduces to ~1e-7, stored as float16 (q4f16) to ~3e-4, as bfloat16 to ~2e-3; a float
# checkpoint's weight to ~0.08. A structured float weight under the line gets a min-max grid within 1 %.
ON_GRID_ERROR = 1e-2
_SHRINK = np.linspace(0.7, 1.05, 15)
_ROWS = 1 << 18  # blocks per numpy batch: bounds the temporaries to ~100 MB


def blocks_of(weight: np.ndarray, block: int) -> np.ndarray:
    """[K, N] weight -> [N, ceil(K / block), block] float32, K padded with zeros (MatMulNBits' layout)."""
    k, n = weight.shape
    padded = np.zeros((n, -(-k // block) * block), dtype=np.float32)
    padded[:, :k] = weight.T
    return padded.reshape(n, -1, block)


def _range(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    lo, hi = blocks.min(-1, keepdims=True), blocks.max(-1, keepdims=True)
    # A constant block: any scale that reaches its value from the middle code.
    step = np.where(hi > lo, (hi - lo) / LEVELS, np.maximum(np.abs(lo), 1e-12) / 7)
    return lo, hi, step


def exact_grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Min-max grid with a float zero point: (codes uint8, scales [..., nb], float zero points [..., nb])."""
    lo, _, step = _range(blocks)
    zero = -lo / step
    codes = np.clip(np.round(blocks / step + zero), 0, LEVELS)
    return codes.astype(np.uint8), step[..., 0], zero[..., 0]


def reproduces(blocks: np.ndarray, codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray) -> bool:
    """Whether (codes - zeros) scales gives `blocks` back within ON_GRID_ERROR (the weight sits on that grid)."""
    error = np.linalg.norm((codes - zeros[..., None]) * scales[..., None] - blocks)
    return bool(error <= ON_GRID_ERROR * max(float(np.linalg.norm(blocks)), 1e-30))


def _search(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """[R, block] -> (scales [R, 1], integer zero points [R, 1]) of least squared error."""
    lo, hi, step = _range(blocks)
    best_err = np.full(lo.shape, np.inf, np.float32)
    best_scale, best_zero = step, np.zeros_like(lo)
    for shrink in _SHRINK:
        scale = step * shrink
        zero = np.clip(np.round(LEVELS / 2 - (lo + hi) / 2 / scale), 0, LEVELS)
        centred = np.clip(np.round(blocks / scale + zero), 0, LEVELS) - zero
        norm = (centred * centred).sum(-1, keepdims=True)
        fitted = (blocks * centred).sum(-1, keepdims=True) / np.where(norm > 0, norm, 1)
        scale = np.where((norm > 0) & (fitted > 0), fitted, scale)
        err = ((np.clip(np.round(blocks / scale + zero), 0, LEVELS) - zero) * scale - blocks) ** 2
        err = err.sum(-1, keepdims=True)
        better = err < best_err
        best_err = np.where(better, err, best_err)
        best_scale = np.where(better, scale, best_scale)
        best_zero = np.where(better, zero, best_zero)
    return best_scale, best_zero


def search_grid(blocks: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Searched grid with integer zero points: (codes uint8, scales [..., nb], zero points uint8 [..., nb])."""
    flat = blocks.reshape(-1, blocks.shape[-1])
    scales, zeros = np.empty((len(flat), 1), np.float32), np.empty((len(flat), 1), np.float32)
    for i in range(0, len(flat), _ROWS):
        scales[i:i + _ROWS], zeros[i:i + _ROWS] = _search(flat[i:i + _ROWS])
    codes = np.clip(np.round(flat / scales + zeros), 0, LEVELS)
    shape = blocks.shape[:-1]
    return codes.reshape(blocks.shape).astype(np.uint8), scales.reshape(shape), zeros.reshape(shape).astype(np.uint8)

