"""Reliability (issue 20): one writer per run directory, step checkpoints inside a task, SIGTERM/SIGINT,
kill -9, a file-size limit hit while writing a checkpoint, damaged checkpoints — on the tiny random model.

Every interrupted run is resumed and compared with an uninterrupted run of the same config: the same
per-step losses (bit for bit) and the same accuracy (or perplexity) matrix.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from migu.cli import main
from migu.config import ConfigError
from migu.rundir import RunDir, RunDirError
from migu.runlock import RunLock
from migu.train import run
from tests.runner_helpers import tiny_config, tiny_yaml, train_losses, write_stream

REPO = Path(__file__).resolve().parent.parent
# 20 examples / batch 4 = 5 steps per task, a step checkpoint every 2: steps 2 and 4 of each task
STEPS = {"data.train_per_task": 20, "train.save_every_steps": 2}


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return write_stream(tmp_path_factory.mktemp("data"))


@pytest.fixture(scope="module")
def ref(tmp_path_factory, tiny_llama_dir, stream):
    """The uninterrupted seq-ft run (step checkpoints on: they must not change the training)."""
    out = tmp_path_factory.mktemp("ref") / "run"
    run(tiny_config(tiny_llama_dir, stream, out, **STEPS), quiet=True)
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
                OMP_NUM_THREADS="1")


def _assert_same(out: Path, ref: Path, matrix: str = "accuracy_matrix.csv") -> None:
    assert train_losses(out) == train_losses(ref)  # every step once, the same loss bit for bit
    assert (out / matrix).read_text() == (ref / matrix).read_text()
    assert json.loads((out / "state.json").read_text())["status"] == "done"


def _lines(err: str) -> list[str]:
    """stderr without the model loader's progress bars (transformers prints them even with --quiet)."""
    return [x for x in err.strip().splitlines() if x.strip() and "Loading weights" not in x]


def _at_step(monkeypatch, stage: int, step: int, action) -> None:
    """Run `action()` at the end of optimizer step `step` of phase `stage`, before the step-checkpoint hook."""
    import migu.train

    real = migu.train._Run._after_step

    def after_step(self, index, name, epoch, s, *args):
        if (index, s) == (stage, step):
            action()
        return real(self, index, name, epoch, s, *args)

    monkeypatch.setattr(migu.train._Run, "_after_step", after_step)


# ------------------------------------------------------------------------------------------ one writer
def test_the_lock_names_its_holder_and_dies_with_its_process(tmp_path):
    first = RunLock(tmp_path)
    first.acquire()
    with pytest.raises(RunDirError, match=rf"{tmp_path} is in use by another migu process \(pid {os.getpid()} on "):
        RunLock(tmp_path).acquire()  # a second descriptor, even in the same process, is refused
    first.release()
    RunLock(tmp_path).acquire()  # released: free again (and this one is dropped with its descriptor)

    other = tmp_path / "other"
    other.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from migu.runlock import RunLock; "
                               f"RunLock({str(other)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              env=_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirError, match=f"pid {holder.pid} "):
        RunLock(other).acquire()
    holder.kill()  # kill -9: the OS drops the lock, nothing to clean up by hand
    holder.wait()
    lock = RunLock(other)
    lock.acquire()
    lock.release()


_PAUSER = """
import sys, time
from pathlib import Path
import migu.train
real, go = migu.train._Run._after_step, Path(sys.argv[1])
def after_step(self, index, name, epoch, step, *args):
    if (index, step) == (1, 1):
        go.with_suffix(".waiting").write_text("x")
        while not go.exists():
            time.sleep(0.05)
    return real(self, index, name, epoch, step, *args)
migu.train._Run._after_step = after_step
from migu.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_a_second_writer_is_refused_and_the_first_runs_undisturbed(tmp_path, tiny_llama_dir, stream, ref, capsys):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)
    script, go = tmp_path / "pauser.py", tmp_path / "go"
    script.write_text(_PAUSER)
    first = subprocess.Popen([sys.executable, str(script), str(go), "run", str(config), "--quiet"], env=_env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 120
        while not go.with_suffix(".waiting").exists():  # the first run is inside its second task
            assert first.poll() is None and time.time() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.1)
        before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
        capsys.readouterr()
        for argv in (["run", str(config)], ["run", str(config), "--overwrite"], ["run", "--resume", str(out)]):
            assert main(argv + ["--quiet"]) == 2
            err = _lines(capsys.readouterr().err)
            assert len(err) == 1 and f"{out} is in use by another migu process (pid {first.pid} " in err[0], err
        assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before  # the refused changed nothing
    finally:
        go.write_text("go")
        first.wait(timeout=300)
    assert first.returncode == 0, first.stderr[-2000:] if isinstance(first.stderr, str) else first.stderr.read()
    _assert_same(out, ref)  # 15 train records, not two runs interleaved
    assert main(["run", str(config), "--overwrite", "--quiet"]) == 0  # once it has ended, it may be replaced
    _assert_same(out, ref)


# ------------------------------------------------------------------------------------------ preemption
def test_sigterm_mid_task_checkpoints_and_resume_matches(tmp_path, tiny_llama_dir, stream, ref, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)
    _at_step(monkeypatch, 1, 3, lambda: os.kill(os.getpid(), signal.SIGTERM))  # between step checkpoints 2 and 4
    assert main(["run", str(config), "--quiet"]) == 128 + signal.SIGTERM
    err = _lines(capsys.readouterr().err)
    assert err == [f"interrupted by SIGTERM after step 3/5 of task 2/3 (animals); checkpoint written; "
                   f"continue with: migu run --resume {out}"]
    state = json.loads((out / "state.json").read_text())
    assert state["status"] == "interrupted" and state["finished_tasks"] == 1
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"] == {"phase": 1, "epoch": 0, "step": 3, "losses": [x[2] for x in train_losses(ref)[5:8]]}
    assert set(meta["files"]) == {"params.safetensors", "method.pt", "training.pt"}
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # the handlers are put back
    monkeypatch.undo()
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _assert_same(out, ref)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["last", "previous"]  # older ones pruned


def test_a_second_signal_stops_at_once(tmp_path, tiny_llama_dir, stream, monkeypatch, capsys):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)

    def twice():
        os.kill(os.getpid(), signal.SIGINT)
        os.kill(os.getpid(), signal.SIGINT)

    _at_step(monkeypatch, 0, 1, twice)
    assert main(["run", str(config), "--quiet"]) == 130
    assert "continue with: migu run --resume" in capsys.readouterr().err
    assert json.loads((out / "state.json").read_text())["status"] == "running"
    assert not (out / "checkpoints").exists()  # stopped before writing anything more


_KILLER = """
import os, signal, sys
import migu.train
real = migu.train._Run._after_step
def after_step(self, index, name, epoch, step, *args):
    real(self, index, name, epoch, step, *args)
    if (index, step) == (1, 3):
        os.kill(os.getpid(), signal.SIGKILL)
migu.train._Run._after_step = after_step
from migu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_kill_9_between_step_checkpoints_then_resume_matches(tmp_path, tiny_llama_dir, stream, ref):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)
    script = tmp_path / "killer.py"
    script.write_text(_KILLER)
    proc = subprocess.run([sys.executable, str(script), "run", str(config), "--quiet"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert json.loads((out / "checkpoints" / "last" / "meta.json").read_text())["step"]["step"] == 2
    assert len(train_losses(out)) == 5 + 3  # step 3 of task 2 is logged but not in a checkpoint: dropped on resume
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _assert_same(out, ref)


@pytest.mark.parametrize("method, extra", [
    ("i-lora", {"train.lr": 1e-2}),  # LoRA dropout (torch RNG), replay sampling (method RNG), EMA step count
    ("replay", {"method.replay.mix": "batch", "method.replay.buffer_size": 4}),  # per-batch reservoir sampling
    ("replay", {"method.replay.ratio": 0.25}),  # the paper's form: stored items appended to the task's data
    ("ewc", {"method.ewc.lam": 1000.0}),  # the anchor must survive a mid-task resume
])
def test_methods_resume_mid_task_exactly(tmp_path, tiny_llama_dir, stream, monkeypatch, method, extra):
    settings = {**STEPS, "method.name": method, **extra}
    want = tmp_path / "ref"
    run(tiny_config(tiny_llama_dir, stream, want, **settings), quiet=True)
    out = tmp_path / "run"

    def crash():
        raise KeyboardInterrupt  # a crash between the step checkpoints 2 and 4 of the third task

    _at_step(monkeypatch, 2, 3, crash)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_config(tiny_llama_dir, stream, out, **settings), quiet=True)
    monkeypatch.undo()
    run(tiny_config(tiny_llama_dir, stream, out, **settings), resume=True, quiet=True)
    _assert_same(out, want)


def test_pretrain_sigterm_mid_task_then_resume_matches(tmp_path, tiny_llama_dir, monkeypatch):
    from tests.test_pretrain import _corpora, _pretrain_config

    paths = _corpora(tmp_path / "corpora")
    extra = ("train.save_every_steps=1", "pretrain.train_blocks_per_domain=12")  # 3 steps per domain
    want = tmp_path / "ref"
    run(_pretrain_config(tiny_llama_dir, paths, want, *extra), quiet=True)
    out = tmp_path / "run"
    _at_step(monkeypatch, 1, 2, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(Exception, match="interrupted by SIGTERM after step 2/3 of task 2/3"):
        run(_pretrain_config(tiny_llama_dir, paths, out, *extra), quiet=True)
    monkeypatch.undo()
    run(_pretrain_config(tiny_llama_dir, paths, out, *extra), resume=True, quiet=True)
    _assert_same(out, want, "perplexity_matrix.csv")


# ------------------------------------------------------------------------------------------ disks and damage
_LIMITER = """
import resource, sys
from migu.rundir import RunDir
real, calls = RunDir.save_checkpoint, {"n": 0}
def save_checkpoint(self, *args, **kwargs):
    calls["n"] += 1
    if calls["n"] == 3:  # task 1's step checkpoint 2, step checkpoint 4, then task 1's end: files over 1 kB fail
        resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY))
    return real(self, *args, **kwargs)
RunDir.save_checkpoint = save_checkpoint
from migu.cli import main
sys.exit(main(sys.argv[1:]))
"""


def test_a_file_size_limit_during_a_checkpoint_is_one_line_and_keeps_the_previous(tmp_path, tiny_llama_dir, stream,
                                                                                ref):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)
    script = tmp_path / "limiter.py"
    script.write_text(_LIMITER)
    proc = subprocess.run([sys.executable, str(script), "run", str(config), "--quiet"], env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stderr[-2000:]
    err = _lines(proc.stderr)
    assert len(err) == 1 and err[0].startswith(
        f"write error: cannot write {out}/checkpoints/last/params.safetensors: File too large (EFBIG); "
        "the previous checkpoint and summary are intact"), err
    assert not list((out / "checkpoints").glob(".*"))  # the half-written temporary is gone
    ckpt = RunDir(out).load_latest(training=True)  # the previous checkpoint is whole and loads
    assert ckpt.where == out / "checkpoints" / "last" and ckpt.meta["step"]["step"] == 4 and not ckpt.damaged
    assert main(["run", "--resume", str(out), "--quiet"]) == 0
    _assert_same(out, ref)


def test_a_truncated_checkpoint_is_named_and_the_previous_one_used(tmp_path, tiny_llama_dir, stream, ref,
                                                                    monkeypatch, capsys):
    out = tmp_path / "run"
    config = tiny_yaml(tmp_path / "run.yaml", tiny_llama_dir, stream, out, **STEPS)
    _at_step(monkeypatch, 2, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    assert main(["run", str(config), "--quiet"]) == 143  # last: step 1 of task 3; previous: the end of task 2
    monkeypatch.undo()
    params = out / "checkpoints" / "last" / "params.safetensors"
    params.write_bytes(params.read_bytes()[:1000])
    capsys.readouterr()
    assert main(["run", "--resume", str(out)]) == 0
    err = capsys.readouterr().err
    assert f"{params} is damaged (truncated? 1000 bytes, " in err and "resuming from" in err
    _assert_same(out, ref)

    # both damaged: one line naming them, nothing loaded, nothing changed
    broken = tmp_path / "broken"
    assert main(["run", str(tiny_yaml(tmp_path / "b.yaml", tiny_llama_dir, stream, broken)), "--quiet"]) == 0
    state = json.loads((broken / "state.json").read_text())
    state["status"] = "running"
    (broken / "state.json").write_text(json.dumps(state))
    for name in ("last", "previous"):
        (broken / "checkpoints" / name / "params.safetensors").write_bytes(b"\0" * 10)
    before = (broken / "metrics.jsonl").read_text()
    assert main(["run", "--resume", str(broken), "--quiet"]) == 2
    err = _lines(capsys.readouterr().err)
    assert len(err) == 1 and "no intact checkpoint" in err[0], err
    assert "checkpoints/last/params.safetensors is damaged" in err[0]
    assert "checkpoints/previous/params.safetensors is damaged" in err[0]
    assert (broken / "metrics.jsonl").read_text() == before


# ------------------------------------------------------------------------------------------ config
def test_step_checkpoint_options_are_checked(tmp_path, tiny_llama_dir, stream):
    with pytest.raises(ConfigError, match=r"train.save_every_steps=2: needs train.checkpoint=true"):
        tiny_config(tiny_llama_dir, stream, tmp_path, **{"train.save_every_steps": 2, "train.checkpoint": False})
    with pytest.raises(ConfigError, match=r"train.save_every_minutes=-1.0: must be >= 0"):
        tiny_config(tiny_llama_dir, stream, tmp_path, **{"train.save_every_minutes": -1})


def test_save_every_minutes_counts_from_the_last_checkpoint(monkeypatch):
    from migu import preemption

    now = {"t": 1000.0}
    monkeypatch.setattr(preemption.time, "monotonic", lambda: now["t"])
    schedule = preemption.StepSchedule(0, 0.5, preemption.StopSignals())
    now["t"] += 29
    assert schedule.after_step(1) == (False, None)
    now["t"] += 2
    assert schedule.after_step(2) == (True, None)
    schedule.saved()
    now["t"] += 29
    assert schedule.after_step(3) == (False, None)
    assert preemption.StepSchedule(3, 0, preemption.StopSignals()).after_step(6) == (True, None)
