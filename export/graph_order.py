"""Node order for graphs this toolkit edits or assembles (one-file model, fused attention, QDQ rewrites)."""
from __future__ import annotations


def subgraphs(node) -> list:
    """The graphs a node holds in its attributes (an If's branches, a Loop's body)."""
    return [g for attr in node.attribute for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs)]


def all_nodes(graph):
    """The graph's nodes, each followed by those of its subgraphs, depth first."""
    for node in graph.node:
        yield node
        for sub in subgraphs(node):
            yield from all_nodes(sub)


def used_names(node) -> set[str]:
    """A node's inputs, plus the outer-scope names its subgraphs read (a Loop/If depends on those too)."""
    used = {n for n in node.input if n}
    for g in subgraphs(node):
        inner = {v.name for v in g.input} | {t.name for t in g.initializer} | {o for n in g.node for o in n.output}
        used |= {n for sub in g.node for n in used_names(sub)} - inner
        used |= {o.name for o in g.output} - inner
    return used


def toposort(nodes: list) -> list:
    """Nodes in an order onnxruntime accepts (each after the producers of what it reads, subgraphs included;
    some quantized graphs list a Cast after its consumer); stable: Kahn's algorithm, earliest ready node first."""
    import heapq

    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    consumers: list[list[int]] = [[] for _ in nodes]
    waiting = [0] * len(nodes)
    for i, node in enumerate(nodes):
        for j in {producer[n] for n in used_names(node) if n in producer} - {i}:
            consumers[j].append(i)
            waiting[i] += 1
    ready = [i for i, w in enumerate(waiting) if w == 0]
    heapq.heapify(ready)
    order = []
    while ready:
        i = heapq.heappop(ready)
        order.append(i)
        for j in consumers[i]:
            waiting[j] -= 1
            if not waiting[j]:
                heapq.heappush(ready, j)
    if len(order) != len(nodes):
        raise ValueError(f"the graph has a cycle among {len(nodes) - len(order)} nodes")
    return [nodes[i] for i in order]
