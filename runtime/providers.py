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


# ---------------------------------------------------------------- QNN HTP (the optional onnxruntime-qnn plugin)

QNN_EP = "QNNExecutionProvider"


def register_qnn() -> str:
    """Register the onnxruntime-qnn plugin EP once per process; return its HTP backend library path.

    The plugin wheel (`pip install onnxruntime-qnn`, Linux x86_64 and Windows ARM64) ships Qualcomm's
    HTP backend; on x86 it runs as a simulator. It is imported only here, when a QNN session is asked for.
    """
    try:
        import onnxruntime_qnn
    except ImportError as exc:
        raise ProviderError(
            f"the QNN execution provider needs the onnxruntime-qnn wheel, which is not installed ({exc}); "
            "install it with `pip install onnxruntime-qnn`"
        ) from exc
    name = onnxruntime_qnn.get_ep_name()
    if not any(d.ep_name == name for d in ort.get_ep_devices()):
        try:
            ort.register_execution_provider_library(name, onnxruntime_qnn.get_library_path())
        except Exception as exc:  # onnxruntime raises its own untyped errors for a library it cannot load
            raise ProviderError(
                f"onnxruntime {ort.__version__} cannot load the onnxruntime-qnn {onnxruntime_qnn.__version__} "
                f"plugin {onnxruntime_qnn.get_library_path()}: {str(exc).strip().splitlines()[0]}"
            ) from exc
    return onnxruntime_qnn.get_qnn_htp_path()


def make_qnn_htp_session(
    path: Path,
    fallback: bool = True,
    options: dict | None = None,
    session_options: ort.SessionOptions | None = None,
) -> ort.InferenceSession:
    """Open one graph on the QNN EP's HTP backend (statically quantized QDQ graphs only).

    `fallback=False` sets `session.disable_cpu_ep_fallback`: loading then fails unless the HTP backend
    takes every node. `options` are QNN provider options (`htp_performance_mode`, `soc_model`,
    `htp_arch`, `vtcm_mb`, ...), passed as strings; `backend_path` defaults to the wheel's HTP library.
    """
    backend = register_qnn()
    devices = [d for d in ort.get_ep_devices() if d.ep_name == QNN_EP][:1]
    if not devices:
        raise ProviderError(f"onnxruntime-qnn is registered but offers no {QNN_EP} device")
    so = session_options or ort.SessionOptions()
    if session_options is None:
        so.log_severity_level = 3
    provider_options = {"backend_path": backend, **{k: str(v) for k, v in (options or {}).items()}}
    so.add_provider_for_devices(devices, provider_options)
    if not fallback:
        so.add_session_config_entry("session.disable_cpu_ep_fallback", "1")
    try:
        return ort.InferenceSession(str(path), sess_options=so)
    except Exception as exc:  # onnxruntime raises its own untyped errors (unsupported nodes, QNN finalize)
        message = " ".join(str(exc).split())[:600] or type(exc).__name__
        raise ProviderError(f"the QNN HTP backend cannot load {path}: {message}") from exc
