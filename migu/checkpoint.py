"""The model's side of a checkpoint: what is saved, and putting it back (resume and `migu magnitudes` alike).

    save(rd, model, base_ids, method, meta, cfg.train)                          # after a phase
    save(rd, model, base_ids, method, meta, cfg.train, optimizer, scaler)       # a step checkpoint
    restore(model, method, rd.load_latest())                                    # method state, then parameters
    model, tokenizer, cfg, method, source = load_trained("runs/x")              # a run's model, as resume loads it

The files themselves (atomic, verified, `previous` as the fallback) are `migu.integrity`'s, reached
through `RunDir.save_checkpoint` / `RunDir.load_latest`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch

from migu import fsdp, preemption
from migu.config import load_config
from migu.integrity import Checkpoint, RunDirError
from migu.methods import get_method
from migu.models import load_model_and_tokenizer, set_attention
from migu.rundir import CONFIG, RunDir


def saved_parameters(model, base_ids: set[int]) -> dict[str, torch.Tensor]:
    """What a checkpoint holds: parameters the method added (adapters) and every trainable one.

    FSDP: the trainable parameters gathered whole (a collective: every rank calls this).
    """
    if fsdp.is_sharded(model):
        return fsdp.full_state(model)
    return {n: p for n, p in model.named_parameters() if p.requires_grad or id(p) not in base_ids}


def save(rd: RunDir, model, base_ids: set[int], method, meta: dict, train, optimizer=None, scaler=None) -> None:
    """Write the checkpoint: saved parameters (or FSDP's sharded DCP files, `train.fsdp_checkpoint: sharded`)
    and the method's state; with `optimizer`, a step checkpoint (training.pt: optimizer, fp16 loss scaler,
    every rank's RNG states). A collective under FSDP."""
    shards = fsdp.sharded_writer(model, optimizer) if fsdp.is_sharded(model) and train.fsdp_checkpoint == "sharded" \
        else None  # sharded: parameters and optimizer state in its DCP directory
    training = None
    if optimizer is not None:
        state = (None if shards else fsdp.full_optimizer_state(model, optimizer) if train.engine == "fsdp"
                 else optimizer.state_dict())
        training = {"optimizer": state, "rng": preemption.all_rng_states(),
                    "scaler": scaler.state_dict() if scaler is not None else None}
    rd.save_checkpoint(None if shards else saved_parameters(model, base_ids), method.state_dict(), meta, training,
                       shards=shards)


def load_parameters(model, ckpt: Checkpoint, optimizer=None) -> None:
    """The checkpoint's parameters (and, given `optimizer`, a sharded checkpoint's optimizer state)."""
    names = fsdp.sharded_names(ckpt.sharded) if ckpt.sharded is not None else ckpt.tensors
    params = dict(model.named_parameters())
    missing = [n for n in names if n not in params]
    if missing:
        raise RunDirError(f"{ckpt.where}: checkpoint parameter {missing[0]!r} is not in the model; "
                          f"was the run made with another method or model?")
    if ckpt.sharded is not None:  # DCP reshards: any process count wrote it, sharded model or not
        fsdp.load_sharded(model, ckpt.sharded, optimizer)
        return
    if fsdp.is_sharded(model):  # each rank keeps its rows of the whole tensors (any process count wrote them)
        fsdp.load_full(model, ckpt.tensors)
        return
    with torch.no_grad():
        for name, value in ckpt.tensors.items():
            params[name].copy_(value)


def restore(model, method, ckpt: Checkpoint, engine: str = "ddp", optimizer=None, scaler=None) -> None:
    """Put a checkpoint back: the method's state first (it may recreate adapters), then the parameters; with
    `optimizer` (a step checkpoint), the optimizer state and the fp16 loss scaler as well."""
    method.load_state_dict(ckpt.method_state)
    load_parameters(model, ckpt, optimizer)  # a sharded checkpoint: the optimizer state as well
    if optimizer is None:
        return
    if ckpt.sharded is None and engine == "fsdp":  # whole tensors keyed by name: any process count
        fsdp.load_full_optimizer_state(model, optimizer, ckpt.training["optimizer"])
    elif ckpt.sharded is None:
        optimizer.load_state_dict(ckpt.training["optimizer"])
    if scaler is not None and ckpt.training.get("scaler"):
        scaler.load_state_dict(ckpt.training["scaler"])


def load_trained(run_dir: str | Path, base: bool = False):
    """(model, tokenizer, cfg, method, source) of a run: its last checkpoint, or the base model.

    The checkpoint (checkpoints/last: the state after the last finished task) is loaded the way the
    runner resumes: base model → `method.setup` → `restore`. Without a checkpoint, or with `base=True`,
    the base model named in config.yaml is returned (no method setup).
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"{run_dir / CONFIG}: missing (needed to know the run's model and tasks)")
    cfg = load_config(run_dir / CONFIG)
    method = get_method(cfg.method.name)(cfg.method_options)
    model, tokenizer = load_model_and_tokenizer(cfg.model.name)
    set_attention(model, None if cfg.model.attention == "auto" else cfg.model.attention)  # as the run trained
    ckpt: Optional[Checkpoint] = None if base else RunDir(run_dir).load_latest()  # verified, as on resume
    source = f"base model {cfg.model.name}"
    if ckpt is not None:
        model = method.setup(model)
        restore(model, method, ckpt)  # whole tensors, or a sharded (DCP) checkpoint read into one process
        source = f"checkpoint after {ckpt.meta.get('finished_tasks', '?')} finished phase(s)"
    model.eval()
    return model, tokenizer, cfg, method, source
