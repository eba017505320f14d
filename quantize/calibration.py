"""Calibration inputs for data-driven recipes, made with the bundle's own processors and fp32 embed_tokens graph.

Decoder: each prompt rendered with the chat template, embedded by embed_tokens, empty past, mask of
ones, positions 0..T-1. Vision encoder: each image as one global frame (no tiles). Feeds are dicts
of graph input name to array, as onnxruntime calibration readers yield them.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from smolvlm_edge.runtime.errors import SmolVLMEdgeError

from . import QuantizeError
from .recipes import QuantizeContext

MAX_PROMPT_TOKENS = 256


def check_calibration(kind: str, context: QuantizeContext) -> None:
    """Refuse an empty or unreadable calibration set before anything is written."""
    if kind == "prompts":
        prompts = [p for p in context.calibration_prompts if isinstance(p, str) and p.strip()]
        if not prompts or len(prompts) != len(context.calibration_prompts):
            raise QuantizeError(f"this build needs calibration prompts (non-empty strings); got "
                                f"{list(context.calibration_prompts)!r}")
    elif kind == "images":
        from smolvlm_edge.runtime.images import load_image

        if not context.calibration_images:
            raise QuantizeError("this build needs calibration images for the vision encoder; none were given")
        for path in context.calibration_images:
            try:
                load_image(path)
            except SmolVLMEdgeError as exc:
                raise QuantizeError(f"calibration image {path} cannot be read: {exc}") from exc
    else:
        raise ValueError(f"unknown calibration kind {kind!r}")


def calibration_feeds(graph: str, context: QuantizeContext) -> list[dict[str, np.ndarray]]:
    if graph == "decoder_model_merged":
        return decoder_feeds(context.bundle, context.calibration_prompts)
    if graph == "vision_encoder":
        return vision_feeds(context.bundle, context.calibration_images)
    raise QuantizeError(f"{graph} takes no calibration inputs")


def vision_feeds(bundle: Path, images) -> list[dict[str, np.ndarray]]:
    from smolvlm_edge.runtime.images import ImageProcessor, load_image

    processor = ImageProcessor.from_dir(bundle)
    feeds = []
    for path in images:
        out = processor([[load_image(path)]], do_image_splitting=False)
        feeds.append({"pixel_values": out.pixel_values.astype(np.float32),
                      "pixel_attention_mask": out.pixel_attention_mask.astype(bool)})
    return feeds


def decoder_feeds(bundle: Path, prompts, max_tokens: int = MAX_PROMPT_TOKENS) -> list[dict[str, np.ndarray]]:
    from smolvlm_edge.runtime.bundle import open_bundle
    from smolvlm_edge.runtime.prompt import TextProcessor
    from smolvlm_edge.runtime.providers import make_session

    opened = open_bundle(bundle, check_files=False)
    text = TextProcessor.from_dir(bundle)
    embed = make_session(opened.graph_file("embed_tokens", "fp32"), ["CPUExecutionProvider"])
    entry = opened.manifest["graphs"]["decoder_model_merged"]["fp32"]
    named = ("inputs_embeds", "attention_mask", "position_ids", "num_logits_to_keep")
    past = [t for t in entry["inputs"] if t["name"] not in named]
    keep = any(t["name"] == "num_logits_to_keep" for t in entry["inputs"])  # the fused decoder's scalar
    feeds = []
    for prompt in prompts:
        ids = np.array([text.encode(text.render(text.messages_for(prompt, 0)))[:max_tokens]], dtype=np.int64)
        length = ids.shape[1]
        feed = {
            "inputs_embeds": embed.run(["inputs_embeds"], {"input_ids": ids})[0],          # [1, T, D]
            "attention_mask": np.ones((1, length), dtype=np.int64),
            "position_ids": np.arange(length, dtype=np.int64)[None],
            **({"num_logits_to_keep": np.array(0, dtype=np.int64)} if keep else {}),
        }
        for t in past:  # [batch_size, kv_heads, past_sequence_length, head_dim], empty past
            feed[t["name"]] = np.zeros((1, int(t["shape"][1]), 0, int(t["shape"][3])), dtype=np.float32)
        feeds.append(feed)
    return feeds


def probe_values(model, names: list[str], feeds: list[dict]):
    """Yield, per feed, the values of the float graph's tensors `names` (run as extra outputs of one session;
    the model is not copied, a decoder is large, and gets its outputs back before the first value)."""
    import onnx
    import onnxruntime as ort

    outputs = len(model.graph.output)
    model.graph.output.extend(onnx.helper.make_tensor_value_info(name, onnx.TensorProto.FLOAT, None) for name in names)
    options = ort.SessionOptions()
    options.log_severity_level = 3
    try:
        session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    finally:
        del model.graph.output[outputs:]
    wanted = {i.name for i in session.get_inputs()}
    for feed in feeds:
        yield session.run(names, {k: v for k, v in feed.items() if k in wanted})
