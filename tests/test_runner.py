"""The one loop on tiny random models: loss normalisation, run directory, determinism, resume, LoRA, MIGU."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from migu.data import IGNORE_INDEX, Example, collate, encode
from migu.models import tiny_model
from migu.train import run, step_loss
from tests.runner_helpers import final_rows, tiny_config, tiny_yaml, train_losses, write_stream

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture
def stream(tmp_path):
    return write_stream(tmp_path / "data")


def _examples(n=8):
    return [Example(f"Q{i}: {'x' * (i % 4)} what?\nAnswer:", "yes" if i % 2 else "no no") for i in range(n)]


# ------------------------------------------------------------------------------------------ the loss
def test_loss_is_answer_only_token_mean(tiny_llama):
    model, tok = tiny_llama
    items = encode(tok, _examples(), 64)
    assert all(lab == IGNORE_INDEX for item in items for lab in item["labels"][:5])  # prompt masked
    batch = collate(items, tok.pad_token_id)
    loss, extra = step_loss(model, [batch])
    assert extra == 0.0
    reference = model(**batch).loss  # HF: mean over labelled (answer) tokens, all positions through the head
    assert loss == pytest.approx(reference.item(), abs=1e-6)
    # changing prompt tokens' labels to anything else than -100 would change it: they are excluded
    n_answer = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert n_answer == sum(len(t) for t in tok([" yes", " no no"] * 4, add_special_tokens=False)["input_ids"]) + 8


def test_gradient_accumulation_equals_one_big_batch(tiny_llama):
    model, tok = tiny_llama
    items = encode(tok, _examples(), 64)

    def grads(groups):
        model.zero_grad(set_to_none=True)
        loss, _ = step_loss(model, [collate([items[i] for i in g], tok.pad_token_id) for g in groups])
        return loss, {n: p.grad.clone() for n, p in model.named_parameters()}

    loss1, g1 = grads([list(range(8))])
    loss4, g4 = grads([[0, 1], [2, 3], [4, 5], [6, 7]])
    assert loss1 == pytest.approx(loss4, abs=1e-6)
    for name in g1:
        torch.testing.assert_close(g4[name], g1[name], rtol=1e-5, atol=1e-6, msg=name)


def test_extra_loss_counts_once_per_step(tiny_llama):
    model, tok = tiny_llama
    items = encode(tok, _examples(), 64)

    class Penalty:
        def extra_loss(self, model, batch, outputs):
            return model.model.norm.weight.sum() * 0 + 2.0

    for groups in ([list(range(8))], [[0, 1, 2], [3, 4, 5, 6, 7]]):
        _, extra = step_loss(model, [collate([items[i] for i in g], tok.pad_token_id) for g in groups], Penalty())
        assert extra == pytest.approx(2.0)


# ------------------------------------------------------------------------------------------ a run
def test_run_writes_the_run_directory(tmp_path, tiny_llama_dir, stream):
    out = tmp_path / "run"
    summary = run(tiny_config(tiny_llama_dir, stream, out), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [".lock", "accuracy_matrix.csv", "checkpoints", "config.yaml", "metrics.jsonl", "state.json", "summary.json"])
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "previous"]
    assert sorted(p.name for p in (out / "checkpoints" / "last").iterdir()) == [
        "meta.json", "method.pt", "params.safetensors"]
    lines = (out / "accuracy_matrix.csv").read_text().splitlines()
    assert lines[0] == "after_task,colors,animals,moods"
    assert [line.split(",")[0] for line in lines[1:]] == ["untrained", "colors", "animals", "moods"]
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "done" and state["finished_tasks"] == 3 and len(state["rows"]) == 3
    assert state["tasks"] == ["colors", "animals", "moods"] and len(state["r0"]) == 3
    records = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert len([r for r in records if r["type"] == "train"]) == 3 * 3  # 12 examples / batch 4, per task
    evals = [r for r in records if r["type"] == "eval"]
    assert len(evals) == 4 * 3 and {r["after_task"] for r in evals} == {"untrained", "colors", "animals", "moods"}
    for key in ("aa", "bwt", "fwt", "forgetting", "matrix", "r0", "tasks", "method", "migu", "seed",
                "wall_time_s", "versions", "git_commit", "code"):
        assert key in summary
    assert summary == json.loads((out / "summary.json").read_text())
    assert summary["matrix"] == state["rows"] and summary["method"] == "seq-ft" and summary["lr"] == 3e-3
    assert 0 <= summary["aa"] <= 100 and all(0 <= x <= 100 for row in state["rows"] for x in row)
    from migu.config import load_config

    saved = load_config(out / "config.yaml")  # the resolved config reloads, provenance ignored
    assert saved.output_dir == str(out) and saved.data.stream == str(stream.resolve())
    assert "git_commit" in (out / "config.yaml").read_text()


def test_runs_are_deterministic(tmp_path, tiny_llama_dir, stream):
    a, b = tmp_path / "a", tmp_path / "b"
    run(tiny_config(tiny_llama_dir, stream, a), quiet=True)
    run(tiny_config(tiny_llama_dir, stream, b), quiet=True)
    assert final_rows(a) == final_rows(b)
    assert train_losses(a) == train_losses(b) and len(train_losses(a)) == 9
    assert (a / "accuracy_matrix.csv").read_text() == (b / "accuracy_matrix.csv").read_text()
    # a different seed gives different batches
    run(tiny_config(tiny_llama_dir, stream, tmp_path / "c", seed=1), quiet=True)
    assert train_losses(tmp_path / "c") != train_losses(a)


def test_generate_mode_and_grad_accum_run(tmp_path, tiny_llama_dir, stream):
    out = tmp_path / "gen"
    summary = run(tiny_config(tiny_llama_dir, stream, out, **{"eval.mode": "generate", "train.grad_accum": 2,
                                                               "train.batch_size": 2, "train.epochs": 2}), quiet=True)
    assert len(train_losses(out)) == 3 * 2 * 3  # 6 micro-batches → 3 steps per epoch, 2 epochs, 3 tasks
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert all(len(r["samples"]) == 3 and r["n"] == 6 for r in evals)
    # generate mode: a cell is the exact-match rate of the generated answers, and AA the final row's mean
    assert all(r["accuracy"] == pytest.approx(100.0 * r["correct"] / r["n"]) for r in evals)
    final = [r["accuracy"] for r in evals if r["stage"] == 2]
    assert summary["matrix"][-1] == final and summary["aa"] == pytest.approx(sum(final) / 3)


def test_resume_after_exception_matches_uninterrupted(tmp_path, tiny_llama_dir, stream, monkeypatch):
    ref = tmp_path / "ref"
    run(tiny_config(tiny_llama_dir, stream, ref), quiet=True)

    from migu.methods.seq_ft import SeqFT

    calls = {"n": 0}

    def crash(self, step):
        calls["n"] += 1
        if calls["n"] == 5:  # second task, second step
            raise KeyboardInterrupt

    monkeypatch.setattr(SeqFT, "after_step", crash)
    out = tmp_path / "crashed"
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_llama_dir, stream, out), quiet=True)
    assert json.loads((out / "state.json").read_text())["finished_tasks"] == 1
    monkeypatch.undo()
    summary = run(tiny_config(tiny_llama_dir, stream, out), resume=True, quiet=True)
    assert final_rows(out) == final_rows(ref)
    assert train_losses(out) == train_losses(ref)  # the lost steps were dropped and redone identically
    assert summary["matrix"] == final_rows(ref)
    # resuming a finished run changes nothing
    run(tiny_config(tiny_llama_dir, stream, out), resume=True, quiet=True)
    assert train_losses(out) == train_losses(ref)


_KILLER = """
import os, signal, sys
where = sys.argv[1]
if where == "step":  # SIGKILL in the middle of the second task's training
    from migu.methods.seq_ft import SeqFT
    seen = {"n": 0}
    def after_step(self, step):
        seen["n"] += 1
        if seen["n"] == 5:
            os.kill(os.getpid(), signal.SIGKILL)
    SeqFT.after_step = after_step
elif where == "checkpoint":  # SIGKILL inside the second checkpoint write, between its two renames
    real = os.replace
    seen = {"n": 0}
    def replace(src, dst):
        real(src, dst)
        if str(dst).endswith("previous"):
            os.kill(os.getpid(), signal.SIGKILL)
    os.replace = replace
from migu.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("where", ["step", "checkpoint"])
def test_sigkill_then_resume_matches_uninterrupted(tmp_path, tiny_llama_dir, stream, where):
    from migu.cli import main

    ref = tmp_path / "ref"
    assert main(["run", str(tiny_yaml(tmp_path / "ref.yaml", tiny_llama_dir, stream, ref)), "--quiet"]) == 0
    out = tmp_path / "killed"
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    config = tiny_yaml(tmp_path / "killed.yaml", tiny_llama_dir, stream, out)
    env = dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.run([sys.executable, str(script), where, "run", str(config), "--quiet"], env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "running" and state["finished_tasks"] == 1
    if where == "checkpoint":
        assert (out / "checkpoints" / "previous").is_dir() and not (out / "checkpoints" / "last").exists()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    assert final_rows(out) == final_rows(ref)
    assert train_losses(out) == train_losses(ref)
    assert (out / "accuracy_matrix.csv").read_text() == (ref / "accuracy_matrix.csv").read_text()
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "previous"]


def test_existing_run_dir_is_not_overwritten(tmp_path, tiny_llama_dir, stream):
    from migu.rundir import RunDirError

    out = tmp_path / "run"
    out.mkdir()
    (out / "config.yaml").write_text("precious: true\n")
    with pytest.raises(RunDirError, match="already exists; use --resume"):
        run(tiny_config(tiny_llama_dir, stream, out), quiet=True)
    assert (out / "config.yaml").read_text() == "precious: true\n" and len(list(out.iterdir())) == 1
    stranger = tmp_path / "home"
    stranger.mkdir()
    (stranger / "notes.txt").write_text("keep")
    with pytest.raises(RunDirError, match="not a migu run directory"):
        run(tiny_config(tiny_llama_dir, stream, stranger), overwrite=True, quiet=True)
    assert (stranger / "notes.txt").read_text() == "keep"
    run(tiny_config(tiny_llama_dir, stream, out), overwrite=True, quiet=True)  # a run dir may be replaced
    assert json.loads((out / "state.json").read_text())["status"] == "done"


# ------------------------------------------------------------------------------------------ methods
def _loader_keeping(monkeypatch, holder):
    import migu.train

    def load(name):
        model, tok = tiny_model("llama", seed=0)
        holder["model"] = model
        holder["before"] = [(n, p, p.detach().clone()) for n, p in model.named_parameters()]
        return model, tok

    monkeypatch.setattr(migu.train, "load_model_and_tokenizer", load)


def test_seq_lora_trains_only_lora_parameters(tmp_path, tiny_llama_dir, stream, monkeypatch):
    holder = {}
    _loader_keeping(monkeypatch, holder)
    out = tmp_path / "lora"
    summary = run(tiny_config(tiny_llama_dir, stream, out, **{"method.name": "seq-lora", "train.lr": 1e-2}),
                  quiet=True)
    # PEFT wraps the model in place: the base parameters are the same objects, frozen and unchanged
    for name, param, before in holder["before"]:
        assert not param.requires_grad and torch.equal(param, before), f"base weight {name} changed"
    saved = load_file(str(out / "checkpoints" / "last" / "params.safetensors"))
    assert saved and all("lora_" in n for n in saved)
    assert any("q_proj.lora_A" in n for n in saved) and any("v_proj.lora_B" in n for n in saved)
    assert not any("k_proj" in n for n in saved)
    lora_b = [v for n, v in saved.items() if "lora_B" in n]
    assert any(bool(v.abs().sum() > 0) for v in lora_b)  # B starts at zero: it trained
    assert summary["method"] == "seq-lora" and summary["method_options"]["r"] == 8 and summary["lr"] == 1e-2


def _changed_rows(out, name):
    model, _ = tiny_model("llama", seed=0)
    before = dict(model.named_parameters())[name].detach()
    after = load_file(str(out / "checkpoints" / "last" / "params.safetensors"))[name]
    return int((after != before).any(dim=1).sum()), before.shape[0]


def test_migu_in_the_loop_zeroes_gradient_rows(tmp_path, tiny_llama_dir):
    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    one_step = {"data.train_per_task": 4, "train.batch_size": 4, "train.max_grad_norm": None}
    name = "model.layers.0.self_attn.q_proj.weight"  # 32 output units

    plain = tmp_path / "plain"
    run(tiny_config(tiny_llama_dir, stream, plain, **one_step), quiet=True)
    assert _changed_rows(plain, name) == (32, 32)

    masked = tmp_path / "masked"
    run(tiny_config(tiny_llama_dir, stream, masked, **one_step, **{"migu.enabled": True, "migu.threshold": 0.9,
                                                                     "migu.first_task": "mask"}), quiet=True)
    assert _changed_rows(masked, name) == (4, 32)  # ceil(0.1 * 32) rows kept; AdamW leaves zero-grad rows
    assert _changed_rows(masked, "model.layers.1.mlp.down_proj.weight") == (4, 32)
    record = [json.loads(x) for x in (masked / "metrics.jsonl").read_text().splitlines() if '"train"' in x][0]
    assert 0.1 <= record["migu_kept"] < 0.2
    assert json.loads((masked / "summary.json").read_text())["migu"]["enabled"] is True


def test_compare_migu_runs_both_and_shares_r0(tmp_path, tiny_llama_dir):
    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"], "moods": ["happy", "sad"]})
    out = tmp_path / "cmp"
    result = run(tiny_config(tiny_llama_dir, stream, out, compare_migu=True), quiet=True)
    assert sorted(p.name for p in out.iterdir()) == [".lock", "comparison.json", "config.yaml", "migu", "no-migu"]
    no, yes = result["runs"]["no-migu"], result["runs"]["migu"]
    assert no["migu"]["enabled"] is False and yes["migu"]["enabled"] is True
    assert no["r0"] == yes["r0"]
    shared = [json.loads(x) for x in (out / "migu" / "metrics.jsonl").read_text().splitlines() if '"untrained"' in x]
    assert len(shared) == 2 and all(r.get("shared") for r in shared)
    assert train_losses(out / "no-migu") != train_losses(out / "migu")
    from migu.compare import format_comparison

    text = format_comparison(result)
    assert "no MIGU" in text and "MIGU (T=0.7" in text and "aa" in text


def _records(run_dir, text):
    return [json.loads(x) for x in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if text in x]


def test_compare_migu_shares_the_first_task_and_equals_the_runs_made_alone(tmp_path, tiny_llama_dir, stream):
    # first_task skip: the MIGU run starts from a copy of the run without MIGU after task 1, and ends exactly
    # where a MIGU run made alone ends (matrix, losses), training 2 of its 3 tasks
    out = tmp_path / "cmp"
    result = run(tiny_config(tiny_llama_dir, stream, out, compare_migu=True), quiet=True)
    alone = run(tiny_config(tiny_llama_dir, stream, tmp_path / "alone", **{"migu.enabled": True}), quiet=True)
    yes = result["runs"]["migu"]
    assert yes["matrix"] == alone["matrix"] and yes["r0"] == alone["r0"] and yes["aa"] == alone["aa"]
    assert train_losses(out / "migu") == train_losses(tmp_path / "alone")
    assert train_losses(out / "migu")[:3] == train_losses(out / "no-migu")[:3]  # task 1: 3 steps, shared
    assert _records(out / "migu", '"type": "shared') == [{"type": "shared", "stage": 0, "from": "no-migu", "phases": 1}]
    copied = [r for r in _records(out / "migu", "stage") if r.get("shared")]
    assert {(r["type"], r["stage"]) for r in copied} == {("eval", -1), ("train", 0), ("eval", 0)}
    assert [r.get("migu_kept") is None for r in _records(out / "migu", '"type": "train"')] == [True] * 3 + [False] * 6
    cfg = (out / "migu" / "config.yaml").read_text()
    assert "enabled: true" in cfg and str(out / "migu") in cfg and str(out / "no-migu") not in cfg
    assert sorted(p.name for p in out.iterdir()) == [".lock", "comparison.json", "config.yaml", "migu", "no-migu"]


def test_compare_migu_masking_the_first_task_trains_it_twice(tmp_path, tiny_llama_dir, stream):
    out = tmp_path / "cmp"
    result = run(tiny_config(tiny_llama_dir, stream, out, compare_migu=True, **{"migu.first_task": "mask"}),
                 quiet=True)
    train = _records(out / "migu", '"type": "train"')
    assert _records(out / "migu", '"type": "shared') == [] and not any(r.get("shared") for r in train)
    assert all(r.get("migu_kept") is not None for r in train)
    assert train_losses(out / "migu")[:3] != train_losses(out / "no-migu")[:3]
    assert result["runs"]["migu"]["migu"]["first_task"] == "mask"


def test_a_fork_cut_by_a_kill_is_removed_and_the_migu_run_trains_whole(tmp_path, tiny_llama_dir, stream, monkeypatch):
    from migu.rundir import RunDir

    out = tmp_path / "cmp"
    monkeypatch.setattr(RunDir, "fork", lambda self, dest, config, note: (
        RunDir.fork_temporary(dest).mkdir(parents=True), (RunDir.fork_temporary(dest) / "config.yaml").write_text(
            config), False)[-1])  # the kill before the rename
    run(tiny_config(tiny_llama_dir, stream, out, compare_migu=True), quiet=True)
    assert (out / ".migu.fork").is_dir()
    monkeypatch.undo()
    (out / "comparison.json").unlink()
    result = run(tiny_config(tiny_llama_dir, stream, out, compare_migu=True), resume=True, quiet=True)
    assert not (out / ".migu.fork").exists() and result["runs"]["migu"]["aa"] is not None


def test_diagonal_eval_matrix_evaluates_only_the_cells_bwt_and_fwt_need(tmp_path, tiny_llama_dir, stream):
    full = run(tiny_config(tiny_llama_dir, stream, tmp_path / "full"), quiet=True)
    out = tmp_path / "diag"
    diag = run(tiny_config(tiny_llama_dir, stream, out, **{"eval.matrix": "diagonal"}), quiet=True)
    F, D = full["matrix"], diag["matrix"]
    # after task 0: tasks 0 and 1; after task 1: tasks 1 and 2; after the last: every task
    assert [[x is not None for x in row] for row in D] == [[True, True, False], [False, True, True], [True] * 3]
    # evaluation does not touch training: each evaluated cell equals the full run's
    assert all(D[i][j] == F[i][j] for i in range(3) for j in range(3) if D[i][j] is not None)
    assert train_losses(out) == train_losses(tmp_path / "full") and diag["r0"] == full["r0"]
    for key in ("aa", "bwt", "fwt"):
        assert diag[key] == pytest.approx(full[key])
    assert diag["forgetting"] is None  # it needs R[1][0], which was not evaluated
    evals = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines() if '"eval"' in x]
    assert [(r["stage"], r["task"]) for r in evals if r["stage"] >= 0] == [
        (0, "colors"), (0, "animals"), (1, "animals"), (1, "moods"), (2, "colors"), (2, "animals"), (2, "moods")]
    lines = (out / "accuracy_matrix.csv").read_text().splitlines()
    assert lines[2].endswith(",") and lines[3].split(",")[1] == ""  # not evaluated: empty cells


def test_diagonal_eval_matrix_resumes_and_plots(tmp_path, tiny_llama_dir, stream, monkeypatch):
    import migu.train as train_mod

    straight = run(tiny_config(tiny_llama_dir, stream, tmp_path / "a", **{"eval.matrix": "diagonal"}), quiet=True)
    real = train_mod._Run._train_phase

    def crash_on_third(self, index, *a, **k):
        if index == 2:
            raise KeyboardInterrupt
        return real(self, index, *a, **k)

    monkeypatch.setattr(train_mod._Run, "_train_phase", crash_on_third)
    cfg = tiny_config(tiny_llama_dir, stream, tmp_path / "b", **{"eval.matrix": "diagonal"})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, quiet=True)
    assert json.loads((tmp_path / "b" / "state.json").read_text())["rows"] == straight["matrix"][:2]
    monkeypatch.setattr(train_mod._Run, "_train_phase", real)
    from migu.config import load_config

    resumed = run(load_config(tmp_path / "b" / "config.yaml"), resume=True, quiet=True)
    assert resumed["matrix"] == straight["matrix"] and resumed["bwt"] == straight["bwt"]
    from migu.report.plots import write_run_plots

    assert all(p.stat().st_size > 0 for p in write_run_plots(tmp_path / "b"))


# ------------------------------------------------------------------------------------------ MIGU options (issue 14)
def test_first_task_skip_trains_phase_0_like_the_base_run(tmp_path, tiny_llama_dir, stream):
    base, skip, mask = tmp_path / "base", tmp_path / "skip", tmp_path / "mask"
    run(tiny_config(tiny_llama_dir, stream, base), quiet=True)
    summary = run(tiny_config(tiny_llama_dir, stream, skip, **{"migu.enabled": True}), quiet=True)
    run(tiny_config(tiny_llama_dir, stream, mask, **{"migu.enabled": True, "migu.first_task": "mask"}), quiet=True)

    def stage(path, i):
        return [x for x in train_losses(path) if x[0] == i]

    assert stage(skip, 0) == stage(base, 0)  # bit-identical losses ...
    assert final_rows(skip)[0] == final_rows(base)[0]  # ... and R[0]
    assert stage(skip, 1) != stage(base, 1)  # later phases are masked
    assert stage(mask, 0)[1:] != stage(base, 0)[1:]  # `mask`: phase 0 is masked from its second step on
    records = [json.loads(x) for x in (skip / "metrics.jsonl").read_text().splitlines() if '"train"' in x]
    assert [("migu_kept" in r) for r in records] == [False] * 3 + [True] * 6
    assert summary["migu"] == {"enabled": True, "threshold": 0.7, "mode": "grad", "target_modules": None,
                               "first_task": "skip", "include_lm_head": False, "lora_b": "layer", "tokens": "all"}
    assert "first_task: skip" in (skip / "config.yaml").read_text()


def _captured_counts(monkeypatch):
    """Per optimizer step: {unit name: token count} MIGU accumulated, read just before masking."""
    from migu.core import MIGU

    seen = []
    real = MIGU.mask_gradients

    def spy(self):
        seen.append({u.name: float(u.count) for u in self.units})
        return real(self)

    monkeypatch.setattr(MIGU, "mask_gradients", spy)
    return seen


@pytest.mark.parametrize("tokens", ["all", "answer"])
def test_migu_tokens_and_lm_head_count_the_hand_computed_positions(tmp_path, tiny_llama_dir, stream, monkeypatch,
                                                                  tokens):
    seen = _captured_counts(monkeypatch)
    out = tmp_path / tokens
    run(tiny_config(tiny_llama_dir, stream, out, **{"migu.enabled": True, "migu.first_task": "mask",
                                                    "migu.tokens": tokens, "migu.include_lm_head": True,
                                                    "train.group_by_length": False}), quiet=True)
    # hand computation from the encoded items of each step (same seeded plan as the runner)
    from migu.config import load_config
    from migu.models import load_model_and_tokenizer
    from migu.scenarios import get_scenario
    from migu.steps import phase_seed, plan_steps

    cfg = load_config(out / "config.yaml")
    _, tok = load_model_and_tokenizer(cfg.model.name)
    scenario = get_scenario(cfg)
    tasks = scenario.load_tasks()
    scenario.prepare(tok)
    expected = []
    for index, task in enumerate(tasks):
        items = scenario.encode(tok, task.train)
        for step in plan_steps(items, cfg.train, phase_seed(cfg.seed, index), 0):
            rows = [items[i] for mb in step for i in mb]
            answer = sum(sum(1 for lab in it["labels"][1:] if lab != IGNORE_INDEX) for it in rows)
            real = sum(len(it["input_ids"]) for it in rows)
            expected.append((answer if tokens == "answer" else real, answer))
    assert len(seen) == len(expected) == 9
    for counts, (block, answer) in zip(seen, expected):
        assert counts["model.layers.0.self_attn.q_proj"] == block
        if tokens == "answer":  # the head sees only kept positions: exactly the answer-predicting ones
            assert counts["lm_head"] == answer
        else:  # every real token at a kept position (kept in some row of the micro-batch)
            assert answer <= counts["lm_head"] <= block
