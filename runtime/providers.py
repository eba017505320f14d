"""Execution providers by short name, and onnxruntime sessions made with them.

Mobile execution providers and their options (onnxruntime provider options are strings):

- `xnnpack` (XnnpackExecutionProvider; Android, iOS, WebAssembly, ARM/x86 builds): `intra_op_num_threads`,
  the size of XNNPACK's own thread pool (default: `threads`, else min(4, CPUs)). As onnxruntime recommends,
  the session's intra-op pool is set to 1 thread and `session.intra_op.allow_spinning` to 0, so the two
  pools do not compete for the cores.
- `nnapi` (NnapiExecutionProvider; Android 8.1+): the NNAPI flags `NNAPI_FLAG_USE_FP16` (fp16 relaxation:
  faster, less precise), `NNAPI_FLAG_USE_NCHW`, `NNAPI_FLAG_CPU_DISABLED` (never NNAPI's own CPU
  reference device: what NNAPI cannot put on an accelerator goes to onnxruntime's CPU EP) and
  `NNAPI_FLAG_CPU_ONLY` (NNAPI's CPU only, for testing), each "0" or "1". They are the flags of
  `OrtSessionOptionsAppendExecutionProvider_Nnapi` and of the Java API's `addNnapi(EnumSet<NNAPIFlags>)`;
  onnxruntime's Python binding (NNAPI builds exist for Android only) creates the EP without flags.
- `coreml` (CoreMLExecutionProvider; iOS, macOS): `ModelFormat` MLProgram (default here; Core ML 5+,
  iOS 15+) or NeuralNetwork; `MLComputeUnits` ALL (default), CPUAndNeuralEngine, CPUAndGPU or CPUOnly;
  `RequireStaticInputShapes`, `EnableOnSubgraphs` ("0"/"1"); `ModelCacheDirectory` (a folder).
- `qnn`: the onnxruntime-qnn plugin, per graph (see `make_qnn_htp_session`); options such as
  `htp_performance_mode`, `soc_model`, `htp_arch`, `vtcm_mb`.

None of the first three is in the PyPI onnxruntime wheel (CPU only): asking for one there raises a
ProviderError naming it and the available providers, or, with `fallback="cpu"`, warns
(ProviderFallbackWarning) and uses the CPU.
"""
from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass, field
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

FALLBACKS = ("cpu",)  # what `fallback=` may name

_FLAG = ("0", "1")
# The documented provider options of the mobile EPs: name -> allowed values (None: any string).
PROVIDER_OPTIONS: dict[str, dict[str, tuple[str, ...] | None]] = {
    "xnnpack": {"intra_op_num_threads": None},
    "nnapi": {"NNAPI_FLAG_USE_FP16": _FLAG, "NNAPI_FLAG_USE_NCHW": _FLAG,
              "NNAPI_FLAG_CPU_DISABLED": _FLAG, "NNAPI_FLAG_CPU_ONLY": _FLAG},
    "coreml": {"ModelFormat": ("MLProgram", "NeuralNetwork"),
               "MLComputeUnits": ("ALL", "CPUAndNeuralEngine", "CPUAndGPU", "CPUOnly"),
               "RequireStaticInputShapes": _FLAG, "EnableOnSubgraphs": _FLAG, "ModelCacheDirectory": None},
}
# What a session gets when the caller names no option.
DEFAULT_PROVIDER_OPTIONS: dict[str, dict[str, str]] = {
    "coreml": {"ModelFormat": "MLProgram", "MLComputeUnits": "ALL"},
    "qnn": {"htp_performance_mode": "burst"},
}
XNNPACK_DEFAULT_THREADS = 4  # the big cores of most phone SoCs


class ProviderFallbackWarning(UserWarning):
    """The execution provider asked for is missing here; the CPU runs the graph instead (fallback="cpu")."""


@dataclass(frozen=True)
class ProviderChoice:
    """Everything a session needs for one execution provider: onnxruntime names, their options, session settings."""

    name: str                                   # the short name the session runs with ("cpu" after a fallback)
    providers: list[str]                        # onnxruntime names in priority order (the CPU last)
    provider_options: list[dict[str, str]]      # one dict per provider
    session_entries: dict[str, str] = field(default_factory=dict)  # session config entries the EP wants
    intra_op_threads: int | None = None         # the session's intra-op pool size, where the EP fixes it
    requested: str | None = None                # the short name asked for, when it fell back to the CPU


def available_providers() -> list[str]:
    """Short names of the providers this onnxruntime build offers (unknown ones by their full name)."""
    by_full = {full: short for short, full in PROVIDERS.items()}
    return [by_full.get(full, full) for full in ort.get_available_providers()]


def _key(name: str) -> tuple[str, str]:
    key = name.strip().lower()
    full = PROVIDERS.get(key)
    if full is None:
        raise ProviderError(f"unknown execution provider {name!r}; known: {', '.join(PROVIDERS)}")
    return key, full


def _unavailable(name: str, full: str) -> str:
    hint = ("; QNN runs per graph through the onnxruntime-qnn plugin: SmolVLM(provider='qnn') or "
            "`smolvlm-edge run --provider qnn` with a qdq build") if full == PROVIDERS["qnn"] else ""
    return (f"execution provider {name!r} ({full}) is not available in this onnxruntime {ort.__version__} build; "
            f"available: {', '.join(available_providers())}{hint}")


def check_fallback(fallback: str | None) -> str | None:
    if fallback is None:
        return None
    if str(fallback).strip().lower() not in FALLBACKS:
        raise ProviderError(f"fallback must be one of {', '.join(FALLBACKS)} (or none), got {fallback!r}")
    return str(fallback).strip().lower()


def resolve_provider(name: str) -> list[str]:
    """The provider list for a session: the chosen one, then CPU for the ops it lacks."""
    key, full = _key(name)
    if full not in ort.get_available_providers():
        raise ProviderError(_unavailable(name, full))
    return [full] if key == "cpu" else [full, PROVIDERS["cpu"]]


def provider_options(name: str, options: dict | None = None, threads: int | None = None) -> dict[str, str]:
    """The provider options for `name`: defaults, then `options` (checked where documented), as strings."""
    key, _ = _key(name)
    merged = {**DEFAULT_PROVIDER_OPTIONS.get(key, {}), **{str(k): str(v) for k, v in (options or {}).items()}}
    known = PROVIDER_OPTIONS.get(key)
    if known is not None:
        for option, value in merged.items():
            if option not in known:
                raise ProviderError(f"unknown {key} provider option {option!r}; known: {', '.join(known)}")
            allowed = known[option]
            if allowed is not None and value not in allowed:
                raise ProviderError(f"{key} provider option {option}={value!r} must be one of {', '.join(allowed)}")
    if key == "xnnpack":
        value = merged.get("intra_op_num_threads") or str(threads or min(XNNPACK_DEFAULT_THREADS, os.cpu_count() or 1))
        if not value.isdigit() or int(value) < 1:
            raise ProviderError(f"xnnpack provider option intra_op_num_threads must be a whole number >= 1, got {value!r}")
        merged["intra_op_num_threads"] = value
    return merged


def choose_provider(name: str = "cpu", threads: int | None = None, options: dict | None = None,
                    fallback: str | None = None) -> ProviderChoice:
    """Providers, provider options and session settings for `name`.

    A provider this onnxruntime lacks raises a ProviderError naming it and the available ones, unless
    `fallback="cpu"`: then a ProviderFallbackWarning says so and the CPU is chosen.
    """
    key, full = _key(name)
    fallback = check_fallback(fallback)
    opts = provider_options(key, options, threads)
    if full not in ort.get_available_providers():
        if fallback is None:
            raise ProviderError(_unavailable(name, full))
        warnings.warn(f"{_unavailable(name, full)}; falling back to the CPU (--fallback {fallback})",
                      ProviderFallbackWarning, stacklevel=2)
        return ProviderChoice("cpu", [PROVIDERS["cpu"]], [{}], requested=key)
    if key == "cpu":
        return ProviderChoice("cpu", [full], [opts])
    if key == "xnnpack":  # onnxruntime's recommended setup: XNNPACK's pool does the work, the session's sleeps
        return ProviderChoice(key, [full, PROVIDERS["cpu"]], [opts, {}],
                              session_entries={"session.intra_op.allow_spinning": "0"}, intra_op_threads=1)
    return ProviderChoice(key, [full, PROVIDERS["cpu"]], [opts, {}])


def make_session(path: Path, providers: list[str] | ProviderChoice, threads: int | None = None,
                 custom_ops: bool = False, hands_over: bool = False) -> ort.InferenceSession:
    """Open one graph (.onnx or .ort); a damaged or truncated file becomes a BundleError naming it.

    `providers`: onnxruntime names, or a ProviderChoice (its options and session settings applied).
    `custom_ops`: register onnxruntime-extensions' ops when that package is installed.
    `hands_over`: the graph runs once and hands over to another session (vision and embed before the
    decoder): its pool's threads stop spinning when a run ends. Left spinning, they take cores from the
    next session's run (2 cores: the decoder's 81-token prefill after vision took 115 instead of 95 ms)."""
    choice = providers if isinstance(providers, ProviderChoice) else None
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    if threads:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if choice is not None:
        if choice.intra_op_threads is not None:
            options.intra_op_num_threads = choice.intra_op_threads
        for key, value in choice.session_entries.items():
            options.add_session_config_entry(key, value)
    if hands_over:
        options.add_session_config_entry("session.force_spinning_stop", "1")
    options.log_severity_level = 3  # warnings about unused initializers are noise to users
    if custom_ops:
        try:
            import onnxruntime_extensions
        except ImportError:
            pass
        else:
            options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    kwargs = {"providers": choice.providers, "provider_options": choice.provider_options} if choice else {
        "providers": providers}
    try:
        return ort.InferenceSession(str(path), sess_options=options, **kwargs)
    except Exception as exc:  # onnxruntime raises its own untyped errors for bad files
        first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise BundleError(f"cannot load graph {path}: {first_line}") from exc
# ---------------------------------------------------------------- QNN HTP (the optional onnxruntime-qnn plugin)


@contextlib.contextmanager
def stdout_to_stderr():
    """Send file descriptor 1 to stderr for a while: the QNN HTP backend prints a banner on stdout when a
    session is made, which would corrupt `smolvlm-edge run --json`."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        sys.stdout.flush()
        os.dup2(saved, 1)
        os.close(saved)


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
