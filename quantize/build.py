"""quantize_bundle: add quantized graphs to a bundle; staged inside onnx/, renamed into place, manifest.json last.

The bundle is checked against its manifest first. Each graph is quantized from its fp32 entry
into a hidden staging folder inside `onnx/`, loaded once in onnxruntime and checked to have the
fp32 graph's inputs and outputs. Only then are the files renamed into place and `manifest.json`
replaced (written as `manifest.json.tmp`, then `os.replace`). Any failure, KeyboardInterrupt
included, removes what was written and puts back what was replaced: the bundle stays as it was.
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
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from smolvlm_edge.runtime.bundle import GRAPH_NAMES, MANIFEST, Bundle, FileSwap, build_files, open_bundle, replace_manifest, sha256_file
from smolvlm_edge.export.ort_format import drop_stale_ort

from . import QuantizeError
from .recipes import NONE, PRECISIONS, RECIPES, QuantizeContext, Recipe, get_recipe, graph_file_name

__all__ = ["PRECISIONS", "QuantizeError", "quantize_bundle", "plan"]

# Short names for per-graph choices (the CLI's --vision/--embed/--decoder).
GRAPH_ALIASES = {"vision": "vision_encoder", "embed": "embed_tokens", "decoder": "decoder_model_merged"}


@dataclass(frozen=True)
class Step:
    """One graph to build: which recipe (its name is the precision), with which resolved options."""

    graph: str
    recipe: Recipe
    options: dict
    calibration: str | None  # "images", "prompts" or None

    @property
    def precision(self) -> str:
        return self.recipe.name


def _graph_name(key: str) -> str:
    name = GRAPH_ALIASES.get(key, key)
    if name not in GRAPH_NAMES:
        raise QuantizeError(f"unknown graph {key!r}; graphs: {', '.join(GRAPH_NAMES)} "
                            f"(or {', '.join(GRAPH_ALIASES)})")
    return name


def plan(recipe: str, graphs: dict[str, str] | None = None, options: dict | None = None) -> list[Step]:
    """The recipe's preset, per-graph overrides applied, options resolved and checked.

    `options` holds recipe options (applied to every graph whose recipe has them) and, under a graph
    name, a dict of options for that graph only: {"block_size": 64, "decoder": {"block_size": 32}}.
    """
    choice = dict(get_recipe(recipe).preset)
    for key, name in (graphs or {}).items():
        if name != NONE:
            get_recipe(name)
        choice[_graph_name(key)] = name
    shared, per_graph = {}, {}
    for key, value in (options or {}).items():
        if isinstance(value, dict):
            per_graph[_graph_name(key)] = value
        else:
            shared[key] = value
    active = {g: RECIPES[n] for g, n in choice.items() if n != NONE}
    if not active:
        raise QuantizeError(f"nothing to build: recipe {recipe} with {graphs} leaves every graph out")
    tables = {r.name: r.option_table() for r in active.values()}
    unknown = sorted(k for k in shared if not any(k in t for t in tables.values()))
    if unknown:
        known = "; ".join(f"{name}: {', '.join(t) or 'no options'}" for name, t in tables.items())
        raise QuantizeError(f"unknown option {', '.join(unknown)} for recipe {recipe} ({known})")
    for graph in per_graph:
        if graph not in active:
            raise QuantizeError(f"options given for {graph}, which this build leaves out")
    steps = []
    for graph in GRAPH_NAMES:
        if graph in active:
            r = active[graph]
            given = {**{k: v for k, v in shared.items() if k in tables[r.name]}, **per_graph.get(graph, {})}
            resolved = r.resolve_options(given, graph)
            steps.append(Step(graph, r, resolved, r.calibration(graph, resolved)))
    return steps


def quantize_bundle(
    bundle_dir: str | Path,
    recipe: str,
    *,
    graphs: dict[str, str] | None = None,
    options: dict | None = None,
    calibration_images=(),
    calibration_prompts=(),
    overwrite: bool = False,
    progress: Callable[[str], None] = print,
) -> dict:
    """Build `recipe` (per-graph overrides in `graphs`) into the bundle at `bundle_dir`; return what was added."""
    from .calibration import check_calibration
    from .weights import load_header, quantized_ops

    bundle = open_bundle(bundle_dir)  # refuses a bundle whose files do not match the manifest
    manifest_bytes = (bundle.path / MANIFEST).read_bytes()
    steps = plan(recipe, graphs, options)
    context = QuantizeContext(bundle.path.absolute(), tuple(Path(p) for p in calibration_images),
                              tuple(calibration_prompts))
    for step in steps:
        entries = bundle.manifest["graphs"].get(step.graph, {})
        if "fp32" not in entries:
            raise QuantizeError(f"bundle {bundle.path} has no fp32 {step.graph} to quantize from")
        if step.precision in entries and not overwrite:
            raise QuantizeError(f"{step.graph} already has a {step.precision} build ({entries[step.precision]['file']}); "
                                "pass overwrite=True (--overwrite) to rebuild it from fp32")
        found = quantized_ops(load_header(bundle.graph_file(step.graph, "fp32")))
        if found:
            raise QuantizeError(f"the fp32 {step.graph} of {bundle.path} is already quantized ({', '.join(found)}); "
                                "quantize from an unquantized export")
    for kind in sorted({s.calibration for s in steps if s.calibration}):
        check_calibration(kind, context)
    for step in steps:
        step.recipe.load()  # a recipe that cannot be imported fails before any work

    onnx_dir = bundle.path / "onnx"
    staging = Path(tempfile.mkdtemp(prefix=".quantize-", dir=onnx_dir))
    try:
        built = [_build(bundle, step, context, staging, progress) for step in steps]
        _share_tables(bundle, steps, built, progress)
        if (bundle.path / MANIFEST).read_bytes() != manifest_bytes:
            raise QuantizeError(f"{bundle.path / MANIFEST} changed while quantizing; nothing was added, try again")
        _commit(bundle, built, staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    total = sum(b["entry"]["size_bytes"] for b in built)
    names = ", ".join(f"{b['graph']} {b['precision']}" for b in built)
    progress(f"added {names} to {bundle.path} ({total / 1e6:.1f} MB)")
    return {"bundle": str(bundle.path), "recipe": recipe,
            "graphs": {b["graph"]: {"precision": b["precision"], **b["entry"]} for b in built},
            "total_bytes": total}


def _share_tables(bundle: Bundle, steps: list[Step], built: list[dict], progress) -> None:
    """Let the embed build read the decoder's 8-bit lm_head (quantize/shared_table.py) when its recipe asks to."""
    from .shared_table import share_embedding_table

    by_graph = {b["graph"]: b for b in built}
    embed, decoder = by_graph.get("embed_tokens"), by_graph.get("decoder_model_merged")
    wanted = any(s.graph == "embed_tokens" and s.options.get("share_embeddings") for s in steps)
    if not (wanted and embed and decoder and embed["precision"] == decoder["precision"]):
        return
    with _quiet():
        try:
            share_embedding_table(embed, decoder, bundle.graph_file("embed_tokens", "fp32"), progress)
        except Exception as exc:
            raise QuantizeError(f"sharing the embedding table with the lm_head failed: {type(exc).__name__}: {exc}") from exc


@contextlib.contextmanager
def _quiet():
    """onnxruntime's quantizers print progress bars and log at INFO; keep our one line per graph."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        root.setLevel(level)


def _build(bundle: Bundle, step: Step, context: QuantizeContext, staging: Path, progress) -> dict:
    """Run one recipe into staging/<graph>/, check the result, and describe it for the manifest."""
    source = bundle.manifest["graphs"][step.graph]["fp32"]
    src = bundle.graph_file(step.graph, "fp32")
    before = sum((bundle.path / rel).stat().st_size for rel in _entry_files(source))
    work = staging / step.graph
    work.mkdir()
    dst = work / graph_file_name(step.graph, step.precision)
    progress(f"{step.graph}: building {step.precision} ...")
    started = time.perf_counter()
    function = step.recipe.load()
    attention = None
    if step.graph == "vision_encoder" and step.recipe.name not in STANDARD_OPS_RECIPES:
        src, attention = _fused_vision_source(bundle, src, staging)
    with _quiet():
        try:
            info = function(src, dst, step.graph, dict(step.options), context)
            if attention is not None:
                info = {**info, "attention": attention}
        except (QuantizeError, KeyboardInterrupt):
            raise
        except Exception as exc:  # the quantizers raise many types; name the graph and the recipe
            raise QuantizeError(f"recipe {step.precision} failed on {step.graph}: {type(exc).__name__}: {exc}") from exc
    try:
        json.dumps(info)
    except TypeError as exc:
        raise QuantizeError(f"recipe {step.precision} returned info that is not JSON: {exc}") from exc
    if not dst.is_file():
        raise QuantizeError(f"recipe {step.precision} wrote no {dst.name} for {step.graph}")
    shapes = _check_io(dst, source, step)
    seconds = time.perf_counter() - started
    files = sorted(p.name for p in work.iterdir())
    extra = [f for f in files if f != dst.name]
    size = sum((work / f).stat().st_size for f in files)
    progress(f"{step.graph}: {step.precision} in {seconds:.1f} s, {before / 1e6:.2f} MB -> {size / 1e6:.2f} MB"
             + _grid_summary(info))
    entry = {
        "file": f"onnx/{dst.name}",
        "external_data": f"onnx/{extra[0]}" if len(extra) == 1 else (None if not extra else [f"onnx/{f}" for f in extra]),
        # Names and dtypes are the fp32 graph's; shapes are the new graph's own (NPU builds fix some axes).
        "inputs": [dict(t, shape=shapes[t["name"]]) for t in source["inputs"]],
        "outputs": [dict(t, shape=shapes[t["name"]]) for t in source["outputs"]],
        "recipe": step.precision,
        "source": "fp32",
        "options": step.options,
        "info": info,
        "size_bytes": size,
        "seconds": round(seconds, 2),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }
    return {"graph": step.graph, "precision": step.precision, "work": work, "files": files, "entry": entry}


def _grid_summary(info: dict) -> str:
    """q4 auto/search: how many weights kept the 4-bit grid they sit on and how many were searched."""
    if "weights_searched" not in info:
        return ""
    return (f" ({info['weights_on_exact_grid']} weights kept on their own 4-bit grid, "
            f"{info['weights_searched']} searched)")


# Recipes whose graphs must stay standard ONNX ops (NPUs): the vision attention is not fused for them
# (and they refuse a bundle exported with it fused: quantize/qdq.py).
STANDARD_OPS_RECIPES = ("qdq",)


def _fused_vision_source(bundle: Bundle, src: Path, staging: Path) -> tuple[Path, dict]:
    """The fp32 vision graph with MultiHeadAttention and FastGelu (export/vision_fusion.py): the bundle's own
    when the export fused it, else a fused copy when the rewrite reproduces the traced graph."""
    from smolvlm_edge.export.vision_fusion import fused_vision_copy

    from .weights import save

    if bundle.manifest["vision"].get("attention") == "fused":
        return src, {"attention": "fused", "by": "export", **bundle.manifest["vision"].get("attention_check", {})}
    fused = staging / "fused-source" / src.name  # one vision build per quantize call: made once
    fused.parent.mkdir()
    with _quiet():
        report = fused_vision_copy(src, fused, int(bundle.manifest["vision"]["image_size"]), save=save)
    return (fused if report["attention"] == "fused" else src), report


def _check_io(path: Path, source: dict, step: Step) -> dict:
    """The new graph loads in onnxruntime and keeps the fp32 graph's input and output names and types.

    Returns each input's and output's declared shape in the new graph.
    """
    import onnxruntime as ort

    from smolvlm_edge.runtime.providers import make_session

    try:
        session = make_session(path, ["CPUExecutionProvider"])
    except Exception as exc:  # BundleError or onnxruntime's own
        raise QuantizeError(f"the {step.precision} {step.graph} does not load in onnxruntime {ort.__version__}: {exc}") from exc
    want = {t["name"]: f"tensor({_ORT_TYPES[t['dtype']]})" for t in source["inputs"] + source["outputs"]}
    got = {v.name: v.type for v in list(session.get_inputs()) + list(session.get_outputs())}
    if got != want:
        raise QuantizeError(f"the {step.precision} {step.graph} changed its inputs/outputs: {got} != {want}")
    return {v.name: list(v.shape) for v in list(session.get_inputs()) + list(session.get_outputs())}


_ORT_TYPES = {"float32": "float", "int64": "int64", "bool": "bool", "float16": "float16"}


def _commit(bundle: Bundle, built: list[dict], staging: Path) -> None:
    """Rename the staged files into onnx/ and replace manifest.json; on any failure undo every rename."""
    onnx_dir = bundle.path / "onnx"
    manifest = json.loads((bundle.path / MANIFEST).read_text())
    rebuilt = {(b["graph"], b["precision"]) for b in built}
    kept = {rel: (graph, precision) for graph, entries in manifest["graphs"].items()
            for precision, entry in entries.items() if (graph, precision) not in rebuilt for rel in _entry_files(entry)}
    for b in built:  # a build that stays must not lose (or see replaced) a file it shares
        for name in b["files"]:
            if f"onnx/{name}" in kept:
                graph, precision = kept[f"onnx/{name}"]
                raise QuantizeError(f"the {precision} {graph} shares onnx/{name}, which this build would replace; "
                                    f"rebuild {graph} too")
    swap = FileSwap(staging)
    try:
        for b in built:
            old = manifest["graphs"][b["graph"]].get(b["precision"])
            for rel in _entry_files(old):  # an overwritten build: its files leave the table
                if rel in kept:
                    continue
                manifest["files"].pop(rel, None)
                if (bundle.path / rel).exists() and Path(rel).name not in b["files"] and rel not in _built_files(built):
                    swap.set_aside(bundle.path / rel)
            for name in b["files"]:
                staged = b["work"] / name
                manifest["files"][f"onnx/{name}"] = {"sha256": sha256_file(staged), "size": staged.stat().st_size}
                swap.install(staged, onnx_dir / name)
            manifest["graphs"][b["graph"]][b["precision"]] = b["entry"]
        for rel in drop_stale_ort(manifest, bundle.path):  # .ort files converted from a replaced .onnx
            if (bundle.path / rel).exists():
                swap.set_aside(bundle.path / rel)
        manifest["files"] = dict(sorted(manifest["files"].items()))
        replace_manifest(bundle.path, manifest)
    except BaseException:
        swap.undo()
        raise


def _built_files(built: list[dict]) -> set[str]:
    return {f"onnx/{name}" for b in built for name in b["files"]}


def _entry_files(entry: dict | None) -> list[str]:
    return build_files(entry) if entry else []
