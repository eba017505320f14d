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


@pytest.mark.parametrize("command", ["export", "run", "demo", "providers"])
def test_every_subcommand_has_help(command, capsys):
    with pytest.raises(SystemExit) as exc:
        build_parser().parse_args([command, "--help"])
    assert exc.value.code == 0
    assert "usage: smolvlm-edge" in capsys.readouterr().out
