"""`inc-lora`: a new PEFT LoRA adapter per task; earlier adapters frozen; all adapters summed.

Differs from `seq-lora` in `before_task`: phase i > 0 adds adapter `t<i>` (B = 0, so the model's
output is unchanged at that moment), makes every adapter `t0..t<i>` active, so the layer output is
base + the sum of all adapters' updates in training and at evaluation, and leaves only `t<i>`
trainable. MIGU sees only trainable parameters, so it ranks the A/B rows of the newest adapter.

Resume: the checkpoint holds every adapter (none is a base parameter); `state_dict` records how many
there are and `load_state_dict` recreates them before the loop loads their weights.
"""

from __future__ import annotations

from peft.tuners.tuners_utils import BaseTunerLayer

from migu.methods.base import LoraOptions, Method, adapted_modules


def lora_layers(model):
    """(name, module) of every PEFT LoRA layer of `model`."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, BaseTunerLayer) and hasattr(m, "lora_A")]


class IncLoRA(Method):
    """Incremental LoRA: one new adapter per task, earlier ones frozen, all summed in the forward pass."""

    name = "inc-lora"
    Options = LoraOptions
    default_lr = 1e-4

    def __init__(self, options=None):
        super().__init__(options)
        self.model = None
        self.n_adapters = 0

    @staticmethod
    def adapter(index: int) -> str:
        return f"t{index}"

    def _config(self):
        return self.options.lora_config(self.model)

    def setup(self, model):
        from peft import get_peft_model

        self.model = get_peft_model(model, self.options.lora_config(model), adapter_name=self.adapter(0))
        self.n_adapters = 1
        return self.model

    def migu_target_modules(self):
        return adapted_modules(self.model)  # frozen adapters have no trainable rows: MIGU skips them

    def _ensure_adapters(self, n: int) -> None:
        """Create adapters up to t<n-1>, make all of them active and only the newest trainable."""
        while self.n_adapters < n:
            self.model.add_adapter(self.adapter(self.n_adapters), self._config())
            self.n_adapters += 1
        names = [self.adapter(i) for i in range(self.n_adapters)]
        self.model.base_model.set_adapter(names)  # all active (summed); PEFT marks them all trainable ...
        newest = names[-1]
        for _, layer in lora_layers(self.model):  # ... so freeze all but the newest again
            for key in layer.adapter_layer_names:
                for name, sub in getattr(layer, key).items():
                    sub.requires_grad_(name == newest)

    def before_task(self, index, tasks, ctx):
        self._ensure_adapters(index + 1)

    def new_and_old_A(self):
        """Per LoRA layer: (A of the newest adapter, [A of every earlier adapter])."""
        names = [self.adapter(i) for i in range(self.n_adapters)]
        return [(layer.lora_A[names[-1]].weight, [layer.lora_A[n].weight for n in names[:-1]])
                for _, layer in lora_layers(self.model)]

    def state_dict(self):
        return {"n_adapters": self.n_adapters}

    def load_state_dict(self, state):
        self._ensure_adapters(int(state.get("n_adapters", 1)))
