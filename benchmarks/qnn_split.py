"""The qdq decoder on the QNN HTP backend with CPU fallback: its node split, parity and step time.

    python -m benchmarks.qnn_split [--bundle out/qnn-tiny-bundle] [--checkpoint tiny|PATH]
                                   [--context 256] [--tokens 8] [--prompts ...] [--htp-option NAME=VALUE]

The bundle must be a plain-attention export (`smolvlm-edge export --attention plain`) with a qdq decoder
(`smolvlm-edge quantize --recipe qdq --vision none --embed none --decoder qdq --calibration-prompts ...`);
a missing bundle is built: the checkpoint (default: a tiny random one made in code) exported and quantized.
The decoder runs as the runtime runs it with `provider="qnn", qnn_fallback=True`: one position per call over
a fixed KV cache of --context positions (static shapes, as HTP needs). Reports

- split: nodes per op type on HTP and on the CPU, from onnxruntime's own assignment record, and the QNN
  EP's reasons for each refusal (quantize/qnn.py `htp_coverage`), plus the live session's own split;
- end_to_end: a whole greedy generation through SmolVLM with the decoder split, beside the CPU's tokens;
- parity: per position logits, teacher-forced over each prompt and fp32's greedy continuation, of the
  split session vs the same qdq graph on the CPU and vs the fp32 graph (cosine mean/min, top-1 agreement);
- timing: wall time per single-position call (a decode step) over the parity sequences. The HTP backend
  here is Qualcomm's x86 SIMULATOR: its times measure the simulation on this CPU and say nothing about a
  phone's NPU.

Prints one JSON record and stores it in benchmarks/results/qnn_split.json (a list: one record per bundle).
"""
from __future__ import annotations

import argparse
import datetime
import json
import statistics
import time
from pathlib import Path

import numpy as np

PROMPTS = ("What is the capital of France? Answer briefly.", "Write a short story about a lighthouse keeper.",
           "List three uses of a paperclip.")
CALIBRATION = ("Describe the picture in one sentence.", "Write a haiku about the sea.",
               "Explain why the sky is blue to a child.", "What is in this image? Answer in detail.")
SIMULATOR_NOTE = ("HTP timings are Qualcomm's x86 simulator on this CPU (2 cores): they measure the simulation, "
                  "not an NPU, and say nothing about a phone")
DECODER = "decoder_model_merged"


def ensure_bundle(bundle: Path, checkpoint: str) -> None:
    """Export `checkpoint` with plain attention and add a qdq decoder, unless the bundle already has them."""
    if not (bundle / "manifest.json").exists():
        from smolvlm_edge.export.api import export_checkpoint

        if checkpoint == "tiny":
            from smolvlm_edge.export.tiny import make_tiny_checkpoint

            checkpoint = str(make_tiny_checkpoint(bundle.parent / f"{bundle.name}-checkpoint", shape="256m"))
        export_checkpoint(checkpoint, bundle, attention="plain", progress=print)
    manifest = json.loads((bundle / "manifest.json").read_text())
    if manifest["text"].get("attention") == "fused":
        raise SystemExit(f"{bundle} has the fused decoder (contrib ops); export it with --attention plain")
    if "qdq" not in manifest["graphs"][DECODER]:
        from smolvlm_edge.quantize.build import quantize_bundle

        quantize_bundle(bundle, "qdq", graphs={"vision": "none", "embed": "none", "decoder": "qdq"},
                        calibration_prompts=CALIBRATION, progress=print)


def compare(a: np.ndarray, b: np.ndarray) -> dict:
    """Logits [T, V] of two runs: cosine per position (mean, min) and top-1 agreement."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    cos = (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1) + 1e-30)
    return {"cosine_mean": round(float(cos.mean()), 5), "cosine_min": round(float(cos.min()), 5),
            "top1_agreement": round(float((a.argmax(-1) == b.argmax(-1)).mean()), 4)}


def all_logits(decoder, embeds: np.ndarray) -> np.ndarray:
    """Logits of every position [T, V], the whole sequence given at once (as a prefill)."""
    steps = embeds.shape[1]
    mask = np.ones((1, steps), dtype=np.int64)
    logits, _ = decoder(embeds, mask, np.arange(steps, dtype=np.int64)[None], decoder.empty_cache(1, steps))
    return logits[0]


def stepwise(decoder, embeds: np.ndarray) -> tuple[np.ndarray, list[float]]:
    """Logits of every position [T, V], fed one position per call as decode steps, and each call's milliseconds."""
    steps = embeds.shape[1]
    cache = decoder.empty_cache(1, steps)
    logits, times = [], []
    for t in range(steps):
        t0 = time.perf_counter()
        out, cache = decoder(embeds[:, t:t + 1], np.ones((1, t + 1), dtype=np.int64), np.array([[t]], dtype=np.int64),
                             cache, last_only=True)
        times.append(1000 * (time.perf_counter() - t0))
        logits.append(out[0, -1])
    return np.stack(logits), times


def timing(times: list[float]) -> dict:
    return {"median_ms": round(statistics.median(times), 2), "min_ms": round(min(times), 2),
            "max_ms": round(max(times), 2), "steps": len(times)}


def split_by_op(coverage: dict) -> dict:
    ops = sorted(set(coverage["taken"]) | set(coverage["refused"]),
                 key=lambda op: -(coverage["taken"].get(op, 0) + coverage["refused"].get(op, 0)))
    return {op: {"htp": coverage["taken"].get(op, 0), "cpu": coverage["refused"].get(op, 0)} for op in ops}


def measure(args) -> dict:
    from smolvlm_edge.quantize.qnn import fp16_square_overflow, htp_coverage, qnn_available, session_split
    from smolvlm_edge.runtime import SmolVLM
    from smolvlm_edge.runtime.generate import Decoder
    from smolvlm_edge.runtime.htp_decoder import decode_step_dims, qnn_session_options
    from smolvlm_edge.runtime.providers import make_session

    bundle = args.bundle
    manifest = json.loads((bundle / "manifest.json").read_text())
    record = {"bundle": str(bundle), "model": manifest["source"]["model"],
              "decoder": manifest["graphs"][DECODER]["qdq"]["file"], "context": args.context,
              "date": datetime.datetime.now().isoformat(timespec="seconds"), "note": SIMULATOR_NOTE}
    ok, record["qnn"] = qnn_available()
    if not ok:
        record["error"] = "QNN HTP backend unavailable"
        return record
    user_options = dict(o.split("=", 1) for o in args.htp_option)
    options = qnn_session_options(user_options)
    record["htp_options"] = options

    # (a) the split, with the EP's reasons; the runtime keeps the QNN EP's default I/O quantization offload.
    t0 = time.perf_counter()
    coverage = htp_coverage(bundle / record["decoder"], dims=decode_step_dims(args.context),
                            htp_options={"offload_graph_io_quantization": "1", **options})
    record["split"] = {"nodes": coverage["nodes"], "htp_nodes": coverage["htp_nodes"],
                       "cpu_nodes": coverage["nodes"] - coverage["htp_nodes"], "htp_fraction": coverage["htp_fraction"],
                       "htp_partitions": coverage["htp_partitions"], "by_op": split_by_op(coverage),
                       "refused_reasons": coverage["refused_reasons"], "source": coverage["source"],
                       "error": coverage["error"], "seconds": round(time.perf_counter() - t0, 1)}
    # HTP computes the graph's float nodes in fp16: RMSNorm's x^2 over a massive activation becomes inf there.
    record["float_squares_on_htp"] = {**fp16_square_overflow(bundle / record["decoder"]),
                                      "note": "float Pow(x, 2) whose calibrated input range squared exceeds fp16 max"}

    # (b) the runtime with the decoder split: a whole generation, then parity.
    precision = {"vision_encoder": "fp32", "embed_tokens": "fp32", DECODER: "qdq"}
    t0 = time.perf_counter()
    try:
        htp = SmolVLM(bundle, provider="qnn", precision=precision, qnn_fallback=True, qnn_context=args.context,
                      threads=args.threads, provider_options=user_options)
    except Exception as exc:  # the report says what failed rather than dying
        record["end_to_end"] = {"runs": False, "error": f"{type(exc).__name__}: {exc}"}
        return record
    record["load_s"] = round(time.perf_counter() - t0, 2)
    record["graph_providers"] = htp.graph_providers
    record["session_split"] = session_split(htp.decoder.session)
    cpu = SmolVLM(bundle, precision=precision, threads=args.threads)
    fp32 = SmolVLM(bundle, threads=args.threads)

    greedy = {"max_new_tokens": args.tokens, "do_sample": False}
    try:
        answers = {name: vlm.generate(args.prompts[0], **greedy) for name, vlm in
                   (("htp_split", htp), ("cpu_qdq", cpu), ("fp32", fp32))}
    except Exception as exc:
        record["end_to_end"] = {"runs": False, "error": f"{type(exc).__name__}: {exc}"}
        return record
    record["end_to_end"] = {
        "runs": True, "prompt": args.prompts[0], "text": answers["htp_split"].text,
        "tokens": {name: a.token_ids for name, a in answers.items()},
        "same_tokens_as_cpu_qdq": answers["htp_split"].token_ids == answers["cpu_qdq"].token_ids,
        "timings": answers["htp_split"].timings}

    cpu_decoder = Decoder(make_session(htp.graph_files[DECODER], ["CPUExecutionProvider"], args.threads),
                          manifest["text"])
    parity, times = [], {"htp_split_simulator": [], "cpu_qdq": [], "fp32_cpu": []}
    for prompt in args.prompts:
        ids = fp32.prepare([prompt], [[]]).input_ids
        continuation = fp32.generate(prompt, **greedy).token_ids  # teacher-forced: fp32's own continuation
        embeds = fp32.embed(np.concatenate([ids, np.array([continuation], dtype=np.int64)], axis=1))
        # Every HTP call is one position over the same static cache: prompt and decode steps cost the same.
        on_htp, spent = stepwise(htp.decoder, embeds)
        times["htp_split_simulator"] += spent
        for name, decoder in (("cpu_qdq", cpu_decoder), ("fp32_cpu", fp32.decoder)):
            times[name] += stepwise(decoder, embeds)[1]
        on_cpu, on_fp32 = all_logits(cpu_decoder, embeds), all_logits(fp32.decoder, embeds)
        parity.append({"prompt": prompt, "positions": embeds.shape[1],
                       "htp_vs_cpu_qdq": compare(on_htp, on_cpu), "htp_vs_fp32": compare(on_htp, on_fp32),
                       "cpu_qdq_vs_fp32": compare(on_cpu, on_fp32)})
    record["parity"] = parity
    record["parity_summary"] = {pair: {key: round(statistics.mean(p[pair][key] for p in parity), 5)
                                       for key in ("cosine_mean", "cosine_min", "top1_agreement")}
                                for pair in ("htp_vs_cpu_qdq", "htp_vs_fp32", "cpu_qdq_vs_fp32")}
    # (c) wall time per single-position call over the parity sequences (the first two are warm-up). The CPU
    # graphs are dynamic, so their step grows with the past; the static HTP step always spans --context.
    record["decode_step"] = {name: timing(spent[2:]) for name, spent in times.items()}
    record["decode_step"].update(threads=args.threads, note=SIMULATOR_NOTE)
    return record


def save(record: dict, path: Path) -> None:
    """Keep one record per bundle in the results list."""
    records = json.loads(path.read_text()) if path.exists() else []
    records = [r for r in records if r.get("bundle") != record["bundle"]] + [record]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1) + "\n")


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("out/qnn-tiny-bundle"))
    parser.add_argument("--checkpoint", default="tiny", help="what to export when --bundle is missing "
                        "(default: a tiny random checkpoint made in code)")
    parser.add_argument("--context", type=int, default=256, help="positions of the decoder's fixed KV cache")
    parser.add_argument("--tokens", type=int, default=8, help="greedy tokens per generation and continuation")
    parser.add_argument("--prompts", nargs="+", default=list(PROMPTS),
                        help="parity prompts; the first one is also generated end to end")
    parser.add_argument("--htp-option", action="append", default=[], metavar="NAME=VALUE",
                        help="a QNN provider option, e.g. vtcm_mb=8 (default on x86: the simulator's target)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/qnn_split.json"))
    args = parser.parse_args(argv)

    ensure_bundle(args.bundle, args.checkpoint)
    record = measure(args)
    save(record, args.output)
    print(json.dumps(record))
    return record


if __name__ == "__main__":
    main()
