"""`replay`: experience replay from a uniform reservoir of past tasks' training items.

Differs from `seq-ft` in two hooks: `after_task` streams the task's encoded training items through a
reservoir (Algorithm R, Vitter 1985), and `mix_batch` appends replayed items to every micro-batch.

Capacity: `buffer_size` items, or (default) `ceil(ratio * training items of the whole stream)`, fixed
before the first task. After n offered items each one is in the buffer with probability
min(1, capacity / n), so after task t the buffer holds about capacity / t items of every past task,
and after the last task `ratio` of every task's data (2% by default).

Mixing: a micro-batch of n task items gets k replayed items, drawn uniformly without replacement,
with E[k] = n * rate / (1 - rate) (stochastic rounding), so on average `rate` of the micro-batch's
items are replayed. Replayed items count in the answer-token loss like any other item.
`ReplayOptions`, `Reservoir` and `replay_count` are shared with `i-lora` and `gere`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from migu.methods.seq_ft import SeqFT


@dataclass
class ReplayOptions:
    """Reservoir replay of past tasks' training items."""

    ratio: float = 0.02
    """Buffer capacity as a fraction of the stream's training items (rounded up); used when buffer_size is 0."""
    buffer_size: int = 0
    """Fixed buffer capacity in items; 0: ceil(ratio x the stream's training items)."""
    rate: float = 0.2
    """Expected fraction of each micro-batch that is replayed: n task items get n*rate/(1-rate) replayed ones."""

    def validate(self, key: str) -> None:
        """Raise `ValueError` naming `key.<field>` for an invalid value."""
        if not 0.0 < self.ratio <= 1.0:
            raise ValueError(f"{key}.ratio={self.ratio}: must be in (0, 1]")
        if self.buffer_size < 0:
            raise ValueError(f"{key}.buffer_size={self.buffer_size}: must be >= 0 (0 = use ratio)")
        if not 0.0 <= self.rate < 1.0:
            raise ValueError(f"{key}.rate={self.rate}: must be in [0, 1)")

    def capacity(self, tasks: list) -> int:
        """The buffer capacity for a stream of `tasks`."""
        if self.buffer_size:
            return self.buffer_size
        return max(1, math.ceil(self.ratio * sum(len(t.train) for t in tasks)))


class Reservoir:
    """A uniform reservoir sample (Algorithm R) of a stream of items, at most `capacity` kept."""

    def __init__(self, capacity: int):
        self.capacity, self.seen, self.items = capacity, 0, []

    def offer(self, item, rng: random.Random) -> None:
        """Show one stream item: kept with probability capacity / seen, replacing a uniform victim."""
        self.seen += 1
        if len(self.items) < self.capacity:
            self.items.append(item)
            return
        j = rng.randrange(self.seen)
        if j < self.capacity:
            self.items[j] = item

    def sample(self, k: int, rng: random.Random) -> list:
        """k distinct items drawn uniformly (fewer if the buffer holds fewer)."""
        return rng.sample(self.items, min(k, len(self.items)))

    def state_dict(self) -> dict:
        return {"capacity": self.capacity, "seen": self.seen, "items": list(self.items)}

    @classmethod
    def from_state(cls, state: dict) -> "Reservoir":
        buffer = cls(int(state["capacity"]))
        buffer.seen, buffer.items = int(state["seen"]), list(state["items"])
        return buffer


def replay_count(n: int, rate: float, rng: random.Random) -> int:
    """Replayed items to add to n task items: n*rate/(1-rate), rounded up with probability its fraction."""
    x = n * rate / (1.0 - rate)
    k = math.floor(x + 1e-9)
    return k + (rng.random() < x - k)


def offer_tasks(buffer: Reservoir, index: int, tasks: list, ctx) -> None:
    """Stream the encoded training items of `tasks` (phase `index`) through `buffer`, seeded by the run."""
    rng = random.Random(f"reservoir:{ctx.seed}:{index}")
    for item in ctx.encode([ex for task in tasks for ex in task.train]):
        buffer.offer(item, rng)


class Replay(SeqFT):
    """Full fine-tuning with experience replay from a uniform reservoir of past training items."""

    name = "replay"
    Options = ReplayOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.buffer: Reservoir | None = None
        self.rng = random.Random(0)

    def before_task(self, index, tasks, ctx):
        if self.buffer is None:
            self.buffer = Reservoir(self.options.capacity(ctx.tasks))
        self.rng = random.Random(f"mix:{ctx.seed}:{index}")  # which items replay, reproducible on resume

    def mix_batch(self, items, step):
        if not self.buffer or not self.buffer.items:
            return items
        return items + self.buffer.sample(replay_count(len(items), self.options.rate, self.rng), self.rng)

    def after_task(self, index, tasks, ctx):
        offer_tasks(self.buffer, index, tasks, ctx)

    def state_dict(self):
        return {"buffer": self.buffer.state_dict()} if self.buffer is not None else {}

    def load_state_dict(self, state):
        if "buffer" in state:
            self.buffer = Reservoir.from_state(state["buffer"])
