"""MIGU core semantics (issue 3): magnitudes, masks, accumulation, targeting, LoRA, modes, autocast."""

import math

import pytest
import torch
from torch import nn
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from migu import MIGU, keep_count


class Block(nn.Module):
    def __init__(self, d_in, d_out):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)

    def forward(self, x):
        return self.proj(x)


class Toy(nn.Module):
    """Two linear blocks in a ModuleList (so the default targeting sees 'blocks'), plus an LM-head-like layer."""

    def __init__(self, d=4, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, d)
        self.layers = nn.ModuleList([Block(d, 6), Block(6, d)])
        self.lm_head = nn.Linear(d, 5)

    def forward(self, x, attention_mask=None):
        h = self.embed(x)
        for layer in self.layers:
            h = layer(h)
        return self.lm_head(h)


def llama(seed=0, **kw):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, **kw)
    return LlamaForCausalLM(cfg)


def gpt2(seed=0):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64))


def batch(n=8, length=10, seed=1, pad_last=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 64, (n, length), generator=g)
    mask = torch.ones(n, length, dtype=torch.long)
    if pad_last:
        mask[:, -pad_last:] = 0
    return ids, mask


def lm_loss_sum(model, ids, mask):
    """Summed token NLL over real tokens, so micro-batches add up to the big batch exactly."""
    labels = ids.masked_fill(mask == 0, -100)
    logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1]
    return nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                                       ignore_index=-100, reduction="sum")


# ------------------------------------------------------------------------------------------ 1. magnitudes
def test_magnitudes_pool_tokens_over_microbatches_and_skip_padding():
    model = Toy()
    migu = MIGU(model, threshold=0.5, target_modules=["layers.0.proj"])
    x1, x2 = torch.randn(2, 3, 3), torch.randn(1, 5, 3)
    m1 = torch.tensor([[1, 1, 0], [1, 0, 0]])
    m2 = torch.tensor([[1, 1, 1, 1, 0]])
    model(x1, attention_mask=m1)
    model(x2, attention_mask=m2)

    with torch.no_grad():
        ys = []
        for x, m in ((x1, m1), (x2, m2)):
            y = model.layers[0].proj(model.embed(x))
            ys.append(y[m.bool()])
        tokens = torch.cat(ys)  # 3 + 4 = 7 real tokens, pooled (not a mean of per-batch means)
        expected = tokens.abs().mean(0)
        expected = expected / expected.sum()
    got = migu.magnitudes()["layers.0.proj"]
    assert got.dtype == torch.float32
    assert float(migu.units[0].count) == 7
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)
    assert math.isclose(float(got.sum()), 1.0, rel_tol=1e-6)


def test_no_attention_mask_counts_every_position_and_no_grad_is_ignored():
    model = Toy()
    migu = MIGU(model, 0.5, target_modules=["layers.1.proj"])
    x = torch.randn(2, 4, 3)
    with torch.no_grad():
        model(x)  # evaluation-style pass: must not count
    assert float(migu.units[0].count) == 0
    model(x)
    assert float(migu.units[0].count) == 8
    with torch.no_grad(), migu.observe():
        model(x)
    assert float(migu.units[0].count) == 16


def test_explicit_token_mask_wins():
    model = Toy()
    migu = MIGU(model, 0.5, target_modules=["layers.1.proj"])
    migu.set_token_mask(torch.tensor([[1, 0, 0, 0]]))
    model(torch.randn(1, 4, 3), attention_mask=torch.ones(1, 4))
    assert float(migu.units[0].count) == 1


def test_a_mask_buffer_rewritten_in_place_between_forwards_is_read_anew():
    # the float weights of a mask are converted once for all layers of a forward; a loop that reuses one
    # attention-mask buffer (static shapes) must still be counted with each forward's values
    model = Toy()
    migu = MIGU(model, 0.5, target_modules=["layers.0.proj", "layers.1.proj"])
    buffer = torch.tensor([[1, 1, 1, 0]])
    x1, x2 = torch.randn(1, 4, 3), torch.randn(1, 4, 3)
    model(x1, attention_mask=buffer)
    buffer[0, 1:] = 0
    model(x2, attention_mask=buffer)
    assert [float(u.count) for u in migu.units] == [4.0, 4.0]
    with torch.no_grad():
        h1, h2 = model.embed(x1), model.embed(x2)
        expected = model.layers[0].proj(h1)[0, :3].abs().sum(0) + model.layers[0].proj(h2)[0, :1].abs().sum(0)
    torch.testing.assert_close(migu.units[0].sum, expected, rtol=1e-6, atol=1e-7)
    migu.reset()
    migu.set_token_mask(buffer)
    model(x1)
    buffer[0, 0] = 0
    buffer[0, 3] = 1
    migu.set_token_mask(buffer)
    model(x1)
    assert float(migu.units[0].count) == 2.0


def test_statistics_through_the_reused_buffer_equal_fresh_ones_as_batch_shapes_change():
    # one float32 buffer serves every layer (widths 16 and 32 here) and grows with the batch: small, big, small
    model = llama()
    migu = MIGU(model, 0.5)
    outputs = {u.name: [] for u in migu.units}
    taps = [u.module.register_forward_hook(lambda m, i, o, n=u.name: outputs[n].append(o.detach().clone()))
            for u in migu.units]
    batches = [batch(n=2, length=5, pad_last=1), batch(n=6, length=12, seed=2, pad_last=3), batch(n=3, length=4, seed=3)]
    for ids, mask in batches:
        model(input_ids=ids, attention_mask=mask)
    for tap in taps:
        tap.remove()
    assert {u.size for u in migu.units} == {16, 32, 8}  # q/o/v-k (2 kv heads × 4) and the MLP
    for unit in migu.units:
        expected = sum((y.abs() * m[..., None]).sum((0, 1)) for y, (_, m) in zip(outputs[unit.name], batches))
        torch.testing.assert_close(unit.sum, expected, rtol=1e-6, atol=1e-6)
        assert float(unit.count) == sum(float(m.sum()) for _, m in batches)


# ------------------------------------------------------------------------------------------ 2. masks
@pytest.mark.parametrize("t,d,k", [(0.7, 10, 3), (0.0, 10, 10), (0.5, 6, 3), (0.7, 6, 2), (0.9, 4, 1), (0.99, 3, 1)])
def test_keep_count(t, d, k):
    assert keep_count(t, d) == k


def test_mask_keeps_top_units_and_zeroes_weight_and_bias_rows():
    model = Toy()
    migu = MIGU(model, threshold=0.5, target_modules=["layers.0.proj"])
    x = torch.randn(3, 5, 3)
    model(x).sum().backward()
    mags = migu.magnitudes()["layers.0.proj"]
    keep = torch.sort(mags, descending=True, stable=True).indices[:3]
    expected = torch.zeros(6, dtype=torch.bool)
    expected[keep] = True
    grad_before = model.layers[0].proj.weight.grad.clone()
    masks = migu.mask_gradients()
    assert torch.equal(masks["layers.0.proj"], expected)
    w, b = model.layers[0].proj.weight.grad, model.layers[0].proj.bias.grad
    assert torch.all(w[~expected] == 0) and torch.all(b[~expected] == 0)
    assert torch.equal(w[expected], grad_before[expected])
    assert model.layers[1].proj.weight.grad.abs().sum() > 0  # untargeted layer untouched


def test_ties_are_broken_by_lower_index():
    lin = nn.Linear(2, 4, bias=False)
    with torch.no_grad():
        lin.weight.copy_(torch.tensor([[1.0, 0], [2, 0], [1, 0], [2, 0]]))
    model = nn.Sequential(lin)
    migu = MIGU(model, threshold=0.5, target_modules=["0"])
    model(torch.tensor([[1.0, 0.0]])).sum().backward()
    assert migu.mask_gradients()["0"].tolist() == [False, True, False, True]
    model.zero_grad(); migu.reset()
    with torch.no_grad():
        lin.weight.copy_(torch.ones(4, 2))
    model(torch.tensor([[1.0, 0.0]])).sum().backward()
    assert migu.mask_gradients()["0"].tolist() == [True, True, False, False]


def test_conv1d_weight_layout_masks_columns():
    model = gpt2()
    migu = MIGU(model, threshold=0.7, target_modules=["c_attn"])
    ids, mask = batch(4)
    lm_loss_sum(model, ids, mask).backward()
    masks = migu.mask_gradients()
    name = "transformer.h.0.attn.c_attn"
    m = masks[name]
    conv = model.transformer.h[0].attn.c_attn
    assert conv.weight.shape == (16, 48) and m.shape == (48,)
    assert m.sum() == keep_count(0.7, 48)
    assert torch.all(conv.weight.grad[:, ~m] == 0) and torch.all(conv.bias.grad[~m] == 0)
    assert torch.all(conv.weight.grad[:, m].abs().sum(0) > 0)


# ------------------------------------------------------------------------------------------ 3. equivalence
@pytest.mark.parametrize("micro", [2, 4])
def test_accumulated_microbatches_match_one_batch(micro):
    ids, mask = batch(8, pad_last=2)
    mask[0, 3:] = 0  # uneven padding across micro-batches
    results = []
    for n in (1, micro):
        model = llama()
        migu = MIGU(model, threshold=0.7)
        total = mask[:, 1:].sum()
        for i, m in zip(ids.chunk(n), mask.chunk(n)):
            (lm_loss_sum(model, i, m) / total).backward()
        masks = migu.mask_gradients()
        results.append((masks, {k: p.grad.clone() for k, p in model.named_parameters()}))
    (m1, g1), (m2, g2) = results
    assert m1.keys() == m2.keys()
    for k in m1:
        assert torch.equal(m1[k], m2[k]), k
    for k in g1:
        torch.testing.assert_close(g1[k], g2[k], rtol=1e-5, atol=1e-6)


def test_threshold_zero_is_bit_identical_to_plain_training():
    def train(with_migu):
        model = llama(seed=3)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
        migu = MIGU(model, threshold=0.0) if with_migu else None
        for step in range(3):
            ids, mask = batch(4, seed=step)
            (lm_loss_sum(model, ids, mask) / mask.sum()).backward()
            if migu:
                migu.mask_gradients()
            opt.step(); opt.zero_grad()
            if migu:
                migu.reset()
        return model.state_dict()

    a, b = train(False), train(True)
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ------------------------------------------------------------------------------------------ 4. targeting
def test_default_targets_block_linears_only():
    model = llama()
    names = {u.name for u in MIGU(model).units}
    expected = {f"model.layers.{i}.{m}" for i in range(2) for m in (
        "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert names == expected
    gnames = {u.name for u in MIGU(gpt2()).units}
    assert gnames == {f"transformer.h.{i}.{m}" for i in range(2)
                      for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}


def test_explicit_patterns_and_regex():
    model = llama()
    assert {u.name for u in MIGU(model, target_modules=["q_proj", "v_proj"]).units} == {
        f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert {u.name for u in MIGU(model, target_modules=r".*\.1\.mlp\..*").units} == {
        f"model.layers.1.mlp.{p}" for p in ("gate_proj", "up_proj", "down_proj")}
    with pytest.raises(ValueError, match="'nope_proj'"):
        MIGU(model, target_modules=["q_proj", "nope_proj"])


# ------------------------------------------------------------------------------------------ 5. LoRA
def lora_model(targets=("q_proj", "v_proj"), seed=0):
    from peft import LoraConfig, get_peft_model

    model = llama(seed)
    cfg = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=list(targets), init_lora_weights=False)
    return get_peft_model(model, cfg)


def test_lora_units_rank_a_by_a_path_and_b_by_full_layer_output():
    model = lora_model()
    migu = MIGU(model, threshold=0.5)
    names = {u.name for u in migu.units}
    assert len(names) == 8 and all(".lora_A.default" in n or ".lora_B.default" in n for n in names)
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach(), out=o.detach()))
    ids, mask = batch(2, pad_last=3)
    lm_loss_sum(model, ids, mask).backward()
    keep = mask.bool()
    x, out = seen["x"][keep], seen["out"][keep]
    a_path = x @ layer.lora_A["default"].weight.T
    exp_a = a_path.abs().mean(0); exp_a /= exp_a.sum()
    exp_b = out.abs().mean(0); exp_b /= exp_b.sum()
    # the full output really contains the LoRA path (B is non-zero here)
    assert not torch.allclose(out, layer.base_layer(x))
    mags = migu.magnitudes()
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    torch.testing.assert_close(mags[f"{prefix}.lora_A.default"], exp_a, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(mags[f"{prefix}.lora_B.default"], exp_b, rtol=1e-5, atol=1e-7)
    masks = migu.mask_gradients()
    ma, mb = masks[f"{prefix}.lora_A.default"], masks[f"{prefix}.lora_B.default"]
    assert ma.sum() == 2 and mb.sum() == 8
    assert torch.all(layer.lora_A["default"].weight.grad[~ma] == 0)
    assert torch.all(layer.lora_B["default"].weight.grad[~mb] == 0)
    assert layer.base_layer.weight.grad is None  # frozen base is never touched


def test_lora_several_adapters_only_trainable_ones():
    from peft import LoraConfig

    model = lora_model(targets=("q_proj",))
    model.add_adapter("second", LoraConfig(r=2, target_modules=["k_proj", "q_proj"], init_lora_weights=False))
    names = {u.name for u in MIGU(model).units}
    assert all(n.endswith(".default") for n in names)  # the inactive adapter is frozen by PEFT
    model.base_model.set_adapter(["default", "second"])
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    names = {u.name for u in MIGU(model).units}
    assert sum(n.endswith(".second") for n in names) == 8  # 2 layers × (q, k) × (A, B)
    assert sum(n.endswith(".default") for n in names) == 4


# ------------------------------------------------------------------------------------------ 6. modes
def adamw_step(p, g, m, v, step, lr, wd, b1=0.9, b2=0.999, eps=1e-8):
    p = p * (1 - lr * wd)
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    mhat, vhat = m / (1 - b1 ** step), v / (1 - b2 ** step)
    return p - lr * mhat / (vhat.sqrt() + eps), m, v


@pytest.mark.parametrize("mode", ["grad", "update"])
def test_modes_against_hand_computed_adamw(mode):
    torch.manual_seed(0)
    lin = nn.Linear(3, 4)
    model = nn.Sequential(lin)
    lr, wd = 0.1, 0.5
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=wd)
    migu = MIGU(model, threshold=0.5, target_modules=["0"], mode=mode, optimizer=opt if mode == "update" else None)
    w, m, v = lin.weight.detach().clone(), torch.zeros(4, 3), torch.zeros(4, 3)
    for step in (1, 2):
        x = torch.randn(5, 3)
        model(x).pow(2).sum().backward()
        g_full = lin.weight.grad.clone()
        mask = migu.mask_gradients()["0"]
        opt.step(); opt.zero_grad(); migu.reset()
        g = g_full * mask[:, None]
        w_new, m, v = adamw_step(w, g, m, v, step, lr, wd)
        if mode == "update":
            w_new[~mask] = w[~mask]  # masked rows exactly unchanged (momentum and decay included)
            assert torch.equal(lin.weight[~mask], w[~mask])
        torch.testing.assert_close(lin.weight.detach(), w_new, rtol=1e-5, atol=1e-6)
        if mode == "grad" and step == 2:
            # the paper's masking: decay and momentum still move masked rows
            assert not torch.allclose(lin.weight[~mask], w[~mask])
        w = lin.weight.detach().clone()


def test_update_mode_restores_on_reset_without_optimizer_hook():
    model = llama()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1, weight_decay=0.1)
    migu = MIGU(model, threshold=0.7, mode="update")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    ids, mask = batch(2)
    lm_loss_sum(model, ids, mask).backward()
    masks = migu.mask_gradients()
    opt.step(); migu.reset()
    params = dict(model.named_parameters())
    for name, m in masks.items():
        w = params[name + ".weight"]
        assert torch.equal(w[~m], before[name + ".weight"][~m])
        assert not torch.equal(w[m], before[name + ".weight"][m])


# ------------------------------------------------------------------------------------------ 7. autocast
def test_bf16_autocast_keeps_float32_statistics_and_masks_match_within_ties():
    ids, mask = batch(4, pad_last=2)
    out = {}
    for precision in ("fp32", "bf16"):
        model = llama(seed=5)
        migu = MIGU(model, threshold=0.7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = lm_loss_sum(model, ids, mask)
        loss.float().backward()
        assert all(u.sum.dtype == torch.float32 for u in migu.units)
        out[precision] = (migu.magnitudes(), migu.mask_gradients())
    (mag32, mask32), (_, mask16) = out["fp32"], out["bf16"]
    agree = sum(int((mask32[k] == mask16[k]).sum()) for k in mask32)
    total = sum(m.numel() for m in mask32.values())
    assert agree / total > 0.9
    for k in mask32:
        diff = mask32[k] != mask16[k]
        if diff.any():
            # disagreements only where the fp32 magnitude sits next to the cut-off (bf16 has ~3 digits)
            mags = mag32[k]
            cutoff = torch.sort(mags, descending=True).values[int(mask32[k].sum()) - 1]
            assert torch.all((mags[diff] - cutoff).abs() <= 0.02 * cutoff + 1e-6), k


# ------------------------------------------------------------------------------------------ 9. hooks, 10. errors
def test_remove_leaves_no_hook_and_output_unchanged():
    model = llama()
    ids, mask = batch(2)
    ref = model(input_ids=ids, attention_mask=mask).logits.detach()
    migu = MIGU(model, threshold=0.7)
    assert sum(len(m._forward_hooks) for m in model.modules()) == 14
    migu.remove()
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert torch.equal(model(input_ids=ids, attention_mask=mask).logits, ref)
    assert migu.extra_bytes() == sum(u.size * 4 + 8 for u in migu.units)


@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": 1.0}, "1.0"), ({"threshold": -0.1}, "-0.1"), ({"threshold": "0.5"}, "'0.5'"),
    ({"mode": "mask"}, "'mask'"),
])
def test_bad_options_raise_value_error_naming_the_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        MIGU(Toy(), **kwargs)


def test_no_targetable_modules_is_an_error():
    model = Toy()
    for p in model.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match="no trainable"):
        MIGU(model)


def test_gradient_checkpointing_gives_same_masks():
    ids, mask = batch(4, pad_last=1)
    result = []
    for ckpt in (False, True):
        model = llama(seed=2)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        migu = MIGU(model, threshold=0.7)
        lm_loss_sum(model, ids, mask).backward()
        result.append(migu.mask_gradients())
    for k in result[0]:
        assert torch.equal(result[0][k], result[1][k]), k


def test_sharded_engines_are_refused_not_silently_ignored():
    class FullyShardedDataParallel(nn.Module):  # stands in for torch's FSDP wrapper (same class name)
        def __init__(self, inner):
            super().__init__()
            self.inner = inner

    with pytest.raises(ValueError, match="FullyShardedDataParallel"):
        MIGU(FullyShardedDataParallel(Toy()))

    class DeepSpeedEngine(FullyShardedDataParallel):
        pass

    with pytest.raises(ValueError, match="DeepSpeedEngine"):
        MIGU(DeepSpeedEngine(Toy()))


# ------------------------------------------------------------------------------------------ 11. fidelity options (issue 14)
def test_include_lm_head_ranks_vocab_rows_over_kept_positions_and_masks_the_tied_embedding():
    model = llama(seed=4, tie_word_embeddings=True)
    head = model.lm_head
    assert head.weight is model.model.embed_tokens.weight  # tied: one tensor
    plain = MIGU(model, 0.5)
    assert "lm_head" not in {u.name for u in plain.units}  # default: no head
    plain.remove()
    migu = MIGU(model, threshold=0.5, include_lm_head=True)
    assert migu.units[-1].name == "lm_head" and migu.units[-1].size == 64
    ids, mask = batch(3, length=6)
    mask[0, 4:] = 0
    mask[2, 2:] = 0
    keep = torch.tensor([1, 2, 4])
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=keep).logits  # [3, 3, 64]
    logits.abs().sum().backward()
    # hand computation: the head's counted positions are the kept ones with a real token
    real = mask[:, keep].bool()  # row 0: positions 1, 2 (4 is padding); row 1: all 3; row 2: position 1
    y = logits.detach()[real]
    assert y.shape[0] == 6 and float(migu.units[-1].count) == 6
    expected = y.abs().mean(0)
    expected = expected / expected.sum()
    torch.testing.assert_close(migu.magnitudes()["lm_head"], expected, rtol=1e-5, atol=1e-8)
    block = migu.units[0]
    assert float(block.count) == int(mask.sum())  # block linears still count every real token
    masks = migu.mask_gradients()
    kept = torch.zeros(64, dtype=torch.bool)
    kept[torch.sort(expected, descending=True, stable=True).indices[:32]] = True
    assert torch.equal(masks["lm_head"], kept)
    # the tied embedding's gradient is the same tensor: its dropped vocabulary rows are zero too
    grad = model.model.embed_tokens.weight.grad
    assert grad is head.weight.grad and torch.all(grad[~kept] == 0) and grad[kept].abs().sum() > 0


def test_lm_head_positions_follow_an_int_logits_to_keep_and_the_explicit_token_mask():
    model = llama(seed=4)
    migu = MIGU(model, threshold=0.5, target_modules=["q_proj"], include_lm_head=True)
    ids, mask = batch(2, length=5)
    answer = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 1]])
    migu.set_token_mask(answer)
    logits = model(input_ids=ids, attention_mask=mask, logits_to_keep=2).logits  # the last 2 positions
    logits.sum().backward()
    counted = answer[:, -2:].bool()  # [[1, 0], [1, 1]]: 3 positions
    expected = logits.detach()[counted].abs().mean(0)
    assert float(migu.units[-1].count) == 3
    torch.testing.assert_close(migu.magnitudes()["lm_head"], expected / expected.sum(), rtol=1e-5, atol=1e-8)
    assert float(migu.units[0].count) == int(answer.sum())  # q_proj: the 4 selected tokens


def test_include_lm_head_frozen_head_is_skipped_and_a_headless_model_is_an_error():
    model = lora_model()
    names = {u.name for u in MIGU(model, include_lm_head=True).units}
    assert names and not any("lm_head" in n for n in names)  # frozen under LoRA: nothing to mask
    with pytest.raises(ValueError, match="include_lm_head.*no LM head"):
        MIGU(nn.Sequential(nn.Linear(2, 2)), include_lm_head=True)


def test_lora_b_own_ranks_b_rows_by_b_output_and_keeps_every_row_while_it_is_zero():
    model = lora_model()
    migu = MIGU(model, threshold=0.5, lora_b="own")
    layer = model.base_model.model.model.layers[0].self_attn.q_proj
    seen = {}
    layer.register_forward_hook(lambda m, i, o: seen.update(x=i[0].detach()))
    ids, mask = batch(2, pad_last=3)
    lm_loss_sum(model, ids, mask).backward()
    x = seen["x"][mask.bool()]
    own = x @ layer.lora_A["default"].weight.T @ layer.lora_B["default"].weight.T  # B·A·x, unscaled
    expected = own.abs().mean(0)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"
    torch.testing.assert_close(migu.magnitudes()[name], expected / expected.sum(), rtol=1e-5, atol=1e-7)
    assert int(migu.mask_gradients()[name].sum()) == 8  # ceil(0.5 * 16)

    from peft import LoraConfig, get_peft_model

    fresh = get_peft_model(llama(), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["q_proj"]))
    own, layer_rule = MIGU(fresh, 0.5, lora_b="own"), MIGU(fresh, 0.5, lora_b="layer")
    lm_loss_sum(fresh, ids, mask).backward()
    b = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.default"
    assert bool(own.mask_gradients()[b].all())  # B = 0: its output is all zero, every row kept
    assert int(layer_rule.masks()[b].sum()) == 8  # the paper's rule ranks by the base output
    with pytest.raises(ValueError, match="lora_b.*'both'"):
        MIGU(llama(), lora_b="both")


def test_a_no_grad_pass_does_not_replace_the_captured_mask():
    model = Toy()
    migu = MIGU(model, 0.5, target_modules=["layers.1.proj"])
    m1 = torch.tensor([[1, 1, 0]])
    model(torch.randn(1, 3, 3), attention_mask=m1)
    with torch.no_grad():  # e.g. I-LoRA's slow-adapter pass on a batch of another shape
        model(torch.randn(2, 5, 3), attention_mask=torch.ones(2, 5))
    assert migu._auto_mask[False] is m1
    with torch.no_grad(), migu.observe():  # an observed pass is a measured forward: it captures
        model(torch.randn(2, 5, 3), attention_mask=torch.ones(2, 5))
    assert migu._auto_mask[False].shape == (2, 5)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_counts_each_real_token_once_despite_a_no_grad_pass(reentrant):
    ids, mask = batch(4, pad_last=3)
    mask[1, 2:] = 0
    other_ids, other_mask = batch(2, length=7, seed=9)
    stats = []
    for ckpt in (False, True):
        model = llama(seed=2)
        model.train()
        if ckpt:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
        migu = MIGU(model, threshold=0.7)
        loss = lm_loss_sum(model, ids, mask)
        with torch.no_grad():  # a teacher / evaluation pass between forward and backward (other shape)
            model(input_ids=other_ids, attention_mask=other_mask)
        loss.backward()
        stats.append(({u.name: float(u.count) for u in migu.units}, migu.magnitudes()))
    (c0, m0), (c1, m1) = stats
    assert set(c0.values()) == {float(mask.sum())} and c1 == c0  # padding never counted, nothing doubled
    for k in m0:
        torch.testing.assert_close(m1[k], m0[k], rtol=1e-5, atol=1e-8, msg=k)


def _reference_rank(threshold, magnitudes):
    """The per-layer ranking migu used before it was batched: a stable CPU sort per unit."""
    out = {}
    for name, m in magnitudes.items():
        k = keep_count(threshold, m.numel())
        if k >= m.numel() or not bool(m.any()):
            out[name] = torch.ones(m.numel(), dtype=torch.bool)
            continue
        mask = torch.zeros(m.numel(), dtype=torch.bool)
        mask[torch.sort(m, descending=True, stable=True).indices[:k]] = True
        out[name] = mask
    return out


def test_batched_ranking_equals_the_per_layer_sort_with_ties_and_all_zero_units():
    model = llama()
    migu = MIGU(model, threshold=0.7)
    g = torch.Generator().manual_seed(0)
    mags = {}
    for i, unit in enumerate(migu.units):
        m = torch.randint(0, 4, (unit.size,), generator=g).float()  # 4 values: many ties
        mags[unit.name] = torch.zeros(unit.size) if i == 3 else m
    got = migu._rank(mags)
    want = _reference_rank(0.7, mags)
    assert list(got) == [u.name for u in migu.units]
    for name in want:
        assert torch.equal(got[name], want[name]), name
    assert bool(got[migu.units[3].name].all())


def test_grad_mode_masking_needs_no_host_sync(monkeypatch):
    model = llama()
    migu = MIGU(model, threshold=0.7, include_lm_head=True)
    ids, mask = batch(2)
    lm_loss_sum(model, ids, mask).backward()

    def refuse(*args, **kwargs):
        raise AssertionError("host sync in mask_gradients")

    for attr in ("__bool__", "item", "cpu", "tolist", "__float__", "__int__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, attr, refuse)
    masks = migu.mask_gradients()
    monkeypatch.undo()
    assert len(masks) == 15 and all(int(m.sum()) == keep_count(0.7, m.numel()) for m in masks.values())
