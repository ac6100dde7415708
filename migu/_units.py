"""Targeting for MIGU (migu.core): which modules are ranked, the rows each one gates, sharding checks.

Imports only torch, like migu.core. ``find_units`` turns a model and ``target_modules`` into ``_Unit``s
(nn.Linear, HF Conv1D, PEFT LoRA A/B); ``output_head`` finds the LM head; ``_local_rows`` maps a global row
mask onto an FSDP2 shard.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class _Unit:
    """One ranked set of output units: the module whose output is measured and the rows it gates."""

    name: str
    module: nn.Module
    params: list[tuple[nn.Parameter, int]]  # (parameter, dimension that indexes output units)
    size: int
    sum: torch.Tensor  # float32 [size]: sum of |y_j| over counted tokens
    count: torch.Tensor  # float64 scalar on the same device: number of counted tokens
    frozen: list = field(default_factory=list)  # "update" mode: (param, dim, index, saved rows)
    kept_positions: bool = False  # the LM head: its output covers only the positions whose logits are kept
    counted_in: int = -1  # the model forward whose output this unit last counted (checkpoint recomputation)
    decoder: bool = False  # encoder-decoder models: a decoder layer, counted with the decoder's token mask


def _is_conv1d(module: nn.Module) -> bool:
    # transformers.pytorch_utils.Conv1D (GPT-2 family): weight is [in, out], so output units are columns
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf") and module.weight.dim() == 2


def _is_lora_layer(module: nn.Module) -> bool:
    return isinstance(getattr(module, "lora_A", None), nn.ModuleDict) and isinstance(
        getattr(module, "lora_B", None), nn.ModuleDict
    )


def _is_fsdp2(module: nn.Module) -> bool:
    # fully_shard swaps the class for a subclass of torch.distributed.fsdp.FSDPModule (name check: no import)
    return any(c.__name__ == "FSDPModule" for c in type(module).__mro__)


def _unsupported_wrapper(model: nn.Module) -> str | None:
    """Name of a sharding engine whose gradients do not live in ``param.grad`` of the module, if any.

    FSDP2 (``fully_shard``) is supported: its ``param.grad`` is a DTensor sharded on dim 0 that the optimizer
    applies, so each rank masks its local rows. FSDP1 and DeepSpeed reduce into private flat buffers.
    """
    fsdp2 = set()
    for module in model.modules():
        kind = type(module).__name__
        if _is_fsdp2(module):
            fsdp2.update(id(p) for p in module.parameters())
        elif kind in ("FullyShardedDataParallel", "DeepSpeedEngine"):
            return kind
    for param in model.parameters():
        if type(param).__name__ == "DTensor" or type(param.data).__name__ == "DTensor":
            if id(param) not in fsdp2:
                return "DTensor parameters outside fully_shard (tensor parallelism)"
            if any(not (pl.is_replicate() or (pl.is_shard() and pl.dim == 0)) for pl in param.placements):
                return f"DTensor placements {param.placements} (only FSDP2's Shard(0) / Replicate)"
    return None


def _local_rows(tensor: torch.Tensor, dim: int, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(local tensor, the slice of the global ``mask`` its entries along ``dim`` correspond to).

    A plain tensor is its own local tensor. An FSDP2 DTensor holds rows ``[offset, offset + n)`` of the
    global tensor on this rank (torch.chunk semantics: uneven sizes leave the last ranks shorter, possibly
    empty — FSDP2's padding is not part of the local tensor); other dims are whole.
    """
    if type(tensor).__name__ != "DTensor":
        return tensor, mask
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = tensor.to_local()  # under no_grad: the DTensor's own storage, so in-place writes stick
    shape, offset = compute_local_shape_and_global_offset(tensor.shape, tensor.device_mesh, tensor.placements)
    if tuple(shape) != tuple(local.shape):
        raise RuntimeError(f"MIGU: local shard shape {tuple(local.shape)} differs from DTensor's {tuple(shape)}")
    return local, mask.narrow(0, offset[dim], shape[dim])


def _block_prefixes(model: nn.Module) -> list[str]:
    """Name prefixes of the repeated blocks (children of any nn.ModuleList), e.g. ``model.layers.3.``."""
    prefixes = []
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList):
            prefixes += [f"{name}.{child}." if name else f"{child}." for child, _ in module.named_children()]
    return prefixes


def _pattern_matches(pattern: str, name: str) -> bool:
    # PEFT convention: a bare name matches the module itself or any module whose last components equal it
    return name == pattern or name.endswith("." + pattern)


def find_units(model: nn.Module, target_modules, lora_b: str = "layer") -> list[_Unit]:
    """The units MIGU ranks: trainable linear / Conv1D / LoRA layers chosen by ``target_modules`` (see MIGU)."""
    lora_children = set()
    candidates: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if _is_lora_layer(module):
            lora_children.update(id(m) for m in module.lora_A.values())
            lora_children.update(id(m) for m in module.lora_B.values())
            candidates.append((name, module))
        elif (isinstance(module, nn.Linear) or _is_conv1d(module)) and id(module) not in lora_children:
            if module.weight.requires_grad:
                candidates.append((name, module))
    if target_modules is None:
        blocks = _block_prefixes(model)
        chosen = [
            (n, m) for n, m in candidates
            if any(n.startswith(p) for p in blocks) and "embed" not in n and "lm_head" not in n
        ]
    else:
        if isinstance(target_modules, str):
            regex = re.compile(target_modules)
            chosen = [(n, m) for n, m in candidates if regex.fullmatch(n)]
            if not chosen:
                raise ValueError(f"MIGU target_modules regex {target_modules!r} matched no trainable layer")
        else:
            patterns = list(target_modules)
            for p in patterns:
                if not any(_pattern_matches(p, n) for n, _ in candidates):
                    raise ValueError(f"MIGU target_modules pattern {p!r} matched no trainable linear layer")
            chosen = [(n, m) for n, m in candidates if any(_pattern_matches(p, n) for p in patterns)]
    units = []
    for name, module in chosen:
        units += units_for(name, module, lora_b)
    return units


def output_head(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(name, module) of the LM head: ``get_output_embeddings()``, else a module named ``lm_head``."""
    get = getattr(model, "get_output_embeddings", None)
    head = get() if callable(get) else None
    for name, module in model.named_modules():
        if (module is head) if head is not None else (name == "lm_head" or name.endswith(".lm_head")):
            return name, module
    return None


def units_for(name: str, module: nn.Module, rule: str = "layer") -> list[_Unit]:
    """The units of one layer: its output rows, or per adapter LoRA A's and B's rows (``rule`` ranks B)."""
    def rows(*pairs):
        return [(p, d) for p, d in pairs if p is not None and p.requires_grad]

    def new(unit_name, hooked, params, size, ref):
        dev = ref.device
        return _Unit(unit_name, hooked, params, size, torch.zeros(size, dtype=torch.float32, device=dev),
                     torch.zeros((), dtype=torch.float64, device=dev))

    if not _is_lora_layer(module):
        dim = 1 if _is_conv1d(module) else 0
        params = rows((module.weight, dim), (module.bias, 0))
        return [new(name, module, params, module.weight.shape[dim], module.weight)] if params else []
    units = []
    for adapter, lora_a in module.lora_A.items():
        lora_b = module.lora_B[adapter]
        if not isinstance(lora_a, nn.Linear):
            continue  # embedding / conv LoRA variants are not linear layers in the paper's sense
        a_params = rows((lora_a.weight, 0), (lora_a.bias, 0))
        b_params = rows((lora_b.weight, 0), (lora_b.bias, 0))
        if a_params:  # ranked by x·Aᵀ, the A-path output (r units)
            units.append(new(f"{name}.lora_A.{adapter}", lora_a, a_params, lora_a.out_features, lora_a.weight))
        if b_params:  # "layer": ranked by the full layer output (base + scaled LoRA path); "own": by B·A·x
            hooked = lora_b if rule == "own" else module
            units.append(new(f"{name}.lora_B.{adapter}", hooked, b_params, lora_b.out_features, lora_b.weight))
    return units
