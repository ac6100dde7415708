"""The hook interface every continual-learning method implements, and the options LoRA methods share.

The one loop (`migu.train`) owns forward → loss → backward → `MIGU.mask_gradients` → clip → step; a
method only says how it differs from sequential training, through the hooks of `Method`. The loop calls
every hook for every method and never branches on a method's name; a method that needs something new
adds a hook here (with a no-op default) rather than a special case in the loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, ClassVar, Optional

import torch
from torch import nn


@dataclass
class NoOptions:
    """A method without options of its own."""


@dataclass
class LoraOptions:
    """PEFT LoRA settings shared by the LoRA-based methods."""

    r: int = 8
    """LoRA rank."""
    alpha: int = 32
    """LoRA scaling numerator (the update is scaled by alpha / r)."""
    dropout: float = 0.1
    """Dropout on the LoRA path during training."""
    target_modules: Optional[list[str]] = None
    """Module names that get an adapter, PEFT style (`q_proj` matches every `*.q_proj`); null: PEFT's default for the architecture (`q_proj, v_proj` for Llama/SmolLM2/BART, `q, v` for T5)."""

    def validate(self, key: str) -> None:
        """Raise `ValueError` naming `key.<field>` for an invalid value."""
        if self.r < 1:
            raise ValueError(f"{key}.r={self.r}: must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"{key}.dropout={self.dropout}: must be in [0, 1)")
        if self.target_modules is not None and not self.target_modules:
            raise ValueError(f"{key}.target_modules: must name at least one module (or be null)")

    def lora_config(self, model: nn.Module):
        """PEFT's LoraConfig of these options for `model` (its task type: causal or encoder-decoder LM)."""
        from peft import LoraConfig

        from migu.seq2seq import is_encoder_decoder

        task_type = "SEQ_2_SEQ_LM" if is_encoder_decoder(model) else "CAUSAL_LM"
        targets = list(self.target_modules) if self.target_modules else None  # None: PEFT's per-model default
        return LoraConfig(r=self.r, lora_alpha=self.alpha, lora_dropout=self.dropout, target_modules=targets,
                          task_type=task_type)


def adapted_modules(peft_model: nn.Module) -> list[str]:
    """The module names PEFT adapted (its resolved `target_modules`), for MIGU's targeting."""
    config = peft_model.peft_config[next(iter(peft_model.peft_config))]
    targets = config.target_modules
    return [targets] if isinstance(targets, str) else sorted(targets)


@dataclass
class Context:
    """What the loop hands to `before_task` / `after_task`: the run's shared objects, read-only by convention.

    Attributes:
        model: the model being trained (as returned by `Method.setup`).
        tokenizer: its tokenizer.
        tasks: every task of the sequence, in order.
        encode: `encode(examples) -> items`: answer-only tokenisation with the run's `max_length`.
        seed: the run seed.
        log: `log(record: dict)` appends one record (with a "type" key) to metrics.jsonl.
    """

    model: nn.Module
    tokenizer: Any
    tasks: list
    encode: Any
    seed: int
    log: Any


class Method:
    """Base class of continual-learning methods: sequential training with every hook a no-op.

    A subclass MUST set:
        name: the registry name (`methods/<name with _>.py` ↔ `"<name>"`), lowercase with dashes.
    A subclass MAY set:
        Options: a dataclass of its options (attribute docstrings feed `migu run --help`; an optional
            `validate(key)` raises `ValueError` naming `key.<field>`); the config section
            `method.<name with _>` holds them and the instance receives them as `self.options`.
        default_lr: the learning rate used when `train.lr` is null.
        needs_hidden_states: True makes the loop call the model with `output_hidden_states=True`
            so `extra_loss` can read `outputs.hidden_states`.
    and override any of these hooks (called in this order):
        setup(model) -> model                 once, after loading; wrap/freeze (e.g. PEFT), return the model
        migu_target_modules() -> list|None    which modules MIGU ranks (None: MIGU's default)
        phases(tasks) -> [(name, [tasks])]    training phases; one row of the accuracy matrix each
        before_task(i, tasks, ctx)            before phase i (e.g. add an adapter, snapshot weights)
        trainable_parameters(model) -> list   what the (fresh, per-phase) optimizer updates
        train_items(i, tasks, items, ctx)     the phase's encoded training items (append replayed ones)
        mix_batch(items, step) -> items       add/replace encoded items of a micro-batch (replay)
        extra_loss(model, batch, outputs)     a tensor added to the micro-batch loss, or None
        after_step(step)                      after each optimizer step (EMA, counters)
        after_task(i, tasks, ctx)             after phase i trains (Fisher, store replay samples)
        eval_context(model)                   context manager choosing the weights used at evaluation
        state_dict() / load_state_dict(state) method state beyond model parameters, for resume
    Methods never call backward() or optimizer.step(): the loop does, so MIGU sits between them.
    Checkpoints hold every parameter the method added in `setup` (e.g. all LoRA adapters) and every
    trainable one, so a method only puts other state (buffers, EMA copies, Fisher, replay buffer) in
    `state_dict`. State must be a dict of tensors, numbers, strings, lists and dicts.
    """

    name: ClassVar[str] = ""
    Options: ClassVar[type] = NoOptions
    default_lr: ClassVar[float] = 1e-5
    needs_hidden_states: ClassVar[bool] = False

    def __init__(self, options: Optional[Any] = None):
        self.options = options if options is not None else self.Options()

    def setup(self, model: nn.Module) -> nn.Module:
        """Prepare the freshly loaded model (freeze, wrap with adapters); return the model to train."""
        return model

    def migu_target_modules(self) -> Optional[list[str]]:
        """Module-name patterns MIGU targets (PEFT style), or None for MIGU's default (every block linear)."""
        return None

    def phases(self, tasks: list) -> list[tuple[str, list]]:
        """The training phases: `(row name, tasks trained together)`; default one phase per task."""
        return [(task.name, [task]) for task in tasks]

    def before_task(self, index: int, tasks: list, ctx: Context) -> None:
        """Called before phase `index` trains on `tasks` (after the phase's reseeding)."""

    def trainable_parameters(self, model: nn.Module) -> list[nn.Parameter]:
        """Parameters the optimizer of the coming phase updates (called after `before_task`)."""
        return [p for p in model.parameters() if p.requires_grad]

    def train_items(self, index: int, tasks: list, items: list[dict], ctx: Context) -> list[dict]:
        """The encoded training items of phase `index` (default: its tasks' items, unchanged).

        Called after `trainable_parameters`; the loop shuffles what it returns into micro-batches,
        so every returned item is seen once per epoch (e.g. replay appends stored past items).
        """
        return items

    def mix_batch(self, items: list[dict], step: int) -> list[dict]:
        """Return the encoded items (`input_ids`, `labels` lists) of one micro-batch; default unchanged.

        `step` counts optimizer steps within the phase. Added items count toward the step's
        answer-token normalisation like any other item.
        """
        return items

    def extra_loss(self, model: nn.Module, batch: dict, outputs: Any) -> Optional[torch.Tensor]:
        """A scalar added to the micro-batch loss (or None).

        The loop weights it by the micro-batch's share of the step's answer tokens, so over one
        optimizer step the weights sum to 1: a per-step penalty (EWC) is counted once whatever
        `grad_accum` is.
        """
        return None

    def after_step(self, step: int) -> None:
        """Called after each optimizer step (and `MIGU.reset`) with the phase's step count so far."""

    def after_task(self, index: int, tasks: list, ctx: Context) -> None:
        """Called after phase `index` trained, before evaluation and the checkpoint."""

    def eval_context(self, model: nn.Module):
        """Context manager active during evaluation (e.g. swap in EMA weights); default does nothing."""
        return contextlib.nullcontext()

    def state_dict(self) -> dict:
        """Method state beyond model parameters (saved in every checkpoint)."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what `state_dict` returned (on resume, after `setup`)."""
