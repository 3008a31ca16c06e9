"""Compare training runs: learning curves as a PNG and summaries as Markdown and CSV tables."""

from __future__ import annotations

import csv
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

from runtime.trainer import METRICS_FILE, SUMMARY_FILE
from taxonomy.errors import DssmError
from taxonomy.writing import write_bytes_atomically, write_text_atomically

CURVES_FILE = "training_curves.png"
MARKDOWN_FILE = "summary.md"
CSV_FILE = "summary.csv"

# Table columns that come first when present, in this order; others follow sorted.
LEADING_COLUMNS = [
    "epochs", "best_epoch", "best_valid_neg_elbo_per_step", "test_neg_elbo_per_step",
    "test_nll_per_step", "test_nll_samples", "final_train_loss_per_step",
    "final_valid_neg_elbo_per_step", "wall_seconds", "seed",
]


class ReportError(DssmError):
    """A run directory that cannot be reported: missing or unreadable metrics or summary."""


class ReportFiles(NamedTuple):
    """The files `report` writes."""

    curves: Path
    markdown: Path
    csv: Path


class _Run(NamedTuple):
    label: str
    metrics: list[dict[str, Any]]
    summary: dict[str, Any]


def report(run_dirs: Sequence[str | os.PathLike], output_dir: str | os.PathLike) -> ReportFiles:
    """Write training_curves.png, summary.md and summary.csv for `run_dirs` into `output_dir`.

    The curves show the training loss (annealed, as optimised) and the
    validation negative ELBO per step against the epoch, one line per run,
    labelled with the run directory's name. The tables have one row per run
    and one column per key of the runs' summary.json files.
    """
    if not run_dirs:
        raise ReportError("no run directories to report")
    runs = _read_runs([Path(run_dir) for run_dir in run_dirs])
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)

    files = ReportFiles(curves=output / CURVES_FILE, markdown=output / MARKDOWN_FILE,
                        csv=output / CSV_FILE)
    _plot_curves(runs, files.curves)
    columns = _columns(runs)
    write_text_atomically(files.markdown, _markdown_table(runs, columns))
    write_text_atomically(files.csv, _csv_table(runs, columns))
    return files


def _read_runs(run_dirs: list[Path]) -> list[_Run]:
    # Label runs by folder name, or by parent/name where two names clash.
    names = [run_dir.name for run_dir in run_dirs]
    labels = [f"{run_dir.parent.name}/{run_dir.name}" if names.count(run_dir.name) > 1
              else run_dir.name for run_dir in run_dirs]

    runs = []
    for label, run_dir in zip(labels, run_dirs):
        metrics_path, summary_path = run_dir / METRICS_FILE, run_dir / SUMMARY_FILE
        for path in (metrics_path, summary_path):
            if not path.is_file():
                raise ReportError(f"{path} not found; is {run_dir} a run directory written by "
                                  f"'dssm train'?")
        try:
            metrics = [json.loads(line) for line in
                       metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
            summary = json.loads(summary_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ReportError(f"cannot read the metrics or summary of {run_dir}: {error}") \
                from error
        runs.append(_Run(label, metrics, summary))
    return runs


# A panel whose values span more than this factor gets a log axis.
LOG_SCALE_RATIO = 3.0


def needs_log_axis(values: list[float | None]) -> bool:
    """Return whether a panel of losses reads better on a log axis.

    The first epochs' losses can be many times the later ones, and a log axis
    keeps the differences between late epochs visible. Missing and
    non-finite values are ignored, and a panel with a value at or below 0
    keeps a linear axis.
    """
    finite = [value for value in values if value is not None and math.isfinite(value)]
    return bool(finite) and min(finite) > 0 and max(finite) > LOG_SCALE_RATIO * min(finite)


def _plot_curves(runs: list[_Run], path: Path) -> None:
    from matplotlib.figure import Figure
    from matplotlib.ticker import FormatStrFormatter, LogLocator, MaxNLocator

    figure = Figure(figsize=(11.0, 4.2), dpi=100, layout="constrained")
    train_axes, valid_axes = figure.subplots(1, 2, sharex=True)
    panels = [(train_axes, "train_loss_per_step", "training loss per step (annealed)"),
              (valid_axes, "valid_neg_elbo_per_step", "validation negative ELBO per step")]

    for index, run in enumerate(runs):
        color = f"C{index % 10}"
        epochs = [row["epoch"] for row in run.metrics]
        for axes, key, _ in panels:
            # A missing value (a recovered non-finite epoch) leaves a gap in the line.
            values = [math.nan if row.get(key) is None else row[key] for row in run.metrics]
            axes.plot(epochs, values, color=color, label=run.label,
                      marker="." if len(epochs) < 30 else None)

    for axes, key, title in panels:
        axes.set_title(title)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.set_ylabel("nats per step")
        values = [row.get(key) for run in runs for row in run.metrics]
        if needs_log_axis(values):
            axes.set_yscale("log")
            axes.yaxis.set_minor_locator(LogLocator(subs=(1.5, 2, 3, 4, 5, 6, 7, 8, 9)))
            axes.yaxis.set_major_formatter(FormatStrFormatter("%g"))
            axes.yaxis.set_minor_formatter(FormatStrFormatter("%g"))
        axes.grid(alpha=0.3)
    valid_axes.legend(fontsize="small")

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    write_bytes_atomically(path, buffer.getvalue())


def _columns(runs: list[_Run]) -> list[str]:
    keys = {key for run in runs for key in run.summary if key != "run"}
    leading = [key for key in LEADING_COLUMNS if key in keys]
    return leading + sorted(keys - set(leading))


def _format_cell(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4f}"
    return str(value)


def _markdown_table(runs: list[_Run], columns: list[str]) -> str:
    header = ["run", *columns]
    # Numbers align right and text (run, dataset, spec, ...) aligns left.
    numeric = {column for column in columns
               if any(isinstance(run.summary.get(column), (int, float))
                      and not isinstance(run.summary.get(column), bool) for run in runs)}
    lines = ["| " + " | ".join(header) + " |",
             "|" + "|".join("---:" if column in numeric else "---" for column in header) + "|"]
    for run in runs:
        cells = [run.label, *(_format_cell(run.summary.get(column)) for column in columns)]
        lines.append("| " + " | ".join(cell.replace("|", "\\|") for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def _csv_table(runs: list[_Run], columns: list[str]) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["run", *columns])
    for run in runs:
        values = [run.summary.get(column) for column in columns]
        writer.writerow([run.label, *("" if value is None else value for value in values)])
    return buffer.getvalue()
