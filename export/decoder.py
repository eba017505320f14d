"""The decoder_model_merged graph: spec, KV names, a wrapper of the Llama text model + lm_head, dummy inputs.

One graph serves prefill (past of length 0) and decode; the KV cache goes in and out as plain tensors.
"""
from __future__ import annotations

from pathlib import Path

from smolvlm_edge.export.graph import GraphSpec, TensorSpec, WrittenGraph, export_graph

NAME = "decoder_model_merged"
# Name templates, recorded in the manifest; kv_names below is the only place that expands them.
PAST_KEY, PAST_VALUE = "past_key_values.%d.key", "past_key_values.%d.value"
PRESENT_KEY, PRESENT_VALUE = "present.%d.key", "present.%d.value"


def kv_names(num_layers: int, kind: str) -> list[str]:
    """Flat KV names, key then value per layer: kind "past" (inputs) or "present" (outputs)."""
    key, value = {"past": (PAST_KEY, PAST_VALUE), "present": (PRESENT_KEY, PRESENT_VALUE)}[kind]
    return [name % i for i in range(num_layers) for name in (key, value)]


def text_geometry(config) -> dict[str, int]:
    """Text-model sizes read from an Idefics3/SmolVLM config."""
    tc = config.text_config
    return {
        "num_layers": tc.num_hidden_layers,
        "num_kv_heads": tc.num_key_value_heads,
        "head_dim": getattr(tc, "head_dim", None) or tc.hidden_size // tc.num_attention_heads,
        "hidden_size": tc.hidden_size,
        "vocab_size": tc.vocab_size,
        "max_position_embeddings": tc.max_position_embeddings,
        "image_token_id": config.image_token_id,
    }


def spec(config) -> GraphSpec:
    g = text_geometry(config)
    kv = (g["num_kv_heads"], g["head_dim"])
    past = tuple(TensorSpec(n, "float32", ("batch_size", kv[0], "past_sequence_length", kv[1]))
                 for n in kv_names(g["num_layers"], "past"))
    present = tuple(TensorSpec(n, "float32", ("batch_size", kv[0], "total_sequence_length", kv[1]))
                    for n in kv_names(g["num_layers"], "present"))
    return GraphSpec(
        NAME,
        inputs=(
            TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", g["hidden_size"])),
            TensorSpec("attention_mask", "int64", ("batch_size", "total_sequence_length")),
            TensorSpec("position_ids", "int64", ("batch_size", "sequence_length")),
            *past,
        ),
        outputs=(TensorSpec("logits", "float32", ("batch_size", "sequence_length", g["vocab_size"])), *present),
    )


def _decoder_class():
    from torch import nn
    from transformers import DynamicCache

    class DecoderWithHead(nn.Module):
        """(inputs_embeds, attention_mask, position_ids, flat past) -> (logits, *flat present)."""

        def __init__(self, model):
            super().__init__()
            self.text_model = model.model.text_model
            self.lm_head = model.lm_head
            self.text_config = model.config.text_config

        def forward(self, inputs_embeds, attention_mask, position_ids, past):  # past: [k0, v0, k1, v1, ...]
            cache = DynamicCache(ddp_cache_data=list(zip(past[0::2], past[1::2])), config=self.text_config)
            # transformers 5.24 names the cache argument `cache` (`past_key_values` is deprecated).
            out = self.text_model(inputs_embeds=inputs_embeds, attention_mask=attention_mask,
                                  position_ids=position_ids, cache=cache, use_cache=True)
            logits = self.lm_head(out.last_hidden_state)  # [B, S, V]
            return (logits, *[t for layer in out.cache.layers for t in (layer.keys, layer.values)])

    return DecoderWithHead


def decoder(model):
    return _decoder_class()(model).eval()


def dummy_inputs(config, batch: int = 2, length: int = 3, past: int = 5):
    """Batch 2, new 3, past 5, total 8: no two dynamic axes share a size, none is 0 or 1."""
    import torch

    g = text_geometry(config)
    gen = torch.Generator().manual_seed(0)
    total = past + length
    embeds = torch.randn(batch, length, g["hidden_size"], generator=gen)
    mask = torch.ones(batch, total, dtype=torch.int64)
    mask[0, :2] = 0  # left padding in row 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, past:]
    kv = [torch.randn(batch, g["num_kv_heads"], past, g["head_dim"], generator=gen)
          for _ in kv_names(g["num_layers"], "past")]
    return embeds, mask, positions, kv


def export(model, folder: Path, **options) -> WrittenGraph:
    """Export the decoder graph of `model` into `folder`; `options` go to `export_graph`."""
    graph = spec(model.config)
    dims = graph.torch_dims()
    dynamic = (dims["inputs_embeds"], dims["attention_mask"], dims["position_ids"],
               [dims[n] for n in kv_names(text_geometry(model.config)["num_layers"], "past")])
    return export_graph(decoder(model), dummy_inputs(model.config), graph, dynamic,
                        folder / f"{NAME}.onnx", **options)
