"""Parity of the demo checkpoint (SmolVLM-256M shape, real SmolLM2-135M LM) with PyTorch, and export cost.

    python -m benchmarks.demo_parity [--checkpoint DIR] [--bundle DIR] [--new-tokens 32]

Exports the checkpoint in a child process (to measure its wall time and peak RSS alone), then
compares greedy generation of the bundle with transformers' generate() for one image (tiles on),
one image (tiles off), two images, text only and a left-padded batch of two, and prints one JSON
record per case plus a summary.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np


def export_in_child(checkpoint: Path, bundle: Path) -> dict:
    code = (
        "import sys; from smolvlm_edge.export.api import export_checkpoint; "
        "export_checkpoint(sys.argv[1], sys.argv[2], overwrite=True)"
    )
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, str(checkpoint), str(bundle)], check=True)
    seconds = time.perf_counter() - t0
    peak_kb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return {"export_seconds": round(seconds, 1), "export_peak_rss_mb": round(peak_kb / 1024, 1)}


def sample_images():
    from PIL import Image

    rng = np.random.default_rng(0)
    scene = Image.fromarray(rng.integers(0, 256, (480, 640, 3), dtype=np.uint8))
    wide = Image.fromarray(rng.integers(0, 256, (300, 900, 3), dtype=np.uint8))
    return scene, wide


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, help="demo checkpoint folder (built if missing)")
    parser.add_argument("--bundle", type=Path, default=Path("out/demo-parity-bundle"))
    parser.add_argument("--new-tokens", type=int, default=32)
    parser.add_argument("--reuse-bundle", action="store_true", help="skip the export if the bundle exists")
    args = parser.parse_args()

    from smolvlm_edge.export.demo import cache_dir
    from smolvlm_edge.export.demo_checkpoint import build_demo_checkpoint
    from smolvlm_edge.export.reference import greedy_reference, load_reference
    from smolvlm_edge.runtime import SmolVLM

    checkpoint = args.checkpoint or cache_dir() / "demo-checkpoint-256m"
    if not (checkpoint / "config.json").is_file():
        build_demo_checkpoint(checkpoint)
    summary = {"checkpoint": str(checkpoint)}
    if not (args.reuse_bundle and (args.bundle / "manifest.json").is_file()):
        summary.update(export_in_child(checkpoint, args.bundle))
    summary["export_parity"] = json.loads((args.bundle / "manifest.json").read_text())["parity"]

    model, processor = load_reference(str(checkpoint))
    vlm = SmolVLM(args.bundle, threads=2)
    scene, wide = sample_images()
    cases = {
        "one_image_split": (["What is in this image?"], [[scene]], True),
        "one_image_no_split": (["What is in this image?"], [[scene]], False),
        "two_images": (["What differs between these two images?"], [[scene, wide]], True),
        "text_only": (["What is the capital of France?"], [[]], True),
        "batch_of_two": (["Describe the image.", "Write one sentence about the sea."], [[wide], []], False),
    }
    matched = 0
    for name, (prompts, images, split) in cases.items():
        t0 = time.perf_counter()
        expected = greedy_reference(model, processor, prompts, images, split, args.new_tokens)
        torch_s = time.perf_counter() - t0
        results = vlm.generate_batch(prompts, images, max_new_tokens=args.new_tokens, do_sample=False,
                                     do_image_splitting=split)
        same = all(r.prompt_ids == p and r.token_ids == e for r, (p, e) in zip(results, expected))
        matched += same
        record = {
            "case": name, "identical_tokens": same, "new_tokens": [len(r.token_ids) for r in results],
            "torch_generate_s": round(torch_s, 2), "onnx_timings": results[0].timings,
            "text": [r.text for r in results],
        }
        if not same:
            record["expected"] = [e for _, e in expected]
            record["got"] = [r.token_ids for r in results]
        print(json.dumps(record))
    summary["cases_identical"] = f"{matched}/{len(cases)}"
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
