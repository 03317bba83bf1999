"""adadiff-bench: a benchmarking and evaluation suite for diffusion samplers that spend less compute per image.

Importing the package imports nothing heavy (reports run without torch); `load_model` is loaded on use.
"""
__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]


def __getattr__(name: str):
    if name == "load_model":
        from .checkpoints import load_model
        return load_model
    raise AttributeError(f"module 'adadiff_bench' has no attribute {name!r}")
