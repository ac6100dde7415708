"""Reports read from run directories: plots, comparison tables, threshold sweeps, magnitude analysis.

    from migu.report import write_run_plots, load_run, ReportError
    write_run_plots("runs/quickstart-seq-ft-compare-s0/migu")   # plots/*.png of one run

Modules: `rundata` (reading run directories), `plots` (a run's PNGs), `tables` (report.md, `migu compare`),
`sweep` (`migu sweep`), `magnitudes` (`migu magnitudes`), `cli` (`register(subparsers)` for migu.cli).
Everything except `magnitudes.collect_task_magnitudes` / `run_magnitudes` needs only the run's files.
"""

from migu.report.rundata import ReportError, Run, find_run_dirs, load_run

__all__ = ["ReportError", "Run", "find_run_dirs", "load_run", "write_run_plots"]


def __getattr__(name):
    # lazy: matplotlib is imported only when a plot is drawn
    if name == "write_run_plots":
        from migu.report.plots import write_run_plots

        return write_run_plots
    raise AttributeError(f"module 'migu.report' has no attribute {name!r}")
