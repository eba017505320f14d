"""The `qdq` recipe: static QDQ quantization for NPUs (QNN HTP), calibrated with the bundle's own preprocessing.

Activations and weights get QuantizeLinear/DequantizeLinear pairs whose scales come from running
the fp32 graph on calibration inputs (onnxruntime's `get_qnn_qdq_config` + `quantize`, the path
the QNN EP supports). 16-bit activations make the graph opset 21 / IR 10 (standard 16-bit Q/DQ).

An NPU graph needs static shapes and no data-dependent ops, so with `fixed_batch` (the default):
- vision_encoder becomes a *full-frame* graph: exactly one real frame per call, `pixel_values`
  [1, 1, 3, S, S] in, `image_features` [1, tokens, D] out. The frame filter (Equal/ReduceMax/Compress
  over the pixels) is removed and the mask-dependent patch mask and position ids are folded for an
  all-True mask, so no Equal, GatherND or Compress is left. `pixel_attention_mask` stays declared (the
  bundle's I/O contract) but is ignored: every frame the runtime makes (tiles and the global image)
  is full, and the caller feeds real frames one at a time. The rewrite is checked against the fp32
  graph before anything is quantized.
- embed_tokens and decoder_model_merged get batch 1; their sequence axes stay dynamic, which the
  HTP backend does not take (a static-shape decoder with a fixed-size KV cache is another graph).
embed_tokens' Gather shares its table's scale, so the table is stored at the activation width.
The decoder keeps a few nodes float whose ranges no calibration can fix (`_float_nodes`).
"""
from __future__ import annotations

import collections
import tempfile
from pathlib import Path

import numpy as np

from smolvlm_edge.export.graph_order import all_nodes, toposort
from smolvlm_edge.runtime.errors import SmolVLMEdgeError

from . import QuantizeError
from .recipes import Option, QuantizeContext

OPTIONS: dict[str, Option] = {
    "activations": Option("uint16", "activation type: uint16 (A16W8, the HTP choice for transformers) or uint8",
                          choices=("uint16", "uint8")),
    "weights": Option("uint8", "weight type: uint8 (asymmetric) or int8 (symmetric)", choices=("uint8", "int8")),
    "calibration_method": Option("minmax", "how activation ranges are found from the calibration set",
                                 choices=("minmax", "entropy", "percentile")),
    "per_channel": Option(False, "one weight scale per output channel (Conv) instead of per tensor", kind=bool),
    "fixed_batch": Option(True, "static shapes for an NPU: full-frame vision graph (1 frame), batch 1 elsewhere; "
                          "false keeps the fp32 graph's dynamic shapes (CPU only)", kind=bool),
    "qnn_preprocess": Option(True, "quantize the way the QNN EP expects (qnn_preprocess_model, get_qnn_qdq_config); "
                             "false: plain quantize_static in QDQ format", kind=bool),
}

_QUANT_TYPES = {"uint8": "QUInt8", "uint16": "QUInt16", "int8": "QInt8"}
_METHODS = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_EMBED_CHUNK = 4096     # token ids per calibration feed of embed_tokens (all ids are fed once)
_TWO_GB = 2**31 - 1     # protobuf's limit: larger graphs keep their weights in `<file>_data`


def resolve(options: dict) -> dict:
    """Defaults filled in, every value checked (the build resolves them too; direct callers may not)."""
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise QuantizeError(f"unknown option {', '.join(unknown)} for recipe qdq; its options: {', '.join(OPTIONS)}")
    return {k: o.check("qdq", k, options.get(k, o.default)) for k, o in OPTIONS.items()}


def quantize_qdq(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    """Write the static QDQ build of the fp32 graph `src` to `dst`; return what was done (for the manifest)."""
    import onnx

    opts = resolve(options)
    src, dst = Path(src), Path(dst)
    model = onnx.load(src)
    # Subgraphs too: the fused vision attention sits in If branches.
    fused = sorted({n.op_type for n in all_nodes(model.graph) if n.domain == "com.microsoft"})
    if fused:  # NPUs take standard ops only; the fused decoder is onnxruntime's contrib ops
        raise QuantizeError(f"recipe qdq needs standard ONNX ops, but {graph} has {', '.join(fused)}: export the "
                            "bundle with `smolvlm-edge export --attention plain` for NPU builds")
    info: dict = {"activations": opts["activations"], "weights": opts["weights"]}
    if graph == "vision_encoder":
        feeds = _vision_feeds(context)
        if opts["fixed_batch"]:
            model, diff = full_frame_vision(model, src, feeds[0])
            info.update(full_frame=True, frames_per_call=1, full_frame_max_abs_diff=diff,
                        pixel_attention_mask="declared but ignored (frames must be full)")
    elif graph == "embed_tokens":
        vocab = _input_table_rows(model)
        ids = np.arange(vocab, dtype=np.int64)
        feeds = [{"input_ids": ids[None, i:i + _EMBED_CHUNK]} for i in range(0, vocab, _EMBED_CHUNK)]
        if opts["fixed_batch"]:
            _fix_dims(model, {"batch_size": 1})
    elif graph == "decoder_model_merged":
        feeds = _decoder_feeds(context, src)
        if opts["fixed_batch"]:
            _fix_dims(model, {"batch_size": 1})
    else:
        raise QuantizeError(f"recipe qdq does not know graph {graph!r}")
    exclude = _float_nodes(model) if graph == "decoder_model_merged" else []
    info.update({"float_nodes": len(exclude)} if exclude else {})
    if exclude:
        scaled = scale_rms_inputs(model, feeds)
        exclude += scaled
        info.update({"rms_norms_prescaled": len(scaled) // 2} if scaled else {})
    if opts["activations"] == "uint16" and _opset(model) < 21:
        # 16-bit QuantizeLinear/DequantizeLinear are standard from opset 21 (IR 10); onnxruntime would
        # otherwise bump the opset itself and still emit com.microsoft Q/DQ ops.
        model = onnx.version_converter.convert_version(model, 21)
        model.ir_version = max(model.ir_version, 10)
    target_ir = max(onnx.load(src, load_external_data=False).ir_version, 10 if _opset(model) >= 21 else 0)
    with tempfile.TemporaryDirectory(prefix=".qdq-", dir=dst.parent) as tmp:
        prepared = Path(tmp) / "prepared.onnx"
        _save(model, prepared)
        del model
        quantized = Path(tmp) / "quantized.onnx"
        _quantize(prepared, quantized, feeds, opts, Path(tmp), exclude)
        out = onnx.load(quantized)
        out.ir_version = target_ir  # the bundle's, or 10 where opset 21 needs it (onnxruntime >= 1.18 loads both)
        out.producer_name = "smolvlm-edge qdq"
        _save(out, dst)
    info.update(opset=_opset(out), ir_version=out.ir_version, calibration_samples=len(feeds))
    info["qdq_pairs"] = sum(n.op_type == "QuantizeLinear" for n in out.graph.node)
    info["op_types"] = dict(collections.Counter(n.op_type for n in out.graph.node
                                                if n.op_type not in ("QuantizeLinear", "DequantizeLinear")))
    info["calibration_cosine"] = _self_check(src, dst, feeds[0])
    return info


# ---------------------------------------------------------------- calibration inputs


def _vision_feeds(context: QuantizeContext) -> list[dict]:
    from .calibration import vision_feeds

    if not context.calibration_images:
        raise QuantizeError("recipe qdq needs calibration images for the vision encoder; none were given "
                            "(pass a few typical photos)")
    try:
        return vision_feeds(context.bundle, context.calibration_images)  # one full frame per image
    except SmolVLMEdgeError as exc:
        raise QuantizeError(f"calibration images cannot be used: {exc}") from exc


def _decoder_feeds(context: QuantizeContext, src: Path) -> list[dict]:
    """Per prompt: the prefill (empty past) and one decode step on the fp32 decoder's own cache,
    so the past inputs get calibrated ranges too."""
    import onnxruntime as ort

    from .calibration import decoder_feeds

    if not [p for p in context.calibration_prompts if isinstance(p, str) and p.strip()]:
        raise QuantizeError("recipe qdq needs calibration prompts for the decoder; none were given")
    prefill = decoder_feeds(context.bundle, context.calibration_prompts)
    session = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"])
    names = [o.name for o in session.get_outputs()]
    feeds = []
    for feed in prefill:
        outputs = dict(zip(names, session.run(None, feed)))
        length = feed["attention_mask"].shape[1]
        step = {
            "inputs_embeds": feed["inputs_embeds"][:, -1:],  # [1, 1, D]: any in-distribution embedding
            "attention_mask": np.ones((1, length + 1), dtype=np.int64),
            "position_ids": np.array([[length]], dtype=np.int64),
        }
        for name in feed:
            if name.startswith("past_key_values."):
                step[name] = outputs[name.replace("past_key_values.", "present.")]
        feeds += [feed, step]
    return feeds


class _Feeds:
    """onnxruntime's CalibrationDataReader over a list of feeds."""

    def __init__(self, feeds: list[dict]):
        self._feeds = iter(feeds)

    def get_next(self):
        return next(self._feeds, None)


# ---------------------------------------------------------------- the full-frame vision graph


def full_frame_vision(model, src: Path, feed: dict) -> tuple:
    """The contract vision graph rewritten for one full frame; checked against `src` on `feed`.

    Returns (ModelProto, max |difference| of image features on the check frame).
    """
    import onnx
    from onnx import numpy_helper

    graph = model.graph
    inputs = {i.name: i for i in graph.input}
    if set(inputs) != {"pixel_values", "pixel_attention_mask"}:
        raise QuantizeError(f"expected a vision graph with pixel_values and pixel_attention_mask, got {list(inputs)}")
    size = inputs["pixel_values"].type.tensor_type.shape.dim[-1].dim_value
    _set_shape(inputs["pixel_values"], [1, 1, 3, size, size])
    _set_shape(inputs["pixel_attention_mask"], [1, 1, size, size])
    graph.initializer.append(numpy_helper.from_array(np.ones((1, 1, size, size), dtype=bool), "full_frame_mask"))
    filters = [n for n in graph.node if n.op_type == "Compress" and n.name.startswith("/frame_filter/")]
    if not filters:
        raise QuantizeError("the vision graph has no /frame_filter/ Compress nodes: it was not exported by this "
                            "toolkit's exporter; re-export it, or pass fixed_batch=false")
    bypass = {n.output[0]: n.input[0] for n in filters}  # every frame is real: keep all
    kept = [n for n in graph.node if n not in filters]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = "full_frame_mask" if name == "pixel_attention_mask" else bypass.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    for out in graph.output:
        out.type.tensor_type.shape.dim[0].Clear()
        out.type.tensor_type.shape.dim[0].dim_value = 1
    del graph.value_info[:]
    model = _fold(model)
    model = _fold(_drop_full_mask_leftovers(onnx.shape_inference.infer_shapes(model)))
    left = {n.op_type for n in model.graph.node} & {"Equal", "GatherND", "Compress", "IsNaN", "Where", "NonZero"}
    if left:
        raise QuantizeError(f"the full-frame vision graph still has data-dependent ops {sorted(left)}; "
                            "pass fixed_batch=false to quantize the graph as exported")
    return model, _check_rewrite(src, model, feed)


def _fold(model):
    """Constant folding and dead-node removal (onnxscript), with no size limit: the mask is 0.25 M values."""
    import onnx_ir as ir
    import onnxscript.optimizer

    ir_model = ir.serde.deserialize_model(model)
    onnxscript.optimizer.optimize(ir_model, input_size_limit=1 << 30, output_size_limit=1 << 30)
    return ir.serde.serialize_model(ir_model)


def _drop_full_mask_leftovers(model):
    """What an all-True mask leaves after folding: `Add(scores, zeros)` and `Where(IsNaN(softmax), 0, softmax)`.

    Both are identities here (no score is -inf, so no softmax row is NaN); needs static shapes.
    """
    from onnx import numpy_helper

    graph = model.graph
    initializers = {t.name: t for t in graph.initializer}
    shapes = {v.name: [d.dim_value for d in v.type.tensor_type.shape.dim]
              for v in [*graph.value_info, *graph.input, *graph.output]}
    producer = {out: n for n in graph.node for out in n.output}

    def zeros(name):  # a constant of zeros (only Add and Where inputs are looked at, never the weights)
        return name in initializers and not numpy_helper.to_array(initializers[name]).any()

    outputs = {o.name for o in graph.output}
    alias, kept = {}, []
    for node in graph.node:
        if node.output[0] in outputs:  # a graph output keeps its name and its producer
            kept.append(node)
            continue
        if node.op_type == "Add":
            out_shape = shapes.get(node.output[0])
            for a, b in ((0, 1), (1, 0)):
                if zeros(node.input[b]) and out_shape is not None and shapes.get(node.input[a]) == out_shape:
                    alias[node.output[0]] = node.input[a]
                    break
            else:
                kept.append(node)
            continue
        if node.op_type == "Where":
            test, value = producer.get(node.input[0]), producer.get(node.input[2])
            if (test is not None and test.op_type == "IsNaN" and test.input[0] == node.input[2]
                    and value is not None and value.op_type == "Softmax" and zeros(node.input[1])):
                alias[node.output[0]] = node.input[2]
                continue
        kept.append(node)

    def resolve_alias(name):
        while name in alias:
            name = alias[name]
        return name

    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = resolve_alias(name)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def _check_rewrite(src: Path, model, feed: dict) -> float:
    """Same image features as the fp32 contract graph on one real frame, or a QuantizeError."""
    import onnxruntime as ort

    reference = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).run(["image_features"], feed)[0]
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    ours = session.run(["image_features"], feed)[0]
    diff = float(np.abs(reference - ours).max()) if reference.shape == ours.shape else float("inf")
    if not diff <= 1e-4 * max(1.0, float(np.abs(reference).max())):
        raise QuantizeError(f"the full-frame rewrite of the vision graph changed its features (max |diff| {diff:.3g}, "
                            f"shapes {reference.shape} vs {ours.shape}); pass fixed_batch=false")
    return diff


# ---------------------------------------------------------------- helpers


def _float_nodes(model) -> list[str]:
    """Decoder nodes left float, whose ranges no calibration set can fix:
    - the additive attention mask (finfo.min where masked): its Where, the Add onto the scores and the
      Softmax after it; one scale cannot cover -3.4e38 and the scores (a 16-bit step would be ~5e33);
    - the rotary angles (position * inv_freq, up to Cos/Sin): they grow with the position, so positions
      past the longest calibration prompt would be clipped. Cos/Sin outputs, in [-1, 1], are quantized;
    - RMSNorm statistics (x^2, its mean, + eps, sqrt, 1/sqrt): a massive activation (SmolLM2: |x| ~ 25000
      on the first token) puts x^2 near 6e8, so one 16-bit scale turns an ordinary token's mean(x^2)
      into 0 and 1/sqrt(eps) blows up its normalized state.
    """
    producer = {out: n for n in model.graph.node for out in n.output}
    names = [n.name for chain in _rms_chains(model) for n in chain]
    todo = [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while todo:
        node = todo.pop()
        if node.name not in names:
            names.append(node.name)
            todo += [producer[i] for i in node.input if i in producer]
    for softmax in (n for n in model.graph.node if n.op_type == "Softmax"):
        add = producer.get(softmax.input[0])
        if add is None or add.op_type != "Add":
            continue
        masks = [producer.get(i) for i in add.input]
        names += [softmax.name, add.name] + [m.name for m in masks if m is not None and m.op_type == "Where"]
    return sorted(set(names))


# HTP computes the float nodes left in a QDQ graph in float16: x^2 must stay below its maximum (65504).
_FP16_SQUARE_LIMIT = 128.0  # |x| after scaling: x^2 <= 16384, room for the mean and eps


def scale_rms_inputs(model, feeds: list[dict]) -> list[str]:
    """Rescale each RMSNorm whose calibrated input would overflow float16 when squared; returns the new nodes.

    SmolLM2's hidden states reach |x| ~ 25000, so x^2 overflows float16 in most layers, and on HTP
    (float nodes in float16) the decoder's logits then mean nothing (demo checkpoint: cosine -0.17 with
    the same graph on the CPU). With a power of two k such that k * max|x| <= 128:
    1/sqrt(mean((k x)^2) + k^2 eps) * k = 1/sqrt(mean(x^2) + eps), exactly in float32 (k is a power of
    two), and nothing overflows. The Mul by k before the Pow and the Mul by k after the Reciprocal stay float.
    """
    from onnx import helper, numpy_helper

    from .calibration import probe_values

    chains = _rms_chains(model)
    if not chains:
        return []
    probed = [pow_node.input[0] for pow_node, *_ in chains]
    peaks = np.zeros(len(chains))
    for values in probe_values(model, probed, feeds):
        peaks = np.maximum(peaks, [float(np.abs(v).max()) for v in values])
    inits = {t.name: t for t in model.graph.initializer}
    added = []
    for (pow_node, _, add, _, reciprocal), peak in zip(chains, peaks):
        if peak <= _FP16_SQUARE_LIMIT:
            continue
        k = 2.0 ** -int(np.ceil(np.log2(peak / _FP16_SQUARE_LIMIT)))
        name = pow_node.name or pow_node.output[0]
        eps_name = next((i for i in add.input if i in inits), None)
        if eps_name is None:  # eps not a stored constant: leave this norm as it is
            continue
        eps = numpy_helper.to_array(inits[eps_name]).astype(np.float32)
        new_eps = numpy_helper.from_array((eps * k * k).astype(np.float32), f"{name}/prescale_eps")
        factor = numpy_helper.from_array(np.array(k, np.float32), f"{name}/prescale_k")
        model.graph.initializer.extend([new_eps, factor])
        add.input[list(add.input).index(eps_name)] = new_eps.name
        x = pow_node.input[0]
        pow_node.input[0] = f"{name}/prescaled"
        unscaled = reciprocal.output[0]
        reciprocal.output[0] = f"{name}/prescaled_inverse_rms"
        before = helper.make_node("Mul", [x, factor.name], [pow_node.input[0]], name=f"{name}/prescale")
        after = helper.make_node("Mul", [reciprocal.output[0], factor.name], [unscaled], name=f"{name}/unscale")
        model.graph.node.extend([before, after])
        added += [before.name, after.name]
    if added:
        ordered = toposort(list(model.graph.node))
        del model.graph.node[:]
        model.graph.node.extend(ordered)
    return added


def _rms_chains(model) -> list[list]:
    """The nodes of each RMSNorm statistic: x -> x^2 -> mean -> + eps -> sqrt -> 1/sqrt (Pow ... Reciprocal)."""
    consumers: dict[str, list] = {}
    for node in model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rms, chains = ["Pow", "ReduceMean", "Add", "Sqrt", "Reciprocal"], []
    for node in (n for n in model.graph.node if n.op_type == "Pow"):
        chain = [node]
        while len(chain) < len(rms) and len(consumers.get(chain[-1].output[0], [])) == 1:
            chain.append(consumers[chain[-1].output[0]][0])
        if [n.op_type for n in chain] == rms:
            chains.append(chain)
    return chains


def _set_shape(value, dims) -> None:
    shape = value.type.tensor_type.shape
    del shape.dim[:]
    for d in dims:
        shape.dim.add().dim_value = d


def _fix_dims(model, fixed: dict[str, int]) -> None:
    """Named dynamic axes of the graph inputs and outputs made static (`make_dim_param_fixed`)."""
    from onnxruntime.tools.onnx_model_utils import make_dim_param_fixed

    for name, value in fixed.items():
        make_dim_param_fixed(model.graph, name, value)
    del model.graph.value_info[:]  # stale symbolic shapes; the quantizer infers them again


def _opset(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def _input_table_rows(model) -> int:
    gather = next((n for n in model.graph.node if n.op_type == "Gather"), None)
    table = next((t for t in model.graph.initializer if gather is not None and t.name == gather.input[0]), None)
    if table is None:
        raise QuantizeError("embed_tokens has no Gather over an embedding table; re-export the bundle")
    return int(table.dims[0])


def _save(model, path: Path) -> None:
    import onnx

    size = sum(len(t.raw_data) for t in model.graph.initializer)
    if size >= _TWO_GB - (64 << 20):
        onnx.save(model, path, save_as_external_data=True, all_tensors_to_one_file=True,
                  location=f"{path.name}_data", size_threshold=1024)
    else:
        onnx.save(model, path)


def _quantize(prepared: Path, quantized: Path, feeds: list[dict], opts: dict, tmp: Path, exclude: list[str]) -> None:
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize, quantize_static

    activation = getattr(QuantType, _QUANT_TYPES[opts["activations"]])
    weight = getattr(QuantType, _QUANT_TYPES[opts["weights"]])
    method = getattr(CalibrationMethod, _METHODS[opts["calibration_method"]])
    if opts["qnn_preprocess"]:
        from onnxruntime.quantization.execution_providers.qnn import get_qnn_qdq_config, qnn_preprocess_model

        preprocessed = tmp / "preprocessed.onnx"
        if qnn_preprocess_model(prepared, preprocessed):  # False: nothing to fuse, no file written
            prepared = preprocessed
        config = get_qnn_qdq_config(prepared, _Feeds(feeds), calibrate_method=method, activation_type=activation,
                                    weight_type=weight, per_channel=opts["per_channel"], nodes_to_exclude=exclude)
        quantize(prepared, quantized, config)
    else:
        quantize_static(prepared, quantized, _Feeds(feeds), quant_format=QuantFormat.QDQ,
                        activation_type=activation, weight_type=weight, per_channel=opts["per_channel"],
                        calibrate_method=method, nodes_to_exclude=exclude,
                        extra_options={"WeightSymmetric": opts["weights"] == "int8"})


def _self_check(src: Path, dst: Path, feed: dict) -> float:
    """Cosine of the build's first output with the fp32 graph's on the first calibration input (CPU)."""
    import onnxruntime as ort

    def run(path):
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = {i.name for i in session.get_inputs()}
        return session.run([session.get_outputs()[0].name], {k: v for k, v in feed.items() if k in names})[0]

    a, b = run(src).ravel().astype(np.float64), run(dst).ravel().astype(np.float64)
    return round(float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b) + 1e-30)), 6)
