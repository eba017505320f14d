"""Export SmolVLM checkpoints to ONNX graphs that are checked against PyTorch."""
