"""`smolvlm-edge mobile` (one-file model, --format ort) and `smolvlm-edge convert-ort` / `run --ort` on the tiny bundle.

ORT format is onnxruntime's own converter (export/ort_format.py): the .ort files must load and give the same
greedy ids as the .onnx they came from, and the required-operators config must cover the Loop body
(GroupQueryAttention lives only there), com.microsoft ops and, for --with-tokenizer, onnxruntime-extensions' ops.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import sys

import numpy as np
import pytest

from conftest import make_image

pytest.importorskip("onnx")

from smolvlm_edge.export import mobile  # noqa: E402
from smolvlm_edge.export import ort_format  # noqa: E402
from smolvlm_edge.runtime import SmolVLM  # noqa: E402
from smolvlm_edge.runtime.bundle import build_files, open_bundle  # noqa: E402
from smolvlm_edge.runtime.cli import build_parser, main  # noqa: E402
from smolvlm_edge.runtime.errors import ExportError  # noqa: E402

PROMPT = "What is in this image?"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles("256m")


def one_line_error(code, err, *needles):
    lines = [line for line in err.splitlines() if line.strip()]
    assert code == 2 and len(lines) == 1 and lines[0].startswith("error: "), err
    for needle in needles:
        assert str(needle) in lines[0], (needle, lines[0])


def runtime_ids(bundle, image, prompt=PROMPT):
    vlm = SmolVLM(bundle)
    ids = vlm.prepare([prompt], [[image]], do_image_splitting=False).input_ids
    return ids, vlm.generate(prompt, [image], max_new_tokens=NEW_TOKENS, do_sample=False,
                             do_image_splitting=False).token_ids


@pytest.fixture(scope="module")
def tokenizer_ort(bundle, tmp_path_factory):
    """`mobile --with-tokenizer --format ort`, its printed lines, and the folder."""
    if importlib.util.find_spec("onnxruntime_extensions") is None:
        pytest.skip("onnxruntime-extensions is not installed (pip install 'smolvlm-edge[mobile]')")
    out = tmp_path_factory.mktemp("mobile-ort")
    image = out / "photo.png"
    make_image(300, 200, seed=8).save(image)
    import io
    from contextlib import redirect_stderr, redirect_stdout

    stdout, stderr = io.StringIO(), io.StringIO()
    with redirect_stdout(stdout), redirect_stderr(stderr):
        code = main(["mobile", "--bundle", str(bundle), "--output", str(out / "smolvlm_mobile.onnx"),
                     "--max-new-tokens", str(NEW_TOKENS), "--with-tokenizer", "--format", "ort",
                     "--image", str(image), "--prompt", PROMPT, "--provider", "xnnpack", "--fallback", "cpu"])
    return {"code": code, "out": stdout.getvalue(), "err": stderr.getvalue(), "dir": out, "image": image}


def test_mobile_format_ort_with_tokenizer(bundle, tokenizer_ort):
    folder = tokenizer_ort["dir"]
    assert tokenizer_ort["code"] == 0, tokenizer_ort["err"]
    onnx_file, ort_file = folder / "smolvlm_mobile.onnx", folder / "smolvlm_mobile.ort"
    config = folder / "smolvlm_mobile.required_operators.config"
    for file in (onnx_file, ort_file, config):  # each written, and its size printed
        assert file.is_file() and str(file) in tokenizer_ort["out"]
    assert "MiB" in tokenizer_ort["out"] and " B\n" in tokenizer_ort["out"]
    ops = {line.split(";")[0]: line for line in config.read_text().splitlines() if not line.startswith("#")}
    assert "GPT2Tokenizer" in ops["ai.onnx.contrib"] and "BpeDecoder" in ops["ai.onnx.contrib"]
    assert "GroupQueryAttention" in ops["com.microsoft"]  # only inside the Loop body: subgraphs are covered
    assert any("Loop" in line and line.startswith("ai.onnx;") for line in config.read_text().splitlines())
    assert "# - smolvlm_mobile.ort" in config.read_text()
    # The writer is recorded (an .ort loads in its writer's onnxruntime or newer), and the CLI warns that the
    # Android demo's older onnxruntime may refuse it.
    import onnxruntime as ort

    assert f"# written by onnxruntime {ort.__version__} (ORT format version 6)" in config.read_text()
    assert ort_format.ort_format_version(ort_file) == "6"
    assert "smolvlm_mobile.ort was written by onnxruntime" in tokenizer_ort["err"] and "1.20.0" in tokenizer_ort["err"]
    # The .ort gives the .onnx's ids, which are the runtime's; the runner path fell back to the CPU and said so.
    image = make_image(300, 200, seed=8)
    _, want = runtime_ids(bundle, image)
    for path in (onnx_file, ort_file):
        assert mobile.run_mobile_model(mobile.open_mobile_session(path), np.asarray(image), PROMPT) == want
    assert f"generated_ids: {want}" in tokenizer_ort["out"]
    assert "smolvlm_mobile.ort on CPUExecutionProvider" in tokenizer_ort["out"]
    assert tokenizer_ort["err"].startswith("warning: ") and "'xnnpack'" in tokenizer_ort["err"]


def test_ort_conversion_of_a_custom_op_model_needs_extensions(tokenizer_ort, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_extensions", None)
    with pytest.raises(ExportError, match="onnxruntime-extensions ops.*pip install onnxruntime-extensions==0.15.2"):
        ort_format.convert_to_ort(tokenizer_ort["dir"] / "smolvlm_mobile.onnx", tmp_path)
    assert not list(tmp_path.iterdir())


def test_mobile_format_ort_runtime_style_stock_model(capsys, bundle, tmp_path):
    output = tmp_path / "m" / "smolvlm_mobile.onnx"
    assert main(["mobile", "--bundle", str(bundle), "--output", str(output), "--max-new-tokens", str(NEW_TOKENS),
                 "--format", "ort", "--ort-style", "runtime"]) == 0
    printed = capsys.readouterr().out
    ort_file = output.with_name("smolvlm_mobile.with_runtime_opt.ort")
    config = output.with_name("smolvlm_mobile.required_operators.with_runtime_opt.config")
    assert ort_file.is_file() and config.is_file() and str(ort_file) in printed
    assert sorted(p.name for p in output.parent.iterdir()) == sorted([output.name, ort_file.name, config.name])
    image = make_image(64, 97, seed=2)
    ids, want = runtime_ids(bundle, image)
    assert mobile.run_mobile_model(mobile.open_mobile_session(ort_file), np.asarray(image), ids) == want
    # Rebuilding the .onnx alone removes the .ort converted from the file it replaces.
    assert main(["mobile", "--bundle", str(bundle), "--output", str(output), "--max-new-tokens", str(NEW_TOKENS)]) == 0
    assert f"removed {ort_file.name}, {config.name}" in capsys.readouterr().out
    assert [p.name for p in output.parent.iterdir()] == [output.name]


def test_app_version_warning():
    assert ort_format.app_version_warning(ort_format.Path("m.ort"), "1.20.1", app="1.20.0") is None
    assert ort_format.app_version_warning(ort_format.Path("m.ort"), "1.19.2", app="1.20.0") is None
    note = ort_format.app_version_warning(ort_format.Path("m.ort"), "1.32.0", app="1.20.0")
    assert "m.ort was written by onnxruntime 1.32.0" in note and "convert it with onnxruntime 1.20.0" in note


def test_mobile_errors_are_one_line(capsys, bundle, tmp_path, monkeypatch):
    code = main(["mobile", "--bundle", str(tmp_path / "nope"), "--output", str(tmp_path / "m.onnx")])
    one_line_error(code, capsys.readouterr().err, tmp_path / "nope", "not found")
    code = main(["mobile", "--bundle", str(bundle), "--precision", "q9", "--output", str(tmp_path / "m.onnx")])
    one_line_error(code, capsys.readouterr().err, "'q9'", "fp32", "quantize")
    code = main(["mobile", "--bundle", str(bundle), "--output", str(tmp_path / "m.ort")])
    one_line_error(code, capsys.readouterr().err, ".onnx")
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: None if name == "onnxruntime_extensions" else real_find_spec(name, *a))
    code = main(["mobile", "--bundle", str(bundle), "--with-tokenizer", "--output", str(tmp_path / "m.onnx")])
    one_line_error(code, capsys.readouterr().err, "onnxruntime-extensions", "smolvlm-edge[mobile]")
    assert not list(tmp_path.iterdir())


def test_too_large_for_ort_format(bundle, tmp_path, monkeypatch):
    monkeypatch.setattr(ort_format, "ORT_FORMAT_LIMIT", 1000)
    with pytest.raises(ExportError, match="at most 2 GiB"):
        ort_format.convert_to_ort(bundle / "onnx" / "embed_tokens.onnx", tmp_path)


# ---------------------------------------------------------------- convert-ort and run --ort


@pytest.fixture
def bundle_copy(bundle, tmp_path):
    return shutil.copytree(bundle, tmp_path / "bundle")


def test_convert_ort_then_run_gives_the_same_greedy_tokens(capsys, bundle_copy, tmp_path):
    assert main(["convert-ort", "--bundle", str(bundle_copy)]) == 0
    capsys.readouterr()
    opened = open_bundle(bundle_copy)  # sizes and sha256 of the new files check out
    for graph in ("vision_encoder", "embed_tokens", "decoder_model_merged"):
        entry = opened.manifest["graphs"][graph]["fp32"]
        assert entry["ort_file"] == f"onnx/{graph}.ort"
        assert entry["ort_required_operators"] == f"onnx/{graph}.required_operators.config"
        assert entry["ort_info"]["optimization_style"] == "fixed" and entry["ort_info"]["ort_format_version"] == "6"
        assert entry["ort_info"]["source_files"][entry["file"]] == opened.manifest["files"][entry["file"]]["sha256"]
        for rel in (entry["ort_file"], entry["ort_required_operators"]):
            assert (bundle_copy / rel).is_file() and opened.manifest["files"][rel]["size"] == (bundle_copy / rel).stat().st_size
    assert not [p for p in (bundle_copy / "onnx").iterdir() if p.name.startswith(".")]  # no staging left
    image = make_image(300, 200, seed=9)
    want = SmolVLM(bundle_copy).generate(PROMPT, [image], max_new_tokens=NEW_TOKENS, do_sample=False)
    vlm = SmolVLM(bundle_copy, prefer_ort=True)
    assert all(p.suffix == ".ort" for p in vlm.graph_files.values())
    got = vlm.generate(PROMPT, [image], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.token_ids == want.token_ids and got.prompt_ids == want.prompt_ids
    photo = tmp_path / "photo.png"
    image.save(photo)
    assert main(["run", "--model-dir", str(bundle_copy), "--ort", "--image", str(photo), "--prompt", PROMPT,
                 "--max-new-tokens", str(NEW_TOKENS), "--greedy", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["token_ids"] == want.token_ids and "warning" not in captured.err
    # A device may carry the .ort files alone: they hold the weights, and only what a load reads is checked.
    ort_only = shutil.copytree(bundle_copy, tmp_path / "ort_only")
    for entry in opened.manifest["graphs"].values():
        for rel in build_files(entry["fp32"]):
            (ort_only / rel).unlink()
    got = SmolVLM(ort_only, prefer_ort=True).generate(PROMPT, [image], max_new_tokens=NEW_TOKENS, do_sample=False)
    assert got.token_ids == want.token_ids

    # The runtime style replaces the fixed files: the old ones leave the folder and the manifest.
    assert main(["convert-ort", "--bundle", str(bundle_copy), "--ort-style", "runtime"]) == 0
    manifest = open_bundle(bundle_copy).manifest
    assert manifest["graphs"]["embed_tokens"]["fp32"]["ort_file"] == "onnx/embed_tokens.with_runtime_opt.ort"
    assert "onnx/embed_tokens.ort" not in manifest["files"] and not (bundle_copy / "onnx/embed_tokens.ort").exists()


def test_a_rebuilt_graph_leaves_no_stale_ort_in_the_manifest(bundle_copy):
    """convert-ort q4, then quantize q4 --overwrite: the .ort files converted from the replaced graphs leave
    the files table and the folder in quantize's own commit (they were made from .onnx files that are gone)."""
    from smolvlm_edge.quantize.build import quantize_bundle

    quiet = lambda _line: None  # noqa: E731
    quantize_bundle(bundle_copy, "q4", progress=quiet)
    assert main(["convert-ort", "--bundle", str(bundle_copy), "--precision", "q4"]) == 0
    assert main(["convert-ort", "--bundle", str(bundle_copy)]) == 0  # fp32 too: it must survive the rebuild
    q4_ort = {f"onnx/{g}_q4{end}" for g in ("vision_encoder", "embed_tokens", "decoder_model_merged")
              for end in (".ort", ".required_operators.config")}
    manifest = open_bundle(bundle_copy).manifest
    assert q4_ort <= set(manifest["files"]) and not ort_format.stale_ort_records(manifest, bundle_copy)

    quantize_bundle(bundle_copy, "q4", overwrite=True, progress=quiet)
    manifest = open_bundle(bundle_copy).manifest  # sizes and sha256 of what is listed check out
    assert not any(manifest["graphs"][g]["q4"].get("ort_file") for g in manifest["graphs"])
    assert not q4_ort & set(manifest["files"]) and not any((bundle_copy / rel).exists() for rel in q4_ort)
    assert not ort_format.stale_ort_records(manifest, bundle_copy)
    assert manifest["graphs"]["embed_tokens"]["fp32"]["ort_file"] == "onnx/embed_tokens.ort"

    # An entry whose .onnx changed after its conversion (recorded source sha256 differs) loses its .ort too.
    manifest["graphs"]["embed_tokens"]["fp32"]["ort_info"]["source_files"]["onnx/embed_tokens.onnx"] = "0" * 64
    dropped = ort_format.drop_stale_ort(manifest, bundle_copy)
    assert dropped == ["onnx/embed_tokens.ort", "onnx/embed_tokens.required_operators.config"]
    assert "ort_file" not in manifest["graphs"]["embed_tokens"]["fp32"]
    assert manifest["graphs"]["vision_encoder"]["fp32"]["ort_file"] == "onnx/vision_encoder.ort"


def test_run_ort_without_ort_files_warns_and_loads_onnx(capsys, bundle):
    assert main(["run", "--model-dir", str(bundle), "--ort", "--prompt", "hi", "--max-new-tokens", "1", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["token_ids"]
    assert captured.err.startswith("warning: ") and "convert-ort" in captured.err


def test_convert_ort_failure_leaves_the_bundle_as_it_was(capsys, bundle_copy, monkeypatch):
    before = {p.name: p.read_bytes() for p in [bundle_copy / "manifest.json", *(bundle_copy / "onnx").iterdir()]}
    real = ort_format.convert_to_ort

    def fail_on_decoder(src, *args, **kwargs):
        if "decoder" in src.name:
            raise ExportError(f"simulated failure on {src.name}")
        return real(src, *args, **kwargs)

    monkeypatch.setattr(ort_format, "convert_to_ort", fail_on_decoder)
    code = main(["convert-ort", "--bundle", str(bundle_copy)])
    one_line_error(code, capsys.readouterr().err, "simulated failure on decoder_model_merged.onnx")
    after = {p.name: p.read_bytes() for p in [bundle_copy / "manifest.json", *(bundle_copy / "onnx").iterdir()]}
    assert after == before
    code = main(["convert-ort", "--bundle", str(bundle_copy), "--precision", "q4"])
    one_line_error(code, capsys.readouterr().err, "'q4'", "fp32")


def test_tokenizer_op_flag(capsys):
    assert build_parser().parse_args(["mobile", "--bundle", "b"]).tokenizer_op == "gpt2"
    assert build_parser().parse_args(["mobile", "--bundle", "b", "--tokenizer-op", "hf_json"]).tokenizer_op == "hf_json"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["mobile", "--bundle", "b", "--tokenizer-op", "spm"])
    assert "invalid choice: 'spm'" in capsys.readouterr().err


@pytest.mark.parametrize("command", ["mobile", "convert-ort"])
def test_new_subcommands_have_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0 and "usage: smolvlm-edge" in capsys.readouterr().out
