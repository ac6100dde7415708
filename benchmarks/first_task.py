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
# Table 1's settings (benchmarks/results.py SETTINGS and LR); precision: the new default (auto)
SETTINGS = {"model.name": "smollm2-135m", "data.benchmark": "standard", "data.order": 1, "data.train_per_task": 64,
            "data.test_per_task": 40, "data.max_length": 128, "train.batch_size": 8, "train.epochs": 1,
            "eval.mode": "generate", "seed": 0}
LR = {"seq-ft": 5e-5, "seq-lora": 1e-3}
VARIANTS = {"base": {"migu.enabled": False},
            "skip": {"migu.enabled": True, "migu.first_task": "skip"},
            "mask": {"migu.enabled": True, "migu.first_task": "mask"}}
KEEP = ("aa", "bwt", "fwt", "forgetting", "tasks", "matrix", "r0", "method", "migu", "lr", "seed", "precision",
        "wall_time_s", "git_commit", "machine")


def runs():
    return [(f"o1-{m}-{v}-s0", {**SETTINGS, "method.name": m, "train.lr": LR[m], **VARIANTS[v]})
            for m in LR for v in VARIANTS]


def run_all(list_only: bool) -> list[dict]:
    from migu.config import load_config
    from migu.train import run

    done = []
    for name, sets in runs():
        target = ROOT / "results" / "first_task" / f"{name}.json"
        if target.exists() or list_only:
            print(f"{'done' if target.exists() else 'todo'}  {name}", flush=True)
            if target.exists():
                done.append(json.loads(target.read_text()))
            continue
        run_dir = ROOT / "runs" / "first_task" / name
        resume = (run_dir / "config.yaml").is_file()
        cfg = load_config(run_dir / "config.yaml") if resume else load_config(
            None, [f"{k}={v}" for k, v in sets.items()] + [f"output_dir={run_dir}", f"name=first_task-{name}"])
        summary = run(cfg, resume=resume, output_dir=str(run_dir), quiet=True)
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
