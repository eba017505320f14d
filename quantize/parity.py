"""`smolvlm-edge parity`: how far a build drifts from the PyTorch original and from the fp32 build.

Per graph (image features, embeddings, logits): max/mean absolute error and cosine. End to end:
teacher-forced next-token agreement, KL and perplexity over a fixed English text, and free-running
greedy continuations compared token by token. Pass or fail against one table of thresholds.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Callable

import numpy as np

from smolvlm_edge.runtime.errors import SmolVLMEdgeError

from .metrics import sequence_match, teacher_forced, tensor_errors
from .thresholds import check_thresholds, thresholds_for

DEFAULT_TEXT = Path(__file__).with_name("data") / "reference_text.txt"
DEFAULT_PROMPTS = ("What is in this image?",)


class ParityError(SmolVLMEdgeError):
    """The parity report could not be made (bad inputs); a failing build is a result, not this error."""


class OnnxBuild:
    """One precision of a bundle, asked the same questions as the PyTorch reference."""

    def __init__(self, bundle: Path, precision: str | dict, threads: int | None = None, provider: str = "cpu",
                 **provider_settings):
        from smolvlm_edge.runtime import SmolVLM

        self.vlm = SmolVLM(bundle, precision=precision, threads=threads, provider=provider, **provider_settings)

    def image_features(self, pixel_values, pixel_attention_mask):
        features = self.vlm.run_vision(pixel_values, pixel_attention_mask)
        return features.reshape(-1, features.shape[-1])

    def embeddings(self, ids):
        return self.vlm.embed(ids)

    def logits(self, ids):
        """Teacher-forced logits [T, V] for one text-only row of ids [1, T]."""
        mask = np.ones_like(ids)
        positions = np.arange(ids.shape[1], dtype=np.int64)[None]
        logits, _ = self.vlm.decoder(self.vlm.embed(ids), mask, positions, self.vlm.decoder.empty_cache(1))
        return logits[0]

    def greedy(self, prompt: str, images: list, new_tokens: int, split: bool = False) -> list[int]:
        return self.vlm.generate(prompt, images, max_new_tokens=new_tokens, do_sample=False,
                                 do_image_splitting=split).token_ids


def load_inputs(vlm, images: list, text_file: Path, max_text_tokens: int):
    """Pixels (one global frame per image), the text's ids, from the bundle's own processors."""
    from smolvlm_edge.runtime.images import load_image

    pics = [load_image(p) for p in images]
    processed = vlm.images([pics], do_image_splitting=False) if pics else None
    if not text_file.is_file():
        raise ParityError(f"reference text not found: {text_file}")
    ids = vlm.text.encode(text_file.read_text())[:max_text_tokens]
    if len(ids) < 2:
        raise ParityError(f"reference text {text_file} gives {len(ids)} tokens; it needs at least 2")
    return pics, processed, np.array([ids], dtype=np.int64)


def compare(build, reference, pics, processed, ids, prompts, new_tokens) -> dict:
    """Every measure of `build` against one `reference` (PyTorch or the fp32 build)."""
    graphs = {}
    if processed is not None:
        graphs["vision_encoder"] = tensor_errors(
            build.image_features(processed.pixel_values, processed.pixel_attention_mask),
            reference.image_features(processed.pixel_values, processed.pixel_attention_mask))
    graphs["embed_tokens"] = tensor_errors(build.embeddings(ids), reference.embeddings(ids))
    got_logits, ref_logits = build.logits(ids), reference.logits(ids)
    graphs["decoder_model_merged"] = tensor_errors(got_logits, ref_logits)
    forced = teacher_forced(got_logits[:-1], ref_logits[:-1], ids[0, 1:])
    free = [
        {"prompt": p, **sequence_match(build.greedy(p, pics, new_tokens), reference.greedy(p, pics, new_tokens))}
        for p in prompts
    ]
    return {"graphs": graphs, "teacher_forced": forced, "greedy": free}


def run_parity(
    bundle: str | Path,
    precision: str,
    *,
    reference: str | None = None,
    images: tuple = (),
    prompts: tuple = DEFAULT_PROMPTS,
    text_file: Path = DEFAULT_TEXT,
    max_text_tokens: int = 320,
    new_tokens: int = 32,
    threads: int | None = None,
    provider: str = "cpu",
    provider_settings: dict | None = None,
    progress: Callable[[str], None] = print,
) -> dict:
    """Measure `precision` of `bundle` against PyTorch (when available) and the fp32 build; return the report.

    The build runs on `provider` (with SmolVLM's `provider_options` / `fallback` in `provider_settings`); the
    fp32 build it is compared with runs on the CPU, as PyTorch does, so a provider's own errors show."""
    bundle = Path(bundle)
    started = time.perf_counter()
    progress(f"loading the {precision} build of {bundle}")
    build = OnnxBuild(bundle, precision, threads, provider, **(provider_settings or {}))
    sample = list(images) or [str(_sample_image(bundle))]
    pics, processed, ids = load_inputs(build.vlm, sample, Path(text_file), max_text_tokens)
    report = {"bundle": str(bundle), "precision": precision, "providers": build.vlm.providers, "images": sample,
              "prompts": list(prompts), "text_file": str(text_file), "text_tokens": int(ids.shape[1]), "against": {}}

    references = {}
    if precision != "fp32":
        references["fp32"] = lambda: OnnxBuild(bundle, "fp32", threads)
    source = reference or build.vlm.bundle.manifest.get("source", {}).get("model")
    torch_reason = _torch_unavailable(source)
    if torch_reason is None:
        from smolvlm_edge.export.reference import TorchReference

        references["pytorch"] = lambda: TorchReference(str(source))
    else:
        report["pytorch_skipped"] = torch_reason
        progress(f"warning: no PyTorch comparison: {torch_reason}")
    if not references:
        raise ParityError(f"nothing to compare the {precision} build with: {torch_reason}")

    for name, make in references.items():
        progress(f"comparing with {name} ...")
        t0 = time.perf_counter()
        report["against"][name] = compare(build, make(), pics, processed, ids, prompts, new_tokens)
        progress(f"{name}: done in {time.perf_counter() - t0:.1f} s")

    limits = thresholds_for(precision)
    report["thresholds"] = limits
    report["failures"] = [f"vs {name}: {f}" for name, result in report["against"].items()
                          for f in check_thresholds(result, limits)]
    report["passed"] = not report["failures"]
    report["seconds"] = round(time.perf_counter() - started, 1)
    return report


def _torch_unavailable(source: str | None) -> str | None:
    """Why the PyTorch original cannot be loaded here, or None when it can."""
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return "torch/transformers are not installed (pip install 'smolvlm-edge[export]')"
    if not source:
        return "the manifest names no source checkpoint; pass --reference"
    path = Path(source)
    if not path.exists() and (path.is_absolute() or source.count("/") != 1):
        return f"the source checkpoint {source} is not on this machine; pass --reference"
    return None


def _sample_image(bundle: Path) -> Path:
    from smolvlm_edge.export.demo import cache_dir, sample_image

    return sample_image(cache_dir() / "sample.png")
