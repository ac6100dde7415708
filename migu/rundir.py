"""The run directory: the only contract between training and reporting, and enough to resume.

    <run_dir>/config.yaml           resolved config + provenance (git commit, package versions)
             state.json             {"tasks", "finished_tasks", "r0", "rows", "row_names", "status", ...}
             metrics.jsonl          one JSON record a line: {"type": "train"|"eval", "stage", ...}
             accuracy_matrix.csv    header after_task,<task1>,...; row "untrained", then one row per phase
             perplexity_matrix.csv  instead of accuracy_matrix.csv for scenario: pretrain (general column last)
             summary.json           AA, BWT, FWT, forgetting, matrix, method, migu, seed, wall time, versions
             checkpoints/last/      params.safetensors, method.pt, meta.json (written atomically)

Every write goes through `RunDir` and happens only on the main process (`is_main_process`), so a
multi-process launch writes each file once. Files are replaced atomically (temporary file or
directory, then `os.replace`): a kill at any moment leaves either the old or the new version.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

CONFIG = "config.yaml"
STATE = "state.json"
METRICS = "metrics.jsonl"
MATRIX = "accuracy_matrix.csv"
SUMMARY = "summary.json"
CHECKPOINT = Path("checkpoints") / "last"
_MARKERS = (CONFIG, STATE)  # a directory holding one of these is a run directory
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, not a run directory)."""


def is_main_process() -> bool:
    """True unless torch.distributed is initialised and this is not rank 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _json(obj) -> str:
    text = json.dumps(obj, indent=1, default=_jsonable)
    # lists without nested containers on one line (JSON strings hold no raw newlines, so this is safe)
    return re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"),
                  text) + "\n"


def _jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


class RunDir:
    """Reads and writes one run directory (see the module docstring for the layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunDir":
        """A fresh run directory; an existing non-empty one is an error unless `overwrite`.

        `overwrite` only ever deletes a directory that holds a run (config.yaml or state.json), never
        an arbitrary folder.
        """
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a directory")
        if path.is_dir() and any(path.iterdir()):
            if not overwrite:
                raise RunDirError(f"run directory {path} already exists; use --resume {path} to continue it "
                                  f"or --overwrite to replace it")
            if not cls.is_run_dir(path):
                raise RunDirError(f"refusing to overwrite {path}: not empty and not a migu run directory")
        _barrier()  # several processes: every rank has checked the directory before rank 0 changes it
        if path.is_dir() and any(path.iterdir()) and is_main_process():
            shutil.rmtree(path)
        if is_main_process():
            path.mkdir(parents=True, exist_ok=True)
        _barrier()  # ... and sees it created
        return cls(path)

    @classmethod
    def open(cls, path: str | Path) -> "RunDir":
        """An existing run directory (for --resume)."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"cannot resume {path}: no such directory")
        if not (path / CONFIG).is_file():
            raise RunDirError(f"cannot resume {path}: not a migu run directory (no {CONFIG})")
        return cls(path)

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        return any((Path(path) / m).is_file() for m in _MARKERS)

    # ----------------------------------------------------------------------------- small files
    def write_text(self, name: str, text: str) -> None:
        if is_main_process():
            atomic_write_text(self.path / name, text)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, _json(obj))

    def read_json(self, name: str) -> Optional[dict]:
        path = self.path / name
        if not path.is_file():
            return None
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise RunDirError(f"{path}: invalid JSON ({err.msg} at line {err.lineno})") from None

    def write_config(self, text: str) -> None:
        self.write_text(CONFIG, text)

    def read_state(self) -> Optional[dict]:
        return self.read_json(STATE)

    def write_state(self, state: dict) -> None:
        self.write_json(STATE, state)

    def write_summary(self, summary: dict) -> None:
        self.write_json(SUMMARY, summary)

    def read_summary(self) -> Optional[dict]:
        return self.read_json(SUMMARY)

    def write_matrix(self, tasks: list[str], r0: Optional[list[float]], rows: list[list[float]],
                     row_names: list[str], filename: str = MATRIX) -> None:
        """accuracy_matrix.csv: `after_task,<tasks>`; row `untrained` (if r0), then one row per phase.

        `filename`: another matrix of the same layout (`perplexity_matrix.csv` of a pretrain run).
        """
        buf = io.StringIO()
        writer = csv.writer(buf, lineterminator="\n")
        writer.writerow(["after_task", *tasks])
        for name, row in ([("untrained", r0)] if r0 is not None else []) + list(zip(row_names, rows)):
            writer.writerow([name, *(_fmt(x) for x in row)])
        self.write_text(filename, buf.getvalue())

    # ----------------------------------------------------------------------------- metrics.jsonl
    def log(self, record: dict) -> None:
        """Append one record to metrics.jsonl (flushed, so a kill loses at most the line being written)."""
        if not is_main_process():
            return
        with open(self.path / METRICS, "a", encoding="utf-8") as f:
            f.write(json.dumps(record, default=_jsonable) + "\n")

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS)

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl with only the records for which `keep` is true (resume drops lost work)."""
        records = [r for r in self.read_metrics() if keep(r)]
        self.write_text(METRICS, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, tensors: dict[str, torch.Tensor], method_state: dict, meta: dict) -> None:
        """Write checkpoints/last atomically: a temporary directory, then renames.

        A kill between the two renames leaves `last.old`, which `load_checkpoint` falls back to.
        """
        if not is_main_process():
            return
        from safetensors.torch import save_file

        last = self.path / CHECKPOINT
        last.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=last.parent, prefix=".last."))
        try:
            save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp / "params.safetensors"))
            torch.save(method_state, tmp / "method.pt")
            (tmp / "meta.json").write_text(_json(meta), encoding="utf-8")
            old = last.with_name("last.old")
            if old.exists():
                shutil.rmtree(old)
            if last.exists():
                os.replace(last, old)
            os.replace(tmp, last)
            shutil.rmtree(old, ignore_errors=True)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def load_checkpoint(self) -> Optional[tuple[dict[str, torch.Tensor], dict, dict]]:
        """`(tensors, method_state, meta)` of checkpoints/last (or last.old after an interrupted save), or None."""
        from safetensors.torch import load_file

        last = self.path / CHECKPOINT
        for candidate in (last, last.with_name("last.old")):
            if (candidate / "meta.json").is_file():
                tensors = load_file(str(candidate / "params.safetensors"))
                method_state = torch.load(candidate / "method.pt", weights_only=True)
                meta = json.loads((candidate / "meta.json").read_text(encoding="utf-8"))
                return tensors, method_state, meta
        return None

    def clean_temporaries(self) -> None:
        """Remove leftovers of writes interrupted by a kill (temporary files and checkpoint dirs)."""
        if not is_main_process():
            return
        for tmp in list(self.path.glob(".*.tmp")) + list((self.path / CHECKPOINT.parent).glob(".last.*")):
            if tmp.is_dir():
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink(missing_ok=True)


def read_jsonl(path: Path) -> list:
    """The records of a JSON-lines file ([] when absent); a line cut by a kill mid-write is skipped."""
    if not Path(path).is_file():
        return []
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def _fmt(x) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return ""
    return f"{x:.4f}".rstrip("0").rstrip(".") if isinstance(x, float) else str(x)
