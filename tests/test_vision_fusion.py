"""The vision graph's traced attention and tanh GELU as onnxruntime's fused ops (export/vision_fusion.py): written
by `export --attention fused` (the default), or fused into a copy for CPU recipes of a plain bundle."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from conftest import CHECKPOINT_KINDS, make_image  # noqa: E402
from smolvlm_edge.export.vision_fusion import (  # noqa: E402
    _frames_with_a_partial_mask,
    fuse_tanh_gelu,
    fuse_vision_attention,
    fused_vision_copy,
)


def _ops(path) -> dict:
    """Node counts by type, subgraphs (the attention's If branches) included."""
    from collections import Counter

    from smolvlm_edge.export.graph_order import all_nodes

    return Counter(n.op_type for n in all_nodes(onnx.load(str(path), load_external_data=False).graph))


def _vision(bundle):
    manifest = json.loads((bundle / "manifest.json").read_text())
    return manifest, bundle / manifest["graphs"]["vision_encoder"]["fp32"]["file"]


def _run(path_or_model, feeds):
    model = path_or_model.SerializeToString() if hasattr(path_or_model, "SerializeToString") else str(path_or_model)
    return ort.InferenceSession(model, providers=["CPUExecutionProvider"]).run(None, feeds)[0]


@pytest.mark.parametrize("kind", list(CHECKPOINT_KINDS))
def test_export_writes_the_fused_vision_graph(tiny_bundles, kind):
    """Default export: per encoder layer one FastGelu and one If choosing a MultiHeadAttention with or without
    the key mask; no Softmax or Tanh left; the manifest says so; the export's check against PyTorch passed."""
    manifest, path = _vision(tiny_bundles(kind))
    layers = json.loads((tiny_bundles(kind) / "config.json").read_text())["vision_config"]["num_hidden_layers"]
    ops = _ops(path)
    assert manifest["vision"]["attention"] == "fused"
    assert ops["If"] == ops["FastGelu"] == manifest["vision"]["attention_check"]["blocks"] == layers
    assert ops["MultiHeadAttention"] == 2 * layers
    assert "Softmax" not in ops and "Tanh" not in ops
    assert manifest["parity"]["vision_encoder"]["passed"]


def test_plain_export_keeps_standard_ops(tiny_bundles):
    manifest, path = _vision(tiny_bundles("256m", "plain"))
    model = onnx.load(str(path), load_external_data=False)
    assert manifest["vision"]["attention"] == "plain"
    assert not [n.op_type for n in model.graph.node if n.domain == "com.microsoft"]


def test_fused_copy_reproduces_the_traced_graph(tiny_bundles, tmp_path):
    """The copy CPU recipes quantize from a plain bundle: same features on frames with a partial mask."""
    manifest, src = _vision(tiny_bundles("256m", "plain"))
    report = fused_vision_copy(src, tmp_path / "vision_fused.onnx", manifest["vision"]["image_size"])
    assert report["attention"] == "fused", report
    ops = _ops(tmp_path / "vision_fused.onnx")
    assert ops["If"] == report["blocks"] == _ops(src)["Softmax"] > 0
    assert ops["FastGelu"] == report["fast_gelu"] == _ops(src)["Tanh"] > 0  # one tanh GELU per encoder layer
    assert "Softmax" not in ops and "Tanh" not in ops
    feeds = _frames_with_a_partial_mask(manifest["vision"]["image_size"])
    assert not feeds["pixel_attention_mask"][0, 0].all()  # keys of the first frame are masked
    for frames in (feeds, {name: value[:, 1:] for name, value in feeds.items()}):  # masked keys; full frame only
        want, got = _run(src, frames), _run(tmp_path / "vision_fused.onnx", frames)
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * max(1.0, float(np.abs(want).max())))
        assert report["max_diff"] <= 1e-4 * max(1.0, float(np.abs(want).max()))


def test_the_mask_reaches_the_fused_attention(tiny_bundles):
    """Dropping the key mask from the masked branch changes the masked frame's features: the rewrite's check
    would notice."""
    manifest, src = _vision(tiny_bundles("256m", "plain"))
    model = onnx.load(str(src))
    assert fuse_vision_attention(model) > 0
    unmasked = onnx.ModelProto()
    unmasked.CopyFrom(model)
    for node in unmasked.graph.node:
        if node.op_type == "If":
            masked = next(a.g for a in node.attribute if a.name == "else_branch")
            assert masked.node[0].op_type == "MultiHeadAttention" and len(masked.node[0].input) == 5
            del masked.node[0].input[3:]
    feeds = _frames_with_a_partial_mask(manifest["vision"]["image_size"])
    masked_out, unmasked_out = _run(model, feeds), _run(unmasked, feeds)
    assert np.abs(masked_out[0] - unmasked_out[0]).max() > 1e-3  # the partial frame depends on its mask
    np.testing.assert_allclose(masked_out[1], unmasked_out[1], atol=1e-5)  # the full frame does not


def test_a_graph_without_attention_stays_plain(tmp_path):
    from onnx import TensorProto, helper

    x = helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, [1])
    model = helper.make_model(helper.make_graph([helper.make_node("Identity", ["pixel_values"], ["y"])], "g", [x],
                                                [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])]))
    onnx.save(model, str(tmp_path / "plain.onnx"))
    report = fused_vision_copy(tmp_path / "plain.onnx", tmp_path / "out.onnx", 8)
    assert report == {"attention": "plain", "why": "no traced attention block found"}
    assert not (tmp_path / "out.onnx").exists()


def test_cpu_recipes_fuse_and_qdq_keeps_standard_ops(tiny_bundles, tmp_path, qdq_vision_bundle):
    """int8's vision build carries MultiHeadAttention and says where it came from (the export's fused graph,
    or a fused copy of a plain bundle's); qdq's has none (NPUs) and refuses a fused bundle."""
    from smolvlm_edge.quantize import QuantizeError
    from smolvlm_edge.quantize.build import quantize_bundle

    for attention, by in (("fused", "export"), ("plain", None)):
        bundle = tmp_path / attention
        shutil.copytree(tiny_bundles("256m", attention), bundle)
        quantize_bundle(bundle, "int8", graphs={"embed": "none", "decoder": "none"}, progress=lambda line: None)
        entry = json.loads((bundle / "manifest.json").read_text())["graphs"]["vision_encoder"]["int8"]
        assert entry["info"]["attention"]["attention"] == "fused"
        assert entry["info"]["attention"].get("by") == by
        assert _ops(bundle / entry["file"]).get("If", 0) == entry["info"]["attention"]["blocks"] > 0
        assert not list((bundle / "onnx").glob(".quantize-*"))  # the fused source lived in the staging folder
    qdq = json.loads((qdq_vision_bundle / "manifest.json").read_text())["graphs"]["vision_encoder"]["qdq"]
    assert "MultiHeadAttention" not in _ops(qdq_vision_bundle / qdq["file"])
    make_image(64, 48).save(tmp_path / "calib.png")
    with pytest.raises(QuantizeError, match="MultiHeadAttention.*--attention plain"):
        quantize_bundle(tmp_path / "fused", "qdq", graphs={"vision": "qdq", "embed": "none", "decoder": "none"},
                        calibration_images=(tmp_path / "calib.png",), progress=lambda line: None)


def _gelu_graph(x_first: bool, expose_inner: bool = False):
    """The traced tanh-GELU of x (as the dynamo export writes it), 0.5 and x multiplied in either order."""
    from onnx import TensorProto, helper, numpy_helper

    consts = [numpy_helper.from_array(np.array(v, np.float32), n)
              for n, v in (("three", 3.0), ("cube_weight", 0.044715), ("root", (2 / np.pi) ** 0.5), ("one", 1.0),
                           ("half", 0.5))]
    nodes = [helper.make_node("Pow", ["x", "three"], ["cube"]),
             helper.make_node("Mul", ["cube_weight", "cube"], ["weighted"]),
             helper.make_node("Add", ["x", "weighted"], ["inner"]),
             helper.make_node("Mul", ["root", "inner"], ["scaled"]),
             helper.make_node("Tanh", ["scaled"], ["tanh"]),
             helper.make_node("Add", ["tanh", "one"], ["plus_one"])]
    if x_first:
        nodes += [helper.make_node("Mul", ["x", "plus_one"], ["x_times"]),
                  helper.make_node("Mul", ["x_times", "half"], ["y"])]
    else:
        nodes += [helper.make_node("Mul", ["half", "plus_one"], ["halved"]),
                  helper.make_node("Mul", ["x", "halved"], ["y"])]
    outputs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3072])]
    if expose_inner:
        outputs.append(helper.make_tensor_value_info("inner", TensorProto.FLOAT, [2, 3072]))
    graph = helper.make_graph(nodes, "gelu", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3072])],
                              outputs, initializer=consts)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


@pytest.mark.parametrize("x_first", [False, True])
def test_traced_tanh_gelu_becomes_fast_gelu(x_first):
    """Either multiplication order: one FastGelu, nothing else left, the same values (float32 rounding)."""
    model = _gelu_graph(x_first)
    x = {"x": np.random.default_rng(0).uniform(-8, 8, (2, 3072)).astype(np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert fuse_tanh_gelu(model) == 1
    assert [n.op_type for n in model.graph.node] == ["FastGelu"] and not model.graph.initializer
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_a_gelu_whose_inner_value_is_read_elsewhere_stays():
    model = _gelu_graph(x_first=False, expose_inner=True)
    assert fuse_tanh_gelu(model) == 0
    assert "Tanh" in [n.op_type for n in model.graph.node]
