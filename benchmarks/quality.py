"""Quality of each quantization recipe on the demo checkpoint (real SmolLM2-135M LM), as a Markdown table.

    python -m benchmarks.quality [--bundle out/demo-bundle] [--work out/quality-bundle] [--rows ...] [--off-grid]

Copies the fp32 bundle, adds one build per recipe with `quantize_bundle`, and measures each against
the fp32 build: size on disk per graph and in total, teacher-forced top-1 agreement and mean KL over
the packaged English text, perplexity change, and greedy-continuation match on text prompts.
Prints one JSON record per recipe and the Markdown table; writes both under benchmarks/results/.

The demo's language weights were dequantized from a GGUF (Q4_1 layers, Q8_0 embedding), so they sit
exactly on 4-bit and 8-bit block grids that HQQ and the 8-bit lm_head recover. `--off-grid` first moves
the copy's text weights off those grids (`move_off_grid`), to rank the recipes as a float checkpoint
would (results/quality_off_grid.*).
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import numpy as np
from onnx import numpy_helper

GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
PROMPTS = ("Write a short story about a lighthouse keeper.", "Explain why the sky is blue.")
# name -> (recipe, options): the rows of the table.
# The q4 rows vary the text decoder only; the vision graph keeps the preset's (searched, blocks of 32).
DEFAULT_ROWS = {
    "fp16": ("fp16", {}),
    "int8 (dynamic)": ("int8", {}),
    "int8 (weight-only)": ("int8", {"mode": "weight_only"}),
    "int8 (weight-only, accuracy_level 0)": ("int8", {"mode": "weight_only", "accuracy_level": 0}),
    # the recommended first-token build's text graphs: SmoothQuant W8A8 decoder, weight-only table
    "int8 (smooth decoder: W8A8)": ("int8", {"mode": "weight_only", "decoder": {"mode": "smooth"}}),
    "q4 (rtn)": ("q4", {"decoder": {"algorithm": "rtn"}}),
    "q4 (rtn, asymmetric)": ("q4", {"decoder": {"algorithm": "rtn", "symmetric": False}}),
    # onnxruntime-genai's builder default: RTN int4 everywhere, the lm_head and table too (benchmark peer genai:int4)
    "q4 (rtn, 4-bit lm_head and table: genai's recipe)": ("q4", {"decoder": {"algorithm": "rtn"}, "lm_head_bits": 4,
                                                                  "share_embeddings": False}),
    "q4 (hqq, 4-bit lm_head and table)": ("q4", {"decoder": {"algorithm": "hqq"}, "lm_head_bits": 4,
                                                 "share_embeddings": False}),
    "q4 (hqq)": ("q4", {"decoder": {"algorithm": "hqq"}}),
    "q4 (hqq, accuracy_level 0)": ("q4", {"decoder": {"algorithm": "hqq"}, "accuracy_level": 0}),
    "q4 (search)": ("q4", {"decoder": {"algorithm": "search"}}),
    "q4 (auto: the preset)": ("q4", {}),
    "q4f16 (auto)": ("q4f16", {}),
    "q4f16 (auto; vision hqq, blocks of 32)": ("q4f16", {"vision": {"algorithm": "hqq", "block_size": 32}}),
}
# --off-grid: the rows that differ in how they quantize the text weights.
OFF_GRID_ROWS = ("int8 (weight-only)", "int8 (smooth decoder: W8A8)", "q4 (rtn)", "q4 (rtn, asymmetric)", "q4 (rtn, 4-bit lm_head and table: genai's recipe)",
                 "q4 (hqq, 4-bit lm_head and table)", "q4 (hqq)", "q4 (search)", "q4 (auto: the preset)")
BLOCK = 32  # GGUF's Q4_1 and Q8_0 block


def move_off_grid(bundle: Path, seed: int = 0) -> dict:
    """Add uniform noise of +-half a grid step to the fp32 text weights of `bundle` (a scratch copy), in place.

    Every decoder MatMul weight but the lm_head gets +-half its block's Q4_1 step ((max - min) / 15 over
    32 values of K); the lm_head and the embedding table +-half a Q8_0 step (max |w| / 127), the same
    noise for both when the table equals the lm_head, so the tie that `share_embeddings` relies on
    holds. The manifest's file table is rewritten to match. Returns what was moved.
    """
    import onnx

    from smolvlm_edge.quantize.weights import _initializers, lm_head, load
    from smolvlm_edge.runtime.bundle import replace_manifest, sha256_file

    manifest = json.loads((bundle / "manifest.json").read_text())
    files = {g: bundle / manifest["graphs"][g]["fp32"]["file"] for g in ("decoder_model_merged", "embed_tokens")}
    decoder, embed = load(files["decoder_model_merged"]), load(files["embed_tokens"])
    rng = np.random.default_rng(seed)
    inits, head = _initializers(decoder), lm_head(decoder)
    moved = {"layer_weights": 0, "lm_head": False, "embedding_tied": False}
    for node in decoder.graph.node:
        weight = inits.get(node.input[1]) if node.op_type == "MatMul" else None
        if weight is None or len(weight.dims) != 2 or weight.dims[0] % BLOCK or node.name == head:
            continue
        w = numpy_helper.to_array(weight)
        blocks = w.T.reshape(w.shape[1], -1, BLOCK)
        step = (blocks.max(-1, keepdims=True) - blocks.min(-1, keepdims=True)) / 15
        blocks = blocks + rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32) * step
        weight.CopyFrom(numpy_helper.from_array(blocks.reshape(w.shape[1], -1).T.astype(w.dtype), weight.name))
        moved["layer_weights"] += 1
    table = next((t for t in embed.graph.initializer if len(t.dims) == 2), None)
    head_weight = inits[next(n for n in decoder.graph.node if n.name == head).input[1]] if head else None
    if head_weight is not None:
        w = numpy_helper.to_array(head_weight).T  # [vocab, hidden], as the table
        tied = table is not None and np.array_equal(numpy_helper.to_array(table), w)
        blocks = w.reshape(w.shape[0], -1, BLOCK)
        step = np.abs(blocks).max(-1, keepdims=True) / 127
        w = (blocks + rng.uniform(-0.5, 0.5, blocks.shape).astype(np.float32) * step).reshape(w.shape).astype(w.dtype)
        head_weight.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(w.T), head_weight.name))
        if tied:
            table.CopyFrom(numpy_helper.from_array(w, table.name))
        moved.update(lm_head=True, embedding_tied=tied)
    for graph, model in (("decoder_model_merged", decoder), ("embed_tokens", embed)):
        entry = manifest["graphs"][graph]["fp32"]
        if entry.get("external_data"):  # the layout the manifest records
            onnx.save_model(model, str(files[graph]), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=Path(entry["external_data"]).name)
        else:
            onnx.save_model(model, str(files[graph]))
        for rel in [entry["file"], *filter(None, [entry.get("external_data")])]:
            manifest["files"][rel] = {"sha256": sha256_file(bundle / rel), "size": (bundle / rel).stat().st_size}
    replace_manifest(bundle, manifest)
    return moved


def graph_sizes(bundle: Path, manifest: dict, precision: str) -> dict:
    """MB on disk per graph; a file two graphs share (an embedding table) counts once, for its owner."""
    from smolvlm_edge.runtime.bundle import build_files

    sizes = {}
    for graph in GRAPHS:
        entry = manifest["graphs"][graph].get(precision)
        if not entry:
            sizes[graph] = None
            continue
        sizes[graph] = sum((bundle / f).stat().st_size for f in build_files(entry) if Path(f).name.startswith(graph)) / 1e6
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("out/demo-bundle"), help="fp32 demo bundle (smolvlm-edge demo makes it)")
    parser.add_argument("--work", type=Path, default=Path("out/quality-bundle"), help="copy that receives the builds")
    parser.add_argument("--rows", nargs="+", choices=list(DEFAULT_ROWS), help="table rows to build (default: all; "
                        "with --off-grid, those that quantize the text weights differently)")
    parser.add_argument("--off-grid", action="store_true", help="move the text weights off their GGUF grids first")
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    from smolvlm_edge.quantize.build import quantize_bundle
    from smolvlm_edge.quantize.metrics import sequence_match, teacher_forced
    from smolvlm_edge.quantize.parity import DEFAULT_TEXT, OnnxBuild

    if args.work.exists():
        shutil.rmtree(args.work)
    shutil.copytree(args.bundle, args.work, ignore=shutil.ignore_patterns("parity"))
    rows = args.rows or list(OFF_GRID_ROWS if args.off_grid else DEFAULT_ROWS)
    if args.off_grid:
        print(json.dumps({"off_grid": move_off_grid(args.work)}), flush=True)
    fp32 = OnnxBuild(args.work, "fp32", args.threads)
    ids = np.array([fp32.vlm.text.encode(DEFAULT_TEXT.read_text())], dtype=np.int64)
    ref_logits = fp32.logits(ids)
    ref_greedy = {p: fp32.greedy(p, [], args.new_tokens) for p in PROMPTS}
    manifest = json.loads((args.work / "manifest.json").read_text())
    records = [{"row": "fp32", "sizes_mb": graph_sizes(args.work, manifest, "fp32"), "top1": 1.0, "kl_mean": 0.0,
                "perplexity": teacher_forced(ref_logits[:-1], ref_logits[:-1], ids[0, 1:])["perplexity"],
                "greedy_identical": f"{len(PROMPTS)}/{len(PROMPTS)}"}]
    for row in rows:
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
    table = markdown(records, records[0]["perplexity"], int(ids.shape[1]) - 1, args.off_grid)
    print(table)
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    name = "quality_off_grid" if args.off_grid else "quality"
    (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (out / f"{name}.md").write_text(table)


def markdown(records: list[dict], base_ppl: float, positions: int, off_grid: bool = False) -> str:
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
    if off_grid:
        lines.append("Text weights moved off their GGUF grids first (`--off-grid`: uniform noise of +-half a Q4_1 step "
                     "in the layers, +-half a Q8_0 step in the tied lm_head and table); fp32 is that moved model.")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
