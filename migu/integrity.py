"""Files that are either whole or reported: I/O errors named, checkpoint files verified before loading.

A checkpoint directory's meta.json records each file's size and sha256 (`digest`); `load_verified`
checks them before any file is parsed, so a truncated or corrupted file is named (`Damaged`) instead of
being loaded as garbage or ending in a safetensors traceback. Checkpoints written by older versions
carry no digests: there a file that fails to parse is reported the same way. An FSDP checkpoint in the
sharded format keeps its parameters and optimizer state in the DCP directory `dcp/` (every rank's shard
files and `.metadata`, each listed in meta.json) instead of params.safetensors; `Checkpoint.sharded` is
that directory and `tensors` is None (migu.fsdp loads it).
"""

from __future__ import annotations

import errno as errno_codes
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

SHARDS = "dcp"  # a sharded checkpoint's DCP directory (migu.fsdp)


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


@dataclass
class Checkpoint:
    """One verified checkpoint: what `RunDir.load_latest` returns."""

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
