"""What the peer children share: their flags, the text measurement and the record.

Each child runs in its peer's own venv (made by benchmarks/peers/setup.sh) as
`python -m benchmarks.peers.NAME_child --model PATH ...` from the repository root, and prints one
JSON line with the field names benchmarks/run.py's table reads. The helpers come from run.py itself,
so every engine is fed the same ids and summarised the same way.
"""
from __future__ import annotations

import argparse
import json
from importlib import metadata
from pathlib import Path

from benchmarks.run import peak_rss_mb, quality, repeated, spread, text_ids


def parse(description: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--model", type=Path, required=True, help="the prepared model: file or folder")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--reference", type=Path, help="also the text quality against this reference (benchmarks.run)")
    return parser.parse_args()


def text_figures(engine, args) -> dict:
    """Prefill and decode tok/s: `engine.encode(text)` gives ids, `engine.text(ids, steps)` returns
    (prefill seconds, decode seconds) for `steps` greedy tokens after a prefill of `ids` [1, n]."""
    ids = text_ids(engine.encode, args.prefill_tokens)
    runs = repeated(lambda: engine.text(ids, args.decode_tokens), args.repeats)
    return {"prefill_tok_s": spread([args.prefill_tokens / p for p, _ in runs]),
            "decode_tok_s": spread([args.decode_tokens / d for _, d in runs])}


def size_mb(path: Path, pattern: str = "*") -> float:
    """MB on disk of a file, or of the files under a folder that match `pattern`."""
    files = [path] if path.is_file() else [f for f in path.rglob(pattern) if f.is_file()]
    return round(sum(f.stat().st_size for f in files) / 1e6, 1)


def record(engine: str, precision: str, args, packages: tuple[str, ...], figures: dict, ready_at: float,
           size: float | None = None) -> dict:
    """The child's record, in the field names of benchmarks/run.py; `ready_at`: time.time() once the engine
    was built (the parent turns it into the start figure)."""
    found = {}
    for name in packages:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return {"engine": engine, "precision": precision, "threads": args.threads, "repeats": args.repeats,
            "prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens, "versions": found, "ready_at": ready_at,
            **figures, "peak_rss_mb": peak_rss_mb(), "size_mb": size_mb(args.model) if size is None else size}


def emit(rec: dict, engine=None, args=None) -> None:
    """Print the record; with `--reference`, first add `engine`'s quality (measured after the record's peak RSS:
    every position's logits take memory that generation never needs)."""
    if engine is not None and args.reference:
        rec["quality"] = quality(engine, args.reference)
    print(json.dumps(rec), flush=True)
