"""The runner's MIGU for one phase: whether the phase is masked, with which options, over which tokens.

    migu = phase_migu(cfg.migu, model, method, index)   # NoMIGU (every call a no-op): the phase trains without
    before_forward = counting(migu, cfg.migu)            # per micro-batch: count it or not, its token mask

`migu.first_task: skip` (the reference code's `--is_first_task True`) leaves phase 0 unmasked, so its
losses and accuracy row are those of the run without MIGU; `mask` masks every phase.
`migu.tokens: answer` counts only the positions that predict an answer token (`labels[:, 1:] != -100`,
shifted onto the position that predicts it) through `MIGU.set_token_mask`. A placeholder micro-batch
(`StepRunner.shard`: a row that trains nothing) is not counted in the statistics.
"""

from __future__ import annotations

from typing import Callable

import torch

from migu.core import MIGU
from migu.data import IGNORE_INDEX
from migu.seq2seq import is_encoder_decoder


class NoMIGU:
    """A phase without MIGU: the loop makes the same calls and each does nothing, so the step reads straight."""

    enabled = True

    def set_token_mask(self, mask, decoder: bool = False) -> None:
        pass

    def mask_gradients(self) -> dict:
        return {}

    def reset(self) -> None:
        pass

    def remove(self) -> None:
        pass


def masked_phase(options, index: int) -> bool:
    """Whether MIGU masks phase `index` of a run with MIGU options `options` (first_task skip: not phase 0)."""
    return options.enabled and not (index == 0 and options.first_task == "skip")


def phase_migu(options, model, method, index: int) -> MIGU | NoMIGU:
    """The MIGU hooks of phase `index` of a run with MIGU options `options` (a `MiguConfig`), or `NoMIGU`."""
    if not masked_phase(options, index):
        return NoMIGU()
    targets = options.target_modules or method.migu_target_modules()
    return MIGU(model, threshold=options.threshold, target_modules=targets, mode=options.mode,
                include_lm_head=options.include_lm_head, lora_b=options.lora_b)


def answer_positions(labels: torch.Tensor) -> torch.Tensor:
    """[batch, length] bool: position t is True when it predicts an answer token (labels[:, t + 1] != -100)."""
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    return mask


def counting(migu: MIGU | NoMIGU, options) -> Callable[[dict, bool], None]:
    """`before_forward(batch, placeholder)` of `migu.train.step_loss`: MIGU counts the micro-batch unless it is
    a placeholder (the loop enables it again before `mask_gradients`, a collective every rank joins); for
    `tokens: answer`, its answer positions are the token mask."""
    # encoder-decoder: every real decoder position predicts a target token (its decoder_attention_mask
    # already says so); encoder layers see only the prompt and count its real tokens under either setting
    answer = isinstance(migu, MIGU) and options.tokens == "answer" and not is_encoder_decoder(migu.model)

    def before(batch: dict, placeholder: bool) -> None:
        migu.enabled = not placeholder
        if answer:
            migu.set_token_mask(answer_positions(batch["labels"]))

    return before
