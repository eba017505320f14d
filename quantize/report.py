"""The parity report on disk: one JSON record and a Markdown page a person can read."""
from __future__ import annotations

import json
from pathlib import Path


def write_report(report: dict, output_dir: Path) -> tuple[Path, Path]:
    """Write `parity_{precision}.json` and `.md` into `output_dir`; return both paths."""
    output_dir.mkdir(parents=True, exist_ok=True)
    stem = f"parity_{report['precision']}"
    json_path, md_path = output_dir / f"{stem}.json", output_dir / f"{stem}.md"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    md_path.write_text(markdown(report))
    return json_path, md_path


def markdown(report: dict) -> str:
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines = [
        f"# Parity of the `{report['precision']}` build: {verdict}",
        "",
        f"Bundle `{report['bundle']}` on {', '.join(report.get('providers') or ['CPUExecutionProvider'])}; "
        f"{report['text_tokens']} tokens of `{Path(report['text_file']).name}` "
        f"teacher-forced; prompts {report['prompts']}; images {report['images']}.",
        "",
    ]
    if "pytorch_skipped" in report:
        lines += [f"No PyTorch comparison: {report['pytorch_skipped']}.", ""]
    for name, result in report["against"].items():
        lines += [f"## Against {name}", "", "| graph | max abs error | mean abs error | cosine |", "|---|---|---|---|"]
        for graph, e in result["graphs"].items():
            lines.append(f"| {graph} | {e['max_abs_error']:.3g} | {e['mean_abs_error']:.3g} | {e['cosine']:.6f} |")
        f = result["teacher_forced"]
        lines += [
            "",
            f"Teacher-forced over {f['positions']} positions: top-1 agreement {100 * f['top1_agreement']:.1f} %, "
            f"mean KL {f['kl_mean']:.4g} (max {f['kl_max']:.3g}), perplexity {f['perplexity']:.3f} "
            f"(reference {f['reference_perplexity']:.3f}).",
            "",
            "| prompt | greedy identical | first divergence | tokens |",
            "|---|---|---|---|",
        ]
        for g in result["greedy"]:
            lines.append(f"| {g['prompt']} | {g['identical']} | {g['first_divergence']} | {g['length']} / {g['reference_length']} |")
        lines.append("")
    t = report["thresholds"]
    lines += [
        f"## Thresholds (row `{t['row']}`)",
        "",
        f"cosine >= {t['cosine_min']}, top-1 >= {t['top1_min']}, mean KL <= {t['kl_mean_max']}, "
        f"greedy identical: {t['greedy_identical']}.",
        "",
    ]
    lines += [f"- {f}" for f in report["failures"]] or ["All thresholds met."]
    return "\n".join(lines) + "\n"
