"""The runner's MIGU for one phase: whether the phase is masked, with which options, over which tokens.

    migu = phase_migu(cfg.migu, model, method, index)   # None: this phase trains without MIGU
    before_forward = token_masker(migu, cfg.migu)        # None, or sets the token mask of each micro-batch

`migu.first_task: skip` (the reference code's `--is_first_task True`) leaves phase 0 unmasked, so its
losses and accuracy row are those of the run without MIGU; `mask` masks every phase.
`migu.tokens: answer` counts only the positions that predict an answer token (`labels[:, 1:] != -100`,
shifted onto the position that predicts it) through `MIGU.set_token_mask`.
"""

from __future__ import annotations

from typing import Callable, Optional

import torch

from migu.core import MIGU
from migu.data import IGNORE_INDEX
from migu.seq2seq import is_encoder_decoder


def phase_migu(options, model, method, index: int) -> Optional[MIGU]:
    """The MIGU hooks of phase `index` of a run with MIGU options `options` (a `MiguConfig`), or None."""
    if not options.enabled or (index == 0 and options.first_task == "skip"):
        return None
    targets = options.target_modules or method.migu_target_modules()
    return MIGU(model, threshold=options.threshold, target_modules=targets, mode=options.mode,
                include_lm_head=options.include_lm_head, lora_b=options.lora_b)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: position t is True when it predicts an answer token (labels[:, t + 1] != -100)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def token_masker(migu: Optional[MIGU], options) -> Optional[Callable[[dict], None]]:
    """For `tokens: answer`, a callback that sets each micro-batch's answer positions as MIGU's token mask."""
    if migu is None or options.tokens == "all":
        return None
    if is_encoder_decoder(migu.model):
        # every real decoder position predicts a target token (its decoder_attention_mask already says so);
        # encoder layers see only the prompt and count its real tokens under either setting
        return None
    return lambda batch: migu.set_token_mask(answer_positions(batch["labels"]))
