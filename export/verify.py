"""Parity checks: run each written graph in onnxruntime (CPU) and compare it with the PyTorch model."""
from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from smolvlm_edge.export import decoder, embed, vision
from smolvlm_edge.runtime.errors import ExportError

# The one tolerance table. A graph passes when, over every tensor compared,
# max |onnx - pytorch| <= factor * max(1, max |pytorch|).
TOLERANCE = {
    vision.NAME: 1e-4,
    embed.NAME: 1e-4,
    decoder.NAME: 1e-4,
}


class _Diff:
    """Accumulates |onnx - pytorch| over several tensors of one graph."""

    def __init__(self):
        self.max = 0.0
        self.total = 0.0
        self.count = 0
        self.ref_max = 0.0

    def add(self, got, ref) -> None:
        import numpy as np

        ref = np.asarray(ref, dtype=np.float64)
        diff = np.abs(np.asarray(got, dtype=np.float64) - ref)
        self.max = max(self.max, float(diff.max()) if diff.size else 0.0)  # NaN propagates: fails below
        if np.isnan(diff).any():
            self.max = float("nan")
        self.total += float(diff.sum())
        self.count += diff.size
        self.ref_max = max(self.ref_max, float(np.abs(ref).max()) if ref.size else 0.0)

    def result(self, factor: float) -> dict:
        tolerance = factor * max(1.0, self.ref_max)
        return {
            "max_abs_diff": self.max,
            "mean_abs_diff": self.total / max(1, self.count),
            "tolerance": tolerance,
            "passed": bool(self.max <= tolerance),  # False for NaN
        }


def _session(path: Path):
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def vision_inputs(config, seed: int = 0):
    """2 prompts x 2 frames; prompt 1's second frame is all-zero padding; partial masks on two frames."""
    import torch

    size = config.vision_config.image_size
    gen = torch.Generator().manual_seed(seed)
    pixel_values = torch.randn(2, 2, 3, size, size, generator=gen)
    mask = torch.ones(2, 2, size, size, dtype=torch.bool)
    for b, i in ((0, 0), (1, 0)):  # top-left rectangles of random size, as image padding gives
        rows, cols = torch.randint(1, size + 1, (2,), generator=gen).tolist()
        mask[b, i] = False
        mask[b, i, :rows, :cols] = True
    pixel_values[1, 1] = 0.0
    mask[1, 1] = False
    return pixel_values, mask


def verify_vision(model, path: Path, diff: _Diff) -> None:
    import torch

    pixel_values, mask = vision_inputs(model.config)
    with torch.no_grad():
        ref = torch.cat(list(model.model.get_image_features(pixel_values, mask).pooler_output), dim=0)
    (got,) = _session(path).run(None, {"pixel_values": pixel_values.numpy(), "pixel_attention_mask": mask.numpy()})
    if got.shape[0] * got.shape[1] != ref.shape[0]:
        raise ExportError(f"{vision.NAME}: the graph returned {got.shape[0]} frames of {got.shape[1]} tokens, "
                          f"PyTorch {ref.shape[0]} tokens (padding frames not dropped the same way)")
    diff.add(got.reshape(ref.shape), ref.numpy())


def verify_embed(model, path: Path, diff: _Diff) -> None:
    import torch

    (ids,) = embed.dummy_inputs(model.config, batch=2, length=7)
    ids[0, 3] = model.config.image_token_id
    with torch.no_grad():
        ref = model.get_input_embeddings()(ids)
    (got,) = _session(path).run(None, {"input_ids": ids.numpy()})
    diff.add(got, ref.numpy())


def decoder_steps(config, seed: int = 0, prefill: int = 9, pad: int = 3):
    """A left-padded prefill (batch 2, row 0 padded by `pad`) and one decode step: (ids, mask, positions) each."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    vocab = config.text_config.vocab_size
    mask = torch.ones(2, prefill, dtype=torch.int64)
    mask[0, :pad] = 0
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # what generate() feeds
    step_mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.int64)], dim=1)
    step_positions = positions[:, -1:] + 1
    return [
        (torch.randint(0, vocab, (2, prefill), generator=gen), mask, positions),
        (torch.randint(0, vocab, (2, 1), generator=gen), step_mask, step_positions),
    ]


def verify_decoder(model, path: Path, diff: _Diff, unpadded_only: bool = False) -> None:
    """Prefill with an empty past, then one decode step fed the graph's own presents.

    `unpadded_only`: feed only the row without left padding (the fused graph takes no padding).

    Only attended positions are compared: at left-padding positions (queries that see no key)
    PyTorch's SDPA returns zeros and the exported graph a uniform average; neither is ever used.
    """
    import numpy as np
    import torch
    from transformers import DynamicCache

    g = decoder.text_geometry(model.config)
    session = _session(path)
    past_names = decoder.kv_names(g["num_layers"], "past")
    rows = slice(1, 2) if unpadded_only else slice(None)
    steps = [tuple(t[rows] for t in step) for step in decoder_steps(model.config)]
    past = {n: np.zeros((steps[0][0].shape[0], g["num_kv_heads"], 0, g["head_dim"]), np.float32) for n in past_names}
    cache = DynamicCache(config=model.config.text_config)
    for ids, mask, positions in steps:
        with torch.no_grad():
            embeds = model.get_input_embeddings()(ids)
            out = model.model.text_model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                                         cache=cache, use_cache=True)
            ref_logits = model.lm_head(out.last_hidden_state).numpy()
        feeds = {"inputs_embeds": embeds.numpy(), "attention_mask": mask.numpy(),
                 "position_ids": positions.numpy(), **past}
        if "num_logits_to_keep" in {i.name for i in session.get_inputs()}:  # the fused graph: every position
            feeds["num_logits_to_keep"] = np.array(0, dtype=np.int64)
        got = session.run(None, feeds)
        attended = mask.numpy().astype(bool)  # [B, total]
        new = attended[:, -ids.shape[1]:]  # [B, S]
        diff.add(got[0][new], ref_logits[new])
        refs = [t.numpy() for layer in out.cache.layers for t in (layer.keys, layer.values)]
        for got_kv, ref_kv in zip(got[1:], refs):
            # [B, H, T, D] -> [B, T, H, D] so the attended mask selects along the sequence axis
            diff.add(got_kv.transpose(0, 2, 1, 3)[attended], ref_kv.transpose(0, 2, 1, 3)[attended])
        past = dict(zip(past_names, got[1:]))


VERIFIERS: dict[str, Callable] = {
    vision.NAME: verify_vision,
    embed.NAME: verify_embed,
    decoder.NAME: verify_decoder,
}


def verify_graph(name: str, model, path: Path, unpadded_only: bool = False) -> dict:
    """Measured differences of one graph against PyTorch (does not raise on a failed tolerance)."""
    diff = _Diff()
    if unpadded_only:
        VERIFIERS[name](model, path, diff, unpadded_only=True)
    else:
        VERIFIERS[name](model, path, diff)
    return diff.result(TOLERANCE[name])


def check(results: dict[str, dict]) -> None:
    """Raise ExportError listing every graph's figures when any graph is out of tolerance."""
    failed = [name for name, r in results.items() if not r["passed"]]
    if failed:
        lines = [f"{name}: max |diff| {r['max_abs_diff']:.3g}, mean {r['mean_abs_diff']:.3g}, "
                 f"tolerance {r['tolerance']:.3g} -> {'ok' if r['passed'] else 'FAILED'}"
                 for name, r in results.items()]
        raise ExportError(
            f"the ONNX graphs {', '.join(failed)} disagree with PyTorch beyond the tolerance; "
            "no bundle was written.\n  " + "\n  ".join(lines)
        )
