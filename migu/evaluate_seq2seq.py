"""Evaluation of encoder-decoder models (T5, BART): the rule of `migu.evaluate`, with prompt → encoder.

Mode "generate": the encoder reads the prompt (`migu.data.seq2seq.encode_sources`, cut to
`max_length`), the decoder greedily generates up to `max_new_tokens` tokens from its start token;
the prediction is the decoded text up to its first newline. Mode "rank": for every label the summed
log-probability of the decoder target `label + eos` (the training target) given the prompt; the
highest-scoring label is the prediction (ties: the first label). Scoring is `migu.evaluate.is_correct`.
"""

from __future__ import annotations

import torch

from migu.data import Example, collate, extract_answer, on_model_device, sorted_batches
from migu.data.seq2seq import encode_seq2seq, encode_sources
from migu.seq2seq import token_logprobs


def _pad(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def max_new_tokens_for(tokenizer, labels) -> int:
    """The longest label's token count + 2 (eos, one spare)."""
    ids = tokenizer(list(labels), add_special_tokens=False)["input_ids"]
    return max(len(x) for x in ids) + 2


def generate(model, tokenizer, task, batch_size, max_length, max_new_tokens, on_batch) -> list[str]:
    """Greedy predictions (text up to the first newline) for `task.test`."""
    from transformers import GenerationConfig

    items = encode_sources(tokenizer, [ex.prompt for ex in task.test], max_length)
    config = model.generation_config
    start = config.decoder_start_token_id
    if start is None:
        start = model.config.decoder_start_token_id
    gen = GenerationConfig(max_new_tokens=max_new_tokens or max_new_tokens_for(tokenizer, task.labels),
                           do_sample=False, num_beams=1, pad_token_id=_pad(tokenizer),
                           eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=start)
    predictions = [""] * len(items)
    for index in sorted_batches([len(x["input_ids"]) for x in items], batch_size):
        # right padding: the encoder is bidirectional and masked, the decoder starts fresh for every row
        batch = on_model_device(collate([items[i] for i in index], _pad(tokenizer), padding_side="right"), model)
        out = model.generate(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                             generation_config=gen)
        for i, text in zip(index, tokenizer.batch_decode(out, skip_special_tokens=True)):
            predictions[i] = extract_answer(text)
        if on_batch:
            on_batch(len(index))
    return predictions


def rank(model, tokenizer, task, batch_size, max_length, max_target_length, on_batch) -> list[str]:
    """The highest-likelihood label (first on ties) of every test example."""
    pairs = [(e, label) for e in range(len(task.test)) for label in task.labels]
    items = encode_seq2seq(tokenizer, [Example(task.test[e].prompt, label) for e, label in pairs], max_length,
                           max_target_length)
    scores = torch.empty(len(items), dtype=torch.float64)
    for index in sorted_batches([len(x["input_ids"]) for x in items], batch_size):
        batch = on_model_device(collate([items[i] for i in index], _pad(tokenizer), padding_side="right"), model)
        scores[index] = token_logprobs(model, batch).double().cpu()
        if on_batch:
            on_batch(len(index) / len(task.labels))
    per_example = scores.view(len(task.test), len(task.labels))
    return [task.labels[int(i)] for i in per_example.argmax(1)]
