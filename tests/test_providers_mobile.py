"""Mobile execution providers (XNNPACK, NNAPI, CoreML): options handed to onnxruntime, a clear error where this
onnxruntime lacks them, `fallback="cpu"`; and `--provider qnn`: qdq graphs on the QNN HTP simulator, the rest on the CPU.

The PyPI onnxruntime has none of the mobile EPs, so what reaches onnxruntime is checked by recording the
arguments of `onnxruntime.InferenceSession` (the real session is then made with them: onnxruntime drops the
provider it lacks, with its own warning) after `onnxruntime.get_available_providers` is made to claim the EP.
"""
from __future__ import annotations

import json
import sys

import numpy as np
import pytest

from conftest import make_image
from smolvlm_edge.runtime import SmolVLM
from smolvlm_edge.runtime.cli import main
from smolvlm_edge.runtime.errors import ProviderError
from smolvlm_edge.runtime.providers import (QNN_EP, ProviderFallbackWarning, choose_provider, make_session,
                                            provider_options)

ORT_DROPS_MISSING_EP = "ignore:Specified provider .* is not in available provider names"


@pytest.fixture(scope="module")
def bundle(tiny_bundles):
    return tiny_bundles("256m")


@pytest.fixture
def claim(monkeypatch):
    """Make onnxruntime claim providers it lacks, and record what InferenceSession is handed."""
    import onnxruntime as ort

    real_available, real_session = ort.get_available_providers, ort.InferenceSession
    calls = []

    def claim_providers(*names):
        monkeypatch.setattr(ort, "get_available_providers", lambda: list(names) + real_available())

    def recording_session(path, sess_options=None, providers=None, provider_options=None, **kwargs):
        calls.append({"path": str(path), "sess_options": sess_options, "providers": providers,
                      "provider_options": provider_options})
        return real_session(path, sess_options=sess_options, providers=providers,
                            provider_options=provider_options, **kwargs)

    monkeypatch.setattr(ort, "InferenceSession", recording_session)
    claim_providers.calls = calls
    return claim_providers


@pytest.mark.parametrize("name, full", [("xnnpack", "XnnpackExecutionProvider"), ("nnapi", "NnapiExecutionProvider"),
                                        ("coreml", "CoreMLExecutionProvider")])
def test_missing_mobile_provider_is_a_clear_error(bundle, name, full):
    with pytest.raises(ProviderError) as exc:
        SmolVLM(bundle, provider=name)
    message = str(exc.value)
    assert repr(name) in message and full in message and "available: " in message and "cpu" in message


def test_missing_provider_with_fallback_warns_and_runs_on_cpu(bundle):
    image = make_image(200, 150, seed=4)
    want = SmolVLM(bundle).generate("What is this?", [image], max_new_tokens=4, do_sample=False)
    with pytest.warns(ProviderFallbackWarning, match="'nnapi'.*NnapiExecutionProvider.*falling back to the CPU"):
        vlm = SmolVLM(bundle, provider="nnapi", fallback="cpu", provider_options={"NNAPI_FLAG_USE_FP16": "1"})
    assert vlm.graph_providers == {g: ["CPUExecutionProvider"] for g in vlm.graph_providers}
    got = vlm.generate("What is this?", [image], max_new_tokens=4, do_sample=False)
    assert got.token_ids == want.token_ids


def test_cli_fallback_prints_one_warning_line(capsys, bundle):
    code = main(["run", "--model-dir", str(bundle), "--prompt", "hi", "--max-new-tokens", "2", "--json",
                 "--provider", "coreml", "--fallback", "cpu"])
    captured = capsys.readouterr()
    assert code == 0 and json.loads(captured.out)["token_ids"]
    warning = [line for line in captured.err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: ") and "'coreml'" in warning[0] and "CPU" in warning[0]
    code = main(["run", "--model-dir", str(bundle), "--prompt", "hi", "--provider", "coreml"])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("error: ") and "CoreMLExecutionProvider" in err and len(err.splitlines()) == 1


def test_graphs_that_hand_over_to_the_decoder_stop_spinning_after_a_run(bundle):
    vlm = SmolVLM(bundle, threads=2)
    key = "session.force_spinning_stop"
    assert vlm.vision.get_session_options().get_session_config_entry(key) == "1"
    assert vlm.embed_session.get_session_options().get_session_config_entry(key) == "1"
    with pytest.raises(RuntimeError, match="does not have configuration"):  # spins between its own steps
        vlm.decoder.session.get_session_options().get_session_config_entry(key)


@pytest.mark.filterwarnings(ORT_DROPS_MISSING_EP)
def test_xnnpack_options_and_session_settings_reach_onnxruntime(bundle, claim):
    claim("XnnpackExecutionProvider")
    vlm = SmolVLM(bundle, provider="xnnpack", threads=3)
    assert len(claim.calls) == 3  # vision, embed, decoder
    for call in claim.calls:
        assert call["providers"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
        assert call["provider_options"] == [{"intra_op_num_threads": "3"}, {}]
        so = call["sess_options"]
        # onnxruntime's advice: the session's own pool at one thread, not spinning; XNNPACK's pool does the work
        assert so.intra_op_num_threads == 1
        assert so.get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert vlm.graph_providers["vision_encoder"] == ["XnnpackExecutionProvider", "CPUExecutionProvider"]
    # Without --threads, XNNPACK's pool gets min(4, CPUs); an explicit option wins over --threads.
    assert provider_options("xnnpack")["intra_op_num_threads"] == str(min(4, __import__("os").cpu_count() or 1))
    assert provider_options("xnnpack", {"intra_op_num_threads": 2}, threads=6) == {"intra_op_num_threads": "2"}


@pytest.mark.filterwarnings(ORT_DROPS_MISSING_EP)
def test_coreml_and_nnapi_options_reach_onnxruntime(bundle, claim):
    claim("CoreMLExecutionProvider", "NnapiExecutionProvider")
    graph = bundle / "onnx" / "embed_tokens.onnx"
    make_session(graph, choose_provider("coreml"))
    make_session(graph, choose_provider("coreml", options={"MLComputeUnits": "CPUAndNeuralEngine",
                                                           "RequireStaticInputShapes": "1"}))
    make_session(graph, choose_provider("nnapi", options={"NNAPI_FLAG_USE_FP16": "1", "NNAPI_FLAG_CPU_DISABLED": "1"}))
    coreml_default, coreml_ane, nnapi = claim.calls
    assert coreml_default["providers"] == ["CoreMLExecutionProvider", "CPUExecutionProvider"]
    assert coreml_default["provider_options"] == [{"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"}, {}]
    assert coreml_ane["provider_options"][0] == {"ModelFormat": "MLProgram", "MLComputeUnits": "CPUAndNeuralEngine",
                                                 "RequireStaticInputShapes": "1"}
    assert nnapi["providers"] == ["NnapiExecutionProvider", "CPUExecutionProvider"]
    assert nnapi["provider_options"] == [{"NNAPI_FLAG_USE_FP16": "1", "NNAPI_FLAG_CPU_DISABLED": "1"}, {}]
    for call in (coreml_default, nnapi):  # only XNNPACK changes the session's threads
        with pytest.raises(RuntimeError, match="does not have configuration"):
            call["sess_options"].get_session_config_entry("session.intra_op.allow_spinning")


@pytest.mark.filterwarnings(ORT_DROPS_MISSING_EP)
def test_cli_provider_options_reach_onnxruntime(capsys, bundle, claim):
    claim("CoreMLExecutionProvider")
    assert main(["run", "--model-dir", str(bundle), "--prompt", "hi", "--max-new-tokens", "1", "--json",
                 "--provider", "coreml", "--provider-option", "MLComputeUnits=CPUAndGPU",
                 "--provider-option", "ModelFormat=NeuralNetwork"]) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"]
    assert {str(c["provider_options"][0]) for c in claim.calls} == {
        str({"ModelFormat": "NeuralNetwork", "MLComputeUnits": "CPUAndGPU"})}


def test_bad_options_and_fallbacks_are_refused(capsys, bundle):
    with pytest.raises(ProviderError, match="unknown coreml provider option 'ComputeUnits'.*MLComputeUnits"):
        choose_provider("coreml", options={"ComputeUnits": "ALL"}, fallback="cpu")
    with pytest.raises(ProviderError, match="MLComputeUnits='NPU' must be one of ALL, CPUAndNeuralEngine"):
        provider_options("coreml", {"MLComputeUnits": "NPU"})
    with pytest.raises(ProviderError, match="NNAPI_FLAG_USE_FP16='yes' must be one of 0, 1"):
        provider_options("nnapi", {"NNAPI_FLAG_USE_FP16": "yes"})
    with pytest.raises(ProviderError, match="intra_op_num_threads"):
        provider_options("xnnpack", {"intra_op_num_threads": "0"})
    with pytest.raises(ProviderError, match="fallback must be one of cpu"):
        choose_provider("xnnpack", fallback="gpu")
    code = main(["run", "--model-dir", str(bundle), "--prompt", "hi", "--provider", "xnnpack", "--provider-option", "threads"])
    err = capsys.readouterr().err
    assert code == 2 and "--provider-option 'threads'" in err and len(err.splitlines()) == 1


# ---------------------------------------------------------------- QNN: qdq graphs on the HTP simulator


QDQ_VISION = {"vision_encoder": "qdq", "embed_tokens": "fp32", "decoder_model_merged": "fp32"}


def test_qnn_runs_the_qdq_vision_graph_on_htp_and_the_rest_on_cpu(qnn, qdq_vision_bundle):
    vlm = SmolVLM(qdq_vision_bundle, provider="qnn", precision=QDQ_VISION)
    assert vlm.graph_providers == {"vision_encoder": [QNN_EP], "embed_tokens": ["CPUExecutionProvider"],
                                   "decoder_model_merged": ["CPUExecutionProvider"]}
    assert QNN_EP in vlm.vision.get_providers()
    assert vlm.vision.get_session_options().get_session_config_entry("session.disable_cpu_ep_fallback") == "1"
    assert vlm.embed_session.get_providers() == ["CPUExecutionProvider"]
    on_cpu = SmolVLM(qdq_vision_bundle, precision=QDQ_VISION)
    image = make_image(300, 200, seed=5)
    prepared = on_cpu.prepare(["What is this?"], [[image]], do_image_splitting=False)
    htp = vlm.run_vision(prepared.pixel_values, prepared.pixel_attention_mask)
    cpu = on_cpu.run_vision(prepared.pixel_values, prepared.pixel_attention_mask)
    a, b = htp.ravel().astype(np.float64), cpu.ravel().astype(np.float64)
    assert htp.shape == cpu.shape and float(a @ b / np.linalg.norm(a) / np.linalg.norm(b)) >= 0.9999
    result = vlm.generate("What is this?", [image], max_new_tokens=2, do_sample=False, do_image_splitting=False)
    assert result.prompt_ids == prepared.prompt_ids[0] and len(result.token_ids) >= 1


def test_cli_run_provider_qnn_keeps_stdout_json(qnn, qdq_vision_bundle, tmp_path, capfd):
    image = tmp_path / "photo.png"
    make_image(240, 180, seed=6).save(image)
    code = main(["run", "--model-dir", str(qdq_vision_bundle), "--provider", "qnn", "--precision", "vision=qdq",
                 "--image", str(image), "--prompt", "What is this?", "--no-split", "--max-new-tokens", "2", "--json"])
    out = capfd.readouterr().out  # file descriptor 1: the HTP backend's banner must not land there
    assert code == 0 and json.loads(out)["token_ids"]


def test_qnn_without_a_qdq_build_is_refused(capsys, bundle):
    code = main(["run", "--model-dir", str(bundle), "--provider", "qnn", "--prompt", "hi"])
    err = capsys.readouterr().err
    assert code == 2 and "qdq" in err and "--precision vision=qdq" in err and len(err.splitlines()) == 1


def test_qnn_plugin_missing_error_or_fallback(qdq_vision_bundle, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime_qnn", None)  # import onnxruntime_qnn now raises ImportError
    with pytest.raises(ProviderError, match="onnxruntime-qnn"):
        SmolVLM(qdq_vision_bundle, provider="qnn", precision=QDQ_VISION)
    with pytest.warns(ProviderFallbackWarning, match="onnxruntime-qnn.*running vision_encoder on the CPU"):
        vlm = SmolVLM(qdq_vision_bundle, provider="qnn", precision=QDQ_VISION, fallback="cpu")
    assert vlm.graph_providers["vision_encoder"] == ["CPUExecutionProvider"]
    assert vlm.generate("Hi", [make_image(64, 64)], max_new_tokens=1, do_image_splitting=False).token_ids
