"""One-file SmolVLM for apps: image preprocessing, vision, embeddings and the whole greedy loop in one ONNX graph.

`build_mobile_model(bundle_dir, output)` writes `smolvlm_mobile.onnx`, which an app runs with one
`session.run` on stock onnxruntime (CPU EP; the fused decoder's com.microsoft ops need it):

    inputs   image           uint8 [height, width, 3]  RGB, any size (composite alpha on white first)
             input_ids       int64 [1, sequence_length] the prompt as `SmolVLM.prepare(...)` builds it for
                             one image with image splitting OFF (metadata `prompt_prefix_ids` +
                             tokenizer(question) + `prompt_suffix_ids` is the same sequence)
             max_new_tokens  int64 []  optional: an overridable initializer (default: the build's)
    outputs  generated_ids   int64 [1, new_tokens] greedy ids; the first stop token (eos or
                             <end_of_utterance>, the runtime's `stop_token_ids`) ends it and is included

With `with_tokenizer=True` (onnxruntime-extensions' HfJsonTokenizer and BpeDecoder ops, domain
ai.onnx.contrib) `input_ids` is replaced by `question` (string [1]) and an `answer` (string [1])
output is added: the chat template around the question and the image tokens are constant ids here,
because splitting off makes them fixed.

Preprocessing equals the runtime's `ImageProcessor` with splitting off, pixel for pixel. The
processor resizes twice with Pillow (longest edge to `size.longest_edge`, then a square
`max_image_size` frame), in Pillow's separable fixed-point convolution (LANCZOS for SmolVLM: no ONNX
Resize mode has it). The graph repeats Pillow's algorithm: per axis it computes Pillow's filter
weights in float64 and rounds them to its 22-bit integers, then accumulates `ksize` gathered
columns in int32 in a Loop, rounds and clips to uint8 values, width pass before height pass.
Measured max |difference| against the Python processor: 0 (uint8 pixels and normalized float32
values) on test images from 1x1 to 1500x1100, upscaled and downscaled (tests/test_mobile.py checks a
set of sizes). float64 `Sin` in onnxruntime may differ from libm by an ulp, which can move a 22-bit
weight by one step only when it lies on a rounding boundary: never seen. Resampling filters: all of
Pillow's except NEAREST (refused at build time).

Then the bundle's vision_encoder, embed_tokens and decoder_model_merged graphs (inlined, values
renamed `vision/`, `embed/`, `step/...`; weights stored once in the main graph, identical tensors
deduplicated, e.g. a q4 embed table that shares the decoder's lm_head); image features replace the
embeddings at image-token positions (row-major, ScatterND); and a `Loop`: iteration 0 runs the
prompt (prefill), later ones the last token. Loop-carried: the embeddings to feed (the prompt's,
then the last token's), the KV cache (past tensors of exactly the past length; the graph's present
outputs, past + new, are the next past). The attention length is the past length plus the fed
length, read from the shapes. Scan output: the token. Trip count: max_new_tokens; cond: not a stop token.

Input checks. onnxruntime itself refuses a wrong dtype, a wrong rank, a channel count other than 3
and a batch other than 1, naming the input. What the graph cannot check (ONNX has no assertion op)
and the app must ensure, `check_inputs` checks in Python: exactly `tokens_per_image` image tokens in
one global-image block (else ScatterND fails with a shape error), ids inside the vocabulary (else
Gather fails), prompt + max_new_tokens within the model's positions, max_new_tokens >= 1 (0 gives an
empty result), a non-empty image of at most MAX_IMAGE_PIXELS pixels. The model's metadata
(`smolvlm_mobile`, JSON) carries the numbers an app needs for these checks.
"""
from __future__ import annotations

import base64
import hashlib
import json
import math
from pathlib import Path

import numpy as np

from smolvlm_edge.runtime.bundle import open_bundle
from smolvlm_edge.runtime.errors import ExportError, PromptError
from smolvlm_edge.runtime.images import MAX_IMAGE_PIXELS, ImageConfig
from smolvlm_edge.runtime.prompt import TextProcessor

METADATA_KEY = "smolvlm_mobile"
CONTRIB_DOMAIN = "ai.onnx.contrib"  # onnxruntime-extensions' custom ops
EXTERNAL_DATA_THRESHOLD = int(1.9 * 2**30)  # protobuf cannot hold 2 GiB: above this, weights go to `<output>.data`
_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)
_FILTERS = {1: ("lanczos", 3.0), 2: ("bilinear", 1.0), 3: ("bicubic", 2.0), 4: ("box", 0.5), 5: ("hamming", 1.0)}
_MAX_SIDE = 4096  # transformers' cap on a resized side; fit_longest_edge never reaches it when longest_edge <= this


# ---------------------------------------------------------------- graph building


class _Nodes:
    """Appends nodes with unique names `prefix + op_n`; calling it returns the output name(s)."""

    def __init__(self, prefix: str):
        self.prefix, self.nodes, self.count = prefix, [], 0
        self._consts: dict[tuple, str] = {}

    def __call__(self, op: str, *inputs: str, n_out: int = 1, domain: str = "", **attrs):
        from onnx import helper

        self.count += 1
        base = f"{self.prefix}{op}_{self.count}"
        outs = [base] if n_out == 1 else [f"{base}_{i}" for i in range(n_out)]
        self.nodes.append(helper.make_node(op, list(inputs), outs, name=base, domain=domain, **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype=np.int64) -> str:
        """A Constant node, one per distinct value in this graph."""
        from onnx import numpy_helper

        array = np.asarray(value, dtype=dtype)
        key = (array.dtype.str, array.shape, array.tobytes())
        if key not in self._consts:
            self._consts[key] = self("Constant", value=numpy_helper.from_array(array))
        return self._consts[key]


def _tp(dtype) -> int:
    from onnx import helper

    return helper.np_dtype_to_tensor_dtype(np.dtype(dtype))


# ---------------------------------------------------------------- preprocessing (Pillow's resample, in ONNX)


def _filter(b: _Nodes, name: str, x: str) -> str:
    """Pillow's filter functions (libImaging/Resample.c) on a float64 tensor, same operation order."""
    f = lambda v: b.const(v, np.float64)  # noqa: E731
    zero, one = f(0.0), f(1.0)
    if name == "box":
        inside = b("And", b("Greater", x, f(-0.5)), b("LessOrEqual", x, f(0.5)))
        return b("Where", inside, one, zero)
    if name == "lanczos":
        def sinc(v):
            xp = b("Mul", v, f(math.pi))
            return b("Where", b("Equal", v, zero), one, b("Div", b("Sin", xp), xp))
        inside = b("And", b("GreaterOrEqual", x, f(-3.0)), b("Less", x, f(3.0)))
        return b("Where", inside, b("Mul", sinc(x), sinc(b("Div", x, f(3.0)))), zero)
    ax = b("Abs", x)
    if name == "bilinear":
        return b("Where", b("Less", ax, one), b("Sub", one, ax), zero)
    if name == "bicubic":  # a = -0.5: ((a+2)x - (a+3)) x x + 1 ; (((x-5)x + 8)x - 4) a
        near = b("Add", b("Mul", b("Mul", b("Sub", b("Mul", f(1.5), ax), f(2.5)), ax), ax), one)
        far = b("Mul", b("Sub", b("Mul", b("Add", b("Mul", b("Sub", ax, f(5.0)), ax), f(8.0)), ax), f(4.0)), f(-0.5))
        return b("Where", b("Less", ax, one), near, b("Where", b("Less", ax, f(2.0)), far, zero))
    if name == "hamming":  # sin(x)/x * (0.54f + 0.46f cos(x)), with the float literals of the C code
        xp = b("Mul", ax, f(math.pi))
        window = b("Add", f(float(np.float32(0.54))), b("Mul", f(float(np.float32(0.46))), b("Cos", xp)))
        value = b("Mul", b("Div", b("Sin", xp), xp), window)
        return b("Where", b("Equal", ax, zero), one, b("Where", b("GreaterOrEqual", ax, one), zero, value))
    raise ExportError(f"unknown filter {name!r}")


def _coefficients(b: _Nodes, in_size: str, out_size: str, filt: str, support: float):
    """Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc`: tap indices [out, K] and int32 weights [out, K]."""
    from onnx import TensorProto as TP

    f = lambda v: b.const(v, np.float64)  # noqa: E731
    scale = b("Div", b("Cast", in_size, to=TP.DOUBLE), b("Cast", out_size, to=TP.DOUBLE))
    filterscale = b("Max", scale, f(1.0))
    reach = b("Mul", f(support), filterscale)
    ksize = b("Add", b("Mul", b("Cast", b("Ceil", reach), to=TP.INT64), b.const(2)), b.const(1))
    ss = b("Div", f(1.0), filterscale)
    center = b("Mul", b("Add", b("Cast", b("Range", b.const(0), out_size, b.const(1)), to=TP.DOUBLE), f(0.5)), scale)
    # (int) truncates toward zero, as Cast does; the clamps follow.
    xmin = b("Max", b("Cast", b("Add", b("Sub", center, reach), f(0.5)), to=TP.INT64), b.const(0))
    xmax = b("Min", b("Cast", b("Add", b("Add", center, reach), f(0.5)), to=TP.INT64), in_size)
    count = b("Sub", xmax, xmin)
    taps = b("Unsqueeze", b("Range", b.const(0), ksize, b.const(1)), b.const([0]))  # [1, K]
    pos = b("Add", b("Unsqueeze", xmin, b.const([1])), taps)  # [out, K]
    valid = b("Less", taps, b("Unsqueeze", count, b.const([1])))
    arg = b("Mul", b("Add", b("Sub", b("Cast", pos, to=TP.DOUBLE), b("Unsqueeze", center, b.const([1]))), f(0.5)), ss)
    w = b("Where", valid, _filter(b, filt, arg), f(0.0))
    # The C code sums left to right; CumSum does too (trailing zeros add nothing).
    total = b("Slice", b("CumSum", w, b.const(1)), b.const([-1]), b.const([2**62]), b.const([1]))  # [out, 1]
    k = b("Where", b("Equal", total, f(0.0)), w, b("Div", w, total))
    scaled = b("Mul", k, f(float(1 << _PRECISION_BITS)))
    rounded = b("Where", b("Less", k, f(0.0)), b("Add", scaled, f(-0.5)), b("Add", scaled, f(0.5)))
    weights = b("Cast", rounded, to=TP.INT32)
    index = b("Min", pos, b("Sub", in_size, b.const(1)))  # taps past the end have weight 0
    return index, weights, ksize


def _resample(b: _Nodes, x: str, axis: int, out_size: str, coefficients: tuple[str, str, str]) -> str:
    """One Pillow pass over int32 [H, W, 3] along `axis` (1: width, 0: height); uint8-valued int32 out."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    index, weights, ksize = coefficients
    shape = b("Shape", x)
    out_1d = b("Unsqueeze", out_size, b.const([0]))
    if axis == 1:
        new_shape = b("Concat", b("Slice", shape, b.const([0]), b.const([1])), out_1d, b.const([3]), axis=0)
        w_shape = [1, -1, 1]
    else:
        new_shape = b("Concat", out_1d, b("Slice", shape, b.const([1]), b.const([3])), axis=0)
        w_shape = [-1, 1, 1]
    start = numpy_helper.from_array(np.array([1 << (_PRECISION_BITS - 1)], dtype=np.int32))
    acc0 = b("ConstantOfShape", new_shape, value=start)

    body = _Nodes(f"{b.prefix}tap{b.count}/")
    i, cond, acc = (f"{body.prefix}{n}" for n in ("i", "cond", "acc"))
    column = body("Gather", index, i, axis=1)  # [out]
    weight = body("Reshape", body("Gather", weights, i, axis=1), body.const(w_shape))
    picked = body("Gather", x, column, axis=axis)
    acc_out = body("Add", acc, body("Mul", picked, weight))
    cond_out = body("Identity", cond)
    graph = helper.make_graph(
        body.nodes, f"{body.prefix}body",
        [helper.make_tensor_value_info(i, TP.INT64, []), helper.make_tensor_value_info(cond, TP.BOOL, []),
         helper.make_tensor_value_info(acc, TP.INT32, None)],
        [helper.make_tensor_value_info(cond_out, TP.BOOL, []), helper.make_tensor_value_info(acc_out, TP.INT32, None)],
    )
    total = b("Loop", ksize, "", acc0, body=graph)
    # clip8: arithmetic shift right then clamp; Div truncates toward zero, which differs only below 0 (clamped anyway).
    shifted = b("Div", total, b.const(1 << _PRECISION_BITS, np.int32))
    return b("Min", b("Max", shifted, b.const(0, np.int32)), b.const(255, np.int32))


def _resize(b: _Nodes, x: str, in_h: str, in_w: str, out_h: str, out_w: str, filt: str, support: float) -> str:
    """Pillow 13's `ImagingResampleInner`: the height pass first when the height shrinks by more than
    twice what the width shrinks (`in_h > out_h and in_h - out_h > 2 * (in_w - out_w)`), else the
    width pass first. The order changes the rounding between passes, so it is an If here."""
    from onnx import TensorProto as TP
    from onnx import helper

    vertical_first = b("And", b("Greater", in_h, out_h),
                       b("Greater", b("Sub", in_h, out_h), b("Mul", b("Sub", in_w, out_w), b.const(2))))
    width_pass = (1, out_w, _coefficients(b, in_w, out_w, filt, support))
    height_pass = (0, out_h, _coefficients(b, in_h, out_h, filt, support))
    branches = []
    for name, passes in (("vfirst", (height_pass, width_pass)), ("hfirst", (width_pass, height_pass))):
        branch = _Nodes(f"{b.prefix}{name}{b.count}/")
        y = x
        for axis, size_out, coefficients in passes:
            y = _resample(branch, y, axis, size_out, coefficients)
        out = branch("Identity", y)
        branches.append(helper.make_graph(branch.nodes, f"{branch.prefix}graph", [],
                                          [helper.make_tensor_value_info(out, TP.INT32, None)]))
    return b("If", vertical_first, then_branch=branches[0], else_branch=branches[1])


def _fit_longest_edge(b: _Nodes, height: str, width: str, longest: int) -> tuple[str, str]:
    """runtime.images.fit_longest_edge in float64/int64 ops (the 4096 cap cannot trigger: checked at build)."""
    from onnx import TensorProto as TP

    aspect = b("Div", b("Cast", width, to=TP.DOUBLE), b("Cast", height, to=TP.DOUBLE))
    edge = b.const(float(longest), np.float64)

    def even_up(v):
        v = b("Cast", v, to=TP.INT64)
        return b("Add", v, b("Mod", v, b.const(2)))

    wide = b("GreaterOrEqual", width, height)
    new_h = b("Where", wide, even_up(b("Div", edge, aspect)), b.const(longest))
    new_w = b("Where", wide, b.const(longest), even_up(b("Mul", edge, aspect)))
    return b("Max", new_h, b.const(1)), b("Max", new_w, b.const(1))


def _preprocess(b: _Nodes, image: str, config: ImageConfig) -> str:
    """uint8 [H, W, 3] -> float32 [1, 1, 3, S, S], as ImageProcessor(do_image_splitting=False)."""
    from onnx import TensorProto as TP

    if config.resample not in _FILTERS:
        raise ExportError(f"resample={config.resample} (PIL NEAREST) is not reproduced in the graph; "
                          f"supported: {sorted(_FILTERS)} (LANCZOS, BILINEAR, BICUBIC, BOX, HAMMING)")
    if config.longest_edge > _MAX_SIDE:
        raise ExportError(f"size.longest_edge={config.longest_edge} > {_MAX_SIDE}: transformers' cap would apply; not supported")
    filt, support = _FILTERS[config.resample]
    side = config.tile_size
    x = b("Cast", image, to=TP.INT32)
    height = b("Squeeze", b("Shape", image, start=0, end=1), b.const([0]))
    width = b("Squeeze", b("Shape", image, start=1, end=2), b.const([0]))
    if config.do_resize:
        new_h, new_w = _fit_longest_edge(b, height, width, config.longest_edge)
        x = _resize(b, x, height, width, new_h, new_w, filt, support)
        height, width = new_h, new_w
    square = b.const(side)
    x = _resize(b, x, height, width, square, square, filt, support)
    pixels = b("Cast", x, to=TP.DOUBLE)
    if config.do_rescale:  # float64 multiply, then float32, as the processor does
        pixels = b("Mul", pixels, b.const(config.rescale_factor, np.float64))
    pixels = b("Cast", pixels, to=TP.FLOAT)
    if config.do_normalize:
        pixels = b("Div", b("Sub", pixels, b.const(config.image_mean, np.float32)), b.const(config.image_std, np.float32))
    return b("Reshape", b("Transpose", pixels, perm=[2, 0, 1]), b.const([1, 1, 3, side, side]))


def build_preprocess_model(bundle_dir: str | Path, opset: int = 18, ir_version: int = 9):
    """The preprocessing alone: `image` uint8 [H, W, 3] -> `pixel_values` float32 [1, 1, 3, S, S] (for checks)."""
    from onnx import TensorProto as TP
    from onnx import helper

    config = ImageConfig.from_dir(bundle_dir)
    b = _Nodes("pre/")
    out = _preprocess(b, "image", config)
    b.nodes.append(helper.make_node("Identity", [out], ["pixel_values"], name="pre/out"))
    graph = helper.make_graph(
        b.nodes, "smolvlm_preprocess",
        [helper.make_tensor_value_info("image", TP.UINT8, ["height", "width", 3])],
        [helper.make_tensor_value_info("pixel_values", TP.FLOAT, [1, 1, 3, config.tile_size, config.tile_size])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=ir_version)


# ---------------------------------------------------------------- inlining the bundle's graphs


class _Weights:
    """The main graph's initializers: each graph's weights added once, identical tensors stored once."""

    def __init__(self):
        self.tensors: list = []
        self._by_content: dict[tuple, str] = {}
        self.saved_bytes = 0

    def add_graph(self, graph, prefix: str) -> dict[str, str]:
        """Move `graph`'s initializers here; returns old name -> name in the main graph."""
        from onnx import TensorProto

        if len(graph.sparse_initializer):
            raise ExportError(f"{graph.name}: sparse initializers are not supported in the mobile model")
        names = {}
        for tensor in graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                raise ExportError(f"{graph.name}: {tensor.name} is still external; load the graph with its data")
            copy = TensorProto()
            copy.CopyFrom(tensor)
            copy.name = ""
            key = hashlib.sha256(copy.SerializeToString()).hexdigest()  # type, dims and data
            if key in self._by_content:
                names[tensor.name] = self._by_content[key]
                self.saved_bytes += copy.ByteSize()
                continue
            copy.name = f"{prefix}{tensor.name}"
            self.tensors.append(copy)
            self._by_content[key] = names[tensor.name] = copy.name
        return names

    @property
    def nbytes(self) -> int:
        return sum(t.ByteSize() for t in self.tensors)


def _inline(graph, prefix: str, feeds: dict[str, str], weights: dict[str, str]):
    """Copies of `graph`'s nodes with inputs fed from `feeds`, weights renamed to the main graph's, and
    every other value (subgraphs included) prefixed. Returns (nodes, {output name: renamed output})."""
    from onnx import NodeProto

    missing = [i.name for i in graph.input if i.name not in feeds and i.name not in weights]
    if missing:
        raise ExportError(f"{graph.name}: no value fed for input(s) {missing}")

    def rename(name: str) -> str:
        if not name:
            return name
        return feeds.get(name) or weights.get(name) or f"{prefix}{name}"

    def rename_graph(g) -> None:
        for value in list(g.input) + list(g.output) + list(g.value_info):
            value.name = rename(value.name)
        for tensor in g.initializer:
            tensor.name = rename(tensor.name)
        for node in g.node:
            rename_node(node)

    def rename_node(node) -> None:
        node.input[:] = [rename(n) for n in node.input]
        node.output[:] = [rename(n) for n in node.output]
        node.name = f"{prefix}{node.name or node.op_type}"
        for attr in node.attribute:
            if attr.HasField("g"):
                rename_graph(attr.g)
            for sub in attr.graphs:
                rename_graph(sub)

    nodes = []
    for node in graph.node:
        copy = NodeProto()
        copy.CopyFrom(node)
        rename_node(copy)
        nodes.append(copy)
    return nodes, {o.name: rename(o.name) for o in graph.output}


def _elem_type(values, name: str) -> int:
    for v in values:
        if v.name == name:
            return v.type.tensor_type.elem_type
    raise ExportError(f"graph has no input/output named {name!r}")


def _cast_if(b: _Nodes, value: str, have: int, want: int) -> str:
    return value if have == want else b("Cast", value, to=want)


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


# ---------------------------------------------------------------- tokenizer ops (onnxruntime-extensions)


def _extensions():
    try:
        import onnxruntime_extensions
    except ImportError as exc:
        raise ExportError("with_tokenizer=True needs onnxruntime-extensions "
                          "(pip install onnxruntime-extensions==0.15.2)") from exc
    return onnxruntime_extensions


def _tokenizer_nodes(folder: Path, question: str, ids_out: str):
    """HfJsonTokenizer (DESIGN.md item 14: built directly, the tokenizer class named GPT2Tokenizer)."""
    from onnx import helper

    _extensions()
    config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    config["tokenizer_class"] = "GPT2Tokenizer"  # gen_processing_models rejects transformers 5's TokenizersBackend
    attrs = {"tokenizer_vocab": (folder / "tokenizer.json").read_text(encoding="utf-8"),
             "tokenizer_config": json.dumps(config)}
    return [helper.make_node("HfJsonTokenizer", [question], [ids_out], name="tokenizer/HfJsonTokenizer",
                             domain=CONTRIB_DOMAIN, **attrs)]


def _detokenizer_nodes(text: TextProcessor, ids: str, answer: str):
    """BpeDecoder with the vocabulary, byte decoder and special ids of tokenizer.json; special tokens skipped
    (as the runtime's decode)."""
    from onnx import helper

    vocab = text.tokenizer.get_vocab(with_added_tokens=True)
    by_id = {i: t for t, i in vocab.items()}
    if any("\n" in t for t in by_id.values()):
        raise ExportError("a token contains a raw newline; BpeDecoder's id_vocab cannot hold it")
    added = text.tokenizer.get_added_tokens_decoder()
    special = sorted(i for i, t in added.items() if t.special)
    byte_decoder = {c: b for b, c in _bytes_to_unicode().items()}
    attrs = {
        "id_vocab": "\n".join(by_id.get(i, "") for i in range(max(by_id) + 1)),
        "byte_decoder": "\n".join(f"{ord(c)}\t{b}" for c, b in byte_decoder.items()),
        "added_tokens": "\n".join(f"{i}\t{t.content}" for i, t in sorted(added.items())),
        "all_special_ids": "\n".join(str(i) for i in special),
        "skip_special_tokens": 1,
    }
    return [helper.make_node("BpeDecoder", [ids], [answer], name="tokenizer/BpeDecoder", domain=CONTRIB_DOMAIN, **attrs)]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what tokenizers' ByteLevel uses)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for byte in range(256):
        if byte not in bs:
            bs.append(byte)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


# ---------------------------------------------------------------- the one-file model


def _load_graphs(bundle, precision):
    import onnx

    from smolvlm_edge.runtime.bundle import GRAPH_NAMES

    chosen = precision if isinstance(precision, dict) else {}
    default = precision if isinstance(precision, str) else "fp32"
    unknown = set(chosen) - set(GRAPH_NAMES)
    if unknown:
        raise ExportError(f"precision names unknown graph(s) {sorted(unknown)}; graphs: {', '.join(GRAPH_NAMES)}")
    picked = {name: chosen.get(name, default) for name in GRAPH_NAMES}
    models = {name: onnx.load(str(bundle.graph_file(name, p)), load_external_data=True) for name, p in picked.items()}
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
        s.nodes, "greedy_step",
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
) -> Path:
    """Write one ONNX file: image (+ prompt ids, or a question) -> greedy ids (+ answer). See the module docstring."""
    import onnx
    from onnx import TensorProto as TP
    from onnx import helper

    say = progress or (lambda _msg: None)
    if max_new_tokens < 1:
        raise ExportError(f"max_new_tokens must be at least 1, got {max_new_tokens}")
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
    inits = {name: weights.add_graph(models[name].graph, f"{short}/")
             for name, short in (("vision_encoder", "vision"), ("embed_tokens", "embed"), ("decoder_model_merged", "decoder"))}
    b = _Nodes("main/")
    inputs = [helper.make_tensor_value_info("image", TP.UINT8, ["height", "width", 3])]
    outputs = [helper.make_tensor_value_info("generated_ids", TP.INT64, [1, "new_tokens"])]
    prefix_ids, suffix_ids = prompt_pieces(text)
    if with_tokenizer:
        inputs.append(helper.make_tensor_value_info("question", TP.STRING, [1]))
        tokenizer_ops = _tokenizer_nodes(bundle.path, "question", "tokenizer/question_ids")
        b.nodes += tokenizer_ops
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
    stop_ids = sorted(text.stop_token_ids)
    body, empty_pasts = _decode_loop(b, models, inits, text_cfg, stop_ids, embeds_type)
    n_carried = len(empty_pasts) + 1
    loop_outs = [f"main/loop_final_{k}" for k in range(n_carried)] + ["main/loop_tokens"]
    b.nodes.append(helper.make_node("Loop", ["max_new_tokens", b.const(True, np.bool_), prompt, *empty_pasts],
                                    loop_outs, name="main/greedy_loop", body=body))
    b.nodes.append(helper.make_node("Unsqueeze", ["main/loop_tokens", b.const([0])], ["generated_ids"], name="main/ids"))
    if with_tokenizer:
        outputs.append(helper.make_tensor_value_info("answer", TP.STRING, [1]))
        tokenizer_ops += _detokenizer_nodes(text, "generated_ids", "answer")
        b.nodes += tokenizer_ops[1:]
        opsets[CONTRIB_DOMAIN] = 1
        _check_tokenizer(tokenizer_ops, text)

    graph = helper.make_graph(b.nodes, "smolvlm_mobile", inputs, outputs, initializer=weights.tensors + [budget])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              ir_version=max(m.ir_version for m in models.values()), producer_name="smolvlm-edge")
    info = _info(bundle, text, config, picked, max_new_tokens, with_tokenizer, prefix_ids, suffix_ids, stop_ids)
    helper.set_model_props(model, {METADATA_KEY: json.dumps(info)})
    path = _save(model, Path(output_path), weights.nbytes)
    try:
        open_mobile_session(path)  # onnxruntime parses, type-checks and plans every node, subgraphs included
    except Exception as exc:
        raise ExportError(f"onnxruntime cannot load the written model {path}: {exc}") from exc
    say(f"wrote {path} ({_count_nodes(model.graph)} nodes, {weights.nbytes / 2**20:.1f} MiB of weights, "
        f"{weights.saved_bytes / 2**20:.1f} MiB shared)")
    return path


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
    total = 0
    for node in graph.node:
        total += 1
        for attr in node.attribute:
            subs = ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)
            total += sum(_count_nodes(g) for g in subs)
    return total


def _save(model, path: Path, weight_bytes: int) -> Path:
    """Weights inside the file, or in `<name>.data` beside it above ~1.9 GiB."""
    import onnx

    path.parent.mkdir(parents=True, exist_ok=True)
    data = path.with_name(path.name + ".data")
    for stale in (path, data):
        stale.unlink(missing_ok=True)
    try:
        if weight_bytes > EXTERNAL_DATA_THRESHOLD:
            onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                            location=data.name, size_threshold=1024)
        else:
            onnx.save_model(model, str(path))
        # The ONNX checker refuses onnxruntime's SimplifiedLayerNormalization (an ai.onnx-domain name it does
        # not know) inside the Loop body; onnxruntime itself is the check (build_mobile_model loads the file).
    except Exception:
        for partial in (path, data):
            partial.unlink(missing_ok=True)
        raise
    return path


# ---------------------------------------------------------------- running it (onnxruntime only)


def open_mobile_session(path: str | Path, providers=None, threads: int | None = None):
    """An onnxruntime session for the model; onnxruntime-extensions' ops are registered when installed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
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
    within the model's positions; max_new_tokens >= 1.
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
        if info is not None and "<image>" in input_ids:
            raise PromptError("the question contains '<image>': the model places the one image itself")
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
    answer, ids = session.run(["answer", "generated_ids"], _feeds(session, image_rgb_uint8, question, max_new_tokens))
    return str(answer.reshape(-1)[0]), [int(t) for t in ids.reshape(-1)]


def _check_tokenizer(ops, text: TextProcessor) -> None:
    """The in-graph tokenizer and detokenizer against the runtime's, on sample strings (a two-node graph)."""
    import onnxruntime as ort
    from onnx import TensorProto as TP
    from onnx import helper

    ext = _extensions()
    probe = helper.make_graph(
        list(ops), "probe",
        [helper.make_tensor_value_info("question", TP.STRING, [1]),
         helper.make_tensor_value_info("generated_ids", TP.INT64, [1, None])],
        [helper.make_tensor_value_info("tokenizer/question_ids", TP.INT64, [1, None]),
         helper.make_tensor_value_info("answer", TP.STRING, [1])])
    probe_model = helper.make_model(probe, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid(CONTRIB_DOMAIN, 1)],
                                    ir_version=9)
    options = ort.SessionOptions()
    options.register_custom_ops_library(ext.get_library_path())
    session = ort.InferenceSession(probe_model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    for sample in ("What is in this image?", "Describe it,  briefly.\nThanks! 123 é", "x"):
        ids = text.encode(sample)
        got_ids, got_text = session.run(None, {"question": np.array([sample], dtype=object),
                                               "generated_ids": np.array([ids + sorted(text.stop_token_ids)[:1]])})
        if got_ids.reshape(-1).tolist() != ids:
            raise ExportError(f"HfJsonTokenizer gives {got_ids.reshape(-1).tolist()} for {sample!r}, the runtime {ids}")
        want = text.decode(ids + sorted(text.stop_token_ids)[:1])
        if str(got_text.reshape(-1)[0]) != want:
            raise ExportError(f"BpeDecoder gives {str(got_text.reshape(-1)[0])!r}, the runtime {want!r}")
