"""EWC's Fisher scale on SmolLM2-135M: the per-example empirical Fisher vs the squared batch-mean gradient.

    python benchmarks/ewc_fisher_scale.py        # ~4 min on 2 CPU cores (one thread)

Trains 2 full-FT steps (batch 8, lr 5e-5) on the first 16 dbpedia items of configs/methods/ewc.yaml, then
estimates the Fisher both ways on those 16 items: the squared gradient of a batch-mean loss (2 batches of
8, migu before issue 14) and the mean of per-example squared gradients (`EWC.estimate_fisher`). Prints
their sums, the ratio (which set the default lam = 1e6 / 8) and the overlap of their top-1% parameters.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

from migu.config import load_config
from migu.data import collate, encode
from migu.methods.ewc import EWC, EwcOptions, answer_nll
from migu.models import load_model_and_tokenizer
from migu.scenarios import get_scenario


def main() -> None:
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = load_config(Path(__file__).resolve().parent.parent / "configs" / "methods" / "ewc.yaml")
    model, tok = load_model_and_tokenizer("smollm2-135m")
    items = encode(tok, get_scenario(cfg).load_tasks()[0].train, 128)[:16]
    optimizer = torch.optim.AdamW(model.parameters(), lr=5e-5)
    model.train()
    for i in range(2):
        answer_nll(model, collate(items[8 * i:8 * i + 8], tok.pad_token_id)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    params = dict(model.named_parameters())
    old = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(2):
        answer_nll(model, collate(items[8 * i:8 * i + 8], tok.pad_token_id)).backward()
        for n, p in params.items():
            old[n] += p.grad.pow(2) / 2
            p.grad = None
    new = EWC(EwcOptions(fisher_samples=16)).estimate_fisher(model, items, tok.pad_token_id, random.Random(0))
    n = sum(p.numel() for p in params.values())
    a = torch.cat([old[k].flatten() for k in params])
    b = torch.cat([new[k].flatten() for k in params])
    k = n // 100
    overlap = len(set(a.topk(k).indices.tolist()) & set(b.topk(k).indices.tolist())) / k
    print(f"squared batch-mean gradient (2 x 8): sum F = {a.sum():.3g} ({a.sum() / n:.3g} per parameter)")
    print(f"per-example (16): sum F = {b.sum():.3g} ({b.sum() / n:.3g} per parameter); ratio {b.sum() / a.sum():.2f}; "
          f"top-1% overlap {overlap:.2f}")


if __name__ == "__main__":
    main()
