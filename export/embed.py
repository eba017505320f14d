"""The embed_tokens graph: its spec, a wrapper around the text model's token embedding, dummy inputs."""
from __future__ import annotations

from pathlib import Path

from smolvlm_edge.export.graph import GraphSpec, TensorSpec, WrittenGraph, export_graph

NAME = "embed_tokens"


def spec(config) -> GraphSpec:
    return GraphSpec(
        NAME,
        inputs=(TensorSpec("input_ids", "int64", ("batch_size", "sequence_length")),),
        outputs=(TensorSpec("inputs_embeds", "float32", ("batch_size", "sequence_length", config.text_config.hidden_size)),),
    )


def _embedder_class():
    from torch import nn

    class TokenEmbedder(nn.Module):
        """input_ids [B, S] -> inputs_embeds [B, S, D]; image tokens get their (unused) row, as in PyTorch."""

        def __init__(self, model):
            super().__init__()
            self.embed = model.get_input_embeddings()

        def forward(self, input_ids):
            return self.embed(input_ids)

    return TokenEmbedder


def embedder(model):
    return _embedder_class()(model).eval()


def dummy_inputs(config, batch: int = 2, length: int = 5):
    """Batch 2, length 5: sizes >= 2 that differ, so the exporter keeps both axes dynamic."""
    import torch

    return (torch.randint(0, config.text_config.vocab_size, (batch, length), generator=torch.Generator().manual_seed(0)),)


def export(model, folder: Path, **options) -> WrittenGraph:
    """Export the embedding graph of `model` into `folder`; `options` go to `export_graph`."""
    graph = spec(model.config)
    return export_graph(
        embedder(model), dummy_inputs(model.config), graph, tuple(graph.torch_dims().values()),
        folder / f"{NAME}.onnx", **options,
    )
