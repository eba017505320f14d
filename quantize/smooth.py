"""int8 `mode=smooth` for the text decoder: SmoothQuant scales, int8 weights per output channel, and
activations quantized to 8 bits per row (token) at run time, multiplied by onnxruntime's
MatMulIntegerToFloat (its u8s8 AMX / VNNI integer kernels).

Why: onnxruntime 1.32's 8-bit MatMulNBits multiplies a 64-position prefill chunk at about the speed of
float32 SGEMM, while its u8s8 MatMulInteger runs the same 120 linears of the 256M decoder ~2.7x faster
(one token: ~1.3x; tiny graph of 30 layers, this project's 2-core AMX CPU). Quantizing activations per
row keeps one token's outliers from flattening the others (one scale per 64-position chunk: top-1 81 %
on the demo in a PyTorch simulation; per row: 90 %), and SmoothQuant moves the outlier channels into the
weights (x / s, W * s, s = max|x|^alpha / max|W|^(1 - alpha) per input channel, from calibration
prompts; alpha per linear, the one with the least output error on them): top-1 95.0 % on the demo's
ONNX build, as weight-only int8's 95.2 % (mean KL 0.0097 vs 0.0034).

Each linear with a constant weight (the lm_head excepted: it stays 8-bit MatMulNBits) becomes
    xs = x * (1/s) -> m = max|xs| per row -> QuantizeLinear(xs / m, 1/127, zero point 128)
      -> MatMulIntegerToFloat(., W_int8, 1/127, c, 128) -> * m   (c: the weight's per-column scale).
"""
from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from . import QuantizeError

# alpha=None ("auto"): each linear takes the one of these with the least output error on the calibration rows.
ALPHAS = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
# Built-in calibration prompts for when a build names none: varied registers, none from the parity text.
CALIBRATION_PROMPTS = (
    "Describe a busy market street in the morning, with the stalls, the people and the noise.",
    "Write a short Python function that returns the n-th Fibonacci number, and explain how it works.",
    "What are the main causes of the seasons on Earth? Answer in three sentences.",
    "Translate into French: The train leaves at seven, so we should have breakfast early.",
    "List five tips for taking better photographs with a phone camera.",
    "Summarise the plot of a detective story in which the gardener turns out to be innocent.",
    "A recipe for pancakes needs 200 g of flour, 2 eggs and 300 ml of milk. How much for 6 people?",
    "Explain to a child why the sky is blue and sunsets are red.",
)
_ROW_FLOOR = 1e-30  # a row of zeros gets this scale instead of a division by zero


def calibration_rows(model: onnx.ModelProto, nodes: list[onnx.NodeProto], feeds: list[dict]) -> dict[str, np.ndarray]:
    """Each linear's input over the calibration feeds (float graph), as rows [positions, K]."""
    from .calibration import probe_values

    inputs = sorted({n.input[0] for n in nodes})
    rows: dict[str, list[np.ndarray]] = {name: [] for name in inputs}
    for values in probe_values(model, inputs, feeds):
        for name, value in zip(inputs, values):
            rows[name].append(value.reshape(-1, value.shape[-1]))
    return {name: np.concatenate(parts) for name, parts in rows.items()}


def quantized_output(x: np.ndarray, s: np.ndarray, codes: np.ndarray, col_scale: np.ndarray) -> np.ndarray:
    """What the chain computes for rows x (numpy, as the graph does it): the error a choice of s makes."""
    xs = x / s
    peak = np.maximum(np.abs(xs).max(axis=1, keepdims=True), _ROW_FLOOR)
    xq = np.clip(np.rint(xs / peak * 127), -128, 127)
    return (xq / 127) @ (codes.astype(np.float32) * col_scale) * peak


def best_alpha(x: np.ndarray, weight: np.ndarray) -> float:
    """The migration strength (of ALPHAS) whose quantized output is closest to x @ W on the calibration rows."""
    want = x @ weight
    x_max = np.abs(x).max(axis=0)
    errors = []
    for alpha in ALPHAS:
        s = smooth_scales(x_max, weight, alpha)
        codes, col_scale = per_column_int8(weight * s[:, None])
        errors.append(float(np.square(quantized_output(x, s, codes, col_scale) - want).mean()))
    return ALPHAS[int(np.argmin(errors))]


def smooth_scales(x_max: np.ndarray, weight: np.ndarray, alpha: float) -> np.ndarray:
    """SmoothQuant's per-input-channel s: x / s and W * s balance the two ranges."""
    w_max = np.abs(weight).max(axis=1)
    s = np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1 - alpha)
    return np.clip(s, 1e-5, None).astype(np.float32)


def per_column_int8(weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """W [K, N] -> int8 codes in [-127, 127] and one float scale per column (output channel)."""
    scale = np.abs(weight).max(axis=0) / 127
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    codes = np.clip(np.rint(weight / scale), -127, 127).astype(np.int8)
    return codes, scale


def smooth_linears(model: onnx.ModelProto, nodes: list[onnx.NodeProto], rows: dict[str, np.ndarray],
                   alpha: float | None) -> dict[str, float]:
    """Replace each of `nodes` (in place) by the smoothed, row-quantized int8 chain; returns each one's alpha
    (`alpha`, or with None the best of ALPHAS for it)."""
    inits = {t.name: t for t in model.graph.initializer}
    shared = [numpy_helper.from_array(np.array([-1], dtype=np.int64), "smooth_axis_last"),
              numpy_helper.from_array(np.array(1 / 127, dtype=np.float32), "smooth_inv127"),
              numpy_helper.from_array(np.array(_ROW_FLOOR, dtype=np.float32), "smooth_floor"),
              numpy_helper.from_array(np.array(128, dtype=np.uint8), "smooth_zp128")]
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 0)
    replaced, out_nodes, dropped = {n.name: n for n in nodes}, [], set()
    folds = _norm_folds(model, nodes)
    chosen: dict[str, float] = {}
    for node in model.graph.node:
        if node.name not in replaced:
            out_nodes.append(node)
            continue
        weight = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        x = rows.get(node.input[0])
        if x is None or x.shape[1] != weight.shape[0]:
            raise QuantizeError(f"no calibration rows for the input of {node.name}")
        chosen[node.name] = best_alpha(x, weight) if alpha is None else alpha
        s = smooth_scales(np.abs(x).max(axis=0), weight, chosen[node.name])
        codes, col_scale = per_column_int8(weight * s[:, None])
        p, x_name, y = node.name, node.input[0], node.output[0]
        model.graph.initializer.extend([numpy_helper.from_array(codes, f"{p}_w_int8"),
                                        numpy_helper.from_array(col_scale, f"{p}_w_scale")])
        dropped.add(node.input[1])
        gamma = folds.get(node.name)
        if gamma is not None:  # the norm before it writes x / s already: no Mul
            gamma.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(gamma) / s, gamma.name))
            xs = x_name
        else:
            model.graph.initializer.append(numpy_helper.from_array((1 / s).astype(np.float32), f"{p}_smooth_inv"))
            out_nodes.append(helper.make_node("Mul", [x_name, f"{p}_smooth_inv"], [f"{p}_xs"], name=f"{p}_smooth"))
            xs = f"{p}_xs"
        out_nodes += [
            helper.make_node("Abs", [xs], [f"{p}_abs"], name=f"{p}_abs"),
            # ReduceMax takes its axes as an input from opset 18, as an attribute before
            helper.make_node("ReduceMax", [f"{p}_abs", "smooth_axis_last"], [f"{p}_max0"], name=f"{p}_rowmax", keepdims=1)
            if opset >= 18 else helper.make_node("ReduceMax", [f"{p}_abs"], [f"{p}_max0"], name=f"{p}_rowmax",
                                                 keepdims=1, axes=[-1]),
            helper.make_node("Max", [f"{p}_max0", "smooth_floor"], [f"{p}_max"], name=f"{p}_rowfloor"),
            helper.make_node("Div", [xs, f"{p}_max"], [f"{p}_xn"], name=f"{p}_rownorm"),  # rows in [-1, 1]
            helper.make_node("QuantizeLinear", [f"{p}_xn", "smooth_inv127", "smooth_zp128"], [f"{p}_xq"], name=f"{p}_quant"),
            # (xq - 128) / 127 * (W_int8 * c): the row's max comes back after
            helper.make_node("MatMulIntegerToFloat", [f"{p}_xq", f"{p}_w_int8", "smooth_inv127", f"{p}_w_scale",
                                                      "smooth_zp128"], [f"{p}_rows"], name=f"{p}_int8",
                             domain="com.microsoft"),
            helper.make_node("Mul", [f"{p}_rows", f"{p}_max"], [y], name=f"{p}_unrow"),
        ]
    still_used = {i for n in out_nodes for i in n.input}
    kept = [t for t in model.graph.initializer if t.name not in dropped or t.name in still_used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(kept + shared)
    del model.graph.node[:]
    model.graph.node.extend(out_nodes)
    return chosen


# RMS norms whose scale (gamma) input can take a linear's 1/s: (op type, index of gamma among the inputs).
_NORMS = {"SimplifiedLayerNormalization": 1, "SkipSimplifiedLayerNormalization": 2}


def _norm_folds(model: onnx.ModelProto, nodes: list[onnx.NodeProto]) -> dict[str, TensorProto]:
    """Linear name -> the gamma initializer of the RMS norm that feeds it alone (output 0, one reader,
    a gamma no other node reads): x / s then costs nothing at run time."""
    inits = {t.name: t for t in model.graph.initializer}
    producers = {o: (n, i) for n in model.graph.node for i, o in enumerate(n.output)}
    readers: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            readers[name] = readers.get(name, 0) + 1
    folds = {}
    for node in nodes:
        norm, index = producers.get(node.input[0], (None, None))
        if norm is None or norm.op_type not in _NORMS or index != 0 or readers[node.input[0]] != 1:
            continue
        gamma = norm.input[_NORMS[norm.op_type]]
        if gamma in inits and readers[gamma] == 1 and len(inits[gamma].dims) == 1:
            folds[node.name] = inits[gamma]
    return folds
