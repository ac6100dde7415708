"""`lora-replay`: the paper's LoRAReplay, one PEFT LoRA adapter (as `seq-lora`) trained with replay (as `replay`).

Every replay option of `replay` applies (`mix: append` by default: 2% of each past task's training
items appended to every later task's data); the base weights stay frozen and MIGU ranks the adapter's
A/B rows. The MIGU paper's appendix runs LoRAReplay with threshold 0.4 (see
configs/methods/lora-replay.yaml), not the 0.7 of its other baselines; migu's `migu.threshold`
default is not changed for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from migu.methods.base import LoraOptions
from migu.methods.replay import Replay, ReplayOptions
from migu.methods.seq_lora import SeqLoRA


@dataclass
class LoraReplayOptions(ReplayOptions, LoraOptions):
    """LoRA and replay settings of LoRAReplay."""

    def validate(self, key: str) -> None:
        LoraOptions.validate(self, key)
        ReplayOptions.validate(self, key)


class LoRAReplay(SeqLoRA, Replay):
    """LoRAReplay: sequential LoRA (setup, MIGU targets, lr from `seq-lora`) plus replay's hooks."""

    name = "lora-replay"
    Options = LoraReplayOptions
