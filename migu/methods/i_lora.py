"""`i-lora`: interpolation-based LoRA, a dual-memory replay with a fast and a slow adapter.

Differs from `seq-lora` (Ren et al., 2024, "Analyzing and Reducing Catastrophic Forgetting in
Parameter Efficient Tuning"; reference code which47/LLMCL) in:
- `setup`: two PEFT adapters on the same layers: `fast` (the only one trained, the only one MIGU
  ranks) and `slow`, a copy of it that is never trained;
- `after_step`: slow <- lam * slow + (1 - lam) * fast with lam = min(1 - 1/(step + 1), ema_max),
  `step` counting optimizer steps over the whole run (so lam = 0 never happens after the first step);
- `mix_batch`: as the reference (`ILoRATrainer.compute_loss`), every micro-batch's task items are
  first offered to a reservoir buffer (Algorithm R, current task included, filled on the fly), then,
  from the second phase on, replayed items drawn from it are appended (`rate`, see `replay`'s
  `mix=batch`; the reference replays as many as the batch holds, rate 0.5);
- `extra_loss`: on the replayed rows of a micro-batch, consistency_weight x the mean over transformer
  layers of MSE(h_fast, max(h_fast, h_slow)) on the non-padding tokens' hidden states, h_slow from a
  no-grad, dropout-free forward pass through the slow adapter (the embedding output, which no adapter
  changes, is left out); on an encoder-decoder model (T5) the layers are the encoder's (source tokens)
  and the decoder's (target tokens);
- `eval_context`: evaluation runs with the slow adapter.
"""

from __future__ import annotations

import contextlib
import random
from collections import Counter
from dataclasses import dataclass

import torch

from migu.methods.base import LoraOptions
from migu.methods.inc_lora import lora_layers
from migu.methods.replay import BufferOptions, Reservoir, replay_count
from migu.methods.seq_lora import SeqLoRA
from migu.seq2seq import hidden_forward, layer_states


@dataclass
class ILoraOptions(BufferOptions, LoraOptions):
    """LoRA, replay and EMA settings of I-LoRA."""

    ema_max: float = 0.25
    """Largest EMA weight of the slow adapter: lam = min(1 - 1/(step+1), ema_max)."""
    consistency_weight: float = 1.0
    """Weight of the consistency loss MSE(h_fast, max(h_fast, h_slow)) on replayed rows."""

    def validate(self, key: str) -> None:
        LoraOptions.validate(self, key)
        BufferOptions.validate(self, key)
        if not 0.0 <= self.ema_max < 1.0:
            raise ValueError(f"{key}.ema_max={self.ema_max}: must be in [0, 1)")
        if self.consistency_weight < 0:
            raise ValueError(f"{key}.consistency_weight={self.consistency_weight}: must be >= 0")


@contextlib.contextmanager
def active_adapter(model, name: str):
    """Route every LoRA layer through adapter `name` only, without changing any requires_grad flag.

    PEFT's `set_adapter` also flips requires_grad, which must not happen in the middle of a training
    step, so this sets the layers' active-adapter list (`_active_adapter`) directly and restores it.
    """
    layers = [m for _, m in lora_layers(model)]
    saved = [m._active_adapter for m in layers]
    try:
        for m in layers:
            m._active_adapter = [name]
        yield
    finally:
        for m, s in zip(layers, saved):
            m._active_adapter = s


class ILoRA(SeqLoRA):
    """I-LoRA: a trained fast adapter, an EMA slow adapter used at evaluation, replay + consistency loss."""

    name = "i-lora"
    Options = ILoraOptions
    needs_hidden_states = True

    def __init__(self, options=None):
        super().__init__(options)
        self.model, self.buffer, self.step, self.pairs = None, None, 0, []
        self.index, self.mix_step, self.replayed = 0, 0, Counter()  # replayed items of the current step
        self.rng, self.fill_rng = random.Random(0), random.Random(0)

    def setup(self, model):
        from peft import get_peft_model

        config = self.options.lora_config(model)
        self.model = get_peft_model(model, config, adapter_name="fast")
        self.model.add_adapter("slow", config)
        self.model.base_model.set_adapter("fast")  # fast active and trainable, slow inactive and frozen
        self.pairs = [(getattr(layer, key)["slow"].weight, getattr(layer, key)["fast"].weight)
                      for _, layer in lora_layers(self.model) for key in ("lora_A", "lora_B")]
        with torch.no_grad():
            for slow, fast in self.pairs:
                slow.copy_(fast)
        return self.model

    def before_task(self, index, tasks, ctx):
        if self.buffer is None:
            self.buffer = Reservoir(self.options.capacity(ctx.tasks))
        self.index = index
        self.rng = random.Random(f"mix:{ctx.seed}:{index}")
        self.fill_rng = random.Random(f"reservoir:{ctx.seed}:{index}")  # reproducible on resume

    def mix_batch(self, items, step):
        if step != self.mix_step:  # a new optimizer step: its micro-batches are mixed before any forward
            self.mix_step, self.replayed = step, Counter()
        for item in items:  # the reference adds the batch to the buffer first, then samples
            self.buffer.offer(item, self.fill_rng)
        if self.index == 0:  # the reference replays from the second task on
            return items
        replayed = self.buffer.sample(replay_count(len(items), self.options.rate, self.rng), self.rng)
        self.replayed.update(tuple(item["input_ids"]) for item in replayed)
        return items + replayed

    def replayed_rows(self, batch: dict) -> list[int]:
        """Rows of a collated micro-batch that `mix_batch` appended as replays.

        Found by content, counted: replays follow the task items, so scanning from the last row, a
        task item equal to a replayed one (just offered, drawn back) is not counted twice.
        """
        ids, mask = batch["input_ids"], batch["attention_mask"]
        left, rows = Counter(self.replayed), []
        for r in reversed(range(ids.shape[0])):
            key = tuple(ids[r][mask[r].bool()].tolist())
            if left[key] > 0:
                left[key] -= 1
                rows.append(r)
        return sorted(rows)

    def ema_weight(self, step: int) -> float:
        """lam of the EMA update after optimizer step `step` (1-based, counted over the whole run)."""
        return min(1.0 - 1.0 / (step + 1), self.options.ema_max)

    def after_step(self, step):
        self.step += 1
        lam = self.ema_weight(self.step)
        with torch.no_grad():
            for slow, fast in self.pairs:
                slow.mul_(lam).add_(fast, alpha=1.0 - lam)

    def extra_loss(self, model, batch, outputs):
        if not self.replayed or not self.options.consistency_weight:
            return None
        rows = self.replayed_rows(batch)
        if not rows:
            return None
        sub = {key: value[rows] for key, value in batch.items()}
        was_training = model.training
        with torch.no_grad(), active_adapter(model, "slow"):
            model.eval()
            slow = layer_states(model, hidden_forward(model, sub), sub)
            model.train(was_training)
        losses = []
        # causal: every layer's output; encoder-decoder: the encoder's then the decoder's (migu.seq2seq)
        for (h_fast, mask), (h_slow, _) in zip(layer_states(model, outputs, batch), slow):
            h_fast = h_fast[rows]
            weight = mask[rows].unsqueeze(-1).to(h_slow.dtype)
            target = torch.maximum(h_fast.detach(), h_slow)
            losses.append(((h_fast - target).pow(2) * weight).sum() / (weight.sum() * h_fast.shape[-1]))
        return self.options.consistency_weight * torch.stack(losses).mean()

    def eval_context(self, model):
        return active_adapter(model, "slow")

    def state_dict(self):
        return {"step": self.step, "buffer": self.buffer.state_dict() if self.buffer is not None else None}

    def load_state_dict(self, state):
        self.step = int(state.get("step", 0))
        if state.get("buffer") is not None:
            self.buffer = Reservoir.from_state(state["buffer"])
