"""Execution providers by short name, and onnxruntime sessions made with them."""
from __future__ import annotations

from pathlib import Path

import onnxruntime as ort

from .errors import BundleError, ProviderError

# Short names users type, mapped to onnxruntime's provider names.
PROVIDERS = {
    "cpu": "CPUExecutionProvider",
    "cuda": "CUDAExecutionProvider",
    "tensorrt": "TensorrtExecutionProvider",
    "rocm": "ROCMExecutionProvider",
    "migraphx": "MIGraphXExecutionProvider",
    "openvino": "OpenVINOExecutionProvider",
    "dml": "DmlExecutionProvider",
    "coreml": "CoreMLExecutionProvider",
    "nnapi": "NnapiExecutionProvider",
    "xnnpack": "XnnpackExecutionProvider",
    "qnn": "QNNExecutionProvider",
    "webgpu": "WebGpuExecutionProvider",
    "azure": "AzureExecutionProvider",
}


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers (unknown ones by their full name)."""
    by_full = {full: short for short, full in PROVIDERS.items()}
    return [by_full.get(full, full) for full in ort.get_available_providers()]


def resolve_provider(name: str) -> list[str]:
    """The provider list for a session: the chosen one, then CPU for the ops it lacks."""
    key = name.strip().lower()
    full = PROVIDERS.get(key)
    if full is None:
        raise ProviderError(
            f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}"
        )
    if full not in ort.get_available_providers():
        raise ProviderError(
            f"execution provider {name!r} ({full}) is not available in this onnxruntime "
            f"{ort.__version__} build; available: {', '.join(available_providers())}"
        )
    return [full] if key == "cpu" else [full, PROVIDERS["cpu"]]


def make_session(path: Path, providers: list[str], threads: int | None = None) -> ort.InferenceSession:
    """Open one graph; a damaged or truncated file becomes a BundleError naming it."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    options.log_severity_level = 3  # warnings about unused initializers are noise to users
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"cannot load graph {path}: {first_line}") from exc
