"""ORT format (.ort): the one-file mobile model and a bundle's graphs, converted for onnxruntime mobile builds.

The conversion is onnxruntime's own tool (`python -m onnxruntime.tools.convert_onnx_models_to_ort`, called
through its Python API `convert_onnx_models_to_ort`): it loads the .onnx in an InferenceSession on the CPU
EP, optimizes it, saves the graph as an ORT-format flatbuffer and writes `<name>.required_operators.config`,
the operators (per domain and opset, Loop/If subgraphs included) that an onnxruntime minimal build made
with `--include_ops_by_config` must contain. What it was seen to handle (onnxruntime 1.32, tests/test_mobile_cli.py):
com.microsoft ops (GroupQueryAttention, SkipSimplifiedLayerNormalization, QuickGelu, ...), the greedy
`Loop` with the decoder inside, and onnxruntime-extensions ops (`ai.onnx.contrib` GPT2Tokenizer,
StringECMARegexSplitWithOffsets and BpeDecoder, or HfJsonTokenizer) once the extensions library is registered
for the conversion (the config then lists them under `ai.onnx.contrib`; the app registers the same library).

Optimization style: **Fixed** by default. It runs every optimization (level "all") before saving, so
the file holds the optimized graph and a session does no graph work at load (and needs no
`session.enable_saved_runtime_optimizations`). That suits these graphs: the fused decoder's
com.microsoft ops and the Loop run on onnxruntime's CPU kernels (XNNPACK takes single ops from it).
Fixed bakes CPU-EP fusions into the graph, which hides nodes from compiling EPs: for NNAPI or CoreML,
convert with style "runtime" (onnxruntime's guidance: basic optimizations applied, the rest saved and
replayed at load for the nodes those EPs leave to the CPU); the tool then names the files
`<name>.with_runtime_opt.ort` and `required_operators.with_runtime_opt.config`.

Target: the mobile model is converted for "arm" (QDQ int8 paths allowed, no x86-only NCHWc layouts);
bundle graphs without a target (portable: the runtime may run on x86 or ARM).

Limits: an ORT-format file is one flatbuffer, at most 2 GiB (larger models stay .onnx with external
data). Versions: onnxruntime 1.20.1 and 1.32 both write ORT format version 6 (`ort_format_version` reads it),
yet a file is tied to the onnxruntime that wrote it: its nodes carry that version's attributes and fusions
(measured: the mobile model's .ort written by 1.32 fails to load in 1.20.1, "Unrecognized attribute:
qk_norm_epsilon for operator GroupQueryAttention"; the same .onnx converted by 1.20.1 loads and gives the same
ids). onnxruntime's documentation: a release runs the ORT format versions up to its own, no promise for newer
files. So convert with the onnxruntime the app ships (or an older one); the writer's version is recorded in the
config's header and, for a bundle, in each entry's `ort_info`.
"""
from __future__ import annotations

import contextlib
import datetime
import io
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from smolvlm_edge.export.graph_order import subgraphs
from smolvlm_edge.runtime.bundle import GRAPH_NAMES, MANIFEST, FileSwap, build_files, open_bundle, replace_manifest, sha256_file
from smolvlm_edge.runtime.errors import ExportError

STYLES = ("fixed", "runtime")
CONTRIB_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions
# Domains a stock onnxruntime (or onnxruntime-extensions) registers kernels for.
_KNOWN_DOMAINS = {"", "ai.onnx", "ai.onnx.ml", "com.microsoft", "com.microsoft.nchwc", "com.ms.internal.nhwc",
                  CONTRIB_DOMAIN}
ORT_FORMAT_LIMIT = 2**31 - 1  # flatbuffers: one buffer under 2 GiB
# onnxruntime-android in android_demo/gradle/libs.versions.toml: keep in step. A .ort written by a newer onnxruntime
# may not load there (see the module docstring).
ANDROID_DEMO_ONNXRUNTIME = "1.20.0"


class OrtVersionWarning(UserWarning):
    """An .ort file written by an onnxruntime newer than the one the Android demo ships."""


def ort_files_made_from(model_path: str | Path) -> list[Path]:
    """The files convert_to_ort writes beside `model_path`, for both styles (stale once the .onnx is rewritten)."""
    path = Path(model_path)
    stem = path.name[:-len(path.suffix)] if path.suffix else path.name
    return [path.with_name(stem + end) for end in (".ort", ".with_runtime_opt.ort", ".required_operators.config",
                                                   ".required_operators.with_runtime_opt.config")]


def ort_format_version(path: str | Path) -> str | None:
    """The ORT format version an .ort file declares (its flatbuffer's `ort_version`), or None if unreadable."""
    import mmap

    try:
        from onnxruntime.tools.ort_format_model.ort_flatbuffers_py.fbs.InferenceSession import InferenceSession

        with open(path, "rb") as fh, mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            version = InferenceSession.GetRootAsInferenceSession(buf, 0).OrtVersion()
        return version.decode("utf-8") if version else None
    except Exception:  # an older onnxruntime without the bindings, or not an ORT file: the version is optional
        return None


def app_version_warning(ort_file: Path, writer: str, app: str = ANDROID_DEMO_ONNXRUNTIME) -> str | None:
    """What to tell the user when onnxruntime `writer` is newer (major.minor) than the app's `app`; else None."""
    def minor(version: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version.split(".")[:2] if p.isdigit())

    if minor(writer) <= minor(app):
        return None
    return (f"{ort_file.name} was written by onnxruntime {writer}, and loads in onnxruntime {writer} or newer "
            f"only: the Android demo ships {app} (ship the .onnx there, or convert it with onnxruntime {app}; see "
            "android_demo/README.md)")


def _style(style: str):
    from onnxruntime.tools.convert_onnx_models_to_ort import OptimizationStyle

    key = str(style).strip().lower()
    if key not in STYLES:
        raise ExportError(f"unknown ORT optimization style {style!r}; use one of {', '.join(STYLES)}")
    return OptimizationStyle.Fixed if key == "fixed" else OptimizationStyle.Runtime


def _domains(path: Path) -> set[str]:
    """Opset domains of the model and of its local functions (weights are not read)."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    return {o.domain for o in model.opset_import} | {o.domain for f in model.functions for o in f.opset_import}


def _tensors(graph):
    """Initializers and constant attributes of a graph and its subgraphs."""
    yield from graph.initializer
    for node in graph.node:
        for attr in node.attribute:
            if attr.HasField("t"):
                yield attr.t
            yield from attr.tensors
        for sub in subgraphs(node):
            yield from _tensors(sub)


def _model_bytes(path: Path) -> int:
    """The .onnx file plus the external data files it names."""
    import onnx

    model = onnx.load(str(path), load_external_data=False)
    files = {e.value for t in _tensors(model.graph) if t.data_location == onnx.TensorProto.EXTERNAL
             for e in t.external_data if e.key == "location"}
    return path.stat().st_size + sum((path.parent / f).stat().st_size for f in files if (path.parent / f).is_file())


def _extensions_library(path: Path, domains: set[str]) -> Path | None:
    unknown = sorted(d for d in domains - _KNOWN_DOMAINS)
    if unknown:
        raise ExportError(f"{path} uses custom-op domain(s) {unknown}, whose kernels onnxruntime does not have; the "
                          "ORT-format converter can only convert a model whose custom ops are registered "
                          "(onnxruntime-extensions' ai.onnx.contrib is the one supported here)")
    if CONTRIB_DOMAIN not in domains:
        return None
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise ExportError(f"{path} uses onnxruntime-extensions ops ({CONTRIB_DOMAIN}: the in-graph tokenizer); "
                          "converting it needs that library: pip install onnxruntime-extensions==0.15.2 "
                          "(or pip install 'smolvlm-edge[mobile]')") from exc
    return Path(onnxruntime_extensions.get_library_path())


@contextlib.contextmanager
def _quiet_tool():
    """The tool prints a line per step and logs at INFO; onnxruntime warns about the max_new_tokens input."""
    import onnxruntime as ort

    buffer = io.StringIO()
    loggers = [logging.getLogger(n) for n in ("ort_format_model.utils", "ort_format_model", "")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    ort.set_default_logger_severity(3)
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        ort.set_default_logger_severity(2)  # onnxruntime's default (warning)
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def convert_to_ort(
    model_path: str | Path,
    output_dir: str | Path | None = None,
    style: str = "fixed",
    target: str | None = "arm",
    verify: bool = True,
) -> tuple[Path, Path]:
    """Convert one .onnx file; returns (the .ort file, its required-operators config), both in `output_dir`
    (default: beside the model), named as onnxruntime's tool names them. See the module docstring."""
    import onnxruntime as ort
    from onnxruntime.tools.convert_onnx_models_to_ort import convert_onnx_models_to_ort

    source = Path(model_path)
    if not source.is_file():
        raise ExportError(f"no model file {source}")
    if source.suffix.lower() != ".onnx":
        raise ExportError(f"{source} is not an .onnx file")
    out = Path(output_dir) if output_dir is not None else source.parent
    optimization = _style(style)
    if target not in (None, "arm", "amd64"):
        raise ExportError(f"target must be arm, amd64 or None, got {target!r}")
    library = _extensions_library(source, _domains(source))
    size = _model_bytes(source)
    if size > ORT_FORMAT_LIMIT:
        raise ExportError(f"{source} holds {size / 2**30:.2f} GiB with its external data; an ORT-format file is one "
                          "flatbuffer of at most 2 GiB: ship this model as .onnx (+ data), or quantize it first")
    out.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".ort-", dir=out)).resolve()
    try:
        with _quiet_tool() as log:
            try:
                convert_onnx_models_to_ort(source, output_dir=staging, optimization_styles=[optimization],
                                           custom_op_library_path=library, target_platform=target)
            except Exception as exc:  # the tool re-raises onnxruntime's untyped errors
                detail = " ".join(str(exc).split())[:500] or type(exc).__name__
                raise ExportError(f"onnxruntime {ort.__version__}'s ORT-format converter failed on {source}: {detail}"
                                  f"{' (tool output: ' + log.getvalue().strip()[-300:] + ')' if log.getvalue().strip() else ''}"
                                  ) from exc
        made = sorted(p for p in staging.iterdir() if p.is_file())
        ort_files = [p for p in made if p.suffix == ".ort"]
        configs = [p for p in made if p.name.endswith(".config")]
        if len(ort_files) != 1 or len(configs) != 1:
            raise ExportError(f"the ORT-format converter wrote {[p.name for p in made]} for {source}; expected one "
                              ".ort file and one .config")
        final_ort, final_config = out / ort_files[0].name, out / configs[0].name
        # The config's header names the models it was made from: name the final file, not the staging copies.
        lines = configs[0].read_text(encoding="utf-8").splitlines()
        version = ort_format_version(ort_files[0]) or "unknown"
        writer = f"# written by onnxruntime {ort.__version__} (ORT format version {version})"
        header = [f"# - {final_ort.name}", f"{writer}: load it with onnxruntime {ort.__version__} or newer"]
        body = [line for line in lines if not line.startswith("# - ")]
        configs[0].write_text("\n".join(body[:1] + header + body[1:]) + "\n", encoding="utf-8")
        if verify:
            _check_loads(ort_files[0], library)
        os.replace(ort_files[0], final_ort)
        os.replace(configs[0], final_config)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final_ort, final_config


def _check_loads(path: Path, library: Path | None) -> None:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    if library is not None:
        options.register_custom_ops_library(str(library))
    try:
        ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the converted {path.name}: {' '.join(str(exc).split())[:400]}") from exc


# ---------------------------------------------------------------- a bundle's graphs


def convert_bundle_to_ort(
    bundle_dir: str | Path,
    precision: str | dict[str, str] = "fp32",
    style: str = "fixed",
    progress: Callable[[str], None] = print,
) -> dict:
    """Write `onnx/<graph>{suffix}.ort` (and `.required_operators.config`) for the three graphs of one
    precision (or a {graph: precision} mix) and record them in manifest.json: entry fields `ort_file`,
    `ort_required_operators`, `ort_info` (style, writer onnxruntime, ORT format version, the sha256 of the
    .onnx files converted: `source_files`); both files in `files` with sha256 and size. Stale .ort records of
    any graph (drop_stale_ort) leave the manifest and the folder in the same commit. As quantize_bundle does:
    converted in a staging folder inside onnx/, renamed into place, manifest.json replaced last; a failure
    leaves the bundle as it was."""
    bundle = open_bundle(bundle_dir)
    manifest_bytes = (bundle.path / MANIFEST).read_bytes()
    chosen = precision if isinstance(precision, dict) else {}
    unknown = sorted(set(chosen) - set(GRAPH_NAMES))
    if unknown:
        raise ExportError(f"precision names unknown graph(s) {unknown}; graphs: {', '.join(GRAPH_NAMES)}")
    default = precision if isinstance(precision, str) else "fp32"
    picked = {g: chosen.get(g, default) for g in GRAPH_NAMES}
    sources = {g: bundle.graph_file(g, p) for g, p in picked.items()}  # BundleError names what the bundle has
    _style(style)
    import onnxruntime as ort

    onnx_dir = bundle.path / "onnx"
    staging = Path(tempfile.mkdtemp(prefix=".convert-ort-", dir=onnx_dir))
    try:
        built = []
        for graph, src in sources.items():
            progress(f"{graph} {picked[graph]}: converting {src.name} to ORT format ({style}) ...")
            ort_file, config = convert_to_ort(src, staging / graph, style=style, target=None)
            built.append({"graph": graph, "precision": picked[graph], "files": [ort_file, config]})
        if (bundle.path / MANIFEST).read_bytes() != manifest_bytes:
            raise ExportError(f"{bundle.path / MANIFEST} changed while converting; nothing was added, try again")
        info = {"optimization_style": style, "onnxruntime": ort.__version__,
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
        dropped = _commit(bundle.path, built, staging, info)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    result = {}
    for b in built:
        ort_file = onnx_dir / b["files"][0].name
        result[b["graph"]] = {"precision": b["precision"], "ort_file": f"onnx/{ort_file.name}",
                              "size_bytes": ort_file.stat().st_size}
        progress(f"{b['graph']} {b['precision']}: wrote onnx/{ort_file.name} ({ort_file.stat().st_size / 1e6:.2f} MB)")
    for rel in dropped:
        progress(f"removed {rel}: no graph entry records it for its current .onnx (rebuilt, or the other style)")
    return result


def _commit(root: Path, built: list[dict], staging: Path, info: dict) -> list[str]:
    """Rename the staged files into onnx/ and replace manifest.json (tmp + fsync + os.replace); undo on failure.
    Returns the stale .ort records removed."""
    manifest = json.loads((root / MANIFEST).read_text(encoding="utf-8"))
    onnx_dir = root / "onnx"
    swap = FileSwap(staging)
    try:
        for b in built:
            entry = manifest["graphs"][b["graph"]][b["precision"]]
            ort_file, config = b["files"]
            for staged in (ort_file, config):
                manifest["files"][f"onnx/{staged.name}"] = {"sha256": sha256_file(staged), "size": staged.stat().st_size}
                swap.install(staged, onnx_dir / staged.name)
            entry["ort_file"] = f"onnx/{ort_file.name}"
            entry["ort_required_operators"] = f"onnx/{config.name}"
            entry["ort_info"] = {**info, "ort_format_version": ort_format_version(onnx_dir / ort_file.name),
                                 "source_files": _source_files(manifest, entry)}
        # The other style's files of these entries, and whatever a rebuilt graph left behind, leave with their rows.
        dropped = drop_stale_ort(manifest, root)
        for rel in dropped:
            if (root / rel).exists():
                swap.set_aside(root / rel)
        manifest["files"] = dict(sorted(manifest["files"].items()))
        replace_manifest(root, manifest)
    except BaseException:
        swap.undo()
        raise
    return dropped


def _source_files(manifest: dict, entry: dict) -> dict[str, str]:
    """sha256 of the .onnx (and external data) an entry names, as the files table records them."""
    return {rel: manifest["files"].get(rel, {}).get("sha256") for rel in build_files(entry)}


def _is_ort_record(rel: str) -> bool:
    name = rel.rsplit("/", 1)[-1]
    return name.endswith(".ort") or (".required_operators" in name and name.endswith(".config"))


def _ort_is_current(manifest: dict, entry: dict, root: Path) -> bool:
    """Whether an entry's .ort was converted from the .onnx it names now (by recorded sha256; by file times for
    entries recorded before the sha256 was)."""
    if not entry.get("ort_file"):
        return False
    source = (entry.get("ort_info") or {}).get("source_files")
    if source is not None:
        return source == _source_files(manifest, entry)
    ort_file, onnx_file = root / entry["ort_file"], root / entry["file"]
    return ort_file.is_file() and (not onnx_file.is_file() or ort_file.stat().st_mtime >= onnx_file.stat().st_mtime)


def stale_ort_records(manifest: dict, root: str | Path) -> list[str]:
    """The .ort files and their configs in the files table that no graph entry records for its current .onnx.

    A graph rebuilt since its conversion leaves them: `quantize --overwrite` replaces the entry (its `ort_file`
    goes) but not the files table's .ort rows, which then list a file converted from the replaced .onnx."""
    root = Path(root)
    current = set()
    for entries in manifest["graphs"].values():
        for entry in entries.values():
            if _ort_is_current(manifest, entry, root):
                current |= {entry["ort_file"], entry.get("ort_required_operators")}
    return sorted(rel for rel in manifest["files"] if _is_ort_record(rel) and rel not in current)


def drop_stale_ort(manifest: dict, root: str | Path) -> list[str]:
    """Remove the stale .ort records from `manifest` (files table rows, and the ort fields of entries whose .onnx
    changed); returns the rows removed, whose files the caller moves out. Call it before writing a manifest."""
    stale = stale_ort_records(manifest, root)
    for entries in manifest["graphs"].values():
        for entry in entries.values():
            if entry.get("ort_file") and not _ort_is_current(manifest, entry, Path(root)):
                for key in ("ort_file", "ort_required_operators", "ort_info"):
                    entry.pop(key, None)
    for rel in stale:
        manifest["files"].pop(rel, None)
    return stale
