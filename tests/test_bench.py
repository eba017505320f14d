"""Smoke test of `python -m benchmarks.run` on the tiny 256M-shape bundle: every engine runs and writes its files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_bench_smoke(tiny_bundles, tmp_path):
    from PIL import Image

    if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repository root first
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    out = tmp_path / "results"
    run.main(["--bundle", str(tiny_bundles("256m")), "--precisions", "fp32", "--torch", "--repeats", "1", "--rounds", "2",
              "--prefill-tokens", "16", "--decode-tokens", "4", "--out", str(out)])

    records = {r["engine"]: r for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines())}
    assert set(records) == {"ort:fp32", "torch"}, records
    for engine, record in records.items():
        assert "error" not in record, record
        assert record["decode_tok_s"]["median"] > 0 and record["prefill_tok_s"]["median"] > 0, record
        assert record["vision_ms_per_frame"]["5"]["median"] > 0 and record["ttft_ms"]["median"] > 0, record
        assert record["peak_rss_mb"] > 0 and record["size_mb"] > 0, record
        # launch to ready: at least the interpreter's start, at most the whole child's lifetime (not another time)
        assert 10 < record["start_ms"]["min"] <= record["start_ms"]["median"] <= record["start_ms"]["max"] < 120_000, record
        assert "ready_at" not in record, record
        assert record["rounds"] == 2 and record["decode_tok_s"]["min"] <= record["decode_tok_s"]["median"], record
    assert records["ort:fp32"]["precision"] == "fp32" and "onnxruntime" in records["ort:fp32"]["versions"]
    # the quality column: the fp32 build against its own reference exactly, PyTorch within the parity tolerance
    assert records["ort:fp32"]["quality"] == {"top1_pct": 100.0, "kl": 0.0, "positions": 16}, records["ort:fp32"]
    assert records["torch"]["quality"]["top1_pct"] >= 90 and records["torch"]["quality"]["kl"] < 1e-3, records["torch"]
    table = (out / "bench.md").read_text()
    assert "| engine | vision ms/frame (1 frame) | vision ms/frame (5 frames) | TTFT ms | prefill tok/s | decode tok/s" in table
    assert "| size MB | start ms | text top-1 vs fp32 (KL) |" in table
    assert "| 100.0 % (0.0000) |" in table and "teacher-forced over the same 16 ids" in table
    assert "ort:fp32 decode / torch decode" in table and "2 rounds (engines in alternating order)" in table
    with Image.open(out / "bench.png") as image:
        assert image.size[0] > 0 and image.size[1] > 0


def test_agreement_compares_over_the_shared_vocabulary():
    """Top-1 and KL over the vocabulary both sides have (the bundle's is the text model's plus image tokens)."""
    import numpy as np

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.run import agreement

    rng = np.random.default_rng(0)
    reference = rng.standard_normal((6, 12)).astype(np.float32)
    extra = np.concatenate([reference, np.full((6, 3), 50.0, np.float32)], axis=1)  # image tokens that would win
    assert agreement(reference[:, :10], extra) == {"top1_pct": 100.0, "kl": 0.0, "positions": 6}
    flipped = reference[:, :10].copy()
    flipped[0] = -flipped[0]  # one position's ranking reversed: its top-1 differs, its KL is positive
    result = agreement(flipped, reference)
    assert result["top1_pct"] == round(100 * 5 / 6, 1) and result["kl"] > 0
    with pytest.raises(ValueError, match="logits for 5 positions, the reference has 6"):
        agreement(reference[:5], reference)


def test_a_failing_quality_pass_is_reported_and_keeps_the_figures(tmp_path):
    """An engine whose teacher-forced pass fails gets {"error": ...} in its record, and the table says why."""
    import numpy as np

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    reference = tmp_path / "reference.npz"
    np.savez(reference, ids=np.zeros((1, 4), np.int64), logits=np.zeros((4, 8), np.float32))

    class Broken:
        def logits(self, ids):
            raise RuntimeError("context too small")

    assert run.quality(Broken(), reference) == {"error": "RuntimeError: context too small"}
    record = {"engine": "llama.cpp", "prefill_tok_s": 1.0, "decode_tok_s": 2.0, "peak_rss_mb": 3.0, "size_mb": 4.0,
              "threads": 2, "repeats": 1, "quality": run.quality(Broken(), reference)}
    table = run.markdown([record], {"busy_processes": 0, "load_1m": 0.0})
    assert "| llama.cpp | - | - | - | 1.0 | 2.0 | 3.0 | 4.0 | - | RuntimeError: context too small |" in table


def test_peers_can_be_named(tiny_bundles):
    """`--peers` alone runs every peer, `--peers NAME ...` only those, no flag none (llama.cpp with --llama-cpp)."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    base = ["--bundle", str(tiny_bundles("256m")), "--precisions", "fp32"]
    assert run.engine_specs(run.parse(base)) == ["ort:fp32"]
    assert run.engine_specs(run.parse(base + ["--peers"])) == ["ort:fp32", *run.PEERS]
    assert run.engine_specs(run.parse(base + ["--peers", "genai:int4"])) == ["ort:fp32", "genai:int4"]
    assert run.engine_specs(run.parse(base + ["--llama-cpp", "model.gguf"])) == ["ort:fp32", "llama.cpp"]


def test_rounds_merge_into_one_record_per_engine():
    """Median of the rounds' medians, min and max over every run, the highest peak RSS; a failed round wins."""
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    def record(decode, rss, **extra):
        return {"engine": "ort:q4", "decode_tok_s": decode, "peak_rss_mb": rss, "size_mb": 1.0,
                "vision_ms_per_frame": {"1": decode, "5": decode}, **extra}

    rounds = [record({"median": 10.0, "min": 9.0, "max": 11.0}, 300.0, start_ms={"median": 900.0, "min": 900.0, "max": 900.0}),
              record({"median": 14.0, "min": 13.0, "max": 20.0}, 310.0, start_ms={"median": 700.0, "min": 700.0, "max": 700.0}),
              record({"median": 12.0, "min": 8.0, "max": 12.5}, 305.0, start_ms={"median": 750.0, "min": 750.0, "max": 750.0})]
    merged = run.merge_rounds(rounds)
    assert merged["decode_tok_s"] == {"median": 12.0, "min": 8.0, "max": 20.0}
    assert merged["vision_ms_per_frame"]["5"] == merged["decode_tok_s"]
    assert merged["peak_rss_mb"] == 310.0 and merged["rounds"] == 3
    assert merged["start_ms"] == {"median": 750.0, "min": 700.0, "max": 900.0}
    failed = {"engine": "ort:q4", "error": "child exited with 1"}
    assert run.merge_rounds([rounds[0], failed]) == failed


def test_move_off_grid_keeps_the_tie_and_stays_within_half_a_step(tiny_bundles, tmp_path):
    """`benchmarks.quality --off-grid`: weights move by at most half a grid step, the table stays the lm_head, the bundle verifies."""
    import shutil

    import numpy as np
    import onnx
    from onnx import numpy_helper

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks.quality import BLOCK, move_off_grid
    from smolvlm_edge.quantize.weights import lm_head
    from smolvlm_edge.runtime.bundle import open_bundle, replace_manifest, sha256_file

    bundle = tmp_path / "bundle"
    shutil.copytree(tiny_bundles("256m"), bundle)
    # Tie the tiny table to its lm_head, as SmolVLM's copy is, so the tied path runs.
    decoder, embed_file = onnx.load(str(bundle / "onnx" / "decoder_model_merged.onnx")), bundle / "onnx" / "embed_tokens.onnx"
    head_init = next(n for n in decoder.graph.node if n.name == lm_head(decoder)).input[1]
    head_weight = next(numpy_helper.to_array(t) for t in decoder.graph.initializer if t.name == head_init)
    embed = onnx.load(str(embed_file))
    table = next(t for t in embed.graph.initializer if len(t.dims) == 2)
    table.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(head_weight.T), table.name))
    onnx.save(embed, str(embed_file))
    manifest = json.loads((bundle / "manifest.json").read_text())
    manifest["files"]["onnx/embed_tokens.onnx"] = {"sha256": sha256_file(embed_file), "size": embed_file.stat().st_size}
    replace_manifest(bundle, manifest)

    def weights(graph):
        model = onnx.load(str(bundle / "onnx" / f"{graph}.onnx"))
        inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
        matmuls = {n.name: inits[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in inits}
        return model, matmuls, next((v for v in inits.values() if v.ndim == 2), None)

    model, before, _ = weights("decoder_model_merged")
    head = lm_head(model)
    table_before = weights("embed_tokens")[2]
    tied = np.array_equal(table_before, before[head].T)

    moved = move_off_grid(bundle)

    _, after, _ = weights("decoder_model_merged")
    table_after = weights("embed_tokens")[2]
    layers = [name for name, w in before.items() if name != head and w.ndim == 2 and w.shape[0] % BLOCK == 0]
    assert layers and moved == {"layer_weights": len(layers), "lm_head": True, "embedding_tied": tied}, moved
    for name in layers:
        old = before[name].T.reshape(before[name].shape[1], -1, BLOCK)
        step = (old.max(-1) - old.min(-1)) / 15
        change = np.abs(after[name] - before[name]).T.reshape(old.shape)
        assert change.max() > 0 and (change <= 0.5 * step[..., None] + 1e-6).all(), name
    assert not np.array_equal(after[head], before[head])
    assert tied and np.array_equal(table_after, after[head].T)
    open_bundle(bundle)  # the manifest's sizes and sha256 match the rewritten files, in the same layout
    assert sorted(p.name for p in (bundle / "onnx").iterdir()) == sorted(p.name for p in (tiny_bundles("256m") / "onnx").iterdir())


def test_gpu_mode_refuses_what_it_cannot_run_before_any_child(tiny_bundles, tmp_path):
    """`--provider cuda`: a provider this onnxruntime lacks, or the CPU peers, stop the run with one clear line."""
    import onnxruntime as ort

    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    base = ["--bundle", str(tiny_bundles("256m")), "--provider", "cuda", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="CPU comparisons"):
        run.main(base + ["--peers"])
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        with pytest.raises(SystemExit, match="CUDAExecutionProvider"):
            run.main(base)
    assert not list(tmp_path.iterdir())
    # on a GPU the defaults are its float16 builds (and fp32), as the bundle has them
    assert run.engine_specs(run.parse(base)) == ["ort:fp32"]
    assert run.engine_specs(run.parse(base + ["--torch"])) == ["ort:fp32", "torch"]


def test_gpu_ratios_set_fp16_beside_pytorch_cuda():
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    from benchmarks import run

    def record(engine, decode, ttft):
        return {"engine": engine, "provider": "cuda", "decode_tok_s": {"median": decode}, "ttft_ms": {"median": ttft},
                "prefill_tok_s": {"median": 1000.0}}

    lines = run.ratios([record("ort:fp16", 300.0, 20.0), record("torch", 100.0, 40.0)])
    assert lines == ["- ort:fp16 decode / torch (CUDA, float16) decode: 3.00x",
                     "- ort:fp16 TTFT / torch (CUDA, float16) TTFT: 0.50x",
                     "- ort:fp16 prefill / torch (CUDA, float16) prefill: 1.00x"]
