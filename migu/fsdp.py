"""`train.engine: fsdp` — fully sharded data parallelism with torch's FSDP2 (`fully_shard`).

    shard_model(model, precision)       # fully_shard on every transformer block, then on the root
    with full_parameters(model): ...    # evaluation: every rank holds the whole model, no collectives
    full_state(model) / load_full(model, tensors)                 # checkpoints: whole tensors, any process count
    full_optimizer_state(model, opt) / load_full_optimizer_state  # step checkpoints

Each rank keeps 1/N of every parameter, gradient and AdamW state (dim 0 chunks, torch.chunk sizes);
a block's parameters are all-gathered for its forward and again for its backward, and the gradients
are reduce-scattered (averaged over ranks, like DDP, so `StepRunner.backward`'s `loss × N` holds).
`param.grad` is then a DTensor sharded on dim 0 — the output units of a linear layer — which MIGU
masks row by row on each rank with that rank's slice of the global mask (migu/core.py).

Under `train.precision: bf16` the block parameters are all-gathered and computed in bfloat16 and
gradients reduced in float32 (`MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)`); the
sharded master weights and AdamW state stay float32.

Checkpoints (`train.fsdp_checkpoint`): `sharded` (default) — every rank writes its own shards of the
parameters and AdamW state with torch.distributed.checkpoint (DCP) into `checkpoints/last/dcp/`, so no
rank ever holds the whole state; DCP reshards on load, so the run resumes with any number of processes,
one (an unsharded model) included. `full` — whole tensors gathered with `full_state_dict=True`, written
by rank 0 in the ordinary format (params.safetensors): every rank holds the whole state once per
checkpoint, fine for small models. Either format resumes with any process count, one (no FSDP) included.

    sharded_writer(model, optimizer)(directory)   # a collective: every rank writes its shards
    load_sharded(model, directory, optimizer)     # into a sharded or a plain model, any process count
    sharded_names(directory) / read_sharded(directory)   # parameter names / whole tensors, one process
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import nn

__all__ = ["shard_model", "is_sharded", "full_parameters", "full_state", "load_full", "full_optimizer_state",
           "load_full_optimizer_state", "blocks", "sharded_writer", "load_sharded", "sharded_names",
           "read_sharded"]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated transformer blocks: the children of every nn.ModuleList (decoder layers, T5 blocks)."""
    found = []
    for module in model.modules():
        if isinstance(module, nn.ModuleList):
            found += [child for child in module.children() if any(True for _ in child.parameters())]
    return found


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def shard_model(model: nn.Module, precision: str = "fp32") -> nn.Module:
    """fully_shard each block, then the root (embeddings, final norm, LM head); in place, returns `model`.

    Parameters become DTensors sharded on dim 0 over all ranks; attach MIGU and build the optimizer after.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    kwargs = {}
    if precision == "bf16":  # bf16 compute and all-gather, float32 gradient reduction and master weights
        kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    elif precision == "fp16":
        raise ValueError("train.precision=fp16 with train.engine=fsdp: use bf16 (FSDP2 has no loss scaler here)")
    found = blocks(model)
    if not found:
        raise ValueError(f"train.engine=fsdp: {type(model).__name__} has no repeated blocks (nn.ModuleList) to shard")
    for block in found:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _fsdp_modules(model: nn.Module) -> list:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


@contextlib.contextmanager
def full_parameters(model: nn.Module):
    """Every rank holds every parameter (all-gathered once) until the block ends; forwards then run alone.

    Needed for evaluation: ranks evaluate different numbers of examples and generate different numbers
    of tokens, so per-block all-gathers inside the forward would not match across ranks.
    """
    if not is_sharded(model):
        yield model
        return
    modules = _fsdp_modules(model)
    for m in modules:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield model
    finally:
        for m in modules:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # the root keeps its own (FSDP's default)


def _options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_state(model: nn.Module, names: set[str] | None = None) -> dict[str, torch.Tensor]:
    """{name: whole tensor on CPU} of the parameters `names` (None: the trainable ones).

    A collective under FSDP: every rank calls it. The root module keeps its parameters unsharded after a
    forward (FSDP's default), which registers a tied LM head as a parameter of its own; resharding first
    restores the module's own parameter names (a tied head is then the embedding, as in one process).
    """
    if is_sharded(model):
        for m in _fsdp_modules(model):
            m.reshard()
    if names is None:
        names = {n for n, p in model.named_parameters() if p.requires_grad}
    if not is_sharded(model):
        return {n: p for n, p in model.named_parameters() if n in names}
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_options())
    return {n: t.detach().cpu() for n, t in state.items() if n in names}


def load_full(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy whole tensors into the (sharded) parameters of the same names; each rank keeps its own rows."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict

    set_model_state_dict(model, dict(tensors), options=_options(strict=False))  # it adds tied keys in place


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name with whole tensors (a collective under FSDP)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return {"fsdp_full": True, "state": _to_cpu(get_optimizer_state_dict(model, optimizer, options=_options()))}


def load_full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Restore `full_optimizer_state`'s dict, or a DDP / one-process `optimizer.state_dict()` (keyed by index)."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    if state.get("fsdp_full"):
        state = state["state"]
    else:  # indices follow the optimizer's parameter order: name them
        names = {id(p): n for n, p in model.named_parameters()}
        order = [names[id(p)] for g in optimizer.param_groups for p in g["params"]]
        state = {"state": {order[i]: v for i, v in state["state"].items()},
                 "param_groups": [{**g, "params": [order[i] for i in g["params"]]} for g in state["param_groups"]]}
    set_optimizer_state_dict(model, optimizer, state, options=_options())


def _to_cpu(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_to_cpu(v) for v in obj]
    return obj


# ------------------------------------------------------------------------------ sharded (DCP) checkpoints
def _reshard(model: nn.Module) -> None:
    if is_sharded(model):  # the root's unsharded parameters would rename a tied head (see full_state)
        for m in _fsdp_modules(model):
            m.reshard()


def _state(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> dict:
    """{"model": trainable parameters, "optim": AdamW state}: this rank's DTensor shards, keyed by name.

    The values are the parameters' and optimizer's own storage (no copy), so `dcp.load` fills them in place.
    """
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    _reshard(model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    state = {"model": {n: t for n, t in get_model_state_dict(model).items() if n in names}}
    if optimizer is not None:  # an optimizer that has not stepped yet gets its state initialised (lr 0)
        state["optim"] = get_optimizer_state_dict(model, optimizer)
    return state


def _raise_first(err: BaseException) -> None:
    """DCP gathers the ranks' failures into a CheckpointException (a BaseException): raise the first one."""
    from torch.distributed.checkpoint.api import CheckpointException

    if isinstance(err, CheckpointException) and err.failures:
        first, _ = err.failures[min(err.failures)]
        raise first from None
    raise err


def sharded_writer(model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None) -> Callable[[Path], None]:
    """`write(directory)`: this rank's shards of the parameters (and optimizer state) into a DCP directory.

    A collective: every rank calls it with the same directory (a shared filesystem across nodes).
    """
    def write(directory: Path) -> None:
        import torch.distributed.checkpoint as dcp

        try:
            with _single_process_is_meant():
                dcp.save(_state(model, optimizer), storage_writer=dcp.FileSystemWriter(str(directory)))
        except BaseException as err:
            _raise_first(err)

    return write


@contextlib.contextmanager
def _single_process_is_meant():
    """DCP warns when it runs without a process group: one plain process is what we mean there."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to (load|save) in a single process")
        yield


def _metadata(directory: Path):
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(str(directory)).read_metadata().state_dict_metadata


def sharded_names(directory: Path) -> set[str]:
    """The parameter names a DCP checkpoint holds (read from its .metadata)."""
    return {key[len("model."):] for key in _metadata(directory) if key.startswith("model.")}


def _dcp_load(state: dict, directory: Path, no_dist: bool = False) -> None:
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    no_dist = no_dist or not (dist.is_available() and dist.is_initialized())
    with _single_process_is_meant():
        try:
            dcp.load(state, storage_reader=dcp.FileSystemReader(str(directory)), no_dist=no_dist)
        except BaseException as err:
            _raise_first(err)


def load_sharded(model: nn.Module, directory: Path, optimizer: Optional[torch.optim.Optimizer] = None) -> None:
    """Load a DCP checkpoint into `model` (and `optimizer`): FSDP with any process count, or one plain process.

    DCP reads from every rank's files the rows this rank holds (resharding when the process count changed).
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict, \
        set_optimizer_state_dict

    state = _state(model, optimizer)
    _dcp_load(state, directory)
    set_model_state_dict(model, state["model"], options=StateDictOptions(strict=False))  # tied keys: not saved
    if optimizer is not None:
        set_optimizer_state_dict(model, optimizer, state["optim"])


def read_sharded(directory: Path) -> dict[str, torch.Tensor]:
    """{name: whole tensor} of a DCP checkpoint's parameters, in this one process (reports, tests)."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    tensors = {key[len("model."):]: torch.empty(meta.size, dtype=meta.properties.dtype)
               for key, meta in _metadata(directory).items()
               if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)}
    state = {"model": tensors}
    _dcp_load(state, directory, no_dist=True)
    return state["model"]
