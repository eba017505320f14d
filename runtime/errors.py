"""Errors the toolkit raises for bad input; the command line prints them as one line."""


class SmolVLMEdgeError(Exception):
    """Base class: something the user gave us is wrong. The message names the problem and the value."""


class ImageError(SmolVLMEdgeError):
    """An image is missing, corrupt, truncated, too large, or of a kind we cannot convert."""


class PromptError(SmolVLMEdgeError):
    """A prompt does not fit the model: image markers vs images, context length, empty text."""


class BundleError(SmolVLMEdgeError):
    """A bundle folder is incomplete, damaged, or does not match its manifest."""


class ProviderError(SmolVLMEdgeError):
    """An execution provider is unknown or not available in this onnxruntime build."""


class ExportError(SmolVLMEdgeError):
    """A checkpoint cannot be exported, or its graphs disagree with PyTorch."""


class SettingsError(SmolVLMEdgeError, ValueError):
    """A generation or command setting is out of range."""
