"""The paper's comparisons at CPU scale: one command per table, resumable, committed JSON summaries.

    python benchmarks/results.py table1            # standard benchmark: seq-ft/seq-lora/replay/o-lora ± MIGU
    python benchmarks/results.py table2            # long benchmark (order 4): seq-ft/seq-lora/inc-lora/o-lora ± MIGU
    python benchmarks/results.py table3            # threshold ablation T ∈ {0, .3, .5, .7, .9} (seq-ft + MIGU)
    python benchmarks/results.py table4            # cost: overhead ratios (benchmarks/overhead.py) + wall times
    python benchmarks/results.py evidence          # magnitude similarity of the table1 tasks (seq-ft runs, seed 0)
    python benchmarks/results.py reproduce         # rerun the oldest run of each table with today's code, compare
    python benchmarks/results.py render            # docs/RESULTS.md from results/*/*.json
    python benchmarks/results.py table1 --list     # what would run, and what is done

The plateau regime (the results issue), in order: `lr`, `regime`, `plateau1`, `ablation`, `plateau_long`,
`evidence` (each with `--shard K/N --threads 1` to run side by side). All their runs share one migu code
version (`check_code` refuses another); once the package has moved on, run them from a worktree whose
migu/ is that version — `git worktree add --detach ../wt main && git -C ../wt checkout 9437ce0 -- migu` —
and copy results/<table>/*.json back. The driver imports the migu of its own checkout, not the installed one.
That migu/ predates the huge-page default: export THP_MEM_ALLOC_ENABLE=1 there (~10% faster, bit-identical).

Every run of a table uses the same SETTINGS (subset sizes, epochs, lrs) — only the method and MIGU
differ. Runs go to runs/results/<table>/<run>/ (ignored by git) and resume where they stopped; each
finished run's summary (AA, BWT, FWT, forgetting, matrix, settings, git commit) is written to
results/<table>/<run>.json, which is committed. `render` reads only results/.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # this checkout's migu (a results worktree's), whichever is installed

# Why these settings: printed at the top of docs/RESULTS.md, so the reason travels with the numbers.
WHY = """Why these settings (measured on this machine, see ../shared/NOTES.md): one full-FT step of batch 8
takes ~5 s and one generated answer ~0.2 s on 2 CPU cores, so a run must stay near 6 minutes for 24 of
them to fit. 64 training examples (8 steps of batch 8, one epoch) per task is enough for full fine-tuning
at lr 5e-5 to learn the label format and most of dbpedia/agnews and to forget visibly; LoRA (r=8) needs
lr 1e-3 to move in so few steps (lr 3e-4 learned too slowly). 40 test examples per task (±8 points per
cell) and inputs cut to 128 tokens. The untrained model answers in prose (≈0–3% exact match), so the
`learned R[i][i]` column far above `untrained` is the check that each task was learned. The long benchmark
(15 tasks) at these sizes would take ~40 min a run (15 × 15 cells of 40 examples); it uses half the
steps per task, 16 test examples per cell and only the cells AA, BWT and FWT need (`eval.matrix:
diagonal`: 43 cells instead of 225), so forgetting is not measured there. Settings are identical across
the methods of a table; only the method, its lr (full FT vs LoRA) and MIGU differ."""
SETTINGS = {
    "model.name": "smollm2-135m",
    "data.train_per_task": 64,
    "data.test_per_task": 40,
    "data.max_length": 128,
    "train.batch_size": 8,
    "train.epochs": 1,
    "eval.mode": "generate",
}
LONG = {"data.train_per_task": 32, "data.test_per_task": 16, "eval.matrix": "diagonal"}
LR = {"seq-ft": 5e-5, "replay": 5e-5, "seq-lora": 1e-3, "o-lora": 1e-3, "inc-lora": 1e-3}
# 3 seeds where a table's runs take ~6 min; the 15-task long benchmark (~8 min a run, 8 runs a seed) gets one
SEEDS = {"table1": (0, 1, 2), "table2": (0,), "table3": (0, 1, 2)}


def _runs(methods, orders, seeds, benchmark, thresholds=(None, 0.7), extra=None, base=None, lrs=None, variant=None):
    """(name, settings) of a grid; `base`/`lrs` default to the 8-step SETTINGS/LR; `variant` = (tag, MIGU options)."""
    # seed-major, then order: a table stopped part-way holds whole seeds (every condition once) first
    runs = []
    for seed in seeds:
        for order in orders:
            for method in methods:
                for t in thresholds:
                    tag = "base" if t is None else f"migu{t}" + (f"-{variant[0]}" if variant else "")
                    sets = {**(base or SETTINGS), **(extra or {}), "data.benchmark": benchmark, "data.order": order,
                            "method.name": method, "train.lr": (lrs or LR)[method], "seed": seed,
                            "migu.enabled": t is not None}
                    if t is not None:
                        sets.update({"migu.threshold": t, **(variant[1] if variant else {})})
                    runs.append((f"o{order}-{method}-{tag}-s{seed}", sets))
    return runs


TABLES = {
    "table1": lambda a: _runs(["seq-ft", "seq-lora", "replay", "o-lora"], a.orders or [1], a.seeds or SEEDS["table1"],
                              "standard"),
    "table2": lambda a: _runs(["seq-ft", "seq-lora", "inc-lora", "o-lora"], a.orders or [4],
                              a.seeds or SEEDS["table2"], "long", extra=LONG),
    "table3": lambda a: _runs(["seq-ft"], a.orders or [1], a.seeds or SEEDS["table3"], "standard",
                              thresholds=(0.0, 0.3, 0.5, 0.7, 0.9)),
}


# ------------------------------------------------------------------------------------------ the plateau regime
# Issue 19: the 8-step tables above trained no task to its plateau. First the learning rate (best AA of two or
# three per method at the largest size, order 1, seed 0, then fixed), then learned R[i][i] against training
# examples per task at that rate; the later tables use the smallest size within PLATEAU_GAP of the best.
PLATEAU = {**SETTINGS, "data.test_per_task": 100}  # ±5 points a cell instead of ±8
REGIME_SIZES = (64, 128, 256, 400)  # yahoo's training split in CL_Benchmark holds 400 examples
LR_GRID = {"seq-ft": (1e-5, 5e-5, 1e-4), "seq-lora": (1e-4, 3e-4, 1e-3)}
PLATEAU_GAP = 3.0  # points of mean learned R[i][i] below the best size that still count as the plateau


def _plateau_run(method: str, n: int, lr: float, seed: int = 0, order: int = 1) -> tuple[str, dict]:
    sets = {**PLATEAU, "data.train_per_task": n, "data.benchmark": "standard", "data.order": order,
            "method.name": method, "train.lr": lr, "seed": seed, "migu.enabled": False}
    return f"o{order}-{method}-lr{lr:.0e}-n{n}-s{seed}".replace("e-0", "e-"), sets


def table_runs(table: str, root: Path = ROOT) -> list[dict]:
    """The committed summaries of a table, root/results/<table>/*.json, in file-name order."""
    return [json.loads(f.read_text()) for f in sorted((root / "results" / table).glob("*.json"))]


def chosen_lr(method: str, root: Path = ROOT) -> float:
    """The lr of the `lr` table's best AA for `method` (ties: the higher learned R[i][i]); fixed once committed."""
    runs = [r for r in table_runs("lr", root) if r["settings"]["method.name"] == method]
    if len(runs) < len(LR_GRID[method]):
        raise SystemExit(f"error: results/lr holds {len(runs)} of {len(LR_GRID[method])} {method} runs: "
                         "run `python benchmarks/results.py lr` first")
    return max(runs, key=lambda r: (r["aa"], _learned(r) or 0.0))["settings"]["train.lr"]


def plateau_grid(root: Path | None = None) -> tuple[dict, dict]:
    """Settings and lrs of steps 2–5: the regime's plateau size; full FT methods at seq-ft's lr, LoRA ones at seq-lora's."""
    root = root or ROOT
    size = plateau_size(table_runs("regime", root))
    if size is None:
        raise SystemExit("error: results/regime is incomplete: run `python benchmarks/results.py regime` first")
    ft, lora = chosen_lr("seq-ft", root), chosen_lr("seq-lora", root)
    return {**PLATEAU, "data.train_per_task": size}, {m: lora if "lora" in m else ft for m in LR}


# one condition changed at a time from the defaults (first task skip, head out, all tokens, B by layer output)
ABLATIONS = {"seq-ft": [("mask", {"migu.first_task": "mask"}), ("head", {"migu.include_lm_head": True}),
                        ("answer", {"migu.tokens": "answer"})],
             "seq-lora": [("own", {"migu.lora_b": "own"})]}
# the 15-task benchmark at the plateau size would take hours a run: 16 steps per task, diagonal evaluation
LONG_PLATEAU = {"data.train_per_task": 128, "eval.matrix": "diagonal"}


def _plateau_tables(a, name: str) -> list:
    runs = _plateau_grid(a, name)
    return [r for r in runs if r[1]["data.order"] in a.orders] if a.orders else runs


def _plateau_grid(a, name: str) -> list:
    base, lrs = plateau_grid(getattr(a, "root", None))
    seeds = a.seeds or (0, 1, 2)
    if name == "plateau1":  # Table 1 anew: order 1 with replay and O-LoRA, orders 2 and 3 with the sequential two
        return (_runs(["seq-ft", "seq-lora", "replay", "o-lora"], [1], seeds, "standard", base=base, lrs=lrs)
                + _runs(["seq-ft", "seq-lora"], [2, 3], seeds, "standard", base=base, lrs=lrs))
    if name == "ablation":  # the base and T=0.7 runs are plateau1's (copied)
        runs = _runs(["seq-ft"], [1], seeds, "standard", thresholds=(None, 0.3, 0.5, 0.7, 0.9), base=base, lrs=lrs)
        runs += _runs(["seq-lora"], [1], seeds, "standard", base=base, lrs=lrs)
        for method, variants in ABLATIONS.items():
            for variant in variants:
                runs += _runs([method], [1], seeds, "standard", thresholds=(0.7,), base=base, lrs=lrs, variant=variant)
        return runs
    return _runs(["seq-ft", "seq-lora"], [4], a.seeds or (0,), "long", extra=LONG_PLATEAU, base=base, lrs=lrs)


TABLES["lr"] = lambda a: [_plateau_run(m, max(REGIME_SIZES), lr) for m in LR_GRID for lr in LR_GRID[m]]
TABLES["regime"] = lambda a: [_plateau_run(m, n, chosen_lr(m)) for m in LR_GRID for n in REGIME_SIZES]
for _name in ("plateau1", "ablation", "plateau_long"):
    TABLES[_name] = lambda a, name=_name: _plateau_tables(a, name)


def _version() -> str:
    """The short git commit the numbers come from (migu's provenance, as in each run's summary)."""
    from migu.provenance import provenance

    return _short(provenance()["git_commit"])


def _short(commit: str | None) -> str:
    return (commit or "unknown")[:7]


def pick_methods(runs: list, methods: list[str] | None) -> list:
    """The runs of the given methods (all when None); a name outside the grid is an error."""
    if methods is None:
        return runs
    known = list(dict.fromkeys(sets["method.name"] for _, sets in runs))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise SystemExit(f"error: --methods: {', '.join(unknown)} not in this table (its methods: {', '.join(known)})")
    return [(name, sets) for name, sets in runs if sets["method.name"] in methods]


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


def _run_one(table: str, name: str, sets: dict, run_dir: Path, threads: int | None):
    """Run (or resume) one grid point into run_dir; returns (summary, resolved config)."""
    from migu.config import load_config
    from migu.train import run

    overrides = [f"{k}={v}" for k, v in sets.items()] + [f"output_dir={run_dir}", f"name={table}-{name}"]
    if threads:  # not a setting: float results may differ in the last bits, never the protocol
        overrides.append(f"threads={threads}")
    resume = (run_dir / "config.yaml").is_file()
    cfg = load_config(run_dir / "config.yaml") if resume else load_config(None, overrides)
    print(f"{'resume' if resume else 'start '} {table}/{name}", flush=True)
    return run(cfg, resume=resume, output_dir=str(run_dir), quiet=True), cfg


def _same_settings(sets: dict, root: Path, table: str) -> Path | None:
    """A committed run of another table than `table` with exactly these settings, if any."""
    for f in sorted((root / "results").glob("*/*.json")):
        if f.parent.name == table:
            continue
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if json.loads(f.read_text())["settings"] == sets:
                return f
    return None


# Tables whose runs must all share one code version: the plateau regime's steps size and feed each other
PLATEAU_FAMILY = ("lr", "regime", "plateau1", "ablation", "plateau_long")


def check_code(table: str, root: Path = ROOT) -> None:
    """Refuse to add a run to a table (or the plateau family) made with other migu code than this checkout's.

    The package moves on while a table's runs are made over several sessions; mixing fingerprints in one
    table would compare two programs. The message names the commit whose migu/ the table ran.
    """
    from migu.provenance import code_fingerprint

    group = PLATEAU_FAMILY if table in PLATEAU_FAMILY else (table,)
    runs = [r for t in group for r in table_runs(t, root)]
    codes = {r.get("code") for r in runs} - {None}
    here = code_fingerprint()
    if codes and here not in codes:
        last = next(r for r in runs if r.get("code") in codes)  # a run that recorded its code
        commit = (last.get("git_commit") or "?").removesuffix("-dirty")[:12]
        raise SystemExit(f"error: results/{table}: its runs ran migu code {', '.join(sorted(codes))} (e.g. commit "
                         f"{commit}); this checkout's migu/ is {here}: run from a worktree whose migu/ is that code "
                         f"(`git checkout {commit} -- migu`), or move the table's results away to rerun them all")


def run_table(table: str, runs, list_only: bool, threads: int | None = None, root: Path = ROOT) -> None:
    out_json = root / "results" / table
    out_json.mkdir(parents=True, exist_ok=True)
    checked = False
    for name, sets in runs:
        target = out_json / f"{name}.json"
        if target.exists() or list_only:
            print(f"{'done' if target.exists() else 'todo'}  {table}/{name}")
            continue
        same = _same_settings(sets, root, table)
        if same is not None:  # e.g. the regime's largest size is the lr table's chosen run: one run, two tables
            target.write_text(json.dumps({**json.loads(same.read_text()), "table": table, "run": name}, indent=1) + "\n")
            print(f"done   {table}/{name}: the same settings as {same.parent.name}/{same.stem}", flush=True)
            continue
        if not checked:  # before the first run this call trains
            check_code(table, root)
            checked = True
        summary, cfg = _run_one(table, name, sets, root / "runs" / "results" / table / name, threads)
        keep = {k: summary.get(k) for k in ("aa", "bwt", "fwt", "forgetting", "tasks", "matrix", "r0", "method",
                                             "migu", "seed", "lr", "wall_time_s", "git_commit", "code", "machine",
                                             "versions", "precision", "attention")}
        keep.update(table=table, run=name, settings=sets, code_version=_short(summary["git_commit"]),
                    threads=cfg.threads)
        target.write_text(json.dumps(keep, indent=1) + "\n")
        print(f"done   {table}/{name}: AA {summary['aa']:.1f} BWT {summary.get('bwt')}", flush=True)


# The cheapest default-thread run of each table's oldest code version, and the plateau family's oldest run:
# rerun with today's code on today's machine
REPRODUCE = ("table1/o1-seq-lora-base-s0", "table2/o4-seq-lora-base-s0", "table3/o1-seq-ft-migu0.0-s0",
             "lr/o1-seq-ft-lr1e-5-n400-s0")


def reproduce(specs=REPRODUCE, root: Path = ROOT) -> list[Path]:
    """Rerun committed runs with the current code; results/reproduce/<table>--<run>.json says what changed.

    A table's runs were made over several sessions, commits and possibly machines; this is the check that
    the numbers do not depend on which: the rerun's matrix is compared cell by cell with the committed one.
    """
    written = []
    for spec in specs:
        table, _, name = spec.partition("/")
        source = root / "results" / table / f"{name}.json"
        if not source.is_file():
            raise SystemExit(f"error: {source}: no such committed run (expected TABLE/RUN, e.g. {REPRODUCE[0]})")
        target = root / "results" / "reproduce" / f"{table}--{name}.json"
        if target.exists():
            print(f"done   reproduce {spec}")
            continue
        orig = json.loads(source.read_text())
        # the same program on the same inputs: a default that changed since (the attention kernel) is pinned to
        # what the run used; runs made before `model.attention` existed ran the model's own sdpa
        sets = {"model.attention": orig.get("attention") or "sdpa",
                **({"train.precision": orig["precision"]} if orig.get("precision") else {}), **orig["settings"]}
        summary, _ = _run_one("reproduce", f"{table}-{name}", sets,
                              root / "runs" / "results" / "reproduce" / table / name, orig.get("threads"))
        out = {"table": table, "run": name, "threads": orig.get("threads"), "settings": sets,
               "original": {k: orig.get(k) for k in ("code_version", "machine", "aa", "bwt", "r0", "matrix")},
               "rerun": {"code_version": _short(summary["git_commit"]), "machine": summary["machine"],
                         "aa": summary["aa"], "bwt": summary["bwt"], "r0": summary["r0"], "matrix": summary["matrix"],
                         "wall_time_s": summary["wall_time_s"]},
               **compare_cells(orig, summary)}
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(json.dumps(out, indent=1) + "\n")
        print(f"done   reproduce {spec}: {out['cells_differing']}/{out['cells']} cells differ "
              f"(max {out['max_abs_cell_diff']:.1f} points)", flush=True)
        written.append(target)
    return written


def compare_cells(a: dict, b: dict) -> dict:
    """Cells evaluated in both runs (untrained row included), how many differ and by how much at most."""
    rows = zip([a["r0"], *a["matrix"]], [b["r0"], *b["matrix"]])
    diffs = [abs(x - y) for ra, rb in rows for x, y in zip(ra, rb) if x is not None and y is not None]
    return {"cells": len(diffs), "cells_differing": sum(d > 0 for d in diffs),
            "max_abs_cell_diff": max(diffs, default=0.0)}


def _machine(m: dict | None) -> str:
    return f"{m['cpu']} ({m.get('cpu_capability') or '?'}, {m['cores']} cores)" if m else "not recorded"


def reproduce_lines(root: Path = ROOT, tables=None) -> list[str]:
    files = sorted(f for f in (root / "results" / "reproduce").glob("*.json")
                   if tables is None or f.name.split("--")[0] in tables)
    if not files:
        return ["Not run yet (`python benchmarks/results.py reproduce`).", ""]
    lines = ["| run | committed: code, machine | rerun: code, machine | AA committed → rerun | "
             "BWT committed → rerun | cells differing | largest cell change |", "|---|---|---|---|---|---|---|"]
    for f in files:
        r = json.loads(f.read_text())
        o, n = r["original"], r["rerun"]
        lines.append(f"| {r['table']}/{r['run']} | {o['code_version']}, {_machine(o['machine'])} | "
                     f"{n['code_version']}, {_machine(n['machine'])} | {o['aa']:.1f} → {n['aa']:.1f} | "
                     f"{o['bwt']:+.1f} → {n['bwt']:+.1f} | {r['cells_differing']}/{r['cells']} | "
                     f"{r['max_abs_cell_diff']:.1f} |")
    return lines + [""]


# Step 5 of the plateau regime: the final models of Table 1 anew's seq-ft runs (order 1, seed 0) and the base model
EVIDENCE = ("plateau1", ("o1-seq-ft-base-s0", "o1-seq-ft-migu0.7-s0"))
TOKENS = ("all", "answer")  # MIGU's statistics over every real token (the default) or only the answer positions


RETRAINED = "retrained.json"  # in a run directory trained again by `trained_run_dir`: not the committed run


def trained_run_dir(table: str, name: str, root: Path = ROOT, train: bool = False) -> tuple[Path, dict | None]:
    """The run directory holding a committed run's final model, and how a retrain compared (None if not retrained).

    Its own directory, that of the run it was copied from, or a `reproduce` rerun of either. Run directories
    are not committed, so in another session none is here: with `train` the run is trained again into its own
    directory (resumable) and its matrix compared cell by cell with the committed one.
    """
    summary = root / "results" / table / f"{name}.json"
    if not summary.is_file():
        raise SystemExit(f"error: {summary}: not run yet (run `python benchmarks/results.py {table}` first)")
    committed = json.loads(summary.read_text())
    own = root / "runs" / "results" / table / name
    source = _same_settings(committed["settings"], root, table)
    runs = [(table, name), *([(source.parent.name, source.stem)] if source else [])]
    candidates = [root / "runs" / "results" / t / n for t, n in runs]
    candidates += [root / "runs" / "results" / "reproduce" / t / n for t, n in runs]
    run_dir = next((d for d in candidates if (d / "summary.json").is_file()), None)
    if run_dir is None and not train:
        raise SystemExit(f"error: {own}: the run's directory is not here (not finished, or trained in another "
                         "session: run directories are not committed)")
    if run_dir is None:
        check_code(table, root)
        _run_one(table, name, committed["settings"], own, committed.get("threads"))
        (own / RETRAINED).write_text(json.dumps({"of": summary.relative_to(root).as_posix()}) + "\n")
        run_dir = own
    trained = json.loads((run_dir / "summary.json").read_text())
    # a rerun says so (its marker, or reproduce's directory); wall times are rounded, so tiny runs can tie
    retrained = (run_dir / RETRAINED).is_file() or "reproduce" in run_dir.relative_to(root).parts
    if not retrained and trained.get("wall_time_s") == committed.get("wall_time_s"):  # the committed run itself
        return run_dir, None
    return run_dir, {"run_dir": run_dir.relative_to(root).as_posix(), "code_version": _short(trained["git_commit"]),
                     "machine": trained["machine"], **compare_cells(committed, trained)}


def measure_magnitudes(run_dir: Path, n: int, base: bool = False) -> dict[str, dict[str, dict]]:
    """{tokens: {task: {layer: vector}}} of a run's final (or base) model on each task's first `n` training examples.

    Two MIGU observers share each forward pass: one counts every real token (what training ranks by default),
    the other only the positions that predict an answer token (`migu.tokens: answer`, via `set_token_mask`).
    """
    import torch

    from migu.checkpoint import load_trained
    from migu.core import MIGU
    from migu.magnitudes import task_batches
    from migu.masking import answer_positions
    from migu.scenarios import get_scenario

    model, tokenizer, cfg, method, _ = load_trained(run_dir, base=base)
    scenario = get_scenario(cfg)
    tasks = scenario.load_tasks()
    scenario.prepare(tokenizer)
    targets = cfg.migu.target_modules or method.migu_target_modules()
    out = {t: {} for t in TOKENS}
    model.eval()
    with method.eval_context(model), torch.no_grad():
        for task in tasks:
            batches = task_batches(tokenizer, task.train[:n], cfg.data.max_length, 8, cfg.seed,
                                   encoder=lambda ex: scenario.encode(tokenizer, ex))
            observers = {t: MIGU(model, threshold=0.7, target_modules=targets, sync=False) for t in TOKENS}
            try:
                with observers["all"].observe(), observers["answer"].observe():
                    for batch in batches:
                        observers["answer"].set_token_mask(answer_positions(batch["labels"]))
                        model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
                for t, observer in observers.items():
                    out[t][task.name] = {k: v.float().cpu() for k, v in observer.magnitudes().items()}
            finally:
                for observer in observers.values():
                    observer.remove()
    return out


def similarity_summary(mags: dict[str, dict], threshold: float = 0.7) -> dict:
    """Task × task cosine and centred cosine (mean over layers), kept-unit overlap per pair, chance overlap."""
    from migu.report.similarity import chance_overlap, overlap_by_layer, similarity_matrix

    tasks, cos = similarity_matrix(mags)
    _, centred = similarity_matrix(mags, centered=True)
    layers, pairs, values = overlap_by_layer(mags, threshold)
    sizes = [mags[tasks[0]][layer].numel() for layer in layers]
    return {"tasks": tasks, "cosine": cos, "centred_cosine": centred,
            "kept_overlap": {f"{a}|{b}": statistics.mean(v[p] for v in values) for p, (a, b) in enumerate(pairs)},
            "chance_overlap": statistics.mean(chance_overlap(d, threshold) for d in sizes), "layers": len(layers)}


def evidence(n: int = 32, root: Path = ROOT, spec=EVIDENCE) -> Path:
    """results/evidence/magnitudes.json: how alike the tasks' MIGU magnitude vectors are, over all and answer tokens.

    For the base model and the final model of each `spec` run: per-task magnitudes on the first `n` training
    examples, the task × task cosine and centred cosine, and the overlap of the kept-unit sets (top 30%).
    """
    from migu.provenance import provenance

    table, names = spec
    found = {name: trained_run_dir(table, name, root, train=True) for name in names}
    dirs = {name: d for name, (d, _) in found.items()}
    out = {"table": table, "n_examples": n, "threshold": 0.7, "tokens": list(TOKENS), "models": {},
           "retrained": {name: r for name, (_, r) in found.items() if r is not None},
           "code_version": _version(), "code": provenance()["code"]}
    for label, run_dir, base in (("untrained", dirs[names[0]], True), *((name, d, False) for name, d in dirs.items())):
        mags = measure_magnitudes(run_dir, n, base=base)
        out["models"][label] = {t: similarity_summary(mags[t]) for t in TOKENS}
    path = root / "results" / "evidence" / "magnitudes.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    return path


def evidence_lines(root: Path = ROOT) -> list[str]:
    path = root / "results" / "evidence" / "magnitudes.json"
    if not path.exists():
        return ["Not run yet (`python benchmarks/results.py evidence`).", ""]
    e = json.loads(path.read_text())
    if "tokens" not in e:  # the 8-step measurement (table1 runs, all tokens only)
        e = {**e, "table": "table1", "tokens": ["all"], "models": {k: {"all": m} for k, m in e["models"].items()}}
    lines = [f"Magnitude vectors of each task measured on its first {e['n_examples']} training examples with the base "
             f"model and the final models of `{e['table']}` runs (`python benchmarks/results.py evidence`, code "
             f"{e['code_version']}), over every real token (`all`, MIGU's default) and over the answer positions "
             "only (`answer`). Pairwise over tasks: cosine of the magnitude vectors, centred cosine (each vector "
             "minus its mean: how differently two tasks rank the units), and the fraction of MIGU's kept units "
             "(top 30%) two tasks share, mean over layers.", "",
             "| model | tokens | cosine (min–max) | centred cosine (min–max) | kept-unit overlap (min–max) | "
             "chance overlap |", "|---|---|---|---|---|---|"]
    for label, by_tokens in e["models"].items():
        for tokens, m in by_tokens.items():
            k = len(m["tasks"])
            off = [(i, j) for i in range(k) for j in range(i + 1, k)]
            cos = [m["cosine"][i][j] for i, j in off]
            cen = [m["centred_cosine"][i][j] for i, j in off]
            ov = list(m["kept_overlap"].values())
            lines.append(f"| {label} | {tokens} | {min(cos):.3f}–{max(cos):.3f} | {min(cen):.2f}–{max(cen):.2f} | "
                         f"{min(ov):.2f}–{max(ov):.2f} | {m['chance_overlap']:.2f} |")
    lines.append("")
    for name, r in e.get("retrained", {}).items():  # run directories stay on the machine that trained them
        lines.append(f"`{name}` was trained in another session, so it was trained again for this measurement "
                     f"(code {r['code_version']}, {_machine(r['machine'])}): its accuracy matrix equals the committed "
                     f"run's in {r['cells'] - r['cells_differing']} of {r['cells']} cells (largest change "
                     f"{r['max_abs_cell_diff']:.1f} points).")
    return lines + ([""] if e.get("retrained") else [])


def _fmt(values, signed: bool = False):
    values = [v for v in values if v is not None]
    if not values:
        return "–"
    sign = "+" if signed else ""
    if len(values) == 1:
        return f"{values[0]:{sign}.1f}"
    return f"{statistics.mean(values):{sign}.1f} ± {statistics.stdev(values):.1f}"


def _ci(groups: list[list[float]], level: float = 0.95) -> str:
    """Student-t interval of the mean paired difference, the variance pooled within groups (the task orders).

    The orders are fixed conditions, not a sample of orders: the spread between them is not noise of the mean.
    One group is the plain one-sample interval.
    """
    from scipy import stats

    values = [v for g in groups for v in g]
    df = len(values) - len(groups)
    if df < 1:
        return "–"
    mean = statistics.mean(values)
    pooled = sum((len(g) - 1) * statistics.variance(g) for g in groups if len(g) > 1) / df
    half = stats.t.ppf(0.5 + level / 2, df) * (pooled / len(values)) ** 0.5
    return f"[{mean - half:+.1f}, {mean + half:+.1f}]"


TITLES = {
    "table1": "Table 1 — standard benchmark (4 tasks): methods without and with MIGU (T=0.7)",
    "table2": "Table 2 — long benchmark (15 tasks): methods without and with MIGU (T=0.7)",
    "table3": "Table 3 — threshold ablation (seq-ft + MIGU, standard benchmark)",
}
_PER_RUN = ("data.order", "method.name", "train.lr", "seed", "migu.enabled", "migu.threshold")


def _variant(settings: dict) -> str:
    """The MIGU options a run changes from the defaults (the ablation's conditions), e.g. `first_task=mask`."""
    return ", ".join(f"{k.removeprefix('migu.')}={v}" for k, v in sorted(settings.items())
                     if k.startswith("migu.") and k not in ("migu.enabled", "migu.threshold"))


def _condition(r: dict) -> tuple:
    """(order, method, MIGU T or None, variant): what a table's row is; seeds of one condition are pooled."""
    s = r["settings"]
    t = s.get("migu.threshold") if s.get("migu.enabled") else None
    return s.get("data.order"), s.get("method.name", "seq-ft"), t, _variant(s) if t is not None else ""


def _label(t: float | None, variant: str) -> str:
    return "–" if t is None else f"{t} ({variant})" if variant else f"{t}"


def _mean_cells(cells) -> float | None:
    cells = [c for c in (cells or []) if c is not None]
    return statistics.mean(cells) if cells else None


def _learned(r: dict) -> float | None:
    """Mean accuracy on each task right after training it (the diagonal R[i][i])."""
    return _mean_cells(row[i] for i, row in enumerate(r["matrix"]))


def load_results(root: Path = ROOT) -> dict[str, list[dict]]:
    """{table: [run summary, ...]} from root/results/<table>/*.json (table1–3)."""
    return {t: table_runs(t, root) for t in TITLES}


def _groups(runs) -> list[tuple[tuple, list[dict]]]:
    """[(condition, its runs)] sorted by order, method, MIGU T (base first)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault(_condition(r), []).append(r)
    return sorted(groups.items(), key=lambda kv: (kv[0][0] or 0, kv[0][1], -1 if kv[0][2] is None else kv[0][2],
                                                  kv[0][3]))


def table_lines(runs: list[dict]) -> list[str]:
    """One markdown row per condition (order, method, MIGU T): mean ± sample std over its seeds."""
    groups = _groups(runs)
    lines = ["| order | method | MIGU T | lr | seeds | AA | BWT | FWT | forgetting | learned R[i][i] | untrained | "
             "wall s |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for (order, method, t, variant), rs in groups:
        seeds = ",".join(str(r["seed"]) for r in sorted(rs, key=lambda r: r["seed"]))
        diag = [_learned(r) for r in rs]
        lines.append(
            f"| {order} | {method} | {_label(t, variant)} | {rs[0]['lr']:g} | {seeds} | "
            f"{_fmt([r['aa'] for r in rs])} | {_fmt([r['bwt'] for r in rs], True)} | "
            f"{_fmt([r['fwt'] for r in rs], True)} | {_fmt([r['forgetting'] for r in rs])} | {_fmt(diag)} | "
            f"{_fmt([_mean_cells(r.get('r0')) for r in rs])} | {_wall(rs)} |")
    if any(_wall(rs).endswith("*") for _, rs in groups):
        lines += ["", "\\* wall time of the runs at default threads only; this condition also has 1-thread runs "
                  "(two side by side, slower per run: Table 4)."]
    return lines


def _wall(rs: list[dict]) -> str:
    rs = [r for r in rs if not r.get("wall_time_shared")] or rs  # a run that shared the cores says so in its note
    alone = [r["wall_time_s"] for r in rs if not r.get("threads")]
    if alone and len(alone) < len(rs):
        return f"{statistics.mean(alone):.0f}*"
    return f"{statistics.mean(r['wall_time_s'] for r in rs):.0f}"


def paired_deltas(runs: list[dict]) -> list[dict]:
    """MIGU − reference per condition, paired by seed: [{order, method, t, variant, ref, pairs: [(ref, MIGU)]}].

    The reference is the run without MIGU, or T = 0 (plain training, bit-identical) in the threshold ablation.
    """
    by = {(*_condition(r), r["seed"]): r for r in runs}
    out, groups = [], _groups(runs)
    conditions = {c for c, _ in groups}
    for (order, method, t, variant), rs in groups:
        ref = None if (order, method, None, "") in conditions else 0.0
        if t == ref and not variant:
            continue
        pairs = [(by[(order, method, ref, "", r["seed"])], r) for r in rs if (order, method, ref, "", r["seed"]) in by]
        if pairs:
            out.append({"order": order, "method": method, "t": t, "variant": variant,
                        "ref": "no MIGU" if ref is None else "T = 0", "pairs": pairs})
    return out


def _diffs(pairs, key) -> list[float]:
    value = _learned if key == "diag" else (lambda r: r[key])
    return [value(g) - value(b) for b, g in pairs if None not in (value(g), value(b))]


def _delta_table(deltas: list[dict], higher: str) -> list[str]:
    rows = [f"| {d['order']} | {d['method']} | {_label(d['t'], d['variant'])} | {len(d['pairs'])} | "
            f"{_fmt(_diffs(d['pairs'], 'aa'), True)} | {_ci([_diffs(p, 'aa') for p in d.get('by_order', [d['pairs']])])} | "
            f"{_fmt(_diffs(d['pairs'], 'bwt'), True)} | "
            f"{_fmt(_diffs(d['pairs'], 'diag'), True)} | {sum(g['aa'] > b['aa'] for b, g in d['pairs'])}/"
            f"{len(d['pairs'])} |" for d in deltas]
    return [f"| order | method | MIGU T | pairs | Δ AA | Δ AA 95% CI | Δ BWT | Δ learned R[i][i] | {higher} |",
            "|---|---|---|---|---|---|---|---|---|", *rows, ""]


def delta_lines(runs: list[dict]) -> list[str]:
    """The paired MIGU − reference table: Δ AA (with its t-interval), Δ BWT and Δ learned R[i][i] (mean ± sample
    std over seeds); conditions run on several orders get a row pooled over them ("all")."""
    deltas = paired_deltas(runs)
    if not deltas:
        return []
    by_condition: dict[tuple, list[dict]] = {}
    for d in deltas:
        by_condition.setdefault((d["method"], d["t"], d["variant"], d["ref"]), []).append(d)
    for (method, t, variant, ref), ds in by_condition.items():  # the paper averages its tables over orders
        if len(ds) > 1:
            deltas.append({"order": "all " + ",".join(str(d["order"]) for d in ds), "method": method, "t": t,
                           "variant": variant, "ref": ref, "pairs": [p for d in ds for p in d["pairs"]],
                           "by_order": [d["pairs"] for d in ds]})
    pooled = any(str(d["order"]).startswith("all") for d in deltas)
    return [f"MIGU − {' / '.join(sorted({d['ref'] for d in deltas}))}, paired by seed: mean ± sample std over the "
            "pairs; Δ AA 95% CI is the Student-t interval of that mean (– with one pair)."
            + (" In a row pooled over orders (`all`) its variance is the one within orders: the interval says "
               "whether MIGU helps on average over these orders, not over task orders in general (a few orders "
               "are too few for that)." if pooled else ""), "",
            *_delta_table(deltas, "MIGU AA higher")]


DEFAULT_T = 0.7


def option_lines(runs: list[dict]) -> list[str]:
    """The ablation's question: each option − MIGU with its defaults (T = 0.7, no option changed), paired by seed."""
    by = {(*_condition(r), r["seed"]): r for r in runs}
    deltas = []
    for (order, method, t, variant), rs in _groups(runs):
        ref = (order, method, DEFAULT_T, "")
        if t is None or (t, variant) == (DEFAULT_T, ""):
            continue
        pairs = [(by[(*ref, r["seed"])], r) for r in rs if (*ref, r["seed"]) in by]
        if pairs:
            deltas.append({"order": order, "method": method, "t": t, "variant": variant, "pairs": pairs})
    if not deltas:
        return []
    return [f"Each option − MIGU with its defaults (T={DEFAULT_T}, first task skip, LM head out, all tokens, LoRA B by "
            "the layer's output), paired by seed:", "", *_delta_table(deltas, "option AA higher")]


def plot_deltas(runs: list[dict], title: str):
    """Paired MIGU − reference Δ AA, Δ BWT and Δ learned R[i][i] per condition: one point per seed, mean ± std."""
    import pandas as pd
    import seaborn as sns

    from migu.report.plots import new_figure

    frame = pd.DataFrame([{"condition": f"o{d['order']} {d['method']} T={_label(d['t'], d['variant'])}",
                           "Δ AA": g["aa"] - b["aa"], "Δ BWT": g["bwt"] - b["bwt"], "Δ learned R[i][i]": _learned(g) - _learned(b)}
                          for d in paired_deltas(runs) for b, g in d["pairs"]])
    fig = new_figure(13.0, 1.2 + 0.45 * frame.condition.nunique())
    for ax, key in zip(fig.subplots(1, 3, sharey=True), ("Δ AA", "Δ BWT", "Δ learned R[i][i]")):
        sns.stripplot(frame, x=key, y="condition", color="0.6", size=4, jitter=False, ax=ax)  # same data, same image
        sns.pointplot(frame, x=key, y="condition", errorbar="sd", linestyle="none", capsize=0.2, color="C0", ax=ax)
        ax.axvline(0, color="black", linewidth=0.6)
        ax.set(xlabel=f"{key} (points, MIGU − reference)", ylabel="")
        ax.grid(axis="x", alpha=0.3)
    fig.suptitle(f"{title}: paired by seed (grey: each seed; blue: mean ± sample std)", fontsize=11)
    return fig


def settings_line(runs: list[dict]) -> str:
    """The settings every run of a table shares (the per-run ones — method, lr, seed, MIGU — left out)."""
    common = {k: v for k, v in runs[0]["settings"].items() if k not in _PER_RUN}
    for r in runs[1:]:
        common = {k: v for k, v in common.items() if r["settings"].get(k) == v}
    codes = ", ".join(sorted({r["code_version"] for r in runs}))
    threads = sorted({str(r.get("threads") or "default") for r in runs})
    def tally(labels, sep):
        return sep.join(f"{label} × {n} runs" for label, n in sorted(collections.Counter(labels).items()))

    # the driver records the resolved precision since 9f42098; older runs ran `auto` unrecorded, so it is
    # named only where some run of the table recorded it (a table whose runs ran on different CPU kinds)
    precisions = [r.get("precision") or "not recorded" for r in runs]
    precision = f"; precision as run: {tally(precisions, ', ')}" if set(precisions) - {"not recorded"} else ""
    return (f"Settings: {', '.join(f'`{k}={v}`' for k, v in common.items())}; torch threads per run: "
            f"{'/'.join(threads)}; code versions: {codes}; machines: "
            f"{tally((_machine(r.get('machine')) for r in runs), '; ')}{precision}.")


def wall_lines(results: dict[str, list[dict]]) -> list[str]:
    """Wall time per run (mean) per table, order, method, MIGU, torch threads and machine, with the MIGU/base ratio.

    Grouped by threads and machine too: 1-thread runs ran two side by side and are not comparable with
    2-thread runs, nor a run on one CPU kind with a run on another.
    """
    lines = ["| table | order | method | threads | machine | runs (base / MIGU) | wall s base | wall s MIGU | ratio |",
             "|---|---|---|---|---|---|---|---|---|"]

    def key(r):
        return (*_condition(r)[:2], r.get("threads") or 0, _machine(r.get("machine")))

    for table in results:
        runs = [r for r in results[table] if not r.get("wall_time_shared")]
        for k in sorted({key(r) for r in runs}):
            order, method, threads, machine = k
            same = [r for r in runs if key(r) == k]
            base = [r["wall_time_s"] for r in same if _condition(r)[2] is None]
            migu = [r["wall_time_s"] for r in same if _condition(r)[2:] == (0.7, "")]
            if base and migu:
                b, m = statistics.mean(base), statistics.mean(migu)
                lines.append(f"| {table} | {order} | {method} | {threads or 'default'} | {machine} | "
                             f"{len(base)} / {len(migu)} | {b:.0f} | {m:.0f} | ×{m / b:.2f} |")
    return lines


def condition_stats(runs: list[dict]) -> list[dict]:
    """Per condition (order, method, MIGU T): mean and sample std over seeds of AA, BWT and learned R[i][i]."""
    from migu.report.tables import seed_stats

    groups = _groups(runs)
    records = [{"order": order, "method": method, "threshold": t, "variant": variant, "aa": r["aa"], "bwt": r["bwt"],
                "diag": _learned(r)} for (order, method, t, variant), rs in groups for r in rs]
    stats = seed_stats(records, ["order", "method", "threshold", "variant"], ("aa", "bwt", "diag")).to_dict("records")
    return [{**g, "migu": g["threshold"] is not None, "seeds": sorted(r["seed"] for r in rs)}
            for g, (_, rs) in zip(stats, groups)]


def plot_table(table: str, runs: list[dict]):
    """Table 1/2: AA and BWT bars per method without/with MIGU; table 3: AA, BWT, learned R[i][i] against T."""
    from migu.report.tables import plot_compare_bars

    stats = condition_stats(runs)
    if table != "table3":
        if len({g["order"] for g in stats}) > 1:
            stats = [{**g, "setting": f"order {g['order']}"} for g in stats]
        fig = plot_compare_bars(stats)
        fig.suptitle(f"{TITLES[table].split(' — ')[0]}: " + fig.get_suptitle(), fontsize=11)
        return fig
    return plot_thresholds(stats, "Table 3: threshold ablation, seq-ft")


def plot_thresholds(stats: list[dict], title: str):
    """AA, BWT and learned R[i][i] against MIGU's threshold T, mean ± sample std over seeds (no MIGU = T 0)."""
    from migu.report.plots import new_figure

    fig = new_figure(12.0, 4.0)
    counts = sorted({g["n"] for g in stats})
    for ax, (key, label) in zip(fig.subplots(1, 3), (("aa", "AA (%)"), ("bwt", "BWT (%)"),
                                                      ("diag", "learned R[i][i] (%)"))):
        pts = sorted((g["threshold"] or 0.0, g[f"{key}_mean"], g[f"{key}_std"] or 0.0) for g in stats
                     if g[f"{key}_mean"] is not None)
        xs, ys, es = zip(*pts)
        ax.errorbar(xs, ys, yerr=es, marker="o", capsize=3)
        for x, y in zip(xs, ys):
            ax.annotate(f"{y:.1f}", (x, y), textcoords="offset points", xytext=(5, 4), fontsize=7)
        ax.set_xlabel("MIGU threshold T (fraction of units masked)")
        ax.set_ylabel(label)
        ax.set_xticks(sorted(set(xs)))
        ax.grid(alpha=0.3)
        ax.margins(y=0.15)
        if key == "bwt":
            ax.axhline(0, color="black", linewidth=0.6)
    n = "/".join(str(k) for k in counts)
    fig.suptitle(f"{title} (mean ± sample std over {n} seed(s))", fontsize=11)
    return fig


def _regime_frame(runs: list[dict]):
    """One row per lr/regime run: table, method, lr, n (examples per task), steps, AA, BWT, learned R[i][i], …"""
    import pandas as pd

    return pd.DataFrame([{"table": r["table"], "method": r["settings"]["method.name"], "lr": r["settings"]["train.lr"],
                          "n": r["settings"]["data.train_per_task"],
                          "steps": r["settings"]["data.train_per_task"] // r["settings"]["train.batch_size"],
                          "AA": r["aa"], "BWT": r["bwt"], "learned R[i][i]": _learned(r),
                          "untrained": _mean_cells(r["r0"]), "wall s": r["wall_time_s"]} for r in runs],
                        columns=["table", "method", "lr", "n", "steps", "AA", "BWT", "learned R[i][i]", "untrained",
                                 "wall s"])


def plateau_size(regime: list[dict]) -> int | None:
    """The smallest size whose mean learned R[i][i] is within PLATEAU_GAP of the method's best, max over methods."""
    f = _regime_frame(regime)
    if any(set(f[f.method == m].n) != set(REGIME_SIZES) for m in LR_GRID):
        return None  # not every size measured yet
    best = f.groupby("method")["learned R[i][i]"].transform("max")
    return int(f[f["learned R[i][i]"] >= best - PLATEAU_GAP].groupby("method").n.min().max())


def _still_rising(frame, chosen: dict) -> str | None:
    """What the largest size means when the curve has not flattened there: the data's limit, and the lr check."""
    top, prev = REGIME_SIZES[-1], REGIME_SIZES[-2]
    curve = frame[frame.table == "regime"].set_index(["method", "n"])["learned R[i][i]"]
    rise = {m: curve[(m, top)] - curve[(m, prev)] for m in LR_GRID}
    if all(r <= PLATEAU_GAP for r in rise.values()):
        return None  # a plateau after all: nothing to explain
    at_top = frame[(frame.table == "lr") & (frame.n == top)]
    gains = []
    for m, lr in chosen.items():
        runs = at_top[at_top.method == m]
        gain = runs["learned R[i][i]"].max() - runs[runs.lr == lr]["learned R[i][i]"].iloc[0]
        gains.append(f"{m} {'learned the most at its chosen lr' if gain <= 0 else f'+{gain:.1f} at a larger lr'}")
    return (f"From {prev} to {top} examples learned R[i][i] rose " + ", ".join(f"{r:+.1f} ({m})" for m, r in rise.items())
            + f": the curve has not flattened. {top} is the most the data allow (yahoo's training split holds 400 "
            f"examples; one epoch), so the tables below train at that size, not at a measured plateau. At {top}, "
            "the lr table says how far each task is from what these examples teach at a faster rate: "
            + "; ".join(gains) + ".")


def regime_lines(root: Path = ROOT) -> list[str]:
    """The lr choice and the learning curves of step 1 of the plateau regime, with their figure."""
    import seaborn as sns

    from migu.report.plots import new_figure, save

    lr_runs, regime = table_runs("lr", root), table_runs("regime", root)
    lines = ["## Regime: how many training examples until a task is learned?", "",
             "`python benchmarks/results.py lr` then `python benchmarks/results.py regime` (standard order 1, seed 0, "
             "no MIGU). The lr of each method is the best AA at the largest size; then each task's accuracy right "
             f"after training it (learned R[i][i]) against training examples per task. The plateau size is the "
             f"smallest whose mean learned R[i][i] is within {PLATEAU_GAP:g} points of the best size, for both methods.",
             ""]
    if not lr_runs:
        return lines + ["Not run yet.", ""]
    frame = _regime_frame(lr_runs + regime).sort_values(["table", "method", "lr", "n"], key=lambda c: c.map(
        lambda v: v != "lr") if c.name == "table" else c)
    chosen = {m: chosen_lr(m, root) for m in LR_GRID if (frame[frame.table == "lr"].method == m).sum() == len(LR_GRID[m])}
    size = plateau_size(regime)
    lr_settings = [r["settings"] for r in lr_runs]
    distinct = lr_runs + [r for r in regime if r["settings"] not in lr_settings]  # regime reuses the lr runs at its top size
    lines += [settings_line(distinct), _code_line(distinct), "",
              frame.to_markdown(index=False, floatfmt=("", "", "g", "", "", ".1f", "+.1f", ".1f", ".1f", ".0f")), "",
              *[f"- `{r['table']}/{r['run']}`: {r['note']}" for r in lr_runs + regime if r.get("note")], "",
              *(["Chosen lr: " + ", ".join(f"{m} {lr:g}" for m, lr in chosen.items()) + ".", ""] if chosen else []),
              f"Plateau size: **{size} training examples per task**." if size else
              "Plateau size: not yet measured (the regime runs are incomplete).", ""]
    rising = _still_rising(frame, chosen) if size == max(REGIME_SIZES) else None
    if rising:
        lines[-2] = f"Size of the tables below: **{size} training examples per task**, the largest measured."
        lines += [rising, ""]
    if regime:
        fig = new_figure(12.0, 3.6)
        for ax, key in zip(fig.subplots(1, 3), ("learned R[i][i]", "AA", "BWT")):
            sns.lineplot(frame[frame.table == "regime"], x="n", y=key, hue="method", marker="o", ax=ax)
            ax.set(xscale="log", xlabel="training examples per task", ylabel=f"{key} (%)")
            ax.set_xticks(REGIME_SIZES, [str(n) for n in REGIME_SIZES])
            ax.minorticks_off()  # the log axis's own labels (6×10¹, …) would overprint the sizes
            ax.grid(alpha=0.3)
        fig.suptitle("Regime: standard order 1, seed 0, no MIGU, each method at its chosen lr", fontsize=11)
        image = save(fig, root / "docs" / "images" / "results_regime.png")
        lines += [f"![regime](images/{image.name})", ""]
    return lines


PLATEAU_TITLES = {
    "plateau1": "Table 1 anew — standard benchmark at the regime's size: methods without and with MIGU (T=0.7)",
    "ablation": "Ablation — one MIGU option at a time (standard order 1, at the regime's size)",
    "plateau_long": "Long benchmark anew — 15 tasks (order 4), 16 steps per task, without and with MIGU",
}
WHAT_CHANGED = """What changed since the 8-step tables ({where}),
and why. Those tables trained each task for 8 steps of batch 8, where nothing reaches its plateau, so a mask
that slows learning lowers AA whatever it does for retention; and they masked the first task, which the
paper's code never does (`--is_first_task`). The tables below (1) leave the first task unmasked
(`migu.first_task: skip`, the default); (2) run under bf16 autocast with shared-prefix evaluation, which made
a step ~1.8–2.5× and an evaluation ~4× faster on these CPUs; (3) train each task far longer: the learning
curve is measured first (Regime), at a learning rate chosen once per method on order 1 seed 0 and then fixed,
and the tables use its plateau size, or the largest size the data allow while the curve still rises;
(4) test on 100 examples per task (±5 points a cell instead of ±8). Every run of these tables ran one code
version (the fingerprint of migu's sources is printed with each table)."""


WHERE_8STEP = ("kept at the end of this page until the plateau tables are complete",
               "no longer shown: their summaries stay in `results/table1/`–`results/table3/`; this page's git "
               "history shows them")


def plateau_complete(root: Path = ROOT) -> bool:
    """Every run of every plateau table's grid is committed: then they replace the 8-step tables on the page."""
    for table in PLATEAU_TITLES:
        grid = _grid(table, root)
        if not grid or not set(grid) <= {r["run"] for r in table_runs(table, root)}:
            return False
    return True


def _grid(table: str, root: Path) -> list[str] | None:
    """The names of a plateau table's full grid, or None while the regime that sizes it is incomplete."""
    try:
        return [name for name, _ in TABLES[table](argparse.Namespace(orders=None, seeds=None, root=root))]
    except SystemExit:
        return None


def _code_line(runs: list[dict]) -> str:
    codes = sorted({str(r.get("code")) for r in runs})
    return (f"Code fingerprint of migu's sources (`provenance.code`): {', '.join(codes)}"
            f"{' — one code version' if len(codes) == 1 else ' — MORE THAN ONE: rerun'}.")


def plateau_lines(root: Path = ROOT) -> list[str]:
    """Steps 2–4 of the plateau regime: a section per table, saying how much of its grid has run."""
    from migu.report.plots import save
    from migu.report.tables import plot_compare_bars

    lines = []
    for table, title in PLATEAU_TITLES.items():
        runs, grid = table_runs(table, root), _grid(table, root)
        lines += [f"## {title}", "", f"`python benchmarks/results.py {table}`", ""]
        if not runs:
            lines += ["Not run yet" + ("." if grid else " (it needs the regime's plateau size first)."), ""]
            continue
        todo = [name for name in grid or [] if name not in {r["run"] for r in runs}]
        if todo:
            lines += [f"**{len(runs)} of {len(grid)} runs done; the rows below are partial** (to run: "
                      f"{', '.join(todo[:4])}{' …' if len(todo) > 4 else ''}).", ""]
        short = title.split(" — ")[0]
        if table == "ablation":
            fig = plot_deltas(runs, short) if paired_deltas(runs) else None
        else:
            stats = condition_stats(runs)
            if len({g["order"] for g in stats}) > 1:
                stats = [{**g, "setting": f"order {g['order']}"} for g in stats]
            fig = plot_compare_bars(stats)
            fig.suptitle(f"{short}: " + fig.get_suptitle(), fontsize=11)
        notes = [f"- `{r['run']}`: {r['note']}" for r in runs if r.get("note")]
        lines += [settings_line(runs), _code_line(runs), "", *table_lines(runs), "",
                  *(["Notes:", *notes, ""] if notes else []), *delta_lines(runs),
                  *(option_lines(runs) if table == "ablation" else [])]
        if fig is not None:
            image = save(fig, root / "docs" / "images" / f"results_{table}.png")
            lines += [f"![{short}](images/{image.name})", ""]
        curve = [g for g in condition_stats(runs) if g["method"] == "seq-ft" and not g["variant"]]
        if table == "ablation" and len(curve) > 2:  # the paper's threshold figure (no MIGU: T = 0, bit-identical)
            image = save(plot_thresholds(curve, "Ablation: threshold T, seq-ft, order 1"),
                         root / "docs" / "images" / "results_ablation_threshold.png")
            lines += [f"![threshold](images/{image.name})", ""]
    return lines


def overhead_lines(root: Path = ROOT) -> list[str]:
    """One line per committed `benchmarks/overhead.py` result (`overhead-bf16.json`: the default precision here)."""
    lines = []
    for f in sorted((root / "results" / "overhead").glob("overhead*.json")):
        o = json.loads(f.read_text())
        line = (f"- {o.get('precision', 'fp32')} (`results/overhead/{f.name}`; batch {o['batch']}×{o['length']}, "
                f"T={o['threshold']}, {o['threads']} threads): step-time ratio with / without MIGU, CPU time "
                f"interleaved in one process, full FT ×{o['full_ft_ratio']:.3f}, LoRA ×{o['lora_ratio']:.3f}")
        if "full_ft_own_share" in o:  # MIGU's parts timed inside the step: less noisy than the ratio
            wall = "full_ft_own_wall_share" in o
            share = lambda m: (f"{100 * o[f'{m}_own_share']:.1f}%"  # noqa: E731
                               + (f" / {100 * o[f'{m}_own_wall_share']:.1f}%" if wall else ""))
            line += f"; MIGU's own time a step, CPU{' / wall' if wall else ''}, full FT {share('full_ft')}, " \
                    f"LoRA {share('lora')}"
        lines.append(line + f"; MIGU state {o['extra_bytes']:,} bytes for {o['full_ft_units']:,} output units.")
    return (lines or ["Overhead benchmark not run yet."]) + [""]


def render(root: Path = ROOT) -> Path:
    """root/docs/RESULTS.md (+ a figure per table in docs/images/) from root/results/: mean ± std over seeds.

    The 8-step tables (table1–3) are shown until every plateau table is complete, then only the plateau family.
    """
    from migu.report.plots import save

    results = load_results(root)
    complete = plateau_complete(root)
    lines = ["# Results", "",
             "Generated by `python benchmarks/results.py render` from the committed summaries in `results/`;",
             "every number comes from a run of `benchmarks/results.py` (the cost's step times: `benchmarks/overhead.py`)",
             "on the 2-core CPU machine (torch CPU), embedded SmolLM2-135M-Instruct. Accuracies in percent (exact match of the generated answer);",
             "cells are mean ± sample standard deviation over seeds. `learned R[i][i]`: mean accuracy on each",
             "task right after training it; `untrained`: mean accuracy before any training.", "",
             WHAT_CHANGED.format(where=WHERE_8STEP[complete]), "", *regime_lines(root), *plateau_lines(root),
             "## Why MIGU can or cannot separate the tasks here: magnitude similarity", "", *evidence_lines(root)]
    if not complete:
        lines += ["## The earlier tables: 8 steps per task", "",
                  "Made before the first task was left unmasked and before bf16 and shared-prefix evaluation; the "
                  "plateau tables above replace them as they are run.", "", WHY, ""]
    for table, title in ({} if complete else TITLES).items():
        runs = results[table]
        lines += [f"## {title}", "", f"`python benchmarks/results.py {table}`", ""]
        if not runs:
            lines += ["Not run yet.", ""]
            continue
        image = save(plot_table(table, runs), root / "docs" / "images" / f"results_{table}.png")
        notes = [f"- `{r['run']}`: {r['note']}" for r in runs if r.get("note")]
        lines += [settings_line(runs), "", *table_lines(runs), "", *(["Notes:", *notes, ""] if notes else []),
                  *delta_lines(runs),
                  f"![{title}](images/{image.name})", ""]
    plateau_cell = f"{100 / PLATEAU['data.test_per_task']:g} point of a cell in the plateau tables"
    if complete:
        intro = ("The plateau tables ran one code version, over several sessions and possibly on different machines "
                 "of the same 2-core kind (a CPU with other vector units runs other float kernels). `python "
                 "benchmarks/results.py reproduce` reruns a committed run with the current code (the attention kernel "
                 "pinned to the one the run used, as that default changed since) and compares the accuracy matrix "
                 f"cell by cell (one test example is {plateau_cell}):")
    else:
        intro = ("A table's runs were made over several sessions, so at several commits and possibly on different "
                 "machines of the same 2-core kind (a CPU with other vector units runs other float kernels). "
                 "`python benchmarks/results.py reproduce` reruns the cheapest run of each table's oldest code "
                 "version with the current code and compares the accuracy matrix cell by cell (one test example "
                 f"is {100 / SETTINGS['data.test_per_task']:g} points of a cell in tables 1 and 3, "
                 f"{100 / LONG['data.test_per_task']:g} in table 2, {plateau_cell}):")
    heading = "today's code" if complete else "every code version and machine"
    lines += [f"## Same numbers from {heading}? Reruns", "", intro, "",
              *reproduce_lines(root, PLATEAU_FAMILY if complete else None)]
    lines += ["## Cost" if complete else "## Table 4 — cost", "",
              "`python benchmarks/overhead.py` (step time) and the wall times of the runs above.", "",
              *overhead_lines(root)]
    walls = {**({} if complete else results), **{t: table_runs(t, root) for t in PLATEAU_TITLES}}
    kinds = {bool(r.get("threads")) for runs in walls.values() for r in runs}
    conditions = [c for one, c in ((False, "`default` = one run alone on the 2 cores (2 torch threads)"),
                                   (True, "`1` = two 1-thread runs side by side (`--shard 0/2`, `--shard 1/2`, "
                                          "`--threads 1`), slower per run than one alone")) if one in kinds]
    lines += ["Wall time per run (training + every evaluation, mean over seeds), base vs MIGU (T=0.7) under the same "
              "conditions: " + "; ".join(conditions) + ".", "", *wall_lines(walls), ""]
    out = root / "docs" / "RESULTS.md"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("table", choices=[*TABLES, "table4", "evidence", "reproduce", "render"])
    p.add_argument("--orders", type=lambda s: [int(x) for x in s.split(",")], default=None)
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help=f"seeds to run (default per table: {', '.join(f'{t} {v}' for t, v in SEEDS.items())})")
    p.add_argument("--methods", type=lambda s: s.split(","), default=None,
                   help="only these methods of the table's grid (e.g. seq-ft on extra orders)")
    p.add_argument("--list", action="store_true", help="only list the runs and whether they are done")
    p.add_argument("--shard", default=None, metavar="K/N",
                   help="run only every N-th run from the K-th (run N shards side by side, one per core)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads per run (default: torch's)")
    a = p.parse_args(argv)
    if a.table == "render":
        print(f"wrote {render()}")
    elif a.table == "evidence":
        print(f"wrote {evidence()}")
        print(f"wrote {render()}")
    elif a.table == "reproduce":
        reproduce()
        print(f"wrote {render()}")
    elif a.table == "table4":
        subprocess.run([sys.executable, str(ROOT / "benchmarks" / "overhead.py")], check=True)
        print(f"wrote {render()}")
    else:
        runs = pick_methods(TABLES[a.table](a), a.methods)
        # runs another table already made are copied by every shard; only those to train are dealt out
        copied = [r for r in runs if _same_settings(r[1], ROOT, a.table) is not None]
        run_table(a.table, copied + shard([r for r in runs if r not in copied], a.shard), a.list, a.threads)
        render()


if __name__ == "__main__":
    main()
