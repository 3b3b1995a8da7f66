"""longctx: take a language model from short to long context — train, extend, fit, measure, serve."""

from longctx.config import PRESETS, GPTConfig
from longctx.model import GPT

__version__ = "0.1.0"


def load(path, device=None):
    """Load a checkpoint directory (ours or a Hugging Face one) -> GPT in eval mode."""
    from longctx.checkpoint import load_model

    return load_model(path, device=device)


__all__ = ["GPT", "GPTConfig", "PRESETS", "load", "__version__"]
