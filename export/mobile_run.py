"""Running the one-file model (onnxruntime only): the session, its metadata, input checks, ids and answer out.

Input checks. onnxruntime refuses a wrong dtype, a wrong rank, a channel count other than 3 and a
batch other than 1, naming the input. ONNX has no assertion op; what else can go wrong fails in a
node: too few or too many image tokens in `ScatterND` named
`main/merge_image_features:input_ids_need_exactly_<N>_image_tokens`, ids outside the vocabulary in
the embedding Gather, an empty image in the first resampling Gather; max_new_tokens = 0 returns
[1, 0]; a prompt longer than the model's positions is not caught. `check_inputs` checks all of this in
Python with clear messages, from the numbers in the model's `smolvlm_mobile` metadata (JSON: ids,
sizes, limits, the prompt prefix/suffix ids), which an app can read to check the same.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from smolvlm_edge.export.mobile_tokenizer import check_question
from smolvlm_edge.runtime.errors import PromptError
from smolvlm_edge.runtime.images import MAX_IMAGE_PIXELS

METADATA_KEY = "smolvlm_mobile"


def open_mobile_session(path: str | Path, providers=None, threads: int | None = None):
    """An onnxruntime session for the model; onnxruntime-extensions' ops are registered when installed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    # Hides onnxruntime's load-time warning that the initializer `max_new_tokens` is also an input: that is
    # the point (an overridable default); it is used only as the Loop's trip count, never folded.
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    try:
        import onnxruntime_extensions
        options.register_custom_ops_library(onnxruntime_extensions.get_library_path())
    except ImportError:
        pass
    return ort.InferenceSession(str(path), options, providers=providers or ["CPUExecutionProvider"])


def model_info(session) -> dict:
    """The `smolvlm_mobile` metadata of a session's model (ids, sizes, limits an app checks inputs against)."""
    raw = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    if raw is None:
        raise PromptError(f"the model has no {METADATA_KEY!r} metadata: not built by build_mobile_model")
    return json.loads(raw)


def check_inputs(image: np.ndarray, input_ids, info: dict | None = None, max_new_tokens: int | None = None) -> None:
    """What the graph cannot check itself. `info`: `model_info(session)` (without it, only shape/dtype checks).

    image: uint8 [H, W, 3] RGB, 1 <= H, W and H * W <= MAX_IMAGE_PIXELS. input_ids: int64-compatible [1, T] with
    exactly one global-image block (`tokens_per_image` image tokens), ids in the vocabulary, and T + max_new_tokens
    within the model's positions; max_new_tokens >= 1. A question string (with_tokenizer): see check_question.
    """
    from smolvlm_edge.runtime.errors import ImageError

    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ImageError(f"image must be uint8 [height, width, 3] RGB, got {image.dtype} {list(image.shape)} "
                         "(drop alpha by compositing on white, convert grey to RGB)")
    if image.shape[0] < 1 or image.shape[1] < 1:
        raise ImageError(f"image has zero size {list(image.shape)}")
    if image.shape[0] * image.shape[1] > (info or {}).get("max_image_pixels", MAX_IMAGE_PIXELS):
        raise ImageError(f"image of {image.shape[1]}x{image.shape[0]} pixels is larger than the runtime accepts")
    if max_new_tokens is not None and int(max_new_tokens) < 1:
        raise PromptError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if isinstance(input_ids, str):
        if info is not None and not info.get("with_tokenizer"):
            raise PromptError("this model takes input_ids, not a question string (build it with with_tokenizer=True)")
        if info is not None:
            check_question(input_ids, info.get("tokenizer") or {"refused_texts": ["<image>"]})
        return
    if info is not None and info.get("with_tokenizer"):
        raise PromptError("this model takes a question string, not input_ids")
    ids = np.asarray(input_ids)
    if ids.ndim != 2 or ids.shape[0] != 1 or ids.shape[1] < 1 or not np.issubdtype(ids.dtype, np.integer):
        raise PromptError(f"input_ids must be integer [1, sequence_length], got {ids.dtype} {list(ids.shape)}")
    if info is None:
        return
    if ids.min() < 0 or ids.max() >= info["vocab_size"]:
        raise PromptError(f"input_ids must lie in [0, {info['vocab_size']}), got [{ids.min()}, {ids.max()}]")
    found = int((ids == info["image_token_id"]).sum())
    if found != info["tokens_per_image"]:
        raise PromptError(f"input_ids hold {found} image tokens; the model takes one image without splitting: "
                          f"{info['tokens_per_image']} (build them with do_image_splitting=False)")
    budget = info["max_new_tokens"] if max_new_tokens is None else int(max_new_tokens)
    if ids.shape[1] + budget > info["max_position_embeddings"]:
        raise PromptError(f"{ids.shape[1]} prompt tokens + max_new_tokens={budget} exceed the model's "
                          f"{info['max_position_embeddings']} positions")


def _feeds(session, image, input_ids, max_new_tokens) -> dict:
    info = model_info(session)
    check_inputs(image, input_ids, info, max_new_tokens)
    feeds = {"image": np.ascontiguousarray(image, dtype=np.uint8)}
    if info["with_tokenizer"]:
        feeds["question"] = np.array([input_ids], dtype=object)
    else:
        feeds["input_ids"] = np.asarray(input_ids, dtype=np.int64)
    if max_new_tokens is not None:
        feeds["max_new_tokens"] = np.array(max_new_tokens, dtype=np.int64)
    return feeds


def run_mobile_model(path, image_rgb_uint8: np.ndarray, input_ids, max_new_tokens: int | None = None,
                     providers=None) -> list[int]:
    """Generated ids (stop token included). `path`: the .onnx file or an open session; `input_ids`: [1, T] ids,
    or the question string for a with_tokenizer model."""
    session = path if hasattr(path, "run") else open_mobile_session(path, providers)
    out = session.run(["generated_ids"], _feeds(session, image_rgb_uint8, input_ids, max_new_tokens))[0]
    return [int(t) for t in out.reshape(-1)]


def mobile_answer(path, image_rgb_uint8: np.ndarray, question: str, max_new_tokens: int | None = None,
                  providers=None) -> tuple[str, list[int]]:
    """(answer text, generated ids) of a with_tokenizer model."""
    session = path if hasattr(path, "run") else open_mobile_session(path, providers)
    try:
        answer, ids = session.run(["answer", "generated_ids"], _feeds(session, image_rgb_uint8, question, max_new_tokens))
    except UnicodeDecodeError as exc:
        raise PromptError("the answer's bytes are not valid UTF-8 (a character cut by max_new_tokens, or an untrained "
                          "model); read `generated_ids` (run_mobile_model) and decode them leniently") from exc
    return str(answer.reshape(-1)[0]), [int(t) for t in ids.reshape(-1)]
