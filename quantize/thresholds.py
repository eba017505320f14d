"""Applying the one table of parity thresholds (`recipes.PARITY_THRESHOLDS`) to a parity result.

The table's floors catch broken builds; the quantization issue's real-weight quality targets
(demo checkpoint: int4 top-1 >= 95 % with mean KL <= 0.05, int8 top-1 >= 98 %) are measured by
`benchmarks/quality.py` and reported beside it.
"""
from __future__ import annotations

from .recipes import PARITY_THRESHOLDS

# Strictest first: a per-graph mix is judged by the loosest row among its graphs.
_ORDER = ("fp32", "fp16", "int8", "uint8", "quantized", "q4f16", "q4", "bnb4", "qdq")


def thresholds_for(precision: str | dict) -> dict:
    """The row of a precision; a per-graph mix takes its loosest graph's row, an unknown name the loosest row."""
    names = precision.values() if isinstance(precision, dict) else [precision]
    rows = [n if n in PARITY_THRESHOLDS else "qdq" for n in names]
    key = max(rows, key=lambda r: _ORDER.index(r) if r in _ORDER else len(_ORDER))
    return {"row": key, **PARITY_THRESHOLDS[key]}


def check_thresholds(result: dict, limits: dict) -> list[str]:
    """Failures (one line each) of one comparison result against one row of the table."""
    failures = []
    for graph, errors in result["graphs"].items():
        floor = limits.get("graph_cosine_min", {}).get(graph, limits["cosine_min"])
        if errors["cosine"] < floor:
            failures.append(f"{graph} cosine {errors['cosine']:.6f} < {floor}")
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
