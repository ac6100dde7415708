"""Encoder-decoder (T5) models: the seq2seq loss, evaluation against hand loops, MIGU/LoRA targets, every method."""

import json
import math

import pytest
import torch
from safetensors.torch import load_file

from migu.core import MIGU
from migu.data import Example, Task, collate
from migu.data.seq2seq import encode_seq2seq, encode_sources
from migu.evaluate import evaluate_task
from migu.methods import METHODS
from migu.seq2seq import token_logprobs
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
RUNNABLE = sorted(m for m in METHODS if m != "gere")


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
    if method == "i-lora":  # its consistency loss on T5's encoder and decoder states ran
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


def test_gere_refuses_an_encoder_decoder_model_with_the_reason(tmp_path, t5_dir, stream):
    with pytest.raises(ModelError, match="gere needs a decoder-only"):
        run(_cfg(t5_dir, stream, tmp_path / "g", "gere", False), quiet=True)
    assert not (tmp_path / "g").exists()


def test_pretrain_scenario_refuses_an_encoder_decoder_model(tmp_path, t5_dir):
    from migu.config import ConfigError, load_config

    cfg = load_config(None, ["scenario=pretrain", f"model.name={t5_dir}", f"output_dir={tmp_path / 'p'}"])
    with pytest.raises(ConfigError, match="scenario=pretrain: .* is an encoder-decoder"):
        run(cfg, quiet=True)
