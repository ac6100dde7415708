"""Scale-out (issue 6): data-parallel runs on 2 gloo processes, a killed rank, resume with 2 or 1 processes,
mixed precision, gradient checkpointing and the refused sharded engines — all on the tiny random model.

The multi-process tests share one 2-process run: it is started by hand (RANK/WORLD_SIZE/MASTER_* set
as torchrun sets them), rank 1 SIGKILLs itself in the second task, and the survivor must stop with a
clear message instead of hanging. The run is then finished by `torchrun --nproc_per_node 2 … --resume`
and, from a copy, by a single process: both must end where an uninterrupted single-process run with
the same global batch ends.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from migu import distributed, fsdp
from migu.config import ConfigError, load_config
from migu.core import MIGU
from migu.data import IGNORE_INDEX
from tests.runner_helpers import final_rows, tiny_config, tiny_yaml, train_losses, write_stream

REPO = Path(__file__).resolve().parent.parent
WORKER = REPO / "tests" / "dist_worker.py"
# 9 examples per task, micro-batches of 2, 4 per step: a step of 8 rows (4 per rank, 2 micro-batches
# each: DDP's no_sync path) and a step of 1 row (rank 1 runs a placeholder row); MIGU on (all-reduced)
SETTINGS = {"data.train_per_task": 9, "train.batch_size": 2, "train.grad_accum": 4, "migu.enabled": True,
            "train.dist_timeout_s": 60}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                             "MASTER_PORT") and not k.startswith("MIGU_TEST_")}
    env.update(PYTHONPATH=str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1", **extra)
    return env


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _params(run_dir: Path) -> dict:
    """The final checkpoint's parameters, whole (an FSDP run's sharded DCP checkpoint read in this process)."""
    from migu.rundir import RunDir

    ckpt = RunDir(run_dir).load_latest()
    assert ckpt.where == run_dir / "checkpoints" / "last"
    return fsdp.read_sharded(ckpt.sharded) if ckpt.sharded is not None else ckpt.tensors


def _kept(run_dir: Path) -> list:
    return [json.loads(x).get("migu_kept") for x in (run_dir / "metrics.jsonl").read_text().splitlines()
            if '"train"' in x]


def _assert_same_training(run_dir: Path, ref: Path) -> None:
    """Same accuracy matrix, per-step losses to 1e-5, same MIGU kept fractions, weights to fp32 tolerance."""
    assert final_rows(run_dir) == final_rows(ref)
    assert (run_dir / "accuracy_matrix.csv").read_text() == (ref / "accuracy_matrix.csv").read_text()
    got, want = train_losses(run_dir), train_losses(ref)
    assert [x[:2] for x in got] == [x[:2] for x in want] and len(got) == 3 * 2
    assert max(abs(a[2] - b[2]) for a, b in zip(got, want)) < 1e-5
    assert _kept(run_dir) == _kept(ref)
    mine, theirs = _params(run_dir), _params(ref)
    assert mine.keys() == theirs.keys()
    for name in mine:  # AdamW amplifies float summation-order differences a little: fp32 tolerance
        torch.testing.assert_close(mine[name], theirs[name], rtol=1e-4, atol=1e-4, msg=name)


def _assert_replicas_identical(dump: Path, phases) -> None:
    for i in phases:
        r0, r1 = torch.load(dump / f"rank0_phase{i}.pt"), torch.load(dump / f"rank1_phase{i}.pt")
        assert r0.keys() == r1.keys() and r0
        for name in r0:
            assert torch.equal(r0[name], r1[name]), f"phase {i}: {name} differs between ranks"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from migu.models import tiny_model_dir

    root = tmp_path_factory.mktemp("dist")
    model = tiny_model_dir(root / "model", "llama", seed=0)
    stream = write_stream(root / "data")
    return root, model, stream


@pytest.fixture(scope="module")
def single(setup):
    """The uninterrupted single-process reference run."""
    from migu.train import run

    root, model, stream = setup
    run(tiny_config(model, stream, root / "single", **SETTINGS), quiet=True)
    return root / "single"


@pytest.fixture(scope="module")
def killed(setup):
    """A 2-process run whose rank 1 is SIGKILLed after its 3rd step (the 1st of task 2): (dir, dump, procs)."""
    root, model, stream = setup
    out, dump = root / "two", root / "dump"
    dump.mkdir()
    config = tiny_yaml(root / "two.yaml", model, stream, out, **SETTINGS)
    port = str(_free_port())
    procs, logs = [], []
    for r in (0, 1):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   MIGU_TEST_DUMP=str(dump), MIGU_TEST_KILL="1:3")
        log = open(root / f"rank{r}.log", "w+")
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "run", str(config), "--quiet"], env=env,
                                      stdout=log, stderr=subprocess.STDOUT))
        logs.append(log)
    t0 = time.time()
    codes = [p.wait(timeout=240) for p in procs]
    survivor_wait = time.time() - t0
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    copy = root / "two-copy"
    shutil.copytree(out, copy)  # to resume it with one process as well
    return {"out": out, "copy": copy, "dump": dump, "codes": codes, "logs": texts, "wait": survivor_wait}


# ------------------------------------------------------------------------------------------ 2 processes
@pytest.mark.distributed
def test_a_killed_rank_stops_the_job_with_a_clear_message(killed):
    codes, logs = killed["codes"], killed["logs"]
    assert codes[1] == -9  # the SIGKILLed rank
    assert codes[0] == 1, logs[0][-2000:]  # the survivor fails (does not hang) with one line naming the way on
    assert "distributed error: rank 0/2: lost the other processes" in logs[0]
    assert f"migu run --resume {killed['out']}" in logs[0] and "Traceback" not in logs[0]
    state = json.loads((killed["out"] / "state.json").read_text())
    assert state["status"] == "running" and state["finished_tasks"] == 1  # task 1 checkpointed, task 2 lost
    _assert_replicas_identical(killed["dump"], [0])  # (a) bit-identical replicas after a task


@pytest.mark.distributed
def test_torchrun_resume_with_two_processes_equals_one_process_run(killed, single):
    out, dump = killed["out"], killed["dump"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), "run", "--resume", str(out), "--quiet"],
                          env=_env(MIGU_TEST_DUMP=str(dump)), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("accuracy (%)") == 1  # rank 0 alone prints the matrix
    _assert_replicas_identical(dump, [1, 2])  # (a)
    _assert_same_training(out, single)  # (b) + (c): same matrix, losses and weights as one process
    assert json.loads((out / "state.json").read_text())["status"] == "done"


@pytest.mark.distributed
def test_a_two_process_run_resumes_in_one_process(killed, single):
    from migu.cli import main

    assert main(["run", "--resume", str(killed["copy"]), "--quiet"]) == 0
    _assert_same_training(killed["copy"], single)


@pytest.mark.distributed
def test_sigterm_on_one_rank_stops_both_after_the_same_step_and_resumes_exactly(setup, single):
    """Issue 20: the stop is agreed by every rank; only rank 0 holds the run directory's lock."""
    from migu.cli import main

    root, model, stream = setup
    out = root / "term"
    config = tiny_yaml(root / "term.yaml", model, stream, out, **SETTINGS)
    port, procs, logs = str(_free_port()), [], []
    for r in (0, 1):
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   MIGU_TEST_TERM="1:3")  # rank 1 alone, in the first step of task 2
        logs.append(open(root / f"term{r}.log", "w+"))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "run", str(config), "--quiet"], env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=240) for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    assert codes == [143, 143], texts
    assert f"interrupted by SIGTERM after step 1/2 of task 2/3 (animals); checkpoint written; continue with: " \
           f"migu run --resume {out}" in texts[0] and "Traceback" not in texts[0] + texts[1]
    assert (out / ".lock").read_text().startswith(f"pid {procs[0].pid} ")  # rank 0 was the writer
    assert json.loads((out / "state.json").read_text())["status"] == "interrupted"
    meta = json.loads((out / "checkpoints" / "last" / "meta.json").read_text())
    assert meta["step"]["phase"] == 1 and meta["step"]["step"] == 1
    assert main(["run", "--resume", str(out), "--quiet"]) == 0  # one process continues the two-process run
    _assert_same_training(out, single)


# ------------------------------------------------------------------------------------------ sharding rules
def _items(lengths):
    return [{"input_ids": [7] * n, "labels": [IGNORE_INDEX] * (n - 2) + [5, 6]} for n in lengths]


def test_step_rows_are_dealt_round_robin_and_cover_the_step_once(tiny_llama):
    model, _ = tiny_llama
    runner = distributed.StepRunner(model, torch.device("cpu"))
    micro = [_items([5, 6]), _items([9, 8]), _items([3])]
    assert runner.shard(micro, 2) == (micro, False)  # one process: the plan as it is
    seen = []
    for r in (0, 1, 2):
        runner.world, runner.rank = 3, r
        shards, placeholder = runner.shard(micro, 1)
        assert not placeholder and all(len(s) <= 1 for s in shards)
        seen += [len(item["input_ids"]) for s in shards for item in s]
    assert sorted(seen) == [3, 5, 6, 8, 9]
    runner.world, runner.rank = 4, 3
    shards, placeholder = runner.shard([_items([5]), _items([6])], 8)  # 2 rows, 4 ranks: rank 3 has none
    assert placeholder and len(shards) == 1 and all(x == IGNORE_INDEX for x in shards[0][0]["labels"])


def test_sharded_evaluation_records_combine_like_one_process():
    # accuracy: rank 0 held examples 0, 2, 4; rank 1 held 1, 3
    acc, rec = distributed.combine_records([
        (0, {"accuracy": 66.7, "correct": 2, "n": 3, "samples": [["a", "a"], ["c", "x"], ["e", "e"]]}),
        (1, {"accuracy": 50.0, "correct": 1, "n": 2, "samples": [["b", "b"], ["d", "y"]]})])
    assert acc == 60.0 and rec["correct"] == 3 and rec["n"] == 5
    assert rec["samples"] == [["a", "a"], ["b", "b"], ["c", "x"]]
    # perplexity: token-weighted mean NLL over the whole set
    ppl, rec = distributed.combine_records([(0, {"perplexity": 1.0, "nll": 1.0, "tokens": 30, "blocks": 2}),
                                            (1, {"perplexity": 1.0, "nll": 2.0, "tokens": 10, "blocks": 1}),
                                            (2, None)])
    assert rec["nll"] == pytest.approx(1.25) and rec["tokens"] == 40 and rec["blocks"] == 3
    assert ppl == pytest.approx(torch.tensor(1.25).exp().item())


# ------------------------------------------------------------------------------------------ precision, memory
class _Recording(MIGU):
    log: list = []

    def mask_gradients(self):
        magnitudes = self.magnitudes()
        masks = super().mask_gradients()
        _Recording.log.append((magnitudes, masks))
        return masks


def _masks_of_run(monkeypatch, tmp_path, name, model_dir, stream, **settings):
    import migu.masking

    from migu.train import run

    _Recording.log = []
    monkeypatch.setattr(migu.masking, "MIGU", _Recording)  # the runner builds its MIGU there
    # one-task streams: first_task mask, or the only phase would train without MIGU
    run(tiny_config(model_dir, stream, tmp_path / name, **{"migu.enabled": True, "migu.first_task": "mask",
                                                            **settings}), quiet=True)
    return list(_Recording.log), train_losses(tmp_path / name)


def test_bf16_autocast_masks_match_fp32_within_ties(tmp_path, tiny_llama_dir, monkeypatch):
    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    one_step = {"data.train_per_task": 8, "train.batch_size": 8, "eval.untrained": False}
    fp32, _ = _masks_of_run(monkeypatch, tmp_path, "fp32", tiny_llama_dir, stream, **one_step)
    bf16, _ = _masks_of_run(monkeypatch, tmp_path, "bf16", tiny_llama_dir, stream, **one_step,
                            **{"train.precision": "bf16"})
    (mag32, mask32), (mag16, mask16) = fp32[0], bf16[0]  # the first step: same weights, same inputs
    assert all(m.dtype == torch.float32 for m in mag16.values())  # statistics stay float32 under autocast
    agree = sum(int((mask32[k] == mask16[k]).sum()) for k in mask32)
    assert agree / sum(m.numel() for m in mask32.values()) >= 0.9
    for k in mask32:
        diff = mask32[k] != mask16[k]
        if diff.any():  # disagreements only next to the cut-off (bf16 keeps ~3 significant digits)
            cutoff = torch.sort(mag32[k], descending=True).values[int(mask32[k].sum()) - 1]
            assert torch.all((mag32[k][diff] - cutoff).abs() <= 0.03 * cutoff + 1e-6), k


@pytest.mark.parametrize("method", ["seq-ft", "seq-lora"])
def test_gradient_checkpointing_keeps_migu_masks_and_losses(tmp_path, tiny_llama_dir, monkeypatch, method):
    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    small = {"data.train_per_task": 8, "train.batch_size": 4, "eval.untrained": False, "method.name": method}
    plain, loss_plain = _masks_of_run(monkeypatch, tmp_path, "plain", tiny_llama_dir, stream, **small)
    ckpt, loss_ckpt = _masks_of_run(monkeypatch, tmp_path, "ckpt", tiny_llama_dir, stream, **small,
                                    **{"train.gradient_checkpointing": True})
    assert len(plain) == len(ckpt) == 2
    for (_, a), (_, b) in zip(plain, ckpt):
        assert a.keys() == b.keys() and a
        for k in a:
            assert torch.equal(a[k], b[k]), k
    assert [x[:2] for x in loss_plain] == [x[:2] for x in loss_ckpt]
    assert max(abs(x[2] - y[2]) for x, y in zip(loss_plain, loss_ckpt)) < 1e-5


def test_fp16_on_cpu_is_a_one_line_config_error(tmp_path, tiny_llama_dir):
    from migu.train import run

    stream = write_stream(tmp_path / "data", tasks={"colors": ["red", "blue"]})
    with pytest.raises(ConfigError, match=r"train.precision=fp16: float16 autocast needs a CUDA device"):
        run(tiny_config(tiny_llama_dir, stream, tmp_path / "fp16", **{"train.precision": "fp16",
                                                                       "train.device": "cpu"}), quiet=True)
    assert not (tmp_path / "fp16").exists()  # refused before the run directory is created
    with pytest.raises(ConfigError, match="train.precision=fp8: must be 'auto', 'fp32', 'bf16' or 'fp16'"):
        load_config(None, ["train.precision=fp8"])


# ------------------------------------------------------------------------------------------ refused engines
def test_deepspeed_is_refused_early_with_the_reason(capsys):
    engine = "deepspeed"
    with pytest.raises(ConfigError, match=rf"^train.engine={engine}: MIGU cannot run on DeepSpeed ZeRO: .*sharded "
                                          r"flat buffers.*silently do nothing"):
        load_config(None, [f"train.engine={engine}", "migu.enabled=true"])
    with pytest.raises(ConfigError, match=rf"train.engine={engine}: MIGU cannot run"):
        load_config(None, [f"train.engine={engine}", "compare_migu=true"])
    with pytest.raises(ConfigError, match=rf"^train.engine={engine}: DeepSpeed ZeRO is not supported by the migu "
                                          "runner yet"):
        load_config(None, [f"train.engine={engine}"])
    from migu.cli import main

    assert main(["run", "--set", f"train.engine={engine}", "--set", "migu.enabled=true"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"config error: train.engine={engine}: MIGU cannot run")


def test_accelerate_deepspeed_launch_is_refused_before_the_group_starts(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                       "ACCELERATE_USE_DEEPSPEED": "true"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(distributed.DistributedError,
                       match=r"ACCELERATE_USE_DEEPSPEED=true \(deepspeed\): .*does not train with DeepSpeed"):
        with distributed.session():
            pass
    assert not distributed.is_initialized()
