"""The `migu` command line.

    migu run                                    # == migu run configs/quickstart.yaml
    migu run configs/standard/order1.yaml --set migu.enabled=true --set seed=1
    migu run --resume runs/order1-seq-ft-migu-s0
    migu run --help                             # every option, its default and its docstring
    migu report runs/quickstart-seq-ft-compare-s0            # plots/ + report.md of each run below it
    migu compare runs/order1-* --out reports/order1           # table (md, csv) + bar chart, seeds aggregated
    migu sweep configs/standard/order1.yaml --threshold 0,0.3,0.5,0.7,0.9 --out runs/ablation
    migu magnitudes runs/quickstart-seq-ft-compare-s0/migu --n 32

Bad input (config, data, model path, run directory) ends with one line on stderr and exit code 2,
never a traceback, and never after deleting anything. A failed write (full disk, file-size limit) ends
with one line and exit code 1; SIGTERM / SIGINT with a step checkpoint, one line saying how to resume
and exit code 128 + the signal number (143, 130); see migu.preemption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from migu.compare import format_comparison, format_matrix
from migu.config import ConfigError, default_config, describe_options, load_config
from migu.data import DataError
from migu.distributed import DistributedError, launched_rank
from migu.dryrun import format_plan
from migu.dryrun import plan as dry_plan
from migu.magnitudes import run_magnitudes
from migu.models import ModelError
from migu.preemption import Interrupted
from migu.report.paper import paper_lines
from migu.report.plots import write_magnitude_plots, write_run_plots
from migu.report.rundata import ReportError, find_run_dirs, load_run
from migu.report.similarity import MAGNITUDES
from migu.report.tables import RUN_COLUMNS, run_report_markdown, run_summary_text, text_table, write_compare
from migu.rundir import CONFIG, RunDirError, WriteError
from migu.sweep import THRESHOLD_FIXED, expand_grid, parse_grid, plan, run_sweep, write_sweep_report
from migu.train import run


# ------------------------------------------------------------------------------------------ migu run
def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", nargs="?", help="YAML config file (default: configs/quickstart.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override one option (dotted key, YAML value), e.g. --set migu.threshold=0.5; "
                             "repeatable; applied after the config file")
    parser.add_argument("--resume", metavar="RUN_DIR",
                        help="continue RUN_DIR after its last finished task, with its saved config.yaml")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an existing run directory (otherwise an existing one is an error)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or status lines")
    parser.add_argument("--dry-run", action="store_true",
                        help="resolve the config and print tasks, steps, evaluation cells, parameters and the "
                             "estimated FLOPs and wall time, without loading weights or training")
    parser.add_argument("--flops", type=float, metavar="FLOP_PER_S",
                        help="with --dry-run: the FLOP rate to estimate the wall time with (e.g. 4e14 for a GPU in "
                             "bf16); default: a matmul measured on this machine")


RUN_EPILOG = """\
Options (config keys; set them in the YAML file or with --set KEY=VALUE):

{options}

Precedence: defaults < config file < --set. Method options live under method.<method name with _>
(e.g. method.seq_lora.r) and only the chosen method's section may be set.
Output: the run directory holds config.yaml, state.json, metrics.jsonl, accuracy_matrix.csv,
summary.json and checkpoints/last (see docs/architecture.md)."""


def cmd_run(args: argparse.Namespace) -> int:
    if args.dry_run:
        cfg = load_config(_saved_config(Path(args.resume)) if args.resume else args.config or default_config(),
                          args.overrides)
        print(format_plan(dry_plan(cfg, args.flops)))
        return 0
    if args.resume:
        if args.config or args.overrides or args.overwrite:
            raise ConfigError("--resume continues a run with its saved config.yaml; "
                              "don't pass a config file, --set or --overwrite with it")
        run_dir = Path(args.resume)
        cfg = load_config(_saved_config(run_dir))
    else:
        cfg = load_config(args.config or default_config(), args.overrides)
    try:
        if args.resume:
            result = run(cfg, resume=True, output_dir=str(run_dir), quiet=args.quiet)
        else:
            result = run(cfg, overwrite=args.overwrite, quiet=args.quiet)
    except Interrupted as stop:  # SIGTERM / SIGINT: stopped at a safe point (migu.preemption)
        if launched_rank() == 0:
            where = args.resume or cfg.output_dir or cfg.default_output_dir()
            print(f"{stop}; continue with: migu run --resume {where}", file=sys.stderr)
        return stop.exit_code
    if launched_rank() != 0:
        return 0  # torchrun: rank 0 prints the result
    print(format_comparison(result) if "runs" in result else format_matrix(result))
    where = args.resume or result.get("path") or cfg.output_dir or str(cfg.default_output_dir())
    print(f"run directory: {where}")
    _write_plots(Path(where))
    return 0


def _write_plots(where: Path) -> None:
    """Every finished run under `where` gets its plots/ (heatmap, curves, loss), as `migu report` makes them."""
    try:
        for run_dir in find_run_dirs([where]):
            for png in write_run_plots(run_dir):
                print(f"plot: {png}")
    except ReportError as err:  # the run itself succeeded; a plot problem must not turn it into a failure
        print(f"warning: plots not written: {err}", file=sys.stderr)


def _saved_config(run_dir: Path) -> Path:
    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"cannot resume {run_dir}: not a migu run directory (no {CONFIG})")
    return run_dir / CONFIG


# ------------------------------------------------------------------------------------------ report
def cmd_report(args: argparse.Namespace) -> int:
    for run_dir in find_run_dirs(args.run_dirs, require_summary=False):
        plots = write_run_plots(run_dir)
        run = load_run(run_dir)
        (run.path / "report.md").write_text(run_report_markdown(run, plots), encoding="utf-8")
        print(run_summary_text(run))
        print(f"wrote {run.path / 'report.md'} and {len(plots)} plot(s) in {run.path / 'plots'}\n")
    return 0


def add_report_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="run directories, or directories holding run directories (e.g. a compare_migu run)")


# ------------------------------------------------------------------------------------------ compare
def cmd_compare(args: argparse.Namespace) -> int:
    runs = [load_run(p, require_summary=True) for p in find_run_dirs(args.run_dirs, require_summary=True)]
    out = Path(args.out) if args.out else _default_compare_out(args.run_dirs)
    result = write_compare(runs, out)
    print(result["text"])
    if len(result["groups"]) < len(result["records"]):
        print("\nruns:")
        print(text_table(result["records"], result.get("run_columns", RUN_COLUMNS)))
    beside = paper_lines(runs)
    if beside:  # runs of the paper's setting: its published AA (migu/assets/paper_results.csv)
        print("\nthe paper's AA (MIGU, Table 1):")
        print("\n".join(beside))
    print(f"\nwrote {', '.join(str(f) for f in result['files'])}")
    return 0


def _default_compare_out(paths) -> Path:
    """The one parent directory given (e.g. a compare_migu run), else ./compare."""
    if len(paths) == 1 and not (Path(paths[0]) / "summary.json").is_file():
        return Path(paths[0])
    return Path("compare")


def add_compare_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR",
                   help="finished run directories (summary.json), or directories holding them")
    p.add_argument("--out", metavar="DIR",
                   help="where compare.md, compare.csv, compare_runs.csv and compare.png go "
                        "(default: the one parent directory given, else ./compare)")


# ------------------------------------------------------------------------------------------ sweep
def cmd_sweep(args: argparse.Namespace) -> int:
    grid = parse_grid(args.grid, args.threshold)
    overrides = ([*THRESHOLD_FIXED] if args.threshold is not None else []) + list(args.overrides)
    config = args.config or str(default_config())
    if not Path(config).is_file():
        raise ReportError(f"config file {config} not found")
    if not args.no_run:
        for point in expand_grid(grid):  # validate every point before training anything
            load_config(config, [*overrides, *point])
    out = Path(args.out) if args.out else Path("runs") / f"sweep-{Path(config).stem}"
    points = plan(grid, out) if args.no_run else run_sweep(config, grid, out, overrides, quiet=args.quiet)
    result = write_sweep_report(points, grid, out, title=Path(config).stem)
    print(result["markdown"])
    unfinished = [p.path.name for p in points if p.status != "done"]
    if unfinished:
        print(f"unfinished points (not in the table): {', '.join(unfinished)}")
    print(f"wrote {', '.join(str(f) for f in result['files'])}")
    return 0


def add_sweep_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("config", nargs="?", help="base YAML config (default: configs/quickstart.yaml)")
    p.add_argument("--threshold", metavar="T1,T2,...",
                   help="MIGU thresholds to sweep: --grid migu.threshold=... with migu.enabled=true and "
                        "compare_migu=false")
    p.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                   help="a config key and its values (repeatable; the cartesian product is run), e.g. "
                        "--grid seed=0,1,2 --grid train.lr=1e-5,5e-5")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override applied to every point (before its grid values), e.g. --set data.test_per_task=10")
    p.add_argument("--out", metavar="DIR", help="sweep directory; point i runs in DIR/<key=value,...> "
                                                 "(default: runs/sweep-<config name>)")
    p.add_argument("--no-run", action="store_true", help="only rebuild the table and plot from finished points")
    p.add_argument("--quiet", action="store_true", help="no progress bars or status lines from the runs")


# ------------------------------------------------------------------------------------------ magnitudes
def cmd_magnitudes(args: argparse.Namespace) -> int:
    for run_dir in find_run_dirs(args.run_dirs, require_summary=False):
        if args.plots_only:
            run = load_run(run_dir)
            threshold = args.threshold if args.threshold is not None else run.migu.get("threshold", 0.7)
            files = write_magnitude_plots(run_dir / MAGNITUDES, run_dir / "plots", threshold=float(threshold),
                                          tasks=args.tasks, task_order=run.tasks, metric=args.metric,
                                          title=run.name)
        else:
            files = run_magnitudes(run_dir, tasks=args.tasks, n=args.n, split=args.split,
                                   batch_size=args.batch_size, threshold=args.threshold, base=args.base,
                                   metric=args.metric, progress=not args.quiet,
                                   log=(lambda text: None) if args.quiet else lambda text: print(text, file=sys.stderr))
        print(f"{run_dir}: wrote {len(files)} file(s)")
        for f in files:
            print(f"  {f}")
    return 0


def add_magnitudes_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or directories holding them)")
    p.add_argument("--tasks", nargs="+", metavar="TASK", help="tasks to measure (default: every task of the run)")
    p.add_argument("--n", type=int, default=64, help="examples per task (the first N of the split; 0 = all)")
    p.add_argument("--split", choices=("train", "test"), default="train", help="which split's examples to use")
    p.add_argument("--batch-size", type=int, default=8, help="examples per forward pass")
    p.add_argument("--threshold", type=float, help="T for the kept-unit overlap (default: the run's migu.threshold)")
    p.add_argument("--metric", choices=("fraction", "jaccard"), default="fraction",
                   help="kept-set overlap: |A∩B|/k (fraction) or |A∩B|/|A∪B| (jaccard)")
    p.add_argument("--base", action="store_true",
                   help="use the base model named in config.yaml, not the run's last checkpoint")
    p.add_argument("--plots-only", action="store_true", help="only redraw the plots from existing magnitudes/*.pt")
    p.add_argument("--quiet", action="store_true", help="no progress bars")



# ------------------------------------------------------------------------------------------ main
DESCRIPTIONS = {
    "report": "Regenerate a run's plots (plots/*.png) and report.md from its files (no model needed).",
    "compare": "Compare runs: a Markdown/CSV table of AA, BWT, FWT, forgetting and wall time (runs that "
               "differ only by seed aggregated as mean ± std) and a bar chart of AA/BWT with and without MIGU.",
    "sweep": "Run a grid of configs (e.g. MIGU thresholds), resumably, and plot the ablation (AA/BWT vs the value).",
    "magnitudes": "Measure each task's per-layer MIGU magnitude vectors with a run's model, save them to "
                  "magnitudes/<task>.pt and plot task similarity and kept-unit overlap.",
}


COMMANDS = {
    "report": (add_report_arguments, cmd_report, "regenerate a run's plots and report.md from its files"),
    "compare": (add_compare_arguments, cmd_compare, "compare runs: table (seeds aggregated) and AA/BWT bar chart"),
    "sweep": (add_sweep_arguments, cmd_sweep, "run a grid of configs (e.g. MIGU thresholds) and plot the ablation"),
    "magnitudes": (add_magnitudes_arguments, cmd_magnitudes,
                   "per-task MIGU magnitudes of a run's model: task similarity and kept-unit overlap"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="migu", description="Continual learning of language models with MIGU.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    run_parser = sub.add_parser(
        "run", help="train a model on a task sequence and evaluate it after every task",
        description="Train a model on a sequence of tasks with a continual-learning method (optionally with "
                    "MIGU), evaluate every task after every task, and write the accuracy matrix and metrics.",
        epilog=RUN_EPILOG.format(options=describe_options()), formatter_class=argparse.RawDescriptionHelpFormatter)
    add_run_arguments(run_parser)
    run_parser.set_defaults(func=cmd_run)
    for name, (add_arguments, handler, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=DESCRIPTIONS[name])
        add_arguments(p)
        p.set_defaults(func=handler)
    return parser


# bad input: one line, exit code 2 (a failed write: exit code 1, a full disk is not bad input)
_PREFIX = {ConfigError: "config error", DataError: "data error", ModelError: "model error",
           WriteError: "write error", RunDirError: "run directory error", ReportError: "report error"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `migu` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except tuple(_PREFIX) as err:
        message = " ".join(str(err).split()) or type(err).__name__
        prefix = next(p for cls, p in _PREFIX.items() if isinstance(err, cls))
        print(f"{prefix}: {message}", file=sys.stderr)
        return 1 if isinstance(err, WriteError) else 2
    except KeyboardInterrupt:
        print("interrupted; continue with: migu run --resume <run directory>", file=sys.stderr)
        return 130
    except RuntimeError as err:
        if not isinstance(err, DistributedError):
            raise
        print(f"distributed error: {' '.join(str(err).split())}", file=sys.stderr)  # a peer died / timed out
        return 1


if __name__ == "__main__":
    sys.exit(main())
