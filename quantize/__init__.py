"""Quantized builds of an exported bundle (see the quantize issue)."""
