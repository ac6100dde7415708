"""Reading run directories for reports: files only, no model, no torch.

    run = load_run("runs/quickstart-seq-ft-s0/no-migu")
    run.tasks, run.stage_names, run.matrix      # ["untrained", <phase 1>, ...] × tasks, percent or None
    run.metrics                                 # {"aa", "bwt", "fwt", "forgetting"} (summary.json, else computed)
    find_run_dirs(["runs/quickstart-seq-ft-compare-s0"])   # parent dirs expand to the run dirs below them

Files read (see migu/rundir.py, which writes them): `accuracy_matrix.csv` (header `after_task,<task>...`,
an optional `untrained` row, then one row per phase; an empty cell = not evaluated), `summary.json`
(`aa`, `bwt`, `fwt`, `forgetting`, `tasks`, `row_names`, `matrix`, `r0`, `method`, `migu`, `seed`,
`wall_time_s`), `state.json` (`tasks`, `phases`, `status`) and `config.yaml` (the resolved config).
The matrix comes from accuracy_matrix.csv when present (summary.json otherwise), so an unfinished run can
be plotted; metrics come from summary.json, or are computed from the matrix by `migu.metrics`.
A continual pre-training run (`scenario: pretrain`) writes perplexity_matrix.csv instead (same layout, the
general held-out set as the last column); its `Run.kind` is "perplexity" and its metrics are `PPL_METRIC_KEYS`.

Every problem is a `ReportError` whose one-line message names the file and the field.
"""

from __future__ import annotations

import csv
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional

import yaml

from migu.metrics import METRIC_KEYS, PPL_METRIC_KEYS, summarize, summarize_perplexity
from migu.rundir import CONFIG, MATRIX, METRICS, PPL_MATRIX, STATE, SUMMARY, read_jsonl

# sub-directories of a run that never hold runs (not searched for sub-runs)
_NOT_RUNS = {"checkpoints", "plots", "magnitudes", "__pycache__"}
_MAX_DEPTH = 4


class ReportError(ValueError):
    """A run directory (or file in it) that cannot be reported on; the message is one line naming the file."""


# ------------------------------------------------------------------------------------------ the run
@dataclass
class Run:
    """Everything a report needs from one run directory.

    Attributes:
        path: the run directory.
        tasks: the evaluated tasks (matrix columns), in sequence order.
        row_names: one name per finished training phase (the task name for sequential methods).
        r0: accuracies before training (the `untrained` row), or None when not evaluated.
        rows: accuracies after each finished phase; a cell is None when it was not evaluated.
        summary: summary.json (None while the run is unfinished).
        config: config.yaml as a plain dict ({} when missing).
        state: state.json ({} when missing).
        metrics: aa, bwt, fwt, forgetting (floats or None); PPL_METRIC_KEYS for a perplexity run.
        kind: "accuracy" (percent, higher is better) or "perplexity" (lower is better).
    """

    path: Path
    tasks: list[str]
    row_names: list[str]
    r0: Optional[list[Optional[float]]]
    rows: list[list[Optional[float]]]
    summary: Optional[dict] = None
    config: dict = field(default_factory=dict)
    state: dict = field(default_factory=dict)
    metrics: dict = field(default_factory=dict)
    kind: str = "accuracy"

    @property
    def is_perplexity(self) -> bool:
        return self.kind == "perplexity"

    @property
    def value_label(self) -> str:
        """What a matrix cell is: `accuracy (%)` or `perplexity (lower is better)`."""
        return "perplexity (lower is better)" if self.is_perplexity else "accuracy (%)"

    # ---------------------------------------------------------------------------- the matrix
    @property
    def stage_names(self) -> list[str]:
        """Row labels of the full matrix: `untrained` (if evaluated), then `after <phase>`."""
        return (["untrained"] if self.r0 is not None else []) + [f"after {n}" for n in self.row_names]

    @property
    def matrix(self) -> list[list[Optional[float]]]:
        """The full matrix, rows as in `stage_names`."""
        return ([list(self.r0)] if self.r0 is not None else []) + [list(r) for r in self.rows]

    # ---------------------------------------------------------------------------- settings
    def _get(self, key: str, default=None):
        if self.summary is not None and self.summary.get(key) is not None:
            return self.summary[key]
        return self.config.get(key, default)

    @property
    def method(self) -> str:
        if self.summary is not None and isinstance(self.summary.get("method"), str):
            return self.summary["method"]
        method = self.config.get("method")
        return str(method.get("name", "?")) if isinstance(method, dict) else str(method or "?")

    @property
    def migu(self) -> dict:
        """The MIGU settings (`enabled`, `threshold`, `mode`, `target_modules`)."""
        value = self._get("migu", {})
        return value if isinstance(value, dict) else {}

    @property
    def migu_enabled(self) -> bool:
        return bool(self.migu.get("enabled", False))

    @property
    def threshold(self) -> Optional[float]:
        """MIGU's T when MIGU is on, else None."""
        t = self.migu.get("threshold")
        return float(t) if self.migu_enabled and t is not None else None

    @property
    def seed(self) -> Optional[int]:
        return self._get("seed")

    @property
    def wall_time_s(self) -> Optional[float]:
        if self.summary is not None and self.summary.get("wall_time_s") is not None:
            return float(self.summary["wall_time_s"])
        elapsed = self.state.get("elapsed_s")
        return float(elapsed) if isinstance(elapsed, (int, float)) else None

    @property
    def status(self) -> str:
        """`done` (summary.json written), else state.json's status (`running`), else `unknown`."""
        if self.summary is not None:
            return "done"
        return str(self.state.get("status") or "unknown")

    @property
    def name(self) -> str:
        """A short display name: the directory name, with its parent's for compare sub-runs."""
        if self.path.name in ("migu", "no-migu") and self.path.parent.name:
            return f"{self.path.parent.name}/{self.path.name}"
        return self.path.name

    @property
    def label(self) -> str:
        """`seq-ft`, `seq-ft + MIGU (T=0.7)`."""
        if not self.migu_enabled:
            return self.method
        mode = self.migu.get("mode")
        extra = f", {mode}" if mode not in (None, "grad") else ""
        return f"{self.method} + MIGU (T={_fmt_t(self.threshold)}{extra})"

    def training_losses(self) -> list[dict]:
        """The `train` records of metrics.jsonl (`stage`, `task`, `step`, `loss`, ...); [] when absent."""
        return [r for r in read_jsonl(self.path / METRICS)
                if isinstance(r, dict) and r.get("type") == "train" and _is_number(r.get("loss"))]


def _fmt_t(t) -> str:
    return "-" if t is None else f"{float(t):g}"


# ------------------------------------------------------------------------------------------ loading
def load_run(path: str | Path, require_summary: bool = False) -> Run:
    """Reads one run directory.

    Args:
        path: the run directory.
        require_summary: also require summary.json (a finished run), as `compare` does.

    Raises:
        ReportError: not a directory, no summary.json / accuracy_matrix.csv, or a corrupt file (the
            message names the file and the field).
    """
    path = Path(path)
    if not path.exists():
        raise ReportError(f"{path}: no such run directory")
    if not path.is_dir():
        raise ReportError(f"{path}: not a directory (expected a migu run directory)")
    summary = _read_summary(path / SUMMARY) if (path / SUMMARY).is_file() else None
    if summary is None and require_summary:
        raise ReportError(f"{path / SUMMARY}: missing (not a finished migu run; run `migu run --resume {path}`"
                          f" to finish it)")
    state = _read_json_dict(path / STATE) if (path / STATE).is_file() else {}
    config = _read_config(path / CONFIG) if (path / CONFIG).is_file() else {}
    kind = "perplexity" if (summary or {}).get("scenario") == "pretrain" else "accuracy"
    if (path / MATRIX).is_file():
        tasks, names, r0, rows = _read_matrix(path / MATRIX)
    elif (path / PPL_MATRIX).is_file():
        tasks, names, r0, rows = _read_matrix(path / PPL_MATRIX)
        kind = "perplexity"
    elif summary is not None:
        tasks, names, r0, rows = _matrix_from_summary(summary, path / SUMMARY)
    else:
        raise ReportError(f"{path / SUMMARY}: missing, and no {MATRIX} either (not a migu run directory)")
    run = Run(path=path, tasks=tasks, row_names=names, r0=r0, rows=rows, summary=summary, config=config,
              state=state, kind=kind)
    run.metrics = _metrics(run)
    return run


def find_run_dirs(paths: Iterable[str | Path], require_summary: bool = True) -> list[Path]:
    """Run directories given directly or found below parent directories (e.g. compare_migu, sweeps).

    A directory is a run when it holds summary.json (or, with `require_summary=False`, also
    accuracy_matrix.csv); a directory that is not a run is searched for runs below it.

    Raises:
        ReportError: a path that does not exist, is not a directory, or holds no run.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if not path.exists():
            raise ReportError(f"{path}: no such run directory")
        if not path.is_dir():
            raise ReportError(f"{path}: not a directory (expected a migu run directory)")
        runs = _walk(path, require_summary, 0)
        if not runs:
            if any((path / f).is_file() for f in (CONFIG, STATE, MATRIX, PPL_MATRIX)):
                raise ReportError(f"{path / SUMMARY}: missing (not a finished migu run; run `migu run --resume "
                                  f"{path}` to finish it)")
            raise ReportError(f"{path}: no {SUMMARY} in it or its sub-directories (not a migu run directory)")
        found += [r for r in runs if r not in found]
    return found


def _is_run(path: Path, require_summary: bool) -> bool:
    return (path / SUMMARY).is_file() or (not require_summary and any((path / f).is_file()
                                                                       for f in (MATRIX, PPL_MATRIX)))


def _walk(path: Path, require_summary: bool, depth: int) -> list[Path]:
    if _is_run(path, require_summary):
        return [path]
    if depth >= _MAX_DEPTH:
        return []
    runs = []
    for child in sorted(p for p in path.iterdir() if p.is_dir()):
        if child.name.startswith(".") or child.name in _NOT_RUNS:
            continue
        runs += _walk(child, require_summary, depth + 1)
    return runs


# ------------------------------------------------------------------------------------------ files
def _read_json_dict(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None
    except (OSError, UnicodeDecodeError) as err:
        raise ReportError(f"{path}: unreadable ({err})") from None
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_summary(path: Path) -> dict:
    summary = _read_json_dict(path)
    for key in METRIC_KEYS + PPL_METRIC_KEYS + ("wall_time_s",):
        value = summary.get(key)
        if value is not None and not _is_number(value):
            raise ReportError(f"{path}: field {key!r} must be a number or null, got {value!r}")
    if "seed" in summary and summary["seed"] is not None and not isinstance(summary["seed"], int):
        raise ReportError(f"{path}: field 'seed' must be an integer, got {summary['seed']!r}")
    if "migu" in summary and not isinstance(summary["migu"], (dict, type(None))):
        raise ReportError(f"{path}: field 'migu' must be an object, got {summary['migu']!r}")
    if "method" in summary and not isinstance(summary["method"], (str, type(None))):
        raise ReportError(f"{path}: field 'method' must be a string, got {summary['method']!r}")
    return summary


def _read_config(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ReportError(f"{path}:{where} invalid YAML: {getattr(err, 'problem', None) or err}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ReportError(f"{path}: expected a mapping of config sections, got {type(data).__name__}")
    return data


def _read_matrix(path: Path):
    try:
        lines = list(csv.reader(path.read_text(encoding="utf-8").splitlines()))
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise ReportError(f"{path}: unreadable CSV ({err})") from None
    lines = [row for row in lines if row]
    if not lines or not lines[0] or lines[0][0].strip() != "after_task" or len(lines[0]) < 2:
        raise ReportError(f"{path}: line 1 must be the header `after_task,<task1>,...`")
    tasks = [t.strip() for t in lines[0][1:]]
    r0, names, rows = None, [], []
    for number, row in enumerate(lines[1:], start=2):
        if len(row) != len(lines[0]):
            raise ReportError(f"{path}: line {number} ({row[0]!r}) has {len(row) - 1} values for {len(tasks)} tasks")
        values = []
        for task, cell in zip(tasks, row[1:]):
            cell = cell.strip()
            if cell == "":
                values.append(None)
                continue
            try:
                values.append(float(cell))
            except ValueError:
                raise ReportError(f"{path}: line {number}, column {task!r}: not a number: {cell!r}") from None
        if row[0].strip() == "untrained" and number == 2:
            r0 = values
        else:
            names.append(row[0].strip())
            rows.append(values)
    return tasks, names, r0, rows


def _matrix_from_summary(summary: dict, path: Path):
    tasks, matrix, r0 = summary.get("tasks"), summary.get("matrix"), summary.get("r0")
    if not isinstance(tasks, list) or not all(isinstance(t, str) for t in tasks):
        raise ReportError(f"{path}: field 'tasks' must be a list of task names (and {MATRIX} is missing)")
    if not isinstance(matrix, list) or not all(isinstance(r, list) for r in matrix):
        raise ReportError(f"{path}: field 'matrix' must be a list of rows (and {MATRIX} is missing)")
    for i, row in enumerate(([r0] if r0 is not None else []) + matrix):
        if not isinstance(row, list) or not all(v is None or _is_number(v) for v in row):
            raise ReportError(f"{path}: field {'r0' if r0 is not None and i == 0 else 'matrix'!r}: "
                              f"rows must hold numbers or null")
    names = summary.get("row_names")
    if not isinstance(names, list) or len(names) != len(matrix):
        names = tasks[: len(matrix)] if len(matrix) <= len(tasks) else [str(i + 1) for i in range(len(matrix))]
    pad = len(tasks)
    rows = [[float(v) if v is not None else None for v in row] + [None] * (pad - len(row)) for row in matrix]
    r0 = [float(v) if v is not None else None for v in r0] if r0 is not None else None
    return list(tasks), [str(n) for n in names], r0, rows


def _metrics(run: Run) -> dict:
    keys = PPL_METRIC_KEYS if run.is_perplexity else METRIC_KEYS
    if run.summary is not None and any(k in run.summary for k in keys):
        return {k: run.summary.get(k) for k in keys}
    # unfinished run: the metrics of the finished part, as migu.metrics defines them
    phases = run.state.get("phases") or (run.summary or {}).get("row_names") or run.row_names
    mtl = len(phases) == 1 and len(run.tasks) > 1
    rows = [row for row in run.rows if all(v is not None for v in row)]
    r0 = run.r0 if run.r0 is not None and all(v is not None for v in run.r0) else None
    if not rows:
        return {k: None for k in keys}
    if run.is_perplexity:  # the general held-out set is the last column
        metrics = summarize_perplexity(rows, r0, general=True, mtl=len(phases) == 1 and len(run.tasks) > 2)
        return {k: metrics[k] for k in keys}
    metrics = summarize(rows, r0, mtl=mtl)
    return {k: metrics[k] for k in METRIC_KEYS}


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and not (
        isinstance(value, float) and math.isnan(value))
