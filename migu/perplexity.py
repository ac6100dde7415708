"""Perplexity of a causal LM on encoded items (packed blocks): the continual pre-training evaluation.

    result = perplexity(model, encode_blocks(blocks), batch_size=16, pad_token_id=tok.pad_token_id)
    result.perplexity, result.nll, result.tokens

Definition: every labelled next-token prediction of every item counts once — position t predicts
`labels[t]` from tokens `< t`, for t >= 1 (the first token of an item has no context and is not
predicted; labels -100 are skipped). The perplexity is `exp(sum of NLL / number of predictions)`:
exp of the mean token NLL over the whole set, token-weighted — not the mean of per-block perplexities
(which would over-weight short or hard blocks). NLL is in nats, summed in float64.

Runs under `torch.no_grad()` with `model.eval()` and restores the previous train/eval mode; items are
sorted by length and right-padded into batches (padding is never predicted).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from migu.data.collate import IGNORE_INDEX, collate, on_model_device


@dataclass
class PerplexityResult:
    """exp(mean token NLL), the mean NLL (nats per token), the number of predicted tokens and of items."""

    perplexity: float
    nll: float
    tokens: int
    items: int


def token_nll(model, items: Sequence[dict], batch_size: int = 16, pad_token_id: int = 0,
              on_batch: Callable[[float], None] | None = None) -> tuple[float, int]:
    """(summed NLL in nats, number of predictions) of every labelled next token of `items`.

    Items are dicts with `input_ids` and optionally `labels` (default: the input ids, every token).
    """
    order = sorted(range(len(items)), key=lambda i: (-len(items[i]["input_ids"]), i))
    total, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch_size):
                index = order[start:start + batch_size]
                batch = collate([{"input_ids": items[i]["input_ids"],
                                  "labels": items[i].get("labels", items[i]["input_ids"])} for i in index],
                                pad_token_id)
                batch = on_model_device(batch, model)
                logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                               use_cache=False).logits
                # position t predicts labels[t + 1]; the last position predicts nothing (no copy of the logits)
                labels = batch["labels"]
                target = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], IGNORE_INDEX)], dim=1)
                nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), target.reshape(-1),
                                      ignore_index=IGNORE_INDEX, reduction="sum")
                total += float(nll.double())
                count += int((target != IGNORE_INDEX).sum())
                if on_batch:
                    on_batch(len(index))
    finally:
        model.train(was_training)
    return total, count


def perplexity(model, items: Sequence[dict], batch_size: int = 16, pad_token_id: int = 0,
               on_batch: Callable[[float], None] | None = None) -> PerplexityResult:
    """Token-weighted perplexity of `model` on `items` (see the module docstring).

    Raises:
        ValueError: no item has a token to predict.
    """
    total, count = token_nll(model, items, batch_size, pad_token_id, on_batch)
    if count == 0:
        raise ValueError("perplexity: the items hold no token to predict (each needs at least 2 tokens)")
    mean = total / count
    return PerplexityResult(perplexity=math.exp(mean), nll=mean, tokens=count, items=len(items))
