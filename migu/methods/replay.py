"""`replay`: experience replay of stored past training items.

Differs from `seq-ft` in how past items come back (`mix`):
- `append` (default; the paper's replay baseline, "2% of each past task's data"): `after_task` stores
  `ceil(ratio x training items)` of each task just trained (a seeded uniform sample, at least one), and
  `train_items` appends every stored item of every past task to the new task's training items, so
  each is seen once per epoch, shuffled with the rest (a phase gets more steps, not bigger batches).
- `batch` (migu's earlier rule, which produced results/table1's replay rows): `after_task` streams the
  task's items through a reservoir (Algorithm R, Vitter 1985) of `buffer_size` items, or
  `ceil(ratio x training items of the whole stream)`, fixed before the first task; after task t it
  holds about capacity / t items of every past task. `mix_batch` gives a micro-batch of n task items
  k replayed ones drawn uniformly without replacement, E[k] = n * rate / (1 - rate) (stochastic
  rounding): 5-10x more rehearsal than `append` at the defaults.
Replayed items count in the answer-token loss like any other item. `BufferOptions`, `Reservoir` and
`replay_count` are shared with `i-lora` and `gere`; `ReplayOptions` and the hooks with `lora-replay`.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from migu.methods.seq_ft import SeqFT


@dataclass
class BufferOptions:
    """A replay buffer of past training items, mixed into every micro-batch at a rate."""

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


MIX_MODES = ("append", "batch")


@dataclass
class ReplayOptions(BufferOptions):
    """Replay of stored past training items: appended to each new task's data (the paper) or mixed per batch."""

    ratio: float = 0.02
    """Fraction replayed: mix=append stores ceil(ratio x each task's training items) (at least 1); mix=batch sizes the reservoir as ceil(ratio x the stream's training items) when buffer_size is 0."""
    mix: str = "append"
    """`append`: store ratio of each task's training items, append them all to every later task's training data (each seen once per epoch; the paper); `batch`: a reservoir of buffer_size (or ratio of the stream) items, `rate` of every micro-batch replayed (migu's earlier rule). buffer_size and rate apply to `batch` only."""

    def validate(self, key: str) -> None:
        BufferOptions.validate(self, key)
        if self.mix not in MIX_MODES:
            raise ValueError(f"{key}.mix={self.mix}: must be 'append' or 'batch'")
        if self.mix == "append" and self.buffer_size:
            raise ValueError(f"{key}.buffer_size={self.buffer_size}: only used with mix=batch "
                             "(append stores ratio of each task)")

    def per_task(self, n_items: int) -> int:
        """Items stored of a task with `n_items` training items under `append`."""
        return min(n_items, max(1, math.ceil(self.ratio * n_items)))


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


def store_sample(items: list[dict], k: int, seed: int, index: int, name: str) -> list[dict]:
    """k of a task's encoded training items, uniform without replacement, reproducible from the run seed."""
    return random.Random(f"store:{seed}:{index}:{name}").sample(items, k)


class Replay(SeqFT):
    """Full fine-tuning with replay of stored past training items (appended to each task's data, or per batch)."""

    name = "replay"
    Options = ReplayOptions

    def __init__(self, options=None):
        super().__init__(options)
        self.buffer: Reservoir | None = None  # mix=batch
        self.stored: list[list[dict]] = []  # mix=append: the stored items of each past task, in order
        self.rng = random.Random(0)

    def before_task(self, index, tasks, ctx):
        if self.options.mix == "batch" and self.buffer is None:
            self.buffer = Reservoir(self.options.capacity(ctx.tasks))
        self.rng = random.Random(f"mix:{ctx.seed}:{index}")  # which items replay, reproducible on resume

    def train_items(self, index, tasks, items, ctx):
        if self.options.mix != "append":
            return items
        return items + [item for task_items in self.stored for item in task_items]

    def mix_batch(self, items, step):
        if self.options.mix != "batch" or not self.buffer or not self.buffer.items:
            return items
        return items + self.buffer.sample(replay_count(len(items), self.options.rate, self.rng), self.rng)

    def after_task(self, index, tasks, ctx):
        if self.options.mix == "batch":
            offer_tasks(self.buffer, index, tasks, ctx)
            return
        for task in tasks:
            items = ctx.encode(task.train)
            if items:
                self.stored.append(store_sample(items, self.options.per_task(len(items)), ctx.seed, index, task.name))

    def state_dict(self):
        state = {"stored": [list(x) for x in self.stored]}
        if self.buffer is not None:
            state["buffer"] = self.buffer.state_dict()
        return state

    def load_state_dict(self, state):
        self.stored = [list(x) for x in state.get("stored", [])]
        if "buffer" in state:
            self.buffer = Reservoir.from_state(state["buffer"])
