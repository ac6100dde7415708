"""Where a run's numbers come from: the git commit, a fingerprint of migu's sources, package versions, the machine.

Written into config.yaml (`provenance`) and summary.json by the loop; `benchmarks/results.py` records it too.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import os
import platform
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch


def provenance() -> dict:
    """Git commit of the code and versions of the packages and machine that decide the numbers.

    Read once per process: the code that runs is the code imported at start, so a commit made while a
    long run is going must not be recorded as the one that produced it.
    """
    return copy.deepcopy(_provenance())


@functools.cache
def _provenance() -> dict:
    import peft
    import transformers

    import migu

    commit = None
    try:
        root = Path(__file__).resolve().parent.parent
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                timeout=10).stdout.strip() or None
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()
        if commit and dirty:
            commit += "-dirty"
    except (OSError, subprocess.SubprocessError):
        pass
    return {"git_commit": commit, "code": code_fingerprint(), "machine": machine(), "versions": {
        "migu": migu.__version__, "python": sys.version.split()[0], "torch": str(torch.__version__),
        "transformers": str(transformers.__version__), "peft": str(peft.__version__), "numpy": str(np.__version__)}}


def code_fingerprint(root: Path | None = None) -> str:
    """12 hex digits of SHA-256 over migu's Python sources (relative path + bytes, sorted), report/ excepted.

    What decides a run's numbers, unlike the git commit, which also moves with docs, tests and committed
    results: runs with one fingerprint ran the same package code, whichever commit they were made at.
    migu/report/ only reads finished run directories, so a change to a table or figure leaves it alone.
    """
    root = root or Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith("report/"):
            continue
        digest.update(rel.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:12]


def machine() -> dict:
    """CPU model, core count and the ISA torch's kernels use, and the CUDA device if any.

    Float results (and so a few generated answers) can differ between machines with the same code.
    """
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu, "cores": os.cpu_count(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "gpu": gpu}
