"""llama.cpp (llama-cpp-python, built with AMX off) on the SmolLM2-135M-Instruct Q4_1 GGUF: text only.

    out/peers/llama-venv/bin/python -m benchmarks.peers.llama_cpp_child --model GGUF [--threads 2] ...
"""
from __future__ import annotations

import time

from benchmarks.peers.common import emit, parse, record, text_figures
from benchmarks.run import LlamaCppEngine


def main() -> None:
    args = parse(__doc__)
    engine = LlamaCppEngine(args.model, args.threads)
    ready_at = time.time()
    emit(record("llama.cpp", args.model.name, args, ("llama_cpp_python", "numpy"), text_figures(engine, args), ready_at),
         engine, args)


if __name__ == "__main__":
    main()
