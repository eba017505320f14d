"""Bad input gives one clear line naming the problem and the value, a non-zero exit, and no traceback;
and the runtime works with torch and transformers made unimportable."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from conftest import make_image
from smolvlm_edge.runtime.cli import main


def run_cli(capsys, *argv):
    capsys.readouterr()  # drop what building the fixtures printed
    code = main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_line_error(code, err, *needles):
    assert code == 2
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


@pytest.fixture
def bundle_copy(tiny_bundles, tmp_path):
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("256m"), dst)
    return dst


@pytest.fixture
def image_file(tmp_path):
    path = tmp_path / "photo.png"
    make_image(320, 240, seed=3).save(path)
    return path


def test_run_prints_json(capsys, tiny_bundles, image_file):
    code, out, _ = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--image", str(image_file),
                           "--prompt", "What is this?", "--max-new-tokens", "5", "--greedy", "--json")
    assert code == 0
    record = json.loads(out)
    assert set(record) == {"text", "prompt_ids", "token_ids", "timings"}
    assert 1 <= len(record["token_ids"]) <= 5
    for key in ("vision_ms", "ttft_ms", "decode_tokens_per_s"):
        assert key in record["timings"]


def test_missing_image(capsys, tiny_bundles, tmp_path):
    missing = tmp_path / "nope.jpg"
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--image", str(missing), "--prompt", "hi")
    assert_one_line_error(code, err, missing)


def test_corrupt_image(capsys, tiny_bundles, tmp_path):
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nthis is not an image")
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--image", str(bad), "--prompt", "hi")
    assert_one_line_error(code, err, bad)


def test_image_markers_must_match_images(capsys, tiny_bundles, image_file):
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--image", str(image_file),
                           "--prompt", "<image> and <image>: compare")
    assert_one_line_error(code, err, "2", "1")


def test_prompt_beyond_context(capsys, tiny_bundles):
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--prompt", "hello",
                           "--max-new-tokens", "5000")
    assert_one_line_error(code, err, "5000", "2048")


def test_missing_graph(capsys, bundle_copy):
    (bundle_copy / "onnx" / "decoder_model_merged.onnx").unlink()
    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "decoder_model_merged.onnx")


def test_file_that_differs_from_manifest(capsys, bundle_copy):
    config = bundle_copy / "config.json"
    text = config.read_text()
    config.write_text(text.replace('"scale_factor": 4', '"scale_factor": 5', 1))  # same size, other bytes
    assert config.stat().st_size == len(text.encode())
    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "config.json", "sha256")


def test_truncated_graph(capsys, bundle_copy):
    graph = bundle_copy / "onnx" / "embed_tokens.onnx"
    graph.write_bytes(graph.read_bytes()[:1000])
    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "embed_tokens.onnx", "truncated")


def flip_byte(path, at: float) -> None:
    """Change one byte at fraction `at` of the file: same size, other sha256."""
    data = bytearray(path.read_bytes())
    data[int(len(data) * at)] ^= 0xFF
    path.write_bytes(bytes(data))


def test_only_the_files_a_run_reads_are_checked(capsys, bundle_copy):
    """Another build's files may differ from the manifest or be gone (a device may ship one build); a changed
    byte in a file the run reads stops it with the sha256 error, whether or not onnxruntime could still load it.
    `verify` checks every build."""
    import onnxruntime as ort

    from smolvlm_edge.runtime.bundle import replace_manifest, sha256_file

    onnx_dir = bundle_copy / "onnx"
    manifest = json.loads((bundle_copy / "manifest.json").read_text())
    for graph in ("vision_encoder", "decoder_model_merged"):  # a second build of each, listed like any other
        shutil.copy(onnx_dir / f"{graph}.onnx", onnx_dir / f"{graph}_int8.onnx")
        manifest["graphs"][graph]["int8"] = {**manifest["graphs"][graph]["fp32"], "file": f"onnx/{graph}_int8.onnx"}
        manifest["files"][f"onnx/{graph}_int8.onnx"] = {"sha256": sha256_file(onnx_dir / f"{graph}_int8.onnx"),
                                                       "size": (onnx_dir / f"{graph}_int8.onnx").stat().st_size}
    replace_manifest(bundle_copy, manifest)
    code, out, err = run_cli(capsys, "verify", "--bundle", str(bundle_copy))
    assert code == 0 and f"{len(manifest['files'])} files" in out and "builds fp32, int8) match manifest.json" in out, err
    flip_byte(onnx_dir / "vision_encoder_int8.onnx", 0.5)
    (onnx_dir / "decoder_model_merged_int8.onnx").unlink()
    code, out, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi", "--max-new-tokens", "2")
    assert code == 0 and out.strip(), err
    code, _, err = run_cli(capsys, "verify", "--bundle", str(bundle_copy))
    assert_one_line_error(code, err, "decoder_model_merged_int8.onnx", "missing")

    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi", "--precision", "vision=int8")
    assert_one_line_error(code, err, "vision_encoder_int8.onnx", "sha256")
    graph = onnx_dir / "decoder_model_merged.onnx"
    original = graph.read_bytes()
    flip_byte(graph, 0.5)  # inside the weights: onnxruntime still loads the graph
    ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "decoder_model_merged.onnx", "sha256")
    graph.write_bytes(bytes(16) + original[16:])  # field number 0: onnxruntime cannot parse it
    with pytest.raises(Exception, match="(?i)protobuf|pars"):
        ort.InferenceSession(str(graph), providers=["CPUExecutionProvider"])
    code, _, err = run_cli(capsys, "run", "--model-dir", str(bundle_copy), "--prompt", "hi")
    assert_one_line_error(code, err, "decoder_model_merged.onnx", "sha256")


def test_the_files_a_load_reads():
    """Per graph: its build's graph and external data; with ort, its .ort file where it has one; for an embedding
    read as table rows, the rows' file only; always the top-level files; never another build's."""
    from smolvlm_edge.runtime.bundle import Bundle

    rows = {"file": "onnx/decoder_model_merged_q4.onnx_data", "vocab_size": 8}
    manifest = {"files": {name: {} for name in ("config.json", "tokenizer.json", "onnx/x")}, "graphs": {
        "vision_encoder": {"fp32": {"file": "onnx/vision_encoder.onnx", "external_data": None},
                           "q4": {"file": "onnx/vision_encoder_q4.onnx", "external_data": "onnx/vision_encoder_q4.onnx_data",
                                  "ort_file": "onnx/vision_encoder_q4.ort"}},
        "embed_tokens": {"q4": {"file": "onnx/embed_tokens_q4.onnx", "external_data": rows["file"],
                                "ort_file": "onnx/embed_tokens_q4.ort", "info": {"table_rows": rows}}},
        "decoder_model_merged": {"q4": {"file": "onnx/decoder_model_merged_q4.onnx", "external_data": [rows["file"]]}}}}
    bundle = Bundle(None, manifest)
    picked = {"vision_encoder": "q4", "embed_tokens": "q4", "decoder_model_merged": "q4"}
    assert bundle.files_read_with(picked) == [
        "config.json", "tokenizer.json", "onnx/vision_encoder_q4.onnx", "onnx/vision_encoder_q4.onnx_data",
        rows["file"], "onnx/decoder_model_merged_q4.onnx"]
    assert bundle.files_read_with(picked, ort=True) == [  # the decoder has no .ort: its .onnx is read
        "config.json", "tokenizer.json", "onnx/vision_encoder_q4.ort", rows["file"], "onnx/decoder_model_merged_q4.onnx"]
    assert bundle.files_read_with({**picked, "vision_encoder": "fp32"})[2] == "onnx/vision_encoder.onnx"


def test_not_a_bundle(capsys, tmp_path):
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tmp_path), "--prompt", "hi")
    assert_one_line_error(code, err, str(tmp_path), "manifest.json")


def test_unavailable_provider(capsys, tiny_bundles):
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--prompt", "hi", "--provider", "tensorrt")
    assert_one_line_error(code, err, "tensorrt", "available:", "cpu")


def test_unknown_provider_is_refused_by_the_parser(capsys, tiny_bundles):
    with pytest.raises(SystemExit) as exc:
        main(["run", "--model-dir", str(tiny_bundles("256m")), "--prompt", "hi", "--provider", "warpdrive"])
    assert exc.value.code == 2
    assert "warpdrive" in capsys.readouterr().err


def test_unknown_provider_by_api():
    from smolvlm_edge.runtime.errors import ProviderError
    from smolvlm_edge.runtime.providers import resolve_provider

    with pytest.raises(ProviderError, match="warpdrive.*known: cpu"):
        resolve_provider("warpdrive")


def test_bad_generation_setting(capsys, tiny_bundles):
    code, _, err = run_cli(capsys, "run", "--model-dir", str(tiny_bundles("256m")), "--prompt", "hi", "--top-p", "1.5")
    assert_one_line_error(code, err, "top_p", "1.5")


BLOCK_HEAVY = textwrap.dedent("""
    import importlib.abc, sys
    class Block(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {"torch", "transformers", "optimum"}:
                raise ImportError(f"blocked for this test: {name}")
    sys.meta_path.insert(0, Block())
    from smolvlm_edge.runtime.cli import main
    code = main(sys.argv[1:])
    heavy = sorted(m for m in sys.modules if m.split(".")[0] in {"torch", "transformers", "optimum"})
    assert not heavy, heavy
    sys.exit(code)
""")


def test_runtime_runs_without_torch_or_transformers(tiny_bundles, image_file):
    """A whole generation with torch and transformers unimportable: the runtime never needs them."""
    proc = subprocess.run(
        [sys.executable, "-c", BLOCK_HEAVY, "run", "--model-dir", str(tiny_bundles("256m")),
         "--image", str(image_file), "--prompt", "What is this?", "--max-new-tokens", "4", "--json"],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["token_ids"]


def test_embedding_rows_from_a_short_file_are_refused(tmp_path):
    """runtime/embed_table.py checks the data file holds every row the manifest says it does; a table
    lookup with an id outside the vocabulary names the range."""
    import numpy as np

    from smolvlm_edge.runtime.embed_table import TableRows
    from smolvlm_edge.runtime.errors import BundleError

    vocab, hidden, block = 4, 64, 32
    codes = np.arange(vocab * hidden, dtype=np.uint8).reshape(vocab, hidden)
    scales = np.full((vocab, hidden // block), 0.5, dtype=np.float32)
    (tmp_path / "onnx").mkdir()
    data = tmp_path / "onnx" / "table.onnx_data"
    data.write_bytes(codes.tobytes() + scales.tobytes())
    rows = {"file": "onnx/table.onnx_data", "vocab_size": vocab, "hidden_size": hidden, "block_size": block,
            "zero_point": 128, "codes_offset": 0, "scales_offset": codes.nbytes, "scales_dtype": "float32"}
    table = TableRows(tmp_path, rows)
    np.testing.assert_array_equal(table(np.array([[3, 1]])), (codes[[[3, 1]]].astype(np.float32) - 128) * 0.5)
    with pytest.raises(ValueError, match=r"token id out of range \[0, 4\): 1\.\.4"):
        table(np.array([[1, 4]]))
    table.close()
    data.write_bytes(data.read_bytes()[:-8])  # truncated
    with pytest.raises(BundleError, match="table.onnx_data holds 280 bytes; its embedding rows need 288"):
        TableRows(tmp_path, rows)
