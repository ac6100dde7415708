"""The paper's comparisons at CPU scale: one command per table, resumable, committed JSON summaries.

    python benchmarks/results.py table1            # standard benchmark: seq-ft/seq-lora/replay/o-lora ± MIGU
    python benchmarks/results.py table2            # long benchmark (order 4): seq-ft/seq-lora/inc-lora/o-lora ± MIGU
    python benchmarks/results.py table3            # threshold ablation T ∈ {0, .3, .5, .7, .9} (seq-ft + MIGU)
    python benchmarks/results.py table4            # cost: overhead ratios (benchmarks/overhead.py) + wall times
    python benchmarks/results.py render            # docs/RESULTS.md from results/*/*.json
    python benchmarks/results.py table1 --list     # what would run, and what is done

Every run of a table uses the same SETTINGS (subset sizes, epochs, lrs) — only the method and MIGU
differ. Runs go to runs/results/<table>/<run>/ (ignored by git) and resume where they stopped; each
finished run's summary (AA, BWT, FWT, forgetting, matrix, settings, git commit) is written to
results/<table>/<run>.json, which is committed. `render` reads only results/.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Why these sizes (../shared/NOTES.md, measured on the 2-core CPU machine): 64 training examples = 8 steps
# of batch 8 per task is enough for full FT at lr 5e-5 to learn dbpedia/agnews and to forget visibly;
# LoRA needs lr 1e-3 to move in so few steps. 40 test examples per task (±8 points per cell) keeps one
# 4-task run near 10 minutes. Identical across the methods of a table.
SETTINGS = {
    "model.name": "smollm2-135m",
    "data.train_per_task": 64,
    "data.test_per_task": 40,
    "data.max_length": 128,
    "train.batch_size": 8,
    "train.epochs": 1,
    "eval.mode": "generate",
}
LR = {"seq-ft": 5e-5, "replay": 5e-5, "seq-lora": 1e-3, "o-lora": 1e-3, "inc-lora": 1e-3}
SEEDS = (0, 1, 2)


def _runs(methods, orders, seeds, benchmark, thresholds=(None, 0.7), extra=None):
    # seed-major, then order: a table stopped part-way holds whole seeds (every condition once) first
    runs = []
    for seed in seeds:
        for order in orders:
            for method in methods:
                for t in thresholds:
                    tag = "base" if t is None else f"migu{t}"
                    sets = {**SETTINGS, **(extra or {}), "data.benchmark": benchmark, "data.order": order,
                            "method.name": method, "train.lr": LR[method], "seed": seed,
                            "migu.enabled": t is not None}
                    if t is not None:
                        sets["migu.threshold"] = t
                    runs.append((f"o{order}-{method}-{tag}-s{seed}", sets))
    return runs


TABLES = {
    "table1": lambda a: _runs(["seq-ft", "seq-lora", "replay", "o-lora"], a.orders or [1], a.seeds, "standard"),
    "table2": lambda a: _runs(["seq-ft", "seq-lora", "inc-lora", "o-lora"], a.orders or [4], a.seeds[:1], "long"),
    "table3": lambda a: _runs(["seq-ft"], a.orders or [1], a.seeds[:1], "standard",
                              thresholds=(0.0, 0.3, 0.5, 0.7, 0.9)),
}


def _version() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def shard(runs: list, spec: str | None) -> list:
    """The runs of shard "K/N" (every N-th run from the K-th, K in 0..N-1); all runs when spec is None."""
    if spec is None:
        return runs
    try:
        k, n = (int(x) for x in spec.split("/"))
        if not 0 <= k < n:
            raise ValueError
    except ValueError:
        raise SystemExit(f"error: --shard must be K/N with 0 <= K < N, got {spec!r}") from None
    return runs[k::n]


def run_table(table: str, runs, list_only: bool, threads: int | None = None) -> None:
    from migu.config import load_config
    from migu.train import run

    out_json = ROOT / "results" / table
    out_json.mkdir(parents=True, exist_ok=True)
    for name, sets in runs:
        target = out_json / f"{name}.json"
        if target.exists() or list_only:
            print(f"{'done' if target.exists() else 'todo'}  {table}/{name}")
            continue
        run_dir = ROOT / "runs" / "results" / table / name
        overrides = [f"{k}={v}" for k, v in sets.items()] + [f"output_dir={run_dir}", f"name={table}-{name}"]
        if threads:  # not a setting: float results may differ in the last bits, never the protocol
            overrides.append(f"threads={threads}")
        resume = (run_dir / "config.yaml").is_file()
        cfg = load_config(run_dir / "config.yaml") if resume else load_config(None, overrides)
        print(f"{'resume' if resume else 'start '} {table}/{name}", flush=True)
        summary = run(cfg, resume=resume, output_dir=str(run_dir), quiet=True)
        keep = {k: summary.get(k) for k in ("aa", "bwt", "fwt", "forgetting", "tasks", "matrix", "r0", "method",
                                             "migu", "seed", "lr", "wall_time_s", "git_commit", "versions")}
        keep.update(table=table, run=name, settings=sets, code_version=_version(), threads=cfg.threads)
        target.write_text(json.dumps(keep, indent=1) + "\n")
        print(f"done   {table}/{name}: AA {summary['aa']:.1f} BWT {summary.get('bwt')}", flush=True)


def _fmt(values):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f} (n={len(values)})"


def render() -> Path:
    """docs/RESULTS.md from results/<table>/*.json: mean ± sample std over seeds per condition."""
    lines = ["# Results", "", "Generated by `python benchmarks/results.py render` from `results/`; every number",
             "comes from a committed script run on the 2-core CPU machine (see each table's command).", ""]
    for table in ("table1", "table2", "table3"):
        files = sorted((ROOT / "results" / table).glob("*.json"))
        lines += [f"## {table}", "", f"`python benchmarks/results.py {table}`", ""]
        if not files:
            lines += ["Not run yet.", ""]
            continue
        groups: dict[tuple, list[dict]] = {}
        for f in files:
            r = json.loads(f.read_text())
            s = r["settings"]
            t = s.get("migu.threshold") if s.get("migu.enabled") else None
            groups.setdefault((s["data.order"], s["method.name"], t), []).append(r)
        lines += ["| order | method | MIGU T | AA | BWT | FWT | forgetting | wall s (mean) | code |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (order, method, t), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or -1)):
            wall = statistics.mean(r["wall_time_s"] for r in rs)
            codes = ",".join(sorted({r["code_version"] for r in rs}))
            lines.append(f"| {order} | {method} | {'–' if t is None else t} | {_fmt([r['aa'] for r in rs])} | "
                         f"{_fmt([r['bwt'] for r in rs])} | {_fmt([r['fwt'] for r in rs])} | "
                         f"{_fmt([r['forgetting'] for r in rs])} | {wall:.0f} | {codes} |")
        lines.append("")
    over = ROOT / "results" / "overhead" / "overhead.json"
    lines += ["## table4: cost", "", "`python benchmarks/overhead.py`", ""]
    if over.exists():
        o = json.loads(over.read_text())
        lines += [f"MIGU step-time ratio (CPU time, interleaved, batch {o['batch']}×{o['length']}, {o['model']}): "
                  f"full FT ×{o['full_ft_ratio']:.3f}, LoRA ×{o['lora_ratio']:.3f}; MIGU state {o['extra_bytes']} "
                  f"bytes ({o['full_ft_units']} units).", ""]
    else:
        lines += ["Not run yet.", ""]
    out = ROOT / "docs" / "RESULTS.md"
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=[*TABLES, "table4", "render"])
    p.add_argument("--orders", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=list(SEEDS))
    p.add_argument("--list", action="store_true", help="only list the runs and whether they are done")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only every N-th run from the K-th (run N shards side by side, one per core)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    a = p.parse_args(argv)
    if a.table == "render":
        print(f"wrote {render()}")
    elif a.table == "table4":
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py")], check=True)
        print(f"wrote {render()}")
    else:
        run_table(a.table, shard(TABLES[a.table](a), a.shard), a.list, a.threads)
        render()


if __name__ == "__main__":
    main()
