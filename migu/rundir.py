"""The run directory: the only contract between training and reporting, and enough to resume.

    <run_dir>/config.yaml           resolved config + provenance (git commit, package versions)
             state.json             {"tasks", "finished_tasks", "r0", "rows", "row_names", "status", ...}
             metrics.jsonl          one JSON record a line: {"type": "train"|"eval", "stage", ...}
             accuracy_matrix.csv    header after_task,<task1>,...; row "untrained", then one row per phase
             perplexity_matrix.csv  instead of accuracy_matrix.csv for scenario: pretrain (general column last)
             summary.json           AA, BWT, FWT, forgetting, matrix, method, migu, seed, wall time, versions
             checkpoints/last/      params.safetensors, method.pt, meta.json (+ training.pt in a step
                                    checkpoint: optimizer, loss scaler, RNG states); meta.json records
                                    each file's size and sha256. FSDP's sharded format: dcp/ (every
                                    rank's shards of parameters and optimizer state) for params.safetensors
             checkpoints/previous/  the checkpoint before `last` (the fallback when `last` is damaged)
             .lock                  the writer's lock (migu.runlock): one writing process at a time

Every write goes through `RunDir` and happens only on the main process (`is_main_process`), so a
multi-process launch writes each file once. Files are replaced atomically (temporary file or
directory, then `os.replace`): a kill at any moment leaves either the old or the new version, so a
reader never sees a half-written file (metrics.jsonl is appended; a line cut by a kill is skipped).
A write that fails (no space, file-size limit) raises `WriteError` and leaves the previous version.
Loading a checkpoint verifies every file against meta.json and falls back to `previous`; it never
loads a damaged file.
"""

from __future__ import annotations

import csv
import io
import json
import math
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

from migu import integrity
from migu.distributed import barrier, is_main_process
from migu.integrity import (CHECKPOINT, LEGACY, PREVIOUS, Checkpoint, RunDirError, WriteError,
                            atomic_write_text, on_main, to_json, write_error)
from migu.runlock import LOCK, RunLock

__all__ = ["CONFIG", "STATE", "METRICS", "MATRIX", "PPL_MATRIX", "SUMMARY", "CHECKPOINT", "PREVIOUS", "LEGACY",
           "RunDir", "RunDirError", "WriteError", "atomic_write_text", "read_jsonl"]

CONFIG = "config.yaml"
STATE = "state.json"
METRICS = "metrics.jsonl"
MATRIX = "accuracy_matrix.csv"
PPL_MATRIX = "perplexity_matrix.csv"  # instead of MATRIX for scenario: pretrain
SUMMARY = "summary.json"
# CHECKPOINT (checkpoints/last), PREVIOUS, LEGACY: the checkpoint directories, written and read by migu.integrity
_MARKERS = (CONFIG, STATE)  # a directory holding one of these is a run directory


def _entries(path: Path) -> list[Path]:
    """The directory's contents other than the lock file (a directory holding only `.lock` is empty)."""
    return [p for p in path.iterdir() if p.name != LOCK] if path.is_dir() else []


class RunDir:
    """Reads and writes one run directory (see the module docstring for the layout).

    A writer holds the directory's lock (`create`, `open(lock=True)` or `lock()`) until `unlock()`
    or its process ends; a reader (`RunDir(path)`) takes none.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self._lock, self._locked = RunLock(self.path), False

    # ----------------------------------------------------------------------------- opening
    @classmethod
    def create(cls, path: str | Path, overwrite: bool = False) -> "RunDir":
        """A fresh run directory, locked; an existing non-empty one is an error unless `overwrite`.

        `overwrite` only ever deletes a directory that holds a run (config.yaml or state.json), never
        an arbitrary folder, and never one another process is writing.
        """
        path = Path(path)
        cls.check_new(path, overwrite)
        barrier()  # several processes: every rank has checked the directory before rank 0 changes it
        if is_main_process():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise write_error(path, err, "nothing was changed") from None
        rd = cls(path).lock()
        try:
            # again under the lock: another writer may have filled or claimed it since the first check
            on_main(lambda: (cls.check_new(path, overwrite, probe=False), rd._clear()))
        except BaseException:
            rd.unlock()
            raise
        barrier()  # ... and sees it created
        return rd

    @staticmethod
    def check_new(path: Path, overwrite: bool, probe: bool = True) -> None:
        """RunDirError when `create(path, overwrite)` would refuse (nothing is changed).

        `probe`: first ask whether another process holds the lock (not when this one does).
        """
        if path.exists() and not path.is_dir():
            raise RunDirError(f"{path} exists and is not a directory")
        if _entries(path):
            if probe:
                RunLock(path).probe()  # a run in progress: say so (and who), rather than "already exists"
            if not overwrite:
                raise RunDirError(f"run directory {path} already exists; use --resume {path} to continue it "
                                  f"or --overwrite to replace it")
            if not RunDir.is_run_dir(path):
                raise RunDirError(f"refusing to overwrite {path}: not empty and not a migu run directory")

    def _clear(self) -> None:
        """Delete the directory's contents but the lock (held by this process) — an --overwrite."""
        for entry in _entries(self.path):
            if entry.is_dir() and not entry.is_symlink():
                shutil.rmtree(entry)
            else:
                entry.unlink()

    @classmethod
    def open(cls, path: str | Path, lock: bool = False) -> "RunDir":
        """An existing run directory (for --resume); `lock`: as its writer (RunDirError if one is running)."""
        path = Path(path)
        if not path.is_dir():
            raise RunDirError(f"cannot resume {path}: no such directory")
        if not (path / CONFIG).is_file():
            raise RunDirError(f"cannot resume {path}: not a migu run directory (no {CONFIG})")
        rd = cls(path)
        return rd.lock() if lock else rd

    def lock(self) -> "RunDir":
        """Become the directory's one writer (rank 0 locks; every rank gets its error). Returns self."""
        if not self._locked:  # the same answer on every rank (only rank 0 holds the OS lock): one collective
            on_main(self._lock.acquire)
            self._locked = True
        return self

    def unlock(self) -> None:
        self._lock.release()
        self._locked = False

    @staticmethod
    def is_run_dir(path: str | Path) -> bool:
        return any((Path(path) / m).is_file() for m in _MARKERS)

    # ----------------------------------------------------------------------------- small files
    def write_text(self, name: str, text: str) -> None:
        if is_main_process():
            atomic_write_text(self.path / name, text)

    def write_json(self, name: str, obj) -> None:
        self.write_text(name, to_json(obj))

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
        try:
            with open(self.path / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=integrity.jsonable) + "\n")
        except OSError as err:  # a cut line is skipped by readers and dropped by --resume
            raise write_error(self.path / METRICS, err, "the records before it are intact") from None

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS)

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl with only the records for which `keep` is true (resume drops lost work)."""
        records = [r for r in self.read_metrics() if keep(r)]
        self.write_text(METRICS, _jsonl(records))

    # ----------------------------------------------------------------------------- checkpoints

    # ----------------------------------------------------------------------------- checkpoints (migu.integrity)
    def save_checkpoint(self, tensors: Optional[dict[str, torch.Tensor]], method_state: dict, meta: dict,
                        training: Optional[dict] = None, shards: Optional[Callable[[Path], None]] = None) -> None:
        """Write checkpoints/last atomically (the former `last` becomes `previous`): `integrity.save_checkpoint`."""
        integrity.save_checkpoint(self.path, tensors, method_state, meta, training, shards)

    def load_latest(self, training: bool = False) -> Optional[Checkpoint]:
        """The newest intact checkpoint (`last`, else `previous`) or None: `integrity.load_latest`."""
        return integrity.load_latest(self.path, training)

    def load_checkpoint(self) -> Optional[tuple[dict[str, torch.Tensor], dict, dict]]:
        """`(tensors, method_state, meta)` of the newest intact checkpoint, sharded ones read whole, or None."""
        return integrity.load_checkpoint(self.path)

    def fork(self, dest: str | Path, config: str, note: dict) -> bool:
        """A new run directory `dest` at this run's last phase boundary, under `config` (a resume continues it).

        `compare_migu` with `migu.first_task: skip`: the MIGU run trains the first task exactly like the run
        without MIGU, so it starts from this copy. State, metrics (each record marked `shared`, then `note`),
        matrix and `checkpoints/last` are copied into a temporary directory renamed into place: whole or absent. An
        existing `dest` is left alone (False).
        """
        dest = Path(dest)
        if not is_main_process() or dest.exists():
            return False
        tmp = self.fork_temporary(dest)
        try:
            shutil.rmtree(tmp, ignore_errors=True)  # a fork cut by a kill
            (tmp / CHECKPOINT).parent.mkdir(parents=True)
            for name in (STATE, MATRIX, PPL_MATRIX):
                if (self.path / name).is_file():
                    shutil.copy2(self.path / name, tmp / name)
            shutil.copytree(self.path / CHECKPOINT, tmp / CHECKPOINT)
            records = [{**r, "shared": True} for r in self.read_metrics()] + [note]  # computed by this run
            (tmp / METRICS).write_text(_jsonl(records), encoding="utf-8")
            atomic_write_text(tmp / CONFIG, config)  # last: a directory with config.yaml is a run directory
            tmp.rename(dest)
        except OSError as err:
            shutil.rmtree(tmp, ignore_errors=True)
            raise write_error(dest, err, "nothing was changed") from None
        return True

    @staticmethod
    def fork_temporary(dest: str | Path) -> Path:
        """Where `fork` builds `dest` (a kill can leave it; never a run directory to report)."""
        return Path(dest).with_name(f".{Path(dest).name}.fork")

    def clean_temporaries(self) -> None:
        """Remove leftovers of writes interrupted by a kill (temporary files and checkpoint dirs)."""
        integrity.clean_temporaries(self.path)


def _jsonl(records: list[dict]) -> str:
    return "".join(json.dumps(r, default=integrity.jsonable) + "\n" for r in records)


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
