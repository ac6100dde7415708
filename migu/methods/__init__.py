"""The registry of continual-learning methods: name → `Method` subclass.

A new method is one file `migu/methods/<name>.py` with a `Method` subclass (see `base.py`) and one
`register(...)` line below; the runner and the CLI consult only `METHODS`.
"""

from __future__ import annotations

from migu.methods.base import Context, LoraOptions, Method, NoOptions
from migu.methods.ewc import EWC
from migu.methods.gere import GeRe
from migu.methods.i_lora import ILoRA
from migu.methods.inc_lora import IncLoRA
from migu.methods.mtl import MTL
from migu.methods.lora_replay import LoRAReplay
from migu.methods.o_lora import OLoRA
from migu.methods.replay import Replay
from migu.methods.seq_ft import SeqFT
from migu.methods.seq_lora import SeqLoRA

METHODS: dict[str, type[Method]] = {}


def register(cls: type[Method]) -> type[Method]:
    """Add a method class to `METHODS`; rejects a bad or duplicate name (usable as a decorator)."""
    name = cls.name
    if not name or name != name.lower() or not all(c.isalnum() or c == "-" for c in name):
        raise ValueError(f"method name {name!r} of {cls.__name__} must be lowercase letters, digits and dashes")
    if name in METHODS and METHODS[name] is not cls:
        raise ValueError(f"method name {name!r} is registered twice ({METHODS[name].__name__}, {cls.__name__})")
    METHODS[name] = cls
    return cls


def options_key(name: str) -> str:
    """The config section of a method's options: `method.<name with dashes as underscores>`."""
    return name.replace("-", "_")


def get_method(name: str) -> type[Method]:
    """The class registered as `name`; an unknown name raises `ValueError` listing the known ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {', '.join(sorted(METHODS))}")
    return METHODS[name]


register(SeqFT)
register(SeqLoRA)
for _cls in (Replay, IncLoRA, OLoRA, ILoRA, GeRe, EWC, MTL):  # issue 5
    register(_cls)
register(LoRAReplay)  # issue 14

__all__ = ["METHODS", "Context", "LoraOptions", "Method", "NoOptions", "get_method", "options_key", "register"]
