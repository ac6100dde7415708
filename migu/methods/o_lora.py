"""`o-lora`: IncLoRA plus an orthogonality loss between the new adapter's A and every earlier A.

Differs from `inc-lora` only in `extra_loss` (Wang et al., 2023, "Orthogonal Subspace Learning for
Language Model Continual Learning"):

    lambda1 * sum over LoRA layers, sum over earlier adapters a of  sum_ij |(A_a A_new^T)_ij|
  + lambda2 * sum over the new adapter's A and B matrices of ||W||_F^2

The first term pushes the rows of the new A (the subspace the new task writes through) towards
orthogonality with the rows of every earlier A; the second is an L2 penalty on the new adapter.
Note: the O-LoRA reference code uses the (unsquared) Frobenius norm for the second term; migu uses the
squared norm, as issue 5 specifies. With the default lambda2 = 0 the two agree. The loss is a function
of the parameters only; the loop counts it once per optimizer step, whatever `grad_accum` is.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from migu.methods.base import LoraOptions
from migu.methods.inc_lora import IncLoRA, lora_layers


@dataclass
class OLoraOptions(LoraOptions):
    """IncLoRA settings plus the O-LoRA loss weights."""

    lambda1: float = 0.5
    """Weight of the orthogonality loss sum |A_old A_new^T| (summed over layers and earlier adapters)."""
    lambda2: float = 0.0
    """Weight of the squared L2 norm of the new adapter's A and B matrices."""

    def validate(self, key: str) -> None:
        super().validate(key)
        if self.lambda1 < 0:
            raise ValueError(f"{key}.lambda1={self.lambda1}: must be >= 0")
        if self.lambda2 < 0:
            raise ValueError(f"{key}.lambda2={self.lambda2}: must be >= 0")


class OLoRA(IncLoRA):
    """Orthogonal-subspace LoRA: IncLoRA whose new A is pushed orthogonal to the earlier adapters' A."""

    name = "o-lora"
    Options = OLoraOptions

    def orthogonality_loss(self) -> torch.Tensor:
        """sum over layers and earlier adapters of sum |A_old A_new^T| (0 while there is one adapter)."""
        terms = [(old.detach() @ new.T).abs().sum() for new, olds in self.new_and_old_A() for old in olds]
        return torch.stack(terms).sum() if terms else torch.zeros(())

    def l2_loss(self) -> torch.Tensor:
        """Squared Frobenius norm of the new adapter's A and B matrices, summed over layers."""
        newest = self.adapter(self.n_adapters - 1)
        terms = [layer.lora_A[newest].weight.pow(2).sum() + layer.lora_B[newest].weight.pow(2).sum()
                 for _, layer in lora_layers(self.model)]
        return torch.stack(terms).sum()

    def extra_loss(self, model, batch, outputs):
        o = self.options
        loss = None
        if o.lambda1 and self.n_adapters > 1:
            loss = o.lambda1 * self.orthogonality_loss()
        if o.lambda2:
            loss = o.lambda2 * self.l2_loss() + (loss if loss is not None else 0.0)
        return loss
