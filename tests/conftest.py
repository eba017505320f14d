"""Shared fixtures: tiny random checkpoints of each SmolVLM shape and their exported bundles, built once."""
from __future__ import annotations

import numpy as np
import pytest

# (vision shape, model_type): SigLIP-B/16 512 px shuffle 4 (256M/500M) and SO400M/14 384 px shuffle 3 (2.2B).
CHECKPOINT_KINDS = {"256m": ("256m", "idefics3"), "2b": ("2b", "smolvlm")}


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: needs the real SmolLM2 weights or minutes of CPU; run with -m slow")


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """Lazily built tiny checkpoints, keyed like CHECKPOINT_KINDS."""
    from smolvlm_edge.export.tiny import make_tiny_checkpoint

    built = {}

    def get(kind: str):
        if kind not in built:
            shape, model_type = CHECKPOINT_KINDS[kind]
            built[kind] = make_tiny_checkpoint(tmp_path_factory.mktemp(f"ckpt-{kind}"), shape=shape, model_type=model_type)
        return built[kind]

    return get


@pytest.fixture(scope="session")
def tiny_bundles(tmp_path_factory, tiny_checkpoints):
    """Lazily exported (and self-verified) bundles of the tiny checkpoints: `get(kind)` with fused attention
    (the default), `get(kind, "plain")` with standard ops only (NPUs). Read-only: copy one to change it."""
    from smolvlm_edge.export.api import export_checkpoint

    built, logs = {}, {}

    def get(kind: str, attention: str = "fused"):
        key = kind if attention == "fused" else f"{kind}-{attention}"
        if key not in built:
            out = tmp_path_factory.mktemp(f"bundle-{key}") / "bundle"
            logs[key] = []
            built[key] = export_checkpoint(str(tiny_checkpoints(kind)), out, attention=attention,
                                           progress=logs[key].append)
        return built[key]

    get.progress_lines = logs  # what the export printed, per kind
    return get


def make_image(width: int, height: int, seed: int = 0, mode: str = "RGB"):
    """A deterministic noisy test image with some structure."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    yy, xx = np.mgrid[0:height, 0:width]
    base[..., 0] = ((xx * 255) // max(width - 1, 1)).astype(np.uint8)
    return Image.fromarray(base, "RGB").convert(mode)


@pytest.fixture(scope="session")
def qdq_vision_bundle(tiny_bundles, tmp_path_factory):
    """A copy of the tiny 256m plain-attention bundle with a qdq vision build (one frame) beside its fp32 graphs."""
    import shutil

    from smolvlm_edge.quantize.build import quantize_bundle

    root = tmp_path_factory.mktemp("qdq-vision")
    bundle = root / "bundle"
    shutil.copytree(tiny_bundles("256m", "plain"), bundle)  # NPU graphs are standard ops only
    calib = root / "calib.png"
    make_image(300, 200, seed=11).save(calib)
    quantize_bundle(bundle, "qdq", graphs={"vision": "qdq", "embed": "none", "decoder": "none"},
                    calibration_images=(calib,), calibration_prompts=("Describe the picture.",),
                    progress=lambda line: None)
    return bundle


@pytest.fixture(scope="session")
def qnn():
    """The QNN HTP simulator (onnxruntime-qnn), or a skip that says why it cannot load here."""
    pytest.importorskip("onnx")
    from smolvlm_edge.quantize.qnn import qnn_available

    ok, reason = qnn_available()
    if not ok:
        pytest.skip(f"QNN HTP simulator unavailable: {reason}")
    return reason
