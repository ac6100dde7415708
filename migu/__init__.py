"""migu: continual learning of language models with MIGU (magnitude-based gradient updating)."""

import os

# Transparent huge pages for torch's large CPU buffers (torch reads this once, at its first allocation): every
# training step allocates ~1 GB of fresh gradient, cast and activation memory, and faulting it in 4 KB pages
# cost ~10% of a SmolLM2 step on 2 CPU cores; results are bit-identical. Set it to 0 to opt out; no effect
# when torch allocated tensors before migu was imported.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

from migu.core import MIGU, keep_count

__version__ = "0.1.0"
__all__ = ["MIGU", "MiguCallback", "keep_count", "__version__"]


def __getattr__(name):
    # lazy: importing the callback pulls in transformers, which plain-PyTorch users may not want
    if name == "MiguCallback":
        from migu.integrations.hf import MiguCallback

        return MiguCallback
    raise AttributeError(f"module 'migu' has no attribute {name!r}")
