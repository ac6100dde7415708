"""`seq-ft`: full fine-tuning on each task in turn (the plain sequential baseline)."""

from __future__ import annotations

from migu.methods.base import Method


class SeqFT(Method):
    """Sequential full fine-tuning: every parameter trains on each task in turn."""

    name = "seq-ft"
    default_lr = 1e-5

    def setup(self, model):
        model.requires_grad_(True)
        return model
