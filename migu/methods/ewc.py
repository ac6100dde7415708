"""`ewc`: elastic weight consolidation with a diagonal Fisher, accumulated online over tasks.

Differs from `seq-ft` (Kirkpatrick et al., 2017; the online form of Schwarz et al., 2018) in:
- `after_task`: the diagonal empirical Fisher of the task just trained, F_i = mean over
  `fisher_batches` random training batches of (d loss / d theta_i)^2, where loss is the batch's
  token-mean answer NLL (the training loss); it is accumulated as F <- gamma * F + F_task
  (gamma = 1: the plain sum over tasks; gamma < 1 discounts old tasks);
- `before_task` (phases after the first): the anchor theta* is a copy of the parameters as they
  are now, i.e. after the previous task (one anchor, as in online EWC; not kept in checkpoints: it
  equals the checkpoint's own weights);
- `extra_loss`: (lam / 2) * sum_i F_i (theta_i - theta*_i)^2 over the trainable parameters.
Memory: the Fisher and the anchor are one float32 copy of the trainable parameters each.

Scale: F is the squared gradient of a batch-mean loss, so it is small. Measured on SmolLM2-135M
after dbpedia (2 batches of 8): sum_i F_i = 2.6e2, i.e. 1.9e-6 per parameter; one AdamW step at lr
5e-5 then costs 3e-7 * lam. The default lam = 1e6 makes the penalty's pull on a typical parameter
match its task gradient after roughly 10-20 such steps; rescale lam with the batch size and model.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from migu.data import IGNORE_INDEX, collate, on_model_device
from migu.methods.seq_ft import SeqFT


@dataclass
class EwcOptions:
    """EWC penalty strength and Fisher estimation."""

    lam: float = 1.0e6
    """lambda: the penalty is (lambda/2) * sum F_i (theta_i - theta*_i)^2 (F is the raw squared gradient)."""
    gamma: float = 1.0
    """Online decay of the accumulated Fisher, F <- gamma*F + F_task; 1.0 = sum over tasks."""
    fisher_batches: int = 8
    """Training batches of the finished task that estimate its Fisher."""
    fisher_batch_size: int = 8
    """Examples per Fisher batch."""

    def validate(self, key: str) -> None:
        """Raise `ValueError` naming `key.<field>` for an invalid value."""
        if self.lam < 0:
            raise ValueError(f"{key}.lam={self.lam}: must be >= 0")
        if not 0.0 <= self.gamma <= 1.0:
            raise ValueError(f"{key}.gamma={self.gamma}: must be in [0, 1]")
        if self.fisher_batches < 1:
            raise ValueError(f"{key}.fisher_batches={self.fisher_batches}: must be >= 1")
        if self.fisher_batch_size < 1:
            raise ValueError(f"{key}.fisher_batch_size={self.fisher_batch_size}: must be >= 1")


def answer_nll(model, batch: dict) -> torch.Tensor:
    """Token-mean NLL of the answer tokens of a collated batch (the training loss)."""
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
        """Mean over random batches of `items` of the squared gradient of the answer NLL, per parameter."""
        o = self.options
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        fisher = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
        for p in params.values():
            p.grad = None
        for _ in range(o.fisher_batches):
            batch = on_model_device(collate(rng.sample(items, min(o.fisher_batch_size, len(items))), pad_id), model)
            answer_nll(model, batch).backward()
            for n, p in params.items():
                if p.grad is not None:
                    fisher[n] += p.grad.float().pow(2) / o.fisher_batches
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
