"""MIGU: magnitude-based gradient updating (Du et al., 2024), as a model-agnostic hook set.

For every targeted linear layer the forward hooks accumulate, per output unit j, the sum of |y_j| over the
non-padding tokens of every micro-batch of one optimizer step (float32) and the token count. Before the
optimizer step, :meth:`MIGU.mask_gradients` L1-normalises the mean magnitudes per layer, keeps the units
among the top ``ceil((1 - T) * d_out)`` and zeroes the gradient rows (weight row j, bias j) of the others.

LoRA (PEFT ``LoraLayer``): rows of ``lora_A`` are ranked by the magnitudes of the A-path output (r units);
rows of ``lora_B`` by the magnitudes of the whole layer output (base + scaled LoRA, ``lora_b="layer"``, the
paper's text) or of B's own output (``lora_b="own"``, the reference code). Frozen parameters are never
targeted. ``include_lm_head=True`` adds the LM head (rows = vocabulary entries).

Ranking and masking run on the statistics' device without a host synchronisation in ``"grad"`` mode
(one sort per group of equally sized layers), so a GPU is never stalled per layer.

This module imports only torch (and migu._units, its torch-only targeting helpers): it knows modules, hooks
and gradients, never tasks, configs or loops.
"""

from __future__ import annotations

import math
from contextlib import contextmanager

import torch
from torch import nn

from migu._units import (_is_conv1d, _is_lora_layer, _local_rows, _Unit, _unsupported_wrapper, find_units, output_head,
                         units_for)

__all__ = ["MIGU", "keep_count", "check_options"]

_MODES = ("grad", "update")
LORA_B_RULES = ("layer", "own")


def check_options(threshold, mode: str, lora_b: str = "layer") -> None:
    """Raise ``ValueError`` naming the offending value if ``threshold``, ``mode`` or ``lora_b`` is invalid."""
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0.0 <= threshold < 1.0:
        raise ValueError(f"MIGU threshold must be a number in [0, 1), got {threshold!r}")
    if mode not in _MODES:
        raise ValueError(f"MIGU mode must be one of {_MODES}, got {mode!r}")
    if lora_b not in LORA_B_RULES:
        raise ValueError(f"MIGU lora_b must be one of {LORA_B_RULES}, got {lora_b!r}")


def _in_backward() -> bool:
    # True while the autograd engine runs a backward pass (gradient checkpointing recomputes forwards there)
    task_id = getattr(torch._C, "_current_graph_task_id", None)
    return task_id is not None and task_id() != -1


def keep_count(threshold: float, d_out: int) -> int:
    """Number of units whose gradient rows are kept: ``ceil((1 - T) * d_out)``.

    The product is rounded to 9 decimals first so that e.g. ``(1 - 0.7) * 10`` (= 3.0000000000000004 in
    floating point) keeps 3 units, as the paper's ``d_out - floor(T * d_out)`` does.
    """
    return min(d_out, max(1, math.ceil(round((1.0 - threshold) * d_out, 9))))



class MIGU:
    """Magnitude-based gradient masking for any ``nn.Module`` (plain PyTorch, HF, PEFT LoRA).

    Args:
        model: the model to train. Hooks are attached to its targeted linear layers.
        threshold: T in [0, 1): the fraction of output units per layer whose gradient rows are zeroed.
            T = 0 keeps every row (training is bit-identical to training without MIGU).
        target_modules: ``None`` targets every trainable ``nn.Linear`` / HF ``Conv1D`` (or PEFT LoRA layer)
            inside the repeated transformer blocks, never embeddings or the LM head. A list of names
            selects explicitly, PEFT style (``"q_proj"`` matches ``model.layers.0.self_attn.q_proj``); a
            string is a regular expression that must match the full module name. A pattern that matches
            nothing is an error.
        mode: ``"grad"`` zeroes the gradient rows of low-magnitude units (the paper). ``"update"`` also
            guarantees those rows are exactly unchanged by the optimizer step, even under AdamW momentum
            and weight decay: their values are saved in :meth:`mask_gradients` and restored by
            :meth:`reset` (or right after ``optimizer.step()`` when ``optimizer`` is given).
        optimizer: optional; in ``"update"`` mode the frozen rows are restored by a step post-hook.
        sync: all-reduce statistics across ranks when ``torch.distributed`` is initialised (default True).
        include_lm_head: also rank the LM head (``model.get_output_embeddings()``, else the module named
            ``lm_head``): its rows (vocabulary entries) by the mean |logit| over the counted positions. A
            tied input embedding is the same tensor, so masking the head's gradient rows masks the
            embedding's rows of those tokens too (the gradient of the shared tensor holds both). A frozen
            head (LoRA) has nothing to mask and is skipped; a model without a head is an error.
        lora_b: ``"layer"`` ranks ``lora_B``'s rows by the whole layer output (base + scaled LoRA path, the
            paper's text); ``"own"`` by B's own output ``B·A·x`` (the reference code), so every row is kept
            while that output is all zero (B initialised to zero: the first step of a fresh adapter).

    Padding: each targeted module learns the token mask from the ``attention_mask`` keyword argument of
    the model's forward call (a forward pre-hook on ``model``), or from :meth:`set_token_mask`. Without a
    mask, or when a module's output does not have the mask's [batch, length] leading shape, all positions
    count. Statistics are only accumulated while autograd is enabled (evaluation under ``no_grad`` is
    ignored, and such a pass does not replace the captured mask) unless inside :meth:`observe`.

    LM head positions: HF models compute logits only at the positions selected by the forward's
    ``logits_to_keep`` keyword (an int k: the last k positions, 0 = all; a 1-D index tensor: those
    positions), so the head's counted positions are the kept positions, with the token mask (attention
    mask or :meth:`set_token_mask`) sliced to them: a kept position counts when its token is real (resp.
    selected by the token mask).

    Gradient checkpointing: a forward recomputed during backward is not counted again when its first pass
    was counted (non-reentrant checkpointing), so statistics equal those without checkpointing; with
    reentrant checkpointing (first pass under ``no_grad``) the recomputation is what counts, with the
    mask captured by the micro-batch's model forward.

    Example:
        >>> migu = MIGU(model, threshold=0.7)
        >>> loss.backward(); migu.mask_gradients(); optimizer.step(); optimizer.zero_grad(); migu.reset()
    """

    def __init__(self, model: nn.Module, threshold: float = 0.7, target_modules=None, mode: str = "grad",
                 optimizer: torch.optim.Optimizer | None = None, sync: bool = True, include_lm_head: bool = False,
                 lora_b: str = "layer"):
        check_options(threshold, mode, lora_b)
        engine = _unsupported_wrapper(model)
        if engine is not None:
            # ZeRO / FSDP reduce gradients into their own sharded flat buffers during backward: masking the
            # module's .grad would silently do nothing, so refuse instead of training without MIGU
            raise ValueError(f"MIGU does not support {engine}: its gradients are sharded outside param.grad; "
                             "use DDP (torchrun) or a single process")
        self.model = model
        self.threshold = float(threshold)
        self.mode = mode
        self.sync = sync
        self.include_lm_head = bool(include_lm_head)
        self.lora_b = lora_b
        self.enabled = True
        self._explicit_mask: dict[bool, torch.Tensor | None] = {False: None, True: None}  # key: decoder side
        self._auto_mask: dict[bool, torch.Tensor | None] = {False: None, True: None}
        self._logits_to_keep = None
        self._weights_key, self._weights_value = None, None
        self._scratch: dict[torch.device, torch.Tensor] = {}  # see _abs_float32
        self._forward_id = 0
        self._force_observe = False
        self._last_masks: dict[str, torch.Tensor] = {}
        self.units = find_units(model, target_modules, lora_b)
        self._add_head(model, lora_b)
        if not self.units:
            raise ValueError(
                f"MIGU found no trainable nn.Linear / Conv1D / LoRA layer to target in {type(model).__name__}"
                f" (target_modules={target_modules!r})"
            )
        if getattr(getattr(model, "config", None), "is_encoder_decoder", False):
            # encoder and decoder sequences have their own lengths and masks; a matching shape is no proof
            for unit in self.units:
                unit.decoder = unit.kept_positions or "decoder" in unit.name.split(".")
        self._handles = [model.register_forward_pre_hook(self._capture_mask, with_kwargs=True)]
        for unit in self.units:
            self._handles.append(unit.module.register_forward_hook(self._make_hook(unit)))
        if optimizer is not None and mode == "update":
            self._handles.append(optimizer.register_step_post_hook(lambda *_: self._restore_frozen()))

    # ----------------------------------------------------------------------------------- targeting
    def _add_head(self, model: nn.Module, lora_b: str) -> None:
        """Mark the LM head's units (counted over the kept logit positions); add them if include_lm_head."""
        found = output_head(model)
        if found is None:
            if self.include_lm_head:
                raise ValueError(f"MIGU include_lm_head: {type(model).__name__} has no LM head "
                                 "(get_output_embeddings() or a module named lm_head)")
            return
        name, head = found
        inside = [u for u in self.units if u.name == name or u.name.startswith(name + ".")]
        if self.include_lm_head and not inside:
            if not (_is_lora_layer(head) or isinstance(head, nn.Linear) or _is_conv1d(head)):
                raise ValueError(f"MIGU include_lm_head: the LM head {name} is a {type(head).__name__}, "
                                 "not a linear layer")
            # a frozen head (LoRA runs) has no trainable rows: nothing to add
            inside = units_for(name, head, lora_b) if _is_lora_layer(head) or head.weight.requires_grad else []
            self.units += inside
        for unit in inside:
            unit.kept_positions = True


    # ----------------------------------------------------------------------------------- statistics
    def _capture_mask(self, module, args, kwargs):
        if not (torch.is_grad_enabled() or self._force_observe):
            return  # an evaluation or teacher pass (I-LoRA's slow adapter) must not replace the training mask
        for decoder, key in ((False, "attention_mask"), (True, "decoder_attention_mask")):
            mask = kwargs.get(key)
            self._auto_mask[decoder] = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None
        self._logits_to_keep = kwargs.get("logits_to_keep")
        self._forward_id += 1
        self._weights_key = None  # a reused mask buffer may hold new values

    def _kept(self, mask: torch.Tensor | None) -> torch.Tensor | None:
        """``mask`` [batch, length] sliced to the positions whose logits the forward keeps (HF semantics)."""
        keep = self._logits_to_keep
        if mask is None or keep is None:
            return mask
        if isinstance(keep, int) and not isinstance(keep, bool):
            return mask if keep == 0 else mask[:, -keep:]
        if isinstance(keep, torch.Tensor) and keep.dim() == 1:
            return mask[:, keep.to(mask.device)]
        return mask

    def set_token_mask(self, mask: torch.Tensor | None, decoder: bool = False) -> None:
        """Use ``mask`` ([batch, length], nonzero = real token) for the following forward passes; None clears.

        Encoder-decoder models: ``decoder=True`` sets the decoder layers' mask (else the model forward's
        ``decoder_attention_mask`` is used), ``False`` the encoder's (else ``attention_mask``).
        """
        self._explicit_mask[bool(decoder)] = mask
        self._weights_key = None

    @contextmanager
    def observe(self):
        """Accumulate statistics even under ``torch.no_grad()`` (e.g. to measure a task's magnitudes)."""
        previous, self._force_observe = self._force_observe, True
        try:
            yield self
        finally:
            self._force_observe = previous

    def _make_hook(self, unit: _Unit):
        def hook(module, inputs, output):
            if not self.enabled or not (torch.is_grad_enabled() or self._force_observe):
                return
            if _in_backward() and unit.counted_in == self._forward_id:
                return  # gradient checkpointing recomputes a forward this unit already counted
            unit.counted_in = self._forward_id
            y = output[0] if isinstance(output, (tuple, list)) else output
            y = y.detach()
            flat = self._abs_float32(y)
            side = unit.decoder
            mask = self._explicit_mask[side] if self._explicit_mask[side] is not None else self._auto_mask[side]
            if unit.kept_positions:
                mask = self._kept(mask)
            if mask is not None and tuple(mask.shape) == tuple(y.shape[:-1]):
                weights, count = self._weights(mask, y.device)
                unit.sum.addmv_(flat.t(), weights)  # one matvec: no Python loop, no kept activations
                unit.count += count
            else:
                unit.sum += flat.sum(0)
                unit.count += flat.shape[0]

        return hook

    def _abs_float32(self, y: torch.Tensor) -> torch.Tensor:
        """|y| as float32 [positions, units], written into one buffer reused by every layer and step.

        A fresh multi-MB tensor per layer is the statistics' largest cost on CPU (page faults of new
        allocations, measured 180 ms a step for SmolLM2 under bf16); values equal `y.abs().float()`.
        """
        d, n = y.shape[-1], y.numel()
        buffer = self._scratch.get(y.device)
        if buffer is None or buffer.numel() < n:
            buffer = self._scratch[y.device] = torch.empty(n, dtype=torch.float32, device=y.device)
        out = buffer[:n].view(-1, d)
        if y.dtype == torch.float32:
            return torch.abs(y.reshape(-1, d), out=out)
        return out.copy_(y.reshape(-1, d)).abs_()

    def _weights(self, mask: torch.Tensor, device) -> tuple[torch.Tensor, torch.Tensor]:
        """The token mask as float32 weights and their sum, converted once per mask for all units."""
        key = (id(mask), device)
        if self._weights_key != key:
            weights = mask.reshape(-1).to(device=device, dtype=torch.float32)
            # the mask is kept referenced with its conversion, so its id cannot be reused while cached
            self._weights_key, self._weights_value = key, (weights, weights.sum(), mask)
        return self._weights_value[:2]

    def _synced_sums(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(sum, count) per unit, all-reduced over ranks so every rank ranks the same numbers."""
        sums = [u.sum for u in self.units]
        counts = [u.count for u in self.units]
        dist = torch.distributed
        if self.sync and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            flat = torch.cat([s.double() for s in sums] + [torch.stack(counts).to(sums[0].device)])
            dist.all_reduce(flat)  # one collective for all layers
            sizes = [u.size for u in self.units]
            parts = list(torch.split(flat[: sum(sizes)], sizes))
            sums = [p.float() for p in parts]
            counts = list(flat[sum(sizes):])  # stays on the device: no host transfer
        return list(zip(sums, counts))

    def magnitudes(self) -> dict[str, torch.Tensor]:
        """{unit name: L1-normalised mean |output| per unit (float32)} of the current accumulation."""
        out = {}
        for unit, (total, count) in zip(self.units, self._synced_sums()):
            # a device-side division (token counts < 2**24 are exact in float32): no host sync per layer
            mean = total / count.to(device=total.device, dtype=torch.float32).clamp_min(1.0)
            out[unit.name] = (mean / mean.sum().clamp_min(torch.finfo(torch.float32).tiny)).float()
        return out

    def _rank(self, magnitudes: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        # one stable sort per group of equally sized units, on their device: no per-layer host sync
        groups: dict[tuple, list[_Unit]] = {}
        for unit in self.units:
            groups.setdefault((unit.size, magnitudes[unit.name].device), []).append(unit)
        masks = {}
        for (size, device), units in groups.items():
            k = keep_count(self.threshold, size)
            if k >= size:
                for unit in units:
                    masks[unit.name] = torch.ones(size, dtype=torch.bool, device=device)
                continue
            stacked = torch.stack([magnitudes[u.name] for u in units])  # [units, size]
            # stable: equal magnitudes keep the lower index first, on every rank and every run
            order = torch.sort(stacked, dim=1, descending=True, stable=True).indices[:, :k]
            kept = torch.zeros_like(stacked, dtype=torch.bool).scatter_(1, order, True)
            kept |= ~stacked.any(1, keepdim=True)  # nothing measured (all zero): no basis to drop rows
            for unit, row in zip(units, kept):
                masks[unit.name] = row
        return {unit.name: masks[unit.name] for unit in self.units}

    def masks(self) -> dict[str, torch.Tensor]:
        """{unit name: bool mask, True = gradient row kept}: of the current statistics, or the last used."""
        if not any(float(u.count) for u in self.units) and self._last_masks:
            return dict(self._last_masks)
        return self._rank(self.magnitudes())

    # ----------------------------------------------------------------------------------- masking
    def mask_gradients(self) -> dict[str, torch.Tensor]:
        """Zero the gradient rows of low-magnitude units; call after backward, before clipping and step.

        Returns:
            The masks used, {unit name: bool tensor}.
        """
        if not self.enabled or self.threshold == 0.0:
            return {}
        masks = self._rank(self.magnitudes())
        with torch.no_grad():
            for unit in self.units:
                mask = masks[unit.name]
                if keep_count(self.threshold, unit.size) >= unit.size:
                    continue  # every row kept (known without looking at the mask: no host sync)
                for param, dim in unit.params:
                    shape = [1] * param.dim()
                    shape[dim] = -1
                    if param.grad is not None:  # FSDP2: this rank's rows of the gradient, its slice of the mask
                        grad, local_mask = _local_rows(param.grad, dim, mask)
                        # a multiply by 0/1 is ~5x faster than masked_fill_ on CPU (same values; a NaN/inf in
                        # a dropped row stays non-finite, so fp16 overflow checks still see it)
                        grad.mul_(local_mask.view(shape).to(grad.dtype))
                    if self.mode == "update":  # saved and restored on this rank's shard of the parameter
                        values, local_mask = _local_rows(param.detach(), dim, mask)
                        drop = (~local_mask).nonzero().squeeze(1)
                        unit.frozen.append((values, dim, drop, values.index_select(dim, drop).clone()))
        self._last_masks = masks
        return masks

    def _restore_frozen(self) -> None:
        with torch.no_grad():
            for unit in self.units:
                for param, dim, index, rows in unit.frozen:
                    param.index_copy_(dim, index, rows)
                unit.frozen.clear()

    def reset(self) -> None:
        """Start a new accumulation (call after ``optimizer.step()``); restores frozen rows in "update" mode."""
        self._restore_frozen()
        for unit in self.units:
            unit.sum.zero_()
            unit.count.zero_()

    def extra_bytes(self) -> int:
        """Persistent memory MIGU holds: one float32 per output unit per targeted layer (+ one count each).

        Not counted: the scratch buffer of `_abs_float32` (the largest targeted layer output of one micro-batch
        in float32, e.g. 6 MB for SmolLM2 at 8 × 128 tokens), reused by every layer and freed by `remove`.
        """
        return sum(u.sum.numel() * u.sum.element_size() + u.count.element_size() for u in self.units)

    def remove(self) -> None:
        """Remove every hook; the model is exactly as before MIGU was attached."""
        self._restore_frozen()
        for handle in self._handles:
            handle.remove()
        self._handles.clear()
        self._scratch.clear()

    def __repr__(self) -> str:
        return (f"MIGU(threshold={self.threshold}, mode={self.mode!r}, units={len(self.units)}, "
                f"include_lm_head={self.include_lm_head}, lora_b={self.lora_b!r})")
