"""The vision graph's traced attention and GELU -> onnxruntime's fused ops (CPU/CUDA/WebGPU kernels).

The dynamo export writes SigLIP's attention as Reshape/Transpose/Mul per projection, MatMul, an
additive key mask (Where), Softmax and MatMul. onnxruntime fuses none of it, and at int8 the 12
[1024 x 1024] attention products are then half the encoder's time. MultiHeadAttention (contrib op)
takes the three projections and a [frames, patches] key mask instead: measured on the 256M shape,
int8 vision 530-573 ms vs 628-646 ms per frame (issue 4's note). Where every frame is full, an If runs
it without the mask: onnxruntime then takes its flash-attention kernel (int8 frame ~6 % faster).

The tanh GELU is traced as Pow, Mul, Add, Mul, Tanh, Add, Mul, Mul: eight passes over a
[frames, patches, 3072] tensor per layer, which onnxruntime's optimizer leaves alone. `FastGelu`
(contrib op) computes the same 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3))) in one: profiled on the
256M int8 graph, one 512x512 frame, 52 ms -> 14 ms. The fp32 frame: 1289 ms traced, 1208 ms with both
fusions, ~1150 ms with the unmasked attention for full frames. (Residual Add + LayerNormalization ->
SkipLayerNormalization was tried too and dropped: 50 ms against 14 ms unfused.)

`export --attention fused` (the default) writes the fused graph as the bundle's fp32 vision encoder
(export/vision.py); `--attention plain` keeps the traced, standard-op graph for NPUs, and CPU recipes
then quantize a fused copy of it (quantize/build.py). Each rewrite is checked by running both graphs
on a partly masked frame and on a full one (and the export's own check compares the result with PyTorch).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from smolvlm_edge.export.graph import use_ms_domain
from smolvlm_edge.export.graph_order import toposort, used_names

MS_DOMAIN = "com.microsoft"
_THROUGH = ("Transpose", "Reshape", "Mul")  # between a projection's output and the attention MatMuls
_SQRT_2_OVER_PI = math.sqrt(2 / math.pi)


class _Graph:
    """Producers, consumers and constant values of one graph (read once, before the rewrite)."""

    def __init__(self, graph):
        self.inits = {t.name: t for t in graph.initializer}
        self.constants = dict(self.inits)
        self.constants.update({n.output[0]: n.attribute[0].t for n in graph.node
                               if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"})
        self.producer = {out: n for n in graph.node for out in n.output}
        self.consumers: dict[str, list] = {}
        for node in graph.node:
            for name in node.input:
                self.consumers.setdefault(name, []).append(node)
        self.graph_outputs = {o.name for o in graph.output}

    def scalar(self, name: str) -> float | None:
        t = self.constants.get(name)
        return float(numpy_helper.to_array(t).reshape(())) if t is not None and np.prod(t.dims) == 1 else None

    def only_consumer(self, name: str, op_type: str):
        users = self.consumers.get(name, [])
        if name in self.graph_outputs or len(users) != 1 or users[0].op_type != op_type:
            return None
        return users[0]

    def read_only_by(self, node, user) -> bool:
        """Whether `user` is the only reader of `node`'s output (then the output may go with the node)."""
        name = node.output[0]
        return name not in self.graph_outputs and all(u is user for u in self.consumers.get(name, []))

    def beside_scalar(self, node, value: float, rel: float = 1e-6) -> str | None:
        """For a binary node with one scalar constant equal to `value`: its other input."""
        a, b = node.input
        for const, other in ((a, b), (b, a)):
            found = self.scalar(const)
            if found is not None and abs(found - value) <= rel * abs(value):
                return other
        return None

    def projection(self, name: str) -> tuple[str, float, int | None]:
        """Walk back from an attention operand to the [frames, patches, hidden] projection output.

        Returns that tensor, the product of the scalar Muls passed (SDPA scales q and k by d^-1/4
        each) and the head count read from the first Reshape to [.., .., heads, head_dim]."""
        scale, heads = 1.0, None
        while (node := self.producer.get(name)) is not None and node.op_type in _THROUGH:
            if node.op_type == "Mul":
                factors = [self.scalar(i) for i in node.input]
                if sorted(f is None for f in factors) != [False, True]:
                    break
                scale *= next(f for f in factors if f is not None)
                name = next(i for i, f in zip(node.input, factors) if f is None)
                continue
            if node.op_type == "Reshape" and node.input[1] in self.inits:
                shape = numpy_helper.to_array(self.inits[node.input[1]])
                if shape.size == 4:
                    heads = int(shape[2])
            name = node.input[0]
        return name, scale, heads


def fuse_vision_attention(model: onnx.ModelProto) -> int:
    """Replace each traced attention block by MultiHeadAttention, in place; returns how many."""
    graph = model.graph
    g = _Graph(graph)
    added, key_masks, replaced = [], {}, 0
    for softmax in [n for n in graph.node if n.op_type == "Softmax"]:
        add = g.producer.get(softmax.input[0])
        scores = g.producer.get(add.input[0]) if add is not None and add.op_type == "Add" else None
        where = g.producer.get(add.input[1]) if scores is not None else None
        mix = g.only_consumer(softmax.output[0], "MatMul")
        if scores is None or scores.op_type != "MatMul" or where is None or where.op_type != "Where" or mix is None:
            continue
        transpose = g.only_consumer(mix.output[0], "Transpose")
        merge = g.only_consumer(transpose.output[0], "Reshape") if transpose is not None else None
        if merge is None:
            continue
        q, q_scale, heads = g.projection(scores.input[0])
        k, k_scale, _ = g.projection(scores.input[1])
        v, v_scale, _ = g.projection(mix.input[1])
        if heads is None or v_scale != 1.0:
            continue
        cond = where.input[0]  # [frames, 1, patches, patches] bool: a bidirectional mask hides keys only
        if cond not in key_masks:
            key_masks[cond] = _key_mask(graph, added, cond, len(key_masks))
        added.append(_attention(q, k, v, *key_masks[cond], merge.output[0], heads, q_scale * k_scale, replaced))
        merge.output[0] = f"{merge.output[0]}_traced"  # the old block is now dead code
        replaced += 1
    if replaced:
        graph.node.extend(added)
        _drop_dead_nodes(graph)
        use_ms_domain(model)
    return replaced


def fuse_tanh_gelu(model: onnx.ModelProto) -> int:
    """x * 0.5 * (1 + tanh(c (x + 0.044715 x^3))) -> FastGelu(x), in place; returns how many."""
    g = _Graph(model.graph)
    dead, added = set(), []
    for tanh in [n for n in model.graph.node if n.op_type == "Tanh"]:
        chain = _gelu_chain(g, tanh)
        if chain is None:
            continue
        x, nodes, out = chain
        dead |= {id(n) for n in nodes}
        added.append(helper.make_node("FastGelu", [x], [out], name=f"{tanh.name or out}/FastGelu", domain=MS_DOMAIN))
    if added:
        kept = [n for n in model.graph.node if id(n) not in dead]
        del model.graph.node[:]
        model.graph.node.extend(kept + added)
        _drop_dead_nodes(model.graph)  # orders the nodes again and drops the chains' scalar constants
        use_ms_domain(model)
    return len(added)


def _gelu_chain(g: _Graph, tanh):
    """(x, the chain's nodes in order, its output) when `tanh` sits in a tanh-GELU of x, else None."""
    scaled = g.producer.get(tanh.input[0])
    if scaled is None or scaled.op_type != "Mul" or (inner := g.beside_scalar(scaled, _SQRT_2_OVER_PI)) is None:
        return None
    add_cube = g.producer.get(inner)
    if add_cube is None or add_cube.op_type != "Add":
        return None
    for x, cube_term in (tuple(add_cube.input), tuple(reversed(add_cube.input))):
        weighted = g.producer.get(cube_term)
        if weighted is None or weighted.op_type != "Mul" or (cubed := g.beside_scalar(weighted, 0.044715)) is None:
            continue
        power = g.producer.get(cubed)
        if power is not None and power.op_type == "Pow" and power.input[0] == x and g.scalar(power.input[1]) == 3.0:
            break
    else:
        return None
    one = g.only_consumer(tanh.output[0], "Add")
    if one is None or g.beside_scalar(one, 1.0) != tanh.output[0]:
        return None
    first = g.only_consumer(one.output[0], "Mul")
    second = g.only_consumer(first.output[0], "Mul") if first is not None else None
    if second is None:
        return None
    # 0.5 and x multiply in either order: Mul(0.5, .) then Mul(x, .), or Mul(x, .) then Mul(0.5, .)
    half_first = g.beside_scalar(first, 0.5) == one.output[0] and _other(second, first.output[0]) == x
    x_first = _other(first, one.output[0]) == x and g.beside_scalar(second, 0.5) == first.output[0]
    inner_nodes = [power, weighted, add_cube, scaled]
    if not (half_first or x_first) or not all(g.read_only_by(n, nxt) for n, nxt in zip(inner_nodes, inner_nodes[1:])):
        return None
    if not g.read_only_by(scaled, tanh):
        return None
    return x, [*inner_nodes, tanh, one, first, second], second.output[0]


def _other(node, known: str) -> str | None:
    """The input of a binary node that is not `known` (None if `known` is not one of them)."""
    a, b = node.input
    return b if a == known else a if b == known else None


def _key_mask(graph, added: list, cond: str, index: int) -> tuple[str, str]:
    """cond[:, 0, 0, :] as int32 [frames, patches] (MultiHeadAttention's key_padding_mask, 1 = attend) and
    a bool scalar: whether it keeps every key of every frame."""
    prefix = f"/vision/key_mask_{index}"
    zero = numpy_helper.from_array(np.array(0, np.int64), f"{prefix}/zero")
    graph.initializer.append(zero)
    added += [helper.make_node("Gather", [cond, zero.name], [f"{prefix}/heads"], name=f"{prefix}/Gather_0", axis=1),
              helper.make_node("Gather", [f"{prefix}/heads", zero.name], [f"{prefix}/keys"], name=f"{prefix}/Gather_1",
                               axis=1),
              helper.make_node("Cast", [f"{prefix}/keys"], [f"{prefix}/int32"], name=f"{prefix}/Cast",
                               to=TensorProto.INT32),
              helper.make_node("ReduceMin", [f"{prefix}/int32"], [f"{prefix}/min"], name=f"{prefix}/ReduceMin",
                               keepdims=0),
              helper.make_node("Cast", [f"{prefix}/min"], [f"{prefix}/all_kept"], name=f"{prefix}/Cast_all",
                               to=TensorProto.BOOL)]
    return f"{prefix}/int32", f"{prefix}/all_kept"


def _attention(q: str, k: str, v: str, mask: str, all_kept: str, out: str, heads: int, scale: float, index: int):
    """MultiHeadAttention of q, k, v into `out`. When every key is kept (full frames: the usual case), it runs
    without the mask, so onnxruntime takes its flash-attention kernel (~6 % of an int8 frame; it has none
    for masked keys); otherwise with it. An If on `all_kept` picks one of the two."""
    name = f"/vision/attention_{index}"

    def branch(tag: str, inputs: list[str]):
        node = helper.make_node("MultiHeadAttention", inputs, [f"{out}/{tag}"], name=f"{name}/{tag}/MultiHeadAttention",
                                domain=MS_DOMAIN, num_heads=heads, scale=scale)
        return helper.make_graph([node], f"{name}/{tag}", [],
                                 [helper.make_tensor_value_info(f"{out}/{tag}", TensorProto.FLOAT, None)])

    return helper.make_node("If", [all_kept], [out], name=f"{name}/If", then_branch=branch("all_keys", [q, k, v]),
                            else_branch=branch("masked_keys", [q, k, v, "", mask]))


def _drop_dead_nodes(graph) -> None:
    """Keep the nodes the outputs need, in an order where each follows its inputs' producers."""
    producer = {out: n for n in graph.node for out in n.output}
    live, todo = {}, [o.name for o in graph.output]
    while todo:
        node = producer.get(todo.pop())
        if node is not None and id(node) not in live:
            live[id(node)] = node
            todo += list(used_names(node))  # an If's branches read the attention inputs
    ordered = toposort([n for n in graph.node if id(n) in live])
    del graph.node[:]
    graph.node.extend(ordered)
    used = {i for n in ordered for i in used_names(n)}
    for tensor in [t for t in graph.initializer if t.name not in used]:
        graph.initializer.remove(tensor)


def fused_vision_copy(src: Path, dst: Path, image_size: int, save: Callable | None = None) -> dict:
    """Write a fused copy of the fp32 vision graph `src` to `dst` when the rewrite reproduces it: attention
    as MultiHeadAttention, the tanh GELU as FastGelu. `save(model, path)` writes it (default: one file).

    Returns {"attention": "fused", "blocks": n, "fast_gelu": g, "max_diff": d}
    or {"attention": "plain", "why": ...}."""
    save = save or (lambda model, path: onnx.save_model(model, str(path)))
    model = onnx.load(str(src))
    blocks = fuse_vision_attention(model)
    if not blocks:
        return {"attention": "plain", "why": "no traced attention block found"}
    fused = {"fast_gelu": fuse_tanh_gelu(model)}
    save(model, dst)
    del model  # one graph in memory at a time: the 2.2B vision encoder is ~1.7 GB
    checks = _check_frames(image_size)  # both branches: a partly masked frame, then full frames only
    want, got = (_outputs(path, checks) for path in (src, dst))
    diff = 0.0
    for w, g in zip(want, got):
        worst = float(np.abs(w - g).max()) if w.shape == g.shape else float("inf")
        diff = max(diff, worst)
        if not worst <= 1e-4 * max(1.0, float(np.abs(w).max())):
            for path in (dst, dst.with_suffix(".onnx_data")):
                path.unlink(missing_ok=True)
            return {"attention": "plain", "why": f"the fused graph differs by {worst:.3g}"}
    return {"attention": "fused", "blocks": blocks, **fused, "max_diff": diff}


def _outputs(path: Path, feeds: list[dict]) -> list[np.ndarray]:
    """The graph's features for each feed, from a session that is gone when this returns."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [session.run(None, f)[0] for f in feeds]


def _check_frames(size: int) -> list[dict]:
    """Feeds that take each branch of the fused attention: two frames, one partly masked; the full one alone."""
    two = _frames_with_a_partial_mask(size)
    return [two, {name: value[:, 1:] for name, value in two.items()}]


def _frames_with_a_partial_mask(size: int) -> dict:
    """Two frames of random pixels; the first is real only in its top-left part (keys masked)."""
    rng = np.random.default_rng(0)
    pixels = rng.uniform(-1, 1, (1, 2, 3, size, size)).astype(np.float32)
    mask = np.ones((1, 2, size, size), dtype=bool)
    mask[0, 0, size // 2 + 7:, :] = False
    mask[0, 0, :, size // 3:] = False
    return {"pixel_values": pixels, "pixel_attention_mask": mask}
