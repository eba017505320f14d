"""The one table of quantization recipes (name, suffix, preset, function, options) and of parity thresholds.

A recipe writes one quantized graph from the bundle's fp32 graph. Every recipe function has the
same signature (quantize/qdq.py's `quantize_qdq` too):

    def quantize_xxx(src: Path, dst: Path, graph: str, options: dict, context: QuantizeContext) -> dict

`src` is the fp32 graph file, `dst` the file to write (weights in `dst.name + "_data"` beside it
when they pass 2 GB), `graph` one of GRAPH_NAMES; the returned dict (what was done) goes to the
manifest as `info`. Functions are imported only when used, so a missing module (or a missing
torch for HQQ) breaks only the recipes that need it.
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from smolvlm_edge.runtime.bundle import GRAPH_NAMES

from . import QuantizeError

NONE = "none"  # a per-graph choice: leave that graph alone


@dataclass(frozen=True)
class QuantizeContext:
    """What a recipe may read besides its graph: the bundle (processor files) and the calibration set."""

    bundle: Path                 # the bundle folder (read-only): processor files for calibration
    calibration_images: tuple[Path, ...] = ()
    calibration_prompts: tuple[str, ...] = ()


@dataclass(frozen=True)
class Option:
    """One documented recipe option: default, allowed values (or type) and what it does."""

    default: Any
    doc: str
    choices: tuple = ()
    kind: type | None = None

    def check(self, recipe: str, name: str, value):
        if self.choices and value not in self.choices:
            raise QuantizeError(f"option {name}={value!r} of recipe {recipe} must be one of {list(self.choices)}")
        if self.kind is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # alpha=1 means 1.0
        if self.kind is not None and value is not None and (
                not isinstance(value, self.kind) or (self.kind is int and isinstance(value, bool))):
            raise QuantizeError(f"option {name}={value!r} of recipe {recipe} must be a {self.kind.__name__}")
        return value


# What a graph needs to be calibrated: "images" (vision), "prompts" (decoder), or nothing.
Calibration = Callable[[str, dict], "str | None"]


def _never(graph: str, options: dict) -> None:
    return None


def _gptq_calibration(graph: str, options: dict) -> str | None:
    if options.get("algorithm") != "gptq":
        return None
    return {"vision_encoder": "images", "decoder_model_merged": "prompts"}.get(graph)


def _static_calibration(graph: str, options: dict) -> str | None:
    return {"vision_encoder": "images", "decoder_model_merged": "prompts"}.get(graph)


@dataclass(frozen=True)
class Recipe:
    """One row of the table. `preset` maps each graph to the recipe it gets by default (or "none")."""

    name: str
    suffix: str
    summary: str
    function: str                       # "module:function", imported on first use
    preset: dict[str, str]
    options: dict[str, Option] | None   # None: the module's OPTIONS (a recipe written elsewhere)
    calibration: Calibration = _never
    graph_defaults: dict[str, dict] | None = None  # per-graph defaults that differ from the options'

    def load(self) -> Callable[..., dict]:
        module, _, name = self.function.partition(":")
        try:
            return getattr(importlib.import_module(module), name)
        except (ImportError, AttributeError) as exc:
            raise QuantizeError(f"recipe {self.name} is not available here: {exc}") from exc

    def option_table(self) -> dict[str, Option]:
        if self.options is not None:
            return self.options
        module = self.function.partition(":")[0]
        try:
            return dict(getattr(importlib.import_module(module), "OPTIONS", {}))
        except ImportError as exc:
            raise QuantizeError(f"recipe {self.name} is not available here: {exc}") from exc

    def resolve_options(self, given: dict, graph: str | None = None) -> dict:
        """Defaults filled in and every value checked; an unknown name is refused with the list of known ones."""
        table = self.option_table()
        unknown = sorted(set(given) - set(table))
        if unknown:
            known = ", ".join(f"{k} (default {o.default!r})" for k, o in table.items()) or "none"
            raise QuantizeError(f"unknown option {', '.join(unknown)} for recipe {self.name}; its options: {known}")
        defaults = {k: o.default for k, o in table.items()} | (self.graph_defaults or {}).get(graph, {})
        return {k: o.check(self.name, k, given.get(k, defaults[k])) for k, o in table.items()}


def _everywhere(name: str) -> dict[str, str]:
    return {graph: name for graph in GRAPH_NAMES}


_W = "smolvlm_edge.quantize.weights"
_DYNAMIC = {
    "mode": Option("dynamic", "dynamic: onnxruntime quantize_dynamic (MatMulInteger; activations to uint8 per "
                   "tensor at run time, as transformers.js' files); weight_only: 8-bit block weights "
                   "(MatMulNBits bits=8, GatherBlockQuantized) with float32 activations, far closer to fp32 "
                   "on models with activation outliers; smooth (decoder only): SmoothQuant W8A8, int8 "
                   "activations per row through MatMulIntegerToFloat's integer kernels, calibrated on --calibration-prompts "
                   "(default: a built-in set), the fastest int8 prefill", choices=("dynamic", "weight_only", "smooth")),
    "alpha": Option(None, "smooth mode: SmoothQuant's migration strength (0: none, 1: all of the activation range "
                    "into the weights); none: per linear, the one of 0.3-0.8 whose int8 output is closest to float "
                    "on the calibration prompts (demo top-1 95.0 %, 0.5 everywhere 91.3 %)", kind=float),
    "per_channel": Option(False, "dynamic mode: one scale per output channel instead of per tensor", kind=bool),
    "reduce_range": Option(False, "dynamic mode: 7-bit weights (helps some CPUs without VNNI)", kind=bool),
    "block_size": Option(None, "weight_only mode: weights per scale (default 32)", choices=(None, 16, 32, 64, 128)),
    "accuracy_level": Option(4, "weight_only mode: MatMulNBits compute type of A (4: activations to int8 inside "
                             "the op, onnxruntime's only fast 8-bit kernel: top-1 95.2 % on the demo checkpoint; 0: "
                             "float, 98.3 %, but onnxruntime 1.32 then dequantizes every weight on every call, ~100x "
                             "slower)", choices=(0, 1, 2, 3, 4)),
}
_Q4 = {
    "block_size": Option(32, "weights per scale along K (a power of 2, >= 16)", choices=(16, 32, 64, 128, 256)),
    "symmetric": Option(None, "no zero points (rtn, gptq; default true); auto, search and hqq always store zero points",
                        choices=(None, True, False)),
    "accuracy_level": Option(4, "MatMulNBits compute type of A for the 4-bit weights: 0 unset, 1 fp32, 2 fp16, 3 "
                             "bf16, 4 int8 (fastest; demo top-1 96.3 % vs 98.8 % at 0, whose kernels are ~25 % "
                             "slower); an 8-bit lm_head always runs at 4 (onnxruntime's only fast 8-bit kernel)",
                             choices=(0, 1, 2, 3, 4)),
    "algorithm": Option("auto", "auto (a weight already on a 4-bit grid, as a GGUF Q4_1's, keeps it exactly; "
                        "every other is searched), search (per-block scale search, integer zero points: "
                        "HQQ's quality on float weights, onnxruntime's fast int4 kernels), rtn (round to "
                        "nearest), hqq (half-quadratic, float zero points run as a per-block bias: ~1.25x "
                        "slower decode), gptq (calibrated: needs calibration prompts for the decoder, images "
                        "for the vision encoder)", choices=("auto", "search", "rtn", "hqq", "gptq")),
    "embeddings_bits": Option(4, "bits of the embedding table (Gather) and, unless lm_head_bits says otherwise, "
                              "of the lm_head MatMul", choices=(4, 8)),
    "lm_head_bits": Option(8, "bits of the lm_head MatMul (8: MatMulNBits bits=8, symmetric +-127, blocks of 32; "
                           "4-bit logits lose ~20 points of top-1 on SmolLM2); none: as embeddings_bits",
                           choices=(None, 4, 8)),
    "scales": Option("float16", "how the float32 builds (q4) store int4 scales and float zero points: float16 "
                     "(+ a Cast onnxruntime folds at load: q4f16's size, float32 compute; sessions must keep graph "
                     "optimizations on: onnxruntime 1.32 computes wrong outputs from it under ORT_DISABLE_ALL) "
                     "or float32; q4f16 is float16 throughout either way", choices=("float16", "float32")),
    "share_embeddings": Option(True, "when the embedding table equals the lm_head (tied or copied), embed_tokens "
                               "reads the decoder's 8-bit lm_head blocks instead of storing its own table "
                               "(the table is stored once: -16 MB on the 256M model; embeddings at 8 bits)",
                               kind=bool),
}

# The vision tower is searched in blocks of 32 (int4_grid.search_grid): on the demo checkpoint's
# SigLIP-B tower, image features at cosine 0.978 with fp32 (59.3 MB), where RTN in blocks of 128 (53.5 MB)
# gave 0.962 and failed the q4 parity floor (0.97), RTN/32 0.972, HQQ/32 0.977 (63.6 MB), search/64 0.968.
# It runs ~1.2x slower than RTN/128 (963 vs 785 ms per 512x512 frame, 2 threads), still below fp32's 1111.
_VISION_Q4 = {"vision_encoder": {"algorithm": "search", "block_size": 32}}

RECIPES: dict[str, Recipe] = {r.name: r for r in (
    Recipe("fp16", "_fp16", "float16 weights and compute; float32 inputs, outputs and KV cache",
           f"{_W}:quantize_fp16", _everywhere("fp16"), {}),
    Recipe("q4f16", "_q4f16", "int4 block weights (as q4) with float16 elsewhere; float32 I/O",
           f"{_W}:quantize_q4f16", _everywhere("q4f16"), _Q4, _gptq_calibration, _VISION_Q4),
    Recipe("int8", "_int8", "int8 weights (MatMul, embedding Gather): dynamic (uint8 activations at run time, "
           "the default) or weight_only (float activations)",
           f"{_W}:quantize_int8", _everywhere("int8"), _DYNAMIC),
    Recipe("uint8", "_uint8", "as int8, with uint8 weights (zero points)",
           f"{_W}:quantize_uint8", _everywhere("uint8"), _DYNAMIC),
    Recipe("quantized", "_quantized", "transformers.js' q8: the same build as uint8 under its own suffix",
           f"{_W}:quantize_uint8", _everywhere("quantized"), _DYNAMIC),
    Recipe("q4", "_q4", "int4 block weights (MatMulNBits, GatherBlockQuantized), embedding and lm_head "
           "included; convolutions and position embeddings stay float32",
           f"{_W}:quantize_q4", _everywhere("q4"), _Q4, _gptq_calibration, _VISION_Q4),
    Recipe("bnb4", "_bnb4", "4-bit fp4/nf4 MatMul weights (MatMulBnb4); the embedding table as q4's int4",
           f"{_W}:quantize_bnb4", _everywhere("bnb4"), {
               "quant_type": Option("nf4", "4-bit code: nf4 (normal float) or fp4", choices=("nf4", "fp4")),
               "block_size": Option(64, "weights per absmax scale", choices=(16, 32, 64, 128, 256)),
           }),
    Recipe("qdq", "_qdq", "static QDQ (8-bit weights, 8/16-bit activations) calibrated on images and prompts, "
           "for NPUs (QNN HTP); the preset builds the vision encoder only (HTP refuses the dynamic-shape text "
           "graphs); --embed/--decoder qdq on a plain-attention export; see quantize/qdq.py",
           "smolvlm_edge.quantize.qdq:quantize_qdq", {**_everywhere(NONE), "vision_encoder": "qdq"}, None,
           _static_calibration),
)}

# Every precision a bundle can hold, fp32 first: the runtime's and the CLI's choices.
PRECISIONS: tuple[str, ...] = ("fp32", *RECIPES)
SUFFIXES: dict[str, str] = {"fp32": "", **{name: r.suffix for name, r in RECIPES.items()}}


def get_recipe(name: str) -> Recipe:
    if name not in RECIPES:
        raise QuantizeError(f"unknown recipe {name!r}; known recipes: {', '.join(RECIPES)}")
    return RECIPES[name]


def graph_file_name(graph: str, precision: str) -> str:
    """`onnx/`-relative file name of one graph at one precision (transformers.js naming)."""
    return f"{graph}{SUFFIXES[precision]}.onnx"


# Parity of a build against the fp32 build of the same bundle, per precision: the floors that every
# correct build passes, measured on the tiny random checkpoints of the tests (tests/test_quantize.py).
#   cosine_min        cosine of every graph's output (image features, embeddings, logits) with fp32's;
#   graph_cosine_min  tighter floors for the graphs that allow them (the decoder takes cosine_min);
#   top1_min, kl_mean_max  teacher-forced next-token argmax agreement and mean KL(fp32 || build) over
#                     128 tokens of quantize/data/reference_text.txt, through the build's embed + decoder;
#   greedy_identical  free-running greedy tokens must equal fp32's.
# Measured (256m | 2b tiny checkpoints; decoder cosine with fp32 embeddings fed):
#   fp16        vision 1.0000|1.0000 embed 1.0000|1.0000 decoder 1.0000|1.0000 top1 0.992|0.992 KL 2e-5|2e-5
#   int8        vision 0.9999|0.9998 embed 1.0000|1.0000 decoder 0.9958|0.9946 top1 0.81|0.84  KL 0.031|0.039
#   uint8       vision 0.9999|0.9999 embed 1.0000|1.0000 decoder 0.9955|0.9948 top1 0.80|0.87  KL 0.032|0.034
#   int8 weight_only vision 1.0000|1.0000 embed 1.0000|1.0000 decoder 0.9990|0.9989 top1 0.94|0.95 KL 0.007|0.011
#   uint8 weight_only vision 1.0000|1.0000 embed 1.0000|1.0000 decoder 0.9992|0.9992 top1 0.97|0.91 KL 0.006|0.007
#   q4 rtn      vision 0.9923|0.9894 embed 0.9966|0.9965 decoder 0.851|0.860   top1 0.23|0.33  KL 1.13|1.15
#   q4 hqq      vision 0.9950|0.9931 embed 0.9966|0.9965 decoder 0.886|0.860   top1 0.34|0.34  KL 0.92|1.00
#   q4 gptq     vision 0.9865|0.9818 embed 0.9966|0.9965 decoder 0.763|0.735   top1 0.23|0.24  KL 1.48|1.61
#   q4 8-bit emb vision 0.9950|0.9931 embed 1.0000|1.0000 decoder 0.889|0.862  top1 0.39|0.43  KL 0.59|0.69
#   q4f16 hqq   vision 0.9951|0.9930 embed 0.9966|0.9965 decoder 0.889|0.859   top1 0.34|0.33  KL 0.91|1.01
#   bnb4 nf4    vision 0.9923|0.9910 embed 0.9959|0.9956 decoder 0.830|0.830   top1 0.23|0.21  KL 1.29|1.32
#   bnb4 fp4    vision 0.9869|  -    embed 0.9959|  -    decoder 0.764|  -     top1 0.19|  -   KL 1.61| -
# Damaged q4 builds (256m): int4 nibbles swapped -> vision 0.07 / decoder 0.014, top1 0.008, KL 5.1 (fail);
# all vision scales x1.5 -> vision 0.83 (fails 0.97); all decoder scales x1.5 -> decoder 0.81, top1 0.30,
# KL 2.27: fails only kl_mean_max. The tiny random decoders (2 layers, weights of std 0.3) are far more
# sensitive to 4-bit noise than real weights, so the int4 floors are loose: they catch broken builds,
# not mediocre ones. Real-weight targets (demo checkpoint: int4 top-1 >= 0.95, KL <= 0.05; int8 top-1
# >= 0.98) are the quantization issue's and are stricter; judge quality there, not here.
_Q4_FLOORS = {"cosine_min": 0.6, "graph_cosine_min": {"vision_encoder": 0.97, "embed_tokens": 0.99},
              "top1_min": 0.1, "kl_mean_max": 2.0, "greedy_identical": False}
_INT8_FLOORS = {"cosine_min": 0.98, "graph_cosine_min": {"vision_encoder": 0.999, "embed_tokens": 0.999},
                "top1_min": 0.6, "kl_mean_max": 0.15, "greedy_identical": False}
PARITY_THRESHOLDS: dict[str, dict] = {
    "fp32": {"cosine_min": 0.99999, "graph_cosine_min": {}, "top1_min": 0.99, "kl_mean_max": 1e-4,
             "greedy_identical": True},
    "fp16": {"cosine_min": 0.999, "graph_cosine_min": {}, "top1_min": 0.9, "kl_mean_max": 0.01,
             "greedy_identical": False},
    "int8": _INT8_FLOORS, "uint8": _INT8_FLOORS, "quantized": _INT8_FLOORS,
    "q4": _Q4_FLOORS, "q4f16": _Q4_FLOORS, "bnb4": _Q4_FLOORS,
    # Cosines as tests/test_qdq.py measures them on the tiny checkpoints (A16W8: vision >= 0.999, embed
    # >= 0.9999, decoder logits >= 0.98); the text floors are int8's (a qdq decoder is opt-in, plain exports only).
    "qdq": {"cosine_min": 0.98, "graph_cosine_min": {"vision_encoder": 0.999, "embed_tokens": 0.9999},
            "top1_min": 0.6, "kl_mean_max": 0.15, "greedy_identical": False},
}


def cosine_floor(precision: str, graph: str) -> float:
    """The cosine a graph's output must reach against fp32 at `precision`."""
    row = PARITY_THRESHOLDS[precision]
    return row["graph_cosine_min"].get(graph, row["cosine_min"])
