"""Smoke test of `python -m benchmarks.run` on the tiny 256M-shape bundle: every engine runs and writes its files."""
from __future__ import annotations

import json
import sys
from pathlib import Path

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
        assert record["rounds"] == 2 and record["decode_tok_s"]["min"] <= record["decode_tok_s"]["median"], record
    assert records["ort:fp32"]["precision"] == "fp32" and "onnxruntime" in records["ort:fp32"]["versions"]
    table = (out / "bench.md").read_text()
    assert "| engine | vision ms/frame (1 frame) | vision ms/frame (5 frames) | TTFT ms | prefill tok/s | decode tok/s" in table
    assert "ort:fp32 decode / torch decode" in table and "2 rounds (engines in alternating order)" in table
    with Image.open(out / "bench.png") as image:
        assert image.size[0] > 0 and image.size[1] > 0


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

    rounds = [record({"median": 10.0, "min": 9.0, "max": 11.0}, 300.0),
              record({"median": 14.0, "min": 13.0, "max": 20.0}, 310.0),
              record({"median": 12.0, "min": 8.0, "max": 12.5}, 305.0)]
    merged = run.merge_rounds(rounds)
    assert merged["decode_tok_s"] == {"median": 12.0, "min": 8.0, "max": 20.0}
    assert merged["vision_ms_per_frame"]["5"] == merged["decode_tok_s"]
    assert merged["peak_rss_mb"] == 310.0 and merged["rounds"] == 3
    failed = {"engine": "ort:q4", "error": "child exited with 1"}
    assert run.merge_rounds([rounds[0], failed]) == failed
