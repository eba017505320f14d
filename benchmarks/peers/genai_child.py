"""onnxruntime-genai 0.18 on SmolLM2-135M-Instruct, int4 from its model builder: text only, timed
around genai's own C++ generation loop.

    out/peers/genai-venv/bin/python -m benchmarks.peers.genai_child --model out/peers/genai-int4 ...
"""
from __future__ import annotations

import json
import time

import numpy as np
import onnxruntime_genai as og

from benchmarks.peers.common import emit, parse, record, size_mb, text_figures


class GenaiEngine:
    def __init__(self, folder, threads: int):
        config = og.Config(str(folder))
        config.overlay(json.dumps({"model": {"decoder": {"session_options": {"intra_op_num_threads": threads}}}}))
        self.model = og.Model(config)
        self.encode = og.Tokenizer(self.model).encode

    def text(self, ids: np.ndarray, steps: int) -> tuple[float, float]:
        """append_tokens runs the prefill; the first generate_next_token only picks a token from its
        logits, each later one runs one decode step first, so steps + 1 calls make `steps` steps."""
        total = ids.shape[1] + steps + 1
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=total, min_length=total, do_sample=False)  # min_length: EOS ignored
        generator = og.Generator(self.model, params)
        t0 = time.perf_counter()
        generator.append_tokens(ids.astype(np.int32))
        t1 = time.perf_counter()
        for _ in range(steps + 1):
            generator.generate_next_token()
        return t1 - t0, time.perf_counter() - t1

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits of one prefill (the builder's graph computes them all)."""
        params = og.GeneratorParams(self.model)
        params.set_search_options(max_length=ids.shape[1] + 1, do_sample=False)
        generator = og.Generator(self.model, params)
        generator.append_tokens(ids.astype(np.int32))
        return np.asarray(generator.get_output("logits"))[0]


def main() -> None:
    args = parse(__doc__)
    engine = GenaiEngine(args.model, args.threads)
    ready_at = time.time()
    precision = args.model.name.rsplit("-", 1)[-1]  # out/peers/genai-int4
    emit(record(f"genai:{precision}", precision, args, ("onnxruntime-genai", "onnxruntime"), text_figures(engine, args),
                ready_at, size=size_mb(args.model, "*.onnx*")), engine, args)


if __name__ == "__main__":
    main()
