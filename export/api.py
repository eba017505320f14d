"""export_checkpoint: a SmolVLM checkpoint (local path or hub id) in, a verified fp32 bundle folder out."""
from __future__ import annotations

import datetime
import os
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

from smolvlm_edge.export import bundle, decoder, embed, fused_decoder, vision
from smolvlm_edge.export import verify as verification  # `verify` is also a parameter below
from smolvlm_edge.export.graph import DEFAULT_EXTERNAL_DATA_THRESHOLD, DEFAULT_IR_VERSION, DEFAULT_OPSET
from smolvlm_edge.runtime.errors import ExportError

SUPPORTED_MODEL_TYPES = ("idefics3", "smolvlm")
# Export order; each module has spec(config) and export(model, folder, **options).
GRAPHS = (vision, embed, decoder)
PRECISION = "fp32"  # transformers.js suffix "" (quantized builds add their own entries)
# Attention: "fused" (onnxruntime's contrib ops. Decoder: fused_decoder.py, GroupQueryAttention, in-place KV
# cache, rows without left padding, which the runtime ensures; vision: vision_fusion.py, MultiHeadAttention and
# FastGelu) or "plain" (the dynamo export: ai.onnx ops only, any padding; for providers without onnxruntime's
# contrib ops: NNAPI, CoreML, XNNPACK, QNN, and for batched transformers.js).
ATTENTION = ("fused", "plain")
_PACKAGES = ("smolvlm-edge", "torch", "transformers", "onnx", "onnxscript", "onnxruntime")


def load_config(model: str):
    """AutoConfig of `model`, refusing what is not an Idefics3/SmolVLM checkpoint, with a message that says why."""
    from transformers import AutoConfig

    path = Path(model).expanduser()
    looks_local = path.is_absolute() or model.startswith((".", "~")) or model.count("/") != 1 or path.exists()
    if looks_local:
        if not path.exists():
            raise ExportError(f"the checkpoint folder {model} does not exist; give a local checkpoint folder or a hub id")
        if not (path / "config.json").is_file():
            raise ExportError(f"{model} has no config.json; it is not a transformers checkpoint folder")
    try:
        config = AutoConfig.from_pretrained(str(path) if looks_local else model)
    except (OSError, ValueError) as exc:
        raise ExportError(f"cannot read the config of {model}: {exc}") from exc
    if config.model_type not in SUPPORTED_MODEL_TYPES:
        raise ExportError(
            f"{model} is a {config.model_type!r} checkpoint; smolvlm-edge exports Idefics3/SmolVLM checkpoints "
            "(model_type idefics3 or smolvlm)"
        )
    return config


def load_model(model: str):
    """The checkpoint as an fp32 `Idefics3ForConditionalGeneration` (or SmolVLM's twin class), in eval mode."""
    import torch
    from transformers import AutoModelForImageTextToText

    path = Path(model).expanduser()
    source = str(path) if path.exists() else model
    return AutoModelForImageTextToText.from_pretrained(source, dtype=torch.float32).eval()


def export_checkpoint(
    model: str,
    output: str | Path,
    *,
    overwrite: bool = False,
    verify: bool = True,
    opset: int = DEFAULT_OPSET,
    ir_version: int = DEFAULT_IR_VERSION,
    external_data_threshold: int = DEFAULT_EXTERNAL_DATA_THRESHOLD,
    attention: str = "fused",
    progress: Callable[[str], None] = print,
) -> Path:
    """Export `model` to a bundle folder at `output` and return its path.

    Graphs go to `output/onnx/`, each checked against PyTorch unless `verify` is False; weights
    above `external_data_threshold` bytes go to `*.onnx_data` beside their graph. Nothing is left
    at `output` (nor beside it) unless every step succeeds.
    """
    if attention not in ATTENTION:
        raise ExportError(f"attention={attention!r}: choose one of {', '.join(ATTENTION)}")
    model = os.fspath(model)
    output = Path(output).expanduser().absolute()
    bundle.refuse_existing(output, overwrite)  # before minutes of work, not after
    config = load_config(model)
    progress(f"loading {model} ({config.model_type})")
    torch_model = load_model(model)
    options = {"opset": opset, "ir_version": ir_version, "external_data_threshold": external_data_threshold}

    with bundle.staged(output, overwrite) as work:
        for line in bundle.copy_checkpoint_files(
            model, work, image_seq_len=vision.geometry(config)["tokens_per_image"],
            generation_config=torch_model.generation_config,
        ):
            progress(f"warning: {line}")
        written = {}
        for graph in GRAPHS:
            fused = attention == "fused" and graph is not embed
            progress(f"exporting {graph.NAME}{' (fused attention)' if fused else ''} ...")
            exporter = fused_decoder.export if fused and graph is decoder else graph.export
            extra = {"fused": fused} if graph is vision else {}
            written[graph.NAME] = w = exporter(torch_model, work / "onnx", **options, **extra)
            progress(f"{graph.NAME}: exported in {w.seconds:.1f} s")
            if w.info and w.info.get("why"):
                progress(f"warning: {graph.NAME} keeps its traced attention: {w.info['why']}")

        if verify:
            parity = {}
            for name, w in written.items():
                progress(f"verifying {name} against PyTorch ...")
                parity[name] = r = verification.verify_graph(name, torch_model, w.path,
                                                             unpadded_only=name == decoder.NAME and attention == "fused")
                progress(f"{name}: max |diff| {r['max_abs_diff']:.2e}, mean {r['mean_abs_diff']:.2e}, "
                         f"tolerance {r['tolerance']:.2e} -> {'ok' if r['passed'] else 'FAILED'}")
            verification.check(parity)
        else:
            progress("WARNING: verification skipped (--no-verify): these graphs were NOT compared with PyTorch")
            parity = {"skipped": "--no-verify"}

        bundle.write_manifest(work, _manifest(model, torch_model, written, parity, opset, ir_version, attention))
    progress(f"bundle written to {output}")
    return output


def _vision_attention(info: dict | None) -> dict:
    info = info or {"attention": "plain"}
    return {"attention": info["attention"], "attention_check": {k: v for k, v in info.items() if k != "attention"}}


def _manifest(model: str, torch_model, written: dict, parity: dict, opset: int, ir_version: int,
              attention: str) -> dict:
    config = torch_model.config
    text = decoder.text_geometry(config)
    text.update(past_key_name=decoder.PAST_KEY, past_value_name=decoder.PAST_VALUE,
                present_key_name=decoder.PRESENT_KEY, present_value_name=decoder.PRESENT_VALUE,
                attention=attention)
    graphs = {}
    for name, w in written.items():
        folder = w.path.parent.parent
        external = w.external_data.relative_to(folder).as_posix() if w.external_data else None
        graphs[name] = {PRECISION: w.spec.to_json(w.path.relative_to(folder).as_posix(), external)}
    return {
        "source": {"model": model, "model_type": config.model_type, "architecture": type(torch_model).__name__},
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "versions": {("smolvlm_edge" if p == "smolvlm-edge" else p): metadata.version(p) for p in _PACKAGES},
        "onnx": {"opset": opset, "ir_version": ir_version},
        "graphs": graphs,
        "text": text,
        # "fused": MultiHeadAttention + FastGelu (export/vision_fusion.py); "plain": the traced standard ops
        "vision": {**vision.geometry(config), **_vision_attention(written[vision.NAME].info)},
        "parity": parity,
        "export_seconds": {name: round(w.seconds, 2) for name, w in written.items()},
    }
