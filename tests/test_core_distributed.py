"""MIGU under torch.distributed (issue 3, semantics 8): 2 gloo processes on CPU with DDP."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel as DDP

from migu import MIGU

from tests.test_core import batch, llama, lm_loss_sum

pytestmark = pytest.mark.distributed
STEPS, GLOBAL_BATCH = 3, 8


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(model, shard, world):
    """AdamW steps with MIGU; the loss is normalised by the GLOBAL token count so DDP's gradient mean
    equals the single-process gradient of the concatenated batch."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    migu = MIGU(model, threshold=0.7)
    masks = []
    for step in range(STEPS):
        ids, mask = batch(GLOBAL_BATCH, seed=10 + step, pad_last=step)
        total = mask[:, 1:].sum()
        ids, mask = ids.chunk(world)[shard], mask.chunk(world)[shard]
        (lm_loss_sum(model, ids, mask) * world / total).backward()  # DDP divides by world
        masks.append({k: v.clone() for k, v in migu.mask_gradients().items()})
        opt.step(); opt.zero_grad(); migu.reset()
    return masks


def worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        model = DDP(llama(seed=7))
        masks = train(model, rank, world)
        torch.save({"params": model.module.state_dict(), "masks": masks}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_two_ranks_identical_params_and_equal_to_single_process(tmp_path):
    mp.spawn(worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1))
    for k in r0["params"]:
        assert torch.equal(r0["params"][k], r1["params"][k]), k  # bit-identical across ranks

    single = llama(seed=7)
    single_masks = train(single, 0, 1)
    for step in range(STEPS):
        for k, m in single_masks[step].items():
            assert torch.equal(r0["masks"][step][k.removeprefix("module.")] if k in r0["masks"][step]
                               else r0["masks"][step]["module." + k], m), (step, k)
    for k, v in single.state_dict().items():
        torch.testing.assert_close(r0["params"][k], v, rtol=1e-4, atol=1e-5)
