"""Weight recipes: fp16, int8/uint8 (dynamic or weight-only), block int4 (q4, q4f16: RTN, HQQ, GPTQ) and bnb4.

Every function has the recipe signature of recipes.py. What stays float32 on purpose: graph inputs
and outputs (the KV cache too), convolutions, the vision position embedding in the 4-bit builds,
and in fp16 builds the rotary angles (positions times frequencies, Cos, Sin) and each decomposed
RMS norm from Pow to Reciprocal, which lose positions or overflow in float16.
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smolvlm_edge.export.graph import DEFAULT_EXTERNAL_DATA_THRESHOLD, load_with_weights, use_ms_domain

from . import QuantizeError, int4_grid
from .recipes import QuantizeContext

# Protobuf cannot serialise 2 GiB; keep a margin for the graph itself.
_PROTO_LIMIT = DEFAULT_EXTERNAL_DATA_THRESHOLD - (64 << 20)
# Above this, quantized weights go to `.onnx_data`: onnxruntime maps that file lazily and unmaps it once
# MatMulNBits has packed its weights, while an inline proto is read whole (256M q4 decoder: -24 MB RSS).
EXTERNAL_DATA_BYTES = 32 << 20
_NORM_OPS = ("ReduceMean", "Add", "Sqrt", "Reciprocal", "Div")
_QUANT_OPS = {"MatMulNBits", "GatherBlockQuantized", "MatMulBnb4", "MatMulInteger", "DynamicQuantizeLinear",
              "QuantizeLinear", "DequantizeLinear", "QLinearMatMul", "ConvInteger", "DynamicQuantizeMatMul"}


# ---------------------------------------------------------------- files


def load(src: Path) -> onnx.ModelProto:
    """The fp32 graph with its weights (external data read from beside it)."""
    model = load_with_weights(src)
    _name_nodes(model)
    return model


def load_header(src: Path) -> onnx.ModelProto:
    """The graph without external weights: enough to read its ops."""
    return onnx.load(str(src), load_external_data=False)


def save(model: onnx.ModelProto, dst: Path) -> None:
    """Write `dst`; weights go to `dst`.onnx_data beside it above EXTERNAL_DATA_BYTES."""
    if _weight_bytes(model) > EXTERNAL_DATA_BYTES:
        onnx.save_model(model, str(dst), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=dst.with_suffix(".onnx_data").name, size_threshold=1024)
    else:
        onnx.save_model(model, str(dst))


def _weight_bytes(model: onnx.ModelProto) -> int:
    total = 0
    for t in model.graph.initializer:
        if t.raw_data:
            total += len(t.raw_data)
        else:
            total += int(np.prod(t.dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
    return total


def _name_nodes(model: onnx.ModelProto) -> None:
    """Quantizers address nodes by name: give unnamed ones a unique name."""
    seen = set()
    for i, node in enumerate(model.graph.node):
        if not node.name or node.name in seen:
            node.name = f"{node.op_type}_{i}"
        seen.add(node.name)


def quantized_ops(model: onnx.ModelProto) -> list[str]:
    """Quantized op types in a graph (an fp32 entry that has any is not a float source)."""
    return sorted({n.op_type for n in model.graph.node if n.op_type in _QUANT_OPS})


def _count(model: onnx.ModelProto, op_type: str) -> int:
    return sum(n.op_type == op_type for n in model.graph.node)


def _initializers(model: onnx.ModelProto) -> dict[str, TensorProto]:
    return {t.name: t for t in model.graph.initializer}


def lm_head(model: onnx.ModelProto, output: str = "logits") -> str | None:
    """Name of the MatMul with a constant weight that produces `output` (through shape-only ops)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    inits = _initializers(model)
    node = producers.get(output)
    while node is not None:
        if node.op_type == "MatMul" and node.input[1] in inits:
            return node.name
        if node.op_type not in ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze", "Add"):
            return None
        node = producers.get(node.input[0])
    return None


# ---------------------------------------------------------------- fp16


def _float32_nodes(model: onnx.ModelProto) -> list[str]:
    """Nodes that must stay float32: Cos/Sin and all they depend on (rotary angles), and each decomposed
    RMS norm from its Pow to its Reciprocal (SmolLM2's mean of squares reaches ~9e5, past float16's 65504)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in model.graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep, stack = set(), [n for n in model.graph.node if n.op_type in ("Cos", "Sin")]
    while stack:  # upstream of Cos/Sin
        node = stack.pop()
        if node.name not in keep:
            keep.add(node.name)
            stack.extend(producers[i] for i in node.input if i in producers)
    stack = [n for n in model.graph.node if n.op_type == "Pow"]
    while stack:  # downstream of Pow through the norm's reduction
        node = stack.pop()
        if node.name not in keep:
            keep.add(node.name)
            stack.extend(c for o in node.output for c in consumers.get(o, []) if c.op_type in _NORM_OPS)
    return sorted(keep)


def to_float16(model: onnx.ModelProto) -> tuple[onnx.ModelProto, dict]:
    from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

    keep = _float32_nodes(model)
    casts = _count(model, "Cast")
    logging.getLogger("onnxruntime.transformers.float16").setLevel(logging.ERROR)
    model = convert_float_to_float16(model, keep_io_types=True, op_block_list=list(DEFAULT_OP_BLOCK_LIST),
                                     node_block_list=keep, disable_shape_infer=_weight_bytes(model) > _PROTO_LIMIT)
    removed = _drop_float16_round_trips(model, set(keep))
    return model, {"float32_nodes": len(keep), "casts_added": _count(model, "Cast") - casts,
                   "round_trips_removed": removed}


def _drop_float16_round_trips(model: onnx.ModelProto, kept: set[str]) -> int:
    """The converter casts every kept node's float32 output to float16, and back for the next kept node, so a
    float32 chain (a norm's mean of squares) would still overflow: give such consumers the float32 value."""
    producers = {o: n for n in model.graph.node for o in n.output}

    def cast_to(node, dtype) -> bool:
        return node is not None and node.op_type == "Cast" and any(a.name == "to" and a.i == dtype for a in node.attribute)

    rename = {}
    for node in model.graph.node:
        half = producers.get(node.input[0]) if cast_to(node, TensorProto.FLOAT) else None
        if cast_to(half, TensorProto.FLOAT16) and getattr(producers.get(half.input[0]), "name", None) in kept:
            rename[node.output[0]] = half.input[0]
    outputs = {o.name for o in model.graph.output}
    rename = {k: v for k, v in rename.items() if k not in outputs}
    for node in model.graph.node:
        for i, name in enumerate(node.input):
            if name in rename:
                node.input[i] = rename[name]
    used = {i for n in model.graph.node for i in n.input} | outputs
    remaining = [n for n in model.graph.node if n.op_type != "Cast" or any(o in used for o in n.output)]
    removed = len(model.graph.node) - len(remaining)
    del model.graph.node[:]
    model.graph.node.extend(remaining)
    return removed


def quantize_fp16(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    model, info = to_float16(load(src))
    save(model, dst)
    return {"weights": "float16", **info}


# ---------------------------------------------------------------- dynamic int8


def _dynamic(src: Path, dst: Path, options: dict, weight_type: str, graph: str = "",
             context: QuantizeContext | None = None) -> dict:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    if options["mode"] == "weight_only":
        return _weight_only_8bit(src, dst, options, weight_type)
    if options["mode"] == "smooth":
        return _smooth_8bit(src, dst, options, weight_type, graph, context)
    if options["block_size"] is not None:
        raise QuantizeError(f"block_size is an option of {weight_type} mode=weight_only, not of mode=dynamic")
    model = load(src)
    large = _weight_bytes(model) // 4 > _PROTO_LIMIT
    # Convolutions stay float: onnxruntime's CPU ConvInteger takes uint8 weights only, and the patch
    # embedding is a small share of the weights. MatMuls with a constant B only (attention stays float).
    quantize_dynamic(model, dst, op_types_to_quantize=["MatMul", "Gather"], per_channel=options["per_channel"],
                     reduce_range=options["reduce_range"],
                     weight_type=QuantType.QInt8 if weight_type == "int8" else QuantType.QUInt8,
                     use_external_data_format=large,
                     # onnx shape inference cannot type the outputs of contrib ops (the fused decoder)
                     extra_options={"MatMulConstBOnly": True, "DefaultTensorType": TensorProto.FLOAT})
    if large:  # onnxruntime names it `<file>.data`; bundles use `<stem>.onnx_data`
        written = onnx.load(str(dst), load_external_data=False)
        for tensor in written.graph.initializer:
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = dst.with_suffix(".onnx_data").name
        Path(f"{dst}.data").rename(dst.with_suffix(".onnx_data"))
        onnx.save_model(written, str(dst))
    out = onnx.load(str(dst), load_external_data=False)
    return {"weights": weight_type, "mode": "dynamic", "matmuls_quantized": _count(out, "MatMulInteger"),
            "gathers_quantized": sum(n.op_type == "Gather" and n.input[0].endswith("_quantized")
                                     for n in out.graph.node), "activations": "uint8, dynamic per tensor"}


def _weight_only_8bit(src: Path, dst: Path, options: dict, weight_type: str) -> dict:
    if options["per_channel"] or options["reduce_range"]:
        raise QuantizeError(f"per_channel and reduce_range are options of {weight_type} mode=dynamic, not of weight_only")
    block, symmetric = options["block_size"] or 32, weight_type == "int8"
    model = load(src)
    if symmetric:
        matmuls_8bit(model, _const_matmul_names(model), block)
    else:
        model = _nbits(model, 8, block, False, 0, "rtn", [])
    _set_accuracy_level(model, options["accuracy_level"])
    gathers = quantize_gathers(model, 8, block, symmetric)
    save(model, dst)
    level = options["accuracy_level"]
    return {"weights": weight_type, "mode": "weight_only", "block_size": block, "accuracy_level": level,
            "activations": "int8 per block inside MatMulNBits" if level == 4 else "float",
            "matmuls_quantized": _count(model, "MatMulNBits"), "gathers_quantized": gathers}


def _smooth_8bit(src: Path, dst: Path, options: dict, weight_type: str, graph: str, context) -> dict:
    """SmoothQuant W8A8 for the decoder (quantize/smooth.py); its lm_head as weight-only 8-bit."""
    from . import smooth
    from .calibration import decoder_feeds

    if graph != "decoder_model_merged" or weight_type != "int8":
        raise QuantizeError(f"mode=smooth quantizes the decoder's activations and needs int8 weights; "
                            f"got {weight_type} {graph} (use --option decoder.mode=smooth)")
    if options["block_size"] is not None or options["per_channel"] or options["reduce_range"]:
        raise QuantizeError("block_size, per_channel and reduce_range are not options of mode=smooth")
    if options["alpha"] is not None and not 0 <= options["alpha"] <= 1:
        raise QuantizeError(f"alpha={options['alpha']!r} of mode=smooth must lie in [0, 1]")
    model = load(src)
    head = lm_head(model)
    linears = set(_const_matmul_names(model)) - {head}
    nodes = [n for n in model.graph.node if n.name in linears]
    prompts = tuple(context.calibration_prompts) or smooth.CALIBRATION_PROMPTS
    rows = smooth.calibration_rows(model, nodes, decoder_feeds(context.bundle, prompts))
    alphas = smooth.smooth_linears(model, nodes, rows, options["alpha"])
    if head:
        matmuls_8bit(model, [head], _LM_HEAD_BLOCK)
        _set_accuracy_level(model, _EIGHT_BIT_LEVEL)
    save(model, dst)
    return {"weights": "int8", "mode": "smooth", "alpha": options["alpha"] if options["alpha"] is not None else "auto",
            "alphas_chosen": {str(a): list(alphas.values()).count(a) for a in sorted(set(alphas.values()))},
            "matmuls_quantized": len(nodes),
            "activations": "int8 per row at run time (SmoothQuant scales)", "calibration_prompts": len(prompts),
            "lm_head": "int8 MatMulNBits" if head else None}


def quantize_int8(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    return _dynamic(src, dst, options, "int8", graph, context)


def quantize_uint8(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    return _dynamic(src, dst, options, "uint8")


# ---------------------------------------------------------------- block int4


def quantize_q4(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    model, info = q4_model(load(src), graph, options, context)
    save(model, dst)
    return info


def quantize_q4f16(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    model, half = to_float16(load(src))
    model, info = q4_model(model, graph, options, context)
    save(model, dst)
    return {**info, **half, "float16": True}


_ZERO_POINT_ALGORITHMS = ("hqq", "search", "auto")


def q4_model(model: onnx.ModelProto, graph: str, options: dict, context: QuantizeContext) -> tuple[onnx.ModelProto, dict]:
    """Int4 block weights: every constant MatMul (MatMulNBits) and, in embed_tokens, the table (GatherBlockQuantized)."""
    algorithm, block, level = options["algorithm"], options["block_size"], options["accuracy_level"]
    if algorithm in _ZERO_POINT_ALGORITHMS and options["symmetric"]:
        raise QuantizeError(f"q4 with algorithm={algorithm} stores a zero point per block (asymmetric); "
                            "drop symmetric=True or choose algorithm=rtn or gptq")
    symmetric = options["symmetric"] is not False and algorithm not in _ZERO_POINT_ALGORITHMS
    info = {"algorithm": algorithm, "block_size": block, "symmetric": symmetric}
    if graph == "embed_tokens":
        bits = options["embeddings_bits"]
        width = next((t.dims[1] for t in model.graph.initializer if len(t.dims) == 2), block)
        done = quantize_gathers(model, bits, block, symmetric=True)
        return model, {**info, "algorithm": "rtn", "symmetric": True, "gathers_quantized": done, "embedding_bits": bits,
                       "block_size": gather_block_size(width, block)}
    head = lm_head(model) if graph == "decoder_model_merged" else None
    head_bits = options["lm_head_bits"] or options["embeddings_bits"]
    eight_bit_head = head is not None and head_bits == 8
    exclude = [head] if eight_bit_head else []
    if algorithm == "gptq":
        from .calibration import calibration_feeds

        model = _gptq(model, calibration_feeds(graph, context), block, symmetric, exclude)
    elif algorithm in ("search", "auto"):
        info.update(_grid_matmuls(model, block, algorithm, exclude))
    else:
        model = _nbits(model, 4, block, symmetric, level, algorithm, exclude)
    _set_accuracy_level(model, level)
    if eight_bit_head:  # after: onnxruntime 1.32 has only an int8-compute kernel for 8-bit weights
        matmuls_8bit(model, [head], _LM_HEAD_BLOCK)
        _set_accuracy_level(model, _EIGHT_BIT_LEVEL, bits=8)
    info.update(matmuls_quantized=_count(model, "MatMulNBits"), matmuls_float=_const_matmuls(model),
                lm_head=(None if head is None else "int8 MatMulNBits" if eight_bit_head else f"int4 {algorithm}"))
    biases = float_zero_points_to_bias(model) if algorithm in ("hqq", "auto") else []
    info["float_zero_points_as_block_bias"] = len(biases)
    if options.get("scales") == "float16":
        info["scales_stored_as_float16"] = store_scales_as_float16(model, bits=4, also=biases)
    return model, info


def float_zero_points_to_bias(model: onnx.ModelProto) -> list[str]:
    """HQQ's float zero points -> symmetric MatMulNBits + a per-block bias; returns the bias initializers' names.

    onnxruntime 1.32 runs MatMulNBits with float zero points by dequantizing the whole weight on every
    call (~100x slower than its int4 kernels: 65 ms vs 0.6 ms for the 256M lm_head). Exactly the same
    product: (q - z) s = (q - 8) s + (8 - z) s, so y = MatMulNBits(A; no zero points, default 8)
    + blocksum(A) @ bias with bias[block, n] = (8 - z[n, block]) s[n, block], blocksum a Reshape and a
    ReduceSum of A over each block of K. Weights whose K is not a whole number of blocks stay as they are.
    """
    inits = _initializers(model)
    uses: dict[str, int] = {}
    for n in model.graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    nodes, biases = [], []
    for node in model.graph.node:
        attrs = {a.name: a.i for a in node.attribute}
        zp = inits.get(node.input[3]) if node.op_type == "MatMulNBits" and len(node.input) > 3 else None
        if zp is None or zp.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16) or attrs["bits"] != 4 \
                or attrs["K"] % attrs["block_size"]:
            nodes.append(node)
            continue
        k, n, block = attrs["K"], attrs["N"], attrs["block_size"]
        blocks = k // block
        scales = numpy_helper.to_array(inits[node.input[2]]).reshape(n, blocks)
        zeros = numpy_helper.to_array(zp).reshape(n, blocks)
        bias = ((8 - zeros.astype(np.float32)) * scales.astype(np.float32)).T.astype(scales.dtype)  # [blocks, N]
        name, out = node.name, node.output[0]
        shape = numpy_helper.from_array(np.array([0, 0, blocks, block], np.int64), f"{name}_block_shape")
        axis = numpy_helper.from_array(np.array([-1], np.int64), f"{name}_block_axis")
        weight = numpy_helper.from_array(bias, f"{name}_block_bias")
        model.graph.initializer.extend([shape, axis, weight])
        biases.append(weight.name)
        if uses[node.input[3]] == 1:
            model.graph.initializer.remove(zp)
        del node.input[3:]
        node.output[0] = f"{out}_symmetric"
        nodes += [node,
                  helper.make_node("Reshape", [node.input[0], shape.name], [f"{name}_blocks"], name=f"{name}_blocks"),
                  helper.make_node("ReduceSum", [f"{name}_blocks", axis.name], [f"{name}_block_sums"],
                                   name=f"{name}_block_sums", keepdims=0),
                  helper.make_node("MatMul", [f"{name}_block_sums", weight.name], [f"{name}_bias"], name=f"{name}_bias"),
                  helper.make_node("Add", [f"{out}_symmetric", f"{name}_bias"], [out], name=f"{name}_add_bias")]
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return biases


def store_scales_as_float16(model: onnx.ModelProto, bits: int, also: list[str] = ()) -> int:
    """Float32 scales (and float zero points) of `bits`-bit MatMulNBits, and the `also` initializers -> float16 + Cast.

    onnxruntime folds the Casts when the session loads, so the graph computes in float32 as before
    while the file is as small as q4f16's (scales are 12-20 % of an int4 file in blocks of 32).
    """
    inits, casts, done = _initializers(model), [], 0
    names = [name for node in model.graph.node
             if node.op_type == "MatMulNBits" and next(a.i for a in node.attribute if a.name == "bits") == bits
             for name in node.input[2:4]] + list(also)
    for name in dict.fromkeys(names):
        tensor = inits.get(name)
        if tensor is None or tensor.data_type != TensorProto.FLOAT:
            continue
        half = numpy_helper.from_array(numpy_helper.to_array(tensor).astype(np.float16), f"{tensor.name}_fp16")
        model.graph.initializer.remove(tensor)
        model.graph.initializer.append(half)
        del inits[tensor.name]
        casts.append(helper.make_node("Cast", [half.name], [tensor.name], name=f"{tensor.name}_Cast",
                                      to=TensorProto.FLOAT))
        done += 1
    nodes = casts + list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return done


def _const_matmul_names(model: onnx.ModelProto) -> list[str]:
    inits = _initializers(model)
    return [n.name for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits
            and len(inits[n.input[1]].dims) == 2]


def _const_matmuls(model: onnx.ModelProto) -> int:
    return len(_const_matmul_names(model))


# The 8-bit lm_head keeps blocks of 32 whatever the 4-bit block size: its scales cost 6 % of its size,
# and GGUF's Q8_0 (how llama.cpp ships tied embeddings) uses the same blocks.
_LM_HEAD_BLOCK = 32


def matmuls_8bit(model: onnx.ModelProto, names: list[str], block: int) -> int:
    """MatMuls with a constant [K, N] weight -> MatMulNBits bits=8, symmetric, in place.

    Symmetric 8-bit here is the restricted range [-127, 127] (scale = max|w| / 127, default zero
    point 128): onnxruntime's own 8-bit quantizer maps the extreme to -128, which misses a grid that
    already is 8-bit symmetric (a Q8_0 embedding) by up to half a step everywhere.
    """
    inits, wanted, done = _initializers(model), set(names), 0
    nodes = []
    for node in model.graph.node:
        if node.name not in wanted:
            nodes.append(node)
            continue
        tensor = inits[node.input[1]]
        weight = numpy_helper.to_array(tensor)
        k, n = weight.shape
        codes, scales, _ = block_quantize(int4_grid.blocks_of(weight, block).reshape(n, -1), 8, block, symmetric=True)
        codes = codes.reshape(n, -1, block)
        b_name, s_name = f"{tensor.name}_Q8", f"{tensor.name}_scales"
        model.graph.initializer.remove(tensor)
        model.graph.initializer.extend([numpy_helper.from_array(codes, b_name),
                                        numpy_helper.from_array(scales.astype(weight.dtype), s_name)])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], b_name, s_name], list(node.output),
                                      name=f"{node.name}_Q8", domain="com.microsoft", K=k, N=n, bits=8,
                                      block_size=block))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    use_ms_domain(model)
    return done


def _nbits(model, bits: int, block: int, symmetric: bool, level: int, algorithm: str, exclude: list[str]):
    from onnxruntime.quantization import matmul_nbits_quantizer as mnq

    logging.getLogger(mnq.__name__).setLevel(logging.WARNING)
    if algorithm == "hqq":
        config = mnq.HQQWeightOnlyQuantConfig(block_size=block, bits=bits)
    else:
        config = mnq.DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=symmetric, bits=bits,
                                                  accuracy_level=level or None)
    quantizer = mnq.MatMulNBitsQuantizer(model, block_size=block, is_symmetric=symmetric, bits=bits,
                                         accuracy_level=level or None, nodes_to_exclude=exclude, algo_config=config)
    quantizer.process()
    return quantizer.model.model


def _grid_matmuls(model: onnx.ModelProto, block: int, algorithm: str, exclude: list[str]) -> dict:
    """Constant [K, N] MatMuls -> 4-bit MatMulNBits with int4_grid's grids, in place; returns how many of each.

    algorithm "search": every weight on a searched grid with integer zero points; "auto": a weight that
    already sits on a min-max 4-bit grid keeps it exactly (float zero points, the block-bias path),
    every other weight is searched."""
    inits, skip = _initializers(model), set(exclude)
    nodes, counts, converted = [], {"weights_searched": 0, "weights_on_exact_grid": 0}, {}
    for node in model.graph.node:
        tensor = inits.get(node.input[1]) if node.op_type == "MatMul" and node.name not in skip else None
        if tensor is None or len(tensor.dims) != 2 or tensor.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            nodes.append(node)
            continue
        k, n = tensor.dims
        if tensor.name not in converted:  # a weight two MatMuls share is stored once
            weight = numpy_helper.to_array(tensor)
            blocks = int4_grid.blocks_of(weight, block)
            grid = int4_grid.exact_grid(blocks) if algorithm == "auto" else None
            exact = grid is not None and int4_grid.reproduces(blocks, *grid)
            codes, scales, zeros = grid if exact else int4_grid.search_grid(blocks)
            counts["weights_on_exact_grid" if exact else "weights_searched"] += 1
            zeros = zeros.astype(weight.dtype).reshape(-1) if exact else _pack(zeros, 4).reshape(-1)
            names = converted[tensor.name] = [f"{tensor.name}_Q4", f"{tensor.name}_scales", f"{tensor.name}_zero_points"]
            model.graph.initializer.remove(tensor)
            model.graph.initializer.extend([numpy_helper.from_array(_pack(codes, 4), names[0]),
                                            numpy_helper.from_array(scales.astype(weight.dtype).reshape(-1), names[1]),
                                            numpy_helper.from_array(zeros, names[2])])
        nodes.append(helper.make_node("MatMulNBits", [node.input[0], *converted[tensor.name]], list(node.output),
                                      name=f"{node.name}_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=block))
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    use_ms_domain(model)
    return counts


def _gptq(model, feeds: list[dict], block: int, symmetric: bool, exclude: list[str]):
    from onnxruntime.quantization.neural_compressor import gptq_quantize

    inits = _initializers(model)
    if not symmetric:  # onnxruntime 1.32's GPTQ packs 4-bit zero points in pairs of blocks
        for n in model.graph.node:
            if n.op_type == "MatMul" and n.input[1] in inits and n.name not in exclude:
                k = inits[n.input[1]].dims[0]
                if -(-k // block) % 2:
                    raise QuantizeError(f"gptq with symmetric=False needs an even number of blocks per column, "
                                        f"but {n.name} has K={k} ({-(-k // block)} blocks of {block}); "
                                        "use symmetric=True or another block_size")
    config = {n.name: ("fp32" if n.name in exclude else
                       {"bits": 4, "group_size": block, "scheme": "sym" if symmetric else "asym", "algorithm": "GPTQ"})
              for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
    # Its graph walk needs every input consumed: set aside those no node reads (the fused decoder's
    # position_ids, kept for the contract) and put them back in their place afterwards.
    inputs = list(model.graph.input)
    used = {name for n in model.graph.node for name in n.input}
    unused = {i.name for i in inputs if i.name not in used}
    del model.graph.input[:]
    model.graph.input.extend(i for i in inputs if i.name not in unused)
    feeds = [{k: v for k, v in feed.items() if k not in unused} for feed in feeds]
    result = gptq_quantize(model, [(feed, None) for feed in feeds], weight_config=config, num_bits=4,
                           group_size=block, scheme="sym" if symmetric else "asym", n_samples=-1).model
    del result.graph.input[:]
    result.graph.input.extend(inputs)
    return result


# 8-bit MatMulNBits on onnxruntime 1.32's CPU: accuracy_level 4 (int8 compute) 0.9 ms for the 256M
# lm_head, any other level dequantizes the whole weight per call: 165 ms.
_EIGHT_BIT_LEVEL = 4


def _set_accuracy_level(model: onnx.ModelProto, level: int, bits: int | None = None) -> None:
    for node in model.graph.node:
        if node.op_type == "MatMulNBits" and (bits is None or {a.name: a.i for a in node.attribute}["bits"] == bits):
            kept = [a for a in node.attribute if a.name != "accuracy_level"]
            del node.attribute[:]
            node.attribute.extend(kept)
            if level:
                node.attribute.append(helper.make_attribute("accuracy_level", level))


def block_quantize(table: np.ndarray, bits: int, block: int, symmetric: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """[V, D] floats -> (codes uint8 [V, D] in 0..2^bits-1, scales [V, D/block], zero points uint8 or None).

    Symmetric uses the default zero point 2^(bits-1). At 4 bits it maps the block's largest magnitude to
    -8 (MatMulNBits' convention: all 16 levels used); at 8 bits to +-127 (the usual restricted range,
    GGUF's Q8_0 grid), which costs nothing measurable and reproduces 8-bit symmetric weights exactly."""
    v, d = table.shape
    blocks = table.astype(np.float32).reshape(v, d // block, block)
    levels, mid = 2**bits - 1, 2 ** (bits - 1)
    if symmetric and bits == 8:
        scales = np.abs(blocks).max(-1) / (mid - 1)
        safe = np.where(scales == 0, 1, scales)[..., None]
        codes = np.clip(np.round(blocks / safe), 1 - mid, mid - 1) + mid
        zeros = None
    elif symmetric:
        lo, hi = blocks.min(-1), blocks.max(-1)
        extreme = np.where(np.abs(hi) > np.abs(lo), hi, lo)
        scales = extreme / -mid
        safe = np.where(scales == 0, 1, scales)[..., None]
        codes = np.clip(np.round(blocks / safe), -mid, mid - 1) + mid
        zeros = None
    else:
        lo, hi = np.minimum(blocks.min(-1), 0), np.maximum(blocks.max(-1), 0)
        scales = (hi - lo) / levels
        safe = np.where(scales == 0, 1, scales)
        zeros = np.clip(np.round(-lo / safe), 0, levels).astype(np.uint8)
        codes = np.clip(np.round(blocks / safe[..., None]) + zeros[..., None], 0, levels)
    return codes.reshape(v, d).astype(np.uint8), scales.astype(table.dtype), zeros


def _pack(codes: np.ndarray, bits: int) -> np.ndarray:
    """Pack along the last axis, low-order bits first (GatherBlockQuantized's and MatMulNBits' uint8 layout);
    a count that does not fill the last byte is padded with zeros (MatMulNBits' zero points per column)."""
    if bits == 8:
        return codes
    per = 8 // bits
    if codes.shape[-1] % per:
        pad = np.zeros((*codes.shape[:-1], per - codes.shape[-1] % per), codes.dtype)
        codes = np.concatenate([codes, pad], -1)
    grouped = codes.reshape(*codes.shape[:-1], codes.shape[-1] // per, per).astype(np.uint8)
    return sum((grouped[..., i] << (bits * i)) for i in range(per)).astype(np.uint8)


def gather_block_size(width: int, block: int) -> int:
    """`block`, or the largest smaller power of two (>= 16) that divides the embedding width (576 = 64 x 9)."""
    while width % block:
        block //= 2
        if block < 16:
            raise QuantizeError(f"embedding width {width} is not a multiple of 16; no block size fits")
    return block


def quantize_gathers(model: onnx.ModelProto, bits: int, block: int, symmetric: bool = True) -> int:
    """Embedding tables ([V, D] constant data, gathered on axis 0) -> GatherBlockQuantized (uint8, `bits` per value)."""
    inits = _initializers(model)
    nodes, done = [], 0
    for node in model.graph.node:
        table = inits.get(node.input[0]) if node.op_type == "Gather" else None
        axis = next((a.i for a in node.attribute if a.name == "axis"), 0)
        if table is None or len(table.dims) != 2 or axis != 0 or table.data_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
            nodes.append(node)
            continue
        data = numpy_helper.to_array(table)
        block = gather_block_size(data.shape[1], block)
        codes, scales, zeros = block_quantize(data, bits, block, symmetric)
        names = [f"{table.name}_q{bits}", node.input[1], f"{table.name}_scales"]
        new = [numpy_helper.from_array(_pack(codes, bits), names[0]), numpy_helper.from_array(scales, names[2])]
        if zeros is not None:
            names.append(f"{table.name}_zero_points")
            new.append(numpy_helper.from_array(_pack(zeros, bits), names[3]))
        model.graph.initializer.remove(table)
        model.graph.initializer.extend(new)
        nodes.append(helper.make_node("GatherBlockQuantized", names, list(node.output), name=f"{node.name}_Q{bits}",
                                      domain="com.microsoft", bits=bits, block_size=block, gather_axis=0,
                                      quantize_axis=1))
        done += 1
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    use_ms_domain(model)
    return done


# ---------------------------------------------------------------- bnb4


def quantize_bnb4(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict:
    from onnxruntime.quantization.matmul_bnb4_quantizer import MatMulBnb4Quantizer

    model, block = load(src), options["block_size"]
    info = {"quant_type": options["quant_type"], "block_size": block}
    if graph == "embed_tokens":
        # bnb4 has no Gather form: the table gets q4's int4 blocks, so every graph has a _bnb4 file.
        return _saved(model, dst, {**info, "gathers_quantized": quantize_gathers(model, 4, block), "gather": "int4 rtn"})
    kind = MatMulBnb4Quantizer.NF4 if options["quant_type"] == "nf4" else MatMulBnb4Quantizer.FP4
    quantizer = MatMulBnb4Quantizer(model, kind, block)
    quantizer.process()
    model = quantizer.model.model
    return _saved(model, dst, {**info, "matmuls_quantized": _count(model, "MatMulBnb4")})


def _saved(model: onnx.ModelProto, dst: Path, info: dict) -> dict:
    save(model, dst)
    return info
