"""In-graph image preprocessing of the one-file model: Pillow's resize, rescale and normalize in ONNX.

Preprocessing equals the runtime's `ImageProcessor` with splitting off, bit for bit. The processor
resizes twice with Pillow (longest edge to `size.longest_edge`, then squashed to the square vision
frame) with the checkpoint's filter, LANCZOS for SmolVLM, which no ONNX Resize mode has: a cubic
antialiased Resize op differs from it by up to 23-52 grey levels (mean 2.7-5.4) on the noisy test
images. So the graph repeats Pillow's separable fixed-point resampling: per axis, Pillow's filter
weights in float64 rounded to its 22-bit integers, `ksize` gathered columns accumulated in int32 in a
Loop, rounded and clipped to 0..255; the two passes in Pillow 13's order (height first when the
height shrinks by more than twice what the width does, else width first: an If); then rescale
(float64) and normalize (float32) as the processor does. Max |difference| to the Python processor,
uint8 pixels and normalized values alike: 0, on images from 1x1 to 1500x1100, wide, tall, upscaled
and downscaled, with every Pillow filter but NEAREST (refused at build time); tests/test_mobile.py
checks nine sizes. Caveats: float64 Sin in onnxruntime could differ from libm by an ulp, which moves a
22-bit weight only on an exact rounding tie (never seen); Pillow before 13 always ran the width pass
first, so a runtime on an older Pillow differs from this graph (and from Pillow 13) on some sizes.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from smolvlm_edge.export.mobile_nodes import _Nodes
from smolvlm_edge.runtime.errors import ExportError
from smolvlm_edge.runtime.images import FILTER_SUPPORT, ImageConfig

_PRECISION_BITS = 22  # Pillow's fixed-point coefficients for 8-bit images (32 - 8 - 2)
_FILTERS = {number: (name, FILTER_SUPPORT[number])
            for number, name in ((1, "lanczos"), (2, "bilinear"), (3, "bicubic"), (4, "box"), (5, "hamming"))}
_MAX_SIDE = 4096  # transformers' cap on a resized side; fit_longest_edge never reaches it when longest_edge <= this


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


def _resample(b: _Nodes, x: str, out_size: str, coefficients: tuple[str, str, str]) -> str:
    """One Pillow pass along axis 0 of int32 [N, M, 3] (the callers transpose: gathering whole rows is
    a memcpy, gathering 3-value pixels along axis 1 was several times slower); uint8-valued int32 out."""
    from onnx import TensorProto as TP
    from onnx import helper, numpy_helper

    index, weights, ksize = coefficients
    rest = b("Shape", x, start=1)
    new_shape = b("Concat", b("Unsqueeze", out_size, b.const([0])), rest, axis=0)
    start = numpy_helper.from_array(np.array([1 << (_PRECISION_BITS - 1)], dtype=np.int32))
    acc0 = b("ConstantOfShape", new_shape, value=start)

    body = _Nodes(f"{b.prefix}tap{b.count}/")
    i, cond, acc = (f"{body.prefix}{n}" for n in ("i", "cond", "acc"))
    rows = body("Gather", index, i, axis=1)  # [out]: tap i of every output row
    weight = body("Reshape", body("Gather", weights, i, axis=1), body.const([-1, 1, 1]))
    acc_out = body("Add", acc, body("Mul", body("Gather", x, rows, axis=0), weight))
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
    twice what the width shrinks (runtime.images.height_pass_first, as graph ops), else the width pass
    first. The order changes the rounding between passes, so it is an If here."""
    from onnx import TensorProto as TP
    from onnx import helper

    vertical_first = b("And", b("Greater", in_h, out_h),
                       b("Greater", b("Sub", in_h, out_h), b("Mul", b("Sub", in_w, out_w), b.const(2))))
    width = (out_w, _coefficients(b, in_w, out_w, filt, support))
    height = (out_h, _coefficients(b, in_h, out_h, filt, support))
    branches = []
    for name, first, second in (("vfirst", height, width), ("hfirst", width, height)):
        branch = _Nodes(f"{b.prefix}{name}{b.count}/")
        swap = lambda v: branch("Transpose", v, perm=[1, 0, 2])  # noqa: E731  [H, W, 3] <-> [W, H, 3]
        y = x if first is height else swap(x)  # the resampled axis first
        y = swap(_resample(branch, y, *first))
        y = _resample(branch, y, *second)
        out = y if second is height else swap(y)
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
