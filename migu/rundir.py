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
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Callable, Optional

import torch

from migu.integrity import SHARDS, Checkpoint, Damaged, digest, fsync_dir, io_reason, load_verified
from migu.runlock import LOCK, RunLock

CONFIG = "config.yaml"
STATE = "state.json"
METRICS = "metrics.jsonl"
MATRIX = "accuracy_matrix.csv"
PPL_MATRIX = "perplexity_matrix.csv"  # instead of MATRIX for scenario: pretrain
SUMMARY = "summary.json"
CHECKPOINT = Path("checkpoints") / "last"
PREVIOUS = CHECKPOINT.with_name("previous")
LEGACY = CHECKPOINT.with_name("last.old")  # the fallback name of older versions (read only)
_MARKERS = (CONFIG, STATE)  # a directory holding one of these is a run directory
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, not a run directory, locked, damaged)."""


class WriteError(RunDirError):
    """A file of the run directory could not be written (no space, file-size limit); the old version is intact."""


def _write_error(path: Path, err: BaseException, what: str = "") -> BaseException:
    """A WriteError for an I/O failure, else `err` itself (a bug must not pass for a full disk)."""
    reason = io_reason(err)
    if reason is None:
        return err
    return WriteError(f"cannot write {path}: {reason}; {what or 'its previous version is intact'}")


def is_main_process() -> bool:
    """True unless torch.distributed is initialised and this is not rank 0."""
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _barrier() -> None:
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


def _broadcast(value):
    """Rank 0's `value` on every rank (itself without a multi-process group)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        box = [value]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    return value


def _shared_digests(tmp: Path) -> dict:
    """meta.json's entries of the DCP files in `tmp`: each rank hashes its share, every rank gets them all.

    An I/O error on any rank is raised on every rank (so none waits for the others forever).
    """
    dist = torch.distributed
    files = sorted(p for p in (tmp / SHARDS).rglob("*") if p.is_file())  # the same list on every rank
    group = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if group else (0, 1)
    try:
        part = ({p.relative_to(tmp).as_posix(): digest(p) for p in files[rank::world]}, None)
    except OSError as err:
        part = ({}, err)
    parts = [part]
    if group:
        parts = [None] * world
        dist.all_gather_object(parts, part)
    for _, err in parts:
        if err is not None:
            raise err
    return {name: d for found, _ in parts for name, d in found.items()}


def _on_main(fn: Callable[[], None]) -> None:
    """Run `fn` on rank 0 only; a RunDirError it raises is raised on every rank (same one-line message)."""
    error = None
    if is_main_process():
        try:
            fn()
        except RunDirError as err:
            error = (type(err) is WriteError, str(err))
    error = _broadcast(error)
    if error:
        raise (WriteError if error[0] else RunDirError)(error[1])


def _entries(path: Path) -> list[Path]:
    """The directory's contents other than the lock file (a directory holding only `.lock` is empty)."""
    return [p for p in path.iterdir() if p.name != LOCK] if path.is_dir() else []


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise _write_error(path, err) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise _write_error(path, err) from None


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
        _barrier()  # several processes: every rank has checked the directory before rank 0 changes it
        if is_main_process():
            try:
                path.mkdir(parents=True, exist_ok=True)
            except OSError as err:
                raise _write_error(path, err, "nothing was changed") from None
        rd = cls(path).lock()
        try:
            # again under the lock: another writer may have filled or claimed it since the first check
            _on_main(lambda: (cls.check_new(path, overwrite, probe=False), rd._clear()))
        except BaseException:
            rd.unlock()
            raise
        _barrier()  # ... and sees it created
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
            _on_main(self._lock.acquire)
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
        try:
            with open(self.path / METRICS, "a", encoding="utf-8") as f:
                f.write(json.dumps(record, default=_jsonable) + "\n")
        except OSError as err:  # a cut line is skipped by readers and dropped by --resume
            raise _write_error(self.path / METRICS, err, "the records before it are intact") from None

    def read_metrics(self) -> list[dict]:
        return read_jsonl(self.path / METRICS)

    def keep_metrics(self, keep: Callable[[dict], bool]) -> None:
        """Rewrite metrics.jsonl with only the records for which `keep` is true (resume drops lost work)."""
        records = [r for r in self.read_metrics() if keep(r)]
        self.write_text(METRICS, "".join(json.dumps(r, default=_jsonable) + "\n" for r in records))

    # ----------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, tensors: Optional[dict[str, torch.Tensor]], method_state: dict, meta: dict,
                        training: Optional[dict] = None, shards: Optional[Callable[[Path], None]] = None) -> None:
        """Write checkpoints/last atomically; the former `last` becomes `previous` (older ones are deleted).

        The files go to a temporary directory first (fsynced, sizes and sha256 in meta.json), then two
        renames: `last` → `previous`, temporary → `last`. A kill between them leaves only `previous`,
        which `load_latest` falls back to; a failed write (`WriteError`) leaves both untouched.
        `training`: the optimizer / RNG state of a step checkpoint (training.pt), None between tasks.
        `shards`: FSDP's sharded state (migu.fsdp.sharded_writer): every rank calls this method and writes
        its shards into `<temporary>/dcp/` first (`tensors` is then None); rank 0 writes the rest.
        """
        if shards is None:
            if is_main_process():
                self._write_checkpoint(self._temporary(), tensors, method_state, meta, training)
            return
        box = {}
        _on_main(lambda: box.update(tmp=self._temporary()))  # every rank gets rank 0's error, if any
        tmp = Path(_broadcast(str(box.get("tmp"))))
        try:
            shards(tmp / SHARDS)  # DCP: collective; a rank's failure is raised on every rank
            digests = _shared_digests(tmp)
        except BaseException as err:
            if is_main_process():
                shutil.rmtree(tmp, ignore_errors=True)
            raise _write_error(self.path / CHECKPOINT / SHARDS, err, f"the previous checkpoint and summary are "
                               f"intact; free space and continue with: migu run --resume {self.path}") from None
        _on_main(lambda: self._write_checkpoint(tmp, None, method_state, {**meta, "sharded": SHARDS}, training,
                                                digests))

    def _temporary(self) -> Path:
        last = self.path / CHECKPOINT
        try:
            last.parent.mkdir(parents=True, exist_ok=True)
            return Path(tempfile.mkdtemp(dir=last.parent, prefix=".last."))
        except OSError as err:
            raise _write_error(last, err, "the previous checkpoint is intact") from None

    def _write_checkpoint(self, tmp: Path, tensors: Optional[dict[str, torch.Tensor]], method_state: dict, meta: dict,
                          training: Optional[dict], digests: Optional[dict] = None) -> None:
        from safetensors.torch import save_file

        last = self.path / CHECKPOINT
        target = tmp
        try:
            files = dict(digests or {})  # a sharded checkpoint's DCP files, written and hashed by every rank
            if tensors is not None:
                target = tmp / "params.safetensors"
                save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(target))
                files[target.name] = digest(target)
            for name, obj in (("method.pt", method_state), ("training.pt", training)):
                if obj is None:
                    continue
                target = tmp / name
                with open(target, "wb") as f:  # through a Python file: a failed write surfaces as OSError
                    torch.save(obj, f)
                    f.flush()
                    os.fsync(f.fileno())
                files[name] = digest(target)
            target = tmp / "meta.json"
            with open(target, "w", encoding="utf-8") as f:
                f.write(_json({**meta, "files": files}))
                f.flush()
                os.fsync(f.fileno())
            fsync_dir(tmp)
            target = last
            previous = self.path / PREVIOUS
            if last.exists():
                if previous.exists():  # renamed away first: deleting in place is not atomic
                    os.replace(previous, Path(tempfile.mkdtemp(dir=last.parent, prefix=".last.")) / "old")
                os.replace(last, previous)
            os.replace(tmp, last)
            fsync_dir(last.parent)
        except BaseException as err:
            shutil.rmtree(tmp, ignore_errors=True)
            named = last / target.name if target.parent == tmp else target  # the file as the user knows it
            raise _write_error(named, err,
                               f"the previous checkpoint and summary are intact; free space (or raise the "
                               f"file-size limit) and continue with: migu run --resume {self.path}") from None
        finally:
            self.clean_temporaries()  # the previous `previous`, moved aside above

    def load_checkpoint(self) -> Optional[tuple[dict[str, torch.Tensor], dict, dict]]:
        """`(tensors, method_state, meta)` of the newest intact checkpoint (see `load_latest`), or None.

        A sharded (FSDP) checkpoint's parameters are read whole into this one process.
        """
        ckpt = self.load_latest()
        if ckpt is None:
            return None
        if ckpt.sharded is not None:
            from migu.fsdp import read_sharded

            return read_sharded(ckpt.sharded), ckpt.method_state, ckpt.meta
        return ckpt.tensors, ckpt.method_state, ckpt.meta

    def load_latest(self, training: bool = False) -> Optional["Checkpoint"]:
        """The newest checkpoint whose files all match meta.json: `last`, else `previous`; None if none exists.

        Every damaged file passed over is named in `Checkpoint.damaged`; when every checkpoint present
        is damaged a RunDirError names them (garbage is never loaded). `training`: also load
        training.pt (optimizer and RNG states of a step checkpoint).
        """
        damaged = []
        for rel in (CHECKPOINT, PREVIOUS, LEGACY):
            where = self.path / rel
            if not where.is_dir():
                continue
            try:
                tensors, method_state, meta, state = load_verified(where, training)
                return Checkpoint(tensors, method_state, meta, state, where=where, damaged=damaged,
                                  sharded=where / SHARDS if meta.get("sharded") else None)
            except Damaged as err:
                damaged.append(f"{_relative(where / err.file, self.path)} {err.why}")
        if damaged:
            raise RunDirError(f"{self.path}: no intact checkpoint to resume from: {'; '.join(damaged)}; "
                              f"start again with --overwrite")
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


def _relative(path: Path, root: Path) -> Path:
    try:
        return root / Path(path).relative_to(root)
    except ValueError:
        return Path(path)


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
