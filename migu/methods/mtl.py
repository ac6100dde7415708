"""`mtl`: the multi-task upper bound — every task's training data in one phase, then one evaluation.

Differs from `seq-ft` only in `phases`: a single phase named "all" trains on the union of every
task's training examples (shuffled together by the loop), so the accuracy matrix has one row and
there is nothing to forget; the summary reports AA of that row (BWT and FWT do not apply).
"""

from __future__ import annotations

from migu.methods.seq_ft import SeqFT


class MTL(SeqFT):
    """Multi-task learning: full fine-tuning on all tasks at once (the usual upper bound)."""

    name = "mtl"

    def phases(self, tasks):
        return [("all", list(tasks))]
