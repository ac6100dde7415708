"""migu: continual learning of language models with MIGU (magnitude-based gradient updating)."""

from migu.core import MIGU, keep_count

__version__ = "0.1.0"
__all__ = ["MIGU", "MiguCallback", "keep_count", "__version__"]


def __getattr__(name):
    # lazy: importing the callback pulls in transformers, which plain-PyTorch users may not want
    if name == "MiguCallback":
        from migu.integrations.hf import MiguCallback

        return MiguCallback
    raise AttributeError(f"module 'migu' has no attribute {name!r}")
