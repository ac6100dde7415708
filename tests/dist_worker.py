"""`migu` CLI entry for the multi-process tests, started by torchrun (not collected by pytest).

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/dist_worker.py run CONFIG --quiet

Test-only hooks, set through the environment (the library has none):
    MIGU_TEST_DUMP=DIR        after every phase, each rank saves its trainable parameters to
                              DIR/rank<R>_phase<I>.pt (to compare the replicas bit for bit)
    MIGU_TEST_KILL=RANK:STEP  that rank SIGKILLs itself after its STEP-th optimizer step of the run
    MIGU_TEST_TERM=RANK:STEP  that rank sends itself SIGTERM in its STEP-th optimizer step (a preemption
                              seen by one process only)
"""

import os
import signal
import sys

import torch

import migu.train as train
from migu import distributed, fsdp
from migu.methods.base import Method

rank = int(os.environ.get("RANK", "0"))

dump = os.environ.get("MIGU_TEST_DUMP")
if dump:
    real_phase = train._Run._train_phase

    def train_phase(self, index, name, tasks):
        real_phase(self, index, name, tasks)
        if fsdp.is_sharded(self.model):  # FSDP: whole tensors (a collective), and how this rank ran
            params = fsdp.full_state(self.model, {n for n, p in self.model.named_parameters() if p.requires_grad})
            first = next(p for p in self.model.parameters() if p.requires_grad)
            info = {"world": distributed.world_size(), "local_rows": first.to_local().shape[0],
                    "rows": first.shape[0],
                    "accelerate_fsdp": os.environ.get("ACCELERATE_USE_FSDP")}
            torch.save(info, os.path.join(dump, f"rank{rank}_fsdp.pt"))
        else:
            params = {n: p.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}
        torch.save(params, os.path.join(dump, f"rank{rank}_phase{index}.pt"))

    train._Run._train_phase = train_phase

kill = os.environ.get("MIGU_TEST_KILL")
if kill and int(kill.split(":")[0]) == rank:
    at, seen = int(kill.split(":")[1]), {"n": 0}
    real_after_step = Method.after_step

    def after_step(self, step):
        seen["n"] += 1
        if seen["n"] == at:
            os.kill(os.getpid(), signal.SIGKILL)
        real_after_step(self, step)

    Method.after_step = after_step

term = os.environ.get("MIGU_TEST_TERM")
if term and int(term.split(":")[0]) == rank:
    term_at, term_seen = int(term.split(":")[1]), {"n": 0}
    term_after_step = Method.after_step

    def after_step_term(self, step):
        term_seen["n"] += 1
        if term_seen["n"] == term_at:
            os.kill(os.getpid(), signal.SIGTERM)
        term_after_step(self, step)

    Method.after_step = after_step_term

from migu.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
