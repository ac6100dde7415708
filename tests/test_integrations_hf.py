"""MiguCallback in a real transformers.Trainer: masked rows do not move under plain SGD."""

import torch
from transformers import Trainer, TrainingArguments

from migu import MiguCallback

from tests.test_core import batch, llama


class Rows(torch.utils.data.Dataset):
    def __init__(self):
        self.ids, self.mask = batch(8, seed=3)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": self.mask[i], "labels": self.ids[i]}


def test_trainer_callback_masks_rows_and_cleans_up(tmp_path):
    model = llama(seed=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    callback = MiguCallback(threshold=0.7)
    args = TrainingArguments(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=2,
                             max_steps=1, learning_rate=0.5, optim="sgd", weight_decay=0.0, max_grad_norm=0.0,
                             report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True)
    Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[callback]).train()
    params = dict(model.named_parameters())
    assert len(callback.last_masks) == 14
    for name, mask in callback.last_masks.items():
        w, w0 = params[name + ".weight"], before[name + ".weight"]
        assert torch.equal(w[~mask], w0[~mask]), name          # dropped rows never moved
        assert (w[mask] != w0[mask]).any(dim=1).all(), name    # every kept row moved
    assert callback.migu is None
    assert all(not m._forward_hooks for m in model.modules())


def test_callback_rejects_bad_threshold_early():
    import pytest

    with pytest.raises(ValueError, match="1.5"):
        MiguCallback(threshold=1.5)
