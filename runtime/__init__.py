"""Lean onnxruntime runtime for exported SmolVLM bundles: no torch, no transformers."""
