"""The continual-learning methods of issue 5 on tiny random models: each method's defining behaviour,
then one contract every registered method meets through the real loop (with and without MIGU)."""

import json
import math
import random
import re
from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import migu.train
from migu.cli import main as cli_main
from migu.config import ConfigError, describe_options, load_config
from migu.core import MIGU
from migu.data import DataError, Example, Task, collate, encode
from migu.methods import METHODS, Context, get_method
from migu.methods.ewc import EWC, EwcOptions, answer_nll
from migu.data import IGNORE_INDEX
from migu.methods.gere import DEFAULT_GENERAL_FILE, GeRe, GereOptions, margin_loss, read_general_texts
from migu.methods.i_lora import ILoRA, ILoraOptions
from migu.methods.inc_lora import IncLoRA, lora_layers
from migu.methods.lora_replay import LoRAReplay, LoraReplayOptions
from migu.methods.o_lora import OLoRA, OLoraOptions
from migu.methods.replay import Replay, ReplayOptions, Reservoir, replay_count
from migu.models import tiny_model, tiny_model_dir
from migu.train import step_loss

REPO = Path(__file__).resolve().parent.parent
LORA = dict(r=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj"])


# ------------------------------------------------------------------------------------------ helpers
def make_tasks(n_tasks=2, n=8):
    """Tiny in-memory tasks whose answer is named in the prompt (learnable in a few steps)."""
    specs = [("colors", ["red", "blue"]), ("moods", ["happy", "sad"]), ("animals", ["cat", "dog"])][:n_tasks]
    tasks = []
    for name, labels in specs:
        examples = [Example(f"{name}: {labels[i % 2]} {i}?\nAnswer:", labels[i % 2]) for i in range(n)]
        tasks.append(Task(name, labels, examples, examples[:4]))
    return tasks


def context(model, tok, tasks):
    return Context(model=model, tokenizer=tok, tasks=tasks, encode=lambda ex: encode(tok, ex, 64), seed=0,
                   log=lambda record: None)


def train_phase(method, model, tok, index, tasks, all_tasks, steps=2, lr=1e-2, threshold=None, batch=4):
    """One phase of a method's hooks on in-memory tasks, in the loop's order (test_method_contract checks that
    order on the real loop); returns the MIGU unit names."""
    ctx = context(model, tok, all_tasks)
    torch.manual_seed(index)
    method.before_task(index, tasks, ctx)
    params = method.trainable_parameters(model)
    optimizer = torch.optim.AdamW(params, lr=lr)
    migu = MIGU(model, threshold=threshold, target_modules=method.migu_target_modules()) if threshold else None
    items = method.train_items(index, tasks, ctx.encode([ex for task in tasks for ex in task.train]), ctx)
    for step in range(1, steps + 1):
        chunk = [items[(step * batch + j) % len(items)] for j in range(batch)]
        step_loss(model, [collate(method.mix_batch(chunk, step), tok.pad_token_id)], method,
                  method.needs_hidden_states)
        if migu:
            migu.mask_gradients()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if migu:
            migu.reset()
        method.after_step(step)
    units = [u.name for u in migu.units] if migu else []
    if migu:
        migu.remove()
    method.after_task(index, tasks, ctx)
    return units


def lora_model(cls, options):
    model, tok = tiny_model("llama", seed=0)
    method = cls(options)
    return method, method.setup(model), tok


def write_stream(root: Path, n: int = 8) -> Path:
    """A two-task custom stream file for the real loop."""
    root.mkdir(parents=True, exist_ok=True)
    spec = {"tasks": []}
    for name, labels in (("colors", ["red", "blue"]), ("moods", ["happy", "sad"])):
        rows = [json.dumps({"sentence": f"{labels[i % 2]} {i}", "label": labels[i % 2]}) for i in range(n + 4)]
        (root / f"{name}.jsonl").write_text("\n".join(rows) + "\n")
        spec["tasks"].append({"name": name, "file": f"{name}.jsonl", "instruction": "Pick.", "test_fraction": 0.3})
    (root / "stream.yaml").write_text(yaml.safe_dump(spec))
    return root / "stream.yaml"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls on a shared 2-core machine: one thread is several times faster than two."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny_model_dir(tmp_path_factory.mktemp("tiny"), "llama", seed=0)


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp("stream"))


def tiny_run_config(model_dir, stream, out, **sets):
    """2 tasks x 2 steps (8 train items, batch 4), rank evaluation on 4 test items per task."""
    values = {"model.name": model_dir, "data.stream": stream, "data.train_per_task": 8, "data.test_per_task": 4,
              "data.max_length": 64, "train.batch_size": 4, "train.lr": 1e-2, "eval.mode": "rank",
              "eval.batch_size": 8, "threads": 1, "output_dir": out}
    values.update(sets)
    return load_config(None, [f"{k}={v}" for k, v in values.items()])


# ------------------------------------------------------------------------------------------ registry, config, CLI
def test_registry_matches_method_files():
    files = {p.stem for p in (REPO / "migu" / "methods").glob("*.py")} - {"__init__", "base"}
    assert {name.replace("-", "_") for name in METHODS} == files
    for name, cls in METHODS.items():
        assert get_method(name) is cls and cls.__module__ == f"migu.methods.{name.replace('-', '_')}"


def test_unknown_method_is_one_line_error_listing_known_ones(capsys):
    with pytest.raises(ConfigError) as err:
        load_config(None, ["method.name=nope"])
    assert "\n" not in str(err.value) and all(name in str(err.value) for name in METHODS)
    assert cli_main(["run", "--set", "method.name=nope"]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("config error: method.name=nope") and "o-lora" in lines[0]


def test_method_options_are_documented_in_help():
    text = describe_options()
    for key in ("method.replay.rate", "method.replay.mix", "method.lora_replay.mix", "method.lora_replay.r",
                "method.ewc.fisher_samples", "method.inc_lora.r", "method.o_lora.lambda1", "method.i_lora.ema_max",
                "method.gere.general_file", "method.gere.tm_weight", "method.ewc.lam", "method.ewc.gamma"):
        assert f"  {key} (" in text, key


@pytest.mark.parametrize("bad, message", [
    (["method.name=replay", "method.replay.rate=1.0"], "method.replay.rate=1.0: must be in [0, 1)"),
    (["method.name=o-lora", "method.o_lora.lambda1=-1"], "method.o_lora.lambda1=-1.0: must be >= 0"),
    (["method.name=i-lora", "method.i_lora.ema_max=1.5"], "method.i_lora.ema_max=1.5: must be in [0, 1)"),
    (["method.name=gere", "method.gere.general_file=/no/such.jsonl"], "method.gere.general_file=/no/such.jsonl"),
    (["method.name=ewc", "method.ewc.fisher_samples=0"], "method.ewc.fisher_samples=0: must be >= 1"),
    (["method.name=replay", "method.replay.mix=interleave"],
     "method.replay.mix=interleave: must be 'append' or 'batch'"),
    (["method.name=replay", "method.replay.buffer_size=8"], "method.replay.buffer_size=8: only used with mix=batch"),
    (["method.name=lora-replay", "method.lora_replay.mix=x"], "method.lora_replay.mix=x: must be 'append' or 'batch'"),
    (["method.name=lora-replay", "method.lora_replay.r=0"], "method.lora_replay.r=0: must be >= 1"),
])
def test_bad_method_options_name_the_key(bad, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace(")", r"\)")):
        load_config(None, bad)


def test_every_method_config_loads_and_names_its_command():
    paths = sorted((REPO / "configs" / "methods").glob("*.yaml"))
    assert {p.stem for p in paths} >= {"replay", "lora-replay", "inc-lora", "o-lora", "i-lora", "gere", "ewc", "mtl"}
    for path in paths:
        cfg = load_config(path)
        assert cfg.method.name == path.stem
        assert f"migu run configs/methods/{path.name}" in path.read_text().split("\n\n")[0], path


# ------------------------------------------------------------------------------------------ replay
def test_reservoir_is_uniform_over_the_stream():
    # 2 tasks x 10 items through a 5-slot reservoir, 4000 seeds: each item kept with probability 5/20
    counts = [0] * 20
    for seed in range(4000):
        rng, buffer = random.Random(seed), Reservoir(5)
        for item in range(20):
            buffer.offer(item, rng)
        assert len(buffer.items) == 5 and len(set(buffer.items)) == 5 and buffer.seen == 20
        for item in buffer.items:
            counts[item] += 1
    sd = math.sqrt(0.25 * 0.75 / 4000)
    assert all(abs(c / 4000 - 0.25) < 4 * sd for c in counts), counts


def test_replay_count_has_the_configured_rate():
    rng = random.Random(0)
    assert {replay_count(8, 0.2, rng) for _ in range(100)} == {2}  # 2 of 10 items replayed, exactly
    assert replay_count(8, 0.0, rng) == 0
    draws = [replay_count(8, 0.125, rng) for _ in range(20000)]  # E[k] = 8/7: 1/8 of the items on average
    assert sum(draws) / len(draws) == pytest.approx(8 / 7, abs=0.02) and set(draws) == {1, 2}


def test_replay_batch_mix_holds_past_task_items_at_the_rate():
    model, tok = tiny_model("llama", seed=0)
    tasks = make_tasks(2, n=50)
    method = Replay(ReplayOptions(rate=0.2, mix="batch"))
    ctx = context(model, tok, tasks)
    method.before_task(0, tasks[:1], ctx)
    assert method.buffer.capacity == math.ceil(0.02 * 100)
    first = ctx.encode(tasks[0].train)
    assert method.mix_batch(first[:8], 1) == first[:8]  # nothing to replay during the first task
    method.after_task(0, tasks[:1], ctx)
    assert len(method.buffer.items) == 2 and all(item in first for item in method.buffer.items)
    method.before_task(1, tasks[1:], ctx)
    second = ctx.encode(tasks[1].train)
    mixed = method.mix_batch(second[:8], 1)
    assert mixed[:8] == second[:8] and len(mixed) == 10 and all(item in first for item in mixed[8:])
    assert method.train_items(1, tasks[1:], second, ctx) == second  # batch mixing adds no training items
    restored = Replay(ReplayOptions(mix="batch"))
    restored.load_state_dict(method.state_dict())
    assert restored.buffer.items == method.buffer.items and restored.buffer.seen == 50


def test_replay_append_stores_ratio_of_each_task_and_appends_them_to_later_tasks():
    model, tok = tiny_model("llama", seed=0)
    tasks = make_tasks(3, n=50)
    method = Replay(ReplayOptions(ratio=0.05))  # the default mix: append
    ctx = context(model, tok, tasks)
    encoded = [ctx.encode(t.train) for t in tasks]
    method.before_task(0, tasks[:1], ctx)
    assert method.train_items(0, tasks[:1], encoded[0], ctx) == encoded[0]  # nothing stored yet
    method.after_task(0, tasks[:1], ctx)
    assert len(method.stored) == 1 and len(method.stored[0]) == math.ceil(0.05 * 50) == 3
    assert len({tuple(x["input_ids"]) for x in method.stored[0]}) == 3
    assert all(x in encoded[0] for x in method.stored[0])
    method.before_task(1, tasks[1:2], ctx)
    assert method.train_items(1, tasks[1:2], encoded[1], ctx) == encoded[1] + method.stored[0]
    assert method.mix_batch(encoded[1][:8], 1) == encoded[1][:8]  # micro-batches are not changed
    method.after_task(1, tasks[1:2], ctx)
    assert len(method.stored) == 2 and all(x in encoded[1] for x in method.stored[1])
    assert method.train_items(2, tasks[2:], encoded[2], ctx) == encoded[2] + method.stored[0] + method.stored[1]
    restored = Replay(ReplayOptions(ratio=0.05))
    restored.load_state_dict(method.state_dict())
    assert restored.stored == method.stored
    assert ReplayOptions(ratio=0.02).per_task(8) == 1 and ReplayOptions(ratio=1.0).per_task(8) == 8


def test_replay_append_through_the_loop_sees_each_stored_item_once_per_epoch(model_dir, stream, tmp_path,
                                                                                 monkeypatch):
    seen = []
    real_mix = Replay.mix_batch

    def mix(self, items, step):
        seen.append([tuple(x["input_ids"]) for x in items])
        return real_mix(self, items, step)

    monkeypatch.setattr(Replay, "mix_batch", mix)
    cfg = tiny_run_config(model_dir, stream, tmp_path / "r", **{"method.name": "replay", "method.replay.ratio": 0.25,
                                                                "train.epochs": 2})
    migu.train.run(cfg, quiet=True)
    records = [json.loads(line) for line in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    assert Counter(r["stage"] for r in records if r["type"] == "train") == {0: 4, 1: 6}
    # 8 items / batch 4, 2 epochs; then 8 + ceil(0.25 x 8) = 10 items: 3 steps per epoch
    phase0 = [x for mb in seen[:2] for x in mb]
    epoch1, epoch2 = [x for mb in seen[4:7] for x in mb], [x for mb in seen[7:] for x in mb]
    assert len(phase0) == 8 and len(epoch1) == 10 and Counter(epoch1) == Counter(epoch2)  # each once per epoch
    assert sum(x in phase0 for x in epoch1) == 2  # ceil(0.25 x 8) items of the first task among them


def test_lora_replay_trains_only_the_adapter_and_replays():
    method, model, tok = lora_model(LoRAReplay, LoraReplayOptions(**LORA, ratio=0.25))
    assert LoRAReplay.default_lr == 1e-4 and method.migu_target_modules() == LORA["target_modules"]
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if "lora_" in n}
    tasks = make_tasks(2)
    train_phase(method, model, tok, 0, tasks[:1], tasks)
    assert len(method.stored) == 1 and len(method.stored[0]) == 2  # ceil(0.25 x 8)
    ctx = context(model, tok, tasks)
    second = ctx.encode(tasks[1].train)
    assert method.train_items(1, tasks[1:], second, ctx) == second + method.stored[0]


# ------------------------------------------------------------------------------------------ inc-lora
def test_inc_lora_freezes_earlier_adapters_sums_all_and_migu_sees_the_newest():
    method, model, tok = lora_model(IncLoRA, IncLoRA.Options(**LORA))
    tasks = make_tasks(2)
    train_phase(method, model, tok, 0, tasks[:1], tasks, threshold=0.5)
    t0 = {n: p.detach().clone() for n, p in model.named_parameters() if ".t0." in n}
    units = train_phase(method, model, tok, 1, tasks[1:], tasks, threshold=0.5)
    for name, before in t0.items():
        assert torch.equal(dict(model.named_parameters())[name], before), name  # bit-identical
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        n for n, _ in model.named_parameters() if ".t1." in n}
    assert units and all(".t1" in u for u in units)  # MIGU ranks the new adapter's A/B rows only
    changed = [n for n, p in model.named_parameters() if ".lora_B.t1." in n and p.abs().sum() > 0]
    assert changed  # the new adapter trained
    # the forward pass sums every adapter: y = base(x) + sum_a scale * B_a A_a x
    layer = dict(lora_layers(model))["base_model.model.model.layers.0.self_attn.q_proj"]
    assert layer.active_adapters == ["t0", "t1"]
    x = torch.randn(3, 32)
    expected = layer.base_layer(x) + sum(layer.scaling[a] * layer.lora_B[a](layer.lora_A[a](x)) for a in ("t0", "t1"))
    model.eval()
    torch.testing.assert_close(layer(x), expected)


def test_inc_lora_resume_recreates_every_adapter():
    method, model, tok = lora_model(IncLoRA, IncLoRA.Options(**LORA))
    tasks = make_tasks(3)
    for i in range(2):
        train_phase(method, model, tok, i, tasks[i:i + 1], tasks)
    fresh, fresh_model, _ = lora_model(IncLoRA, IncLoRA.Options(**LORA))
    fresh.load_state_dict(method.state_dict())
    assert {n for n, _ in fresh_model.named_parameters()} == {n for n, _ in model.named_parameters()}


# ------------------------------------------------------------------------------------------ o-lora
def test_o_lora_loss_equals_hand_computation():
    method, model, tok = lora_model(OLoRA, OLoraOptions(**LORA, lambda1=0.5, lambda2=0.25))
    ctx = context(model, tok, make_tasks(2))
    method.before_task(0, [], ctx)
    assert method.extra_loss(model, None, None).item() == pytest.approx(0.25 * method.l2_loss().item())
    method.before_task(1, [], ctx)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.fill_({"lora_A.t0": 0.1, "lora_A.t1": 0.2, "lora_B.t0": 0.5, "lora_B.t1": 0.3}[
                    ".".join(name.split(".")[-3:-1])])
    # 4 adapted layers (q_proj: 32 -> 32, v_proj: 32 -> 16), r = 4: A_t0 A_t1^T is 4x4 of 32 * 0.1 * 0.2
    ortho = 4 * (4 * 4 * 32 * 0.1 * 0.2)
    l2 = 2 * (4 * 32 * 0.2 ** 2 + 32 * 4 * 0.3 ** 2) + 2 * (4 * 32 * 0.2 ** 2 + 16 * 4 * 0.3 ** 2)
    assert method.orthogonality_loss().item() == pytest.approx(ortho)
    assert method.extra_loss(model, None, None).item() == pytest.approx(0.5 * ortho + 0.25 * l2)
    method.extra_loss(model, None, None).backward()  # only the new adapter gets gradient
    assert all((p.grad is not None) == (".t1." in n) for n, p in model.named_parameters() if "lora_" in n)


def overlap(model):
    """sum |A_t0 A_t1^T| / (||A_t0|| ||A_t1||) over the adapted layers."""
    return sum(((layer.lora_A["t0"].weight @ layer.lora_A["t1"].weight.T).abs().sum()
                / (layer.lora_A["t0"].weight.norm() * layer.lora_A["t1"].weight.norm())).item()
               for _, layer in lora_layers(model))


def test_o_lora_large_lambda_makes_the_new_a_orthogonal():
    result = {}
    for lam in (0.0, 50.0):
        method, model, tok = lora_model(OLoRA, OLoraOptions(**LORA, lambda1=lam))
        tasks = make_tasks(2)
        train_phase(method, model, tok, 0, tasks[:1], tasks, steps=3)
        train_phase(method, model, tok, 1, tasks[1:], tasks, steps=40, lr=1e-2)
        result[lam] = overlap(model)
    assert result[50.0] < 0.1 * result[0.0], result


# ------------------------------------------------------------------------------------------ i-lora
def test_i_lora_ema_update_follows_the_formula():
    method, model, tok = lora_model(ILoRA, ILoraOptions(**LORA, ema_max=0.9))
    slow, fast = method.pairs[0]
    assert torch.equal(slow, fast)  # the slow adapter starts as a copy
    for step, lam in ((1, 0.5), (2, 2 / 3), (3, 0.75), (20, 0.9)):
        while method.step < step - 1:
            method.step += 1
        with torch.no_grad():
            fast.add_(torch.randn_like(fast))
        expected = lam * slow.detach().clone() + (1 - lam) * fast.detach()
        assert method.ema_weight(step) == pytest.approx(lam)
        method.after_step(step)
        torch.testing.assert_close(slow.detach(), expected, rtol=1e-6, atol=1e-6)
    assert ILoRA(ILoraOptions()).ema_weight(1) == 0.25  # default: min(1 - 1/(step+1), 0.25)


def test_i_lora_evaluates_with_the_slow_adapter_and_migu_masks_the_fast_one():
    method, model, tok = lora_model(ILoRA, ILoraOptions(**LORA))
    ids = torch.tensor([[5, 6, 7, 8]])

    def eval_logits():
        model.eval()
        with torch.no_grad(), method.eval_context(model):
            return model(input_ids=ids).logits.clone()

    base = eval_logits()
    with torch.no_grad():
        for _, fast in method.pairs:
            fast.add_(0.5)
    assert torch.equal(eval_logits(), base)  # fast weights changed: evaluation does not see them
    with torch.no_grad():
        model.train()
        assert not torch.equal(model(input_ids=ids).logits, base)  # training runs through the fast adapter
        for slow, _ in method.pairs:
            slow.add_(0.5)
    assert not torch.equal(eval_logits(), base)  # slow weights changed: evaluation does
    model.train()
    migu = MIGU(model, threshold=0.5, target_modules=method.migu_target_modules())
    assert migu.units and all(u.name.endswith(".fast") for u in migu.units)
    assert all(".fast." in n for n, p in model.named_parameters() if p.requires_grad)


def test_i_lora_fills_its_buffer_on_the_fly_and_replays_from_the_second_task():
    method, model, tok = lora_model(ILoRA, ILoraOptions(**LORA, buffer_size=5, rate=0.5))
    tasks = make_tasks(2)
    ctx = context(model, tok, tasks)
    first, second = ctx.encode(tasks[0].train), ctx.encode(tasks[1].train)
    method.before_task(0, tasks[:1], ctx)
    assert method.mix_batch(first[:4], 1) == first[:4]  # first task: offered, nothing replayed
    assert method.buffer.seen == 4 and method.buffer.items == first[:4]
    assert method.mix_batch(first[4:], 2) == first[4:]
    # the same 8 offers through a fresh reservoir with the phase's seed: the same 5 kept items
    hand, rng = Reservoir(5), random.Random("reservoir:0:0")
    for item in first:
        hand.offer(item, rng)
    assert method.buffer.items == hand.items and method.buffer.seen == 8
    method.before_task(1, tasks[1:], ctx)
    mixed = method.mix_batch(second[:4], 1)  # the current task's items enter the buffer before the draw
    assert method.buffer.seen == 12 and mixed[:4] == second[:4] and len(mixed) == 8
    rng = random.Random("reservoir:0:1")
    for item in second[:4]:
        hand.offer(item, rng)
    assert method.buffer.items == hand.items and all(item in hand.items for item in mixed[4:])
    restored = ILoRA(ILoraOptions(**LORA, buffer_size=5))
    restored.load_state_dict(method.state_dict())
    assert restored.buffer.items == method.buffer.items and restored.buffer.seen == 12


def test_i_lora_replayed_rows_are_counted_from_the_end():
    method = ILoRA(ILoraOptions())
    x, y = [5, 6, 7], [8, 9, 10]
    batch = {"input_ids": torch.tensor([x, y, x]), "attention_mask": torch.ones(3, 3, dtype=torch.long)}
    method.replayed = Counter({tuple(x): 1})
    assert method.replayed_rows(batch) == [2]  # a task copy of a replayed item is not a replay
    method.replayed = Counter({tuple(x): 2, tuple(y): 1})
    assert method.replayed_rows(batch) == [0, 1, 2]


def test_i_lora_consistency_loss_on_replayed_rows_only():
    method, model, tok = lora_model(ILoRA, ILoraOptions(**LORA, buffer_size=4, rate=0.5))
    tasks = make_tasks(2)
    train_phase(method, model, tok, 0, tasks[:1], tasks)
    ctx = context(model, tok, tasks)
    method.before_task(1, tasks[1:], ctx)
    current = ctx.encode(tasks[1].train)[:4]
    mixed = method.mix_batch(current, 1)
    assert len(mixed) == 8 and all(item in method.buffer.items for item in mixed[4:])
    assert method.replayed_rows(collate(mixed, tok.pad_token_id)) == [4, 5, 6, 7]

    def loss(items):
        batch = collate(items, tok.pad_token_id)
        outputs = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                        output_hidden_states=True)
        return method.extra_loss(model, batch, outputs)

    replayed, method.replayed = method.replayed, Counter()
    assert loss(mixed) is None  # no replayed row this step
    method.replayed = replayed
    with torch.no_grad():
        for slow, fast in method.pairs:
            slow.copy_(fast)
    model.eval()
    assert loss(mixed).item() == pytest.approx(0.0, abs=1e-10)  # slow == fast: max(h, h) = h
    with torch.no_grad():
        for slow, fast in method.pairs:
            slow.add_(torch.randn_like(slow))
    value = loss(mixed)
    assert value.item() > 0
    value.backward()
    assert all((p.grad is not None) == (".fast." in n) for n, p in model.named_parameters() if "lora_" in n)


# ------------------------------------------------------------------------------------------ gere
def test_margin_loss_is_zero_inside_the_band_and_grows_outside():
    lo, hi = torch.tensor([-1.0, 0.0]), torch.tensor([1.0, 2.0])
    inside = torch.zeros(2, dtype=torch.int8)
    assert margin_loss(torch.tensor([0.5, 1.0]), inside, lo, hi).abs().sum() == 0
    assert margin_loss(torch.tensor([-1.0, 2.0]), inside, lo, hi).abs().sum() == 0  # the edges count as inside
    torch.testing.assert_close(margin_loss(torch.tensor([1.5, -0.5]), inside, lo, hi), torch.tensor([0.5, 0.5]))
    torch.testing.assert_close(margin_loss(torch.tensor([3.0, 3.0]), inside, lo, hi), torch.tensor([2.0, 1.0]))
    above, below = torch.ones(2, dtype=torch.int8), -torch.ones(2, dtype=torch.int8)
    torch.testing.assert_close(margin_loss(torch.tensor([2.0, 1.0]), above, lo, hi), torch.tensor([0.0, 1.0]))
    torch.testing.assert_close(margin_loss(torch.tensor([-2.0, 0.5]), below, lo, hi), torch.tensor([0.0, 0.5]))


def test_gere_thresholds_come_from_the_base_model_once(tmp_path):
    model, tok = tiny_model("llama", seed=0)
    method = GeRe(GereOptions(max_samples=24, rate=0.5))
    method.setup(model)
    tasks = make_tasks(2)
    # the band computed independently from an untouched copy of the base model
    reference, _ = tiny_model("llama", seed=0)
    hidden = []
    with torch.no_grad():
        for text in read_general_texts(DEFAULT_GENERAL_FILE, 24):
            ids = tok(text)["input_ids"][:63] + [tok.eos_token_id]
            hidden.append(reference(input_ids=torch.tensor([ids]), output_hidden_states=True).hidden_states[-1][0])
    tokens = torch.cat(hidden)
    mu, sigma = tokens.mean(0), tokens.std(0, unbiased=False)
    train_phase(method, model, tok, 0, tasks[:1], tasks, lr=1e-2)
    torch.testing.assert_close(method.lo, mu - sigma, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(method.hi, mu + sigma, atol=1e-5, rtol=1e-5)
    lo, hi = method.lo.clone(), method.hi.clone()
    train_phase(method, model, tok, 1, tasks[1:], tasks, lr=1e-2)  # the model has changed: no recomputation
    assert torch.equal(method.lo, lo) and torch.equal(method.hi, hi)
    resumed = GeRe(GereOptions(max_samples=24))
    resumed.load_state_dict(method.state_dict())
    resumed.before_task(2, tasks[1:], context(model, tok, tasks))
    assert torch.equal(resumed.lo, lo) and all(torch.equal(a, b) for a, b in zip(resumed.states, method.states))


def lm_nll(model, items):
    """Hand computation: token-mean next-token NLL pooled over `items` (each run alone, no padding)."""
    total, count = 0.0, 0
    for item in items:
        logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]
        total += torch.nn.functional.cross_entropy(logits, torch.tensor(item["input_ids"][1:]), reduction="sum")
        count += len(item["input_ids"]) - 1
    return total / count


def answer_mean(model, items):
    """Hand computation: token-mean answer NLL of task items (each run alone)."""
    total, count = 0.0, 0
    for item in items:
        logits = model(input_ids=torch.tensor([item["input_ids"]])).logits[0, :-1]
        labels = torch.tensor(item["labels"][1:])
        total += torch.nn.functional.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
        count += int((labels != IGNORE_INDEX).sum())
    return total / count


def test_gere_averages_task_and_general_lm_losses_one_to_one():
    model, tok = tiny_model("llama", seed=0)
    method = GeRe(GereOptions(max_samples=16, rate=0.5))
    tasks = make_tasks(1)
    ctx = context(model, tok, tasks)
    method.before_task(0, tasks, ctx)
    items = ctx.encode(tasks[0].train)[:4]
    mixed = method.mix_batch(items, 1)
    general = mixed[4:]
    assert len(mixed) == 8 and all(item in method.items for item in general)
    assert all(set(item["labels"]) == {IGNORE_INDEX} for item in general)  # the loop's loss is the task's alone
    batch = collate(mixed, tok.pad_token_id)
    outputs = model(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
    with torch.no_grad():
        l_task, l_general = answer_mean(model, items), lm_nll(model, general)
    # on the base model every activation is in its base state: margin 0, extra = (L_general - L_task) / 2
    extra = method.extra_loss(model, batch, outputs)
    assert extra.item() == pytest.approx(0.5 * (l_general - l_task).item(), rel=1e-4)
    # through the loop's step loss: L_task + extra = (L_task + L_general) / 2
    nll, extra_sum = step_loss(model, [batch], method, True)
    assert nll == pytest.approx(l_task.item(), rel=1e-4)
    assert nll + extra_sum == pytest.approx(0.5 * (l_task + l_general).item(), rel=1e-4)
    assert method.extra_loss(model, collate(items, tok.pad_token_id), outputs) is None  # no general row


def test_gere_margin_is_the_mean_of_its_nonzero_hinge_terms():
    model, tok = tiny_model("llama", seed=0)
    tasks = make_tasks(1)
    ctx = context(model, tok, tasks)
    values = {}
    for weight in (0.0, 1.0):
        method = GeRe(GereOptions(max_samples=16, rate=0.5, tm_weight=weight))
        method.before_task(0, tasks, ctx)  # the band from the untouched base model
        torch.manual_seed(1)
        moved, _ = tiny_model("llama", seed=0)
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(0.05 * torch.randn_like(p))  # a trained model: some activations leave their state
        mixed = method.mix_batch(ctx.encode(tasks[0].train)[:4], 1)
        batch = collate(mixed, tok.pad_token_id)
        outputs = moved(**{k: batch[k] for k in ("input_ids", "attention_mask")}, output_hidden_states=True)
        values[weight] = method.extra_loss(moved, batch, outputs).item()
        hinge = []
        for r, item in enumerate(mixed[4:], start=4):
            j = method.index[tuple(item["input_ids"])]
            h = outputs.hidden_states[-1][r, :len(item["input_ids"])]
            hinge.append(margin_loss(h, method.states[j], method.lo, method.hi).flatten())
        hinge = torch.cat(hinge)
        nonzero = int((hinge != 0).sum())
        assert 0 < nonzero < hinge.numel()
    margin = values[1.0] - values[0.0]
    assert margin == pytest.approx((hinge.sum() / nonzero).item(), rel=1e-4)
    assert margin > hinge.mean().item()  # larger than the plain mean migu used before issue 14


def test_general_samples_file_is_packaged_and_checked(tmp_path):
    texts = read_general_texts(DEFAULT_GENERAL_FILE)
    assert len(texts) >= 200 and len(set(texts)) == len(texts)
    assert not any("Answer:" in t or "Option:" in t for t in texts)  # not task-formatted data
    assert "assets/*" in (REPO / "pyproject.toml").read_text()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine"}\n{"txt": "oops"}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl: line 2: expected a JSON object with a string field 'text'"):
        read_general_texts(bad)


# ------------------------------------------------------------------------------------------ ewc
def test_ewc_penalty_is_zero_at_the_anchor_and_quadratic():
    model, tok = tiny_model("llama", seed=0)
    method = EWC(EwcOptions(lam=3.0))
    method.setup(model)
    names = [n for n, _ in model.named_parameters()]
    method.fisher = {n: torch.rand_like(p) for n, p in model.named_parameters()}
    method.before_task(1, [], context(model, tok, []))
    assert method.penalty().item() == 0.0
    direction = {n: torch.randn_like(p) for n, p in model.named_parameters()}

    def moved(scale):
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(method.anchor[n] + scale * direction[n])
        return method.penalty().item()

    one, two = moved(1e-2), moved(2e-2)
    assert one > 0 and two == pytest.approx(4 * one, rel=1e-4)
    hand = 1.5 * sum((method.fisher[n] * (2e-2 * direction[n]) ** 2).sum().item() for n in names)
    assert two == pytest.approx(hand, rel=1e-4)


def squared_grads(model, items, tok):
    """Hand computation: {name: squared gradient} of the answer NLL of `items` as one batch."""
    answer_nll(model, collate(items, tok.pad_token_id)).backward()
    out = {n: p.grad.pow(2) for n, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return out


def test_ewc_fisher_is_the_mean_per_example_squared_gradient_accumulated_over_tasks():
    model, tok = tiny_model("llama", seed=0)
    method = EWC(EwcOptions(fisher_samples=8, gamma=0.5))
    method.setup(model)
    tasks = make_tasks(2)
    items = encode(tok, tasks[0].train, 64)
    per_example = [squared_grads(model, [item], tok) for item in items]
    expected = {n: sum(g[n] for g in per_example) / len(items) for n in per_example[0]}
    method.after_task(0, tasks[:1], context(model, tok, tasks))
    for n, f in method.fisher.items():
        torch.testing.assert_close(f, expected[n], rtol=1e-4, atol=1e-12)
    assert all(p.grad is None for p in model.parameters())
    # not the square of the batch-mean gradient (the rule before issue 14), which is smaller (1.57x here, on a
    # random model whose per-example gradients agree; about batch-size times near an optimum)
    batch_mean = squared_grads(model, items, tok)
    assert sum(f.sum() for f in method.fisher.values()) > 1.3 * sum(f.sum() for f in batch_mean.values())
    first = {n: f.clone() for n, f in method.fisher.items()}
    method.after_task(0, tasks[:1], context(model, tok, tasks))  # same data: F = 0.5 F + F
    for n, f in method.fisher.items():
        torch.testing.assert_close(f, 1.5 * first[n])


def test_ewc_fisher_of_identical_examples_equals_the_old_batch_rule_and_samples_without_replacement():
    model, tok = tiny_model("llama", seed=0)
    item = encode(tok, make_tasks(1)[0].train[:1], 64)[0]
    method = EWC(EwcOptions(fisher_samples=3))
    fisher = method.estimate_fisher(model, [item] * 4, tok.pad_token_id, random.Random(0))
    old = squared_grads(model, [item] * 4, tok)  # equal per-example gradients: mean of squares = square of mean
    for n, f in fisher.items():
        torch.testing.assert_close(f, old[n], rtol=1e-4, atol=1e-12)
    items = encode(tok, make_tasks(1)[0].train, 64)
    chosen = random.Random(5).sample(items, 3)
    expected = [squared_grads(model, [x], tok) for x in chosen]
    fisher = method.estimate_fisher(model, items, tok.pad_token_id, random.Random(5))
    for n, f in fisher.items():
        torch.testing.assert_close(f, sum(g[n] for g in expected) / 3, rtol=1e-4, atol=1e-12)


# ------------------------------------------------------------------------------------------ mtl
def test_mtl_trains_one_phase_and_the_matrix_has_one_row(model_dir, stream, tmp_path):
    summary = migu.train.run(tiny_run_config(model_dir, stream, tmp_path / "mtl", **{"method.name": "mtl"}),
                             quiet=True)
    assert summary["row_names"] == ["all"] and len(summary["matrix"]) == 1 and len(summary["matrix"][0]) == 2
    steps = [json.loads(line) for line in (tmp_path / "mtl" / "metrics.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in steps if r["type"] == "train"} == {0}
    assert len([r for r in steps if r["type"] == "train"]) == 4  # 16 items of both tasks, batch 4


# ------------------------------------------------------------------------------------------ the shared contract
class Interrupt(Exception):
    pass


# the hooks the loop calls, as letters of the recorded call sequence
HOOKS = {"eval_context": "E", "before_task": "B", "trainable_parameters": "T", "train_items": "I",
         "mix_batch": "M", "extra_loss": "X", "after_step": "A", "after_task": "F"}


@pytest.mark.parametrize("migu_on", [False, True], ids=["no-migu", "migu"])
@pytest.mark.parametrize("name", sorted(METHODS))
def test_method_contract(name, migu_on, model_dir, stream, tmp_path, monkeypatch):
    """Through the real loop: the hooks in the documented order, finite losses, only declared parameters
    train, resume repeats the run."""
    cls = METHODS[name]
    loaded, declared, calls = [], set(), []
    for hook, letter in HOOKS.items():  # record every hook call the loop makes, in order
        def recorded(self, *args, _real=getattr(cls, hook), _letter=letter, **kwargs):
            calls.append(_letter)
            return _real(self, *args, **kwargs)

        monkeypatch.setattr(cls, hook, recorded)
    real_load, real_trainable, real_before = migu.train.load_model_and_tokenizer, cls.trainable_parameters, \
        cls.before_task

    def load(path):
        model, tok = real_load(path)
        loaded.append({id(p): p.detach().clone() for p in model.parameters()})
        loaded.append(model)
        return model, tok

    def trainable(self, model):
        params = real_trainable(self, model)
        declared.update(id(p) for p in params)
        return params

    monkeypatch.setattr(migu.train, "load_model_and_tokenizer", load)
    monkeypatch.setattr(cls, "trainable_parameters", trainable)
    # first_task mask: every phase masked, so a single-phase method (mtl) is checked with MIGU too
    sets = {"method.name": name, "migu.enabled": migu_on, "migu.threshold": 0.5, "migu.first_task": "mask"}
    summary = migu.train.run(tiny_run_config(model_dir, stream, tmp_path / "full", **sets), quiet=True)
    records = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    train = [r for r in records if r["type"] == "train"]
    # untrained evaluation, then per phase: before_task, trainable_parameters, train_items, per step mix_batch →
    # extra_loss (forward) → after_step, then after_task and the evaluation; one train record per step
    phases = re.fullmatch(r"E((?:BTI(?:MXA)+FE)+)", "".join(calls))
    assert phases, "".join(calls)
    steps = [len(p) for p in re.findall(r"(?:MXA)+", phases.group(1))]
    assert [n // 3 for n in steps] == [len([r for r in train if r["stage"] == i]) for i in range(len(steps))]
    assert len(steps) == len(summary["row_names"])
    assert train and all(math.isfinite(r["loss"]) and math.isfinite(r.get("extra_loss", 0.0)) for r in train)
    assert len(summary["matrix"]) == len(cls().phases(make_tasks(2))) == len(summary["row_names"])
    if migu_on:
        assert all(0 < r["migu_kept"] < 1 for r in train)
    original, model = loaded[0], loaded[1]
    base = {id(p): p for p in model.parameters() if id(p) in original}
    frozen = [i for i in base if i not in declared]
    assert all(torch.equal(base[i], original[i]) for i in frozen)  # never declared: bit-identical
    assert any(not torch.equal(p, original[i]) for i, p in base.items()) == bool(set(base) & declared)

    # resume: stop before the second phase, continue; the same weights, method state and matrix
    def before(self, index, tasks, ctx):
        if index == 1 and interrupt:
            raise Interrupt
        return real_before(self, index, tasks, ctx)

    interrupt = True
    monkeypatch.setattr(cls, "before_task", before)
    cfg = tiny_run_config(model_dir, stream, tmp_path / "resumed", **sets)
    if len(summary["matrix"]) > 1:
        with pytest.raises(Interrupt):
            migu.train.run(cfg, quiet=True)
        interrupt = False
        resumed = migu.train.run(cfg, resume=True, output_dir=str(tmp_path / "resumed"), quiet=True)
    else:
        resumed = migu.train.run(cfg, quiet=True)
    assert resumed["matrix"] == summary["matrix"]
    full = load_file(str(tmp_path / "full" / "checkpoints" / "last" / "params.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "checkpoints" / "last" / "params.safetensors"))
    assert full.keys() == again.keys() and all(torch.equal(full[k], again[k]) for k in full)
