"""Quantized builds on tiny checkpoints: each recipe loads, generates and meets PARITY_THRESHOLDS; bad input changes nothing."""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image

pytest.importorskip("onnx")

from smolvlm_edge.quantize import QuantizeError  # noqa: E402
from smolvlm_edge.quantize import build, weights  # noqa: E402
from smolvlm_edge.quantize.build import quantize_bundle  # noqa: E402
from smolvlm_edge.quantize.recipes import (  # noqa: E402
    PARITY_THRESHOLDS, PRECISIONS, RECIPES, SUFFIXES, cosine_floor, get_recipe,
)
from smolvlm_edge.runtime import SmolVLM  # noqa: E402
from smolvlm_edge.runtime.bundle import GRAPH_NAMES, open_bundle, sha256_file  # noqa: E402
from smolvlm_edge.runtime.errors import BundleError  # noqa: E402

REFERENCE_TEXT = Path(__file__).parents[1] / "quantize" / "data" / "reference_text.txt"
PROMPTS = ("What is in this image?", "Describe the picture in detail.", REFERENCE_TEXT.read_text()[:400])
# Everything one bundle can hold side by side (q4 with its default algorithm, auto).
SHARED = ("fp16", "q4f16", "int8", "uint8", "quantized", "q4", "bnb4")


def snapshot(folder: Path) -> dict[str, str]:
    """Every file (hidden ones too) and its sha256: equal snapshots mean an untouched bundle."""
    return {p.relative_to(folder).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("calibration")
    paths = [folder / "a.png", folder / "b.png"]
    make_image(300, 200, seed=1).save(paths[0])
    make_image(512, 512, seed=2).save(paths[1])
    return paths


def copy_bundle(tiny_bundles, kind: str, dest: Path) -> Path:
    return Path(shutil.copytree(tiny_bundles(kind), dest / "bundle"))


@pytest.fixture(scope="module")
def built(tiny_bundles, tmp_path_factory, images) -> Path:
    """One copy of the 256m bundle with every shared precision added."""
    bundle = copy_bundle(tiny_bundles, "256m", tmp_path_factory.mktemp("quantized"))
    for recipe in SHARED:
        quantize_bundle(bundle, recipe, progress=lambda line: None)
    return bundle


def cosine(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def log_softmax(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - x.max(-1, keepdims=True)
    return z - np.log(np.exp(z).sum(-1, keepdims=True))


def parity(bundle: Path, precision, images: list[Path], check_files: bool = True) -> dict:
    """Each graph's output cosine with fp32 (same inputs), and teacher-forced top-1 and KL end to end."""
    from smolvlm_edge.runtime.images import load_image

    build_ = SmolVLM(bundle, precision=precision, check_files=check_files)
    ref = SmolVLM(bundle, check_files=check_files)
    pixels = ref.images([[load_image(p) for p in images]], do_image_splitting=False)
    feed = {"pixel_values": pixels.pixel_values, "pixel_attention_mask": pixels.pixel_attention_mask}
    ids = np.array([ref.text.encode(REFERENCE_TEXT.read_text())[:128]], dtype=np.int64)
    mask, positions = np.ones_like(ids), np.arange(ids.shape[1])[None]

    def logits(vlm, embeds):
        return vlm.decoder(embeds, mask, positions, vlm.decoder.empty_cache(1))[0][0]   # [T, V]

    want = logits(ref, ref.embed(ids))
    got, ref_lp = log_softmax(logits(build_, build_.embed(ids))), log_softmax(want)
    return {
        "vision_encoder": cosine(build_.vision.run(None, feed)[0], ref.vision.run(None, feed)[0]),
        "embed_tokens": cosine(build_.embed(ids), ref.embed(ids)),
        "decoder_model_merged": cosine(logits(build_, ref.embed(ids)), want),
        "top1": float((got.argmax(-1) == ref_lp.argmax(-1)).mean()),
        "kl": float((np.exp(ref_lp) * (ref_lp - got)).sum(-1).mean()),
    }


def assert_passes(result: dict, precision: str) -> None:
    row = PARITY_THRESHOLDS[precision]
    for graph in GRAPH_NAMES:
        assert result[graph] >= cosine_floor(precision, graph), (precision, graph, result)
    assert result["top1"] >= row["top1_min"], (precision, result)
    assert result["kl"] <= row["kl_mean_max"], (precision, result)


def generates(bundle: Path, precision, image: Path) -> list[int]:
    vlm = SmolVLM(bundle, precision=precision)
    out = vlm.generate("What is in this image?", [image], max_new_tokens=4, do_sample=False, do_image_splitting=False)
    assert 1 <= len(out.token_ids) <= 4
    return out.token_ids


# ---------------------------------------------------------------- the table


def test_recipe_table_is_complete():
    assert PRECISIONS[0] == "fp32" and set(PRECISIONS) == {"fp32", *RECIPES}
    for name, recipe in RECIPES.items():
        assert SUFFIXES[name] == recipe.suffix == f"_{name}"
        assert set(recipe.preset) == set(GRAPH_NAMES)
        assert all(choice in RECIPES or choice == "none" for choice in recipe.preset.values())
        assert all(option.doc for option in (recipe.options or {}).values())
    for precision in PRECISIONS:
        assert {"cosine_min", "graph_cosine_min", "top1_min", "kl_mean_max", "greedy_identical"} <= set(
            PARITY_THRESHOLDS[precision])


# ---------------------------------------------------------------- every recipe


@pytest.mark.parametrize("precision", SHARED)
def test_recipe_loads_generates_and_meets_thresholds(built, images, precision):
    generates(built, precision, images[0])
    assert_passes(parity(built, precision, images), precision)


@pytest.mark.parametrize("recipe, options", [
    ("q4", {"algorithm": "rtn"}), ("q4", {"algorithm": "gptq"}), ("q4", {"algorithm": "hqq"}),
    ("q4", {"embeddings_bits": 8, "share_embeddings": False}), ("q4", {"lm_head_bits": 4, "share_embeddings": False}),
    ("int8", {"mode": "weight_only"}),
], ids=["q4-rtn", "q4-gptq", "q4-hqq", "q4-8bit-embeddings", "q4-4bit-lm-head", "int8-weight-only"])
def test_recipe_variants(tiny_bundles, tmp_path, images, recipe, options):
    bundle = copy_bundle(tiny_bundles, "256m", tmp_path)
    lines = []
    quantize_bundle(bundle, recipe, options=options, calibration_images=images, calibration_prompts=PROMPTS,
                    progress=lines.append)
    entries = json.loads((bundle / "manifest.json").read_text())["graphs"]
    decoder = entries["decoder_model_merged"][recipe]
    assert {k: decoder["options"][k] for k in options} == options
    if recipe == "q4":
        assert decoder["info"]["algorithm"] == options.get("algorithm", "auto")
        if "algorithm" not in options:  # auto says what it did: random tiny weights sit on no grid
            searched = decoder["info"]["weights_searched"]
            assert searched > 0 and decoder["info"]["weights_on_exact_grid"] == 0
            assert any(line.startswith("decoder_model_merged: q4 in ") and line.endswith(
                f"(0 weights kept on their own 4-bit grid, {searched} searched)") for line in lines), lines
        head_bits = options.get("lm_head_bits", 8)
        assert decoder["info"]["lm_head"] == ("int8 MatMulNBits" if head_bits == 8 else f"int4 {decoder['info']['algorithm']}")
        embed_info = entries["embed_tokens"]["q4"]["info"]
        assert "shared_table" not in embed_info  # the tiny lm_head is random, not a copy of the table
        assert embed_info["embedding_bits"] == options.get("embeddings_bits", 4)
    else:
        import onnx

        fp32 = onnx.load(str(bundle / entries["decoder_model_merged"]["fp32"]["file"]), load_external_data=False)
        constants = {t.name for t in fp32.graph.initializer}
        matmuls = sum(n.op_type == "MatMul" and n.input[1] in constants for n in fp32.graph.node)
        assert decoder["info"]["matmuls_quantized"] == matmuls and decoder["info"]["accuracy_level"] == 4
    generates(bundle, recipe, images[0])
    assert_passes(parity(bundle, recipe, images), recipe)


@pytest.mark.parametrize("attention", ["fused", "plain"])
def test_int8_smooth_decoder_quantizes_activations_per_row(tiny_bundles, tmp_path, images, attention):
    """SmoothQuant W8A8: every linear but the lm_head runs as MatMulIntegerToFloat on int8 rows, the 1/s of
    each linear a fused RMS norm feeds goes into that norm's scale (a plain export keeps a Mul for each),
    and the build still meets int8's floors."""
    import onnx

    from smolvlm_edge.quantize.smooth import CALIBRATION_PROMPTS

    bundle = Path(shutil.copytree(tiny_bundles("256m", attention), tmp_path / "bundle"))
    quantize_bundle(bundle, "int8", options={"decoder": {"mode": "smooth"}, "embed": {"mode": "weight_only"}},
                    progress=lambda line: None)
    entries = json.loads((bundle / "manifest.json").read_text())["graphs"]
    info = entries["decoder_model_merged"]["int8"]["info"]
    fp32 = onnx.load(str(bundle / entries["decoder_model_merged"]["fp32"]["file"]), load_external_data=False)
    constants = {t.name for t in fp32.graph.initializer}
    linears = sum(n.op_type == "MatMul" and n.input[1] in constants for n in fp32.graph.node) - 1  # less the lm_head
    assert info["mode"] == "smooth" and info["matmuls_quantized"] == linears and info["alpha"] == "auto"
    assert sum(info["alphas_chosen"].values()) == linears
    assert info["calibration_prompts"] == len(CALIBRATION_PROMPTS) and info["lm_head"] == "int8 MatMulNBits"
    built_ = onnx.load(str(bundle / entries["decoder_model_merged"]["int8"]["file"]), load_external_data=False)
    ops = [n.op_type for n in built_.graph.node]
    assert ops.count("MatMulIntegerToFloat") == linears and ops.count("MatMulNBits") == 1
    assert not [n for n in built_.graph.node if n.op_type == "MatMul" and n.input[1] in
                {t.name for t in built_.graph.initializer}]
    # qkv and gate_up read a norm's output (1/s folded into its scale); o_proj and down_proj keep a Mul
    smoothing = [n for n in built_.graph.node if n.name.endswith("_smooth")]
    if attention == "fused":
        assert len(smoothing) == linears // 2 and all("o_proj" in n.name or "down_proj" in n.name for n in smoothing)
    else:
        assert len(smoothing) == linears
    generates(bundle, "int8", images[0])
    assert_passes(parity(bundle, "int8", images), "int8")


def test_q4_on_the_2b_shape(tiny_bundles, tmp_path, images):
    bundle = copy_bundle(tiny_bundles, "2b", tmp_path)
    quantize_bundle(bundle, "q4", progress=lambda line: None)
    generates(bundle, "q4", images[0])
    assert_passes(parity(bundle, "q4", images), "q4")


def test_a_damaged_build_fails_the_thresholds(built, tmp_path, images):
    """Swapping the two int4 values of every byte (a packing bug) must not pass as a q4 build."""
    import onnx
    from onnx import numpy_helper

    bundle = Path(shutil.copytree(built, tmp_path / "damaged"))
    path = bundle / "onnx" / "decoder_model_merged_q4.onnx"
    model = onnx.load(path)
    weights_ = {n.input[1] for n in model.graph.node if n.op_type == "MatMulNBits"}
    for tensor in model.graph.initializer:
        if tensor.name in weights_:
            packed = numpy_helper.to_array(tensor)
            tensor.CopyFrom(numpy_helper.from_array(((packed & 0x0F) << 4) | (packed >> 4), tensor.name))
    onnx.save(model, path)
    result = parity(bundle, "q4", images, check_files=False)  # the sha256 check is not the point here
    row = PARITY_THRESHOLDS["q4"]
    assert result["decoder_model_merged"] < row["cosine_min"] and result["kl"] > row["kl_mean_max"], result


def test_fp16_keeps_a_norms_mean_of_squares_in_float32():
    """x = 1000 squares to 1e6, past float16's 65504: the norm chain must stay float32 end to end."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    nodes = [helper.make_node("Pow", ["x", "two"], ["sq"], name="pow"),
             helper.make_node("ReduceMean", ["sq", "axes"], ["mean"], name="mean", keepdims=1),
             helper.make_node("Add", ["mean", "eps"], ["var"], name="add"),
             helper.make_node("Sqrt", ["var"], ["root"], name="sqrt"),
             helper.make_node("Reciprocal", ["root"], ["inv"], name="inv"),
             helper.make_node("Mul", ["x", "inv"], ["normed"], name="scale"),
             helper.make_node("MatMul", ["normed", "w"], ["y"], name="proj")]
    init = [numpy_helper.from_array(np.array(2.0, np.float32), "two"), numpy_helper.from_array(np.array([-1]), "axes"),
            numpy_helper.from_array(np.array(1e-5, np.float32), "eps"),
            numpy_helper.from_array(np.random.default_rng(0).normal(size=(8, 4)).astype(np.float32), "w")]
    graph = helper.make_graph(nodes, "norm", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])], init)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    x = {"x": np.array([[1000, -3, 2, 1, 0.5, -1, 4, 1000]], np.float32)}
    want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    half, info = weights.to_float16(onnx.ModelProto.FromString(model.SerializeToString()))
    got = ort.InferenceSession(half.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, x)[0]
    assert info["float32_nodes"] == 5 and info["round_trips_removed"] >= 4
    np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-3)


# ---------------------------------------------------------------- manifest and runtime


def test_manifest_records_each_build(built):
    bundle = open_bundle(built)  # checks the sha256 and size of every listed file
    fp32 = {g: bundle.manifest["graphs"][g]["fp32"] for g in GRAPH_NAMES}
    for precision in SHARED:
        for graph in GRAPH_NAMES:
            entry = bundle.manifest["graphs"][graph][precision]
            assert entry["file"] == f"onnx/{graph}{SUFFIXES[precision]}.onnx"
            assert entry["recipe"] == precision and entry["source"] == "fp32"
            assert entry["inputs"] == fp32[graph]["inputs"] and entry["outputs"] == fp32[graph]["outputs"]
            listed = bundle.manifest["files"][entry["file"]]
            assert listed["sha256"] == sha256_file(built / entry["file"])
            assert entry["size_bytes"] == listed["size"] == (built / entry["file"]).stat().st_size
            assert set(entry["options"]) == set(get_recipe(precision).option_table())
    q4 = bundle.manifest["graphs"]["decoder_model_merged"]["q4"]
    assert q4["info"]["lm_head"] == "int8 MatMulNBits" and q4["info"]["matmuls_float"] == 0
    assert bundle.manifest["graphs"]["embed_tokens"]["q4"]["info"]["gathers_quantized"] == 1
    assert not [p for p in (built / "onnx").iterdir() if p.name.startswith(".")]


def test_runtime_mixes_precisions_per_graph(built, images):
    mixed = {"vision_encoder": "int8", "embed_tokens": "fp32", "decoder_model_merged": "q4"}
    generates(built, mixed, images[0])
    vlm, int8, q4 = SmolVLM(built, precision=mixed), SmolVLM(built, precision="int8"), SmolVLM(built, precision="q4")
    pixels = vlm.images([[make_image(64, 64)]], do_image_splitting=False)
    feed = {"pixel_values": pixels.pixel_values, "pixel_attention_mask": pixels.pixel_attention_mask}
    np.testing.assert_array_equal(vlm.vision.run(None, feed)[0], int8.vision.run(None, feed)[0])
    ids = np.array([[5, 6, 7, 8]], dtype=np.int64)
    np.testing.assert_array_equal(vlm.embed(ids), SmolVLM(built).embed(ids))
    args = (vlm.embed(ids), np.ones_like(ids), np.arange(4)[None])
    np.testing.assert_array_equal(vlm.decoder(*args, vlm.decoder.empty_cache(1))[0],
                                  q4.decoder(*args, q4.decoder.empty_cache(1))[0])


def test_per_graph_choices(tiny_bundles, tmp_path):
    bundle = copy_bundle(tiny_bundles, "256m", tmp_path)
    lines = []
    result = quantize_bundle(bundle, "q4", graphs={"vision": "int8", "embed_tokens": "none"},
                             options={"decoder": {"block_size": 16, "accuracy_level": 0}}, progress=lines.append)
    graphs = json.loads((bundle / "manifest.json").read_text())["graphs"]
    assert set(graphs["vision_encoder"]) == {"fp32", "int8"} and set(graphs["embed_tokens"]) == {"fp32"}
    assert graphs["decoder_model_merged"]["q4"]["options"]["block_size"] == 16
    assert graphs["decoder_model_merged"]["q4"]["options"]["accuracy_level"] == 0
    assert set(result["graphs"]) == {"vision_encoder", "decoder_model_merged"}
    assert any("decoder_model_merged: q4 in" in line and "MB ->" in line for line in lines)


# ---------------------------------------------------------------- bad input leaves the bundle as it was


@pytest.fixture
def fresh(tiny_bundles, tmp_path) -> Path:
    return copy_bundle(tiny_bundles, "256m", tmp_path)


@pytest.mark.parametrize("call, message", [
    (dict(recipe="q3"), "unknown recipe 'q3'; known recipes: fp16, q4f16"),
    (dict(recipe="q4", options={"blocksize": 64}), "unknown option blocksize for recipe q4"),
    (dict(recipe="q4", options={"block_size": 48}), "block_size=48 of recipe q4 must be one of"),
    (dict(recipe="q4", options={"algorithm": "hqq", "symmetric": True}), "algorithm=hqq stores a zero point per block"),
    (dict(recipe="q4", graphs={"audio": "int8"}), "unknown graph 'audio'"),
    (dict(recipe="int8", options={"block_size": 64}), "block_size is an option of int8 mode=weight_only"),
    (dict(recipe="int8", options={"mode": "smooth"}), "mode=smooth quantizes the decoder's activations"),
    (dict(recipe="int8", graphs={"vision": "none", "embed": "none"}, options={"mode": "smooth", "alpha": 1.5}),
     "alpha=1.5 of mode=smooth must lie in [0, 1]"),
    (dict(recipe="q4", graphs={g: "none" for g in GRAPH_NAMES}), "nothing to build"),
    (dict(recipe="q4", options={"algorithm": "gptq"}, calibration_prompts=["hi"]), "needs calibration images"),
    (dict(recipe="q4", graphs={"vision": "none"}, options={"algorithm": "gptq"}, calibration_prompts=["hi", " "]),
     "needs calibration prompts"),
    (dict(recipe="q4", graphs={"vision": "none"}, options={"algorithm": "gptq"}), "needs calibration prompts"),
    (dict(recipe="q4", options={"algorithm": "gptq", "symmetric": False, "block_size": 64}, calibration_prompts=["hi"],
          graphs={"vision": "none"}), "needs an even number of blocks per column"),
])
def test_bad_requests_are_refused_and_change_nothing(fresh, call, message):
    before = snapshot(fresh)
    with pytest.raises(QuantizeError, match=re.escape(message)):
        quantize_bundle(fresh, progress=lambda line: None, **call)
    assert snapshot(fresh) == before


def test_built_files_are_as_readable_as_new_files(fresh, monkeypatch):
    """onnx.save writes external-data files 0600: a bundle copied to a server or read by another user would
    open its graphs but not their weights. Committed files get the mode a plain new file gets."""
    monkeypatch.setattr(weights, "EXTERNAL_DATA_BYTES", 0)  # the tiny weights go beside their graphs too
    quantize_bundle(fresh, "q4", progress=lambda line: None)
    umask = os.umask(0o022)
    os.umask(umask)
    assert [p for p in (fresh / "onnx").iterdir() if p.suffix == ".onnx_data"], "no external-data file to check"
    modes = {p.name: oct(p.stat().st_mode & 0o777) for p in fresh.rglob("*") if p.is_file()}
    assert set(modes.values()) == {oct(0o666 & ~umask)}, modes


def test_unreadable_calibration_image(fresh, tmp_path):
    bad = tmp_path / "not-an-image.png"
    bad.write_text("hello")
    before = snapshot(fresh)
    with pytest.raises(QuantizeError, match="calibration image .*not-an-image.png cannot be read"):
        quantize_bundle(fresh, "q4", options={"algorithm": "gptq"}, calibration_images=[bad],
                        calibration_prompts=PROMPTS, progress=lambda line: None)
    assert snapshot(fresh) == before


def test_requantizing_is_refused_unless_overwrite(fresh):
    quantize_bundle(fresh, "int8", graphs={"embed": "none", "decoder": "none"}, progress=lambda line: None)
    before = snapshot(fresh)
    with pytest.raises(QuantizeError, match="vision_encoder already has a int8 build .*overwrite=True"):
        quantize_bundle(fresh, "int8", graphs={"embed": "none", "decoder": "none"}, progress=lambda line: None)
    assert snapshot(fresh) == before
    quantize_bundle(fresh, "int8", graphs={"embed": "none", "decoder": "none"}, options={"per_channel": True},
                    overwrite=True, progress=lambda line: None)
    manifest = open_bundle(fresh).manifest  # the sha256 of the rebuilt file is the new one
    assert manifest["graphs"]["vision_encoder"]["int8"]["options"]["per_channel"] is True


def test_an_already_quantized_source_is_refused(fresh):
    quantize_bundle(fresh, "q4", graphs={"vision": "none", "embed": "none"}, progress=lambda line: None)
    # A bundle whose "fp32" entry points at a quantized graph (hand-edited, sha256 table updated too).
    manifest = json.loads((fresh / "manifest.json").read_text())
    manifest["graphs"]["decoder_model_merged"]["fp32"] = manifest["graphs"]["decoder_model_merged"].pop("q4")
    (fresh / "manifest.json").write_text(json.dumps(manifest))
    before = snapshot(fresh)
    with pytest.raises(QuantizeError, match="already quantized \\(MatMulNBits\\)"):
        quantize_bundle(fresh, "int8", graphs={"vision": "none", "embed": "none"}, progress=lambda line: None)
    assert snapshot(fresh) == before


def test_a_tampered_bundle_is_refused(fresh):
    graph = fresh / "onnx" / "embed_tokens.onnx"
    data = bytearray(graph.read_bytes())
    data[-10] ^= 0xFF
    graph.write_bytes(bytes(data))
    before = snapshot(fresh)
    with pytest.raises(BundleError, match="embed_tokens.onnx has sha256"):
        quantize_bundle(fresh, "int8", progress=lambda line: None)
    assert snapshot(fresh) == before


def test_an_interrupted_build_leaves_the_bundle_as_it_was(fresh, monkeypatch):
    calls, original = [], weights.quantize_int8

    def interrupted(src, dst, graph, options, context):
        calls.append(graph)
        if len(calls) == 2:  # the first graph is staged, the second has written its file
            dst.write_bytes(b"partial")
            raise KeyboardInterrupt
        return original(src, dst, graph, options, context)

    monkeypatch.setattr(weights, "quantize_int8", interrupted)
    before = snapshot(fresh)
    with pytest.raises(KeyboardInterrupt):
        quantize_bundle(fresh, "int8", progress=lambda line: None)
    assert calls == ["vision_encoder", "embed_tokens"]
    assert snapshot(fresh) == before


def test_a_failed_commit_puts_everything_back(fresh, monkeypatch):
    """Files already renamed into onnx/ (one replacing an older build) are undone when manifest.json fails."""
    quantize_bundle(fresh, "int8", graphs={"embed": "none", "decoder": "none"}, progress=lambda line: None)
    before = snapshot(fresh)

    def full_disk(folder, manifest):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(build, "replace_manifest", full_disk)
    with pytest.raises(OSError, match="No space left"):
        quantize_bundle(fresh, "int8", overwrite=True, progress=lambda line: None)
    assert snapshot(fresh) == before


def _copied_head_bundle(tiny_checkpoints, tmp_path) -> Path:
    """A tiny bundle whose untied lm_head is a copy of the embedding table, as in SmolVLM."""
    import torch
    from transformers import Idefics3ForConditionalGeneration

    from smolvlm_edge.export.api import export_checkpoint

    checkpoint = tmp_path / "copied-head"
    shutil.copytree(tiny_checkpoints("256m"), checkpoint)
    model = Idefics3ForConditionalGeneration.from_pretrained(checkpoint)
    with torch.no_grad():
        model.lm_head.weight.copy_(model.get_input_embeddings().weight)
    model.save_pretrained(checkpoint)
    return export_checkpoint(str(checkpoint), tmp_path / "bundle", progress=lambda line: None)


def test_the_embedding_table_is_stored_once(tiny_checkpoints, tmp_path, images):
    """q4's default: embed_tokens reads the decoder's 8-bit lm_head blocks from the decoder's data file."""
    import onnxruntime as ort

    from smolvlm_edge.runtime.bundle import open_bundle
    from smolvlm_edge.runtime.embed_table import table_rows_for

    bundle = _copied_head_bundle(tiny_checkpoints, tmp_path)
    quantize_bundle(bundle, "q4", progress=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    embed, decoder = manifest["graphs"]["embed_tokens"]["q4"], manifest["graphs"]["decoder_model_merged"]["q4"]
    assert embed["external_data"] == decoder["external_data"] == "onnx/decoder_model_merged_q4.onnx_data"
    assert embed["size_bytes"] < 10_000 and embed["info"]["shared_max_steps"] <= 0.6
    opened = open_bundle(bundle)  # sizes and sha256 of every file still match the manifest
    # The runtime reads the rows itself (runtime/embed_table.py): the graph's lookup, bit for bit.
    rows = table_rows_for(opened, "q4")
    session = ort.InferenceSession(str(opened.graph_file("embed_tokens", "q4")), providers=["CPUExecutionProvider"])
    every = np.arange(embed["info"]["table_rows"]["vocab_size"], dtype=np.int64)[None]
    np.testing.assert_array_equal(rows(every), session.run(None, {"input_ids": every})[0])
    with pytest.raises(ValueError, match="out of range"):
        rows(every + 1)
    vlm = SmolVLM(bundle, precision="q4")  # the runtime opens no embed session then, and answers the same
    assert vlm.embed_session is None and vlm.embed_rows is not None
    ask = dict(max_new_tokens=4, do_sample=False, do_image_splitting=False)
    with_rows = vlm.generate("What is in this image?", [images[0]], **ask).token_ids
    vlm.embed_rows, vlm.embed_session = None, session
    assert vlm.generate("What is in this image?", [images[0]], **ask).token_ids == with_rows
    generates(bundle, "q4", images[0])
    assert_passes(parity(bundle, "q4", images), "q4")
    # Rebuilding the decoder alone keeps the data file the embed build still reads.
    quantize_bundle(bundle, "q4", graphs={"vision": "none", "embed": "none"}, overwrite=True,
                    progress=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["decoder_model_merged"]["q4"]["external_data"] is None
    assert "onnx/decoder_model_merged_q4.onnx_data" in manifest["files"]
    open_bundle(bundle)
    generates(bundle, "q4", images[0])
    # Rebuilding both, unshared, leaves no dangling file.
    quantize_bundle(bundle, "q4", options={"share_embeddings": False}, overwrite=True, progress=lambda line: None)
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert not (bundle / "onnx" / "decoder_model_merged_q4.onnx_data").exists()
    assert "onnx/decoder_model_merged_q4.onnx_data" not in manifest["files"]
    open_bundle(bundle)
    generates(bundle, "q4", images[0])


def test_hqq_zero_points_become_a_block_bias_with_the_same_product():
    """float zero points (onnxruntime's slow path) -> symmetric MatMulNBits + blocksum(A) @ bias: same numbers."""
    import onnx
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from smolvlm_edge.quantize import weights

    rng = np.random.default_rng(0)
    k, n = 96, 40
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, n])],
        [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    hqq = weights._nbits(model, 4, 32, False, 0, "hqq", [])
    a = {"A": rng.standard_normal((2, 3, k)).astype(np.float32)}
    want = ort.InferenceSession(hqq.SerializeToString()).run(None, a)[0]
    rewritten = onnx.ModelProto.FromString(hqq.SerializeToString())
    assert len(weights.float_zero_points_to_bias(rewritten)) == 1
    node = next(x for x in rewritten.graph.node if x.op_type == "MatMulNBits")
    assert len(node.input) == 3  # no zero points: onnxruntime's fast int4 kernels
    got = ort.InferenceSession(rewritten.SerializeToString()).run(None, a)[0]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def _one_matmul(weight: np.ndarray):
    from onnx import TensorProto, helper, numpy_helper

    k, n = weight.shape
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y"], name="mm")], "g",
        [helper.make_tensor_value_info("A", TensorProto.FLOAT, [2, 3, k])],
        [helper.make_tensor_value_info("Y", TensorProto.FLOAT, [2, 3, n])],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    return model


def _q4_info_and_output(weight, a, algorithm, block, level=0):
    """The one-MatMul graph through q4_model: its info and onnxruntime's output."""
    import onnxruntime as ort

    from smolvlm_edge.quantize import recipes, weights

    options = recipes.get_recipe("q4").resolve_options({"algorithm": algorithm, "block_size": block,
                                                        "accuracy_level": level, "scales": "float32"})
    model, info = weights.q4_model(_one_matmul(weight), "decoder_model_merged", options, None)
    return model, info, ort.InferenceSession(model.SerializeToString()).run(None, {"A": a})[0]


def test_searched_int4_grid_runs_as_stored_and_beats_round_to_nearest():
    """algorithm=search: integer zero points in onnxruntime's layout (9 blocks per column: an odd count, packed
    two per byte with a pad), the product is the dequantized weight's, and the weight error is below RTN's."""
    from smolvlm_edge.quantize import int4_grid, weights

    rng = np.random.default_rng(0)
    k, n, block = 576, 40, 64
    weight = rng.standard_normal((k, n)).astype(np.float32)
    weight[:, 3] = 0.25  # constant columns and a zero one: no division by a zero range
    weight[:, 4] = 0.0
    a = rng.standard_normal((2, 3, k)).astype(np.float32)
    model, info, got = _q4_info_and_output(weight, a, "search", block)
    assert info["weights_searched"] == 1 and info["weights_on_exact_grid"] == 0
    assert info["float_zero_points_as_block_bias"] == 0
    node = next(x for x in model.graph.node if x.op_type == "MatMulNBits")
    assert len(node.input) == 4 and weights.quantized_ops(model) == ["MatMulNBits"]

    codes, scales, zeros = int4_grid.search_grid(int4_grid.blocks_of(weight, block))
    assert zeros.shape == (n, 9)
    dequantized = ((codes.astype(np.float32) - zeros[..., None]) * scales[..., None]).reshape(n, k).T
    np.testing.assert_allclose(got, a @ dequantized, rtol=1e-4, atol=1e-3)
    np.testing.assert_allclose(dequantized[:, 3:5], weight[:, 3:5], atol=1e-6)

    rtn_codes, rtn_scales, rtn_zeros = weights.block_quantize(weight.T.copy(), 4, block, symmetric=False)
    rtn = ((rtn_codes.reshape(n, 9, block) - rtn_zeros[..., None].astype(np.float32)) * rtn_scales[..., None]).reshape(n, k).T
    assert np.linalg.norm(dequantized - weight) < 0.97 * np.linalg.norm(rtn - weight)  # ~0.955 on these


def test_a_weight_two_matmuls_share_is_quantized_once():
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from smolvlm_edge.quantize import recipes, weights

    rng = np.random.default_rng(2)
    weight = rng.standard_normal((64, 8)).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["A", "W"], ["Y1"], name="mm1"), helper.make_node("MatMul", ["B", "W"], ["Y2"], name="mm2")],
        "g", [helper.make_tensor_value_info(x, TensorProto.FLOAT, [1, 64]) for x in "AB"],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, [1, 8]) for y in ("Y1", "Y2")],
        [numpy_helper.from_array(weight, "W")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    model.ir_version = 9
    options = recipes.get_recipe("q4").resolve_options({"algorithm": "search", "scales": "float32", "accuracy_level": 0})
    model, info = weights.q4_model(model, "decoder_model_merged", options, None)
    assert info["weights_searched"] == 1 and len(model.graph.initializer) == 3
    a = rng.standard_normal((1, 64)).astype(np.float32)
    y1, y2 = ort.InferenceSession(model.SerializeToString()).run(None, {"A": a, "B": a})
    np.testing.assert_array_equal(y1, y2)


def test_auto_keeps_a_weight_that_sits_on_a_4bit_grid_exactly():
    """A weight dequantized from Q4_1 (w = d q + m per block of 32) is kept exactly by algorithm=auto (float
    zero points through the block bias); off the grid, auto searches as algorithm=search does."""
    rng = np.random.default_rng(1)
    k, n = 96, 24
    d = rng.uniform(0.01, 0.05, (k // 32, n)).astype(np.float32)
    m = rng.uniform(-0.4, -0.1, (k // 32, n)).astype(np.float32)
    q = rng.integers(0, 16, (k, n))
    q[0::32], q[1::32] = 0, 15  # every block reaches both ends, as Q4_1's min and max do
    on_grid = (np.repeat(d, 32, 0) * q + np.repeat(m, 32, 0)).astype(np.float32)
    a = rng.standard_normal((2, 3, k)).astype(np.float32)

    model, info, got = _q4_info_and_output(on_grid, a, "auto", 32)
    assert info["weights_on_exact_grid"] == 1 and info["float_zero_points_as_block_bias"] == 1
    np.testing.assert_allclose(got, a @ on_grid, rtol=1e-4, atol=1e-4)

    off_grid = on_grid + rng.uniform(-0.5, 0.5, on_grid.shape).astype(np.float32) * np.repeat(d, 32, 0)
    _, info, auto = _q4_info_and_output(off_grid, a, "auto", 32)
    _, _, search = _q4_info_and_output(off_grid, a, "search", 32)
    assert info["weights_searched"] == 1 and info["float_zero_points_as_block_bias"] == 0
    np.testing.assert_array_equal(auto, search)


def test_large_builds_keep_their_weights_in_one_data_file(tiny_checkpoints, tmp_path, images, monkeypatch):
    """Above EXTERNAL_DATA_BYTES (here: always) every weight goes to `.onnx_data`, written once even
    when the shared table rewrites the decoder (onnx appends to an existing data file)."""
    import onnx

    from smolvlm_edge.quantize import weights
    from smolvlm_edge.runtime.bundle import open_bundle

    bundle = _copied_head_bundle(tiny_checkpoints, tmp_path)
    monkeypatch.setattr(weights, "EXTERNAL_DATA_BYTES", 0)
    quantize_bundle(bundle, "q4", progress=lambda line: None)
    decoder_file = bundle / "onnx" / "decoder_model_merged_q4.onnx"
    data = decoder_file.with_suffix(".onnx_data")
    header = onnx.load(str(decoder_file), load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    stored = sum(int(next(e.value for e in t.external_data if e.key == "length")) for t in external)
    assert external and not [t for t in header.graph.initializer if len(t.raw_data) > 1024]
    assert stored <= data.stat().st_size < stored + 4096 * len(external)  # each tensor once (plus alignment)
    assert decoder_file.stat().st_size < data.stat().st_size
    open_bundle(bundle)
    generates(bundle, "q4", images[0])
