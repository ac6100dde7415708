"""One phase's optimizer steps: the seeds, the plan of micro-batches, the optimizer and the loss of a step.

    seed_everything(phase_seed(cfg.seed, index))              # every phase reseeds (exact resume)
    plans = [plan_steps(items, cfg.train, seed, e) for e in range(phase_epochs(cfg.train, tasks))]
    loss, extra = step_loss(model, batches, method, total=total, runner=runner, before_forward=hook)

Loss: the summed token NLL of the answer tokens (prompt tokens are labelled -100) of every micro-batch
of an optimizer step, divided by the number of answer tokens in the whole step, so `grad_accum`
micro-batches give the same gradient as one batch of their union.
"""

from __future__ import annotations

import random
from typing import Callable, Optional

import numpy as np
import torch
import torch.nn.functional as F

from migu.config import ConfigError
from migu.data import IGNORE_INDEX, length_grouped_batches
from migu.distributed import StepRunner
from migu.seq2seq import is_encoder_decoder
from migu.seq2seq import nll_sum as seq2seq_nll

__all__ = ["seed_everything", "phase_seed", "phase_lr", "phase_epochs", "check_task_epochs", "plan_steps",
           "answer_tokens", "labelled", "adamw", "step_loss"]


def seed_everything(seed: int) -> None:
    """Seed torch, random and numpy."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def phase_seed(seed: int, index: int) -> int:
    """The seed of phase `index` of a run with `seed` (distinct per phase, reproducible on resume)."""
    return (seed * 1_000_003 + 7919 * (index + 1)) % 2**31


def phase_lr(train, default: float, index: int) -> float:
    """The lr of phase `index`: `train.lr_per_phase[index]` (its last entry for later phases), else `default`."""
    if train.lr_per_phase:
        return float(train.lr_per_phase[min(index, len(train.lr_per_phase) - 1)])
    return default


def check_task_epochs(train, tasks: list) -> None:
    """ConfigError when `train.task_epochs` names a task that is not in the stream (it would silently do nothing)."""
    names = [t.name for t in tasks]
    for name in train.task_epochs or {}:
        if name not in names:
            raise ConfigError(f"train.task_epochs.{name}: not a task of this stream ({', '.join(names)})")


def phase_epochs(train, phase_tasks: list) -> int:
    """Epochs of a phase: the largest `train.task_epochs` entry of its tasks, else `train.epochs`."""
    per_task = train.task_epochs or {}
    return max((per_task.get(t.name, train.epochs) for t in phase_tasks), default=train.epochs)


def plan_steps(items: list[dict], train, seed: int, epoch: int) -> list[list[list[int]]]:
    """Index lists per micro-batch, grouped `grad_accum` per optimizer step; deterministic for a seed."""
    if train.group_by_length:
        batches = length_grouped_batches([len(x["input_ids"]) for x in items], train.batch_size, seed + epoch)
    else:
        order = list(range(len(items)))
        random.Random(seed + epoch).shuffle(order)
        batches = [order[i:i + train.batch_size] for i in range(0, len(order), train.batch_size)]
    return [batches[i:i + train.grad_accum] for i in range(0, len(batches), train.grad_accum)]


def answer_tokens(item: dict) -> int:
    """Answer tokens of one encoded item: labelled positions after the first (what the loss averages over)."""
    return sum(1 for label in item["labels"][1:] if label != IGNORE_INDEX)


def labelled(item: dict) -> int:
    """Labelled positions of one encoded item (a train record's `tokens`)."""
    return sum(1 for label in item["labels"] if label != IGNORE_INDEX)


def adamw(params: list, lr: float, weight_decay: float) -> torch.optim.Optimizer:
    """AdamW, fused where torch supports it (on CPU ~5x faster per step than the foreach version)."""
    try:
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def step_loss(model, micro_batches: list[dict], method=None, needs_hidden_states: bool = False, *,
              total: Optional[int] = None, runner: Optional[StepRunner] = None, padding: int = 0,
              before_forward: Callable[[dict, bool], None] = lambda batch, placeholder: None):
    """Forward + backward of one optimizer step's micro-batches; returns (token-mean NLL, extra loss).

    Each micro-batch contributes `sum NLL(answer tokens) / N` with N the step's total answer tokens,
    plus `method.extra_loss(...) * n_mb / N`. Only positions that predict an answer token go through
    the LM head (`logits_to_keep`), which saves most of its cost.

    `runner` (a `migu.distributed.StepRunner`; default: one for this process alone, fp32, no wrapper)
    runs each micro-batch: data-parallel, `micro_batches` are this rank's share, `total` is the
    answer-token count of the whole step over all ranks, the forward goes through the DDP wrapper under
    the run's autocast, and the returned values are this rank's share of the step's. The last `padding`
    micro-batches are placeholders (`StepRunner.shard`: rows that train nothing). `before_forward(batch,
    placeholder)` is called before each micro-batch's forward (MIGU's token mask; a placeholder is not counted).
    """
    if total is None:
        total = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in micro_batches)
    if total == 0:
        raise ValueError("an optimizer step has no answer tokens (every label is -100)")
    runner = runner or StepRunner(model, next(model.parameters()).device)
    seq2seq = is_encoder_decoder(model)
    nll_sum, extra_sum = 0.0, 0.0
    for i, batch in enumerate(micro_batches):
        before_forward(batch, i >= len(micro_batches) - padding)
        with runner.micro_batch(last=i == len(micro_batches) - 1):
            with runner.autocast():
                target = batch["labels"][:, 1:]
                if seq2seq:  # encoder-decoder: the decoder's tokens (migu.seq2seq)
                    outputs, nll = seq2seq_nll(model, batch, needs_hidden_states, call=runner.forward_model)
                else:
                    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)
                    kwargs = {"output_hidden_states": True} if needs_hidden_states else {}
                    outputs = runner.forward_model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                                   use_cache=False, logits_to_keep=keep, **kwargs)
                    logits = outputs.logits
                    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                                          target[:, keep].reshape(-1), ignore_index=IGNORE_INDEX, reduction="sum")
                loss = nll / total
                extra = method.extra_loss(model, batch, outputs) if method is not None else None
                if extra is not None:
                    extra = extra * (int((target != IGNORE_INDEX).sum()) / total)
                    loss = loss + extra
                    extra_sum += float(extra.detach())
            runner.backward(loss)
        nll_sum += float(nll.detach())
    return nll_sum / total, extra_sum
