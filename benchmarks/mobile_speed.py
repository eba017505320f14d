"""Decode speed of the one-file model (smolvlm_mobile.onnx) beside the Python runtime, same bundle and precision.

    python -m benchmarks.mobile_speed --bundle out/demo-bundle --precision q4 [--model smolvlm_mobile.onnx]
                                      [--tokens 64] [--repeats 3] [--threads 2]

The one-file model returns only its tokens, so its decode rate is read from two calls on the same
inputs: (tokens(N) - tokens(1)) / (time(N) - time(1)), i.e. what the extra N-1 decode steps cost. The
runtime is measured the same way (not with its own timers), so both rates count the same work. Both
decode exactly N tokens: the one-file model is built with stop ids [-1] (never produced) into out/,
and the runtime's stop ids are emptied the same way (the demo checkpoint's random vision tower makes
its real answers end at once). Prints one JSON record (also written to benchmarks/results/mobile_speed.json) and the ratio (the
issue's target: at least 0.9).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPT = "Write a long story about a lighthouse keeper and the ships she saw."


def timed(fn) -> tuple[float, int]:
    t0 = time.perf_counter()
    tokens = fn()
    return time.perf_counter() - t0, len(tokens)


def decode_rate(run, tokens: int, repeats: int) -> dict:
    """Median tokens/s of the decode steps alone, from runs of 1 and of `tokens` new tokens."""
    run(1)  # warm-up
    rates, produced = [], []
    for _ in range(repeats):
        t1, n1 = timed(lambda: run(1))
        tn, nn = timed(lambda: run(tokens))
        produced.append(nn)
        if nn > n1 and tn > t1:
            rates.append((nn - n1) / (tn - t1))
    return {"decode_tok_s": round(statistics.median(rates), 2) if rates else None,
            "spread": [round(min(rates), 2), round(max(rates), 2)] if rates else None, "tokens": produced}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("out/demo-bundle"))
    parser.add_argument("--precision", default="q4")
    parser.add_argument("--model", type=Path, help="one-file model built with stop_token_ids=[-1] "
                        "(default: built into out/ from the bundle)")
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)

    from PIL import Image

    from smolvlm_edge.export import mobile
    from smolvlm_edge.export.demo import cache_dir, sample_image
    from smolvlm_edge.runtime import SmolVLM

    model = args.model or Path("out") / f"smolvlm_mobile_{args.precision}_nostop.onnx"
    if not model.exists():
        mobile.build_mobile_model(args.bundle, model, precision=args.precision, max_new_tokens=args.tokens,
                                  stop_token_ids=[-1])
    image = Image.open(sample_image(cache_dir() / "sample.png")).convert("RGB")
    vlm = SmolVLM(args.bundle, precision=args.precision, threads=args.threads)
    vlm.text.stop_token_ids = frozenset({-1})  # never produced: exactly N tokens, as the one-file model
    ids = np.array([vlm.prepare([PROMPT], [[image]], do_image_splitting=False).prompt_ids[0]], dtype=np.int64)
    session = mobile.open_mobile_session(model, threads=args.threads)
    pixels = np.asarray(image)

    runtime = decode_rate(lambda n: vlm.generate(PROMPT, [image], max_new_tokens=n, do_sample=False,
                                                 do_image_splitting=False).token_ids, args.tokens, args.repeats)
    one_file = decode_rate(lambda n: mobile.run_mobile_model(session, pixels, ids, max_new_tokens=n),
                           args.tokens, args.repeats)
    ratio = (one_file["decode_tok_s"] / runtime["decode_tok_s"]
             if one_file["decode_tok_s"] and runtime["decode_tok_s"] else None)
    record = {"bundle": str(args.bundle), "precision": args.precision, "model": str(model),
              "model_mb": round(model.stat().st_size / 1e6, 1), "threads": args.threads,
              "runtime": runtime, "one_file": one_file,
              "ratio": round(ratio, 3) if ratio else None}
    print(json.dumps(record))
    out = Path(__file__).with_name("results")
    out.mkdir(exist_ok=True)
    (out / "mobile_speed.json").write_text(json.dumps(record, indent=2) + "\n")
    print(f"one-file decode / runtime decode: {record['ratio']} (target >= 0.9)")
    return record


if __name__ == "__main__":
    main()
