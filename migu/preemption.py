"""Stopping a run cleanly and continuing it exactly: signals, step checkpoints inside a task, RNG states.

    SIGTERM / SIGINT (a scheduler's preemption, a reclaimed spot instance, Ctrl-C): the run finishes the
    optimizer step in progress, writes a step checkpoint, records `status: interrupted` in state.json and
    exits with 128 + the signal number (143 for SIGTERM, 130 for SIGINT, the shell's convention) and one
    line saying how to resume. A signal that arrives outside training (an evaluation, a task-end
    checkpoint) stops the run after that phase's checkpoint. A second signal stops at once
    (KeyboardInterrupt, exit 130); the files are still whole and --resume continues from the last checkpoint.

    train.save_every_steps / train.save_every_minutes: step checkpoints during a task as well.

A step checkpoint holds the trainable parameters, the method's state, the optimizer (and fp16 loss
scaler) state, every rank's RNG states and the position (phase, epoch, optimizer step). The data order
needs no saving: every phase's plan is a pure function of (seed, phase, epoch), and on resume the loop
replays `method.mix_batch` for the steps already done (no forward or backward) so a method's sampling
RNG is where it was. With several processes every decision (save, stop) is taken together (one small
all-reduce a step), so all ranks stop after the same step.
"""

from __future__ import annotations

import random
import signal
import sys
import threading
import time
from typing import Optional

import numpy as np
import torch

from migu import distributed

SIGNALS = (signal.SIGTERM, signal.SIGINT)


class Interrupted(Exception):
    """The run stopped on a signal at a safe point; `exit_code` is 128 + the signal number."""

    def __init__(self, signum: int, where: str, saved: bool):
        self.signum, self.where, self.saved = signum, where, saved
        self.exit_code = 128 + signum
        what = "checkpoint written" if saved else "no checkpoint (train.checkpoint=false): a resume starts over"
        super().__init__(f"interrupted by {signal.Signals(signum).name} {where}; {what}")


class StopSignals:
    """Context manager: the first SIGTERM/SIGINT is noted (`signum`), a second raises KeyboardInterrupt.

    Installed only in the main thread (Python delivers signals there); elsewhere a no-op. The previous
    handlers come back on exit.
    """

    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.signum: Optional[int] = None
        self._previous: dict = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt  # the second signal: stop now
        self.signum = signum
        if not self.quiet:
            print(f"\n{signal.Signals(signum).name}: stopping after the current step and its checkpoint "
                  "(signal again to stop at once)", file=sys.stderr, flush=True)


class StepSchedule:
    """After each optimizer step: write a step checkpoint? stop? (the same answer on every rank)."""

    def __init__(self, every_steps: int, every_minutes: float, signals: StopSignals):
        self.every_steps, self.every_s, self.signals = every_steps, every_minutes * 60.0, signals
        self.last = time.monotonic()

    def after_step(self, step: int) -> tuple[bool, Optional[int]]:
        """(save a step checkpoint now, the signal to stop on or None) after the phase's `step`-th step."""
        due = bool(self.every_steps and step % self.every_steps == 0)
        due = due or bool(self.every_s and time.monotonic() - self.last >= self.every_s)
        signum = self._agreed_signal(due)
        return due or signum is not None, signum

    def stop_requested(self) -> Optional[int]:
        """The signal to stop on at a phase boundary (agreed by every rank), or None."""
        return self._agreed_signal(False)

    def saved(self) -> None:
        self.last = time.monotonic()

    def _agreed_signal(self, due: bool) -> Optional[int]:
        signum = self.signals.signum
        if distributed.world_size() == 1:
            return signum
        # a signal seen by any rank stops every rank (torchrun forwards it to all, but not at the same step)
        votes = distributed.sum_over_ranks(due, signum == signal.SIGTERM, signum == signal.SIGINT)
        if votes[0]:
            self.last = time.monotonic() - self.every_s  # one rank's clock says due: every rank saves
        return signal.SIGTERM if votes[1] else signal.SIGINT if votes[2] else None


# ------------------------------------------------------------------------------------------ RNG states
def rng_state() -> dict:
    """This process's torch (CPU and CUDA), random and numpy generator states (torch.load-safe types)."""
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "random": random.getstate(),
        "numpy": {"key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
                  "pos": int(np_state["state"]["pos"]), "has_gauss": int(np_state["has_gauss"]),
                  "gauss": float(np_state["gauss"])},
    }


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["random"]
    random.setstate((version, tuple(internal), gauss))
    n = state["numpy"]
    np.random.set_state({"bit_generator": "MT19937", "state": {"key": n["key"].numpy().astype(np.uint32),
                                                                "pos": n["pos"]},
                         "has_gauss": n["has_gauss"], "gauss": n["gauss"]})


def all_rng_states() -> list[dict]:
    """Every rank's RNG state, in rank order (collective)."""
    return distributed.gather_objects(rng_state())


def restore_my_rng(states: list[dict]) -> None:
    """This rank's saved state; rank 0's when the number of processes changed (exact only for the same one)."""
    r = distributed.rank()
    set_rng_state(states[r] if len(states) == distributed.world_size() else states[0])
