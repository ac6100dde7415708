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
"no measurement" must not look like "no forgetting" in tables. For the same reason a metric is ``None``
when a cell it needs is ``None`` (not evaluated: ``eval.matrix: diagonal`` evaluates only R[i][i],
R[i][i+1] and the last row, so AA, BWT and FWT are measured and forgetting is not).
"""

from __future__ import annotations

from collections.abc import Sequence

Matrix = Sequence[Sequence[float]]
# summary.json's metrics of an accuracy run and of a continual pre-training (perplexity) run
METRIC_KEYS = ("aa", "bwt", "fwt", "forgetting")
PPL_METRIC_KEYS = ("ppl_avg", "ppl_forgetting", "ppl_forgetting_rel", "ppl_general0", "ppl_general",
                   "ppl_general_drift", "ppl_general_drift_rel")


def _mean(values: list) -> float | None:
    if not values or any(v is None for v in values):  # a missing cell: no measurement, not a guess
        return None
    return sum(float(v) for v in values) / len(values)


def _cell(x) -> float | None:
    return None if x is None else float(x)


def _diff(a, b) -> float | None:
    return None if a is None or b is None else float(a) - float(b)


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
        return _mean(list(R[0]))
    T = square_size(R)
    return _mean([R[T - 1][j] for j in range(T)]) if T else None


def backward_transfer(R: Matrix, mtl: bool | None = None) -> float | None:
    """BWT = (1/(T-1)) * sum_{j<T-1} (R[T-1][j] - R[j][j]).

    Negative when learning later tasks lowered accuracy on earlier ones. ``None`` when T < 2 or MTL.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2:
        return None
    return _mean([_diff(R[T - 1][j], R[j][j]) for j in range(T - 1)])


def forgetting(R: Matrix, mtl: bool | None = None) -> float | None:
    """F = (1/(T-1)) * sum_{j<T-1} (max_{j<=i<T-1} R[i][j] - R[T-1][j]).

    The drop from the best accuracy a task reached (any row from when it was learned up to the one
    before the last) to its final accuracy; positive means forgotten. It differs from -BWT when a
    task's accuracy rose after it was learned and then fell. ``None`` when T < 2 or MTL.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2:
        return None
    drops = []
    for j in range(T - 1):
        before = [R[i][j] for i in range(j, T - 1)]
        drops.append(None if None in before else _diff(max(map(float, before)), R[T - 1][j]))
    return _mean(drops)


def forward_transfer(R: Matrix, r0: Sequence[float] | None, mtl: bool | None = None) -> float | None:
    """FWT = (1/(T-1)) * sum_{j>=1} (R[j-1][j] - r0[j]).

    The gain on each task, just before it is trained, over the untrained model. ``None`` when T < 2,
    MTL, or ``r0`` is missing.
    """
    T = square_size(R)
    if _is_mtl(R, mtl) or T < 2 or r0 is None:
        return None
    return _mean([_diff(R[j - 1][j], r0[j]) for j in range(1, T)])


def evaluated_columns(matrix: str, stage: int, n_tasks: int, n_phases: int) -> set[int]:
    """The columns of R evaluated after phase `stage` (-1: the untrained model) under `eval.matrix`."""
    every = set(range(n_tasks))
    if matrix == "full" or stage < 0 or stage == n_phases - 1:
        return every
    if matrix == "last":
        return set()  # the paper's protocol: only the final row (AA)
    return {stage, stage + 1} & every  # R[i][i] for BWT, R[i][i+1] for FWT


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
        "final_row": [_cell(x) for x in R[0]] if is_mtl else [_cell(x) for x in R[T - 1][:T]] if T else [],
        "diagonal": None if is_mtl else [_cell(R[j][j]) for j in range(T)],
    }


# ------------------------------------------------------------------------------------------ perplexity
# Continual pre-training (`scenario: pretrain`): ``P[i][j]`` is the perplexity on the held-out set of
# domain ``j`` after training domain ``i``; with ``general=True`` the last column is the general held-out
# set, which is never trained on. ``p0`` is the row before any training. Lower is better, so forgetting
# is a *rise* of perplexity. ``T`` is the square size of the domain columns, as for accuracies.

def _domains(P: Matrix, general: bool) -> list[list[float]]:
    return [[float(x) for x in (row[:-1] if general else row)] for row in P]


def average_perplexity(P: Matrix, general: bool = True, mtl: bool | None = None) -> float | None:
    """(1/T) * sum_j P[T-1][j] over the domains (the general column excluded): the final perplexities' mean.

    A plain mean of per-domain perplexities (each already token-weighted within its domain), so every
    domain counts the same whatever the size of its held-out set. MTL row: the mean of its domain cells.
    """
    D = _domains(P, general)
    if _is_mtl(D, mtl):
        return _mean(D[0])
    T = square_size(D)
    return _mean([D[T - 1][j] for j in range(T)]) if T else None


def perplexity_forgetting(P: Matrix, general: bool = True, mtl: bool | None = None,
                          relative: bool = False) -> float | None:
    """F = (1/(T-1)) * sum_{j<T-1} (P[T-1][j] - min_{j<=i<T-1} P[i][j]).

    The rise of each earlier domain's perplexity over the best (lowest) value it reached from when it
    was trained up to the row before the last; positive means forgotten. With `relative=True` each
    rise is divided by that best value (0.05 = 5% higher). ``None`` when T < 2 or MTL.
    """
    D = _domains(P, general)
    T = square_size(D)
    if _is_mtl(D, mtl) or T < 2:
        return None
    rises = []
    for j in range(T - 1):
        best = min(D[i][j] for i in range(j, T - 1))
        rises.append((D[T - 1][j] - best) / best if relative else D[T - 1][j] - best)
    return _mean(rises)


def general_drift(P: Matrix, p0: Sequence[float] | None, general: bool = True,
                  mtl: bool | None = None) -> tuple[float | None, float | None]:
    """(P[T-1][general] - p0[general], the same divided by p0[general]): the general-ability drift.

    Positive means the model got worse on general text. ``(None, None)`` without a general column,
    without ``p0`` or without a finished row.
    """
    D = _domains(P, general)
    T = 1 if _is_mtl(D, mtl) else square_size(D)
    if not general or p0 is None or not T:
        return None, None
    final, start = float(P[T - 1][-1]), float(p0[-1])
    return final - start, (final - start) / start if start else None


def summarize_perplexity(P: Matrix, p0: Sequence[float] | None = None, general: bool = True,
                         mtl: bool | None = None) -> dict:
    """All perplexity metrics of P as one dict (the keys summary.json holds for `scenario: pretrain`).

    Keys: ``ppl_avg`` (`average_perplexity`), ``ppl_forgetting`` and ``ppl_forgetting_rel``
    (`perplexity_forgetting`), ``ppl_general`` (final general perplexity), ``ppl_general0`` (before
    training), ``ppl_general_drift`` and ``ppl_general_drift_rel`` (`general_drift`), ``ppl_final_row``
    (the domain cells of the last row of the square part; the whole row for MTL) and ``ppl_diagonal``
    (``P[j][j]``, each domain right after it was trained; ``None`` for MTL).
    """
    D = _domains(P, general)
    is_mtl = _is_mtl(D, mtl)
    T = 1 if is_mtl and D else square_size(D)
    drift, drift_rel = general_drift(P, p0, general, mtl=is_mtl)
    return {
        "ppl_avg": average_perplexity(P, general, mtl=is_mtl),
        "ppl_forgetting": perplexity_forgetting(P, general, mtl=is_mtl),
        "ppl_forgetting_rel": perplexity_forgetting(P, general, mtl=is_mtl, relative=True),
        "ppl_general": float(P[T - 1][-1]) if general and T else None,
        "ppl_general0": float(p0[-1]) if general and p0 is not None else None,
        "ppl_general_drift": drift,
        "ppl_general_drift_rel": drift_rel,
        "ppl_final_row": (D[0] if is_mtl else D[T - 1][:T]) if T else [],
        "ppl_diagonal": None if is_mtl else [D[j][j] for j in range(T)],
    }


def perplexity_metric_line(m: dict) -> str:
    """`avg ppl 21.30  forgetting +0.52 (+2.4%)  general 30.1 → 31.0 (+0.90, +3.0%)`."""
    def signed(x, pct=False):
        if not isinstance(x, (int, float)):
            return "–"
        return f"{100 * x:+.1f}%" if pct else f"{x:+.2f}"

    avg = m.get("ppl_avg")
    parts = [f"avg ppl {avg:.2f}" if isinstance(avg, (int, float)) else "avg ppl –",
             f"forgetting {signed(m.get('ppl_forgetting'))} ({signed(m.get('ppl_forgetting_rel'), True)})"]
    g0, g = m.get("ppl_general0"), m.get("ppl_general")
    if isinstance(g, (int, float)):
        start = f"{g0:.2f} → " if isinstance(g0, (int, float)) else ""
        parts.append(f"general {start}{g:.2f} ({signed(m.get('ppl_general_drift'))}, "
                     f"{signed(m.get('ppl_general_drift_rel'), True)})")
    return "  ".join(parts)
