"""Files that are either whole or reported: atomic writes, I/O errors named, checkpoints verified.

A file is written to a temporary file and moved over the old one (`atomic_write_text`); a failed write
(no space, file-size limit) raises `WriteError` naming the file, and the old version is intact.
A checkpoint (`checkpoints/last`, `checkpoints/previous`) is a directory written the same way: files to a
temporary directory, then two renames (`save_checkpoint`). Its meta.json records each file's size and
sha256 (`digest`); `load_verified` checks them before any file is parsed, so a truncated or corrupted
file is named (`Damaged`) instead of being loaded as garbage or ending in a safetensors traceback, and
`load_latest` falls back to `previous`. Checkpoints written by older versions carry no digests: there a
file that fails to parse is reported the same way. An FSDP checkpoint in the sharded format keeps its
parameters and optimizer state in the DCP directory `dcp/` (every rank's shard files and `.metadata`,
each listed in meta.json) instead of params.safetensors; `Checkpoint.sharded` is that directory and
`tensors` is None (migu.fsdp loads it). Only rank 0 writes (`on_main`); `migu.rundir.RunDir` calls these.
"""
from __future__ import annotations

import errno as errno_codes
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch

from migu.distributed import gather_objects, is_main_process, rank, world_size
from migu.fsdp import read_sharded

CHECKPOINT = Path("checkpoints") / "last"
PREVIOUS = CHECKPOINT.with_name("previous")
LEGACY = CHECKPOINT.with_name("last.old")  # the fallback name of older versions (read only)
SHARDS = "dcp"  # a sharded checkpoint's DCP directory (migu.fsdp)
_UMASK = os.umask(0)
os.umask(_UMASK)


class RunDirError(ValueError):
    """A run directory that cannot be used as asked (exists, missing, not a run directory, locked, damaged)."""


class WriteError(RunDirError):
    """A file of the run directory could not be written (no space, file-size limit); the old version is intact."""


def io_reason(err: BaseException) -> Optional[str]:
    """`strerror (ECODE)` when `err` is (or wraps) an operating-system I/O error, else None.

    torch.save reports a failed write as a RuntimeError whose context is the OSError; safetensors as
    a SafetensorError whose message carries "os error N".
    """
    seen = err
    for _ in range(10):  # the chain of causes/contexts (bounded: a cycle is possible in principle)
        if seen is None:
            break
        if isinstance(seen, OSError) and seen.errno:
            return f"{seen.strerror or os.strerror(seen.errno)} ({errno_codes.errorcode.get(seen.errno, seen.errno)})"
        seen = seen.__cause__ or seen.__context__
    found = re.search(r"os error (\d+)", str(err))
    if found:
        code = int(found.group(1))
        return f"{os.strerror(code)} ({errno_codes.errorcode.get(code, code)})"
    return None


def write_error(path: Path, err: BaseException, what: str = "") -> BaseException:
    """A WriteError for an I/O failure, else `err` itself (a bug must not pass for a full disk)."""
    reason = io_reason(err)
    if reason is None:
        return err
    return WriteError(f"cannot write {path}: {reason}; {what or 'its previous version is intact'}")


def on_main(fn: Callable[[], None]) -> None:
    """Run `fn` on rank 0 only; a RunDirError it raises is raised on every rank (same one-line message)."""
    error = None
    if is_main_process():
        try:
            fn()
        except RunDirError as err:
            error = (type(err) is WriteError, str(err))
    error = gather_objects(error)[0]  # rank 0's
    if error:
        raise (WriteError if error[0] else RunDirError)(error[1])


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file in the same directory and `os.replace`."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as err:
        raise write_error(path, err) from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except BaseException as err:
        Path(tmp).unlink(missing_ok=True)
        raise write_error(path, err) from None


def to_json(obj) -> str:
    text = json.dumps(obj, indent=1, default=jsonable)
    # lists without nested containers on one line (JSON strings hold no raw newlines, so this is safe)
    return re.sub(r"\[[^\[\]{}]*\]", lambda m: re.sub(r"\s*\n\s*", " ", m.group(0)).replace("[ ", "[").replace(" ]", "]"),
                  text) + "\n"


def jsonable(value):
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, torch.Tensor):
        return value.tolist()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


@dataclass
class Checkpoint:
    """One verified checkpoint: what `load_latest` returns."""

    tensors: dict
    method_state: dict
    meta: dict
    training: Optional[dict] = None
    where: Optional[Path] = None
    damaged: list = field(default_factory=list)  # "<file> <why>" of newer checkpoints passed over
    sharded: Optional[Path] = None  # the DCP directory of a sharded (FSDP) checkpoint; `tensors` is then None


class Damaged(Exception):
    def __init__(self, file: str, why: str):
        super().__init__(f"{file} {why}")
        self.file, self.why = file, why


def digest(path: Path) -> dict:
    with open(path, "rb") as f:
        return {"bytes": os.fstat(f.fileno()).st_size, "sha256": hashlib.file_digest(f, "sha256").hexdigest()}


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def load_verified(where: Path, training: bool) -> tuple:
    """(tensors, method_state, meta, training state or None) of one checkpoint directory, or `Damaged`.

    A sharded checkpoint's DCP files are verified here too; its tensors (None) are loaded by migu.fsdp.
    """
    from safetensors.torch import load_file

    try:
        meta = json.loads((where / "meta.json").read_text(encoding="utf-8"))
        if not isinstance(meta, dict):
            raise ValueError("not an object")
    except FileNotFoundError:
        raise Damaged("meta.json", "is missing (an interrupted write)") from None
    except (OSError, ValueError) as err:
        raise Damaged("meta.json", f"is damaged ({' '.join(str(err).split())})") from None
    files = meta.get("files")  # absent in checkpoints of older versions: only loading can tell
    for name, want in (files or {}).items():
        if not (where / name).is_file():
            raise Damaged(name, "is missing")
        size = (where / name).stat().st_size
        if size != want["bytes"]:
            raise Damaged(name, f"is damaged (truncated? {size} bytes, {want['bytes']} expected)")
        if digest(where / name)["sha256"] != want["sha256"]:
            raise Damaged(name, "is damaged (its sha256 differs from meta.json's)")
    sharded = meta.get("sharded")
    if sharded and f"{sharded}/.metadata" not in (files or {}):
        raise Damaged(f"{sharded}/.metadata", "is not listed in meta.json (an incomplete sharded checkpoint)")
    loaded = []
    for name in ("params.safetensors", "method.pt", "training.pt"):
        if (name == "training.pt" and (not training or name not in (files or {}))) or \
                (sharded and name == "params.safetensors"):
            loaded.append(None)
            continue
        try:
            if name.endswith(".safetensors"):
                loaded.append(load_file(str(where / name)))
            else:
                loaded.append(torch.load(where / name, map_location="cpu", weights_only=True))  # GPU-written too
        except FileNotFoundError:
            raise Damaged(name, "is missing") from None
        except Exception as err:  # an unverified (older) checkpoint: whatever the reader chokes on
            raise Damaged(name, f"is damaged ({' '.join(str(err).split())[:120]})") from None
    tensors, method_state, state = loaded
    return tensors, method_state, meta, state


def _shared_digests(tmp: Path) -> dict:
    """meta.json's entries of the DCP files in `tmp`: each rank hashes its share, every rank gets them all.

    An I/O error on any rank is raised on every rank (so none waits for the others forever).
    """
    files = sorted(p for p in (tmp / SHARDS).rglob("*") if p.is_file())  # the same list on every rank
    try:
        part = ({p.relative_to(tmp).as_posix(): digest(p) for p in files[rank()::world_size()]}, None)
    except OSError as err:
        part = ({}, err)
    parts = gather_objects(part)
    for _, err in parts:
        if err is not None:
            raise err
    return {name: d for found, _ in parts for name, d in found.items()}


def save_checkpoint(root: Path, tensors: Optional[dict[str, torch.Tensor]], method_state: dict, meta: dict,
                    training: Optional[dict] = None, shards: Optional[Callable[[Path], None]] = None) -> None:
    """Write checkpoints/last atomically; the former `last` becomes `previous` (older ones are deleted).

    The files go to a temporary directory first (fsynced, sizes and sha256 in meta.json), then two
    renames: `last` → `previous`, temporary → `last`. A kill between them leaves only `previous`,
    which `load_latest` falls back to; a failed write (`WriteError`) leaves both untouched.
    `training`: the optimizer / RNG state of a step checkpoint (training.pt), None between tasks.
    `shards`: FSDP's sharded state (migu.fsdp.sharded_writer): every rank calls this function and writes
    its shards into `<temporary>/dcp/` first (`tensors` is then None); rank 0 writes the rest.
    """
    if shards is None:
        if is_main_process():
            _write_checkpoint(root, _temporary(root), tensors, method_state, meta, training)
        return
    box = {}
    on_main(lambda: box.update(tmp=_temporary(root)))  # every rank gets rank 0's error, if any
    tmp = Path(gather_objects(str(box.get("tmp")))[0])  # rank 0's
    try:
        shards(tmp / SHARDS)  # DCP: collective; a rank's failure is raised on every rank
        digests = _shared_digests(tmp)
    except BaseException as err:
        if is_main_process():
            shutil.rmtree(tmp, ignore_errors=True)
        raise write_error(root / CHECKPOINT / SHARDS, err, f"the previous checkpoint and summary are "
                          f"intact; free space and continue with: migu run --resume {root}") from None
    on_main(lambda: _write_checkpoint(root, tmp, None, method_state, {**meta, "sharded": SHARDS}, training, digests))


def _temporary(root: Path) -> Path:
    last = root / CHECKPOINT
    try:
        last.parent.mkdir(parents=True, exist_ok=True)
        return Path(tempfile.mkdtemp(dir=last.parent, prefix=".last."))
    except OSError as err:
        raise write_error(last, err, "the previous checkpoint is intact") from None


def _write_checkpoint(root: Path, tmp: Path, tensors: Optional[dict[str, torch.Tensor]], method_state: dict, meta: dict,
                      training: Optional[dict], digests: Optional[dict] = None) -> None:
    from safetensors.torch import save_file

    last = root / CHECKPOINT
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
            f.write(to_json({**meta, "files": files}))
            f.flush()
            os.fsync(f.fileno())
        fsync_dir(tmp)
        target = last
        previous = root / PREVIOUS
        if last.exists():
            if previous.exists():  # renamed away first: deleting in place is not atomic
                os.replace(previous, Path(tempfile.mkdtemp(dir=last.parent, prefix=".last.")) / "old")
            os.replace(last, previous)
        os.replace(tmp, last)
        fsync_dir(last.parent)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        named = last / target.name if target.parent == tmp else target  # the file as the user knows it
        raise write_error(named, err,
                          f"the previous checkpoint and summary are intact; free space (or raise the "
                          f"file-size limit) and continue with: migu run --resume {root}") from None
    finally:
        clean_temporaries(root)  # the previous `previous`, moved aside above


def load_checkpoint(root: Path) -> Optional[tuple[dict[str, torch.Tensor], dict, dict]]:
    """`(tensors, method_state, meta)` of the newest intact checkpoint (see `load_latest`), or None.

    A sharded (FSDP) checkpoint's parameters are read whole into this one process.
    """
    ckpt = load_latest(root)
    if ckpt is None:
        return None
    if ckpt.sharded is not None:
        return read_sharded(ckpt.sharded), ckpt.method_state, ckpt.meta
    return ckpt.tensors, ckpt.method_state, ckpt.meta


def load_latest(root: Path, training: bool = False) -> Optional["Checkpoint"]:
    """The newest checkpoint whose files all match meta.json: `last`, else `previous`; None if none exists.

    Every damaged file passed over is named in `Checkpoint.damaged`; when every checkpoint present
    is damaged a RunDirError names them (garbage is never loaded). `training`: also load
    training.pt (optimizer and RNG states of a step checkpoint).
    """
    damaged = []
    for rel in (CHECKPOINT, PREVIOUS, LEGACY):
        where = root / rel
        if not where.is_dir():
            continue
        try:
            tensors, method_state, meta, state = load_verified(where, training)
            return Checkpoint(tensors, method_state, meta, state, where=where, damaged=damaged,
                              sharded=where / SHARDS if meta.get("sharded") else None)
        except Damaged as err:
            damaged.append(f"{_relative(where / err.file, root)} {err.why}")
    if damaged:
        raise RunDirError(f"{root}: no intact checkpoint to resume from: {'; '.join(damaged)}; "
                          f"start again with --overwrite")
    return None


def clean_temporaries(root: Path) -> None:
    """Remove leftovers of writes interrupted by a kill (temporary files and checkpoint dirs)."""
    if not is_main_process():
        return
    for tmp in list(root.glob(".*.tmp")) + list((root / CHECKPOINT.parent).glob(".last.*")):
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def _relative(path: Path, root: Path) -> Path:
    try:
        return root / Path(path).relative_to(root)
    except ValueError:
        return Path(path)
