"""The `migu` command line.

    migu run                                    # == migu run configs/quickstart.yaml
    migu run configs/standard/order1.yaml --set migu.enabled=true --set seed=1
    migu run --resume runs/order1-seq-ft-migu-s0
    migu run --help                             # every option, its default and its docstring

Bad input (config, data, model path, run directory) ends with one line on stderr and exit code 2,
never a traceback, and never after deleting anything. A failed write (full disk, file-size limit) ends
with one line and exit code 1; SIGTERM / SIGINT with a step checkpoint, one line saying how to resume
and exit code 128 + the signal number (143, 130); see migu.preemption.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from migu.config import ConfigError, describe_options, load_config



def _repo_configs() -> Path:
    return Path(__file__).resolve().parent.parent / "configs"


def default_config() -> Path:
    """configs/quickstart.yaml of the checkout (or of the working directory)."""
    for candidate in (_repo_configs() / "quickstart.yaml", Path("configs") / "quickstart.yaml"):
        if candidate.is_file():
            return candidate
    raise ConfigError("no config file given and configs/quickstart.yaml not found; pass a config file")


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
    from migu.distributed import launched_rank
    from migu.compare import format_comparison, format_matrix
    from migu.train import run

    if args.dry_run:
        from migu.dryrun import format_plan, plan

        cfg = load_config(_saved_config(Path(args.resume)) if args.resume else args.config or default_config(),
                          args.overrides)
        print(format_plan(plan(cfg, args.flops)))
        return 0
    from migu.preemption import Interrupted

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
    from migu.report import ReportError, find_run_dirs
    from migu.report.plots import write_run_plots

    try:
        for run_dir in find_run_dirs([where]):
            for png in write_run_plots(run_dir):
                print(f"plot: {png}")
    except ReportError as err:  # the run itself succeeded; a plot problem must not turn it into a failure
        print(f"warning: plots not written: {err}", file=sys.stderr)


def _saved_config(run_dir: Path) -> Path:
    from migu.rundir import CONFIG, RunDirError

    if not (run_dir / CONFIG).is_file():
        raise RunDirError(f"cannot resume {run_dir}: not a migu run directory (no {CONFIG})")
    return run_dir / CONFIG


# ------------------------------------------------------------------------------------------ main
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
    from migu.report.cli import register

    register(sub)  # report, compare, sweep, magnitudes: they read run directories only
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input: reported as one line, exit code 2."""
    from migu.data import DataError
    from migu.models import ModelError
    from migu.rundir import RunDirError

    from migu.report import ReportError

    return ConfigError, DataError, ModelError, RunDirError, ReportError


_PREFIX = {"ConfigError": "config error", "DataError": "data error", "ModelError": "model error",
           "RunDirError": "run directory error", "WriteError": "write error", "ReportError": "report error"}


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `migu` script; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    errors = _user_errors()
    try:
        return args.func(args)
    except errors as err:
        message = " ".join(str(err).split()) or type(err).__name__
        print(f"{_PREFIX.get(type(err).__name__, 'error')}: {message}", file=sys.stderr)
        return 1 if type(err).__name__ == "WriteError" else 2  # a full disk is not bad input
    except KeyboardInterrupt:
        print("interrupted; continue with: migu run --resume <run directory>", file=sys.stderr)
        return 130
    except RuntimeError as err:
        from migu.distributed import DistributedError

        if not isinstance(err, DistributedError):
            raise
        print(f"distributed error: {' '.join(str(err).split())}", file=sys.stderr)  # a peer died / timed out
        return 1


if __name__ == "__main__":
    sys.exit(main())
