"""MIGU under FSDP2 (`fully_shard`, issue 18): 2 gloo processes on CPU against one process.

Each rank holds dim-0 chunks of every parameter; MIGU ranks the all-reduced statistics and zeroes the
rows of its local gradient shard. The tiny Llama has an odd MLP width (37 = 19 + 18 rows: uneven
shards) and GPT-2's Conv1D has its output units on dim 1 (every rank holds all units of its rows).
"""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from migu import MIGU, distributed
from migu.config import ConfigError, load_config
from migu.fsdp import full_parameters, full_state, shard_model
from tests.runner_helpers import tiny_yaml
from tests.test_distributed import (SETTINGS, WORKER, _assert_same_training, _env, _free_port,  # noqa: F401
                                    setup, single)  # module fixtures, run again for this module
from tests.test_core import batch, lm_loss_sum
from tests.test_core_distributed import free_port

pytestmark = pytest.mark.distributed
__all__ = ["setup", "single"]  # the imported module fixtures are used by pytest
STEPS, GLOBAL_BATCH = 3, 8


def make(kind):
    if kind == "gpt2":
        torch.manual_seed(7)  # no dropout: the ranks' rows would draw other dropout masks than one process
        return GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=16, n_layer=2, n_head=4, n_positions=64,
                                          resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    torch.manual_seed(7)
    return LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


def train(model, shard, world, threshold, mode):
    """AdamW steps (clipped) with MIGU (None: without); loss / global tokens × world (FSDP averages)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    migu = MIGU(model, threshold=threshold, mode=mode, optimizer=opt) if threshold is not None else None
    masks = []
    for step in range(STEPS):
        ids, mask = batch(GLOBAL_BATCH, seed=10 + step, pad_last=step)
        total = mask[:, 1:].sum()
        ids, mask = ids.chunk(world)[shard], mask.chunk(world)[shard]
        (lm_loss_sum(model, ids, mask) * world / total).backward()
        if migu is not None:
            masks.append({k: v.clone() for k, v in migu.mask_gradients().items()})
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.5)
        opt.step()
        opt.zero_grad()
        if migu is not None:
            migu.reset()
    return masks


def worker(rank, world, port, out_dir, kind, threshold, mode):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = shard_model(make(kind))
        masks = train(model, rank, world, threshold, mode)
        params = full_state(model, {n for n, _ in model.named_parameters()})
        ids, mask = batch(2, seed=99)
        with torch.no_grad(), full_parameters(model):  # evaluation: ranks run different numbers of forwards
            logits = [model(input_ids=ids[:1 + rank], attention_mask=mask[:1 + rank]).logits for _ in range(1 + rank)]
        torch.save({"params": params, "masks": masks, "logits": logits[0][:1]},
                   os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind,threshold,mode", [("llama", 0.7, "grad"), ("llama", None, "grad"),
                                                 ("llama", 0.5, "update"), ("gpt2", 0.7, "grad")])
def test_fsdp2_equals_one_process_on_the_concatenated_batch(tmp_path, kind, threshold, mode):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path), kind, threshold, mode), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    single = make(kind)
    single_masks = train(single, 0, 1, threshold, mode)
    assert len(r0["masks"]) == len(single_masks) == (STEPS if threshold is not None else 0)
    for step, masks in enumerate(single_masks):
        assert masks.keys() == r0["masks"][step].keys()
        for k, m in masks.items():
            assert torch.equal(r0["masks"][step][k], m), (step, k)
            assert torch.equal(r1["masks"][step][k], m), (step, k)
        assert any(not m.all() for m in masks.values())  # something was masked
    expected = dict(single.named_parameters())
    assert r0["params"].keys() == expected.keys()
    for k, v in expected.items():
        got, want = r0["params"][k], v.detach()
        if k.endswith("attn.c_attn.bias"):
            # GPT-2's key bias (units 16..31): softmax ignores it, so its gradient is rounding noise that
            # AdamW's normalisation turns into lr-sized steps whatever the summation order
            got, want = torch.cat([got[:16], got[32:]]), torch.cat([want[:16], want[32:]])
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6, msg=lambda m: f"{k}: {m}")
        assert torch.equal(r0["params"][k], r1["params"][k]), k
    ids, mask = batch(2, seed=99)
    with torch.no_grad():
        want = single(input_ids=ids[:1], attention_mask=mask[:1]).logits
    torch.testing.assert_close(r0["logits"], want, rtol=0, atol=1e-5)
    torch.testing.assert_close(r1["logits"], want, rtol=0, atol=1e-5)


# ------------------------------------------------------------------------------------------ the runner
# `migu run --set train.engine=fsdp` with 2 processes: stopped by SIGTERM on rank 1 in task 2 (a step
# checkpoint: DCP shards written by each rank, or whole tensors with train.fsdp_checkpoint=full), resumed
# with 2 processes (torchrun) and, from a copy, with 1: both end where the uninterrupted single-process
# run ends (tests/test_distributed.py's reference and settings: a step of 8 rows dealt 4 + 4 in 2
# micro-batches each, and a step of 1 row where rank 1 only pads)

FSDP = {**SETTINGS, "train.engine": "fsdp"}


def _launch(root, name, config, term=None):
    port, procs, logs = str(_free_port()), [], []
    dump = root / f"{name}-dump"
    dump.mkdir()
    for r in (0, 1):
        extra = {"MIGU_TEST_TERM": term} if term else {}
        env = _env(RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port,
                   MIGU_TEST_DUMP=str(dump), **extra)
        logs.append(open(root / f"{name}{r}.log", "w+"))
        procs.append(subprocess.Popen([sys.executable, str(WORKER), "run", str(config), "--quiet"], env=env,
                                      stdout=logs[-1], stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=300) for p in procs]
    texts = []
    for log in logs:
        log.seek(0)
        texts.append(log.read())
        log.close()
    return codes, texts, dump


@pytest.fixture(scope="module", params=["sharded", "full"])
def stopped(setup, request):
    root, model, stream = setup
    name = f"fsdp-{request.param}"
    out = root / name
    config = tiny_yaml(root / f"{name}.yaml", model, stream, out, **FSDP, **{"train.fsdp_checkpoint": request.param})
    codes, texts, dump = _launch(root, name, config, term="1:3")  # rank 1, first step of task 2
    assert codes == [143, 143], texts
    copies = {}
    for copy in ("copy", "damaged", "broken"):
        copies[copy] = root / f"{name}-{copy}"
        shutil.copytree(out, copies[copy])
    return {"out": out, "dump": dump, "format": request.param, **copies}


def test_fsdp_run_stops_with_a_step_checkpoint_and_resumes_with_two_processes(stopped, single):
    out, dump = stopped["out"], stopped["dump"]
    info = [torch.load(dump / f"rank{r}_fsdp.pt") for r in (0, 1)]
    assert [i["world"] for i in info] == [2, 2]
    assert info[0]["local_rows"] == info[1]["local_rows"] == info[0]["rows"] // 2  # the embedding, halved
    last = out / "checkpoints" / "last"
    meta = json.loads((last / "meta.json").read_text())
    assert meta["step"] == {**meta["step"], "phase": 1, "step": 1}
    training = torch.load(last / "training.pt")
    if stopped["format"] == "sharded":  # each rank's shard file, DCP's metadata; the optimizer state in them
        assert set(meta["files"]) == {"dcp/__0_0.distcp", "dcp/__1_0.distcp", "dcp/.metadata", "method.pt",
                                      "training.pt"}
        assert meta["sharded"] == "dcp" and training["optimizer"] is None
        assert (out / "checkpoints" / "previous" / "dcp" / "__1_0.distcp").is_file()  # task 1's, sharded too
    else:
        assert "params.safetensors" in meta["files"] and "sharded" not in meta
        assert training["optimizer"]["fsdp_full"]
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(WORKER), "run", "--resume", str(out), "--quiet"],
                          env=_env(MIGU_TEST_DUMP=str(dump)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    _assert_same_training(out, single)  # matrix, per-step losses, MIGU kept fractions, weights
    r0, r1 = (torch.load(dump / f"rank{r}_phase2.pt") for r in (0, 1))
    for name in r0:  # the gathered model is the same on both ranks
        assert torch.equal(r0[name], r1[name]), name


def test_fsdp_run_resumes_in_one_process(stopped, single):
    from migu.cli import main

    assert main(["run", "--resume", str(stopped["copy"]), "--quiet"]) == 0
    _assert_same_training(stopped["copy"], single)


@pytest.mark.parametrize("stopped", ["sharded"], indirect=True)
def test_a_damaged_shard_is_named_and_the_run_resumes_from_previous(stopped, single, capsys):
    """A flipped byte in rank 1's shard of the step checkpoint: named, and task 1's checkpoint is used."""
    from migu.cli import main

    run = stopped["damaged"]
    shard = run / "checkpoints" / "last" / "dcp" / "__1_0.distcp"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    assert main(["run", "--resume", str(run)]) == 0
    err = capsys.readouterr().err
    assert (f"{shard} is damaged (its sha256 differs from meta.json's): resuming from "
            f"{run / 'checkpoints' / 'previous'} instead") in err
    _assert_same_training(run, single)  # task 2 trained again from task 1's sharded checkpoint


def test_sharded_checkpoint_in_one_process_round_trips_and_a_failed_write_keeps_the_previous(tmp_path):
    """RunDir with a DCP writer and no process group: meta.json lists the shard files; loading restores
    parameters and AdamW state exactly; a shard write that fails (no space) is a WriteError naming dcp/,
    leaves `last` as it was and no temporary directory."""
    import errno

    from migu.fsdp import load_sharded, sharded_writer
    from migu.rundir import RunDir, WriteError

    model = make("llama")
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    ids, mask = batch(4, seed=1)
    lm_loss_sum(model, ids, mask).backward()
    opt.step()
    rd = RunDir.create(tmp_path / "run")
    rd.save_checkpoint(None, {"m": 1}, {"finished_tasks": 0}, {"optimizer": None}, shards=sharded_writer(model, opt))
    ckpt = rd.load_latest(training=True)
    assert ckpt.tensors is None and ckpt.sharded == tmp_path / "run" / "checkpoints" / "last" / "dcp"
    assert sorted(ckpt.meta["files"]) == ["dcp/.metadata", "dcp/__0_0.distcp", "method.pt", "training.pt"]
    again = make("llama")
    with torch.no_grad():
        for p in again.parameters():
            p.zero_()
    opt2 = torch.optim.AdamW(again.parameters(), lr=1e-2)
    load_sharded(again, ckpt.sharded, opt2)
    for (name, want), got in zip(model.named_parameters(), again.parameters()):
        assert torch.equal(got, want), name
    for p, q in zip(model.parameters(), again.parameters()):
        assert torch.equal(opt.state[p]["exp_avg_sq"], opt2.state[q]["exp_avg_sq"])
    assert torch.equal(RunDir(tmp_path / "run").load_checkpoint()[0]["lm_head.weight"], model.lm_head.weight)

    def full(directory):
        directory.mkdir()
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(WriteError, match=r"cannot write \S+/checkpoints/last/dcp: No space left on device \(ENOSPC\); "
                                         r"the previous checkpoint and summary are intact"):
        rd.save_checkpoint(None, {"m": 2}, {"finished_tasks": 1}, shards=full)
    assert rd.load_latest().meta["finished_tasks"] == 0
    assert [p.name for p in (tmp_path / "run" / "checkpoints").iterdir()] == ["last"]


@pytest.mark.parametrize("stopped", ["sharded"], indirect=True)
def test_every_checkpoint_damaged_names_each_shard(stopped):
    from migu.rundir import RunDir, RunDirError

    run = stopped["broken"]
    (run / "checkpoints" / "last" / "dcp" / "__0_0.distcp").write_bytes(b"\0" * 10)
    (run / "checkpoints" / "previous" / "dcp" / ".metadata").unlink()
    with pytest.raises(RunDirError, match=r"no intact checkpoint to resume from: \S*checkpoints/last/dcp/__0_0.distcp "
                                          r"is damaged \(truncated\? 10 bytes.*checkpoints/previous/dcp/.metadata "
                                          r"is missing; start again with --overwrite"):
        RunDir(run).load_latest(training=True)


def test_accelerate_launch_with_an_fsdp2_config_trains_sharded(setup, tmp_path):
    """Smoke: accelerate launch (fsdp_version 2 config) runs the runner's FSDP2, MIGU off, 2 processes."""
    root, model, stream = setup
    accel = tmp_path / "accelerate.yaml"
    accel.write_text("compute_environment: LOCAL_MACHINE\ndistributed_type: FSDP\nnum_machines: 1\n"
                     "num_processes: 2\nmachine_rank: 0\nmixed_precision: 'no'\nuse_cpu: false\n"
                     "fsdp_config:\n  fsdp_version: 2\n  fsdp_reshard_after_forward: true\n")
    out, dump = tmp_path / "run", tmp_path / "dump"
    dump.mkdir()
    config = tiny_yaml(tmp_path / "run.yaml", model, stream, out, **{**FSDP, "migu.enabled": False})
    proc = subprocess.run(["accelerate", "launch", "--config_file", str(accel), "--main_process_port",
                           str(_free_port()), str(WORKER), "run", str(config), "--quiet"],
                          env=_env(MIGU_TEST_DUMP=str(dump)), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((out / "state.json").read_text())["status"] == "done"
    info = [torch.load(dump / f"rank{r}_fsdp.pt") for r in (0, 1)]
    assert [(i["world"], i["accelerate_fsdp"]) for i in info] == [(2, "true")] * 2


def test_accelerate_fsdp_config_needs_train_engine_fsdp(monkeypatch):
    for key, value in {"WORLD_SIZE": "2", "RANK": "0", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "1",
                       "ACCELERATE_USE_FSDP": "true"}.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(distributed.DistributedError,
                       match=r"ACCELERATE_USE_FSDP=true \(fsdp\): add --set train.engine=fsdp"):
        with distributed.session():
            pass
    assert not distributed.is_initialized()


def test_fsdp_refuses_methods_that_change_their_parameters_and_fp16():
    with pytest.raises(ConfigError, match=r"^train.engine=fsdp: method 'seq-lora' is not supported under FSDP"):
        load_config(None, ["train.engine=fsdp", "method.name=seq-lora"])
    with pytest.raises(ConfigError, match=r"^train.engine=fsdp: train.precision=fp16 is not supported"):
        load_config(None, ["train.engine=fsdp", "train.precision=fp16"])
    load_config(None, ["train.engine=fsdp", "migu.enabled=true"])  # full fine-tuning with MIGU: accepted
