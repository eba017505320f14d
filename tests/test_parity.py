"""The parity report: an honest fp32 build passes, a deliberately damaged graph fails it (exit 1)."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from smolvlm_edge.quantize.recipes import PARITY_THRESHOLDS
from smolvlm_edge.quantize.thresholds import check_thresholds, thresholds_for
from smolvlm_edge.runtime.bundle import sha256_file
from smolvlm_edge.runtime.cli import main


def test_fp32_build_passes_against_pytorch(tiny_bundles, tmp_path, capsys):
    code = main(["parity", "--bundle", str(tiny_bundles("256m")), "--precision", "fp32",
                 "--new-tokens", "8", "--output-dir", str(tmp_path)])
    out = capsys.readouterr().out
    assert code == 0, out
    report = json.loads((tmp_path / "parity_fp32.json").read_text())
    assert report["passed"] and not report["failures"]
    assert report["providers"] == ["CPUExecutionProvider"]
    torch_result = report["against"]["pytorch"]
    assert set(torch_result["graphs"]) == {"vision_encoder", "embed_tokens", "decoder_model_merged"}
    assert torch_result["teacher_forced"]["top1_agreement"] == 1.0
    assert torch_result["teacher_forced"]["positions"] >= 256
    assert torch_result["greedy"][0]["identical"]
    assert "PASSED" in (tmp_path / "parity_fp32.md").read_text()


def test_a_provider_this_onnxruntime_lacks_is_refused_before_any_report(tiny_bundles, tmp_path, capsys):
    """`parity --provider cuda` checks a build on the GPU; without CUDA in onnxruntime it fails clearly."""
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has CUDA")
    code = main(["parity", "--bundle", str(tiny_bundles("256m")), "--precision", "fp32", "--provider", "cuda",
                 "--output-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code != 0 and "CUDAExecutionProvider" in err, err
    assert not list(tmp_path.iterdir())


def damage_decoder(bundle, name: str = "damaged") -> None:
    """Add a build whose lm_head weights are scrambled, registered in the manifest like a real build."""
    import onnx
    from onnx import numpy_helper

    src = bundle / "onnx" / "decoder_model_merged.onnx"
    model = onnx.load(str(src))
    vocab = json.loads((bundle / "config.json").read_text())["text_config"]["vocab_size"]
    target = next(t for t in model.graph.initializer if vocab in t.dims and len(t.dims) == 2)
    rng = np.random.default_rng(0)
    weights = numpy_helper.to_array(target)
    target.CopyFrom(numpy_helper.from_array(rng.permutation(weights.ravel()).reshape(weights.shape), target.name))
    rel = f"onnx/decoder_model_merged_{name}.onnx"
    onnx.save(model, str(bundle / rel))
    manifest = json.loads((bundle / "manifest.json").read_text())
    entry = dict(manifest["graphs"]["decoder_model_merged"]["fp32"], file=rel)
    manifest["graphs"]["decoder_model_merged"][name] = entry
    manifest["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}
    (bundle / "manifest.json").write_text(json.dumps(manifest, indent=2))


def test_damaged_graph_fails_the_report(tiny_bundles, tmp_path, capsys):
    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("256m"), bundle)
    damage_decoder(bundle)
    code = main(["parity", "--bundle", str(bundle), "--precision", "decoder=damaged", "--new-tokens", "8",
                 "--output-dir", str(tmp_path / "report")])
    out = capsys.readouterr().out
    assert code == 1, out
    assert "FAILED" in out and "top-1" in out
    report = json.loads(next((tmp_path / "report").glob("parity_*.json")).read_text())
    assert not report["passed"]
    assert report["against"]["fp32"]["teacher_forced"]["top1_agreement"] < 0.5


def test_mixed_precisions_take_the_loosest_row():
    assert thresholds_for({"vision_encoder": "int8", "decoder_model_merged": "q4"})["row"] == "q4"
    assert thresholds_for("uint8")["row"] == "uint8"
    assert thresholds_for("fp32") == {"row": "fp32", **PARITY_THRESHOLDS["fp32"]}


@pytest.mark.parametrize("field,value,needle", [
    ("cosine", 0.5, "cosine"), ("top1_agreement", 0.05, "top-1"), ("kl_mean", 9.0, "KL"),
])
def test_each_threshold_can_fail(field, value, needle):
    result = {
        "graphs": {"decoder_model_merged": {"cosine": 1.0, "max_abs_error": 0, "mean_abs_error": 0}},
        "teacher_forced": {"top1_agreement": 1.0, "kl_mean": 0.0},
        "greedy": [{"prompt": "p", "identical": True, "first_divergence": None}],
    }
    if field == "cosine":
        result["graphs"]["decoder_model_merged"]["cosine"] = value
    else:
        result["teacher_forced"][field] = value
    failures = check_thresholds(result, thresholds_for("q4"))
    assert len(failures) == 1 and needle in failures[0]
