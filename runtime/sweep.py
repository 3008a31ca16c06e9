"""Sweeps: train every combination of specs, guide options and seeds, then rank them.

`run_sweep` trains the cross product of spec files, guide alignments, IAF
layer counts and seeds, each as an ordinary run directory, and writes into
the output folder:

- runs/<spec stem>-<guide>-iaf<k>-seed<s>/: the run directories of `dssm train`.
- sweep.json: the sweep's training options and each run's status, with the
  error of every failed run.
- leaderboard.csv, leaderboard.md: one row per (spec, guide, IAF layers) with
  the mean and sample standard deviation over seeds of the test negative
  ELBO per time step, sorted best (lowest) first.
- hierarchy.svg, hierarchy.png: the hierarchy with each cell coloured by the
  best mean score of the specs that land in it.

Running the same command again resumes the sweep. A run is finished when its
summary.json contains test_neg_elbo_per_step, and finished runs are skipped. A
run that was stopped after at least one epoch continues from its
checkpoint-last.pt (`train_spec` with resume), so finished epochs are kept.
A run stopped before its first epoch ended has no checkpoint, and is started
again from scratch. Failed runs are tried again the same way.

Runs execute in local processes (`engine="local"`) or as Ray tasks
(`engine="ray"`, an optional dependency).
"""

from __future__ import annotations

import csv
import io
import itertools
import json
import logging
import math
import os
import shutil
import statistics
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path
from typing import Any

from runtime.data import load_dataset
from runtime.trainer import LAST_CHECKPOINT, SUMMARY_FILE
from taxonomy.errors import DssmError, SpecError
from taxonomy.writing import write_text_atomically

log = logging.getLogger("dssm.sweep")

ENGINES = ("local", "ray")
GUIDES = ("partial", "full")
SCORE_KEY = "test_neg_elbo_per_step"
MANIFEST_FILE = "sweep.json"
RUNS_FOLDER = "runs"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_MARKDOWN = "leaderboard.md"
HIERARCHY_PICTURES = ("hierarchy.svg", "hierarchy.png")
SCORE_LABEL = "test negative ELBO per step (nats), best mean"
# Training options that must match when a sweep resumes: changing them would
# mix runs trained differently in one leaderboard.
FIXED_OPTIONS = ("dataset", "epochs", "batch_size", "lr", "weight_decay", "dropout",
                 "anneal_epochs")
# The spec language's alignment when a spec has no `guide` statement.
LANGUAGE_GUIDE = "full"
RAY_INSTALL_HINT = "pip install 'dssm[ray]'"


class SweepError(DssmError):
    """A sweep that cannot start: invalid options, missing specs, or another sweep in --out."""


@dataclass(frozen=True)
class SweepRun:
    """One training run of a sweep: a spec with a guide alignment, IAF layers and a seed."""

    spec: str
    guide: str
    iaf: int
    seed: int

    @property
    def name(self) -> str:
        """The run directory's name, e.g. dmm-full-iaf0-seed1."""
        return f"{Path(self.spec).stem}-{self.guide}-iaf{self.iaf}-seed{self.seed}"

    @property
    def setting(self) -> tuple[str, str, int]:
        """The leaderboard row this run belongs to: (spec, guide, iaf)."""
        return (self.spec, self.guide, self.iaf)


@dataclass(frozen=True)
class SweepResult:
    """The outcome of `run_sweep`: the runs it trained and skipped, and the files it wrote.

    :param Path output: the sweep folder.
    :param list trained: the runs trained (or tried) by this call.
    :param list skipped: the runs finished by an earlier call.
    :param list failed: the runs of this call that failed.
    :param list rows: the leaderboard rows, best first.
    :param list files: the leaderboard and picture files written.
    """

    output: Path
    trained: list[SweepRun]
    skipped: list[SweepRun]
    failed: list[SweepRun]
    rows: list[dict[str, Any]]
    files: list[Path]


# ---------------------------------------------------------------- planning


def collect_spec_files(paths: list[str]) -> list[str]:
    """Return the .dssm files named, with folders searched recursively, in a stable order."""
    files: list[str] = []
    for name in paths:
        path = Path(name)
        if path.is_dir():
            found = sorted(path.rglob("*.dssm"))
            if not found:
                raise SweepError(f"{name}: no .dssm files in this folder")
            files += [str(spec) for spec in found]
        elif path.is_file():
            files.append(str(path))
        else:
            raise SweepError(f"{name}: no such spec file or folder")
    files = list(dict.fromkeys(files))

    stems: dict[str, str] = {}
    for spec in files:
        stem = Path(spec).stem
        if stem in stems:
            raise SweepError(f"{stems[stem]} and {spec} would share the run names {stem}-*; "
                             "rename one of them or sweep them separately")
        stems[stem] = spec
    return files


def plan_runs(specs: list[str], guides: list[str] | None, iafs: list[int] | None,
              seeds: list[int]) -> list[SweepRun]:
    """Return the cross product of specs, guides, IAF layer counts and seeds.

    Without `guides` or `iafs`, each spec uses its own `guide` and `flow`
    statements (full alignment and no flow when it has none).
    """
    runs = []
    for spec in specs:
        declared = _declared_options(spec)
        for guide, iaf, seed in itertools.product(guides or [declared["guide"]],
                                                  iafs or [declared["iaf"]], seeds):
            runs.append(SweepRun(spec=spec, guide=guide, iaf=iaf, seed=seed))
    return runs


def _declared_options(spec: str) -> dict[str, Any]:
    from runtime.runs import spec_training_defaults

    try:
        return spec_training_defaults(spec)
    except SpecError:
        # The run fails with the spec's error when it trains; it still needs a name.
        return {"guide": LANGUAGE_GUIDE, "iaf": 0}


# ---------------------------------------------------------------- running one run


def train_run(run: SweepRun, dataset: str, run_dir: str, options: dict[str, Any],
              cwd: str | None = None) -> dict[str, Any]:
    """Train one run of a sweep and return {"status": "done", "summary": ...} or a failure.

    This is what a worker executes. A failure returns {"status": "failed",
    "error": message, "details": traceback} instead of raising, so one run
    cannot stop the sweep. `cwd` is the sweep's working directory, so that
    relative paths mean the same in a Ray worker.
    """
    import torch

    from runtime.runs import train_spec

    if cwd and os.path.isdir(cwd) and os.getcwd() != cwd:
        os.chdir(cwd)
    torch.set_num_threads(options.get("threads") or 1)

    folder = Path(run_dir)
    resume = (folder / LAST_CHECKPOINT).is_file()
    if not resume and folder.exists():
        # Stopped before its first epoch ended: nothing to keep, so start again.
        shutil.rmtree(folder)
    started = time.perf_counter()
    try:
        summary = train_spec(run.spec, dataset, run_dir,
                             {**options, "guide": run.guide, "iaf": run.iaf, "seed": run.seed,
                              "resume": resume},
                             evaluate_test=True, progress=False)
    except Exception as error:  # noqa: BLE001 - any failure is recorded and the sweep goes on
        return {"status": "failed", "error": _error_message(error),
                "details": _error_details(error), "seconds": time.perf_counter() - started}
    return {"status": "done", "summary": summary, "resumed": resume,
            "seconds": time.perf_counter() - started}


def _error_message(error: BaseException) -> str:
    if isinstance(error, SpecError):
        return error.format().splitlines()[0]
    if isinstance(error, DssmError):
        return str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {error}".splitlines()[0]


def _error_details(error: BaseException) -> str:
    """Return the whole message of a user error, or the traceback of anything else (a bug)."""
    if isinstance(error, SpecError):
        return error.format()
    if isinstance(error, DssmError):
        return str(error)
    return "".join(traceback.format_exception(error))


def _start_worker(threads: int) -> None:
    """Initialise a local worker process: one torch thread, so workers do not compete."""
    import torch

    torch.set_num_threads(threads)


# ---------------------------------------------------------------- engines


Task = tuple[SweepRun, str, str, dict[str, Any], str]


def execute_local(tasks: list[Task], workers: int) -> Iterator[tuple[SweepRun, dict]]:
    """Yield (run, outcome) as runs finish; several workers run in spawned processes.

    With one worker the runs execute in this process, one after another.
    """
    if workers == 1:
        for task in tasks:
            yield task[0], train_run(*task)
        return

    threads = tasks[0][3].get("threads") or 1
    context = get_context("spawn")
    with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                             initializer=_start_worker, initargs=(threads,)) as pool:
        pending = {pool.submit(train_run, *task): task[0] for task in tasks}
        try:
            while pending:
                done, _ = wait(pending, return_when=FIRST_COMPLETED)
                for future in done:
                    run = pending.pop(future)
                    try:
                        outcome = future.result()
                    except BrokenProcessPool as error:
                        outcome = {"status": "failed",
                                   "error": f"the worker process died ({error}); "
                                            "run the sweep again to resume"}
                    yield run, outcome
        finally:
            for future in pending:
                future.cancel()


def execute_ray(tasks: list[Task], workers: int,
                address: str | None) -> Iterator[tuple[SweepRun, dict]]:
    """Yield (run, outcome) as Ray tasks finish, on a local Ray instance or the cluster at `address`.

    A local instance gets `workers` CPUs and listens on the loopback interface
    only. On a cluster, every node needs dssm installed and the sweep folder
    on a file system that all nodes share, or the run files stay on the nodes
    (the leaderboard still gets each run's summary).
    """
    ray = import_ray(local=address is None)
    started_here = not ray.is_initialized()
    if started_here:
        if address is None:
            # Workers import runtime.sweep even when dssm is not installed, as in a checkout.
            package_root = str(Path(__file__).resolve().parent.parent)
            python_path = os.pathsep.join(filter(None, [package_root,
                                                        os.environ.get("PYTHONPATH")]))
            ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False,
                     logging_level=logging.WARNING,
                     runtime_env={"env_vars": {"PYTHONPATH": python_path}})
        else:
            ray.init(address=address, log_to_driver=False, logging_level=logging.WARNING)

    try:
        remote = ray.remote(num_cpus=1, max_retries=0)(train_run)
        pending = {remote.remote(*task): task[0] for task in tasks}
        while pending:
            done, _ = ray.wait(list(pending), num_returns=1)
            for reference in done:
                run = pending.pop(reference)
                try:
                    outcome = ray.get(reference)
                except ray.exceptions.RayError as error:
                    outcome = {"status": "failed",
                               "error": f"the Ray task failed: {str(error).splitlines()[0]}"}
                yield run, outcome
    finally:
        if started_here:
            ray.shutdown()


def import_ray(local: bool = True):
    """Import Ray, or raise SweepError saying how to install it.

    For a local instance, Ray's usage statistics are turned off and its
    processes listen on the loopback interface only (checked with Ray 2.60),
    unless the environment already sets these variables. Both must be set
    before Ray is imported.
    """
    if local:
        os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
        # Off, Ray 2.x picks 127.0.0.1 as the node address and starts a
        # one-machine instance that other machines cannot join.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    try:
        import ray
    except ImportError:
        raise SweepError(f"--engine ray needs Ray, which is not installed. Install it with "
                         f"`{RAY_INSTALL_HINT}`, or use --engine local") from None
    return ray


# ---------------------------------------------------------------- the sweep


def run_sweep(specs: list[str], dataset: str, output: str, *, epochs: int,
              seeds: int = 3, guides: list[str] | None = None, iafs: list[int] | None = None,
              workers: int = 1, engine: str = "local", address: str | None = None,
              options: dict[str, Any] | None = None,
              report: Callable[[str], None] | None = None) -> SweepResult:
    """Train every combination of `specs`, `guides`, `iafs` and seeds 0..`seeds`-1 into `output`.

    :param list specs: spec files and folders (searched recursively for *.dssm).
    :param str dataset: a `runtime.data.load_dataset` name.
    :param int epochs: the epochs of each run.
    :param int seeds: the number of seeds per setting, numbered from 0.
    :param list guides: guide alignments ("partial", "full"); None uses each spec's own.
    :param list iafs: IAF layer counts; None uses each spec's own flow (0 without one).
    :param int workers: runs trained at once.
    :param str engine: "local" (processes on this machine) or "ray".
    :param str address: the Ray cluster to join; None starts a local Ray instance.
    :param dict options: more TrainConfig fields for every run (batch_size, lr,
        anneal_epochs, device, threads); threads defaults to 1 per run.
    :param report: called with one line per finished run, e.g. `print`.
    :raises SweepError: for invalid options, missing specs, or an --out folder
        containing a sweep with other training options.
    :raises DataError: when `dataset` cannot be loaded (checked only without `address`).
    """
    _check_arguments(epochs, seeds, guides, iafs, workers, engine, address)
    if engine == "ray":
        import_ray(local=address is None)
    spec_files = collect_spec_files(specs)
    if address is None:
        # A misspelt data set fails here once, not once per run. A cluster's
        # data may exist only on its nodes, so a cluster sweep skips this check.
        load_dataset(dataset)
    runs = plan_runs(spec_files, guides, iafs, list(range(seeds)))
    training = {"threads": 1, **{key: value for key, value in (options or {}).items()
                                 if value is not None}, "epochs": epochs}
    folder = Path(output)
    manifest = _open_manifest(folder, dataset, training)

    finished = [run for run in runs if _finished_summary(folder, run, manifest) is not None]
    pending = [run for run in runs if run not in finished]
    if finished:
        _report(report, f"{len(finished)} of {len(runs)} runs finished earlier; skipping them")
    cwd = os.getcwd()
    tasks = [(run, dataset, str(folder / RUNS_FOLDER / run.name), training, cwd)
             for run in pending]

    failed = []
    if tasks:
        runs_word = "run" if len(tasks) == 1 else "runs"
        workers_word = "worker" if workers == 1 else "workers"
        _report(report, f"training {len(tasks)} {runs_word} with {workers} {workers_word} "
                        f"({engine})")
        outcomes = (execute_ray(tasks, workers, address) if engine == "ray"
                    else execute_local(tasks, workers))
        for count, (run, outcome) in enumerate(outcomes, start=1):
            _record(folder, manifest, run, outcome)
            if outcome["status"] != "done":
                failed.append(run)
            _report(report, _outcome_line(run, outcome, count, len(tasks)))

    rows = leaderboard_rows(runs, folder, manifest)
    files = write_leaderboard(rows, folder, dataset, training)
    files += draw_leaderboard(rows, folder)
    return SweepResult(output=folder, trained=pending, skipped=finished, failed=failed,
                       rows=rows, files=files)


def _check_arguments(epochs, seeds, guides, iafs, workers, engine, address) -> None:
    if epochs < 1:
        raise SweepError(f"--epochs must be at least 1, not {epochs}")
    if seeds < 1:
        raise SweepError(f"--seeds must be at least 1, not {seeds}")
    if workers < 1:
        raise SweepError(f"--workers must be at least 1, not {workers}")
    if engine not in ENGINES:
        raise SweepError(f"unknown engine '{engine}'; choose {' or '.join(ENGINES)}")
    if address is not None and engine != "ray":
        raise SweepError("--address names a Ray cluster; add --engine ray")
    for guide in guides or []:
        if guide not in GUIDES:
            raise SweepError(f"unknown guide '{guide}' in --guide; choose from "
                             f"{', '.join(GUIDES)}")
    for layers in iafs or []:
        if layers < 0:
            raise SweepError(f"--iaf lists {layers} layers; layer counts must be 0 or more")


def _report(report, line: str) -> None:
    log.info(line)
    if report is not None:
        report(line)


def _outcome_line(run: SweepRun, outcome: dict, count: int, total: int) -> str:
    prefix = f"[{count}/{total}] {run.name}"
    if outcome["status"] == "done":
        summary = outcome["summary"]
        resumed = ", resumed" if outcome.get("resumed") else ""
        return (f"{prefix}: test negative ELBO per step {summary[SCORE_KEY]:.4f} "
                f"({summary.get('wall_seconds', 0.0):.0f} s{resumed})")
    return f"{prefix}: failed: {outcome['error']}"


# ---------------------------------------------------------------- the manifest


def _open_manifest(folder: Path, dataset: str, training: dict[str, Any]) -> dict[str, Any]:
    """Read sweep.json, or start one. Raise SweepError when its sweep used other options."""
    settings = {"dataset": dataset, **training}
    path = folder / MANIFEST_FILE
    if path.is_file():
        try:
            manifest = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as error:
            raise SweepError(f"cannot read {path}: {error}; remove it to start the sweep "
                             "again") from None
        saved = manifest.get("options", {})
        changed = [key for key in FIXED_OPTIONS if saved.get(key) != settings.get(key)]
        if changed:
            differences = ", ".join(f"{key} {saved.get(key)!r} (now {settings.get(key)!r})"
                                    for key in changed)
            raise SweepError(f"{folder} contains a sweep with {differences}; use the same options "
                             "to resume it, or choose another --out")
        manifest["options"] = settings
    else:
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise SweepError(f"cannot create {folder}: {error.strerror or error}") from None
        manifest = {"options": settings, "runs": {}}
    _save_manifest(folder, manifest)
    return manifest


def _save_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    write_text_atomically(folder / MANIFEST_FILE, json.dumps(manifest, indent=1) + "\n")


def _record(folder: Path, manifest: dict[str, Any], run: SweepRun, outcome: dict) -> None:
    entry = {"spec": run.spec, "guide": run.guide, "iaf": run.iaf, "seed": run.seed,
             "status": outcome["status"]}
    if outcome["status"] == "done":
        entry["summary"] = outcome["summary"]
    else:
        entry["error"] = outcome["error"]
        if outcome.get("details"):
            entry["details"] = outcome["details"]
    manifest["runs"][run.name] = entry
    _save_manifest(folder, manifest)


def _finished_summary(folder: Path, run: SweepRun, manifest: dict) -> dict | None:
    """Return the run's summary when it contains the test figure, else None.

    The run directory's summary.json comes first; the copy in sweep.json
    serves when the run trained on another machine of a Ray cluster.
    """
    path = folder / RUNS_FOLDER / run.name / SUMMARY_FILE
    if path.is_file():
        try:
            summary = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            summary = {}
        if isinstance(summary.get(SCORE_KEY), (int, float)):
            return summary
        return None
    saved = manifest["runs"].get(run.name, {}).get("summary", {})
    return saved if isinstance(saved.get(SCORE_KEY), (int, float)) else None


# ---------------------------------------------------------------- the leaderboard


def leaderboard_rows(runs: list[SweepRun], folder: Path, manifest: dict) -> list[dict]:
    """Build one row per (spec, guide, iaf): cell, model, score statistics over seeds, status.

    The mean and the sample standard deviation (n - 1 in the denominator;
    None for fewer than two seeds) are over the seeds that finished. Rows with
    a score come first, lowest mean first, then rows without one in plan order.
    """
    settings: dict[tuple, list[SweepRun]] = {}
    for run in runs:
        settings.setdefault(run.setting, []).append(run)

    rows = []
    for (spec, guide, iaf), seed_runs in settings.items():
        scores, seconds = [], []
        errors: dict[str, list[int]] = {}
        for run in seed_runs:
            summary = _finished_summary(folder, run, manifest)
            if summary is not None:
                scores.append(float(summary[SCORE_KEY]))
                seconds.append(float(summary.get("wall_seconds", math.nan)))
                continue
            entry = manifest["runs"].get(run.name, {})
            if entry.get("status") == "failed":
                errors.setdefault(entry["error"], []).append(run.seed)

        cell, model = _placement_labels(spec)
        if len(scores) == len(seed_runs):
            status = "done"
        elif scores:
            status = "partial"
        else:
            status = "failed" if errors else "not run"
        rows.append({
            "rank": None, "cell": cell, "model": model, "spec": spec, "guide": guide,
            "iaf": iaf, "seeds_done": len(scores), "seeds": len(seed_runs),
            "test_neg_elbo_per_step_mean": statistics.fmean(scores) if scores else None,
            "test_neg_elbo_per_step_sd": statistics.stdev(scores) if len(scores) > 1 else None,
            "wall_seconds_mean": statistics.fmean(seconds) if seconds else None,
            "status": status, "error": _seed_errors(errors),
        })

    scored = sorted((row for row in rows if row["test_neg_elbo_per_step_mean"] is not None),
                    key=lambda row: row["test_neg_elbo_per_step_mean"])
    for rank, row in enumerate(scored, start=1):
        row["rank"] = rank
    return scored + [row for row in rows if row["test_neg_elbo_per_step_mean"] is None]


def _seed_errors(errors: dict[str, list[int]]) -> str | None:
    """Join the errors of a row's seeds, naming each message once with its seeds."""
    parts = []
    for message, seeds in errors.items():
        label = "seed" if len(seeds) == 1 else "seeds"
        parts.append(f"{label} {', '.join(map(str, seeds))}: {message}")
    return "; ".join(parts) or None


def _placement_labels(spec: str) -> tuple[str, str]:
    """Return the spec's cell label and model name, or what keeps it out of the hierarchy."""
    from taxonomy.hierarchy import check_spec

    try:
        placement = check_spec(spec)
    except SpecError as error:
        return "spec error", Path(spec).stem
    if placement.cell is None:
        return "outside the hierarchy", placement.model.name
    return placement.cell.label, placement.model.name


CSV_COLUMNS = ("rank", "cell", "model", "spec", "guide", "iaf", "seeds_done", "seeds",
               "test_neg_elbo_per_step_mean", "test_neg_elbo_per_step_sd",
               "wall_seconds_mean", "status", "error")


def write_leaderboard(rows: list[dict], folder: Path, dataset: str,
                      training: dict[str, Any]) -> list[Path]:
    """Write leaderboard.csv (every column, full precision) and leaderboard.md."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({key: "" if row[key] is None else row[key] for key in CSV_COLUMNS})
    csv_path = folder / LEADERBOARD_CSV
    write_text_atomically(csv_path, buffer.getvalue())

    markdown_path = folder / LEADERBOARD_MARKDOWN
    write_text_atomically(markdown_path, leaderboard_markdown(rows, dataset, training))
    return [csv_path, markdown_path]


def leaderboard_markdown(rows: list[dict], dataset: str, training: dict[str, Any]) -> str:
    """Return the leaderboard as a Markdown table with a line on how it was made."""
    options = ", ".join(f"{key} {value}" for key, value in training.items()
                        if key not in ("threads", "device"))
    lines = [f"# Leaderboard: {dataset}", "",
             f"Test negative ELBO per time step in nats (lower is better), mean ± sample "
             f"standard deviation over seeds; {options}.", "",
             "| rank | cell | model | options | test −ELBO per step | seeds | train time | status |",
             "|---:|---|---|---|---:|---:|---:|---|"]
    for row in rows:
        mean, sd = row["test_neg_elbo_per_step_mean"], row["test_neg_elbo_per_step_sd"]
        if mean is None:
            score = "–"
        elif sd is None:
            score = f"{mean:.3f}"
        else:
            score = f"{mean:.3f} ± {sd:.3f}"
        seconds = row["wall_seconds_mean"]
        status = row["status"] if not row["error"] else f"{row['status']}: {row['error']}"
        cells = [str(row["rank"] or "–"), row["cell"], row["model"],
                 f"{row['guide']}, iaf {row['iaf']}", score, f"{row['seeds_done']}/{row['seeds']}",
                 "–" if seconds is None else f"{seconds:.1f} s", status]
        lines.append("| " + " | ".join(_markdown_cell(text) for text in cells) + " |")
    return "\n".join(lines) + "\n"


def _markdown_cell(text: str) -> str:
    text = " ".join(text.split())
    if len(text) > 160:
        text = text[:157] + "..."
    return text.replace("|", "\\|")


def cell_scores(rows: list[dict]) -> dict:
    """Map each cell to the best (lowest) mean score of the rows in it."""
    from taxonomy.hierarchy import parse_cell

    best: dict = {}
    for row in rows:
        mean = row["test_neg_elbo_per_step_mean"]
        if mean is None or row["cell"] in ("spec error", "outside the hierarchy"):
            continue
        cell = parse_cell(row["cell"])
        best[cell] = min(mean, best.get(cell, math.inf))
    return best


def draw_leaderboard(rows: list[dict], folder: Path) -> list[Path]:
    """Draw the hierarchy coloured by `cell_scores`, as SVG and PNG; skip when Graphviz is missing."""
    from taxonomy.render import draw_taxonomy

    scores = cell_scores(rows)
    specs = sorted({row["spec"] for row in rows if row["status"] != "failed"
                    and row["cell"] not in ("spec error", "outside the hierarchy")})
    written = []
    for name in HIERARCHY_PICTURES:
        path = folder / name
        try:
            draw_taxonomy(path, specs=specs, scores=scores, score_label=SCORE_LABEL)
        except DssmError as error:
            log.warning("the hierarchy picture was not drawn: %s", error)
            break
        written.append(path)
    return written
