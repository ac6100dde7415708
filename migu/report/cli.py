"""The reporting subcommands of `migu`: report, compare, sweep, magnitudes.

    migu report runs/quickstart-seq-ft-compare-s0            # plots/ + report.md of each run below it
    migu compare runs/order1-* --out reports/order1           # table (md, csv) + bar chart, seeds aggregated
    migu sweep configs/standard/order1.yaml --threshold 0,0.3,0.5,0.7,0.9 --out runs/ablation
    migu magnitudes runs/quickstart-seq-ft-compare-s0/migu --n 32

Wired into `migu.cli` by `register(subparsers)`. Each handler turns bad input (`ReportError` and the
runner's config / data / model / run-directory errors) into one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

from migu.report.rundata import ReportError

DESCRIPTIONS = {
    "report": "Regenerate a run's plots (plots/*.png) and report.md from its files (no model needed).",
    "compare": "Compare runs: a Markdown/CSV table of AA, BWT, FWT, forgetting and wall time (runs that "
               "differ only by seed aggregated as mean ± std) and a bar chart of AA/BWT with and without MIGU.",
    "sweep": "Run a grid of configs (e.g. MIGU thresholds), resumably, and plot the ablation (AA/BWT vs the value).",
    "magnitudes": "Measure each task's per-layer MIGU magnitude vectors with a run's model, save them to "
                  "magnitudes/<task>.pt and plot task similarity and kept-unit overlap.",
}


def _user_errors() -> tuple[type[BaseException], ...]:
    """ReportError and the runner's bad-input errors; a module not imported yet cannot have raised its own."""
    errors: list[type[BaseException]] = [ReportError]
    for module, name in (("migu.config", "ConfigError"), ("migu.data.records", "DataError"),
                         ("migu.models", "ModelError"), ("migu.rundir", "RunDirError")):
        error = getattr(sys.modules.get(module), name, None)
        if isinstance(error, type) and issubclass(error, BaseException):
            errors.append(error)
    return tuple(errors)


def _guarded(command: str, handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args)
        except _user_errors() as err:
            message = " ".join(str(err).split()) or type(err).__name__
            print(f"migu {command}: error: {message}", file=sys.stderr)
            return 2

    run.__name__ = f"cmd_{command}"
    return run


def _say(text: str) -> None:
    print(text, file=sys.stderr)


# ------------------------------------------------------------------------------------------ report
def cmd_report(args: argparse.Namespace) -> int:
    from migu.report.plots import write_run_plots
    from migu.report.rundata import find_run_dirs, load_run
    from migu.report.tables import run_report_markdown, run_summary_text

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
    from migu.report.rundata import find_run_dirs, load_run
    from migu.report.tables import RUN_COLUMNS, text_table, write_compare

    runs = [load_run(p, require_summary=True) for p in find_run_dirs(args.run_dirs, require_summary=True)]
    out = Path(args.out) if args.out else _default_compare_out(args.run_dirs)
    result = write_compare(runs, out)
    print(result["text"])
    if len(result["groups"]) < len(result["records"]):
        print("\nruns:")
        print(text_table(result["records"], result.get("run_columns", RUN_COLUMNS)))
    from migu.report.paper import paper_lines

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
    from migu.report.sweep import THRESHOLD_FIXED, expand_grid, parse_grid, plan, run_sweep, write_sweep_report

    grid = parse_grid(args.grid, args.threshold)
    overrides = ([*THRESHOLD_FIXED] if args.threshold is not None else []) + list(args.overrides)
    config = args.config
    if config is None:
        from migu.cli import default_config

        config = str(default_config())
    if not Path(config).is_file():
        raise ReportError(f"config file {config} not found")
    if not args.no_run:
        from migu.config import load_config

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
    from migu.report.magnitudes import MAGNITUDES, run_magnitudes, write_magnitude_plots
    from migu.report.rundata import find_run_dirs, load_run

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
                                   log=(lambda text: None) if args.quiet else _say)
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


# ------------------------------------------------------------------------------------------ wiring
COMMANDS = {
    "report": (add_report_arguments, cmd_report, "regenerate a run's plots and report.md from its files"),
    "compare": (add_compare_arguments, cmd_compare, "compare runs: table (seeds aggregated) and AA/BWT bar chart"),
    "sweep": (add_sweep_arguments, cmd_sweep, "run a grid of configs (e.g. MIGU thresholds) and plot the ablation"),
    "magnitudes": (add_magnitudes_arguments, cmd_magnitudes,
                   "per-task MIGU magnitudes of a run's model: task similarity and kept-unit overlap"),
}


def register(subparsers) -> None:
    """Add the report, compare, sweep and magnitudes subcommands to an argparse subparsers object.

    Each gets `func=handler` (`handler(args) -> int` exit code) as its default.
    """
    for name, (add_arguments, handler, help_text) in COMMANDS.items():
        p = subparsers.add_parser(name, help=help_text, description=DESCRIPTIONS[name])
        add_arguments(p)
        p.set_defaults(func=_guarded(name, handler))


def main(argv=None) -> int:
    """Standalone entry point (`python -m migu.report.cli COMMAND ...`), for use before migu.cli wires it."""
    parser = argparse.ArgumentParser(prog="migu")
    register(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
