"""Accuracy of a model on a task's test split: greedy generation + exact match, or label ranking.

Scoring rule (mode "generate"): the model greedily generates up to `max_new_tokens` tokens after the
prompt; the prediction is the decoded text up to its first newline. Prediction and label are both
normalised — surrounding whitespace stripped, lowercased, runs of whitespace collapsed to one space,
trailing punctuation (`.,;:!?`) removed — and the example is correct when they are equal.

Mode "rank": for every label the summed log-likelihood of `" " + label + eos` after the prompt (the
training target) is computed, every label after the same prompt (truncated to the task-wide budget
`prompt_budget`, the one generation uses); the highest-scoring label is the prediction (ties: the first label in
the task's label order); correct when it is the example's label (compared after normalisation).

Both modes run under `torch.no_grad()` with `model.eval()` and restore the previous train/eval mode;
examples are sorted by length and batched (left padding for generation, right padding for ranking).
By default the prompts' shared prefix (task line, instruction, options) runs once per task and its
key/value cache serves every batch (`migu.prefix_eval`); the predictions equal the naive path's in fp32.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from migu import evaluate_seq2seq, prefix_eval
from migu.data import (IGNORE_INDEX, DataError, Task, collate, encode_prompts, extract_answer, on_model_device,
                       sorted_batches)
from migu.prefix_eval import MIN_PREFIX, PrefixCache, shared_prefix_length
from migu.seq2seq import is_encoder_decoder

_TRAILING_PUNCT = ".,;:!?"


def normalize(text: str) -> str:
    """Strip, lowercase, collapse whitespace, drop trailing punctuation: `" Sports.\\n"` → `"sports"`."""
    text = re.sub(r"\s+", " ", text.strip().lower())
    return text.rstrip(_TRAILING_PUNCT).strip()


def is_correct(prediction: str, label: str) -> bool:
    """Exact match after `normalize` on both sides."""
    return normalize(prediction) == normalize(label)


@dataclass
class TaskResult:
    """One task's evaluation: accuracy in percent, counts, and a few (prediction, label) samples."""

    task: str
    accuracy: float
    correct: int
    n: int
    samples: list = field(default_factory=list)


def default_max_new_tokens(tokenizer, labels: Sequence[str]) -> int:
    """The longest label's token count (with its leading space) + 2 (the newline or eos, one spare)."""
    ids = tokenizer([" " + label for label in labels], add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids) + 2


def evaluate_task(model, tokenizer, task: Task, mode: str = "generate", batch_size: int = 16,
                  max_length: int = 128, max_new_tokens: int | None = None, n_samples: int = 3,
                  on_batch: Callable[[float], None] | None = None, prefix_cache: bool = True) -> TaskResult:
    """Accuracy (percent) of `model` on `task.test`; see the module docstring for the rule.

    Args:
        on_batch: called after each batch with the number of examples it covered (progress bars).
        prefix_cache: run the prompts' shared prefix once and reuse its key/value cache
            (`migu.prefix_eval`); False: every prompt from scratch with HF `generate` (same predictions in fp32).
    Raises:
        DataError: the task has no test examples.
    """
    if not task.test:
        raise DataError(f"task {task.name!r} has no test examples")
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            if is_encoder_decoder(model):  # T5, BART: prompt → encoder (migu.evaluate_seq2seq)
                predictions = _seq2seq(model, tokenizer, task, mode, batch_size, max_length, max_new_tokens, on_batch)
            elif mode == "generate":
                predictions = _generate(model, tokenizer, task, batch_size, max_length, max_new_tokens, on_batch,
                                        prefix_cache)
            elif mode == "rank":
                predictions = _rank(model, tokenizer, task, batch_size, max_length, on_batch, prefix_cache)
            else:
                raise ValueError(f"eval mode must be 'generate' or 'rank', got {mode!r}")
    finally:
        model.train(was_training)
    correct = sum(is_correct(p, ex.target) for p, ex in zip(predictions, task.test))
    samples = [[p, ex.target] for p, ex in list(zip(predictions, task.test))[:n_samples]]
    return TaskResult(task.name, 100.0 * correct / len(task.test), correct, len(task.test), samples)


def _seq2seq(model, tokenizer, task, mode, batch_size, max_length, max_new_tokens, on_batch) -> list[str]:

    if mode == "generate":
        return evaluate_seq2seq.generate(model, tokenizer, task, batch_size, max_length, max_new_tokens, on_batch)
    if mode == "rank":
        # the longest label + eos always fits: a label is never cut at evaluation
        return evaluate_seq2seq.rank(model, tokenizer, task, batch_size, max_length,
                                     evaluate_seq2seq.max_new_tokens_for(tokenizer, task.labels), on_batch)
    raise ValueError(f"eval mode must be 'generate' or 'rank', got {mode!r}")


def evaluate_tasks(model, tokenizer, tasks: Sequence[Task], **kwargs) -> list[TaskResult]:
    """`evaluate_task` on every task, in order (keyword arguments as there)."""
    return [evaluate_task(model, tokenizer, task, **kwargs) for task in tasks]


def prompt_budget(tokenizer, task: Task, max_length: int) -> int:
    """Prompt tokens kept for every test example of `task`: max_length minus the longest target (label + eos).

    One task-wide budget, as in training's worst case: every label of rank mode is scored after the same prompt.
    """
    return max(8, max_length - (default_max_new_tokens(tokenizer, task.labels) - 1))


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _shared_prefix(model, prompts: list[list[int]], enabled: bool) -> PrefixCache | None:
    """The prompts' common-prefix cache, or None (disabled, a model without a KV cache, too short a prefix):
    then the naive path runs."""
    if not enabled or prefix_eval.cache_kwarg(model) is None:
        return None
    n = shared_prefix_length(prompts)
    return PrefixCache(model, prompts[0][:n]) if n >= MIN_PREFIX else None


def _generate(model, tokenizer, task, batch_size, max_length, max_new_tokens, on_batch, prefix_cache) -> list[str]:
    from transformers import GenerationConfig

    max_new = max_new_tokens or default_max_new_tokens(tokenizer, task.labels)
    # the prompt budget matches training's: max_length minus the longest target (label tokens + eos)
    items = encode_prompts(tokenizer, [ex.prompt for ex in task.test], prompt_budget(tokenizer, task, max_length))
    pad = _pad_id(tokenizer)
    prefix = _shared_prefix(model, [x["input_ids"] for x in items], prefix_cache)
    config = GenerationConfig(max_new_tokens=max_new, do_sample=False, num_beams=1, pad_token_id=pad,
                              eos_token_id=tokenizer.eos_token_id)
    predictions = [""] * len(items)
    for index in sorted_batches([len(x["input_ids"]) for x in items], batch_size):
        if prefix is not None:
            rows = prefix_eval.generate(
                prefix, [items[i]["input_ids"][prefix.length:] for i in index], max_new, tokenizer.eos_token_id,
                pad, lambda ids: "\n" in tokenizer.decode(ids, skip_special_tokens=True))
            texts = tokenizer.batch_decode(rows, skip_special_tokens=True)
        else:
            batch = on_model_device(collate([items[i] for i in index], pad, padding_side="left"), model)
            out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                 generation_config=config)
            texts = tokenizer.batch_decode(out[:, batch["input_ids"].shape[1]:], skip_special_tokens=True)
        for i, text in zip(index, texts):
            predictions[i] = extract_answer(text)
        if on_batch:
            on_batch(len(index))
    return predictions


def sequence_logprobs(model, batch: dict) -> torch.Tensor:
    """Summed log-probability of the labelled tokens (`labels != -100`) of each row of a right-padded batch."""
    target = batch["labels"][:, 1:]
    keep = (target != IGNORE_INDEX).any(0).nonzero().squeeze(1)  # only positions that predict a label token
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False,
                   logits_to_keep=keep).logits
    target = target[:, keep]
    logp = torch.log_softmax(logits.float(), dim=-1)
    picked = logp.gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1)
    return (picked * (target != IGNORE_INDEX)).sum(1)


def _rank(model, tokenizer, task, batch_size, max_length, on_batch, prefix_cache) -> list[str]:
    prompts = [x["input_ids"] for x in
               encode_prompts(tokenizer, [ex.prompt for ex in task.test], prompt_budget(tokenizer, task, max_length))]
    eos = tokenizer.eos_token_id
    targets = [list(ids) + [eos] for ids in
               tokenizer([" " + label for label in task.labels], add_special_tokens=False)["input_ids"]]
    pad = _pad_id(tokenizer)
    n_labels = len(task.labels)
    prefix = _shared_prefix(model, prompts, prefix_cache)
    if prefix is not None:
        per_example = torch.empty(len(prompts), n_labels, dtype=torch.float64)
        # each batch runs its examples' suffixes once and then all their labels: about batch_size label rows
        for index in sorted_batches([len(p) for p in prompts], max(1, batch_size // n_labels)):
            per_example[index] = prefix_eval.score_labels(
                prefix, [prompts[i][prefix.length:] for i in index], targets, pad)
            if on_batch:
                on_batch(len(index))
    else:
        items = [{"input_ids": prompts[e] + t, "labels": [IGNORE_INDEX] * len(prompts[e]) + t}
                 for e in range(len(prompts)) for t in targets]
        scores = torch.empty(len(items), dtype=torch.float64)
        for index in sorted_batches([len(x["input_ids"]) for x in items], batch_size):
            batch = on_model_device(collate([items[i] for i in index], pad, padding_side="right"), model)
            scores[index] = sequence_logprobs(model, batch).double().cpu()
            if on_batch:
                on_batch(len(index) / n_labels)
        per_example = scores.view(len(prompts), n_labels)
    return [task.labels[int(i)] for i in per_example.argmax(1)]  # argmax: first label on ties
