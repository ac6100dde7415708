"""`seq-lora`: one PEFT LoRA adapter trained through the whole task sequence."""

from __future__ import annotations

from migu.methods.base import LoraOptions, Method, adapted_modules


class SeqLoRA(Method):
    """Sequential LoRA: one adapter (PEFT) trained on each task in turn; base weights frozen."""

    name = "seq-lora"
    Options = LoraOptions
    default_lr = 1e-4

    def setup(self, model):
        from peft import get_peft_model

        self.model = get_peft_model(model, self.options.lora_config(model))
        return self.model

    def migu_target_modules(self):
        return adapted_modules(self.model)  # MIGU ranks the LoRA A/B rows of the adapted layers
