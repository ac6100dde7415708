"""Tokenisation for encoder-decoder models (T5, Flan-T5, BART): prompt → encoder, label + eos → decoder.

An item is `{"input_ids": source, "labels": [-100] + tokens(target) + [eos]}`. `labels[t]` is the
decoder token at position t, position 0 being the decoder start token (masked: it is given, never
predicted), so `labels[1:]` are the predicted tokens exactly as in a causal item (`migu.data.encode`)
and the loop's answer-token counting, replay and collation work on both kinds unchanged.

The source is the prompt with the tokenizer's own special tokens (T5 appends `</s>`, BART wraps it
in `<s> … </s>`); a prompt longer than `max_source` loses tokens from its middle, keeping its first
tokens and its last `keep_last` (the end of the sentence and "\\nAnswer:"), as `encode` does. The
target is the label without a leading space (a sentencepiece tokenizer adds the word boundary
itself), cut to `max_target - 1` tokens, plus eos.
"""

from __future__ import annotations

from collections.abc import Sequence

from migu.data.collate import IGNORE_INDEX, _default_keep_last, _tokenize
from migu.data.records import DataError, Example


def _special_ends(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after a text (found on a probe string)."""
    full = list(tokenizer("a")["input_ids"])
    plain = list(tokenizer("a", add_special_tokens=False)["input_ids"])
    for i in range(len(full) - len(plain) + 1):
        if full[i:i + len(plain)] == plain:
            return full[:i], full[i + len(plain):]
    return [], []


def encode_sources(tokenizer, prompts: Sequence[str], max_source: int, keep_last: int | None = None) -> list[dict]:
    """Encoder inputs `{"input_ids": ...}` of prompts, at most `max_source` tokens (see the module docstring)."""
    keep_last = _default_keep_last(tokenizer) if keep_last is None else keep_last
    before, after = _special_ends(tokenizer)
    budget = max_source - len(before) - len(after)
    out = []
    for i, ids in enumerate(_tokenize(tokenizer, prompts)):
        if len(ids) > budget:
            head = budget - keep_last
            if head < 1:
                raise DataError(f"data.max_length={max_source} is too short for the source of example {i}: "
                                f"the prompt's end keeps {keep_last} tokens; raise data.max_length")
            ids = ids[:head] + ids[len(ids) - keep_last:]
        out.append({"input_ids": before + ids + after})
    return out


def encode_targets(tokenizer, targets: Sequence[str], max_target: int) -> list[list[int]]:
    """Decoder labels `[-100] + tokens(target)[:max_target - 1] + [eos]` of each target."""
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ValueError("the tokenizer has no eos_token_id; the decoder target needs one to end")
    if max_target < 2:
        raise DataError(f"data.max_target_length={max_target}: must leave room for one token and eos")
    return [[IGNORE_INDEX] + ids[:max_target - 1] + [eos] for ids in _tokenize(tokenizer, targets)]


def encode_seq2seq(tokenizer, examples: Sequence[Example], max_source: int, max_target: int) -> list[dict]:
    """Training items of examples for an encoder-decoder model (see the module docstring)."""
    if not examples:
        return []
    sources = encode_sources(tokenizer, [e.prompt for e in examples], max_source)
    labels = encode_targets(tokenizer, [e.target for e in examples], max_target)
    return [{"input_ids": s["input_ids"], "labels": y} for s, y in zip(sources, labels)]
