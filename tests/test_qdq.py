"""The qdq recipe on the tiny 256m bundle: full-frame vision graph, accuracy against fp32, and the QNN HTP simulator.

Floors (measured on the tiny 256m checkpoint, held-out inputs, A16W8 minmax):
  vision features cosine 0.99985-0.99990 on CPU; HTP vs the same graph on CPU 0.99997 -> floors 0.999 / 0.9999
  embed_tokens cosine 1.000000 (uint16 table: Gather shares its input's scale)     -> floor 0.9999
  decoder logits cosine 0.993-0.996 on held-out prompts of 15-61 tokens (0.98 with shorter calibration
  prompts; random weights of std 0.3 are harsh: int8 dynamic gets 0.9958)              -> floor 0.98
"""
from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image

VISION_COSINE_MIN = 0.999
HTP_VS_CPU_COSINE_MIN = 0.9999
EMBED_COSINE_MIN = 0.9999
DECODER_COSINE_MIN = 0.98
DATA_DEPENDENT_OPS = {"Equal", "GatherND", "Compress", "IsNaN", "Where", "NonZero"}


@dataclass(frozen=True)
class Context:  # what quantize_qdq reads (the build passes recipes.QuantizeContext)
    bundle: Path
    calibration_images: tuple = ()
    calibration_prompts: tuple = ()


def cosine(a, b) -> float:
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def cpu(path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def built(tiny_bundles, tmp_path_factory):
    """A plain-attention export of the tiny 256m checkpoint, calibration images, and the three qdq graphs."""
    from smolvlm_edge.quantize.qdq import quantize_qdq

    root = tmp_path_factory.mktemp("qdq")
    bundle = Path(shutil.copytree(tiny_bundles("256m", "plain"), root / "bundle"))  # NPU graphs: standard ops only
    images = []
    for i, (w, h) in enumerate([(640, 480), (300, 500), (512, 512)]):
        images.append(root / f"calib{i}.png")
        make_image(w, h, seed=i).save(images[-1])
    prompts = ("Describe the picture in one sentence.", "What is the capital of France? Answer briefly.",
               "Write a haiku about the sea.")  # 30-46 tokens once templated
    context = Context(bundle, tuple(images), prompts)
    graphs, infos = {}, {}
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        graphs[graph] = root / f"{graph}_qdq.onnx"
        infos[graph] = quantize_qdq(bundle / "onnx" / f"{graph}.onnx", graphs[graph], graph, {}, context)
    return {"bundle": bundle, "context": context, "graphs": graphs, "infos": infos, "root": root}


@pytest.fixture(scope="module")
def frame(built):
    """A held-out image as the runtime makes it: one full frame [1, 1, 3, 512, 512] and its mask."""
    from smolvlm_edge.runtime.images import ImageProcessor

    out = ImageProcessor.from_dir(built["bundle"])([[make_image(700, 420, seed=11)]], do_image_splitting=False)
    return {"pixel_values": out.pixel_values, "pixel_attention_mask": out.pixel_attention_mask}


@pytest.fixture(scope="module")
def fp32_features(built, frame):
    return cpu(built["bundle"] / "onnx" / "vision_encoder.onnx").run(["image_features"], frame)[0]


def test_vision_graph_is_a_static_full_frame_graph(built):
    import onnx

    model = onnx.load(built["graphs"]["vision_encoder"])
    shapes = {v.name: [d.dim_value or d.dim_param for d in v.type.tensor_type.shape.dim]
              for v in [*model.graph.input, *model.graph.output]}
    assert shapes == {"pixel_values": [1, 1, 3, 512, 512], "pixel_attention_mask": [1, 1, 512, 512],
                      "image_features": [1, 64, 64]}
    ops = {n.op_type for n in model.graph.node}
    assert not ops & DATA_DEPENDENT_OPS, ops
    assert {"QuantizeLinear", "DequantizeLinear", "MatMul", "Softmax"} <= ops
    info = built["infos"]["vision_encoder"]
    assert info["full_frame"] and info["full_frame_max_abs_diff"] <= 1e-4 and info["opset"] == 21


def test_vision_features_close_to_fp32_on_cpu(built, frame, fp32_features):
    features = cpu(built["graphs"]["vision_encoder"]).run(["image_features"], frame)[0]
    assert features.shape == fp32_features.shape == (1, 64, 64)
    assert cosine(features, fp32_features) >= VISION_COSINE_MIN


def test_embed_and_decoder_close_to_fp32(built):
    from smolvlm_edge.quantize.calibration import decoder_feeds

    ids = {"input_ids": np.array([[5, 17, 3, 99, 42, 7]], dtype=np.int64)}
    embed = {p: cpu(p).run(None, ids)[0] for p in (built["bundle"] / "onnx/embed_tokens.onnx",
                                                   built["graphs"]["embed_tokens"])}
    assert cosine(*embed.values()) >= EMBED_COSINE_MIN
    feed = decoder_feeds(built["bundle"], ["Tell me a story about a cat."])[0]  # not a calibration prompt
    logits = [cpu(p).run(["logits"], feed)[0] for p in (built["bundle"] / "onnx/decoder_model_merged.onnx",
                                                         built["graphs"]["decoder_model_merged"])]
    assert logits[0].shape == logits[1].shape
    assert cosine(*logits) >= DECODER_COSINE_MIN
    assert built["infos"]["decoder_model_merged"]["float_nodes"] > 0  # attention mask and rotary angles


def test_dynamic_build_keeps_the_contract_graph(built, tmp_path):
    from smolvlm_edge.quantize.qdq import quantize_qdq

    dst = tmp_path / "vision_dynamic.onnx"
    info = quantize_qdq(built["bundle"] / "onnx/vision_encoder.onnx", dst, "vision_encoder",
                        {"fixed_batch": False, "activations": "uint8", "qnn_preprocess": False}, built["context"])
    assert "full_frame" not in info and info["opset"] == 18
    frames = np.zeros((2, 2, 3, 512, 512), dtype=np.float32)  # batch 2; the second prompt's image is padding
    frames[:, 0] = np.random.default_rng(0).uniform(-1, 1, (2, 3, 512, 512))
    mask = np.ones((2, 2, 512, 512), dtype=bool)
    features = cpu(dst).run(["image_features"], {"pixel_values": frames, "pixel_attention_mask": mask})[0]
    assert features.shape == (2, 64, 64)  # padding frames still dropped inside the graph


def test_bad_requests_are_refused(built, tmp_path):
    from smolvlm_edge.quantize import QuantizeError
    from smolvlm_edge.quantize.qdq import quantize_qdq

    src = built["bundle"] / "onnx/vision_encoder.onnx"
    with pytest.raises(QuantizeError, match="calibration images"):
        quantize_qdq(src, tmp_path / "v.onnx", "vision_encoder", {}, Context(built["bundle"]))
    with pytest.raises(QuantizeError, match="unknown option bits"):
        quantize_qdq(src, tmp_path / "v.onnx", "vision_encoder", {"bits": 4}, built["context"])
    with pytest.raises(QuantizeError, match="must be one of"):
        quantize_qdq(src, tmp_path / "v.onnx", "vision_encoder", {"activations": "int4"}, built["context"])
    assert not list(tmp_path.iterdir())


def test_vision_runs_on_htp_without_cpu_fallback(qnn, built, frame, fp32_features):
    from smolvlm_edge.quantize.qnn import make_qnn_session

    path = built["graphs"]["vision_encoder"]
    session = make_qnn_session(path, fallback=False)
    htp = session.run(["image_features"], frame)[0]
    on_cpu = cpu(path).run(["image_features"], frame)[0]
    assert cosine(htp, on_cpu) >= HTP_VS_CPU_COSINE_MIN
    assert cosine(htp, fp32_features) >= VISION_COSINE_MIN


def test_htp_coverage_lists_taken_and_refused_op_types(qnn, built):
    from smolvlm_edge.quantize.qnn import htp_coverage

    vision = htp_coverage(built["graphs"]["vision_encoder"])
    assert vision["error"] is None and vision["refused"] == {} and vision["htp_fraction"] == 1.0
    assert vision["htp_partitions"] == 1
    assert {"Conv", "MatMul", "Softmax", "LayerNormalization", "Tanh", "QuantizeLinear"} <= set(vision["taken"])
    # The decoder keeps dynamic sequence axes: HTP refuses it, and says why.
    decoder = htp_coverage(built["graphs"]["decoder_model_merged"])
    assert decoder["htp_fraction"] < 0.5 and {"MatMul", "Softmax"} <= set(decoder["refused"])
    assert any("shape" in r.lower() for reasons in decoder["refused_reasons"].values() for r in reasons)


def test_runtime_feeds_a_one_frame_graph_frame_by_frame(qdq_vision_bundle):
    """A split image (several frames) through the qdq vision build, which takes exactly one frame."""
    from conftest import make_image
    from smolvlm_edge.runtime import SmolVLM

    image = make_image(700, 300, seed=12)  # splits into tiles plus the global frame
    fp32 = SmolVLM(qdq_vision_bundle).generate("What is this?", [image], max_new_tokens=2, do_sample=False)
    qdq = SmolVLM(qdq_vision_bundle, precision={"vision_encoder": "qdq", "embed_tokens": "fp32",
                                                "decoder_model_merged": "fp32"}).generate(
        "What is this?", [image], max_new_tokens=2, do_sample=False)
    assert qdq.prompt_ids == fp32.prompt_ids and len(qdq.token_ids) >= 1


def test_manifest_records_the_one_frame_shape_of_the_qdq_vision_graph(qdq_vision_bundle):
    import json

    entry = json.loads((qdq_vision_bundle / "manifest.json").read_text())["graphs"]["vision_encoder"]["qdq"]
    pixel = next(t for t in entry["inputs"] if t["name"] == "pixel_values")
    assert pixel["shape"][:2] == [1, 1] and pixel["dtype"] == "float32"


def test_qdq_refuses_a_fused_decoder(tiny_bundles, tmp_path):
    from smolvlm_edge.quantize import QuantizeError
    from smolvlm_edge.quantize.build import quantize_bundle

    bundle = Path(shutil.copytree(tiny_bundles("256m"), tmp_path / "bundle"))
    before = sorted(p.name for p in (bundle / "onnx").iterdir())
    with pytest.raises(QuantizeError, match="GroupQueryAttention.*--attention plain"):
        quantize_bundle(bundle, "qdq", graphs={"vision": "none", "decoder": "qdq"},
                        calibration_prompts=("Hello there.",), progress=lambda line: None)
    assert sorted(p.name for p in (bundle / "onnx").iterdir()) == before


def test_rms_norms_that_would_overflow_float16_are_prescaled():
    """HTP runs the float RMSNorm statistics in float16: an input of |x| ~ 25000 (SmolLM2's massive activations)
    squares past 65504. scale_rms_inputs multiplies x by a power of two first and undoes it after 1/sqrt: the
    same output in float32, with every squared value in range; norms that never get near stay untouched."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from smolvlm_edge.quantize.qdq import _float_nodes, scale_rms_inputs

    def norm(prefix: str, x: str) -> list:
        return [helper.make_node("Pow", [x, "two"], [f"{prefix}/sq"], name=f"{prefix}/Pow"),
                helper.make_node("ReduceMean", [f"{prefix}/sq", "axes"], [f"{prefix}/mean"], name=f"{prefix}/Mean"),
                helper.make_node("Add", [f"{prefix}/mean", "eps"], [f"{prefix}/var"], name=f"{prefix}/Add"),
                helper.make_node("Sqrt", [f"{prefix}/var"], [f"{prefix}/rms"], name=f"{prefix}/Sqrt"),
                helper.make_node("Reciprocal", [f"{prefix}/rms"], [f"{prefix}/inv"], name=f"{prefix}/Reciprocal"),
                helper.make_node("Mul", [x, f"{prefix}/inv"], [f"{prefix}/out"], name=f"{prefix}/Mul")]

    inits = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1]), "axes"),
             numpy_helper.from_array(np.array(1e-5, np.float32), "eps")]
    value = lambda name: helper.make_tensor_value_info(name, TensorProto.FLOAT, [2, 8])  # noqa: E731
    graph = helper.make_graph(norm("big", "x") + norm("small", "y"), "norms", [value("x"), value("y")],
                              [value("big/out"), value("small/out")], initializer=inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(2, 8)).astype(np.float32)
    x[0, 3] = 25000.0  # a massive activation
    feeds = [{"x": x, "y": rng.normal(size=(2, 8)).astype(np.float32)}]
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds[0])

    added = scale_rms_inputs(model, feeds)
    assert added == ["big/Pow/prescale", "big/Pow/unscale"]  # the small norm stays as it was
    assert set(added) <= {n.name for n in model.graph.node} and len(_float_nodes(model)) == 10
    onnx.checker.check_model(model)
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    got = session.run(None, feeds[0])
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_array_equal(got[1], want[1])
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(value("big/sq"))
    squares = ort.InferenceSession(probe.SerializeToString(), providers=["CPUExecutionProvider"]).run(["big/sq"], feeds[0])[0]
    assert squares.max() <= 128.0 ** 2  # float16 holds it
