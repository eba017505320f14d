"""The vision_encoder graph: its spec, a traceable wrapper of SigLIP + connector, dummy inputs, the frame filter."""
from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from smolvlm_edge.export.graph import GraphSpec, TensorSpec, WrittenGraph, export_graph

NAME = "vision_encoder"
FRAMES = "real_frames"  # rows of image_features: frames left after padding frames are dropped


def geometry(config) -> dict[str, int]:
    """Vision sizes read from an Idefics3/SmolVLM config."""
    vc = config.vision_config
    side = vc.image_size // vc.patch_size
    return {
        "image_size": vc.image_size,
        "patch_size": vc.patch_size,
        "scale_factor": config.scale_factor,
        "tokens_per_image": side * side // config.scale_factor**2,
    }


def spec(config) -> GraphSpec:
    size = config.vision_config.image_size
    tokens = geometry(config)["tokens_per_image"]
    return GraphSpec(
        NAME,
        inputs=(
            TensorSpec("pixel_values", "float32", ("batch_size", "num_images", 3, size, size)),
            TensorSpec("pixel_attention_mask", "bool", ("batch_size", "num_images", size, size)),
        ),
        outputs=(TensorSpec("image_features", "float32", (FRAMES, tokens, config.text_config.hidden_size)),),
    )


def bucket_table(side: int):
    """Position-bucket lookup [side + 1, side]: entry [n, i] is the bucket of patch row i when n rows are real.

    These are transformers 5.24's `Idefics3VisionEmbeddings` lines, evaluated here for every possible
    row count, so the graph does an exact integer lookup instead of float math and `bucketize`
    (which neither exports nor survives onnxscript's constant folding reliably). n = 0 (NaN in
    transformers) is included so that odd masks still index the table.
    """
    import torch

    boundaries = torch.arange(1 / side, 1.0, 1 / side)
    nb_patches = torch.arange(side + 1)  # int64, as the mask sums in transformers
    step = 1.0 / nb_patches
    coords = torch.arange(side, dtype=torch.float32)[None, :] * step[:, None]
    coords = torch.clamp(coords, max=(1.0 - 1e-6))
    return torch.bucketize(coords, boundaries, right=True)


def _frame_encoder_class():
    import torch
    from torch import nn
    from transformers.masking_utils import create_bidirectional_mask

    class FrameEncoder(nn.Module):
        """Real frames in, image features out: `get_image_features` after its padding-frame removal.

        The patch mask is a reshape + sum (transformers unfolds), position ids come from `bucket_table`.
        """

        def __init__(self, model):
            super().__init__()
            inner = model.model
            self.vision = inner.vision_model
            self.connector = inner.connector
            vc = inner.config.vision_config
            self.patch = vc.patch_size
            self.side = vc.image_size // vc.patch_size
            self.register_buffer("buckets", bucket_table(self.side), persistent=False)

        def forward(self, pixel_values, pixel_attention_mask):  # [F, 3, H, W] f32, [F, H, W] bool
            frames, n, p = pixel_values.shape[0], self.side, self.patch
            # A patch is attended when any of its pixels is; pixels past n * p fall off, as in unfold.
            pixels = pixel_attention_mask[:, : n * p, : n * p].reshape(frames, n, p, n, p)
            patch_mask = pixels.sum(dim=(2, 4)) > 0  # [F, n, n]
            rows = patch_mask[:, :, 0].sum(dim=1)  # [F]
            cols = patch_mask[:, 0, :].sum(dim=1)
            pos = self.buckets[rows][:, :, None] * n + self.buckets[cols][:, None, :]  # [F, n, n]
            flat_mask = patch_mask.reshape(frames, n * n)
            position_ids = torch.where(flat_mask, pos.reshape(frames, n * n), 0)

            emb = self.vision.embeddings
            hidden = emb.patch_embedding(pixel_values).flatten(2).transpose(1, 2)  # [F, n*n, C]
            hidden = hidden + emb.position_embedding(position_ids)
            mask = create_bidirectional_mask(
                config=self.vision.config, inputs_embeds=hidden, attention_mask=flat_mask
            )
            hidden = self.vision.encoder(inputs_embeds=hidden, attention_mask=mask).last_hidden_state
            hidden = self.vision.post_layernorm(hidden)
            return self.connector(hidden)  # [F, tokens, text_hidden]

    return FrameEncoder


def frame_encoder(model):
    """The wrapper module that is traced (per-frame part of the vision graph)."""
    return _frame_encoder_class()(model).eval()


def dummy_frames(config, frames: int = 2):
    """Example inputs for the trace: `frames` frames, one with a partial mask."""
    import torch

    size = config.vision_config.image_size
    pixel_values = torch.randn(frames, 3, size, size, generator=torch.Generator().manual_seed(0))
    mask = torch.ones(frames, size, size, dtype=torch.bool)
    mask[0, size // 2 :, :] = False
    return pixel_values, mask


def add_frame_filter(model, size: int, keep_first_if_none: bool) -> None:
    """Turn the per-frame graph into the contract graph: flatten [batch, images] and drop padding frames.

    A frame is padding when all its pixel values are 0.0 (transformers' rule). Boolean indexing
    does not trace under dynamo, so the filter is written here as ONNX ops in front of the traced
    encoder: Reshape, Equal/Not/ReduceMax for "any pixel nonzero", Compress. SmolVLM keeps the first
    frame when every frame is padding (`keep_first_if_none`), Idefics3 drops them all.
    """
    import numpy as np
    import onnx_ir as ir

    graph = model.graph
    old_pixels, old_mask = graph.inputs  # traced as frames.pixel_values, frames.pixel_attention_mask
    pixels = ir.Value(name="pixel_values", type=ir.TensorType(ir.DataType.FLOAT),
                      shape=ir.Shape(["batch_size", "num_images", 3, size, size]))
    mask = ir.Value(name="pixel_attention_mask", type=ir.TensorType(ir.DataType.BOOL),
                    shape=ir.Shape(["batch_size", "num_images", size, size]))

    nodes: list = []

    def op(op_type, *inputs, **attributes):
        node = ir.node(op_type, list(inputs), attributes=attributes, name=f"/frame_filter/{op_type}_{len(nodes)}")
        nodes.append(node)
        return node.outputs[0]

    def const(values, dtype):
        return op("Constant", value=ir.tensor(np.array(values, dtype=dtype)))

    flat_pixels = op("Reshape", pixels, const([-1, 3, size, size], np.int64))  # [F_all, 3, H, W]
    flat_mask = op("Reshape", mask, const([-1, size, size], np.int64))  # [F_all, H, W]
    nonzero = op("Cast", op("Not", op("Equal", flat_pixels, const(0.0, np.float32))), to=ir.DataType.UINT8)
    real = op("ReduceMax", nonzero, const([1, 2, 3], np.int64), keepdims=0)  # [F_all] uint8
    keep = op("Cast", real, to=ir.DataType.BOOL)
    if keep_first_if_none:
        count = op("Shape", keep)  # [1]
        index = op("Range", const(0, np.int64), op("Squeeze", count, const([0], np.int64)), const(1, np.int64))
        is_first = op("Equal", index, const(0, np.int64))
        no_real = op("Not", op("Cast", op("ReduceMax", real, keepdims=0), to=ir.DataType.BOOL))
        keep = op("Or", keep, op("And", is_first, no_real))
    kept_pixels = op("Compress", flat_pixels, keep, axis=0)
    kept_mask = op("Compress", flat_mask, keep, axis=0)

    old_pixels.replace_all_uses_with(kept_pixels)
    old_mask.replace_all_uses_with(kept_mask)
    graph.inputs.clear()
    graph.inputs.extend([pixels, mask])
    graph.insert_before(graph.node(0), nodes)


def export(model, folder: Path, fused: bool = False, **options) -> WrittenGraph:
    """Export the vision graph of `model` into `folder`; `options` go to `export_graph`. `fused`: attention and
    GELU as onnxruntime's contrib ops (export/vision_fusion.py); otherwise standard ops only (NPUs)."""
    from torch.export import Dim

    config = model.config
    frames = Dim(FRAMES)
    # The traced part takes flat frames; add_frame_filter then puts the contract's inputs in front.
    written = export_graph(
        frame_encoder(model),
        dummy_frames(config),
        spec(config),
        ({0: frames}, {0: frames}),
        folder / f"{NAME}.onnx",
        edit=lambda m: add_frame_filter(m, config.vision_config.image_size, config.model_type == "smolvlm"),
        traced_input_names=["frames.pixel_values", "frames.pixel_attention_mask"],
        **options,
    )
    _drop_nan_guards_in_file(written.path, written.external_data)
    info = _fuse_in_file(written, config.vision_config.image_size) if fused else {"attention": "plain"}
    return dataclasses.replace(written, info=info)


def _fuse_in_file(written: WrittenGraph, image_size: int) -> dict:
    """Replace the traced graph by its fused form when the rewrite reproduces it; the report says which."""
    from smolvlm_edge.export.vision_fusion import fused_vision_copy

    if written.external_data is not None:  # weights beside the graph (> 2 GB): leave it as traced
        return {"attention": "plain", "why": "the weights are stored beside the graph"}
    staged = written.path.with_name(f"{NAME}.fused.onnx")
    report = fused_vision_copy(written.path, staged, image_size)
    if report["attention"] == "fused":
        os.replace(staged, written.path)
    return report


def drop_softmax_nan_guards(model) -> int:
    """Remove `Where(IsNaN(softmax), 0, softmax)` (the traced SDPA's guard for rows that see no key); return how many.

    Dead code here: padding frames are dropped before the encoder and a real frame's patches are all
    valid, so no attention row is empty. The guard costs two passes over every [heads, 1024, 1024]
    probability tensor. verify.py still compares the edited graph with PyTorch.
    """
    graph = model.graph
    producer = {out: n for n in graph.node for out in n.output}
    uses: dict[str, int] = {}
    for n in graph.node:
        for name in n.input:
            uses[name] = uses.get(name, 0) + 1
    outputs = {o.name for o in graph.output}
    alias, dropped = {}, set()
    for node in graph.node:
        if node.op_type != "Where":
            continue
        test, value = producer.get(node.input[0]), producer.get(node.input[2])
        if (node.output[0] not in outputs and test is not None
                and test.op_type == "IsNaN" and value is not None and value.op_type == "Softmax"
                and test.input[0] == node.input[2] and uses[test.output[0]] == 1):
            alias[node.output[0]] = node.input[2]
            dropped.update((id(node), id(test)))
    if not alias:
        return 0
    kept = [n for n in graph.node if id(n) not in dropped]
    for node in kept:
        for i, name in enumerate(node.input):
            node.input[i] = alias.get(name, name)
    del graph.node[:]
    graph.node.extend(kept)
    return len(alias)


def _drop_nan_guards_in_file(path: Path, external_data: Path | None) -> None:
    import onnx

    if external_data is not None:  # weights beside the graph (> 2 GB): leave the guards
        return
    model = onnx.load(str(path))
    if drop_softmax_nan_guards(model):
        onnx.save_model(model, str(path))
