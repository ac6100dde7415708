"""`seq-lora`: one PEFT LoRA adapter trained through the whole task sequence."""

from __future__ import annotations

from migu.methods.base import LoraOptions, Method


class SeqLoRA(Method):
    """Sequential LoRA: one adapter (PEFT) trained on each task in turn; base weights frozen."""

    name = "seq-lora"
    Options = LoraOptions
    default_lr = 1e-4

    def setup(self, model):
        from peft import LoraConfig, get_peft_model

        o = self.options
        config = LoraConfig(r=o.r, lora_alpha=o.alpha, lora_dropout=o.dropout,
                            target_modules=list(o.target_modules), task_type="CAUSAL_LM")
        return get_peft_model(model, config)

    def migu_target_modules(self):
        return list(self.options.target_modules)  # MIGU ranks the LoRA A/B rows of the adapted layers
