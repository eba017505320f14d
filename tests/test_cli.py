"""The command line end to end: `demo --model` (export + answer), `export` refusals, `providers`, `--help`."""
from __future__ import annotations

import json

import pytest

from smolvlm_edge.runtime.cli import build_parser, main


def test_demo_with_a_checkpoint_exports_and_answers(capsys, tiny_checkpoints, tmp_path, monkeypatch):
    monkeypatch.setenv("SMOLVLM_EDGE_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bundle"
    code = main(["demo", "--model", str(tiny_checkpoints("2b")), "--output", str(out), "--max-new-tokens", "6", "--greedy"])
    printed = capsys.readouterr().out
    assert code == 0
    assert (out / "manifest.json").is_file()
    manifest = json.loads((out / "manifest.json").read_text())
    assert all(r["passed"] for r in manifest["parity"].values())
    assert "verifying decoder_model_merged" in printed and "timings: vision_ms=" in printed
    assert (tmp_path / "cache" / "sample.png").is_file()

    # A second demo reuses the bundle; `export` to the same folder without --overwrite is refused.
    assert main(["demo", "--model", str(tiny_checkpoints("2b")), "--output", str(out), "--max-new-tokens", "2"]) == 0
    assert "reusing the bundle" in capsys.readouterr().out
    code = main(["export", "--model", str(tiny_checkpoints("2b")), "--output", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and str(out) in err and "--overwrite" in err
    assert len(err.strip().splitlines()) == 1


def test_export_refuses_a_checkpoint_that_is_not_smolvlm(capsys, tmp_path):
    from transformers import LlamaConfig

    LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                vocab_size=64).save_pretrained(tmp_path / "llama")
    code = main(["export", "--model", str(tmp_path / "llama"), "--output", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "'llama'" in err and "idefics3" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_providers_lists_cpu(capsys):
    assert main(["providers"]) == 0
    assert "cpu" in capsys.readouterr().out.split()


@pytest.mark.parametrize("command", ["export", "run", "demo", "providers", "quantize", "parity"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage: smolvlm-edge" in capsys.readouterr().out


def test_quantize_then_run_and_check_parity(capsys, tiny_bundles, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("256m"), bundle)
    assert main(["quantize", "--bundle", str(bundle), "--recipe", "q4", "--option", "algorithm=rtn",
                 "--option", "lm_head_bits=8"]) == 0
    manifest = json.loads((bundle / "manifest.json").read_text())
    assert manifest["graphs"]["decoder_model_merged"]["q4"]["options"]["lm_head_bits"] == 8
    capsys.readouterr()
    assert main(["run", "--model-dir", str(bundle), "--precision", "vision=q4,decoder=q4", "--prompt", "hi",
                 "--max-new-tokens", "3", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]
    assert main(["parity", "--bundle", str(bundle), "--precision", "q4", "--new-tokens", "4",
                 "--output-dir", str(tmp_path / "report")]) == 0
    assert json.loads((tmp_path / "report" / "parity_q4.json").read_text())["passed"]


def test_quantize_refuses_unknown_option(capsys, tiny_bundles, tmp_path):
    import shutil

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("256m"), bundle)
    before = sorted(p.name for p in (bundle / "onnx").iterdir())
    code = main(["quantize", "--bundle", str(bundle), "--recipe", "q4", "--option", "colour=blue"])
    err = capsys.readouterr().err
    assert code == 2 and "colour" in err and "block_size" in err
    assert sorted(p.name for p in (bundle / "onnx").iterdir()) == before


def test_option_values_are_read_as_numbers_bools_or_text():
    from smolvlm_edge.runtime.cli import parse_option

    assert parse_option("decoder.alpha=0.65") == ("decoder.alpha", 0.65)
    assert parse_option("block_size=64") == ("block_size", 64)
    assert parse_option("symmetric=false") == ("symmetric", False)
    assert parse_option("algorithm=hqq") == ("algorithm", "hqq")
    assert parse_option("mode=1.2.3") == ("mode", "1.2.3")
