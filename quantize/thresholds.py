"""The one table of parity thresholds per precision, and the check of a parity result against it.

Cosines are of image features, embeddings and logits; teacher-forced figures are over the
reference text; `greedy_identical` asks free-running greedy tokens to equal the reference's.
The quantized rows are the targets of the quantization issue on the demo checkpoint (real
SmolLM2-135M weights): int8 top-1 >= 98 %, int4 top-1 >= 95 % with mean KL <= 0.05.
"""
from __future__ import annotations

PARITY_THRESHOLDS: dict[str, dict] = {
    "fp32": {"cosine_min": 0.99999, "top1_min": 0.99, "kl_mean_max": 1e-4, "greedy_identical": True},
    "fp16": {"cosine_min": 0.999, "top1_min": 0.97, "kl_mean_max": 0.01, "greedy_identical": False},
    "int8": {"cosine_min": 0.99, "top1_min": 0.98, "kl_mean_max": 0.02, "greedy_identical": False},
    "q4": {"cosine_min": 0.98, "top1_min": 0.95, "kl_mean_max": 0.05, "greedy_identical": False},
    "qdq": {"cosine_min": 0.95, "top1_min": 0.90, "kl_mean_max": 0.1, "greedy_identical": False},
}
# Precisions that share a row: same arithmetic, different storage or compute type.
ALIASES = {"uint8": "int8", "quantized": "int8", "q4f16": "q4", "bnb4": "q4"}


def thresholds_for(precision: str | dict) -> dict:
    """The row of a precision; a per-graph mix takes its loosest graph's row, an unknown name the loosest row."""
    names = precision.values() if isinstance(precision, dict) else [precision]
    rows = [ALIASES.get(n, n) if ALIASES.get(n, n) in PARITY_THRESHOLDS else "qdq" for n in names]
    key = max(rows, key=list(PARITY_THRESHOLDS).index)  # the table is ordered strictest first
    return {"row": key, **PARITY_THRESHOLDS[key]}


def check_thresholds(result: dict, limits: dict) -> list[str]:
    """Failures (one line each) of one comparison result against one row of the table."""
    failures = []
    for graph, errors in result["graphs"].items():
        if errors["cosine"] < limits["cosine_min"]:
            failures.append(f"{graph} cosine {errors['cosine']:.6f} < {limits['cosine_min']}")
    forced = result["teacher_forced"]
    if forced["top1_agreement"] < limits["top1_min"]:
        failures.append(f"teacher-forced top-1 {forced['top1_agreement']:.3f} < {limits['top1_min']}")
    if forced["kl_mean"] > limits["kl_mean_max"]:
        failures.append(f"teacher-forced mean KL {forced['kl_mean']:.4g} > {limits['kl_mean_max']}")
    if limits["greedy_identical"]:
        for run in result["greedy"]:
            if not run["identical"]:
                failures.append(f"greedy tokens differ from position {run['first_divergence']} for {run['prompt']!r}")
    return failures
