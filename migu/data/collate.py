"""Tokenisation with answer-only labels, length-grouped batching and padding.

    items = encode(tokenizer, task.train, max_length=128)
    for batch_ix in length_grouped_batches([len(x["input_ids"]) for x in items], 8, seed):
        batch = collate([items[i] for i in batch_ix], tokenizer.pad_token_id)
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch

from migu.data.prompts import ANSWER_SUFFIX
from migu.data.records import DataError, Example

IGNORE_INDEX = -100  # the label value torch's cross-entropy (and HF models) skip


def encode(tokenizer, examples: Sequence[Example], max_length: int, keep_last: int | None = None,
           reserve: Sequence[int | None] | None = None) -> list[dict]:
    """Tokenises examples for training; only the answer is trained.

    `input_ids = [bos] + tokens(prompt) + tokens(" " + target) + [eos]` and `labels` is -100 for
    the bos and prompt tokens and equals `input_ids` for the target and eos. Prompt and target
    are tokenised separately (no special tokens), so the prompt/answer boundary is exact. The bos
    token is added only when the tokenizer itself adds one by default (Llama style); GPT-2 style
    tokenizers (SmolLM2) get none.

    Truncation, when the sequence is longer than `max_length`: the target and eos are always kept
    whole, and the prompt loses tokens from its middle. It keeps its first
    `budget - keep_last` tokens (task line, instruction, options, the start of the sentence) and
    its last `keep_last` tokens (the end of the sentence and "\\nAnswer:"), where
    `budget = max_length - reserve` and `reserve` defaults to the example's own `len(target + eos)`.
    Training passes the task-wide reserve (`task_reserve`: the longest target of the task, the rule
    evaluation uses), so where "Answer:" sits does not depend on the example's label.

    Args:
        tokenizer: a Hugging Face tokenizer with `eos_token_id`.
        examples: the examples (prompt, target).
        max_length: the longest sequence returned.
        keep_last: prompt tokens kept from the end; default: the tokens of "\\nAnswer:" plus one.
        reserve: per example, the tokens kept free for the target when truncating its prompt; None (or a
            None entry): the example's own target + eos. A target longer than its reserve is still kept
            whole (the sequence then exceeds `max_length` by the difference).

    Returns:
        One dict per example: `input_ids` and `labels`, lists of ints of equal length.

    Raises:
        DataError: `max_length` leaves no room for the target plus the prompt's kept ends.
    """
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; answer-only training needs one to end the target")
    if not examples:
        return []
    keep_last = _default_keep_last(tokenizer) if keep_last is None else keep_last
    targets = [ids + [eos] for ids in _tokenize(tokenizer, [" " + e.target for e in examples])]
    if reserve is not None and len(reserve) != len(examples):
        raise ValueError(f"reserve has {len(reserve)} entries for {len(examples)} examples")
    reserved = [len(t) if reserve is None or reserve[i] is None else reserve[i] for i, t in enumerate(targets)]
    prompts = _prompt_ids(tokenizer, [e.prompt for e in examples], max_length, keep_last, reserved)
    return [{"input_ids": p + t, "labels": [IGNORE_INDEX] * len(p) + t} for p, t in zip(prompts, targets)]


def task_reserve(tokenizer, targets: Sequence[str], max_length: int) -> int:
    """Task-wide tokens reserved for the answer: the longest `" " + target + eos`, capped so the prompt
    keeps at least 8 tokens; the prompt budget `max_length - task_reserve(...)` is the one evaluation uses
    (`max(8, max_length - (default_max_new_tokens - 1))` in migu.evaluate)."""
    if not targets:
        raise ValueError("task_reserve needs at least one target")
    longest = max(len(ids) for ids in _tokenize(tokenizer, [" " + t for t in targets])) + 1
    return min(longest, max_length - 8)


def encode_prompts(tokenizer, prompts: Sequence[str], max_length: int, keep_last: int | None = None) -> list[dict]:
    """Tokenises prompts for generation or scoring, with `encode`'s bos and truncation rule.

    Returns:
        One dict per prompt with `input_ids` (at most `max_length` ints); pad with
        `collate(..., padding_side="left")` for batched generation.
    """
    if not prompts:
        return []
    keep_last = _default_keep_last(tokenizer) if keep_last is None else keep_last
    return [{"input_ids": ids} for ids in _prompt_ids(tokenizer, prompts, max_length, keep_last, [0] * len(prompts))]


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Evaluation batches: indices sorted longest first (memory peaks early, ties by index), then cut."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def length_grouped_batches(lengths: Sequence[int], batch_size: int, seed: int,
                           mega_batch_mult: int = 50) -> list[list[int]]:
    """Batches of indices with similar lengths, so padding stays small; deterministic for a seed.

    Shuffles all indices, cuts them into mega-batches of `mega_batch_mult * batch_size`, sorts each
    by length (longest first) and cuts it into batches, then shuffles the batch order. Every index
    appears exactly once; only the last batch can be smaller than `batch_size`.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * max(1, mega_batch_mult)  # a multiple of batch_size: full batches until the end
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: -lengths[i])  # stable: ties stay random
        batches += [group[j:j + batch_size] for j in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def collate(items: Sequence[dict], pad_token_id: int, padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Pads encoded items into a batch.

    Args:
        items: dicts with `input_ids` and, for training, `labels` (from `encode`).
        pad_token_id: the id written into padding positions of `input_ids`.
        padding_side: "right" for training, "left" for batched generation.

    Returns:
        `input_ids` and `attention_mask` (1 = real token) as long tensors [B, L], and `labels`
        (-100 on padding) when every item has labels.
    """
    if padding_side not in ("left", "right"):
        raise ValueError(f"padding_side must be 'left' or 'right', got {padding_side!r}")
    if pad_token_id is None:
        raise ValueError("pad_token_id is None; set tokenizer.pad_token (e.g. to the eos token)")
    if not items:
        raise ValueError("collate needs at least one item")
    width = max(len(item["input_ids"]) for item in items)
    with_labels = all("labels" in item for item in items)
    # labels get their own width: an encoder-decoder item's decoder labels are shorter than its source
    label_width = max(len(item["labels"]) for item in items) if with_labels else 0
    input_ids = torch.full((len(items), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(items), width), dtype=torch.long)
    labels = torch.full((len(items), label_width), IGNORE_INDEX, dtype=torch.long)
    for row, item in enumerate(items):
        n = len(item["input_ids"])
        cols = slice(0, n) if padding_side == "right" else slice(width - n, width)
        input_ids[row, cols] = torch.tensor(item["input_ids"], dtype=torch.long)
        attention_mask[row, cols] = 1
        if with_labels:
            m = len(item["labels"])
            label_cols = slice(0, m) if padding_side == "right" else slice(label_width - m, label_width)
            labels[row, label_cols] = torch.tensor(item["labels"], dtype=torch.long)
    batch = {"input_ids": input_ids, "attention_mask": attention_mask}
    if with_labels:
        batch["labels"] = labels
    return batch


def _tokenize(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    return [list(ids) for ids in tokenizer(list(texts), add_special_tokens=False)["input_ids"]]


def _bos(tokenizer) -> list[int]:
    """[bos] if the tokenizer adds it by default (checked on a probe string), else []."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return []
    ids = tokenizer("a")["input_ids"]
    return [bos] if ids and ids[0] == bos else []


def _default_keep_last(tokenizer) -> int:
    # One extra token covers a merge across the sentence/"\nAnswer:" boundary.
    return len(_tokenize(tokenizer, [ANSWER_SUFFIX])[0]) + 1


def _prompt_ids(tokenizer, prompts: Sequence[str], max_length: int, keep_last: int,
                reserved: Sequence[int]) -> list[list[int]]:
    bos = _bos(tokenizer)
    out = []
    for i, (ids, used) in enumerate(zip(_tokenize(tokenizer, prompts), reserved)):
        ids = bos + ids
        budget = max_length - used
        if len(ids) > budget:
            head = budget - keep_last
            if head < 1:
                raise DataError(f"max_length={max_length} is too short for example {i}: the answer takes {used} "
                                f"tokens and the prompt's end keeps {keep_last}; raise max_length")
            ids = ids[:head] + ids[len(ids) - keep_last:]
        out.append(ids)
    return out


def on_model_device(batch: dict, model) -> dict:
    """The batch's tensors on the device of `model`'s parameters (a no-op on CPU)."""
    device = next(model.parameters()).device
    return batch if device.type == "cpu" else {k: v.to(device) for k, v in batch.items()}
