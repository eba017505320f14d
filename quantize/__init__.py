"""Quantized builds of an exported bundle: recipes (recipes.py), weight quantizers (weights.py), the build (build.py)."""
from smolvlm_edge.runtime.errors import SmolVLMEdgeError


class QuantizeError(SmolVLMEdgeError):
    """A quantization request is wrong (recipe, option, graph, calibration set) or a build failed; nothing was written."""
