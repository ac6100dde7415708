"""MIGU as a Hugging Face ``transformers.Trainer`` callback.

    trainer = Trainer(model=model, args=args, train_dataset=ds, callbacks=[MiguCallback(threshold=0.7)])

The Trainer calls ``on_pre_optimizer_step`` after gradient clipping, so the clipping norm is computed on the
unmasked gradients (the migu runner masks before clipping); everything else matches the core API.
"""

from __future__ import annotations

from transformers import TrainerCallback

from migu.core import MIGU, check_options


class MiguCallback(TrainerCallback):
    """Attach MIGU at the start of training, mask before every optimizer step, reset after it.

    Args:
        threshold: fraction T of output units per layer whose gradient rows are zeroed.
        target_modules: as in :class:`migu.MIGU` (None = every linear layer inside the blocks).
        mode: "grad" (the paper) or "update" (masked rows exactly unchanged by the step).
        include_lm_head, lora_b: as in :class:`migu.MIGU`.
    """

    def __init__(self, threshold: float = 0.7, target_modules=None, mode: str = "grad",
                 include_lm_head: bool = False, lora_b: str = "layer"):
        check_options(threshold, mode, lora_b)  # fail when the Trainer is built, not at its first step
        self.threshold, self.target_modules, self.mode = threshold, target_modules, mode
        self.include_lm_head, self.lora_b = include_lm_head, lora_b
        self.migu: MIGU | None = None
        self.last_masks: dict = {}

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.migu = MIGU(model, self.threshold, self.target_modules, self.mode,
                         include_lm_head=self.include_lm_head, lora_b=self.lora_b)

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.last_masks = self.migu.mask_gradients()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.migu.reset()

    def on_train_end(self, args, state, control, **kwargs):
        if self.migu is not None:
            self.migu.remove()
            self.migu = None
