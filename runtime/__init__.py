"""Lean onnxruntime runtime for exported SmolVLM bundles: no torch, no transformers.

    from smolvlm_edge.runtime import SmolVLM
    vlm = SmolVLM("bundle-dir")
    print(vlm.generate("What is in this image?", ["photo.jpg"]).text)
"""


def __getattr__(name):
    # Lazy, so `import smolvlm_edge.runtime.errors` does not load onnxruntime.
    if name in ("SmolVLM", "GenerationResult"):
        from . import pipeline

        return getattr(pipeline, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
