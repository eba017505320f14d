"""One-file SmolVLM for apps: image preprocessing, vision, embeddings and the whole greedy loop in one ONNX graph.

`build_mobile_model(bundle_dir, output)` writes one .onnx file (weights inside; above ~1.9 GiB in
`<output>.<build>.data` beside it, `weights_files(output)`) that an app runs with one `session.run` on
stock onnxruntime (CPU EP: the fused graphs' com.microsoft ops need it; a bundle exported with
`--attention plain` gives a file of ai.onnx ops only):

    inputs   image           uint8 [height, width, 3]  RGB, any size: EXIF rotation applied and alpha
                             composited on white by the app (what load_image/to_rgb do here)
             input_ids       int64 [1, sequence_length] the prompt as `SmolVLM.prepare(...)` builds it for
                             one image with image splitting OFF; equals metadata `prompt_prefix_ids` +
                             tokenizer(question) + `prompt_suffix_ids`
             max_new_tokens  int64 []  optional: a graph input with an initializer of the same name (the
                             build's default); onnxruntime lists it under get_overridable_initializers()
    outputs  generated_ids   int64 [1, new_tokens] greedy ids; the first stop token (eos or
                             <end_of_utterance>, the runtime's `stop_token_ids`) ends it and is included

With `with_tokenizer=True` (onnxruntime-extensions ops, domain ai.onnx.contrib; the app registers the
extensions library) `input_ids` becomes `question` (string [1]) and `answer` (string [1], special tokens
skipped) is added. Splitting off makes the chat template and image tokens around the question constant ids
(checked at build: prefix + tokenizer(question) + suffix equals the runtime's ids). `tokenizer_op` picks the
encoder, "gpt2" (GPT2Tokenizer, the default) or "hf_json" (HfJsonTokenizer): the tokenizer ops, what each
refuses and their build-time check are in mobile_tokenizer.py.

Preprocessing equals the runtime's `ImageProcessor` with splitting off, bit for bit: Pillow's resampling
repeated in ONNX (mobile_preprocess.py).

Then the bundle's vision_encoder, embed_tokens and decoder_model_merged graphs, inlined (values renamed
`vision/`, `embed/`, `step/decoder/`, `step/embed/`); their weights stored once in the main graph and
read from the Loop body as outer-scope values; identical tensors stored once. Image features replace
the embeddings at the image-token positions (row-major, ScatterND). The greedy `Loop` (trip count
max_new_tokens, cond = the last token is not a stop token): iteration 0 runs the prompt (prefill),
later ones the last token, with num_logits_to_keep=1. Loop-carried: the embeddings to feed (the
prompt's, then the last token's: the token's embedding is taken in the body), and the KV cache (past
tensors of exactly the past length; present = past + new is the next past). The attention length is
past + fed length, read from the shapes; position ids are arange over it. Scan output: the token.

Input checks: what onnxruntime and the graph refuse, and `check_inputs`, in mobile_run.py.

Modules, one job each (every public name is importable from here):

    mobile.py             assembling the model: the graphs inlined, the decode Loop, metadata, saving
    mobile_nodes.py       _Nodes, the node builder the graphs share
    mobile_preprocess.py  in-graph preprocessing (Pillow's resampling), build_preprocess_model
    mobile_tokenizer.py   onnxruntime-extensions tokenizer/detokenizer nodes, check_question, tokenizer_probe
    mobile_merge.py       merging graphs: weights stored once, nodes inlined, node order
    mobile_run.py         running it: open_mobile_session, run_mobile_model, mobile_answer, check_inputs,
                          model_info
"""
from __future__ import annotations

import glob
import json
import os
import shutil
import tempfile
import uuid
from pathlib import Path

import numpy as np

from smolvlm_edge.export.graph import load_with_weights
from smolvlm_edge.export.graph_order import all_nodes, toposort
from smolvlm_edge.export.mobile_merge import _inline, _Weights
from smolvlm_edge.export.mobile_nodes import _Nodes
from smolvlm_edge.export.mobile_preprocess import _preprocess, build_preprocess_model
from smolvlm_edge.export.mobile_run import (METADATA_KEY, check_inputs, mobile_answer, model_info, open_mobile_session,
                                            run_mobile_model)
from smolvlm_edge.export.mobile_tokenizer import (CONTRIB_DOMAIN, CONTROL_WHITESPACE, TOKENIZER_OPS, TOKENIZER_SAMPLES,
                                                  _check_tokenizer, _detokenizer_nodes, _tokenizer_nodes, check_question,
                                                  tokenizer_probe)
from smolvlm_edge.export.ort_format import ort_files_made_from
from smolvlm_edge.runtime.bundle import default_file_mode, open_bundle
from smolvlm_edge.runtime.errors import ExportError
from smolvlm_edge.runtime.images import MAX_IMAGE_PIXELS, ImageConfig
from smolvlm_edge.runtime.prompt import TextProcessor

__all__ = [
    "CONTRIB_DOMAIN", "CONTROL_WHITESPACE", "EXTERNAL_DATA_THRESHOLD", "METADATA_KEY", "TOKENIZER_OPS", "TOKENIZER_SAMPLES",
    "build_mobile_model", "build_preprocess_model", "check_inputs", "check_question", "mobile_answer", "model_info",
    "open_mobile_session", "prompt_pieces", "run_mobile_model", "tokenizer_probe", "weights_files",
]

EXTERNAL_DATA_THRESHOLD = int(1.9 * 2**30)  # protobuf cannot hold 2 GiB: above this, weights go to a file beside it


# ---------------------------------------------------------------- prompt constants


def prompt_pieces(text: TextProcessor) -> tuple[list[int], list[int]]:
    """Ids before and after the question for one image with splitting off: the runtime's prompt is
    prefix + tokenizer(question) + suffix (checked on sample questions here)."""
    marker = "\ue000question\ue000"  # a private-use character: no chat template or tokenizer special-cases it
    rendered = text.expand_image_tokens(text.render(text.messages_for(marker, 1)), [0], [0])
    if rendered.count(marker) != 1:
        raise ExportError("the chat template does not place the question once; cannot make the prompt constant")
    before, after = rendered.split(marker)
    prefix, suffix = text.encode(before), text.encode(after)
    for question in ("What is in this image?", " Describe it,  briefly.\nThanks!", "ok"):
        full = text.encode(text.expand_image_tokens(text.render(text.messages_for(question, 1)), [0], [0]))
        if full != prefix + text.encode(question) + suffix:
            raise ExportError(f"the prompt ids are not prefix + tokenizer(question) + suffix for {question!r} "
                              "(the tokenizer merges across the template's text); the constant-prompt model cannot be built")
    return prefix, suffix


# ---------------------------------------------------------------- the one-file model


def _elem_type(values, name: str) -> int:
    for v in values:
        if v.name == name:
            return v.type.tensor_type.elem_type
    raise ExportError(f"graph has no input/output named {name!r}")


def _cast_if(b: _Nodes, value: str, have: int, want: int) -> str:
    return value if have == want else b("Cast", value, to=want)


def _load_graphs(bundle, precision):
    from smolvlm_edge.runtime.bundle import GRAPH_NAMES

    chosen = precision if isinstance(precision, dict) else {}
    default = precision if isinstance(precision, str) else "fp32"
    unknown = set(chosen) - set(GRAPH_NAMES)
    if unknown:
        raise ExportError(f"precision names unknown graph(s) {sorted(unknown)}; graphs: {', '.join(GRAPH_NAMES)}")
    picked = {name: chosen.get(name, default) for name in GRAPH_NAMES}
    models = {name: load_with_weights(bundle.graph_file(name, p)) for name, p in picked.items()}
    return models, picked


def _opsets(models) -> dict[str, int]:
    """Union of the graphs' opset imports; one ai.onnx version >= 18 (the nodes are moved as they are)."""
    opsets: dict[str, int] = {}
    default_versions = set()
    for name, model in models.items():
        if len(model.functions):
            raise ExportError(f"{name} has model-local functions; inline them first (onnx.inliner)")
        for o in model.opset_import:
            domain = "" if o.domain == "ai.onnx" else o.domain
            if not domain:
                default_versions.add(o.version)
            opsets[domain] = max(opsets.get(domain, 0), o.version)
    if len(default_versions) != 1 or min(default_versions) < 18:
        raise ExportError(f"the graphs must share one ai.onnx opset >= 18 to be merged, got {sorted(default_versions)}")
    return opsets


def _decode_loop(b: _Nodes, models, weights, text_cfg: dict, stop_ids: list[int], embeds_type: int):
    """The Loop body: decoder step, greedy choice, stop test, the next token's embedding."""
    from onnx import TensorProto as TP
    from onnx import helper

    decoder, embed = models["decoder_model_merged"].graph, models["embed_tokens"].graph
    layers = int(text_cfg["num_layers"])
    past_names = [text_cfg[f"past_{kind}_name"] % i for i in range(layers) for kind in ("key", "value")]
    present_names = [text_cfg[f"present_{kind}_name"] % i for i in range(layers) for kind in ("key", "value")]
    past_type = _elem_type(decoder.input, past_names[0])
    kv_heads, head_dim = int(text_cfg["num_kv_heads"]), int(text_cfg["head_dim"])
    hidden = int(text_cfg["hidden_size"])

    s = _Nodes("step/")
    i, cond, embeds = "step/i", "step/cond", "step/embeds"
    pasts = [f"step/{n}" for n in past_names]
    past_len = s("Shape", pasts[0], start=2, end=3)  # [1]
    total = s("Add", past_len, s("Shape", embeds, start=1, end=2))
    mask = s("Expand", s.const([[1]]), s("Concat", s.const([1]), total, axis=0))  # [1, past + new]
    positions = s("Unsqueeze", s("Range", s("Squeeze", past_len, s.const([0])), s("Squeeze", total, s.const([0])),
                                  s.const(1)), s.const([0]))
    feeds = {"inputs_embeds": _cast_if(s, embeds, embeds_type, _elem_type(decoder.input, "inputs_embeds")),
             "attention_mask": mask, "position_ids": positions, **dict(zip(past_names, pasts))}
    if any(v.name == "num_logits_to_keep" for v in decoder.input):
        feeds["num_logits_to_keep"] = s.const(1)
    dec_nodes, dec_out = _inline(decoder, "step/decoder/", feeds, weights["decoder_model_merged"])
    s.nodes += dec_nodes
    last = s("Slice", dec_out["logits"], s.const([-1]), s.const([2**62]), s.const([1]))  # [1, 1, V]
    last = _cast_if(s, last, _elem_type(decoder.output, "logits"), TP.FLOAT)
    token = s("ArgMax", last, axis=-1, keepdims=0)  # [1, 1]: greedy, first index on ties (as numpy)
    emb_nodes, emb_out = _inline(embed, "step/embed/", {"input_ids": token}, weights["embed_tokens"])
    s.nodes += emb_nodes
    stopped = s("ReduceMax", s("Cast", s("Equal", token, s.const(stop_ids)), to=TP.INT64), keepdims=0)
    cond_out = s("Equal", stopped, s.const(0))
    token_out = s("Reshape", token, s.const(np.zeros(0, np.int64)))  # scalar scan output

    kv = lambda n, dim: helper.make_tensor_value_info(n, past_type, [1, kv_heads, dim, head_dim])  # noqa: E731
    body = helper.make_graph(
        toposort(s.nodes), "greedy_step",
        [helper.make_tensor_value_info(i, TP.INT64, []), helper.make_tensor_value_info(cond, TP.BOOL, []),
         helper.make_tensor_value_info(embeds, embeds_type, [1, "step_length", hidden])]
        + [kv(n, "past_length") for n in pasts],
        [helper.make_tensor_value_info(cond_out, TP.BOOL, []),
         helper.make_tensor_value_info(emb_out["inputs_embeds"], embeds_type, [1, 1, hidden])]
        + [kv(dec_out[n], "present_length") for n in present_names]
        + [helper.make_tensor_value_info(token_out, TP.INT64, [])],
    )
    empty = np.zeros((1, kv_heads, 0, head_dim), dtype=helper.tensor_dtype_to_np_dtype(past_type))
    return body, [b.const(empty, empty.dtype) for _ in pasts]


def build_mobile_model(
    bundle_dir: str | Path,
    output_path: str | Path,
    precision: str | dict[str, str] = "fp32",
    max_new_tokens: int = 128,
    with_tokenizer: bool = False,
    progress=None,
    verify: bool = True,
    stop_token_ids: list[int] | None = None,
    tokenizer_op: str = "gpt2",
) -> Path:
    """Write one ONNX file: image (+ prompt ids, or a question) -> greedy ids (+ answer). See the module docstring.

    `precision`: one precision for all graphs or {graph: precision}; `verify`: load the file in onnxruntime
    before returning (it holds the weights in memory once more); `progress`: called with a line per step;
    `stop_token_ids`: instead of the bundle's (benchmarks pass [-1], never produced, to decode exactly N);
    `tokenizer_op`: with_tokenizer's encoder, "gpt2" (onnxruntime-extensions 0.13.0 has it) or "hf_json"."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    say = progress or (lambda _msg: None)
    if max_new_tokens < 1:
        raise ExportError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
    if tokenizer_op not in TOKENIZER_OPS:
        raise ExportError(f"unknown tokenizer_op {tokenizer_op!r}; use one of {', '.join(TOKENIZER_OPS)}")
    bundle = open_bundle(bundle_dir)
    text, config = TextProcessor.from_dir(bundle.path), ImageConfig.from_dir(bundle.path)
    text_cfg, vision_cfg = bundle.text, bundle.vision
    side, tokens_per_image = int(vision_cfg["image_size"]), int(vision_cfg["tokens_per_image"])
    if config.tile_size != side:
        raise ExportError(f"max_image_size {config.tile_size} in the processor config but the vision graph takes {side}")
    models, picked = _load_graphs(bundle, precision)
    opsets = _opsets(models)
    say(f"merging {', '.join(f'{g}={p}' for g, p in picked.items())} from {bundle.path}")

    weights = _Weights()
    # The decoder first: a table it shares with embed_tokens stays a plain initializer for its MatMulNBits.
    inits = {name: weights.add_graph(models[name].graph, f"{short}/")
             for name, short in (("decoder_model_merged", "decoder"), ("embed_tokens", "embed"), ("vision_encoder", "vision"))}
    b = _Nodes("main/")
    b.nodes += weights.nodes
    inputs = [helper.make_tensor_value_info("image", TP.UINT8, ["height", "width", 3])]
    outputs = [helper.make_tensor_value_info("generated_ids", TP.INT64, [1, "new_tokens"])]
    try:
        prefix_ids, suffix_ids = prompt_pieces(text)
    except ExportError as exc:
        if with_tokenizer:
            raise
        say(f"no constant prompt prefix/suffix in the metadata: {exc}")
        prefix_ids = suffix_ids = None
    tokenizer_info = None
    if with_tokenizer:
        inputs.append(helper.make_tensor_value_info("question", TP.STRING, [1]))
        encoder, tokenizer_info = _tokenizer_nodes(bundle.path, text, "question", "tokenizer/question_ids", tokenizer_op)
        b.nodes += encoder
        ids = b("Concat", b.const([prefix_ids]), "tokenizer/question_ids", b.const([suffix_ids]), axis=1)
    else:
        inputs.append(helper.make_tensor_value_info("input_ids", TP.INT64, [1, "sequence_length"]))
        ids = "input_ids"
    inputs.append(helper.make_tensor_value_info("max_new_tokens", TP.INT64, []))
    budget = onnx.numpy_helper.from_array(np.array(max_new_tokens, dtype=np.int64), name="max_new_tokens")

    # Image -> features [1, tokens, D]
    pixels = _preprocess(b, "image", config)
    mask = b("ConstantOfShape", b.const([1, 1, side, side]), value=helper.make_tensor("true", TP.BOOL, [1], [True]))
    vision = models["vision_encoder"].graph
    pixels = _cast_if(b, pixels, TP.FLOAT, _elem_type(vision.input, "pixel_values"))
    nodes, vis_out = _inline(vision, "vision/", {"pixel_values": pixels, "pixel_attention_mask": mask}, inits["vision_encoder"])
    b.nodes += nodes
    # Prompt embeddings with the features written over the image tokens (row-major, as masked_scatter)
    embed = models["embed_tokens"].graph
    nodes, emb_out = _inline(embed, "embed/", {"input_ids": ids}, inits["embed_tokens"])
    b.nodes += nodes
    embeds_type = _elem_type(embed.output, "inputs_embeds")
    slots = b("Transpose", b("NonZero", b("Equal", ids, b.const(text.image_token_id))), perm=[1, 0])  # [K, 2]
    features = b("Reshape", vis_out["image_features"], b.const([-1, int(text_cfg["hidden_size"])]))
    features = _cast_if(b, features, _elem_type(vision.output, "image_features"), embeds_type)
    # ScatterND fails when the feature rows and the image tokens differ; its name says what is wrong.
    prompt = "main/prompt_embeds"
    b.nodes.append(helper.make_node("ScatterND", [emb_out["inputs_embeds"], slots, features], [prompt],
                                    name=f"main/merge_image_features:input_ids_need_exactly_{tokens_per_image}_image_tokens"))

    # The greedy loop: iteration 0 = prefill, then one token per iteration
    stop_ids = sorted(text.stop_token_ids if stop_token_ids is None else stop_token_ids)
    body, empty_pasts = _decode_loop(b, models, inits, text_cfg, stop_ids, embeds_type)
    n_carried = len(empty_pasts) + 1
    loop_outs = [f"main/loop_final_{k}" for k in range(n_carried)] + ["main/loop_tokens"]
    b.nodes.append(helper.make_node("Loop", ["max_new_tokens", b.const(True, np.bool_), prompt, *empty_pasts],
                                    loop_outs, name="main/greedy_loop", body=body))
    b.nodes.append(helper.make_node("Unsqueeze", ["main/loop_tokens", b.const([0])], ["generated_ids"], name="main/ids"))
    if with_tokenizer:
        outputs.append(helper.make_tensor_value_info("answer", TP.STRING, [1]))
        decoder = _detokenizer_nodes(text, "generated_ids", "answer")
        b.nodes += decoder
        opsets[CONTRIB_DOMAIN] = 1
        _check_tokenizer(encoder + decoder, text, tokenizer_info)

    graph = helper.make_graph(toposort(b.nodes), "smolvlm_mobile", inputs, outputs, initializer=weights.tensors + [budget])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              ir_version=max(m.ir_version for m in models.values()), producer_name="smolvlm-edge")
    info = _info(bundle, text, config, picked, max_new_tokens, with_tokenizer, prefix_ids, suffix_ids, stop_ids)
    info["tokenizer"] = tokenizer_info
    helper.set_model_props(model, {METADATA_KEY: json.dumps(info)})
    summary = (f"{_count_nodes(model.graph)} nodes, {weights.nbytes / 2**20:.2f} MiB of weights, "
               f"{weights.saved_bytes / 2**20:.2f} MiB not stored twice")
    final = Path(output_path)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.partial-", dir=final.parent))  # same disk: renames
    try:
        staged, data = staging / final.name, _save(model, staging / final.name, weights.nbytes)
        del model, graph, models, weights  # the weights once in memory while onnxruntime loads the file
        if verify:
            try:
                open_mobile_session(staged)  # onnxruntime parses, type-checks and plans every node, subgraphs included
            except Exception as exc:
                raise ExportError(f"onnxruntime cannot load the model built from {bundle.path} (not written): "
                                  f"{exc}") from exc
        # An .ort converted from the file this replaces would outlive it beside the new one: remove it.
        stale = [f for f in ort_files_made_from(final) if f.is_file()]
        for file in stale:
            file.unlink()
        if stale:
            say(f"removed {', '.join(f.name for f in stale)}: converted from the {final.name} this build replaces")
        # The weights under a name of their own first, then the graph that names them, in one rename: until
        # then the previous graph still reads its own weights file, after it the new graph reads the new one.
        kept = None if data is None else final.with_name(data.name)
        if data is not None:
            os.replace(data, kept)
        os.replace(staged, final)
        for old in weights_files(final):  # earlier builds' weights, which no graph reads now
            if old != kept:
                old.unlink()
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    say(f"wrote {final} ({summary})")
    return final


def _info(bundle, text, config, picked, max_new_tokens, with_tokenizer, prefix_ids, suffix_ids, stop_ids) -> dict:
    import PIL

    return {
        "format": "smolvlm-mobile", "format_version": 1,
        "source": bundle.manifest.get("source", {}).get("model"), "precision": picked,
        "image_token_id": text.image_token_id, "tokens_per_image": int(bundle.vision["tokens_per_image"]),
        "vision_size": int(bundle.vision["image_size"]), "vocab_size": int(bundle.text["vocab_size"]),
        "max_position_embeddings": int(bundle.text["max_position_embeddings"]),
        "stop_token_ids": stop_ids, "max_new_tokens": max_new_tokens, "with_tokenizer": with_tokenizer,
        "prompt_prefix_ids": prefix_ids, "prompt_suffix_ids": suffix_ids, "max_image_pixels": MAX_IMAGE_PIXELS,
        "preprocessing": {"longest_edge": config.longest_edge if config.do_resize else None, "resample": config.resample,
                          "rescale_factor": config.rescale_factor if config.do_rescale else None,
                          "image_mean": list(config.image_mean) if config.do_normalize else None,
                          "image_std": list(config.image_std) if config.do_normalize else None,
                          "reference": f"Pillow {PIL.__version__}"},
    }


def _count_nodes(graph) -> int:
    return sum(1 for _ in all_nodes(graph))


def weights_files(model_path: str | Path) -> list[Path]:
    """The weights files beside a mobile .onnx (`<name>.<build>.data`; an older build's `<name>.data`): a
    finished build leaves the one its graph reads, or none when the weights are inside the graph."""
    path = Path(model_path)
    found = [path.with_name(path.name + ".data"), *path.parent.glob(f"{glob.escape(path.name)}.*.data")]
    return sorted(f for f in found if f.is_file())


def _save(model, path: Path, weight_bytes: int) -> Path | None:
    """Write `path` (into the staging folder) with the weights inside, or above ~1.9 GiB in `<name>.<build>.data`
    beside it, a name no earlier build used (the previous graph's weights stay until the new graph replaces
    it); returns that weights file, or None."""
    import onnx

    data = None
    if weight_bytes > EXTERNAL_DATA_THRESHOLD:
        data = path.with_name(f"{path.name}.{uuid.uuid4().hex[:12]}.data")
        onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=data.name, size_threshold=1024)
        default_file_mode(data)  # onnx writes external data 0600
    else:
        onnx.save_model(model, str(path))
    default_file_mode(path)
    # The ONNX checker refuses onnxruntime's SimplifiedLayerNormalization (an ai.onnx-domain name it does
    # not know) inside the Loop body; onnxruntime itself is the check (build_mobile_model loads the file).
    return data
