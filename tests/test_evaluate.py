"""Evaluation: the exact-match rule, generation batching, label ranking on a hand-made model."""

import pytest
import torch
from torch import nn

from migu.data import Example, Task
from migu.evaluate import (default_max_new_tokens, evaluate_task, evaluate_tasks, extract_answer, is_correct,
                           normalize)


@pytest.mark.parametrize("raw, expected", [
    (" Sports.\n", "sports"),
    ("Science  or\tTechnology!", "science or technology"),
    ("  very   Negative ...", "very negative"),
    ("World", "world"),
    ("", ""),
    ("Good?!", "good"),
    ("U.S. Army", "u.s. army"),  # only trailing punctuation goes
])
def test_normalize(raw, expected):
    assert normalize(raw) == expected


def test_exact_match_rule():
    assert extract_answer("Sports\nThe rest of a ramble") == "Sports"
    assert extract_answer(" World") == " World"
    assert is_correct(extract_answer(" sports.\nmore"), "Sports")
    assert is_correct("science or  technology", "Science or Technology")
    assert not is_correct("Sports and more", "Sports")  # exact, not prefix
    assert not is_correct("", "Good")


class ScriptedGenerator(nn.Module):
    """`generate` answers each prompt with a scripted text chosen by a word in the prompt."""

    def __init__(self, tokenizer, answers):
        super().__init__()
        self.tokenizer, self.answers = tokenizer, answers
        self.dummy = nn.Linear(1, 1)
        self.seen_padding = []

    def generate(self, input_ids, attention_mask, generation_config):
        assert not torch.is_grad_enabled() and not self.training
        self.seen_padding.append(attention_mask[:, 0].tolist())  # left padding: row starts may be 0
        rows = []
        for ids, mask in zip(input_ids, attention_mask):
            prompt = self.tokenizer.decode(ids[mask.bool()])
            key = next(k for k in self.answers if k in prompt)
            answer = self.tokenizer(self.answers[key], add_special_tokens=False)["input_ids"]
            rows.append(ids.tolist() + answer)
        width = max(len(r) for r in rows)
        pad = self.tokenizer.pad_token_id
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])


def _task(prompts_targets, labels=("Sports", "World")):
    return Task("news", list(labels), [], [Example(p, t) for p, t in prompts_targets])


def test_generate_mode_maps_predictions_back_and_scores(tiny_llama):
    _, tok = tiny_llama
    answers = {"alpha": " Sports.\nignored", "beta": " world", "gamma": "Business", "delta": "  SPORTS  "}
    # different prompt lengths: sorting by length must not mix up which answer belongs to which example
    task = _task([("alpha" + "x" * 30 + "\nAnswer:", "Sports"), ("beta\nAnswer:", "World"),
                  ("gamma" + "y" * 9 + "\nAnswer:", "World"), ("delta" + "z" * 17 + "\nAnswer:", "Sports")])
    model = ScriptedGenerator(tok, answers)
    model.train()
    result = evaluate_task(model, tok, task, mode="generate", batch_size=3, max_length=128)
    assert (result.correct, result.n, result.accuracy) == (3, 4, 75.0)
    assert result.samples[0] == [" Sports.", "Sports"] and result.samples[2] == ["Business", "World"]
    assert model.training  # mode restored
    assert any(0 in starts for starts in model.seen_padding)  # batches were left-padded


class UnigramModel(nn.Module):
    """A causal LM whose next-token distribution is the same fixed vector at every position."""

    def __init__(self, vocab, favoured, low=-10.0):
        super().__init__()
        bias = torch.full((vocab,), low)
        bias[favoured] = 0.0
        self.bias = nn.Parameter(bias)

    def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
        n = input_ids.shape[1] if isinstance(logits_to_keep, int) else len(logits_to_keep)
        return type("Out", (), {"logits": self.bias.expand(input_ids.shape[0], n, -1)})()


def test_rank_mode_picks_the_most_likely_label(tiny_llama):
    _, tok = tiny_llama
    ids = lambda s: tok(s, add_special_tokens=False)["input_ids"]  # noqa: E731
    favoured = sorted(set(ids(" aaaa") + [tok.eos_token_id]))
    model = UnigramModel(len(tok), favoured)
    # " aaaa" + eos: 6 likely tokens; " b" + eos: 3 tokens, one of them unlikely → "aaaa" wins though longer
    task = _task([("Q1\nAnswer:", "aaaa"), ("Q2\nAnswer:", "b"), ("Q3\nAnswer:", "aaaa")], labels=("b", "aaaa"))
    result = evaluate_task(model, tok, task, mode="rank", batch_size=2, max_length=64)
    assert (result.correct, result.n) == (2, 3)
    assert [s[0] for s in result.samples] == ["aaaa", "aaaa", "aaaa"]
    # a tie goes to the first label in the task's order
    flat = UnigramModel(len(tok), list(range(len(tok))))
    tied = _task([("Q\nAnswer:", "ab")], labels=("ab", "ba"))
    assert evaluate_task(flat, tok, tied, mode="rank").samples[0][0] == "ab"


def test_rank_scores_match_a_full_forward(tiny_llama):
    model, tok = tiny_llama
    from migu.data import collate, encode
    from migu.evaluate import sequence_logprobs

    items = encode(tok, [Example("Is it?\nAnswer:", "yes"), Example("Longer question here?\nAnswer:", "no")], 64)
    batch = collate(items, tok.pad_token_id)
    with torch.no_grad():
        fast = sequence_logprobs(model, batch)
        logp = torch.log_softmax(model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits,
                                 -1)
    target = batch["labels"][:, 1:]
    mask = target != -100
    slow = (logp[:, :-1].gather(-1, target.clamp_min(0).unsqueeze(-1)).squeeze(-1) * mask).sum(1)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)


def test_generation_is_batch_invariant_on_a_real_model(tiny_llama):
    model, tok = tiny_llama
    task = _task([(f"Question {i}: {'word ' * i}\nAnswer:", "Sports") for i in range(6)])
    one = evaluate_task(model, tok, task, batch_size=1, max_length=96, max_new_tokens=4, n_samples=6)
    many = evaluate_task(model, tok, task, batch_size=4, max_length=96, max_new_tokens=4, n_samples=6)
    assert one.samples == many.samples


def test_default_max_new_tokens_and_errors(tiny_llama):
    _, tok = tiny_llama
    assert default_max_new_tokens(tok, ["ab", "abcd"]) == len(" abcd") + 2  # byte-level tokenizer
    with pytest.raises(ValueError, match="no test examples"):
        evaluate_task(None, tok, Task("empty", ["a"], [], []))
    model = UnigramModel(len(tok), [0])
    results = evaluate_tasks(model, tok, [_task([("Q\nAnswer:", "b")], labels=("b", "c"))] * 2, mode="rank")
    assert [r.n for r in results] == [1, 1]
