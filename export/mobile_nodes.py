"""The node builder shared by the one-file model's graphs (mobile.py, mobile_preprocess.py, mobile_tokenizer.py)."""
from __future__ import annotations

import numpy as np


class _Nodes:
    """Appends nodes with unique names `prefix + op_n`; calling it returns the output name(s)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.count = prefix, [], 0
        self._consts: dict[tuple, str] = {}

    def __call__(self, op: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        from onnx import helper

        self.count += 1
        base = f"{self.prefix}{op}_{self.count}"
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node, one per distinct value in this graph."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self("Constant", value=numpy_helper.from_array(array))
        return self._consts[key]
