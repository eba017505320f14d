"""`SmolVLM`: load a bundle and answer prompts about images, with streaming and timings."""
from __future__ import annotations

import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Sequence, Union

import numpy as np

from .bundle import GRAPH_NAMES, checked_while_loading, open_bundle
from .embed_table import table_rows_for
from .errors import PromptError, ProviderError
from .generate import Decoder, Timings, generate_tokens
from .htp_decoder import QNN_CONTEXT, StaticStepDecoder, open_htp_decoder, qnn_session_options
from .images import ImageProcessor, load_image
from .prompt import TextProcessor
from .providers import (QNN_EP, ProviderFallbackWarning, check_fallback, choose_provider,
                        make_qnn_htp_session, make_session, stdout_to_stderr)
from .sampling import GenerationSettings


class OrtFormatWarning(UserWarning):
    """prefer_ort=True, but a graph has no ORT-format file recorded: its .onnx is loaded."""


# Graphs whose run hands over to the decoder's: their threads stop spinning when a run ends (make_session).
HANDING_OVER = frozenset({"vision_encoder", "embed_tokens"})

# A prompt is plain text (one user turn, images first) or a whole chat as a list of messages.
Prompt = Union[str, list]


@dataclass
class GenerationResult:
    """One prompt's answer: its text, the ids fed and generated, and how long it took."""

    text: str
    prompt_ids: list[int]
    token_ids: list[int]
    timings: dict

    def as_dict(self) -> dict:
        return {"text": self.text, "prompt_ids": self.prompt_ids, "token_ids": self.token_ids, "timings": self.timings}


@dataclass
class PreparedInputs:
    input_ids: np.ndarray            # [B, T] int64, left-padded
    attention_mask: np.ndarray       # [B, T] int64
    prompt_ids: list[list[int]]      # per row, without padding
    pixel_values: np.ndarray | None  # [B, frames, 3, H, W]
    pixel_attention_mask: np.ndarray | None


class SmolVLM:
    """An exported SmolVLM bundle, ready to generate on one execution provider."""

    def __init__(
        self,
        model_dir: str | Path,
        provider: str = "cpu",
        threads: int | None = None,
        precision: str | dict[str, str] = "fp32",
        check_files: bool = True,
        fallback: str | None = None,
        provider_options: dict | None = None,
        prefer_ort: bool = False,
        qnn_fallback: bool = False,
        qnn_context: int = QNN_CONTEXT,
    ):
        """`provider`: a short name (runtime.providers.PROVIDERS); one this onnxruntime lacks raises a
        ProviderError, or with `fallback="cpu"` warns (ProviderFallbackWarning) and runs on the CPU.
        `provider="qnn"`: graphs whose build is `qdq` run on the QNN HTP backend, the others on the CPU.
        Each such graph must go to HTP whole unless `qnn_fallback=True`, which lets onnxruntime's CPU EP
        run the nodes HTP refuses (a qdq decoder always has some). A qdq decoder on HTP runs with static
        shapes: one position per call over a KV cache of `qnn_context` positions (`StaticStepDecoder`).
        On x86 (the simulator) the HTP target is SIMULATOR_HTP_TARGET unless `provider_options` name one.
        `provider_options`: that provider's options (runtime/providers.py).
        `prefer_ort`: load the ORT-format file recorded for a graph (`smolvlm-edge convert-ort`) instead
        of its .onnx; graphs without one load their .onnx, with a warning.
        `check_files`: check every file this instance reads (the chosen builds' graphs and weights, configs,
        tokenizer) against the manifest: sizes before loading, sha256 beside the load, both before this returns;
        other builds' files are not read."""
        self.bundle = open_bundle(model_dir, check_files=False)
        precisions = precision if isinstance(precision, dict) else {}
        default = precision if isinstance(precision, str) else "fp32"
        picked = {name: precisions.get(name, default) for name in GRAPH_NAMES}
        self.graph_files = self._graph_files(picked, prefer_ort)
        # Only the files this instance reads: hashing every build's (1.4 GB for the demo bundle's fp32, q4 and int8) took 1.1 s.
        files = self.bundle.files_read_with(picked, ort=prefer_ort) if check_files else []
        with checked_while_loading(self.bundle, files):
            self._load(picked, provider, threads, provider_options, fallback, qnn_fallback, qnn_context)

    def _load(self, picked: dict[str, str], provider: str, threads, provider_options, fallback,
              qnn_fallback: bool, qnn_context: int) -> None:
        """Sessions, embedding rows, processors and generation defaults."""
        # q4's shared 8-bit table: rows read from the file (runtime/embed_table.py), no embed session.
        self.embed_rows = table_rows_for(self.bundle, picked["embed_tokens"])
        self.graph_providers = self._place(provider, picked, threads, provider_options, fallback,
                                           qnn_fallback, qnn_context)
        # The provider list of the decoder's session (the one most of the time goes to).
        self.providers = self.graph_providers["decoder_model_merged"]

        self.vision = self._sessions["vision_encoder"]
        self.embed_session = self._sessions.get("embed_tokens")
        decoder = StaticStepDecoder if QNN_EP in self.providers else Decoder
        self.decoder = decoder(self._sessions.pop("decoder_model_merged"), self.bundle.text)
        del self._sessions
        self.text = TextProcessor.from_dir(self.bundle.path)
        self.images = ImageProcessor.from_dir(self.bundle.path)
        self.defaults = GenerationSettings.from_dir(self.bundle.path)
        self.max_positions = int(self.bundle.text["max_position_embeddings"])

    def _graph_files(self, picked: dict[str, str], prefer_ort: bool) -> dict[str, Path]:
        files, missing = {}, []
        for name, prec in picked.items():
            files[name] = self.bundle.graph_file(name, prec)
            if prefer_ort:
                ort_file = self.bundle.manifest["graphs"][name][prec].get("ort_file")
                if ort_file:
                    files[name] = self.bundle.path / ort_file
                else:
                    missing.append(f"{name} {prec}")
        if missing:
            warnings.warn(f"bundle {self.bundle.path} has no ORT-format file for {', '.join(missing)}; loading the "
                          ".onnx (make them with `smolvlm-edge convert-ort`)", OrtFormatWarning, stacklevel=3)
        return files

    def _place(self, provider: str, picked: dict[str, str], threads, options, fallback,
               qnn_fallback: bool = False, qnn_context: int = QNN_CONTEXT) -> dict[str, list[str]]:
        """Open every graph's session; returns the providers each runs with."""
        self._sessions = {}
        if provider.strip().lower() != "qnn":
            choice = choose_provider(provider, threads, options, fallback)
            for name in self._session_graphs():
                self._sessions[name] = make_session(self.graph_files[name], choice, threads, hands_over=name in HANDING_OVER)
            return {name: list(choice.providers) for name in GRAPH_NAMES}
        # QNN HTP: statically quantized (qdq) graphs only; the others stay on the CPU.
        fallback = check_fallback(fallback)
        on_htp = [n for n in GRAPH_NAMES if picked[n] == "qdq"
                  or self.bundle.manifest["graphs"][n][picked[n]].get("recipe") == "qdq"]
        if not on_htp:
            raise ProviderError("--provider qnn runs the graphs built with the qdq recipe on the QNN HTP backend, and "
                                f"{', '.join(f'{g}={p}' for g, p in picked.items())} has none; use e.g. --precision vision=qdq "
                                "(smolvlm-edge quantize --recipe qdq)")
        cpu = choose_provider("cpu", threads)
        qnn_options = qnn_session_options(options)
        placed = {name: list(cpu.providers) for name in GRAPH_NAMES}
        for name in self._session_graphs():
            if name in on_htp:
                try:
                    with stdout_to_stderr():
                        if name == "decoder_model_merged":
                            session = open_htp_decoder(self.graph_files[name], qnn_context, qnn_fallback,
                                                       qnn_options, threads)
                        else:
                            session = make_qnn_htp_session(self.graph_files[name], fallback=qnn_fallback,
                                                           options=qnn_options)
                    self._sessions[name] = session
                    placed[name] = [QNN_EP, cpu.providers[0]] if qnn_fallback else [QNN_EP]
                    continue
                except ProviderError as exc:
                    if fallback is None:
                        raise
                    warnings.warn(f"{exc}; running {name} on the CPU (--fallback {fallback})",
                                  ProviderFallbackWarning, stacklevel=3)
            self._sessions[name] = make_session(self.graph_files[name], cpu, threads, hands_over=name in HANDING_OVER)
        return placed

    def _session_graphs(self) -> list[str]:
        """The graphs that get a session: all but an embed graph whose rows the runtime reads itself."""
        return [name for name in GRAPH_NAMES if not (name == "embed_tokens" and self.embed_rows is not None)]

    # ---- inputs -----------------------------------------------------------------------------
    def embed(self, ids: np.ndarray) -> np.ndarray:
        if self.embed_rows is not None:
            return self.embed_rows(ids)
        return self.embed_session.run(["inputs_embeds"], {"input_ids": ids.astype(np.int64)})[0]

    def prepare(self, prompts: Sequence[Prompt], images: Sequence[Sequence], do_image_splitting: bool | None = None) -> PreparedInputs:
        """Chat template, image tiles and token expansion, tokenization, and left padding of a batch."""
        if len(prompts) != len(images):
            raise PromptError(f"got {len(prompts)} prompts but {len(images)} image lists; give one list per prompt")
        loaded = [[load_image(img) for img in row] for row in images]
        processed = self.images(loaded, do_image_splitting=do_image_splitting) if any(loaded) else None
        rows_ids = []
        for i, (prompt, row_images) in enumerate(zip(prompts, loaded)):
            text = self._render(prompt, len(row_images))
            rows = processed.rows[i] if processed else []
            cols = processed.cols[i] if processed else []
            rows_ids.append(self.text.encode(self.text.expand_image_tokens(text, rows, cols)))
        width = max(len(r) for r in rows_ids)
        input_ids = np.full((len(rows_ids), width), self.text.pad_token_id, dtype=np.int64)
        attention_mask = np.zeros((len(rows_ids), width), dtype=np.int64)
        for i, ids in enumerate(rows_ids):
            input_ids[i, width - len(ids):] = ids  # left padding: every row ends at the last column
            attention_mask[i, width - len(ids):] = 1
        return PreparedInputs(
            input_ids, attention_mask, rows_ids,
            processed.pixel_values if processed else None,
            processed.pixel_attention_mask if processed else None,
        )

    def _render(self, prompt: Prompt, num_images: int) -> str:
        if isinstance(prompt, str):
            if not prompt.strip() and num_images == 0:
                raise PromptError("the prompt is empty and there is no image: nothing to answer")
            # Markers the user placed say where the images go; otherwise images come first.
            placed = prompt.count("<image>")
            return self.text.render(self.text.messages_for(prompt, 0 if placed else num_images))
        return self.text.render(prompt)

    def run_vision(self, pixel_values: np.ndarray, pixel_attention_mask: np.ndarray) -> np.ndarray:
        """Image features [real frames, tokens, D]; a graph fixed to one frame (NPU builds) gets one call per frame."""
        inputs = self.vision.get_inputs()
        names = {i.name for i in inputs}
        fixed_one_frame = list(inputs[0].shape[:2]) == [1, 1]
        if fixed_one_frame:
            frames = pixel_values.reshape(-1, 1, 1, *pixel_values.shape[2:])
            masks = pixel_attention_mask.reshape(-1, 1, 1, *pixel_attention_mask.shape[2:])
            real = [i for i in range(frames.shape[0]) if frames[i].any()]  # all-zero frames are padding
            feeds = [(frames[i], masks[i]) for i in real]
        else:
            feeds = [(pixel_values, pixel_attention_mask)]
        outputs = []
        for pixels, mask in feeds:
            feed = {"pixel_values": pixels.astype(np.float32), "pixel_attention_mask": mask.astype(bool)}
            outputs.append(self.vision.run(["image_features"], {k: v for k, v in feed.items() if k in names})[0])
        return np.concatenate(outputs, axis=0)

    def prompt_embeddings(self, inputs: PreparedInputs, timings: Timings) -> np.ndarray:
        """Token embeddings with image features written over the `<image>` positions. [B, T, D]"""
        embeds = self.embed(inputs.input_ids)
        slots = inputs.input_ids == self.text.image_token_id
        if inputs.pixel_values is None:
            if slots.any():
                raise PromptError(f"the prompt has {int(slots.sum())} image tokens but no image was given")
            return embeds
        t0 = time.perf_counter()
        features = self.run_vision(inputs.pixel_values, inputs.pixel_attention_mask)  # [frames, tokens, D]
        timings.vision_ms = 1000 * (time.perf_counter() - t0)
        flat = features.reshape(-1, features.shape[-1])
        if flat.shape[0] != int(slots.sum()):
            raise PromptError(f"image features ({flat.shape[0]} rows) and image tokens ({int(slots.sum())}) do not match")
        embeds[slots] = flat  # row-major, as masked_scatter does
        return embeds

    # ---- generation -------------------------------------------------------------------------
    def stream_batch(
        self,
        prompts: Sequence[Prompt],
        images: Sequence[Sequence] | None = None,
        do_image_splitting: bool | None = None,
        **settings,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """The raw step iterator: yields (next ids [B], rows still running [B]); results via `self.last`."""
        started = time.perf_counter()
        gen = self.defaults.updated(**settings)
        timings = Timings()
        inputs = self.prepare(prompts, images or [[] for _ in prompts], do_image_splitting)
        timings.prompt_tokens = int(inputs.input_ids.shape[1])
        self._check_context(inputs, gen.max_new_tokens)
        embeds = self.prompt_embeddings(inputs, timings)
        timings.preprocess_ms = 1000 * (time.perf_counter() - started) - timings.vision_ms
        generated = [[] for _ in prompts]
        for next_ids, running in generate_tokens(
            self.decoder, self.embed, embeds, inputs.attention_mask, inputs.input_ids,
            gen, self.text.stop_token_ids, self.text.pad_token_id, timings, started,
        ):
            for row, (tok, live) in enumerate(zip(next_ids.tolist(), running.tolist())):
                if live:
                    generated[row].append(tok)
            yield next_ids, running
        self.last = [
            GenerationResult(self.text.decode(ids), prompt, ids, timings.as_dict())
            for ids, prompt in zip(generated, inputs.prompt_ids)
        ]

    def _check_context(self, inputs: PreparedInputs, max_new_tokens: int) -> None:
        needed = inputs.input_ids.shape[1] + max_new_tokens
        if needed > self.max_positions:
            raise PromptError(
                f"prompt of {inputs.input_ids.shape[1]} tokens plus max_new_tokens={max_new_tokens} "
                f"needs {needed} positions but the model's context is {self.max_positions}"
            )

    def generate_batch(self, prompts: Sequence[Prompt], images: Sequence[Sequence] | None = None, **kwargs) -> list[GenerationResult]:
        """Answer several prompts at once (left-padded into one batch)."""
        for _ in self.stream_batch(prompts, images, **kwargs):
            pass
        return self.last

    def generate(self, prompt: Prompt, images: Sequence = (), **kwargs) -> GenerationResult:
        """Answer one prompt about zero or more images (paths, bytes or PIL images)."""
        return self.generate_batch([prompt], [list(images)], **kwargs)[0]

    def stream(self, prompt: Prompt, images: Sequence = (), **kwargs) -> Iterator[str]:
        """Yield the answer's text as it is generated; `self.last[0]` holds the full result after."""
        decoder = self.text.stream()
        for next_ids, running in self.stream_batch([prompt], [list(images)], **kwargs):
            if running[0]:
                piece = decoder.push(int(next_ids[0]))
                if piece:
                    yield piece
        tail = decoder.flush()
        if tail:
            yield tail
