"""Quality of each quantization recipe on the demo checkpoint (real SmolLM2-135M LM), as a Markdown table.

    python -m benchmarks.quality [--bundle out/demo-bundle] [--work out/quality-bundle] [--recipes q4 int8 ...]

Copies the fp32 bundle, adds one build per recipe with `quantize_bundle`, and measures each against
the fp32 build: size on disk per graph and in total, teacher-forced top-1 agreement and mean KL over
the packaged English text, perplexity change, and greedy-continuation match on text prompts.
Prints one JSON record per recipe and the Markdown table; writes both under benchmarks/results/.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain why the sky is blue.")
# name -> (recipe, options): the rows of the table.
DEFAULT_ROWS = {
    "fp16": ("fp16", {}),
    "int8 (dynamic)": ("int8", {}),
    "int8 (weight-only)": ("int8", {"mode": "weight_only"}),
    "int8 (weight-only, accuracy_level 0)": ("int8", {"mode": "weight_only", "accuracy_level": 0}),
    "q4 (rtn)": ("q4", {"algorithm": "rtn"}),
    # onnxruntime-genai's builder default: RTN int4 everywhere, the lm_head and table too (benchmark peer genai:int4)
    "q4 (rtn, 4-bit lm_head and table: genai's recipe)": ("q4", {"algorithm": "rtn", "lm_head_bits": 4,
                                                                  "share_embeddings": False}),
    "q4 (hqq, 4-bit lm_head and table)": ("q4", {"lm_head_bits": 4, "share_embeddings": False}),
    "q4 (hqq)": ("q4", {}),
    "q4 (hqq, accuracy_level 0)": ("q4", {"accuracy_level": 0}),
    "q4f16 (hqq)": ("q4f16", {}),
    "q4f16 (hqq; vision hqq, blocks of 32)": ("q4f16", {"vision": {"algorithm": "hqq", "block_size": 32}}),
}


def graph_sizes(bundle: Path, manifest: dict, precision: str) -> dict:
    """MB on disk per graph; a file two graphs share (an embedding table) counts once, for its owner."""
    sizes = {}
    for graph in GRAPHS:
        entry = manifest["graphs"][graph].get(precision)
        if not entry:
            sizes[graph] = None
            continue
        extra = entry.get("external_data") or []
        files = [entry["file"], *([extra] if isinstance(extra, str) else extra)]
        sizes[graph] = sum((bundle / f).stat().st_size for f in files if Path(f).name.startswith(graph)) / 1e6
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("out/demo-bundle"), help="fp32 demo bundle (smolvlm-edge demo makes it)")
    parser.add_argument("--work", type=Path, default=Path("out/quality-bundle"), help="copy that receives the builds")
    parser.add_argument("--rows", nargs="+", default=list(DEFAULT_ROWS), help="table rows to build")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from smolvlm_edge.quantize.build import quantize_bundle
    from smolvlm_edge.quantize.metrics import sequence_match, teacher_forced
    from smolvlm_edge.quantize.parity import DEFAULT_TEXT, OnnxBuild

    if args.work.exists():
        shutil.rmtree(args.work)
    shutil.copytree(args.bundle, args.work, ignore=shutil.ignore_patterns("parity"))
    fp32 = OnnxBuild(args.work, "fp32", args.threads)
    ids = np.array([fp32.vlm.text.encode(DEFAULT_TEXT.read_text())], dtype=np.int64)
    ref_logits = fp32.logits(ids)
    ref_greedy = {p: fp32.greedy(p, [], args.new_tokens) for p in PROMPTS}
    manifest = json.loads((args.work / "manifest.json").read_text())
    records = [{"row": "fp32", "sizes_mb": graph_sizes(args.work, manifest, "fp32"), "top1": 1.0, "kl_mean": 0.0,
                "perplexity": teacher_forced(ref_logits[:-1], ref_logits[:-1], ids[0, 1:])["perplexity"],
                "greedy_identical": f"{len(PROMPTS)}/{len(PROMPTS)}"}]
    for row in args.rows:
        recipe, options = DEFAULT_ROWS[row]
        t0 = time.perf_counter()
        result = quantize_bundle(args.work, recipe, options=options, overwrite=True,
                                 calibration_prompts=PROMPTS, progress=lambda line: None)
        seconds = time.perf_counter() - t0
        precision = result.get("precision", recipe) if isinstance(result, dict) else recipe
        manifest = json.loads((args.work / "manifest.json").read_text())
        build = OnnxBuild(args.work, precision, args.threads)
        forced = teacher_forced(build.logits(ids)[:-1], ref_logits[:-1], ids[0, 1:])
        greedy = [sequence_match(build.greedy(p, [], args.new_tokens), ref_greedy[p]) for p in PROMPTS]
        record = {
            "row": row, "recipe": recipe, "options": options, "quantize_seconds": round(seconds, 1),
            "sizes_mb": graph_sizes(args.work, manifest, precision), "top1": forced["top1_agreement"],
            "kl_mean": forced["kl_mean"], "perplexity": forced["perplexity"],
            "greedy_identical": f"{sum(g['identical'] for g in greedy)}/{len(greedy)}",
            "first_divergence": [g["first_divergence"] for g in greedy], "positions": forced["positions"],
        }
        records.append(record)
        print(json.dumps(record), flush=True)
        del build
    table = markdown(records, records[0]["perplexity"], int(ids.shape[1]) - 1)
    print(table)
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "quality.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / "quality.md").write_text(table)


def markdown(records: list[dict], base_ppl: float, positions: int) -> str:
    lines = [
        f"| build | vision MB | embed MB | decoder MB | total MB | top-1 vs fp32 | mean KL | perplexity (fp32 {base_ppl:.2f}) | greedy match |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        s = r["sizes_mb"]
        total = sum(v for v in s.values() if v)
        cells = [f"{s[g]:.1f}" if s[g] else "fp32" for g in GRAPHS]
        lines.append(f"| {r['row']} | {' | '.join(cells)} | {total:.1f} | {100 * r['top1']:.1f} % | {r['kl_mean']:.4f} | "
                     f"{r['perplexity']:.2f} ({r['perplexity'] - base_ppl:+.2f}) | {r['greedy_identical']} |")
    lines.append(f"\nTeacher-forced over {positions} positions of `quantize/data/reference_text.txt`; greedy: "
                 f"{len(PROMPTS)} text prompts, 32 new tokens, identical to the fp32 build's.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
