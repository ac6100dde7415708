"""`ewc`: elastic weight consolidation with a diagonal Fisher, accumulated online over tasks.

Differs from `seq-ft` (Kirkpatrick et al., 2017; the online form of Schwarz et al., 2018) in:
- `after_task`: the diagonal empirical Fisher of the task just trained, F_i = mean over
  `fisher_samples` random training examples of (d loss_x / d theta_i)^2, loss_x being that one
  example's token-mean answer NLL (the training loss at batch size one; per-example gradients from
  micro-batches of one, so no padding enters); it is accumulated as F <- gamma * F + F_task
  (gamma = 1: the plain sum over tasks; gamma < 1 discounts old tasks);
- `before_task` (phases after the first): the anchor theta* is a copy of the parameters as they
  are now, i.e. after the previous task (one anchor, as in online EWC; not kept in checkpoints: it
  equals the checkpoint's own weights);
- `extra_loss`: (lam / 2) * sum_i F_i (theta_i - theta*_i)^2 over the trainable parameters.
Memory: the Fisher and the anchor are one float32 copy of the trainable parameters each.

Scale: migu before issue 14 squared the gradient of a batch-mean loss (batches of 8). Measured on
SmolLM2-135M after 2 steps on dbpedia, 16 items (benchmarks/ewc_fisher_scale.py): sum_i F_i = 2.2e2
that way, 1.8e3 per example (1.4e-5 per parameter), a ratio of 8.2, about the batch size as expected
when per-example gradients are nearly uncorrelated; the two share only 66% of their top-1% parameters.
The default lam = 1.25e5 is the earlier 1e6 divided by 8, so the penalty's overall pull is unchanged;
rescale lam with the model and the number of answer tokens.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from migu.data import IGNORE_INDEX, collate, on_model_device
from migu.methods.seq_ft import SeqFT
from migu.seq2seq import is_encoder_decoder
from migu.seq2seq import nll_sum as seq2seq_nll


@dataclass
class EwcOptions:
    """EWC penalty strength and Fisher estimation."""

    lam: float = 1.25e5
    """lambda: the penalty is (lambda/2) * sum F_i (theta_i - theta*_i)^2, F the mean per-example squared gradient."""
    gamma: float = 1.0
    """Online decay of the accumulated Fisher, F <- gamma*F + F_task; 1.0 = sum over tasks."""
    fisher_samples: int = 64
    """Training examples of the finished task (drawn without replacement; all if fewer) whose per-example squared gradients are averaged."""

    def validate(self, key: str) -> None:
        """Raise `ValueError` naming `key.<field>` for an invalid value."""
        if self.lam < 0:
            raise ValueError(f"{key}.lam={self.lam}: must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"{key}.gamma={self.gamma}: must be in [0, 1]")
        if self.fisher_samples < 1:
            raise ValueError(f"{key}.fisher_samples={self.fisher_samples}: must be >= 1")


def answer_nll(model, batch: dict) -> torch.Tensor:
    """Token-mean NLL of the answer tokens of a collated batch (the training loss)."""
    if is_encoder_decoder(model):  # the decoder's tokens (migu.seq2seq)
        return seq2seq_nll(model, batch)[1] / (batch["labels"][:, 1:] != IGNORE_INDEX).sum()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), batch["labels"][:, 1:].reshape(-1),
                           ignore_index=IGNORE_INDEX)


class EWC(SeqFT):
    """Full fine-tuning with an EWC penalty towards the previous task's weights."""

    name = "ewc"
    Options = EwcOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.fisher: dict[str, torch.Tensor] = {}
        self.anchor: dict[str, torch.Tensor] = {}
        self.params: dict[str, torch.nn.Parameter] = {}

    def before_task(self, index, tasks, ctx):
        self.params = {n: p for n, p in ctx.model.named_parameters() if p.requires_grad}
        self.fisher = {n: f.to(self.params[n].device) if n in self.params else f for n, f in self.fisher.items()}
        self.anchor = {n: p.detach().clone() for n, p in self.params.items() if n in self.fisher}

    def penalty(self) -> torch.Tensor:
        """(lam/2) * sum F (theta - theta*)^2; zero before the first Fisher exists."""
        terms = [(self.fisher[n] * (p - self.anchor[n]).pow(2)).sum() for n, p in self.params.items()
                 if n in self.anchor]
        return 0.5 * self.options.lam * torch.stack(terms).sum() if terms else torch.zeros(())

    def extra_loss(self, model, batch, outputs):
        return self.penalty() if self.anchor and self.options.lam else None

    def estimate_fisher(self, model, items: list[dict], pad_id: int, rng: random.Random) -> dict[str, torch.Tensor]:
        """Mean over `fisher_samples` random items of the squared gradient of each one's answer NLL."""
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for p in params.values():
            p.grad = None
        chosen = rng.sample(items, min(self.options.fisher_samples, len(items)))
        for item in chosen:  # micro-batches of one: the per-example gradient, without padding
            answer_nll(model, on_model_device(collate([item], pad_id), model)).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.float().pow(2) / len(chosen)
                    p.grad = None
        return fisher

    def after_task(self, index, tasks, ctx):
        items = ctx.encode([ex for task in tasks for ex in task.train])
        rng = random.Random(f"fisher:{ctx.seed}:{index}")
        new = self.estimate_fisher(ctx.model, items, ctx.tokenizer.pad_token_id, rng)
        for n, f in new.items():
            self.fisher[n] = self.options.gamma * self.fisher[n] + f if n in self.fisher else f

    def state_dict(self):
        # the anchor too: a step checkpoint resumes inside a task, where before_task would take the
        # mid-task weights as the anchor
        return {"fisher": self.fisher, "anchor": self.anchor}

    def load_state_dict(self, state):
        def on_device(tensors):  # next to the parameters when before_task already ran (a mid-task resume)
            return {n: t.to(self.params[n].device) if n in self.params else t for n, t in tensors.items()}

        self.fisher = on_device(dict(state.get("fisher", {})))
        if "anchor" in state:
            self.anchor = on_device(dict(state["anchor"]))
