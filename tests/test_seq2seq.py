"""Encoder-decoder (T5) models: the seq2seq loss, evaluation against hand loops, MIGU/LoRA targets, every method."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from migu.core import MIGU
from migu.data import Example, Task, collate
from migu.data.seq2seq import _special_ends, encode_seq2seq, encode_sources
from migu.evaluate import evaluate_task
from migu.methods import METHODS
from migu.methods.base import Context
from migu.methods.gere import DEFAULT_GENERAL_FILE, GeRe, GereOptions, margin_loss, read_general_texts
from migu.seq2seq import forward, token_logprobs
from migu.models import ModelError, tiny_model, tiny_model_dir
from migu.train import run, step_loss
from tests.runner_helpers import final_rows, tiny_config, train_losses, write_stream

TINY_TASKS = {"colors": ["blue", "pink"], "animals": ["cat", "dog", "cow"]}


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny_t5"), "t5", seed=0)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp("data"), n=12, tasks=TINY_TASKS)


def _examples():
    return [Example(f"Q{i}: {'x' * (3 * i)} what?\nAnswer:", ["yes", "no no", "maybe"][i % 3]) for i in range(5)]


def _task(labels=("yes", "no no", "maybe")):
    return Task(name="t", labels=list(labels), train=[], test=_examples())


# ------------------------------------------------------------------------------------------ encoding and loss
def test_items_put_the_prompt_in_the_encoder_and_label_eos_in_the_decoder():
    _, tok = tiny_model("t5")
    item = encode_seq2seq(tok, [Example("Say:\nAnswer:", "cat")], max_source=64, max_target=50)[0]
    assert tok.decode(item["input_ids"]) == "Say:\nAnswer:"
    assert item["labels"] == [-100] + tok("cat", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    # a long prompt is cut in the middle and keeps its end; a long target is cut and keeps its eos
    long = encode_seq2seq(tok, [Example("A" * 100 + " end\nAnswer:", "x" * 20)], max_source=30, max_target=5)[0]
    assert len(long["input_ids"]) == 30 and tok.decode(long["input_ids"]).endswith("d\nAnswer:")
    assert long["labels"][1:] == [tok.convert_tokens_to_ids("x")] * 4 + [tok.eos_token_id]


def test_seq2seq_loss_equals_hf_labels_loss():
    model, tok = tiny_model("t5")
    model.eval()  # no dropout: both forward passes must see the same network
    items = encode_seq2seq(tok, _examples(), 64, 50)
    batch = collate(items, tok.pad_token_id)
    assert batch["labels"].shape[1] < batch["input_ids"].shape[1]  # labels have their own width
    loss, _ = step_loss(model, [batch])
    hf = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
               labels=batch["labels"][:, 1:].contiguous())
    assert loss == pytest.approx(float(hf.loss.detach()), rel=1e-6)
    # split into two micro-batches: the same token mean (the step's normalisation)
    loss2, _ = step_loss(model, [collate(items[:2], tok.pad_token_id), collate(items[2:], tok.pad_token_id)])
    assert loss2 == pytest.approx(loss, rel=1e-5)


# ------------------------------------------------------------------------------------------ evaluation
def _hand_generate(model, tok, prompt, max_new):
    src = torch.tensor([encode_sources(tok, [prompt], 64)[0]["input_ids"]])
    dec = [model.config.decoder_start_token_id]
    for _ in range(max_new):
        logits = model(input_ids=src, decoder_input_ids=torch.tensor([dec])).logits[0, -1]
        dec.append(int(logits.argmax()))
        if dec[-1] == tok.eos_token_id:
            break
    return tok.decode(dec[1:], skip_special_tokens=True).split("\n", 1)[0]


def _hand_score(model, tok, prompt, label):
    src = torch.tensor([encode_sources(tok, [prompt], 64)[0]["input_ids"]])
    target = tok(label, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    dec, total = [model.config.decoder_start_token_id], 0.0
    for token in target:  # one decoder step at a time
        logp = torch.log_softmax(model(input_ids=src, decoder_input_ids=torch.tensor([dec])).logits[0, -1], -1)
        total += float(logp[token])
        dec.append(token)
    return total


def test_generate_matches_a_hand_greedy_loop():
    model, tok = tiny_model("t5", seed=1)
    model.eval()
    task = _task()
    result = evaluate_task(model, tok, task, mode="generate", batch_size=2, max_length=64, max_new_tokens=6,
                           n_samples=5)
    with torch.no_grad():
        expected = [_hand_generate(model, tok, ex.prompt, 6) for ex in task.test]
    assert [p for p, _ in result.samples] == expected


def test_rank_matches_hand_scores():
    model, tok = tiny_model("t5", seed=2)
    model.eval()
    task = _task(("yes", "nop", "hmm"))  # equal lengths: a random model would always pick the shortest
    result = evaluate_task(model, tok, task, mode="rank", batch_size=4, max_length=64, n_samples=5)
    with torch.no_grad():
        scores = [[_hand_score(model, tok, ex.prompt, label) for label in task.labels] for ex in task.test]
    expected = [task.labels[max(range(3), key=lambda j: (s[j], -j))] for s in scores]
    assert [p for p, _ in result.samples] == expected
    # the batched (padded) scores themselves equal the one-step-at-a-time ones
    items = encode_seq2seq(tok, [Example(ex.prompt, lab) for ex in task.test for lab in task.labels], 64, 50)
    with torch.no_grad():
        batched = token_logprobs(model, collate(items, tok.pad_token_id)).tolist()
    assert batched == pytest.approx([x for row in scores for x in row], abs=1e-4)


# ------------------------------------------------------------------------------------------ targets
def test_migu_counts_encoder_and_decoder_tokens_with_their_own_masks():
    """Encoder layers count the real prompt tokens, decoder layers the real target positions, by hand."""
    model, tok = tiny_model("t5")
    items = encode_seq2seq(tok, _examples(), 64, 50)
    batch = collate(items, tok.pad_token_id)
    migu = MIGU(model, threshold=0.5)
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: seen.__setitem__(n, o.detach()))
             for n, m in model.named_modules() if n in ("encoder.block.0.layer.1.DenseReluDense.wo",
                                                        "decoder.block.1.layer.0.SelfAttention.q")]
    step_loss(model, [batch])
    for h in hooks:
        h.remove()
    units = {u.name: u for u in migu.units}
    src = batch["attention_mask"].float()
    tgt = (batch["labels"][:, 1:] != -100).float()
    assert src.shape != tgt.shape and 0 < tgt.sum() < tgt.numel()  # decoder padding exists and must not count
    for name, mask in (("encoder.block.0.layer.1.DenseReluDense.wo", src),
                       ("decoder.block.1.layer.0.SelfAttention.q", tgt)):
        y = seen[name].abs()
        want = (y * mask.unsqueeze(-1)).sum((0, 1))
        assert units[name].decoder == name.startswith("decoder")
        assert float(units[name].count) == float(mask.sum())
        torch.testing.assert_close(units[name].sum, want, rtol=1e-5, atol=1e-6)
    migu.remove()


def test_migu_default_targets_every_linear_of_the_t5_blocks():
    model, _ = tiny_model("t5")
    names = {u.name for u in MIGU(model, threshold=0.5).units}
    expected = {f"encoder.block.{i}.layer.0.SelfAttention.{k}" for i in range(2) for k in "qkvo"}
    expected |= {f"encoder.block.{i}.layer.1.DenseReluDense.{k}" for i in range(2) for k in ("wi_0", "wi_1", "wo")}
    expected |= {f"decoder.block.{i}.layer.0.SelfAttention.{k}" for i in range(2) for k in "qkvo"}
    expected |= {f"decoder.block.{i}.layer.1.EncDecAttention.{k}" for i in range(2) for k in "qkvo"}
    expected |= {f"decoder.block.{i}.layer.2.DenseReluDense.{k}" for i in range(2) for k in ("wi_0", "wi_1", "wo")}
    assert names == expected  # no lm_head, embedding or relative-position bias


def test_lora_defaults_to_q_and_v_on_t5():
    method = METHODS["seq-lora"]()
    model, _ = tiny_model("t5")
    peft_model = method.setup(model)
    assert method.migu_target_modules() == ["q", "v"]
    adapted = {n.rsplit(".", 1)[0] for n, _ in peft_model.named_parameters() if "lora_A" in n}
    assert len(adapted) == 2 * 2 + 2 * 4  # encoder self-attn; decoder self- and cross-attn, q and v each
    assert type(peft_model).__name__ == "PeftModelForSeq2SeqLM"


def test_an_architecture_neither_causal_nor_seq2seq_is_refused(tmp_path):
    from transformers import DistilBertConfig, DistilBertModel

    DistilBertModel(DistilBertConfig(dim=32, n_layers=1, n_heads=2, hidden_dim=32, vocab_size=100)).save_pretrained(
        tmp_path)
    from migu.models import load_model_and_tokenizer

    with pytest.raises(ModelError, match="neither a causal LM nor an encoder-decoder"):
        load_model_and_tokenizer(str(tmp_path))


# ------------------------------------------------------------------------------------------ every method
RUNNABLE = sorted(METHODS)


def _cfg(t5_dir, stream, out, method, migu):
    return tiny_config(t5_dir, stream, out, **{"method.name": method, "migu.enabled": migu, "data.train_per_task": 8,
                                               "data.test_per_task": 3, "eval.untrained": False,
                                               "data.max_length": 64})


@pytest.mark.parametrize("migu", [False, True], ids=["no-migu", "migu"])
@pytest.mark.parametrize("method", RUNNABLE)
def test_every_method_trains_t5_and_resumes_identically(tmp_path, t5_dir, stream, method, migu, monkeypatch):
    ref = tmp_path / "ref"
    summary = run(_cfg(t5_dir, stream, ref, method, migu), quiet=True)
    losses = train_losses(ref)
    assert losses and all(math.isfinite(x) for _, _, x in losses)
    assert all(v is not None for v in summary["matrix"][-1])
    # untrained weights untouched: a LoRA method saves no base weight, full fine-tuning saves all of them
    saved = load_file(str(ref / "checkpoints" / "last" / "params.safetensors"))
    base = load_file(str(t5_dir / "model.safetensors"))
    trained = [n for n in saved if n.replace("base_model.model.", "") in base]
    assert ("lora" in method) == (not trained)
    if method in ("i-lora", "gere"):  # I-LoRA's consistency loss, GeRe's general-text loss ran on T5
        records = [json.loads(x) for x in (ref / "metrics.jsonl").read_text().splitlines()]
        assert any(r.get("extra_loss") for r in records if r["type"] == "train")
    if len(summary["row_names"]) == 1:
        return  # mtl: a single phase, nothing to resume
    # resume after a crash before the second phase repeats the uninterrupted run
    from migu import train

    original = train._Run._train_phase

    def crash(self, index, name, tasks):
        if index == 1:
            raise KeyboardInterrupt
        return original(self, index, name, tasks)

    monkeypatch.setattr(train._Run, "_train_phase", crash)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(_cfg(t5_dir, stream, out, method, migu), quiet=True)
    monkeypatch.undo()
    run(_cfg(t5_dir, stream, out, method, migu), resume=True, quiet=True)
    assert train_losses(out) == losses and final_rows(out) == final_rows(ref)


def _gere_hand(model, tok, method, task_items, general):
    """Hand computation: (L_task, L_general, hinge terms), each item alone through HF's own `labels` loss."""
    def nll(source, labels):
        out = model(input_ids=torch.tensor([source]), labels=torch.tensor([labels]), output_hidden_states=True)
        return out.loss * len(labels), len(labels), out.decoder_hidden_states[-1][0]

    task = [nll(item["input_ids"], item["labels"][1:]) for item in task_items]
    gen, hinge = [], []
    for item in general:
        j = method.index[tuple(item["input_ids"])]
        total, count, h = nll(item["input_ids"], method.targets[j][1:])
        gen.append((total, count))
        hinge.append(margin_loss(h, method.states[j], method.lo, method.hi).flatten())
    mean = lambda pairs: sum(t for t, *_ in pairs) / sum(c for _, c, *_ in pairs)  # noqa: E731
    return mean(task), mean(gen), torch.cat(hinge)


def test_gere_on_t5_is_a_prefix_lm_with_a_band_on_the_decoder_states():
    """GeRe's extra loss on a tiny T5 batch against a hand computation (L_general, L_task, margin)."""
    model, tok = tiny_model("t5", seed=0)
    model.eval()  # no dropout: the hand passes must see the same network
    ctx = Context(model=model, tokenizer=tok, tasks=[], encode=lambda ex: encode_seq2seq(tok, ex, 64, 50), seed=0,
                  log=lambda record: None)
    method = GeRe(GereOptions(max_samples=16, rate=0.5, tm_weight=3.0))
    method.before_task(0, [], ctx)
    # a general text: its first half (with the tokenizer's specials) → encoder, the rest + eos → decoder target
    texts = read_general_texts(DEFAULT_GENERAL_FILE, 16)
    before, after = _special_ends(tok)
    ids = tok(texts[3], add_special_tokens=False)["input_ids"][:63]
    cut = len(ids) // 2
    assert method.items[3]["input_ids"] == before + ids[:cut] + after
    assert method.targets[3] == [-100] + ids[cut:] + [tok.eos_token_id]
    assert set(method.items[3]["labels"]) == {-100}  # the loop's task loss ignores the row
    # the band: the base model's decoder last hidden state over every continuation token, each text alone
    with torch.no_grad():
        hidden = torch.cat([model(input_ids=torch.tensor([item["input_ids"]]), labels=torch.tensor([target[1:]]),
                                  output_hidden_states=True).decoder_hidden_states[-1][0]
                            for item, target in zip(method.items, method.targets)])
    mu, sigma = hidden.mean(0), hidden.std(0, unbiased=False)
    torch.testing.assert_close(method.lo, mu - sigma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.hi, mu + sigma, atol=1e-5, rtol=1e-5)
    assert sum(len(s) for s in method.states) == hidden.shape[0]

    task_items = encode_seq2seq(tok, _examples()[:4], 64, 50)
    mixed = method.mix_batch(task_items, 1)
    general = mixed[4:]
    assert len(general) >= 2  # rate 0.5: about as many general rows as task rows
    batch = collate(mixed, tok.pad_token_id)
    # the base model: every activation in its base state, no margin term: extra = (L_general - L_task) / 2
    with torch.no_grad():
        extra = method.extra_loss(model, batch, forward(model, batch, output_hidden_states=True))
        l_task, l_general, hinge = _gere_hand(model, tok, method, task_items, general)
    assert float(hinge.abs().sum()) == 0.0
    assert extra.item() == pytest.approx(0.5 * (l_general - l_task).item(), rel=1e-5)

    torch.manual_seed(1)
    moved, _ = tiny_model("t5", seed=0)
    moved.eval()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))  # a trained model: some activations leave their base state
        l_task, l_general, hinge = _gere_hand(moved, tok, method, task_items, general)
    nonzero = int((hinge != 0).sum())
    assert 0 < nonzero < hinge.numel()
    margin = hinge.sum() / nonzero
    expected = 0.5 * (l_general - l_task) + 3.0 * margin
    extra = method.extra_loss(moved, batch, forward(moved, batch, output_hidden_states=True))
    assert extra.item() == pytest.approx(expected.item(), rel=1e-5)
    # through the loop's step loss: L_task + extra = (L_task + L_general) / 2 + w * margin
    nll, extra_sum = step_loss(moved, [batch], method, True)
    assert nll == pytest.approx(l_task.item(), rel=1e-5)
    assert nll + extra_sum == pytest.approx((0.5 * (l_task + l_general) + 3.0 * margin).item(), rel=1e-5)
    # both losses reach the encoder and the decoder (the general rows' decoder runs in extra_loss)
    assert moved.encoder.block[0].layer[0].SelfAttention.q.weight.grad.abs().sum() > 0
    assert moved.decoder.block[1].layer[2].DenseReluDense.wo.weight.grad.abs().sum() > 0


def test_pretrain_scenario_refuses_an_encoder_decoder_model(tmp_path, t5_dir):
    from migu.config import ConfigError, load_config

    cfg = load_config(None, ["scenario=pretrain", f"model.name={t5_dir}", f"output_dir={tmp_path / 'p'}"])
    with pytest.raises(ConfigError, match="scenario=pretrain: .* is an encoder-decoder"):
        run(cfg, quiet=True)
