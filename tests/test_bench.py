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
    run.main(["--bundle", str(tiny_bundles("256m")), "--precisions", "fp32", "--torch", "--repeats", "1",
              "--prefill-tokens", "16", "--decode-tokens", "4", "--out", str(out)])

    records = {r["engine"]: r for r in map(json.loads, (out / "bench.jsonl").read_text().splitlines())}
    assert set(records) == {"ort:fp32", "torch"}, records
    for engine, record in records.items():
        assert "error" not in record, record
        assert record["decode_tok_s"]["median"] > 0 and record["prefill_tok_s"]["median"] > 0, record
        assert record["vision_ms_per_frame"]["5"]["median"] > 0 and record["ttft_ms"]["median"] > 0, record
        assert record["peak_rss_mb"] > 0 and record["size_mb"] > 0, record
    assert records["ort:fp32"]["precision"] == "fp32" and "onnxruntime" in records["ort:fp32"]["versions"]
    table = (out / "bench.md").read_text()
    assert "| engine | vision ms/frame (1 frame) | vision ms/frame (5 frames) | TTFT ms | prefill tok/s | decode tok/s" in table
    assert "ort:fp32 decode / torch decode" in table
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
