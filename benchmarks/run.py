"""Speed and memory of each engine on one bundle: our onnxruntime builds, PyTorch eager, llama.cpp.

    python -m benchmarks.run [--bundle out/demo-bundle] [--precisions fp32 q4f16 int8] [--torch]
                             [--llama-cpp GGUF] [--peers [PEER ...]] [--threads 2] [--repeats 3] [--rounds 1]
                             [--prefill-tokens 256] [--decode-tokens 128] [--out benchmarks/results]
                             [--provider cpu|cuda] [--no-quality]

`--provider cuda` runs our builds on onnxruntime's CUDA provider (default precisions fp16, fp32, q4f16)
beside PyTorch CUDA eager in float16 (`--torch`), and writes bench_cuda.* instead; the peers are CPU
comparisons and are not run there.

Each engine runs in its own child process (`--child ENGINE`), so its peak RSS is its own. Per
engine, after one warm-up, `--repeats` runs of: vision ms per frame (1 frame, and 5 frames in one
batch), time to first token for one 512x512 picture and "What is in this image?" (no tiles,
greedy), prefill tok/s for `--prefill-tokens` ids of quantize/data/reference_text.txt, and decode
tok/s for `--decode-tokens` greedy steps after it (EOS ignored). Median and min/max of each.
Start ms: from launching the engine's process to the engine ready to run (interpreter, imports,
reading the model, sessions or compilation), once per process: what an app's start costs (with the
model's files in the page cache, as a second launch finds them).
`--rounds N` runs the whole list of engines N times, forward then backward (a fresh process each
time): each figure is then the median of the rounds' medians, so a machine whose speed drifts over
minutes (this one does, by 10-20 %) weighs on every engine alike instead of on whichever ran last.
Both PyTorch's text path and ours compute logits for the last position only (as generation does;
the fused graph's num_logits_to_keep). llama.cpp has no vision here.

Speed means little without the quality it comes at, and the peers quantize the same weights their own
way, so each engine also reports its text top-1: after its timings and peak RSS, one teacher-forced pass
over the prefill's ids, compared with the fp32 build's logits (made once per run in a child): how often
the next-token argmax agrees, and the mean KL divergence (`--no-quality` skips it).

Prints one JSON record per engine and a Markdown table with ratios; writes bench.jsonl, bench.md
and bench.png under `--out`.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
TEXT = ROOT / "quantize" / "data" / "reference_text.txt"
GRAPHS = ("vision_encoder", "embed_tokens", "decoder_model_merged")
QUESTION = "What is in this image?"
# Our builds: every graph at one precision, or a per-graph mix ("vision=int8,embed=q4,decoder=q4").
DEFAULT_PRECISIONS = ("fp32", "q4", "int8", "q4f16", "vision=int8,embed=q4,decoder=q4")
# On a GPU: float16 builds (and fp32), set beside PyTorch CUDA eager in float16.
CUDA_PRECISIONS = ("fp16", "fp32", "q4f16")
# The text-only figure to set beside llama.cpp and genai (which hold no vision encoder in memory).
TEXT_ONLY_PRECISION = "q4"
# The build we recommend for time to first token on an x86 CPU with VNNI: dynamic int8 vision, an int8 weight-only
# table and a SmoothQuant W8A8 decoder (quantize --recipe int8 --option embed.mode=weight_only --option
# decoder.mode=smooth): its decoder prefills ~2.7x and decodes ~1.05x as fast as q4's here (no block-bias path)
# at the same text top-1 (95.3 %; README's benchmark).
FIRST_TOKEN_PRECISION = "int8"
COLUMNS = ("vision ms/frame (1 frame)", "vision ms/frame (5 frames)", "TTFT ms", "prefill tok/s",
           "decode tok/s", "peak RSS MB", "size MB", "start ms", "text top-1 vs fp32 (KL)")


# ---------------------------------------------------------------- inputs and statistics

def picture(side: int = 512):
    """A deterministic test picture: colour gradients plus noise."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / max(side - 1, 1)
    base = np.stack([xx, yy, 1 - (xx + yy) / 2], axis=-1) * 200 + rng.integers(0, 56, (side, side, 3))
    return Image.fromarray(base.astype(np.uint8), "RGB")


def text_ids(encode, count: int) -> np.ndarray:
    """`count` ids of the reference text, repeated when the text is shorter. [1, count]"""
    ids = list(encode(TEXT.read_text()))
    ids = (ids * math.ceil(count / len(ids)))[:count]
    return np.array([ids], dtype=np.int64)


def repeated(fn, repeats: int) -> list:
    """One untimed warm-up call, then `repeats` calls; their results."""
    fn()
    return [fn() for _ in range(repeats)]


def spread(values: list[float]) -> dict:
    return {"median": round(statistics.median(values), 3), "min": round(min(values), 3), "max": round(max(values), 3)}


def log_softmax(logits: np.ndarray) -> np.ndarray:
    shifted = logits.astype(np.float64) - logits.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def agreement(logits: np.ndarray, reference: np.ndarray) -> dict:
    """How closely an engine's teacher-forced logits [n, V] follow the reference's [n, V']: top-1 match (%) and
    mean KL(reference || engine), over the vocabulary both have (the bundle's adds image tokens to the text
    model's 49152), each renormalised over it."""
    if logits.shape[0] != reference.shape[0]:
        raise ValueError(f"logits for {logits.shape[0]} positions, the reference has {reference.shape[0]}")
    vocab = min(logits.shape[-1], reference.shape[-1])
    got, ref = log_softmax(logits[:, :vocab]), log_softmax(reference[:, :vocab])
    return {"top1_pct": round(100 * float((got.argmax(-1) == ref.argmax(-1)).mean()), 1),
            "kl": round(float((np.exp(ref) * (ref - got)).sum(-1).mean()), 4), "positions": int(logits.shape[0])}


def quality(engine, reference: Path) -> dict:
    """`engine.logits(ids)` on the reference file's ids, against its logits (write_reference); where that fails,
    {"error": why}: the engine's speed figures are kept either way."""
    saved = np.load(reference)
    try:
        return agreement(np.asarray(engine.logits(saved["ids"]), dtype=np.float32), saved["logits"])
    except Exception as exc:  # noqa: BLE001 - any engine's failure, reported in its record
        return {"error": f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"}


# ---------------------------------------------------------------- engines (in the child)

class OrtEngine:
    """Our runtime at one precision: `vision`/`ttft`/`text` return seconds."""

    def __init__(self, bundle: Path, precision: str, threads: int, provider: str = "cpu"):
        from smolvlm_edge.runtime import SmolVLM
        from smolvlm_edge.runtime.cli import parse_precision

        self.vlm = SmolVLM(bundle, provider=provider, threads=threads, precision=parse_precision(precision))
        self.encode = self.vlm.text.encode

    def vision(self, pixels, mask) -> float:
        t0 = time.perf_counter()
        self.vlm.run_vision(pixels, mask)
        return time.perf_counter() - t0

    def ttft(self, image) -> float:
        result = self.vlm.generate(QUESTION, [image], max_new_tokens=1, do_sample=False, do_image_splitting=False)
        return result.timings["ttft_ms"] / 1000

    def text(self, ids: np.ndarray, steps: int) -> tuple[float, float]:
        decoder, n = self.vlm.decoder, ids.shape[1]
        t0 = time.perf_counter()
        cache = decoder.empty_cache(1, capacity=n + steps)
        # last_only: logits of the last position only, as generation asks (and as PyTorch's text path does)
        logits, cache = decoder(self.vlm.embed(ids), np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None],
                                cache, last_only=True)
        t1 = time.perf_counter()
        for i in range(steps):
            token = np.array([[logits[0, -1].argmax()]], dtype=np.int64)
            logits, cache = decoder(self.vlm.embed(token), np.ones((1, n + i + 1), np.int64),
                                    np.array([[n + i]], dtype=np.int64), cache, last_only=True)
        return t1 - t0, time.perf_counter() - t1

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Teacher-forced logits of every position of `ids` [1, n]: [n, V]."""
        decoder, n = self.vlm.decoder, ids.shape[1]
        logits, _ = decoder(self.vlm.embed(ids), np.ones((1, n), np.int64), np.arange(n, dtype=np.int64)[None],
                            decoder.empty_cache(1, n))
        return logits[0]


class OrtTextEngine(OrtEngine):
    """embed_tokens + decoder only, as a text-only app would load them: its peak RSS is comparable with llama.cpp's."""

    vision = None

    def __init__(self, bundle: Path, precision: str, threads: int, provider: str = "cpu"):
        from types import SimpleNamespace

        from smolvlm_edge.runtime.bundle import checked_while_loading, open_bundle
        from smolvlm_edge.runtime.embed_table import table_rows_for
        from smolvlm_edge.runtime.generate import Decoder
        from smolvlm_edge.runtime.prompt import TextProcessor
        from smolvlm_edge.runtime.providers import choose_provider, make_session

        opened = open_bundle(bundle, check_files=False)
        choice = choose_provider(provider, threads)
        with checked_while_loading(opened, opened.files_read_with({g: precision for g in GRAPHS[1:]})):  # as SmolVLM
            embed = table_rows_for(opened, precision)  # as SmolVLM does: rows read from the file, when recorded
            if embed is None:
                session = make_session(opened.graph_file("embed_tokens", precision), choice, threads,
                                       hands_over=True)  # as SmolVLM opens it
                embed = lambda ids: session.run(["inputs_embeds"], {"input_ids": ids})[0]  # noqa: E731
            decoder = make_session(opened.graph_file("decoder_model_merged", precision), choice, threads)
            self.vlm = SimpleNamespace(decoder=Decoder(decoder, opened.text), text=TextProcessor.from_dir(bundle),
                                       embed=embed)
        self.encode = self.vlm.text.encode


class TorchEngine:
    """PyTorch eager on the bundle's source checkpoint, fed by our runtime's processors: float32 on the CPU,
    float16 on a GPU (`device="cuda"`), timed after the device has finished."""

    def __init__(self, bundle: Path, threads: int, device: str = "cpu"):
        import torch
        from smolvlm_edge.export.reference import load_reference
        from smolvlm_edge.runtime.prompt import TextProcessor

        torch.set_num_threads(threads)
        self.torch, self.device = torch, torch.device(device)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32
        self.source = json.loads((bundle / "manifest.json").read_text())["source"]["model"]
        model, _ = load_reference(self.source)
        self.model = model.to(self.device, self.dtype)
        self.text_proc = TextProcessor.from_dir(bundle)
        self.images = image_processor(bundle)
        self.encode = self.text_proc.encode

    def tensor(self, array: np.ndarray):
        """A numpy input on the model's device; floats in the model's dtype."""
        value = self.torch.from_numpy(np.ascontiguousarray(array)).to(self.device)
        return value.to(self.dtype) if value.is_floating_point() else value

    def done(self) -> float:
        """The time once the device has finished what was queued (CUDA runs asynchronously)."""
        if self.device.type == "cuda":
            self.torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def new_cache(self):
        from transformers import DynamicCache

        return DynamicCache(config=self.model.config.text_config)

    def vision(self, pixels, mask) -> float:
        torch = self.torch
        with torch.inference_mode():
            t0 = self.done()
            self.model.model.get_image_features(pixel_values=self.tensor(pixels), pixel_attention_mask=self.tensor(mask))
            return self.done() - t0

    def ttft(self, image) -> float:
        torch, proc = self.torch, self.text_proc
        with torch.inference_mode():
            t0 = self.done()
            frames = self.images([[image]], do_image_splitting=False)
            prompt = proc.expand_image_tokens(proc.render(proc.messages_for(QUESTION, 1)), frames.rows[0], frames.cols[0])
            ids = self.tensor(np.array([proc.encode(prompt)], dtype=np.int64))
            out = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), cache=self.new_cache(), use_cache=True,
                             pixel_values=self.tensor(frames.pixel_values),
                             pixel_attention_mask=self.tensor(frames.pixel_attention_mask), logits_to_keep=1)
            int(out.logits[0, -1].argmax())  # the token on the host: the device has finished
            return time.perf_counter() - t0

    def text(self, ids: np.ndarray, steps: int) -> tuple[float, float]:
        torch, model, n = self.torch, self.model, ids.shape[1]
        embed, text_model = model.get_input_embeddings(), model.model.text_model

        def forward(token_ids, start, cache):
            length = token_ids.shape[1]
            out = text_model(inputs_embeds=embed(token_ids),
                             attention_mask=torch.ones((1, start + length), dtype=torch.long, device=self.device),
                             position_ids=torch.arange(start, start + length, device=self.device)[None], cache=cache,
                             use_cache=True)
            return model.lm_head(out.last_hidden_state[:, -1:])

        with torch.inference_mode():
            t0 = self.done()
            cache = self.new_cache()
            logits = forward(self.tensor(ids), 0, cache)
            t1 = self.done()
            for i in range(steps):
                logits = forward(logits[:, -1].argmax(-1, keepdim=True), n + i, cache)
            return t1 - t0, self.done() - t1

    def logits(self, ids: np.ndarray) -> np.ndarray:
        torch, model, n = self.torch, self.model, ids.shape[1]
        with torch.inference_mode():
            out = model.model.text_model(inputs_embeds=model.get_input_embeddings()(self.tensor(ids)),
                                         attention_mask=torch.ones((1, n), dtype=torch.long, device=self.device),
                                         position_ids=torch.arange(n, device=self.device)[None], use_cache=False)
            return model.lm_head(out.last_hidden_state)[0].float().cpu().numpy()


class LlamaCppEngine:
    """llama.cpp through llama-cpp-python on a GGUF: text only."""

    vision = ttft = None

    def __init__(self, gguf: Path, threads: int):
        from llama_cpp import Llama

        self.gguf, self.threads = gguf, threads
        self.llm = Llama(model_path=str(gguf), n_threads=threads, n_ctx=1024, logits_all=False, verbose=False)
        self.encode = lambda text: self.llm.tokenize(text.encode(), add_bos=False)

    def logits(self, ids: np.ndarray) -> np.ndarray:
        """Every position's logits need a context made with logits_all (more memory: only after the measurements)."""
        from llama_cpp import Llama

        llm = Llama(model_path=str(self.gguf), n_threads=self.threads, n_ctx=max(1024, ids.shape[1]), logits_all=True,
                    verbose=False)
        llm.eval(ids[0].tolist())
        return np.array(llm.scores[:ids.shape[1]], dtype=np.float32)

    def text(self, ids: np.ndarray, steps: int) -> tuple[float, float]:
        llm = self.llm
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids[0].tolist())
        t1 = time.perf_counter()
        for _ in range(steps):
            llm.eval([int(np.argmax(self.last_logits()))])
        return t1 - t0, time.perf_counter() - t1

    def last_logits(self) -> np.ndarray:
        """The last evaluated token's logits, read from the context: with logits_all=False,
        llama-cpp-python 0.3 no longer copies them into `llm.scores`."""
        import llama_cpp

        return np.ctypeslib.as_array(llama_cpp.llama_get_logits(self.llm.ctx), shape=(self.llm.n_vocab(),))


def image_processor(bundle: Path):
    from smolvlm_edge.runtime.images import ImageProcessor

    return ImageProcessor.from_dir(bundle)


# ---------------------------------------------------------------- one engine's record (in the child)

def measure(engine, args, image) -> dict:
    """Vision, TTFT, prefill and decode of one engine: median and min/max over the repeats."""
    record = {}
    if engine.vision is not None:
        frame = image_processor(args.bundle)([[image]], do_image_splitting=False)
        record["vision_ms_per_frame"] = {}
        for frames in (1, 5):
            pixels = np.repeat(frame.pixel_values, frames, axis=1)
            mask = np.repeat(frame.pixel_attention_mask, frames, axis=1)
            times = repeated(lambda: engine.vision(pixels, mask), args.repeats)
            record["vision_ms_per_frame"][str(frames)] = spread([1000 * t / frames for t in times])
        record["ttft_ms"] = spread([1000 * t for t in repeated(lambda: engine.ttft(image), args.repeats)])
    ids = text_ids(engine.encode, args.prefill_tokens)
    runs = repeated(lambda: engine.text(ids, args.decode_tokens), args.repeats)
    record["prefill_tok_s"] = spread([args.prefill_tokens / p for p, _ in runs])
    record["decode_tok_s"] = spread([args.decode_tokens / d for _, d in runs])
    return record


def size_mb(args, spec: str) -> float:
    """MB on disk: the three graphs at that precision (each file once), the checkpoint's weights, or the GGUF."""
    manifest = json.loads((args.bundle / "manifest.json").read_text())
    if spec.startswith(("ort:", "ort-text:")):
        from smolvlm_edge.runtime.bundle import build_files
        from smolvlm_edge.runtime.cli import parse_precision

        chosen, files = parse_precision(spec.partition(":")[2]), set()
        graphs = GRAPHS[1:] if spec.startswith("ort-text:") else GRAPHS
        for graph in graphs:
            files.update(build_files(manifest["graphs"][graph][chosen if isinstance(chosen, str) else chosen[graph]]))
        return round(sum((args.bundle / f).stat().st_size for f in files) / 1e6, 1)
    if spec == "torch":
        weights = [f for f in Path(manifest["source"]["model"]).iterdir() if f.suffix in (".safetensors", ".bin")]
        return round(sum(f.stat().st_size for f in weights) / 1e6, 1)
    return round(args.llama_cpp.stat().st_size / 1e6, 1)


def child(args) -> dict:
    """Build one engine, measure it, and return its record (what the child prints)."""
    spec = args.child
    ort = spec.startswith(("ort:", "ort-text:"))
    on_gpu = args.provider == "cuda"
    record = {"engine": spec, "precision": spec.partition(":")[2] if ort else
              ("fp16" if on_gpu else "fp32") if spec == "torch" else "gguf",
              "provider": args.provider, "threads": args.threads, "repeats": args.repeats,
              "prefill_tokens": args.prefill_tokens, "decode_tokens": args.decode_tokens, "versions": versions()}
    if spec.startswith("ort:"):
        engine = OrtEngine(args.bundle, spec[4:], args.threads, args.provider)
    elif spec.startswith("ort-text:"):
        engine = OrtTextEngine(args.bundle, spec[9:], args.threads, args.provider)
    elif spec == "torch":
        engine = TorchEngine(args.bundle, args.threads, "cuda" if on_gpu else "cpu")
    else:
        try:
            engine = LlamaCppEngine(args.llama_cpp, args.threads)
        except ImportError:
            return {"engine": "llama.cpp", "skipped": "llama-cpp-python is not installed"}
        record["precision"] = args.llama_cpp.name
    record["ready_at"] = time.time()  # the parent turns it into start_ms (it knows when it launched this process)
    side = min(512, int(json.loads((args.bundle / "manifest.json").read_text())["vision"]["image_size"]))
    record.update(measure(engine, args, picture(side)))
    record["peak_rss_mb"] = peak_rss_mb()
    record["size_mb"] = size_mb(args, spec)
    if args.reference:  # after the peak RSS: every position's logits take memory generation never needs
        record["quality"] = quality(engine, args.reference)
    return record


# The quality column's positions: the prefill's ids, at most this many (each engine holds [n, vocab] float32 logits).
QUALITY_TOKENS = 512


def write_reference(args) -> None:
    """The reference the quality column compares with: the fp32 build's teacher-forced logits over the prefill's
    ids (the first min(`--prefill-tokens`, QUALITY_TOKENS) of the reference text), in an .npz (ids [1, n], logits [n, V])."""
    engine = OrtTextEngine(args.bundle, "fp32", args.threads)
    ids = text_ids(engine.encode, min(args.prefill_tokens, QUALITY_TOKENS))
    with open(args.write_reference, "wb") as f:
        np.savez(f, ids=ids, logits=engine.logits(ids))


def peak_rss_mb() -> float:
    """This process's peak RSS. Linux's ru_maxrss keeps the parent's peak across fork + exec, so
    prefer VmHWM (the peak of this program's own memory) where /proc has it."""
    status = Path("/proc/self/status")
    if status.is_file():
        for line in status.read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def versions() -> dict:
    """Installed versions, read without importing (an import would add to this child's RSS)."""
    found = {}
    for name in ("onnxruntime", "torch", "transformers", "llama_cpp_python"):
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            pass
    return found


# ---------------------------------------------------------------- the parent: children, table, chart

def busy() -> dict:
    """Other processes running now and the 1-minute load: timings mean little on a busy machine."""
    stat = Path("/proc/stat").read_text().split("\n")
    running = next(int(line.split()[1]) for line in stat if line.startswith("procs_running"))
    return {"busy_processes": running - 1, "load_1m": float(Path("/proc/loadavg").read_text().split()[0])}


# Peer engines: each runs benchmarks/peers/CHILD.py with the python of its own venv under out/peers/,
# on a model prepared there (benchmarks/peers/setup.sh makes both). llama.cpp's model is the GGUF.
PEERS_DIR = ROOT / "out" / "peers"
PEERS = {  # spec: (venv, child module, model folder)
    "llama.cpp": ("llama-venv", "llama_cpp_child", None),
    "genai:int4": ("genai-venv", "genai_child", "genai-int4"),
    "openvino:int4": ("openvino-venv", "openvino_child", "openvino-int4"),
    "openvino:fp32": ("openvino-venv", "openvino_child", "openvino-fp32"),
}


def engine_specs(args) -> list[str]:
    """ort:PRECISION for each requested precision the bundle has for every graph, then torch, then the peers."""
    from smolvlm_edge.runtime.cli import parse_precision

    graphs = json.loads((args.bundle / "manifest.json").read_text())["graphs"]

    def built(precision: str, names=GRAPHS) -> bool:
        chosen = parse_precision(precision)
        return all((chosen if isinstance(chosen, str) else chosen[g]) in graphs.get(g, {}) for g in names)

    default = CUDA_PRECISIONS if args.provider == "cuda" else DEFAULT_PRECISIONS
    have = [p for p in args.precisions or default if built(p)]
    missing = [p for p in args.precisions or () if p not in have]
    if missing:
        print(f"skipping precisions the bundle lacks: {', '.join(missing)}", file=sys.stderr)
    peers = (args.peers or list(PEERS)) if args.peers is not None else ["llama.cpp"] if args.llama_cpp else []
    text_only = [f"ort-text:{TEXT_ONLY_PRECISION}"] if peers and built(TEXT_ONLY_PRECISION, GRAPHS[1:]) else []
    return [f"ort:{p}" for p in have] + text_only + (["torch"] if args.torch else []) + peers


def peer_command(spec: str, args) -> list[str] | dict:
    """The command line of a peer's child, or its skipped record when setup.sh has not made its venv or model."""
    venv, module, folder = PEERS[spec]
    python = PEERS_DIR / venv / "bin" / "python"
    if folder:
        model = PEERS_DIR / folder
    elif args.llama_cpp:
        model = args.llama_cpp.resolve()  # the child runs from the repository root
    else:
        from smolvlm_edge.export.demo_checkpoint import find_smollm2_gguf

        model = find_smollm2_gguf()
    if not python.is_file() or not model.exists():
        return {"engine": spec, "skipped": "run benchmarks/peers/setup.sh first"}
    return [str(python), "-m", f"benchmarks.peers.{module}", "--model", str(model)]


def run_child(spec: str, args, reference: Path | None = None) -> dict:
    """Measure one engine in a fresh interpreter and read its one JSON line; with `reference`, also its quality."""
    common = ["--threads", str(args.threads), "--repeats", str(args.repeats),
              "--prefill-tokens", str(args.prefill_tokens), "--decode-tokens", str(args.decode_tokens),
              *(["--reference", str(reference)] if reference else [])]
    if spec in PEERS:
        command = peer_command(spec, args)
        if isinstance(command, dict):
            return command
        command += common
    else:
        command = [sys.executable, "-m", "benchmarks.run", "--child", spec, "--bundle", str(args.bundle),
                   "--provider", args.provider, *common]
    launched = time.time()
    done = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, text=True)
    lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode or not lines:
        return {"engine": spec, "error": f"child exited with {done.returncode}; stdout tail: {done.stdout[-500:]!r}"}
    record = json.loads(lines[-1])
    if "ready_at" in record:  # one value per process, as a spread so that rounds merge like the other figures
        start = round(1000 * (record.pop("ready_at") - launched), 1)
        record["start_ms"] = {"median": start, "min": start, "max": start}
    return record


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}


def make_reference(args, folder: Path) -> Path | None:
    """The fp32 build's logits for the quality column, made in a child (write_reference); None, with a
    message, where it cannot be made: the figures are then measured without it."""
    path = folder / "reference.npz"
    command = [sys.executable, "-m", "benchmarks.run", "--write-reference", str(path), "--bundle", str(args.bundle),
               "--threads", str(args.threads), "--prefill-tokens", str(args.prefill_tokens)]
    done = subprocess.run(command, cwd=ROOT, env=child_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if done.returncode or not path.is_file():
        print(f"no quality column: the fp32 reference failed ({done.returncode}): {done.stderr[-500:]}", file=sys.stderr)
        return None
    return path


METRICS = ("vision_ms_per_frame", "ttft_ms", "prefill_tok_s", "decode_tok_s", "start_ms")


def merge_rounds(records: list[dict]) -> dict:
    """One engine's records from several rounds as one: per figure the median of the rounds' medians and
    the min/max over all runs, the highest peak RSS; a round that failed or was skipped makes the record."""
    if len(records) == 1 or any("error" in r or "skipped" in r for r in records):
        return next((r for r in records if "error" in r or "skipped" in r), records[0])

    def merged(spreads: list[dict]) -> dict:
        return {"median": round(statistics.median(s["median"] for s in spreads), 3),
                "min": min(s["min"] for s in spreads), "max": max(s["max"] for s in spreads)}

    out = {**records[0], "rounds": len(records), "peak_rss_mb": max(r["peak_rss_mb"] for r in records)}
    for key in METRICS:
        if key not in out:
            continue
        if key == "vision_ms_per_frame":
            out[key] = {frames: merged([r[key][frames] for r in records]) for frames in out[key]}
        else:
            out[key] = merged([r[key] for r in records])
    return out


def median(records: list[dict], engine: str, key: str, frames: str = "1"):
    record = next((r for r in records if r["engine"] == engine and key in r), None)
    if record is None:
        return None
    value = record[key][frames] if key == "vision_ms_per_frame" else record[key]
    return value["median"] if isinstance(value, dict) else value


def gpu_ratios(records: list[dict]) -> list[str]:
    """On a GPU the issue asks for figures beside PyTorch CUDA eager (float16), with no targets."""
    lines = []
    for key, label in (("decode_tok_s", "decode"), ("ttft_ms", "TTFT"), ("prefill_tok_s", "prefill")):
        x, y = median(records, "ort:fp16", key), median(records, "torch", key)
        lines.append(f"- ort:fp16 {label} / torch (CUDA, float16) {label}: {f'{x / y:.2f}x' if x and y else 'n/a'}")
    return lines


def ratios(records: list[dict]) -> list[str]:
    """Ratio lines between engines measured in this run (n/a where one side is missing)."""
    if any(r.get("provider") == "cuda" for r in records):
        return gpu_ratios(records)
    q4, first, text = "ort:q4", f"ort:{FIRST_TOKEN_PRECISION}", f"ort-text:{TEXT_ONLY_PRECISION}"
    wanted = [(q4, "llama.cpp", "decode_tok_s", "decode", 1.5), (q4, "genai:int4", "decode_tok_s", "decode", 1.0),
              ("ort:fp32", "torch", "decode_tok_s", "decode", 1.5), ("ort:int8", "torch", "prefill_tok_s", "prefill", 1.5),
              (q4, "torch", "prefill_tok_s", "prefill", 1.5),
              ("ort:fp32", "torch", "vision_ms_per_frame", "vision ms/frame", 1.0),
              ("ort:int8", "torch", "vision_ms_per_frame", "vision ms/frame", 0.5),
              (first, "openvino:fp32", "ttft_ms", "TTFT", 1.0), (first, "openvino:int4", "ttft_ms", "TTFT", 1.0),
              (text, "llama.cpp", "peak_rss_mb", "peak RSS", 1.5)]
    lines = []
    for a, b, key, label, target in wanted:
        x, y = median(records, a, key), median(records, b, key)
        lower = key in ("vision_ms_per_frame", "ttft_ms", "peak_rss_mb")
        value = f"{x / y:.2f}x" if x and y else "n/a"
        goal = f"target {'<=' if lower else '>='} {target}x" + ("" if not (x and y) else
                                                                 ": met" if (x / y <= target if lower else x / y >= target) else ": MISSED")
        lines.append(f"- {a} {label} / {b} {label}: {value} ({goal})")
    return lines


def cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, dict):
        return f"{value['median']:.1f} ({value['min']:.1f}–{value['max']:.1f})"
    return f"{value:.1f}"


def markdown(records: list[dict], load: dict) -> str:
    lines = [f"| engine | {' | '.join(COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for r in records:
        if "skipped" in r or "error" in r:
            lines.append(f"| {r['engine']} | {r.get('skipped') or r.get('error')} |" + " |" * (len(COLUMNS) - 1))
            continue
        vision = r.get("vision_ms_per_frame", {})
        cells = [vision.get("1"), vision.get("5"), r.get("ttft_ms"), r["prefill_tok_s"], r["decode_tok_s"],
                 r["peak_rss_mb"], r["size_mb"], r.get("start_ms")]
        q = r.get("quality") or {}
        agrees = f"{q['top1_pct']:.1f} % ({q['kl']:.4f})" if "top1_pct" in q else q.get("error", "-")
        lines.append(f"| {r['engine']} | {' | '.join(cell(c) for c in cells)} | {agrees} |")
    first = next((r for r in records if "threads" in r), {})
    runs = f"{first.get('repeats')} run(s) after a warm-up"
    if first.get("rounds"):
        runs = f"{first['rounds']} rounds (engines in alternating order) x {runs}"
    where = " on onnxruntime's CUDA provider and PyTorch CUDA (float16)" if first.get("provider") == "cuda" else ""
    lines += ["", f"Median (min–max) of {runs}{where}, {first.get('threads')} threads, "
              f"prefill {first.get('prefill_tokens')} tokens, decode {first.get('decode_tokens')} tokens; "
              f"busy: {load['busy_processes']} other processes running, load {load['load_1m']}."]
    positions = next((r["quality"]["positions"] for r in records if "positions" in r.get("quality", {})), None)
    if positions:
        lines.append(f"Text top-1: each engine's next-token logits, teacher-forced over the same {positions} ids of "
                     "the reference text, against the fp32 build's (which the parity suite holds to PyTorch): how often "
                     "the most likely token is the same, and the mean KL divergence, over the vocabulary both have.")
    return "\n".join(lines + [""] + ratios(records)) + "\n"


def chart(records: list[dict], path: Path) -> None:
    """Horizontal bars of prefill and decode tok/s per engine, each panel on its own scale."""
    from PIL import Image, ImageDraw

    rows = [r for r in records if "decode_tok_s" in r]
    label_w, bar_w, row_h, top = 110, 300, 22, 30
    image = Image.new("RGB", (label_w + 2 * (bar_w + 20) + 10, top + row_h * max(len(rows), 1) + 10), "white")
    draw = ImageDraw.Draw(image)
    for panel, (key, colour) in enumerate((("prefill_tok_s", (70, 130, 180)), ("decode_tok_s", (220, 120, 40)))):
        x0 = label_w + panel * (bar_w + 20)
        draw.text((x0, 8), key.replace("_tok_s", " tok/s"), fill="black")
        top_value = max((r[key]["median"] for r in rows), default=1) or 1
        for i, r in enumerate(rows):
            y = top + i * row_h
            length = int(bar_w * 0.8 * r[key]["median"] / top_value)
            draw.rectangle([x0, y, x0 + max(length, 1), y + row_h - 6], fill=colour)
            draw.text((x0 + length + 4, y + 2), f"{r[key]['median']:.1f}", fill="black")
    for i, r in enumerate(rows):
        draw.text((6, top + i * row_h + 2), r["engine"], fill="black")
    image.save(path)


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bundle", type=Path, default=Path("out/demo-bundle"))
    parser.add_argument("--precisions", nargs="+", default=None, help=f"default: {' '.join(DEFAULT_PRECISIONS)} that the bundle has")
    parser.add_argument("--torch", action="store_true", help="also PyTorch eager fp32 on the bundle's source checkpoint")
    parser.add_argument("--llama-cpp", type=Path, metavar="GGUF", help="also llama.cpp on this GGUF (text only; needs out/peers/llama-venv)")
    parser.add_argument("--peers", nargs="*", choices=list(PEERS), metavar="PEER",
                        help="also llama.cpp, onnxruntime-genai and OpenVINO on the same LM weights, each in its own venv "
                             f"(benchmarks/peers/setup.sh makes them); name some to run only those: {' '.join(PEERS)}")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every engine this many times, in alternating order (more robust ratios on a busy machine)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--prefill-tokens", type=int, default=256)
    parser.add_argument("--decode-tokens", type=int, default=128)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results"))
    parser.add_argument("--provider", choices=("cpu", "cuda"), default="cpu",
                        help="where our builds run (cuda: default precisions " + " ".join(CUDA_PRECISIONS)
                             + ", beside PyTorch CUDA eager in float16; results in bench_cuda.*; no CPU peers)")
    parser.add_argument("--no-quality", action="store_true",
                        help="skip the text top-1 column (the fp32 reference and one teacher-forced pass per engine)")
    parser.add_argument("--child", metavar="ENGINE", help=argparse.SUPPRESS)
    parser.add_argument("--reference", type=Path, help=argparse.SUPPRESS)  # a child: also its quality against this
    parser.add_argument("--write-reference", type=Path, help=argparse.SUPPRESS)  # a child: write the reference
    args = parser.parse_args(argv)
    args.bundle = args.bundle.resolve()  # the children run from the repository root
    return args


def main(argv=None) -> list[dict]:
    args = parse(argv)
    if args.child:
        print(json.dumps(child(args)), flush=True)
        return []
    if args.write_reference:
        write_reference(args)
        return []
    if args.provider != "cpu":
        refuse_on_gpu(args)
    load = busy()
    print(f"busy: {load['busy_processes']} other processes running (1-minute load {load['load_1m']})", flush=True)
    specs = engine_specs(args)
    rounds: dict[str, list[dict]] = {spec: [] for spec in specs}
    with tempfile.TemporaryDirectory(prefix="smolvlm-bench-") as scratch:
        reference = None if args.no_quality else make_reference(args, Path(scratch))
        for turn in range(args.rounds):
            # Forward, then backward, ...: a machine that drifts over minutes then weighs on every engine alike.
            for spec in specs if turn % 2 == 0 else specs[::-1]:
                record = {**run_child(spec, args, reference if turn == 0 else None), **load}
                rounds[spec].append(record)
                print(json.dumps(record), flush=True)
    records = [merge_rounds(rounds[spec]) for spec in specs]
    table = markdown(records, load)
    print(table)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = "bench" if args.provider == "cpu" else f"bench_{args.provider}"
    (args.out / f"{stem}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    (args.out / f"{stem}.md").write_text(table)
    chart(records, args.out / f"{stem}.png")
    return records


def refuse_on_gpu(args) -> None:
    """Before any child starts: the provider must be in this onnxruntime, and PyTorch must see a GPU for --torch;
    the peers are CPU comparisons."""
    from smolvlm_edge.runtime.errors import ProviderError
    from smolvlm_edge.runtime.providers import choose_provider

    if args.peers is not None or args.llama_cpp:
        raise SystemExit(f"error: the peers (llama.cpp, genai, OpenVINO) are CPU comparisons; run them without "
                         f"--provider {args.provider}")
    try:
        choose_provider(args.provider, args.threads)
    except ProviderError as exc:
        raise SystemExit(f"error: {exc}") from exc
    if args.torch:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"error: --torch with --provider {args.provider} runs PyTorch on the GPU, and this "
                             f"PyTorch {torch.__version__} sees none (a CPU build, or no driver)")


if __name__ == "__main__":
    main()
