"""Data-parallel training on torch.distributed (DDP), mixed precision, and the runner's sharding rules.

`migu run` started by `torchrun` (or `accelerate launch`, which starts torchrun's launcher) finds
RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT in its environment; `session()` then
initialises the process group (gloo on CPU, nccl on CUDA) with a timeout, so a rank that waits for
a dead peer fails instead of hanging forever. Without those variables (or WORLD_SIZE=1) everything
here is a no-op and the runner behaves exactly as a plain single process.

The sharding rule (results do not depend on the number of processes):
    * every rank builds the same plan (same seeds, same items, `method.mix_batch` applied to the full
      planned micro-batches on every rank), so the *global* batch of a step is `batch_size × grad_accum`
      rows whatever WORLD_SIZE is;
    * the rows of one optimizer step are dealt to the ranks round-robin (rank r takes rows r, r+W, …);
      each rank sorts its rows by length and runs them in micro-batches of at most `batch_size` rows;
      a rank left without rows (a step with fewer rows than processes) runs one row with every label
      masked: it contributes nothing but joins the gradient all-reduce;
    * every row's summed answer-token NLL is divided by the step's *global* answer-token count, which
      every rank computes from the whole plan, and the loss is multiplied by W before backward because
      DDP averages gradients over ranks; the all-reduced gradient is thus the single-process gradient
      of the same step (up to floating-point summation order);
    * DDP synchronises only on a rank's last micro-batch (`no_sync()` before), MIGU all-reduces its
      magnitude statistics (core, `sync=True`), so masks, clipping and the optimizer step are
      identical on every rank and the replicas stay bit-identical;
    * evaluation: rank r evaluates the test examples r, r+W, … of every task; the ranks' records are
      gathered and combined (correct counts, or token NLL sums for perplexity), identically on every rank.

Only rank 0 writes files (see `migu.rundir`); `barrier()` orders rank 0's writes against the others' reads.
`train.engine: fsdp` (migu/fsdp.py) shards the model once per run with FSDP2; StepRunner then skips
DDP and pads each rank to the same number of micro-batches (FSDP's collectives run in every forward
and backward), and evaluation runs with the parameters all-gathered (`fsdp.full_parameters`).
Device, precision and launcher-environment helpers live in migu/devices.py (re-exported here).
This module imports only torch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist

from migu.devices import (PRECISIONS, _accelerate_engine, autocast, cpu_has_bf16, launched_rank,  # noqa: F401
                          launched_world_size, precision_problem, resolve_attention, resolve_device,
                          resolve_precision)

__all__ = ["DistributedError", "session", "is_initialized", "rank", "world_size", "local_rank",
           "is_main_process", "resolve_device", "precision_problem", "barrier", "sum_over_ranks",
           "gather_objects", "check_replicas", "shard_rows", "StepRunner", "evaluate_sharded",
           "combine_records", "autocast", "resolve_precision", "resolve_attention", "cpu_has_bf16"]

_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class DistributedError(RuntimeError):
    """The process group failed (a peer died or timed out); the message says what to do next."""


# ------------------------------------------------------------------------------------------ who am I
def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0")) if is_initialized() else 0


def is_main_process() -> bool:
    return rank() == 0


# ------------------------------------------------------------------------------------------ the group
def _backend(device: torch.device) -> str:
    return "nccl" if device.type == "cuda" else "gloo"


@contextlib.contextmanager
def session(timeout_s: float = 1800.0, device: str = "auto", run_dir: Optional[str] = None,
            precision: Optional[str] = None, engine: str = "ddp"):
    """Initialise the process group for the duration of a run when launched with WORLD_SIZE > 1.

    Does nothing for a single process or when the caller already initialised torch.distributed (then
    the caller owns the group). Communication failures inside become `DistributedError` with a
    message naming this rank and the way to continue (`--resume`).
    """
    owned = False
    accelerate_mp = os.environ.get("ACCELERATE_MIXED_PRECISION", "no")
    if precision is not None and accelerate_mp not in ("no", precision) and launched_rank() == 0:
        print(f"note: accelerate's mixed_precision={accelerate_mp} is ignored; this run uses "
              f"train.precision={precision} (set it with --set train.precision=...)", file=sys.stderr)
    if launched_world_size() > 1 and not is_initialized():
        missing = [v for v in _ENV if v not in os.environ and v != "LOCAL_RANK"]
        if missing:
            raise DistributedError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set; "
                                   "launch with torchrun (or accelerate launch)")
        launched = _accelerate_engine()
        if launched is not None and not (launched.endswith("(fsdp)") and engine == "fsdp"):
            hint = ("add --set train.engine=fsdp (the runner shards with torch FSDP2 itself; accelerate's "
                    "fsdp_* options are not read)" if launched.endswith("(fsdp)") else
                    "the migu runner does not train with DeepSpeed (MIGU masks param.grad, which ZeRO bypasses); "
                    "use an accelerate config with distributed_type MULTI_GPU or FSDP, or torchrun")
            raise DistributedError(f"{launched}: {hint}")
        dev = resolve_device(device)
        if os.environ.get("RANK", "0") != "0":
            _quiet_libraries()  # one set of progress bars (rank 0's)
        dist.init_process_group(_backend(dev), timeout=timedelta(seconds=float(timeout_s)),
                                device_id=dev if dev.type == "cuda" else None)
        owned = True
    try:
        yield
    except (dist.DistError, RuntimeError) as err:
        if not is_initialized() or isinstance(err, DistributedError) or not _is_comm_failure(err):
            raise
        raise DistributedError(
            f"rank {rank()}/{world_size()}: lost the other processes ({type(err).__name__}: "
            f"{_first_line(err)}); the job stops. Finished tasks are checkpointed: continue with "
            f"`migu run --resume {run_dir or '<run directory>'}` (with any number of processes)") from err
    finally:
        if owned:
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - a broken group may refuse to close; exiting is what matters
                pass


def _quiet_libraries() -> None:
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0][:300] if lines else ""


def _is_comm_failure(err: BaseException) -> bool:
    if isinstance(err, dist.DistError):
        return True
    text = str(err).lower()
    return any(s in text for s in ("gloo", "nccl", "connection closed", "connection reset", "timed out",
                                   "broken pipe", "socket"))


def barrier() -> None:
    """Wait for every rank (no-op for one process)."""
    if is_initialized() and world_size() > 1:
        dist.barrier()


def _comm_device() -> torch.device:
    if is_initialized() and dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def sum_over_ranks(*values: float) -> tuple[float, ...]:
    """The sums over ranks of a few numbers (float64, one all_reduce); unchanged for one process."""
    if not (is_initialized() and world_size() > 1):
        return tuple(float(v) for v in values)
    t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=_comm_device())
    dist.all_reduce(t)
    return tuple(float(x) for x in t.cpu())


def gather_objects(obj) -> list:
    """Every rank's `obj` (picklable), in rank order; `[obj]` for one process."""
    if not (is_initialized() and world_size() > 1):
        return [obj]
    out = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def _fingerprint(model: torch.nn.Module) -> torch.Tensor:
    """One int64 per parameter: the integer sum of its raw bits (exact, independent of summation order)."""
    sums = []
    with torch.no_grad():
        for p in model.parameters():
            bits = p.detach().contiguous().view(torch.int32 if p.element_size() == 4 else torch.uint8)
            sums.append(bits.sum(dtype=torch.int64).cpu())
    return torch.stack(sums) if sums else torch.zeros(0, dtype=torch.int64)


def check_replicas(model: torch.nn.Module, where: str = "") -> None:
    """Raise `DistributedError` naming the first parameter whose bits differ from rank 0's."""
    if not (is_initialized() and world_size() > 1):
        return
    mine = _fingerprint(model)
    ref = mine.clone().to(_comm_device())
    dist.broadcast(ref, src=0)
    diff = (ref.cpu() != mine).nonzero()
    if len(diff):
        name = [n for n, _ in model.named_parameters()][int(diff[0])]
        raise DistributedError(f"rank {rank()}: parameter {name!r} differs from rank 0's{where} (different model "
                               "files, seeds or library versions on the ranks?)")


# ------------------------------------------------------------------------------------------ the model
def prepare_model(model: torch.nn.Module, device: torch.device, gradient_checkpointing: bool = False) -> None:
    """Move the model to its device and, if asked, enable (non-reentrant) gradient checkpointing in place.

    Gradient checkpointing recomputes each block's activations in backward instead of keeping them;
    MIGU's statistics are unchanged (the recomputation repeats every counted output exactly, so sums
    and token counts double together). With frozen embeddings (LoRA) the embedding output is made to
    require grad, as PEFT recommends, so every checkpointed block has a gradient path.
    """
    if gradient_checkpointing:
        kwargs = {"use_reentrant": False}
        if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.x (the old name warns)
            model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        elif hasattr(model, "gradient_checkpointing_enable"):
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
        else:
            raise ValueError(f"train.gradient_checkpointing=true: {type(model).__name__} has no "
                             "gradient_checkpointing_enable (not a Hugging Face model)")
        embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
        if embeddings is not None and not any(p.requires_grad for p in embeddings.parameters()):
            model.enable_input_require_grads()
    if device.type != "cpu":
        model.to(device)


# ------------------------------------------------------------------------------------------ sharding
def shard_rows(rows: list, r: Optional[int] = None, w: Optional[int] = None) -> list:
    """Rank r's share of `rows`: rows r, r+W, r+2W, … (all of them for one process)."""
    r = rank() if r is None else r
    w = world_size() if w is None else w
    return list(rows[r::w])


class StepRunner:
    """How one optimizer step runs on this process: which rows, DDP sync, autocast, loss scaling.

    Created per training phase (after the method chose its trainable parameters); `close()` removes the
    DDP wrapper so the method's own backward passes (e.g. EWC's Fisher) run on the bare module.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device, precision: str = "fp32", engine: str = "ddp"):
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
        self.model, self.device, self.precision = model, device, precision
        self.world = world_size()
        self.rank = rank()
        self.ddp = None
        # FSDP2 (migu.fsdp.shard_model, done once per run): every forward/backward all-gathers and
        # reduce-scatters, so every rank must run the same number of micro-batches (see shard)
        self.fsdp = self.world > 1 and engine == "fsdp"
        if self.world > 1 and not self.fsdp:
            from torch.nn.parallel import DistributedDataParallel

            check_replicas(model, " at the start of a phase")  # the replicas must start identical
            # no init_sync: the replicas were just checked bit-identical (a broadcast would hide a bug);
            # no buffer broadcast per forward: buffers (rotary tables) are constants
            import inspect

            accepted = inspect.signature(DistributedDataParallel.__init__).parameters
            options = {"init_sync": False} if "init_sync" in accepted else {}
            options["forward_sync_buffers" if "forward_sync_buffers" in accepted else "broadcast_buffers"] = False
            self.ddp = DistributedDataParallel(
                model, device_ids=[device.index] if device.type == "cuda" else None, find_unused_parameters=False,
                **options)
        self.forward_model = self.ddp if self.ddp is not None else model
        self.scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    # ------------------------------------------------------------------ rows
    def shard(self, micro_batches: list[list[dict]], batch_size: int) -> tuple[list[list[dict]], int]:
        """This rank's micro-batches of a step, and how many of them (the last ones) are placeholders.

        One process: the planned micro-batches unchanged. Several: see the module docstring; a placeholder
        is a row that trains nothing (all labels -100): a rank without rows runs one to join DDP's
        all-reduce, and under FSDP every rank pads to the busiest rank's micro-batch count.
        """
        if self.world == 1:
            return micro_batches, 0
        rows = [item for micro in micro_batches for item in micro]
        mine = shard_rows(rows, self.rank, self.world)
        first = rows[0]
        blank = [{**first, "labels": [-100] * len(first["labels"])}]  # a row that trains nothing
        if not mine:  # fewer rows than ranks: join the all-reduce with a row that trains nothing
            return [blank], 1
        mine.sort(key=lambda item: len(item["input_ids"]))  # stable: less padding per micro-batch
        out = [mine[i:i + batch_size] for i in range(0, len(mine), batch_size)]
        if not self.fsdp:
            return out, 0
        # FSDP: as many micro-batches as the busiest rank (rank 0: it gets the most rows)
        padding = -(-len(shard_rows(rows, 0, self.world)) // batch_size) - len(out)
        return out + [blank] * padding, padding

    def to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v
                for k, v in batch.items()}

    # ------------------------------------------------------------------ one micro-batch
    def micro_batch(self, last: bool):
        """DDP synchronises gradients only on the step's last micro-batch of this rank."""
        if self.ddp is not None and not last:
            return self.ddp.no_sync()
        # FSDP reduce-scatters every micro-batch into the sharded gradients: no unsharded gradient is kept
        # between micro-batches (the memory FSDP exists to save); every rank runs as many (see shard)
        return contextlib.nullcontext()

    def autocast(self):
        return autocast(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        if self.world > 1:
            loss = loss * self.world  # DDP / FSDP average over ranks; the loss already carries 1/global tokens
        if self.scaler is not None:
            loss = self.scaler.scale(loss)
        loss.backward()

    # ------------------------------------------------------------------ the optimizer step
    def unscale(self, optimizer: torch.optim.Optimizer) -> None:
        """Before clipping: bring fp16-scaled gradients back to their true size (no-op otherwise)."""
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)

    def step(self, optimizer: torch.optim.Optimizer) -> None:
        if self.scaler is not None:
            self.scaler.step(optimizer)  # skipped when a gradient is inf/nan (identical on every rank)
            self.scaler.update()
        else:
            optimizer.step()

    def close(self) -> None:
        if self.ddp is not None:
            # the reducer's autograd hooks go with the wrapper; later backward passes are plain
            self.ddp = None
            self.forward_model = self.model
            import gc

            gc.collect()


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_sharded(evaluate, task, **kwargs) -> tuple[float, dict]:
    """`evaluate(task, **kwargs) -> (value, record)` with `task.test` split over ranks; same result on every rank.

    Rank r evaluates the test entries r, r+W, ... of `task`; the per-rank records are combined by
    `combine_records` (accuracy: correct counts summed; perplexity: token NLL sums and token counts
    summed), so every rank returns what one process evaluating every entry returns (up to float
    summation order). One process: `evaluate(task, **kwargs)` unchanged.
    """
    if not (is_initialized() and world_size() > 1) or not task.test:
        return evaluate(task, **kwargs)
    w, r = world_size(), rank()
    mine = task.test[r::w]
    record = evaluate(dataclasses.replace(task, test=mine), **kwargs)[1] if mine else None
    return combine_records(gather_objects((r, record)))


def combine_records(parts: list) -> tuple[float, dict]:
    """(value, record) of a whole evaluation set from the ranks' `(rank, record or None)` of strided shards."""
    world = len(parts)
    records = [(r, rec) for r, rec in parts if rec is not None]
    first = records[0][1]
    if "correct" in first and "n" in first:  # accuracy (finetune)
        correct = sum(rec["correct"] for _, rec in records)
        n = sum(rec["n"] for _, rec in records)
        # samples: entry i of rank r's shard is entry r + W*i of the set; keep the set's first ones
        samples = sorted((r + world * i, s) for r, rec in records for i, s in enumerate(rec.get("samples", [])))
        accuracy = 100.0 * correct / n
        keep = len(first.get("samples", []))
        return accuracy, {**first, "accuracy": accuracy, "correct": correct, "n": n,
                          "samples": [s for _, s in samples[:keep]]}
    if "nll" in first and "tokens" in first:  # perplexity (pretrain): token-weighted over the whole set
        import math

        tokens = sum(rec["tokens"] for _, rec in records)
        nll = sum(rec["nll"] * rec["tokens"] for _, rec in records) / tokens
        out = {**first, "perplexity": math.exp(nll), "nll": nll, "tokens": tokens}
        if "blocks" in first:
            out["blocks"] = sum(rec["blocks"] for _, rec in records)
        return out["perplexity"], out
    raise DistributedError(f"cannot combine sharded evaluation records with keys {sorted(first)}")


def print_main(text: str) -> None:
    """A line on stderr from rank 0 only."""
    if is_main_process():
        print(text, file=sys.stderr)
