"""adadiff-bench: a benchmarking and evaluation suite for diffusion samplers that spend less compute per image."""
from .checkpoints import load_model

__version__ = "0.1.0"
__all__ = ["load_model", "__version__"]
