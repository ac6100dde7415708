"""Continual-learning metrics from an accuracy matrix; pure functions, no torch.

Notation: ``R[i][j]`` is the accuracy on task ``j`` after training task ``i`` (rows in training
order), ``r0[j]`` the accuracy on task ``j`` before any training, and ``T`` the number of tasks in
the *square part* of ``R``: the largest ``T`` such that the first ``T`` rows each hold at least ``T``
entries. A finished sequential run is exactly square; an unfinished one has fewer rows than tasks, and
its metrics describe the tasks seen so far. Values keep the unit of ``R`` (percent, 0-100, in migu).

A matrix with a single row of several entries is read as a multi-task (MTL) row by default: one model
trained on all tasks at once. Its average accuracy is the mean of that row; the transfer and
forgetting metrics are undefined for it (``None``). Pass ``mtl=False`` to read such a row as the first
row of an unfinished sequential run instead.

Metrics that need at least two tasks (BWT, FWT, forgetting) are ``None``, not 0.0, when ``T == 1``:
"no measurement" must not look like "no forgetting" in tables.
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _is_mtl(R: Matrix, mtl: bool | None) -> bool:
    if not R:
        return False
    return (len(R) == 1 and len(R[0]) > 1) if mtl is None else mtl


def square_size(R: Matrix) -> int:
    """Returns T, the size of the largest leading square block of R (rows 0..T-1, columns 0..T-1)."""
    size = 0
    while size < len(R) and all(len(R[i]) > size for i in range(size + 1)):
        size += 1
    return size


def average_accuracy(R: Matrix, mtl: bool | None = None) -> float | None:
    """AA = (1/T) * sum_j R[T-1][j]: mean accuracy over all seen tasks after the last one.

    For an MTL row: the mean of that row. ``None`` for an empty matrix.
    """
    if _is_mtl(R, mtl):
        return _mean([float(x) for x in R[0]])
    T = square_size(R)
    return _mean([float(R[T - 1][j]) for j in range(T)]) if T else None


def backward_transfer(R: Matrix, mtl: bool | None = None) -> float | None:
    """BWT = (1/(T-1)) * sum_{j<T-1} (R[T-1][j] - R[j][j]).

    Negative when learning later tasks lowered accuracy on earlier ones. ``None`` when T < 2 or MTL.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2:
        return None
    return _mean([float(R[T - 1][j]) - float(R[j][j]) for j in range(T - 1)])


def forgetting(R: Matrix, mtl: bool | None = None) -> float | None:
    """F = (1/(T-1)) * sum_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j]).

    The drop from the best accuracy a task reached (any row from when it was learned up to the one
    before the last) to its final accuracy; positive means forgotten. It differs from -BWT when a
    task's accuracy rose after it was learned and then fell. ``None`` when T < 2 or MTL.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2:
        return None
    return _mean([max(float(R[i][j]) for i in range(j, T - 1)) - float(R[T - 1][j]) for j in range(T - 1)])


def forward_transfer(R: Matrix, r0: Sequence[float] | None, mtl: bool | None = None) -> float | None:
    """FWT = (1/(T-1)) * sum_{j>=1} (R[j-1][j] - r0[j]).

    The gain on each task, just before it is trained, over the untrained model. ``None`` when T < 2,
    MTL, or ``r0`` is missing.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2 or r0 is None:
        return None
    return _mean([float(R[j - 1][j]) - float(r0[j]) for j in range(1, T)])


def summarize(R: Matrix, r0: Sequence[float] | None = None, mtl: bool | None = None) -> dict:
    """Returns all metrics of R as one dict.

    Keys: ``aa``, ``bwt``, ``fwt``, ``forgetting`` (floats or ``None``, see the functions above),
    ``final_row`` (the last row of the square part; the whole row for MTL) and ``diagonal``
    (``R[j][j]``, each task's accuracy right after it was trained; ``None`` for MTL).
    """
    is_mtl = _is_mtl(R, mtl)
    T = square_size(R)
    return {
        "aa": average_accuracy(R, mtl=is_mtl),
        "bwt": backward_transfer(R, mtl=is_mtl),
        "fwt": forward_transfer(R, r0, mtl=is_mtl),
        "forgetting": forgetting(R, mtl=is_mtl),
        "final_row": [float(x) for x in R[0]] if is_mtl else [float(x) for x in R[T - 1][:T]] if T else [],
        "diagonal": None if is_mtl else [float(R[j][j]) for j in range(T)],
    }
