"""Evaluation that runs a task's shared prompt prefix once and reuses its key/value cache.

Every test prompt of a task starts with the same task line, instruction and option list. After the
prompts are tokenised and truncated exactly as the naive path does (`encode_prompts`), the longest
common prefix of their token ids is split off: prefix + suffix is by construction the naive token
sequence (no tokenizer-boundary question), and a truncation that cut into the header only shortens
the prefix. The prefix runs once (batch 1); each batch copies its cache (`DynamicCache`) and runs
only the suffixes.

Layout of one batch, positions as the naive path gives them (real tokens 0, 1, …):

    [prefix 0..P-1][pad … pad][suffix P..P+s-1][new tokens P+s, P+s+1, …]

Suffixes are left-padded *after* the prefix, with explicit `position_ids` and an attention mask that
hides the pads, so every row's last real token sits in the last column and new tokens (greedy
decoding, or rank mode's label tokens) append as one column per step. The greedy loop is HF
`generate`'s (argmax, rows stop at eos, pad afterwards); it also stops once every row's text holds a
newline, after which the prediction (text up to the first newline) cannot change.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch

MIN_PREFIX = 4  # shorter shared prefixes are not worth a separate pass: the naive path runs


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common prefix of `sequences`, leaving every sequence at least one token."""
    if not sequences:
        return 0
    limit = min(len(s) for s in sequences) - 1
    first = sequences[0]
    n = 0
    while n < limit and all(s[n] == first[n] for s in sequences):
        n += 1
    return max(0, n)


def cache_kwarg(model) -> str | None:
    """The forward's cache argument (`cache` in recent transformers 5, `past_key_values` before), None: no cache."""
    import inspect

    base = model.get_base_model() if hasattr(model, "get_base_model") else model  # PEFT forwards it unchanged
    params = inspect.signature(type(base).forward).parameters
    return next((name for name in ("cache", "past_key_values") if name in params), None)


class PrefixCache:
    """The key/value cache of one prefix (batch 1); `expand(b)` gives a fresh cache for a batch of b rows."""

    def __init__(self, model, prefix: Sequence[int]):
        from transformers import DynamicCache

        device = next(model.parameters()).device
        self.model, self.length = model, len(prefix)
        self.kwarg = cache_kwarg(model)
        ids = torch.tensor([list(prefix)], dtype=torch.long, device=device)
        self.cache = DynamicCache(config=getattr(model, "config", None))
        model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=True, logits_to_keep=1,
              **{self.kwarg: self.cache})

    def expand(self, batch: int):
        cache = copy.deepcopy(self.cache)  # the forward appends to the cache: every batch needs its own
        if batch > 1:
            cache.batch_repeat_interleave(batch)
        return cache


def _suffix_batch(prefix: PrefixCache, suffixes: Sequence[Sequence[int]], pad: int):
    """Runs left-padded suffixes after the prefix; returns (cache, last-token logits, mask, next positions)."""
    device = next(prefix.model.parameters()).device
    width = max(len(s) for s in suffixes)
    b = len(suffixes)
    ids = torch.full((b, width), pad, dtype=torch.long)
    mask = torch.zeros((b, prefix.length + width), dtype=torch.long)
    mask[:, :prefix.length] = 1
    positions = torch.zeros((b, width), dtype=torch.long)
    for row, s in enumerate(suffixes):
        n = len(s)
        ids[row, width - n:] = torch.tensor(list(s), dtype=torch.long)
        mask[row, prefix.length + width - n:] = 1
        positions[row, width - n:] = torch.arange(prefix.length, prefix.length + n)
    ids, mask, positions = ids.to(device), mask.to(device), positions.to(device)
    cache = prefix.expand(b)
    logits = prefix.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                          logits_to_keep=1, **{prefix.kwarg: cache}).logits[:, -1]
    following = positions[:, -1] + 1
    return cache, logits, mask, following


def generate(prefix: PrefixCache, suffixes: Sequence[Sequence[int]], max_new_tokens: int, eos: int, pad: int,
             newline_done: Callable[[list[int]], bool] | None = None) -> list[list[int]]:
    """Greedy continuation of prefix + each suffix (HF `generate` semantics); the new tokens per row, eos cut.

    `newline_done(tokens)` tells whether a row's text already holds its answer line (then it may stop).
    """
    model = prefix.model
    cache, logits, mask, following = _suffix_batch(prefix, suffixes, pad)
    b = len(suffixes)
    out: list[list[int]] = [[] for _ in range(b)]
    done = torch.zeros(b, dtype=torch.bool)
    for step in range(max_new_tokens):
        token = logits.argmax(-1)
        token = torch.where(done.to(token.device), torch.full_like(token, pad), token)
        for row, t in enumerate(token.tolist()):
            if not done[row]:
                if t == eos:
                    done[row] = True
                else:
                    out[row].append(t)
                    if newline_done is not None and newline_done(out[row]):
                        done[row] = True
        if bool(done.all()) or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, torch.ones((b, 1), dtype=mask.dtype, device=mask.device)], dim=1)
        logits = model(input_ids=token.unsqueeze(1), attention_mask=mask, position_ids=following.unsqueeze(1),
                       use_cache=True, **{prefix.kwarg: cache}).logits[:, -1]
        following = following + 1
    return out


def score_labels(prefix: PrefixCache, suffixes: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
                 pad: int) -> torch.Tensor:
    """Summed log-probability of every target after prefix + each suffix: [len(suffixes), len(targets)], float64.

    Each suffix runs once; its cache is repeated for the targets, which run together (right-padded).
    """
    model = prefix.model
    cache, logits, mask, following = _suffix_batch(prefix, suffixes, pad)
    b, n_labels = len(suffixes), len(targets)
    width = max(len(t) for t in targets)
    device = logits.device
    tgt = torch.full((n_labels, width), pad, dtype=torch.long)
    tmask = torch.zeros((n_labels, width), dtype=torch.long)
    for j, t in enumerate(targets):
        tgt[j, :len(t)] = torch.tensor(list(t), dtype=torch.long)
        tmask[j, :len(t)] = 1
    tgt, tmask = tgt.to(device), tmask.to(device)
    first = torch.log_softmax(logits.float(), -1)[:, tgt[:, 0]]  # [b, labels]: the first target token
    if width == 1:
        return first.double().cpu()
    cache.batch_repeat_interleave(n_labels)  # row r*n_labels + j: suffix r, label j
    ids = tgt.repeat(b, 1)
    full_mask = torch.cat([mask.repeat_interleave(n_labels, 0), tmask.repeat(b, 1)], dim=1)
    positions = following.repeat_interleave(n_labels).unsqueeze(1) + torch.arange(width, device=device)
    out = model(input_ids=ids, attention_mask=full_mask, position_ids=positions, use_cache=True,
                **{prefix.kwarg: cache}).logits[:, :-1]
    logp = torch.log_softmax(out.float(), -1).gather(-1, ids[:, 1:].unsqueeze(-1)).squeeze(-1)
    rest = (logp * tmask.repeat(b, 1)[:, 1:]).sum(1).view(b, n_labels)
    return (first + rest).double().cpu()
