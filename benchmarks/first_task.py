"""Issue 14's first measurement: MIGU with the first task unmasked (`migu.first_task: skip`, the reference
code) against masked (`mask`, migu before), beside the base run, at Table 1's CPU settings.

    python benchmarks/first_task.py            # standard order 1, seed 0: seq-ft and seq-lora, base / skip / mask
    python benchmarks/first_task.py --list     # what is done

Each run goes to runs/first_task/<run>/ (resumable) and its summary to results/first_task/<run>.json (committed).
The table printed at the end is the one in the closing note of issue 14 and in README.md.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "benchmarks"))
from results import LR as TABLE_LR, SETTINGS as TABLE_SETTINGS, _run_one  # noqa: E402  Table 1's protocol

SETTINGS = {**TABLE_SETTINGS, "data.benchmark": "standard", "data.order": 1, "seed": 0}
LR = {m: TABLE_LR[m] for m in ("seq-ft", "seq-lora")}
VARIANTS = {"base": {"migu.enabled": False},
            "skip": {"migu.enabled": True, "migu.first_task": "skip"},
            "mask": {"migu.enabled": True, "migu.first_task": "mask"}}
KEEP = ("aa", "bwt", "fwt", "forgetting", "tasks", "matrix", "r0", "method", "migu", "lr", "seed", "precision",
        "wall_time_s", "git_commit", "machine")


def runs():
    return [(f"o1-{m}-{v}-s0", {**SETTINGS, "method.name": m, "train.lr": LR[m], **VARIANTS[v]})
            for m in LR for v in VARIANTS]


def run_all(list_only: bool) -> list[dict]:
    done = []
    for name, sets in runs():
        target = ROOT / "results" / "first_task" / f"{name}.json"
        if target.exists() or list_only:
            print(f"{'done' if target.exists() else 'todo'}  {name}", flush=True)
            if target.exists():
                done.append(json.loads(target.read_text()))
            continue
        summary, _ = _run_one("first_task", name, sets, ROOT / "runs" / "first_task" / name, None)
        keep = {k: summary.get(k) for k in KEEP} | {"run": name, "settings": sets}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(keep, indent=1) + "\n")
        print(f"done  {name}: AA {summary['aa']:.1f} BWT {summary['bwt']:.1f}", flush=True)
        done.append(keep)
    return done


def table(summaries: list[dict]) -> str:
    lines = ["| method | MIGU | first task | AA | BWT | R[0][0] | learned R[i][i] (mean) |", "|---|---|---|---:|---:|---:|---:|"]
    for s in summaries:
        variant = s["run"].split("-")[-2]
        diag = [s["matrix"][i][i] for i in range(len(s["matrix"]))]
        lines.append(f"| {s['method']} | {'off' if variant == 'base' else 'T=0.7'} | "
                     f"{'—' if variant == 'base' else variant} | {s['aa']:.1f} | {s['bwt']:+.1f} | {diag[0]:.1f} | "
                     f"{sum(diag) / len(diag):.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--list", action="store_true", help="list what is done and what is left")
    args = parser.parse_args()
    results = run_all(args.list)
    if results:
        print(table(results))
    sys.exit(0)
