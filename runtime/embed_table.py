"""Token embeddings read straight from the bundle's file, for an embed graph that is one 8-bit table lookup.

q4 builds whose embedding table is the decoder's 8-bit lm_head (quantize/shared_table.py) record where
the rows lie (`info.table_rows` of the embed entry). Reading them with `os.pread` skips a session call
per generated token and maps nothing: onnxruntime maps the 28 MB table, and every lookup then faults in
neighbouring pages too (256 prompt tokens: +26 MB resident, measured). The result equals the graph's
GatherBlockQuantized bit for bit (tests/test_quantize.py checks it).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .errors import BundleError


class TableRows:
    """ids [B, T] -> embeddings [B, T, hidden] float32, as (codes - zero_point) * scale per block."""

    def __init__(self, root: str | Path, rows: dict):
        self.fd = -1
        self.path = Path(root) / rows["file"]
        self.vocab, self.hidden, self.block = int(rows["vocab_size"]), int(rows["hidden_size"]), int(rows["block_size"])
        self.zero_point = float(rows["zero_point"])
        self.scales_dtype = np.dtype(rows["scales_dtype"])
        self.codes_offset, self.scales_offset = int(rows["codes_offset"]), int(rows["scales_offset"])
        self.scale_bytes = self.hidden // self.block * self.scales_dtype.itemsize
        needed = max(self.codes_offset + self.vocab * self.hidden, self.scales_offset + self.vocab * self.scale_bytes)
        size = self.path.stat().st_size if self.path.is_file() else -1
        if size < needed:
            raise BundleError(f"{self.path} holds {size} bytes; its embedding rows need {needed}")
        self.fd = os.open(self.path, os.O_RDONLY)

    def __call__(self, ids: np.ndarray) -> np.ndarray:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab):
            raise ValueError(f"token id out of range [0, {self.vocab}): {int(ids.min())}..{int(ids.max())}")
        if ids.size == 1:  # a decode step: np.unique would cost more than the two reads (~70 us)
            unique, where = ids.reshape(1), np.zeros(ids.shape, dtype=np.int64)
        else:
            unique, where = np.unique(ids, return_inverse=True)
        codes = np.empty((len(unique), self.hidden), dtype=np.uint8)
        scales = np.empty((len(unique), self.hidden // self.block), dtype=self.scales_dtype)
        for i, token in enumerate(unique.tolist()):
            codes[i] = np.frombuffer(os.pread(self.fd, self.hidden, self.codes_offset + token * self.hidden), np.uint8)
            scales[i] = np.frombuffer(os.pread(self.fd, self.scale_bytes, self.scales_offset + token * self.scale_bytes),
                                      self.scales_dtype)
        rows = (codes.astype(np.float32) - self.zero_point).reshape(len(unique), -1, self.block)
        rows = (rows * scales.astype(np.float32)[..., None]).reshape(len(unique), self.hidden)
        return rows[where.reshape(ids.shape)]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self):
        self.close()


def table_rows_for(bundle, precision: str) -> TableRows | None:
    """The reader for `precision`'s embed graph when its build recorded `table_rows`, else None."""
    entry = bundle.manifest["graphs"].get("embed_tokens", {}).get(precision) or {}
    rows = (entry.get("info") or {}).get("table_rows")
    return TableRows(bundle.path, rows) if rows else None
