"""The one-file mobile model (export/mobile.py): in-graph preprocessing, greedy ids equal the runtime's, golden vectors.

Regenerate tests/data/mobile_golden.json (only when the tiny checkpoint or the runtime changes on purpose):
    .venv/bin/python tests/test_mobile.py --write-golden
"""
from __future__ import annotations

import base64
import json
import os
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest

from conftest import make_image

pytest.importorskip("onnx")

from smolvlm_edge.export import mobile, mobile_merge, mobile_tokenizer  # noqa: E402
from smolvlm_edge.runtime import SmolVLM  # noqa: E402
from smolvlm_edge.runtime.errors import ImageError, PromptError  # noqa: E402
from smolvlm_edge.runtime.images import ImageProcessor  # noqa: E402

GOLDEN = Path(__file__).parent / "data" / "mobile_golden.json"
PROMPT = "What is in this image?"
NEW_TOKENS = 16
# The largest |in-graph - ImageProcessor| pixel difference measured (normalized float32 values): none.
RESIZE_BOUND = 0.0
# Wide, tall (the height pass first in Pillow 13), upscaled, downscaled, odd, square, one pixel, already 2x the frame.
SIZES = [(300, 200), (200, 300), (64, 97), (1, 1), (7, 3), (33, 900), (1023, 767), (1024, 1024), (511, 512)]


def runtime_ids(vlm: SmolVLM, image, max_new_tokens: int = NEW_TOKENS, prompt: str = PROMPT):
    """(prompt ids [1, T], greedy ids) as the runtime makes them for one image without splitting."""
    ids = vlm.prepare([prompt], [[image]], do_image_splitting=False).input_ids
    result = vlm.generate(prompt, [image], max_new_tokens=max_new_tokens, do_sample=False, do_image_splitting=False)
    return ids, result.token_ids


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles("256m")


@pytest.fixture(scope="module")
def fp32_model(bundle, tmp_path_factory):
    path = mobile.build_mobile_model(bundle, tmp_path_factory.mktemp("mobile") / "smolvlm_mobile.onnx",
                                     max_new_tokens=NEW_TOKENS)
    return mobile.open_mobile_session(path)


def test_preprocessing_equals_the_image_processor(bundle):
    """Pillow's resampling rebuilt in ONNX: the normalized pixels are bit-identical, whatever the size."""
    import onnxruntime as ort

    session = ort.InferenceSession(mobile.build_preprocess_model(bundle).SerializeToString(),
                                   providers=["CPUExecutionProvider"])
    processor = ImageProcessor.from_dir(bundle)
    worst = 0.0
    for width, height in SIZES:
        image = make_image(width, height, seed=width + height)
        got = session.run(None, {"image": np.asarray(image)})[0]
        want = processor([[image]], do_image_splitting=False).pixel_values
        assert got.shape == want.shape == (1, 1, 3, 512, 512)
        worst = max(worst, float(np.abs(got - want).max()))
    assert worst <= RESIZE_BOUND, f"in-graph preprocessing differs from ImageProcessor by {worst}"


def test_fp32_tokens_equal_the_runtime(bundle, fp32_model):
    vlm = SmolVLM(bundle)
    info = mobile.model_info(fp32_model)
    assert info["tokens_per_image"] == 64 and info["max_new_tokens"] == NEW_TOKENS
    assert [i.name for i in fp32_model.get_inputs()] == ["image", "input_ids"]
    # max_new_tokens: a graph input with an initializer, which onnxruntime lists apart from the inputs
    assert [i.name for i in fp32_model.get_overridable_initializers()] == ["max_new_tokens"]
    assert [o.name for o in fp32_model.get_outputs()] == ["generated_ids"]
    for width, height in ((300, 200), (64, 97)):
        image = make_image(width, height, seed=width)
        ids, want = runtime_ids(vlm, image)
        assert ids[0, :len(info["prompt_prefix_ids"])].tolist() == info["prompt_prefix_ids"]
        assert mobile.run_mobile_model(fp32_model, np.asarray(image), ids) == want


def test_max_new_tokens_input_is_honoured(bundle, fp32_model):
    image = make_image(120, 90, seed=5)
    ids = SmolVLM(bundle).prepare([PROMPT], [[image]], do_image_splitting=False).input_ids
    full = mobile.run_mobile_model(fp32_model, np.asarray(image), ids)  # the build's default
    assert len(full) <= NEW_TOKENS
    assert mobile.run_mobile_model(fp32_model, np.asarray(image), ids, max_new_tokens=3) == full[:3]
    longer = mobile.run_mobile_model(fp32_model, np.asarray(image), ids, max_new_tokens=NEW_TOKENS + 4)
    assert longer[:len(full)] == full
    raw = fp32_model.run(["generated_ids"], {"image": np.asarray(image), "input_ids": ids,
                                             "max_new_tokens": np.array(0, dtype=np.int64)})[0]
    assert raw.shape == (1, 0)  # what the graph does; check_inputs refuses 0


def _set_stop_tokens(bundle: Path, stop: list[int]) -> None:
    """Edit generation_config.json of a bundle copy and its manifest entry (the bundle checks sha256)."""
    from smolvlm_edge.runtime.bundle import sha256_file

    gen_file = bundle / "generation_config.json"
    gen = json.loads(gen_file.read_text())
    gen["eos_token_id"] = stop
    gen_file.write_text(json.dumps(gen))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["generation_config.json"] = {"sha256": sha256_file(gen_file), "size": gen_file.stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest))


def test_stops_after_the_first_stop_token_and_includes_it(bundle, fp32_model, tmp_path):
    """A stop id that the model emits at step 4 ends generation there, as in the runtime."""
    image = make_image(120, 90, seed=5)
    ids = SmolVLM(bundle).prepare([PROMPT], [[image]], do_image_splitting=False).input_ids
    free = mobile.run_mobile_model(fp32_model, np.asarray(image), ids)
    stop = free[3]
    first = free.index(stop)
    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    _set_stop_tokens(copy, [stop])
    model = mobile.build_mobile_model(copy, tmp_path / "stop.onnx", max_new_tokens=NEW_TOKENS)
    got = mobile.run_mobile_model(model, np.asarray(image), ids)
    assert got == free[:first + 1]
    assert got == runtime_ids(SmolVLM(copy), image)[1]


def test_q4_tokens_equal_the_runtime_and_external_data(bundle, tmp_path, monkeypatch):
    """q4 graphs (quantize_bundle on a copy); the weights written to a file beside it, as models over 2 GB are."""
    from smolvlm_edge.quantize.build import quantize_bundle

    copy = tmp_path / "bundle"
    shutil.copytree(bundle, copy)
    # accuracy_level 0: inside the Loop body onnxruntime 1.32 appears not to prepack the outer-scope int4 weights
    # and runs MatMulNBits' float path whatever the level says (measured: the one-file model's tokens equal
    # the runtime's at level 0 and differ from level 4's at the second token on this tiny model).
    quantize_bundle(copy, "q4", options={"accuracy_level": 0}, progress=lambda _line: None)
    monkeypatch.setattr(mobile, "EXTERNAL_DATA_THRESHOLD", 0)
    path = mobile.build_mobile_model(copy, tmp_path / "q4.onnx", precision="q4", max_new_tokens=NEW_TOKENS)
    [data] = mobile.weights_files(path)
    assert data.name.startswith("q4.onnx.") and data.name.endswith(".data") and data.stat().st_size > 100_000
    assert sorted(p.name for p in tmp_path.glob("q4.onnx*")) == sorted(["q4.onnx", data.name])
    assert mobile.model_info(mobile.open_mobile_session(path))["precision"]["decoder_model_merged"] == "q4"
    vlm = SmolVLM(copy, precision="q4")
    session = mobile.open_mobile_session(path)
    for width, height in ((300, 200), (64, 97)):
        image = make_image(width, height, seed=width)
        ids, want = runtime_ids(vlm, image)
        assert mobile.run_mobile_model(session, np.asarray(image), ids) == want


def test_a_failed_rebuild_keeps_the_previous_file_and_leaves_nothing_else(bundle, tmp_path, monkeypatch):
    """The model is written into a staging folder beside it and renamed in only once onnxruntime loaded it."""
    from smolvlm_edge.runtime.errors import ExportError

    path = mobile.build_mobile_model(bundle, tmp_path / "m.onnx", max_new_tokens=NEW_TOKENS)
    before = path.read_bytes()

    def refuse(_path):
        raise RuntimeError("simulated load failure")

    monkeypatch.setattr(mobile, "open_mobile_session", refuse)
    with pytest.raises(ExportError, match="not written"):
        mobile.build_mobile_model(bundle, path, max_new_tokens=NEW_TOKENS + 1)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_a_rebuild_with_external_weights_switches_graph_and_weights_together(bundle, tiny_bundles, tmp_path,
                                                                             monkeypatch):
    """Each build's weights file has a name of its own: a rebuild (here from the standard-ops bundle, whose
    weights file is laid out otherwise) stopped after its weights are in place but before the graph (the last
    rename) leaves the previous graph reading its own weights; a finished one leaves one weights file."""
    plain = tiny_bundles("256m", "plain")
    monkeypatch.setattr(mobile, "EXTERNAL_DATA_THRESHOLD", 0)
    path = mobile.build_mobile_model(bundle, tmp_path / "m.onnx", max_new_tokens=NEW_TOKENS)
    [first] = mobile.weights_files(path)
    image, ids = np.asarray(make_image(40, 30, seed=3)), runtime_ids(SmolVLM(bundle), make_image(40, 30, seed=3))[0]
    want = mobile.run_mobile_model(path, image, ids)
    replace = os.replace

    def stop_at_the_graph(src, dst):
        if Path(dst) == path:
            raise KeyboardInterrupt("stopped before the graph's rename")
        replace(src, dst)

    monkeypatch.setattr(mobile.os, "replace", stop_at_the_graph)
    with pytest.raises(KeyboardInterrupt):
        mobile.build_mobile_model(plain, path, max_new_tokens=NEW_TOKENS + 1)
    assert first.is_file() and len(mobile.weights_files(path)) == 2  # the new weights wait beside the old
    assert mobile.run_mobile_model(path, image, ids) == want  # the previous graph with its own weights
    monkeypatch.setattr(mobile.os, "replace", replace)
    mobile.build_mobile_model(plain, path, max_new_tokens=NEW_TOKENS + 1)
    [second] = mobile.weights_files(path)
    assert second != first and sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.onnx", second.name])
    assert mobile.model_info(mobile.open_mobile_session(path))["max_new_tokens"] == NEW_TOKENS + 1


def golden_case(vlm: SmolVLM) -> dict:
    """The golden vector: a small image, the prompt, its ids and the expected greedy ids (the runtime's)."""
    image = make_image(24, 16, seed=7)
    ids, expected = runtime_ids(vlm, image, max_new_tokens=12)
    return {
        "about": "smolvlm_mobile.onnx golden vector for the tiny SmolVLM-256M-shaped test checkpoint "
                 "(smolvlm_edge.export.tiny, seed 0, exported with default options; fp32). Regenerate with "
                 "`.venv/bin/python tests/test_mobile.py --write-golden`.",
        "image": {"width": image.width, "height": image.height, "format": "RGB uint8, row-major [height, width, 3]",
                  "rgb_base64": base64.b64encode(np.asarray(image).tobytes()).decode("ascii")},
        "prompt": PROMPT,
        "input_ids": ids[0].tolist(),
        "max_new_tokens": 12,
        "expected_ids": expected,
    }


def test_golden_vector(bundle, fp32_model):
    golden = json.loads(GOLDEN.read_text())
    shape = (golden["image"]["height"], golden["image"]["width"], 3)
    image = np.frombuffer(base64.b64decode(golden["image"]["rgb_base64"]), dtype=np.uint8).reshape(shape)
    vlm = SmolVLM(bundle)
    from PIL import Image

    ids = vlm.prepare([golden["prompt"]], [[Image.fromarray(image)]], do_image_splitting=False).input_ids
    assert ids[0].tolist() == golden["input_ids"], "the runtime builds other prompt ids than the golden file holds"
    got = mobile.run_mobile_model(fp32_model, image, np.array([golden["input_ids"]]), golden["max_new_tokens"])
    assert got == golden["expected_ids"], "regenerate tests/data/mobile_golden.json only if the change is intended"


def _utf8_prefix(vlm: SmolVLM, ids: list[int]) -> int:
    """How many leading ids decode to valid UTF-8 bytes (special tokens count as no bytes)."""
    to_byte = {c: b for b, c in mobile_tokenizer._bytes_to_unicode().items()}
    special = {i for i, t in vlm.text.tokenizer.get_added_tokens_decoder().items() if t.special}
    data, valid = b"", 0
    for n, i in enumerate(ids, 1):
        if i not in special:
            data += bytes(to_byte[c] for c in vlm.text.tokenizer.id_to_token(i))
        try:
            data.decode("utf-8")
            valid = n
        except UnicodeDecodeError:
            pass
    return valid


# ai.onnx.contrib ops that onnxruntime-extensions 0.13.0 (the newest onnxruntime-extensions-android on Maven Central)
# has, the ones the gpt2 tokenizer may use: checked in the 0.13.0 wheel's library (built from the same source), where
# a model with them loaded and ran in onnxruntime 1.20.1; HfJsonTokenizer is not among them.
EXTENSIONS_0_13_OPS = {"GPT2Tokenizer", "BpeDecoder", "StringECMARegexSplitWithOffsets"}


def contrib_ops(path) -> set[str]:
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph
    return {n.op_type for n in graph.node if n.domain == "ai.onnx.contrib"}


@pytest.fixture(scope="module")
def extensions():
    try:
        import onnxruntime_extensions
    except ImportError:
        pytest.skip("onnxruntime-extensions is not installed (pip install onnxruntime-extensions==0.15.2)")
    return onnxruntime_extensions


@pytest.fixture(scope="module")
def tokenizer_model(bundle, extensions, tmp_path_factory):
    return mobile.build_mobile_model(bundle, tmp_path_factory.mktemp("tok") / "tok.onnx", max_new_tokens=NEW_TOKENS,
                                     with_tokenizer=True)


def test_with_tokenizer(bundle, tokenizer_model):
    session = mobile.open_mobile_session(tokenizer_model)
    assert [i.name for i in session.get_inputs()] == ["image", "question"]
    assert [i.name for i in session.get_overridable_initializers()] == ["max_new_tokens"]
    assert [o.name for o in session.get_outputs()] == ["generated_ids", "answer"]
    assert mobile.model_info(session)["tokenizer"]["op"] == "GPT2Tokenizer"
    vlm = SmolVLM(bundle)
    image = make_image(120, 90, seed=3)
    for question in ("What is in this image?", "Describe the picture.  Twice!", "", "How many 3 cats in 12 rows?"):
        _, want = runtime_ids(vlm, image, prompt=question)
        assert mobile.run_mobile_model(session, np.asarray(image), question) == want
    # The random model emits arbitrary bytes: compare the text over the ids that form valid UTF-8.
    question = "What is in this image?"
    _, want = runtime_ids(vlm, image, prompt=question)
    keep = _utf8_prefix(vlm, want)
    assert keep >= 1
    text, ids = mobile.mobile_answer(session, np.asarray(image), question, max_new_tokens=keep)
    assert ids == want[:keep] and text == vlm.text.decode(want[:keep])


def test_with_tokenizer_uses_only_ops_of_extensions_0_13(tokenizer_model):
    """The Android app's onnxruntime-extensions is 0.13.0: the default tokenizer must not need a newer op."""
    ops = contrib_ops(tokenizer_model)
    assert "GPT2Tokenizer" in ops and "BpeDecoder" in ops
    assert ops <= EXTENSIONS_0_13_OPS, f"ops that onnxruntime-extensions 0.13.0 lacks: {ops - EXTENSIONS_0_13_OPS}"


def _with_digit_split(bundle: Path, copy: Path) -> Path:
    """A bundle copy whose tokenizer.json splits digits off first, as SmolLM2's does (Digits, then ByteLevel), with
    merges "ĠĠ" and "12" (ids of two last merges reused) so that GPT-2's regex alone would give other ids."""
    from smolvlm_edge.runtime.bundle import sha256_file

    shutil.copytree(bundle, copy)
    tok_file = copy / "tokenizer.json"
    spec = json.loads(tok_file.read_text())
    spec["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                                   spec["pre_tokenizer"]]}
    model, freed = spec["model"], []
    for _ in range(2):  # drop the last merge whose token no other merge builds on, and reuse its id
        parts = {part for merge in model["merges"] for part in merge}
        last = max(i for i, (a, b) in enumerate(model["merges"]) if a + b not in parts)
        freed.append(model["vocab"].pop("".join(model["merges"].pop(last))))
    model["vocab"].update({"ĠĠ": freed[0], "12": freed[1]})
    model["merges"] += [["Ġ", "Ġ"], ["1", "2"]]
    tok_file.write_text(json.dumps(spec, ensure_ascii=False))
    manifest = json.loads((copy / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"sha256": sha256_file(tok_file), "size": tok_file.stat().st_size}
    (copy / "manifest.json").write_text(json.dumps(manifest))
    return copy


def test_with_tokenizer_splits_digits_as_the_runtime(bundle, extensions, tmp_path):
    """GPT-2's regex keeps " 12" whole; SmolLM2's tokenizer cuts digits off first: the graph splits on [0-9]."""
    digits = _with_digit_split(bundle, tmp_path / "bundle")
    path = mobile.build_mobile_model(digits, tmp_path / "digits.onnx", max_new_tokens=4, with_tokenizer=True)
    assert "StringECMARegexSplitWithOffsets" in contrib_ops(path) and contrib_ops(path) <= EXTENSIONS_0_13_OPS
    session = mobile.open_mobile_session(path)
    info = mobile.model_info(session)["tokenizer"]
    assert info["digits_split"] and "<image>" in info["refused_texts"] and "\n" in info["refused_chars"]
    vlm = SmolVLM(digits)
    image = make_image(64, 48, seed=4)
    for question in ("a  1   23 x1y2", "Is it 99.5%?  42", "12"):
        # without the split these differ: GPT2Tokenizer alone groups the spaces before a digit otherwise
        ids, want = runtime_ids(vlm, image, max_new_tokens=4, prompt=question)
        assert mobile.run_mobile_model(session, np.asarray(image), question) == want
    # What the graph cannot reproduce is refused before it runs, naming the reason.
    for question, reason in (("x\ny", "newline"), ("x²", "numeral"), ("stop<end_of_utterance>", "special token"),
                             ("<image> what", "'<image>'")):
        with pytest.raises(PromptError, match=reason):
            mobile.run_mobile_model(session, np.asarray(image), question)


def test_tokenizer_check_refuses_a_graph_that_differs(bundle, extensions, tmp_path):
    """The build-time check compares the graph's ids with the runtime's: without the digit split it must fail."""
    from smolvlm_edge.runtime.errors import ExportError
    from smolvlm_edge.runtime.prompt import TextProcessor

    text = TextProcessor.from_dir(_with_digit_split(bundle, tmp_path / "bundle"))
    spec = json.loads(text.tokenizer.to_str())
    encoder = mobile_tokenizer._gpt2_nodes(spec["model"], "question", "tokenizer/question_ids", split_digits=False)
    decoder = mobile_tokenizer._detokenizer_nodes(text, "generated_ids", "answer")
    with pytest.raises(ExportError, match="GPT2Tokenizer gives .* the runtime .*tokenizer_op='hf_json'"):
        mobile_tokenizer._check_tokenizer(encoder + decoder, text, {"op": "GPT2Tokenizer"})
    spec["pre_tokenizer"] = {"type": "Metaspace", "replacement": "▁"}
    with pytest.raises(ExportError, match="Metaspace.*tokenizer_op='hf_json'"):
        mobile_tokenizer._gpt2_split_digits(spec)


def test_with_tokenizer_hf_json_option(bundle, extensions, tmp_path):
    path = mobile.build_mobile_model(bundle, tmp_path / "hf.onnx", max_new_tokens=4, with_tokenizer=True,
                                     tokenizer_op="hf_json")
    assert "HfJsonTokenizer" in contrib_ops(path)  # the newer extensions only (not 0.13.0)
    image = make_image(64, 48, seed=4)
    _, want = runtime_ids(SmolVLM(bundle), image, max_new_tokens=4)
    assert mobile.run_mobile_model(path, np.asarray(image), PROMPT) == want
    from smolvlm_edge.runtime.errors import ExportError
    with pytest.raises(ExportError, match="unknown tokenizer_op 'sentencepiece'"):
        mobile.build_mobile_model(bundle, tmp_path / "x.onnx", with_tokenizer=True, tokenizer_op="sentencepiece")


def test_bad_inputs_fail_clearly(bundle, fp32_model):
    info = mobile.model_info(fp32_model)
    vlm = SmolVLM(bundle)
    image = make_image(50, 40)
    ids = vlm.prepare(["Hi"], [[image]], do_image_splitting=False).input_ids
    pixels = np.asarray(image)
    mobile.check_inputs(pixels, ids, info)
    with pytest.raises(ImageError, match="uint8"):
        mobile.check_inputs(np.zeros((40, 50, 4), np.uint8), ids, info)
    with pytest.raises(ImageError, match="zero size"):
        mobile.check_inputs(np.zeros((0, 5, 3), np.uint8), ids, info)
    with pytest.raises(PromptError, match="64"):
        split = vlm.prepare(["Hi"], [[make_image(1000, 900)]], do_image_splitting=True).input_ids
        mobile.check_inputs(pixels, split, info)
    with pytest.raises(PromptError, match="vocabulary|lie in"):
        mobile.check_inputs(pixels, ids + 1000, info)
    with pytest.raises(PromptError, match="positions"):
        mobile.check_inputs(pixels, ids, info, max_new_tokens=info["max_position_embeddings"])
    with pytest.raises(PromptError, match="at least 1"):
        mobile.check_inputs(pixels, ids, info, max_new_tokens=0)
    # Unchecked, the graph itself fails, and the failing node's name says why.
    with pytest.raises(Exception, match="input_ids_need_exactly_64_image_tokens"):
        fp32_model.run(["generated_ids"], {"image": pixels, "input_ids": ids[:, :5]})
    with pytest.raises(Exception, match="invalid dimensions"):
        fp32_model.run(["generated_ids"], {"image": np.zeros((40, 50, 4), np.uint8), "input_ids": ids})


def test_identical_weights_are_stored_once():
    """Same bytes: one initializer; same bytes under other dims (a shared q4 table): one initializer + Reshape."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    table = (np.arange(8192) % 251).astype(np.uint8).reshape(64, 128)  # above the 4 KiB worth a Reshape
    first = helper.make_graph([], "a", [], [], [numpy_helper.from_array(table, "w")])
    second = helper.make_graph([], "b", [], [], [numpy_helper.from_array(table, "same"),
                                                 numpy_helper.from_array(table.reshape(64, 4, 32), "codes")])
    weights = mobile_merge._Weights()
    assert weights.add_graph(first, "a/") == {"w": "a/w"}
    names = weights.add_graph(second, "b/")
    assert names["same"] == "a/w" and names["codes"] == "b/codes"
    assert [t.name for t in weights.tensors] == ["a/w", "b/codes/shape"] and weights.saved_bytes >= 2 * 8192
    out = helper.make_tensor_value_info("b/codes", TensorProto.UINT8, None)
    model = helper.make_model(helper.make_graph(weights.nodes, "g", [], [out], weights.tensors),
                              opset_imports=[helper.make_opsetid("", 18)], ir_version=9)
    got = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {})[0]
    assert np.array_equal(got, table.reshape(64, 4, 32))


def write_golden() -> None:
    """Build the tiny checkpoint and bundle as the fixtures do, then write GOLDEN from the runtime."""
    import tempfile

    from smolvlm_edge.export.api import export_checkpoint
    from smolvlm_edge.export.tiny import make_tiny_checkpoint

    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = make_tiny_checkpoint(Path(tmp) / "ckpt", shape="256m", model_type="idefics3")
        folder = export_checkpoint(str(checkpoint), Path(tmp) / "bundle", progress=lambda _line: None)
        case = golden_case(SmolVLM(folder))
        model = mobile.build_mobile_model(folder, Path(tmp) / "m.onnx", max_new_tokens=case["max_new_tokens"])
        image = np.frombuffer(base64.b64decode(case["image"]["rgb_base64"]), np.uint8).reshape(
            case["image"]["height"], case["image"]["width"], 3)
        got = mobile.run_mobile_model(model, image, np.array([case["input_ids"]]))
        if got != case["expected_ids"]:
            raise SystemExit(f"the mobile model gives {got}, the runtime {case['expected_ids']}: not writing")
    GOLDEN.parent.mkdir(exist_ok=True)
    body = ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}" for k, v in case.items())  # one line per key
    GOLDEN.write_text("{\n" + body + "\n}\n")
    print(f"wrote {GOLDEN}")


if __name__ == "__main__":
    if sys.argv[1:] != ["--write-golden"]:
        raise SystemExit(__doc__)
    write_golden()
