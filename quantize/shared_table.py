"""One embedding table for two graphs: embed_tokens reads the decoder's 8-bit lm_head blocks.

SmolVLM's embedding table and its lm_head are the same [vocab, hidden] matrix (tied, or untied
copies) and each is a quarter of the 256M model. When the decoder's lm_head is 8-bit (MatMulNBits
bits=8: codes [V, K/block, block], scales [V, K/block]), those bytes are also a valid
GatherBlockQuantized table ([V, K] codes, same scales). The decoder's lm_head goes to its external
data file and the embed graph points at the same offsets: the table is stored, and memory-mapped,
once. Shared only when the embedding table lies within `_MAX_STEPS` quantization steps of the 8-bit
lm_head everywhere, i.e. the lm_head blocks are as good a quantization of it as its own would be.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from .weights import load, quantized_ops

# Rounding puts every weight within 0.5 steps of its code; float16 weights (q4f16) add ~0.06 steps.
_MAX_STEPS = 0.6
_SHAPE_OPS = ("Reshape", "Cast", "Identity", "Squeeze", "Unsqueeze")


def lm_head_8bit(model: onnx.ModelProto, output: str = "logits") -> onnx.NodeProto | None:
    """The MatMulNBits bits=8 without zero points that produces `output` (through shape-only ops)."""
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(output)
    while node is not None and node.op_type in _SHAPE_OPS:
        node = producers.get(node.input[0])
    if node is None or node.op_type != "MatMulNBits" or len(node.input) > 3:
        return None
    attrs = {a.name: a.i for a in node.attribute}
    if attrs.get("bits") != 8 or attrs["K"] % attrs["block_size"]:
        return None
    return node


def _table_gather(model: onnx.ModelProto) -> onnx.NodeProto:
    inits = {t.name for t in model.graph.initializer}
    found = [n for n in model.graph.node if n.op_type in ("Gather", "GatherBlockQuantized") and n.input[0] in inits]
    if len(found) != 1:
        raise ValueError(f"expected one embedding Gather, found {len(found)}")
    return found[0]


def _fp32_table(fp32_embed: Path) -> np.ndarray:
    model = onnx.load(str(fp32_embed))
    table = {t.name: t for t in model.graph.initializer}[_table_gather(model).input[0]]
    return numpy_helper.to_array(table)


def _steps_apart(table: np.ndarray, codes: np.ndarray, scales: np.ndarray, block: int) -> float:
    """Largest |table - dequantized head| in units of the head's quantization step."""
    v, d = table.shape
    steps = 0.0
    for start in range(0, v, 4096):  # in slices: the full [V, D] float64 difference is large
        rows = slice(start, start + 4096)
        scale = scales[rows].astype(np.float32)[..., None]
        head = (codes[rows].reshape(-1, d // block, block).astype(np.float32) - 128) * scale
        diff = np.abs(table[rows].reshape(head.shape) - head) / np.where(scale == 0, 1, scale)
        steps = max(steps, float(diff.max()))
    return steps


def share_embedding_table(embed: dict, decoder: dict, fp32_embed: Path, progress) -> bool:
    """Rewrite the staged embed and decoder builds (`build._build` results) to share the lm_head blocks.

    Returns False, changing nothing, when they cannot share; otherwise updates files and entries.
    """
    dec_file = decoder["work"] / Path(decoder["entry"]["file"]).name
    dec = load(dec_file)
    head = lm_head_8bit(dec)
    if head is None:
        return False
    attrs = {a.name: a.i for a in head.attribute}
    inits = {t.name: t for t in dec.graph.initializer}
    codes_t, scales_t = inits[head.input[1]], inits[head.input[2]]
    codes, scales = numpy_helper.to_array(codes_t), numpy_helper.to_array(scales_t)
    table = _fp32_table(fp32_embed)
    if table.shape != (attrs["N"], attrs["K"]):
        return False
    embed_file = embed["work"] / Path(embed["entry"]["file"]).name
    emb = onnx.load(str(embed_file))
    gather = _table_gather(emb)
    emb_inits = {t.name: t for t in emb.graph.initializer}
    if gather.op_type == "GatherBlockQuantized" and emb_inits[gather.input[2]].data_type != scales_t.data_type:
        return False  # the embed build computes in another float type than the decoder's scales
    steps = _steps_apart(table, codes, scales, attrs["block_size"])
    if steps > _MAX_STEPS:
        progress(f"embed_tokens keeps its own table: it differs from the lm_head by {steps:.1f} quantization steps")
        return False

    # The decoder: every weight (the lm_head's codes and scales included) into its external data file.
    data_name = dec_file.with_suffix(".onnx_data").name
    (dec_file.parent / data_name).unlink(missing_ok=True)  # its weights are in memory; onnx would append
    onnx.save_model(dec, str(dec_file), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=data_name, size_threshold=1024)
    written = {t.name: t for t in onnx.load(str(dec_file), load_external_data=False).graph.initializer}
    refs = {name: {e.key: e.value for e in written[name].external_data} for name in (head.input[1], head.input[2])}

    # The embed graph: a GatherBlockQuantized over the same bytes, seen as [V, K] codes and [V, K/block] scales.
    v, k = table.shape
    table_name, scales_name = "embed_tokens_shared_q8", "embed_tokens_shared_scales"
    new = [_external(table_name, TensorProto.UINT8, [v, k], refs[head.input[1]]),
           _external(scales_name, scales_t.data_type, [v, k // attrs["block_size"]], refs[head.input[2]])]
    for name in gather.input[:1] + gather.input[2:]:
        if name in emb_inits:
            emb.graph.initializer.remove(emb_inits[name])
    emb.graph.initializer.extend(new)
    node = helper.make_node("GatherBlockQuantized", [table_name, gather.input[1], scales_name], list(gather.output),
                            name="embed_tokens_shared_Q8", domain="com.microsoft", bits=8,
                            block_size=attrs["block_size"], gather_axis=0, quantize_axis=1)
    nodes = [node if n is gather else n for n in emb.graph.node]
    del emb.graph.node[:]
    emb.graph.node.extend(nodes)
    if not any(o.domain == "com.microsoft" for o in emb.opset_import):
        emb.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    _check_shared(emb, decoder["work"], table, scales_t.data_type)
    onnx.save_model(emb, str(embed_file))

    data_rel = f"onnx/{data_name}"
    decoder["files"] = sorted(p.name for p in decoder["work"].iterdir())
    decoder["entry"].update(external_data=data_rel,
                            size_bytes=sum((decoder["work"] / f).stat().st_size for f in decoder["files"]))
    decoder["entry"]["info"]["lm_head_shared_with"] = "embed_tokens"
    embed["entry"].update(external_data=data_rel, size_bytes=embed_file.stat().st_size)
    embed["entry"]["info"].update(embedding_bits=8, block_size=attrs["block_size"], symmetric=True,
                                  shared_table=f"{data_rel} (the decoder's 8-bit lm_head)",
                                  shared_max_steps=round(steps, 3),
                                  # Where the rows lie, so the runtime can read them without a session
                                  # (runtime/embed_table.py): row = (codes - 128) * scales, per block.
                                  table_rows={"file": data_rel, "vocab_size": v, "hidden_size": k,
                                              "block_size": attrs["block_size"], "zero_point": 128,
                                              "codes_offset": int(refs[head.input[1]]["offset"]),
                                              "scales_offset": int(refs[head.input[2]]["offset"]),
                                              "scales_dtype": "float16" if scales_t.data_type == TensorProto.FLOAT16
                                              else "float32"})
    progress(f"embed_tokens shares the decoder's 8-bit lm_head blocks ({data_rel}; "
             f"table within {steps:.2f} steps): {embed_file.stat().st_size / 1e6:.2f} MB of its own")
    return True


def _external(name: str, dtype: int, dims: list[int], ref: dict) -> TensorProto:
    tensor = TensorProto(name=name, data_type=dtype, dims=dims, data_location=TensorProto.EXTERNAL)
    for key in ("location", "offset", "length"):
        if key in ref:
            tensor.external_data.add(key=key, value=ref[key])
    return tensor


def _check_shared(emb: onnx.ModelProto, folder: Path, table: np.ndarray, scale_type: int) -> None:
    """The rewritten embed graph, loaded beside the decoder's data, gives the table (within the quantization)."""
    import onnxruntime as ort

    probe = folder / ".embed-shared-check.onnx"
    onnx.save_model(emb, str(probe))
    try:
        session = ort.InferenceSession(str(probe), providers=["CPUExecutionProvider"])
        ids = np.array([[0, 1, table.shape[0] // 2, table.shape[0] - 1]], dtype=np.int64)
        got = session.run(None, {session.get_inputs()[0].name: ids})[0][0]
    finally:
        probe.unlink(missing_ok=True)
    want = table[ids[0]]
    tolerance = (np.abs(want).max() / 127) * 0.6 + (1e-3 if scale_type == TensorProto.FLOAT16 else 1e-6)
    if not np.all(np.abs(got - want) <= tolerance) or quantized_ops(emb) != ["GatherBlockQuantized"]:
        raise ValueError("the embed graph over the shared lm_head blocks does not reproduce the table")
