"""Evaluation: the exact-match rule, generation batching, label ranking on a hand-made model."""

import pytest
import torch
from torch import nn

from migu.data import Example, Task
from migu.devices import cpu_has_bf16
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
    result = evaluate_task(model, tok, task, mode="generate", batch_size=3, max_length=128, prefix_cache=False)
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


# ------------------------------------------------------------------------------------------ shared prefix
from migu import prefix_eval  # noqa: E402
from migu.data import build_prompt, collate, encode_prompts  # noqa: E402


def _news_task(n=12, labels=("Sports", "World", "Business"), words=7):
    """Benchmark-format prompts: one shared header (task line, instruction, options), sentences of varied length."""
    test = [Example(build_prompt(f"sentence {i} " + "word " * (i % words), "news", "TC", "Pick the topic.\n",
                                 list(labels)), labels[i % len(labels)]) for i in range(n)]
    return Task("news", list(labels), [], test)


def test_shared_prefix_length():
    assert prefix_eval.shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2, 3]]) == 2
    assert prefix_eval.shared_prefix_length([[1, 2, 3], [1, 2, 3]]) == 2  # every row keeps one suffix token
    assert prefix_eval.shared_prefix_length([[7, 1], [8, 1]]) == 0
    assert prefix_eval.shared_prefix_length([]) == 0


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
def test_prefix_cache_logits_equal_a_full_left_padded_forward(kind, request):
    model, tok = request.getfixturevalue(kind)
    model.eval()
    prompts = [x["input_ids"] for x in encode_prompts(tok, [e.prompt for e in _news_task(5).test], 200)]
    n = prefix_eval.shared_prefix_length(prompts)
    assert n > 20  # the header is shared
    with torch.no_grad():
        prefix = prefix_eval.PrefixCache(model, prompts[0][:n])
        cache, logits, mask, following = prefix_eval._suffix_batch(prefix, [p[n:] for p in prompts], tok.pad_token_id)
        batch = collate([{"input_ids": p} for p in prompts], tok.pad_token_id, padding_side="left")
        positions = (batch["attention_mask"].cumsum(1) - 1).clamp_min(0)  # what generate gives left-padded rows
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], position_ids=positions)
        torch.testing.assert_close(logits, full.logits[:, -1], rtol=1e-5, atol=1e-5)
        assert following.tolist() == [len(p) for p in prompts]
        # one decoding step after the cached batch matches the same step from scratch
        nxt = logits.argmax(-1, keepdim=True)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        step = model(input_ids=nxt, attention_mask=mask2, position_ids=following.unsqueeze(1), use_cache=True,
                     **{prefix.kwarg: cache}).logits[:, -1]
        ids2 = torch.cat([batch["input_ids"], nxt], 1)
        am2 = torch.cat([batch["attention_mask"], torch.ones_like(nxt)], 1)
        full2 = model(input_ids=ids2, attention_mask=am2, position_ids=(am2.cumsum(1) - 1).clamp_min(0)).logits[:, -1]
        torch.testing.assert_close(step, full2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kind", ["tiny_llama", "tiny_gpt2"])
@pytest.mark.parametrize("max_length", [200, 40])  # 40: truncation cuts into the shared header
def test_prefix_cache_predictions_equal_the_naive_path(kind, max_length, request):
    model, tok = request.getfixturevalue(kind)
    task = _news_task(8)
    for mode in ("generate", "rank"):
        naive = evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=max_length, n_samples=8,
                              prefix_cache=False)
        cached = evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=max_length, n_samples=8)
        assert cached.samples == naive.samples and cached.correct == naive.correct, mode


def test_prefix_cache_predictions_equal_the_naive_path_with_eager_attention(tiny_llama):
    # model.attention auto picks eager on a CPU under bf16: the cached path must match there too
    model, tok = tiny_llama
    kernel = model.config._attn_implementation
    model.set_attn_implementation("eager")
    try:
        task = _news_task(8)
        for mode in ("generate", "rank"):
            naive = evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=200, n_samples=8,
                                  prefix_cache=False)
            cached = evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=200, n_samples=8)
            assert cached.samples == naive.samples and cached.correct == naive.correct, mode
    finally:
        model.set_attn_implementation(kernel)
    assert model.config._attn_implementation == kernel


def test_prefix_rank_scores_equal_naive_scores(tiny_llama):
    model, tok = tiny_llama
    from migu.evaluate import sequence_logprobs

    task = _news_task(6)
    prompts = [x["input_ids"] for x in encode_prompts(tok, [e.prompt for e in task.test], 120)]
    targets = [tok(" " + label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for label in task.labels]
    n = prefix_eval.shared_prefix_length(prompts)
    with torch.no_grad():
        cached = prefix_eval.score_labels(prefix_eval.PrefixCache(model, prompts[0][:n]), [p[n:] for p in prompts],
                                          targets, tok.pad_token_id)
        items = [{"input_ids": p + t, "labels": [-100] * len(p) + t} for p in prompts for t in targets]
        naive = sequence_logprobs(model, collate(items, tok.pad_token_id)).view(len(prompts), len(targets))
    assert cached.shape == (6, 3) and cached.dtype == torch.float64
    torch.testing.assert_close(cached, naive.double(), rtol=1e-5, atol=1e-4)
    assert len(set(cached.argmax(1).tolist())) >= 1


def test_rank_scores_every_label_after_the_same_prompt(tiny_llama):
    # labels of very different lengths and a prompt longer than the budget: every label sees the same prompt
    model, tok = tiny_llama
    seen = []

    class Spy(UnigramModel):
        def forward(self, input_ids, attention_mask=None, use_cache=False, logits_to_keep=0):
            seen.extend(tok.decode(row[m.bool()]) for row, m in zip(input_ids, attention_mask))
            return super().forward(input_ids, attention_mask, use_cache, logits_to_keep)

    task = _task([("Q " + "long words " * 20 + "\nAnswer:", "a")], labels=("a", "a much longer label here"))
    evaluate_task(Spy(len(tok), [0]), tok, task, mode="rank", max_length=48, prefix_cache=False)
    prompts = {text.rsplit("\nAnswer:", 1)[0] for text in seen}
    assert len(seen) == 2 and len(prompts) == 1


@pytest.fixture(scope="module")
def embedded_naive():
    """The embedded model, 3 benchmark tasks × 40 test examples and naive fp32 generation on each (run once)."""
    from migu.data import load_benchmark_task
    from migu.models import load_model_and_tokenizer

    model, tok = load_model_and_tokenizer("smollm2-135m")
    tasks = [load_benchmark_task(None, name, 0, 40, 0) for name in ("dbpedia", "amazon", "SST-2")]
    naive = [evaluate_task(model, tok, task, max_length=128, n_samples=40, prefix_cache=False) for task in tasks]
    return model, tok, tasks, naive


@pytest.mark.slow
def test_prefix_cache_on_the_embedded_model_equals_naive_generation_in_fp32(embedded_naive):
    """fp32 predictions with the shared-prefix cache identical to naive generation and ranking."""
    model, tok, tasks, naive = embedded_naive
    for task, plain in zip(tasks, naive):
        cached = evaluate_task(model, tok, task, max_length=128, n_samples=40)
        assert cached.samples == plain.samples, task.name
    rank_task = tasks[2]
    plain = evaluate_task(model, tok, rank_task, mode="rank", max_length=128, n_samples=40, prefix_cache=False)
    cached = evaluate_task(model, tok, rank_task, mode="rank", max_length=128, n_samples=40)
    assert cached.samples == plain.samples


# without AMX / AVX512-bf16 oneDNN emulates bf16 (1.1 GFLOP/s against fp32's 102 on an AVX2 EPYC): this
# comparison would take over an hour there, and `train.precision: auto` never picks bf16 on such a CPU
@pytest.mark.slow
@pytest.mark.skipif(not cpu_has_bf16(), reason="this CPU has no bf16 kernels (auto runs fp32 here)")
def test_prefix_cache_on_the_embedded_model_in_bf16_within_one_example_of_fp32(embedded_naive):
    from migu.distributed import autocast

    model, tok, tasks, naive = embedded_naive
    for task, plain in zip(tasks, naive):
        with autocast(torch.device("cpu"), "bf16"):
            bf16 = evaluate_task(model, tok, task, max_length=128, n_samples=40)
        assert abs(bf16.correct - plain.correct) <= 1, (task.name, bf16.correct, plain.correct)


def test_prefix_cache_on_a_peft_lora_model_equals_the_naive_path(tiny_llama):
    from peft import LoraConfig, get_peft_model

    model, tok = tiny_llama
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a non-zero adapter: the cached path must go through it
    # the PEFT wrapper forwards the base model's cache argument (transformers' name for it)
    assert prefix_eval.cache_kwarg(model) == prefix_eval.cache_kwarg(model.get_base_model()) in ("cache",
                                                                                              "past_key_values")
    task = _news_task(6)
    for mode in ("generate", "rank"):
        naive = evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=160, n_samples=6,
                              prefix_cache=False)
        assert evaluate_task(model, tok, task, mode=mode, batch_size=3, max_length=160, n_samples=6).samples \
            == naive.samples, mode
