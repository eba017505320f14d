"""Merging the bundle's graphs into one: weights stored once, nodes inlined under renamed values, a valid order."""
from __future__ import annotations

import hashlib

import numpy as np

from smolvlm_edge.export.graph_order import subgraphs
from smolvlm_edge.runtime.errors import ExportError


class _Weights:
    """The main graph's initializers: each graph's weights added once, identical tensors stored once.

    Identical bytes under other dims (a q4 embed table that reads the decoder's 8-bit lm_head codes: [V, K]
    against [V, K/block, block]) are stored once too, under the first graph's dims, and reshaped for the
    other by a main-graph node (onnxruntime folds that Reshape at load: one copy in the file, two in
    memory). Below 4 KiB a second copy is cheaper than the node."""

    def __init__(self):
        self.tensors: list = []
        self.nodes: list = []  # Reshapes of shared tensors
        self._by_content: dict[str, tuple[str, list[int]]] = {}
        self.saved_bytes = 0

    def add_graph(self, graph, prefix: str) -> dict[str, str]:
        """Move `graph`'s initializers here; returns old name -> name in the main graph."""
        from onnx import TensorProto, helper, numpy_helper

        if len(graph.sparse_initializer):
            raise ExportError(f"{graph.name}: sparse initializers are not supported in the mobile model")
        names = {}
        for tensor in graph.initializer:
            if tensor.data_location == TensorProto.EXTERNAL:
                raise ExportError(f"{graph.name}: {tensor.name} is still external; load the graph with its data")
            copy = TensorProto()
            copy.CopyFrom(tensor)
            dims = list(copy.dims)
            copy.name = ""
            del copy.dims[:]
            key = hashlib.sha256(copy.SerializeToString()).hexdigest()  # type and data
            copy.dims.extend(dims)
            name = f"{prefix}{tensor.name}"
            if key in self._by_content:
                stored, stored_dims = self._by_content[key]
                self.saved_bytes += copy.ByteSize()
                if stored_dims == dims:
                    names[tensor.name] = stored
                elif copy.ByteSize() < 4096:  # a small constant: not worth a Reshape node
                    copy.name = name
                    self.tensors.append(copy)
                    names[tensor.name] = name
                    self.saved_bytes -= copy.ByteSize()
                else:
                    shape = numpy_helper.from_array(np.array(dims, dtype=np.int64), name=f"{name}/shape")
                    self.tensors.append(shape)
                    self.nodes.append(helper.make_node("Reshape", [stored, shape.name], [name], name=f"{name}/shared"))
                    names[tensor.name] = name
                continue
            copy.name = name
            self.tensors.append(copy)
            self._by_content[key] = (name, dims)
            names[tensor.name] = name
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
        for sub in subgraphs(node):
            rename_graph(sub)

    nodes = []
    for node in graph.node:
        copy = NodeProto()
        copy.CopyFrom(node)
        rename_node(copy)
        nodes.append(copy)
    return nodes, {o.name: rename(o.name) for o in graph.output}
