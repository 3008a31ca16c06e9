"""Time compiled models against hand-written Pyro models of the same objective.

    python -m benchmarks.train_speed                 # one JSB epoch each, 2 runs each
    python -m benchmarks.train_speed --ablation      # what each part of the design buys
    python -m benchmarks.train_speed --scaling       # time against sequence length and batch size
    python -m benchmarks.train_speed --smoke         # one small batch, in this process (CI)

Each run of the full modes starts a fresh Python process, so that its peak
memory (the growth of ru_maxrss over the run on CPU, the peak of
torch.cuda.max_memory_allocated on CUDA) and its caches belong to it alone.
Runs of the implementations alternate (compiled, hand-written, compiled, ...)
so that a change of load on the machine falls on both, and the tables give
medians. Results go to stdout and, as Markdown, JSON and PNG, to --out.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent
RESULT_PREFIX = "RESULT "
IMPLEMENTATIONS = ("compiled", "handwritten")
# Two ladders, each turning one change on per row: from the per-step
# hand-written model towards the compiled design, and from the compiled model
# with every speed-up of runtime/blocks.py off to the compiled model as generated.
ABLATION_VARIANTS = (
    "handwritten",
    "handwritten+unbound",
    "handwritten+unbound+unpacked",
    "handwritten+unbound+unpacked+emission",
    "handwritten+unbound+unpacked+emission+x_rnn",
    "compiled-without:reuse,precomputed_combiner,skip_padding,cell_kernels,draw_arithmetic",
    "compiled-without:precomputed_combiner,skip_padding,cell_kernels,draw_arithmetic",
    "compiled-without:skip_padding,cell_kernels,draw_arithmetic",
    "compiled-without:cell_kernels,draw_arithmetic",
    "compiled-without:draw_arithmetic",
    "compiled",
)
SCALING_LENGTHS = (25, 50, 100, 200, 400)
SCALING_BATCH_SIZES = (10, 20, 50, 100)
# The batch size of the sequence-length study, and the sequence length of the
# batch-size study (about the mean length of a JSB chorale).
SCALING_BATCH_SIZE = 20
SCALING_LENGTH = 60
JSB_TRAIN_SEQUENCES = 229


class BenchmarkError(Exception):
    """A benchmark that cannot run: CUDA missing, an unknown model, a failed run."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.train_speed",
        description="Time one JSB training epoch of compiled models against hand-written "
                    "Pyro models with the same objective, and print compiled / hand-written.")
    parser.add_argument("--device", default="cpu",
                        help="cpu or cuda (or cuda:N); cuda fails when torch sees no GPU")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch intra-op threads of each run (default 2; 1 for --smoke)")
    parser.add_argument("--epochs", type=int, default=1,
                        help="timed training epochs per run (default 1)")
    parser.add_argument("--runs", type=int, default=None,
                        help="runs per implementation, alternating (default 2; 5 for "
                             "--ablation, 1 for --smoke)")
    parser.add_argument("--models", default="arssm",
                        help="comma-separated models to compare: arssm, srnn, vrnn, dmm "
                             "(default arssm; --ablation and --scaling use arssm)")
    parser.add_argument("--handwritten", default="handwritten",
                        help="the hand-written implementation to compare with, e.g. "
                             "handwritten+unbound+unpacked (changes exist for arssm only)")
    parser.add_argument("--batch-size", type=int, default=20,
                        help="sequences per mini-batch (default 20)")
    parser.add_argument("--batches", type=int, default=None,
                        help="time only this many batches per epoch (default: the whole "
                             "epoch; 8 for --ablation, 3 per point for --scaling)")
    parser.add_argument("--out", default=None,
                        help="folder for the Markdown, JSON and PNG results (default "
                             "docs/benchmarks, or nothing written for --smoke)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--smoke", action="store_true",
                      help="one small batch with small widths, in this process: checks that "
                           "the benchmark runs, says nothing about speed")
    mode.add_argument("--scaling", action="store_true",
                      help="time per epoch against sequence length and batch size")
    mode.add_argument("--ablation", action="store_true",
                      help="time guide, model and backward pass of variants between the "
                           "hand-written and the compiled model")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    for name in ("threads", "epochs", "runs", "batch_size", "batches"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, not {value}")
    if args.threads is None:
        # The smoke batch is tiny, and on a busy machine a second thread
        # spends far longer waiting for the first than computing.
        args.threads = 1 if args.smoke else 2
    return args


def check_device(name: str) -> None:
    """Raise BenchmarkError unless torch can use the device."""
    import torch

    if name == "cpu":
        return
    if not name.startswith("cuda"):
        raise BenchmarkError(f"unknown device {name!r}; use cpu or cuda")
    if not torch.cuda.is_available():
        raise BenchmarkError(
            f"--device {name} requested but CUDA is not available to torch {torch.__version__} "
            f"(torch.version.cuda is {torch.version.cuda}); run with --device cpu, or on a "
            f"machine with an NVIDIA GPU and a CUDA build of torch")


def describe_machine(device: str, threads: int) -> dict:
    """Return the device, processor, core count, threads and load average of this machine."""
    import torch

    if device.startswith("cuda"):
        label = torch.cuda.get_device_name(torch.device(device))
    else:
        label = _processor_name()
    return {
        "device": device,
        "label": label,
        "cores": os.cpu_count(),
        "threads": threads,
        "load_average": [round(load, 2) for load in os.getloadavg()],
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "unset"),
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def _processor_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine_line(machine: dict) -> str:
    return (f"{machine['label']} ({machine['device']}), {machine['cores']} cores, "
            f"{machine['threads']} torch threads, load average {machine['load_average']}, "
            f"OMP_WAIT_POLICY {machine['omp_wait_policy']}, torch {machine['torch']}")


# --- runs -------------------------------------------------------------------

def run_in_subprocess(job) -> dict:
    """Run one job in a fresh Python process and return its figures."""
    command = [sys.executable, "-m", "benchmarks.train_speed", "--worker",
               json.dumps(asdict(job))]
    finished = subprocess.run(command, cwd=REPOSITORY, capture_output=True, text=True)
    for line in reversed(finished.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line.removeprefix(RESULT_PREFIX))
    raise BenchmarkError(f"the run {job.implementation} ({job.mode}) failed with exit code "
                         f"{finished.returncode}:\n{finished.stderr.strip()[-3000:]}")


def run_worker(job_json: str) -> None:
    from benchmarks.measure import Job, run_job

    result = run_job(Job(**json.loads(job_json)))
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def alternate(jobs: list, runs: int, run) -> list[dict]:
    """Run every job `runs` times, in the order job 1, job 2, ..., job 1, job 2, ..."""
    results = []
    for repeat in range(runs):
        for job in jobs:
            result = run(job)
            result["repeat"] = repeat + 1
            results.append(result)
            print(result_line(result, repeat + 1, runs), flush=True)
    return results


def result_line(result: dict, repeat: int, runs: int) -> str:
    name = f"{result['pair']} {result['implementation']}"
    if result["mode"] == "phases":
        phases = "  ".join(f"{phase} {seconds:6.2f} s"
                           for phase, seconds in result["phase_seconds"].items())
        return f"{name:<46} run {repeat}/{runs}  {phases}  total {result['seconds']:6.2f} s"
    return (f"{name:<28} run {repeat}/{runs}  {result['seconds_per_epoch']:8.2f} s/epoch  "
            f"{result['sequences_per_second']:7.2f} seq/s  "
            f"peak +{result['peak_memory_bytes'] / 2**20:7.1f} MiB  "
            f"loss/step {result['loss_per_step']:8.4f}")


def median_of(results: list[dict], key) -> float:
    return statistics.median(key(result) for result in results)


# --- the speed comparison ------------------------------------------------------

def compare(args, machine: dict, run) -> tuple[str, dict]:
    """Train each implementation and return the Markdown table and the figures."""
    from benchmarks.measure import Job

    runs = args.runs or (1 if args.smoke else 2)
    tables, figures = [], {}
    for pair in args.models.split(","):
        base = Job(pair=pair, device=args.device, threads=args.threads, epochs=args.epochs,
                   batch_size=4 if args.smoke else args.batch_size, max_batches=args.batches,
                   smoke=args.smoke)
        implementations = ("compiled", args.handwritten)
        jobs = [replace(base, implementation=name) for name in implementations]
        results = alternate(jobs, runs, run)
        summary = summarise(results, implementations)
        figures[pair] = {"runs": results, "summary": summary}
        tables.append(comparison_table(pair, summary, implementations, runs))
        ratio = summary["ratio"]
        print(f"{pair}: ratio compiled / hand-written, median seconds per epoch: "
              f"{ratio:.3f} ({1 / ratio:.2f}x faster)", flush=True)
    header = (f"Machine: {machine_line(machine)}.\n\n"
              f"Data: {figures[pair]['runs'][0]['data']}; batch {base.batch_size}, "
              f"Trace_ELBO, Adam lr 3e-4, gradient norm clipped at 10.\n")
    return header + "\n" + "\n\n".join(tables) + "\n", figures


def summarise(results: list[dict], implementations: tuple[str, str]) -> dict:
    summary = {}
    for name in implementations:
        own = [result for result in results if result["implementation"] == name]
        summary[name] = {
            "seconds_per_epoch": median_of(own, lambda r: r["seconds_per_epoch"]),
            "cpu_seconds_per_epoch": median_of(own, lambda r: r["cpu_seconds"] / r["epochs"]),
            "sequences_per_second": median_of(own, lambda r: r["sequences_per_second"]),
            "peak_memory_mib": median_of(own, lambda r: r["peak_memory_bytes"] / 2**20),
            "loss_per_step": median_of(own, lambda r: r["loss_per_step"]),
            "all_seconds_per_epoch": [r["seconds_per_epoch"] for r in own],
        }
    compiled, handwritten = (summary[name] for name in implementations)
    summary["ratio"] = compiled["seconds_per_epoch"] / handwritten["seconds_per_epoch"]
    summary["cpu_ratio"] = compiled["cpu_seconds_per_epoch"] / handwritten["cpu_seconds_per_epoch"]
    return summary


def comparison_table(pair: str, summary: dict, implementations: tuple[str, str],
                     runs: int) -> str:
    lines = [
        f"**{pair}**, median of {runs} runs each "
        f"(compiled / hand-written = **{summary['ratio']:.2f}** in wall-clock time, "
        f"{summary['cpu_ratio']:.2f} in CPU time):",
        "",
        "| implementation | s/epoch (runs) | CPU s/epoch | sequences/s | peak memory MiB "
        "| loss per step |",
        "|---|---|---|---|---|---|",
    ]
    for name in implementations:
        row = summary[name]
        each = ", ".join(f"{seconds:.1f}" for seconds in row["all_seconds_per_epoch"])
        lines.append(f"| {name} | {row['seconds_per_epoch']:.1f} ({each}) "
                     f"| {row['cpu_seconds_per_epoch']:.1f} | {row['sequences_per_second']:.2f} "
                     f"| {row['peak_memory_mib']:.0f} | {row['loss_per_step']:.3f} |")
    return "\n".join(lines)


# --- the ablation ----------------------------------------------------------------

def ablation(args, machine: dict, run) -> tuple[str, dict]:
    """Time the phases of each variant and return the Markdown table and the figures."""
    from benchmarks.measure import Job

    runs = args.runs or 5
    batches = args.batches or 8
    base = Job(pair="arssm", mode="phases", device=args.device, threads=args.threads,
               batch_size=args.batch_size, max_batches=batches)
    results = alternate([replace(base, implementation=name) for name in ABLATION_VARIANTS],
                        runs, run)
    return ablation_table(results, machine), {"runs": results}


def ablation_table(results: list[dict], machine: dict) -> str:
    """Return the ablation's Markdown: medians per phase, and the median and minimum totals.

    Compiled variants are labelled by the speed-up each adds to the row above.
    """
    from benchmarks import ablation as variants

    phases = ("guide", "model", "log_prob", "backward")
    first = results[0]
    runs = max(result["repeat"] for result in results)
    baseline = median_of([r for r in results if r["implementation"] == "handwritten"],
                         lambda r: r["seconds"])
    lines = [
        f"Machine: {machine_line(machine)}.\n",
        f"Seconds for the same {first['max_batches']} JSB batches of {first['batch_size']} "
        f"(the first of a shuffled epoch), median of {runs} runs each, runs alternating "
        "between variants. Guide: the guide's forward pass; model: the model replayed on "
        "the guide's draw; log-prob: both log-density sums; backward: the gradient of the "
        "ELBO. The minimum over runs is the least disturbed by other work on the machine.\n",
        "| variant | guide | model | log-prob | backward | total | min total "
        "| total / hand-written |",
        "|---|---|---|---|---|---|---|---|",
    ]
    previous = None
    for name in ABLATION_VARIANTS:
        own = [result for result in results if result["implementation"] == name]
        if not own:
            continue
        label = variants.describe(name)
        base, changes = variants.parse(name)
        if base == "compiled":
            changes = tuple(speedup for speedup in variants.SPEEDUPS if speedup not in changes)
        if previous is not None and previous[0] == base and len(changes) == len(previous[1]) + 1:
            added = [change for change in changes if change not in previous[1]]
            label = f"{'compiled' if base == 'compiled' else 'hand-written'}, + {added[0]}"
        previous = (base, changes)
        total = median_of(own, lambda r: r["seconds"])
        lines.append(f"| {label} | " + " | ".join(
            f"{median_of(own, lambda r: r['phase_seconds'][phase]):.2f}" for phase in phases)
            + f" | {total:.2f} | {min(r['seconds'] for r in own):.2f} "
            f"| {total / baseline:.2f} |")
    lines.append("")
    from benchmarks.handwritten_arssm import CHANGES

    lines += [f"- {name}: {meaning}." for name, meaning in {**CHANGES, **variants.SPEEDUPS}.items()]
    return "\n".join(lines) + "\n"


# --- the scaling study -------------------------------------------------------------

def scaling(args, machine: dict, run) -> tuple[str, dict]:
    """Time batches at each sequence length and batch size; return the table and the figures."""
    from benchmarks.measure import Job

    runs = args.runs or 2
    batches = args.batches or 3
    points = ([("length", length, SCALING_BATCH_SIZE, length) for length in SCALING_LENGTHS]
              + [("batch", size, size, SCALING_LENGTH) for size in SCALING_BATCH_SIZES])
    figures = {"length": {}, "batch": {}, "batches": batches, "runs": runs}
    for study, value, batch_size, length in points:
        base = Job(pair="arssm", device=args.device, threads=args.threads,
                   batch_size=batch_size, sequence_length=length, max_batches=batches)
        results = alternate([replace(base, implementation=name) for name in IMPLEMENTATIONS],
                            runs, run)
        batches_per_epoch = math.ceil(JSB_TRAIN_SEQUENCES / batch_size)
        figures[study][value] = {
            name: median_of([r for r in results if r["implementation"] == name],
                            lambda r: statistics.median(r["batch_seconds"])) * batches_per_epoch
            for name in IMPLEMENTATIONS}
    note = (f"Seconds per epoch of {JSB_TRAIN_SEQUENCES} JSB training sequences, each cropped "
            f"or tiled to the same length: the median time of {batches} timed batches (after "
            f"one warm-up batch) times the batches in an epoch, median of {runs} run(s). "
            f"Machine: {machine_line(machine)}.")
    return scaling_table(figures, note), figures


def scaling_table(figures: dict, note: str) -> str:
    lines = [note, "", f"Sequence length T at batch size {SCALING_BATCH_SIZE}:", "",
             "| T | compiled s/epoch | hand-written s/epoch | compiled / hand-written "
             "| compiled ms per step of a sequence |", "|---|---|---|---|---|"]
    for length, row in figures["length"].items():
        per_step = 1000 * row["compiled"] / (JSB_TRAIN_SEQUENCES * length)
        lines.append(f"| {length} | {row['compiled']:.1f} | {row['handwritten']:.1f} "
                     f"| {row['compiled'] / row['handwritten']:.2f} | {per_step:.3f} |")
    lines += ["", f"Batch size at T = {SCALING_LENGTH}:", "",
              "| batch | compiled s/epoch | hand-written s/epoch | compiled / hand-written |",
              "|---|---|---|---|"]
    for size, row in figures["batch"].items():
        lines.append(f"| {size} | {row['compiled']:.1f} | {row['handwritten']:.1f} "
                     f"| {row['compiled'] / row['handwritten']:.2f} |")
    return "\n".join(lines) + "\n"


def plot_scaling(figures: dict, machine: dict, path: Path) -> None:
    """Draw seconds per epoch against T and against batch size, both implementations."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    fig, (by_length, by_batch) = plt.subplots(1, 2, figsize=(10, 4.2))
    labels = {"compiled": "compiled", "handwritten": "hand-written"}
    for name, marker in zip(IMPLEMENTATIONS, ("o", "s")):
        lengths = list(figures["length"])
        by_length.plot(lengths, [figures["length"][t][name] for t in lengths],
                       marker=marker, label=labels[name])
        sizes = list(figures["batch"])
        by_batch.plot(sizes, [figures["batch"][b][name] for b in sizes],
                      marker=marker, label=labels[name])

    # A line through the compiled model's first point with slope 1 on log axes:
    # cost exactly proportional to T.
    first = min(figures["length"])
    reference = figures["length"][first]["compiled"]
    lengths = sorted(figures["length"])
    by_length.plot(lengths, [reference * t / first for t in lengths], "k:", linewidth=1,
                   label="proportional to T")
    by_length.set(xscale="log", yscale="log", xlabel="sequence length T",
                  ylabel="seconds per epoch", title=f"batch size {SCALING_BATCH_SIZE}")
    by_batch.set(xscale="log", yscale="log", xlabel="batch size",
                 ylabel="seconds per epoch", title=f"T = {SCALING_LENGTH}")
    for axes, values in ((by_length, lengths), (by_batch, sorted(figures["batch"]))):
        axes.set_xticks(values)
        axes.xaxis.set_major_formatter(ScalarFormatter())
        axes.xaxis.set_minor_formatter(NullFormatter())
        axes.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        axes.yaxis.set_major_formatter(ScalarFormatter())
        axes.yaxis.set_minor_formatter(NullFormatter())
        axes.grid(True, which="major", alpha=0.3)
        axes.legend()
    fig.suptitle(f"ArSSM training time on {machine['label']} ({machine['device']}, "
                 f"{machine['threads']} threads), median of {figures['batches']} batches "
                 f"per point and of {figures['runs']} run(s)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


# --- entry point ---------------------------------------------------------------------

def write_results(out: Path, stem: str, markdown: str, figures: dict, machine: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}.md").write_text(markdown, encoding="utf-8")
    (out / f"{stem}.json").write_text(
        json.dumps({"machine": machine, "figures": figures}, indent=1, default=str) + "\n",
        encoding="utf-8")
    print(f"wrote {out / stem}.md and .json", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.worker:
        run_worker(args.worker)
        return 0

    from benchmarks.measure import PAIRS, run_job

    try:
        check_device(args.device)
        unknown = [name for name in args.models.split(",") if name not in PAIRS]
        if unknown:
            raise BenchmarkError(f"no hand-written model for {', '.join(unknown)}; "
                                 f"available: {', '.join(PAIRS)}")
        if args.smoke:
            # Everything in this process: CI checks that the pipeline runs.
            return _finish(args, "train_speed-smoke", compare, run_job, write=False)
        if args.ablation:
            return _finish(args, f"ablation-{_device_stem(args.device)}", ablation,
                           run_in_subprocess)
        if args.scaling:
            return _finish(args, f"scaling-{_device_stem(args.device)}", scaling,
                           run_in_subprocess)
        stem = f"train_speed-{_device_stem(args.device)}"
        if args.handwritten != "handwritten":
            stem += "-" + args.handwritten.replace("+", "-")
        return _finish(args, stem, compare, run_in_subprocess)
    except BenchmarkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _device_stem(device: str) -> str:
    return device.split(":")[0]


def _finish(args, stem: str, study, run, write: bool = True) -> int:
    machine = describe_machine(args.device, args.threads)
    print(f"# {machine_line(machine)}", flush=True)
    started = time.perf_counter()
    markdown, figures = study(args, machine, run)
    machine["load_average_after"] = [round(load, 2) for load in os.getloadavg()]
    machine["benchmark_seconds"] = round(time.perf_counter() - started, 1)
    print(markdown, flush=True)

    if args.out:
        out = Path(args.out)
    elif write:
        out = REPOSITORY / "docs" / "benchmarks"
    else:
        out = None
    if out is not None:
        write_results(out, stem, markdown, figures, machine)
        if args.scaling:
            plot_scaling(figures, machine, out / f"{stem}.png")
            print(f"wrote {out / stem}.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
