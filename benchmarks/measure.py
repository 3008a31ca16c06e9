"""One benchmark run: build one implementation, train or trace it on JSB, and time it.

`run_job(job)` does the work of one run and returns its figures as a dict.
`benchmarks.train_speed` starts each run in a fresh Python process, so that
its peak memory and its torch state belong to that run alone.
"""

from __future__ import annotations

import contextlib
import copy
import importlib
import math
import resource
import sys
import time
from dataclasses import asdict, dataclass

import numpy as np
import pyro
import torch
from pyro import poutine
from pyro.infer import Trace_ELBO

from runtime.data import DataError, SequenceData, load_dataset
from runtime.trainer import ClippedSVI, annealing_factor
from taxonomy.build import build_model

# The training protocol for music: Adam at 3e-4, the global gradient norm
# clipped at 10, and the annealing factor rising from 0.2 over 100 epochs.
LEARNING_RATE = 3e-4
CLIP_NORM = 10.0
ANNEAL_EPOCHS = 100
MIN_ANNEAL = 0.2

# Sizes of the smoke run: small enough for CI, with the spec's RNN widths.
SMOKE_SIZES = {"z_dim": 16, "mlp": 16, "inference": 32}


@dataclass(frozen=True)
class ModelPair:
    """A compiled model and its hand-written Pyro counterpart with the same objective.

    :param str spec: the spec file the compiled model comes from.
    :param str handwritten: the module holding `Model` and `copy_compiled_parameters`.
    """

    spec: str
    handwritten: str


PAIRS = {
    "arssm": ModelPair("specs/arssm.dssm", "benchmarks.handwritten_arssm"),
    "srnn": ModelPair("specs/srnn.dssm", "benchmarks.handwritten_srnn"),
    "vrnn": ModelPair("specs/vrnn.dssm", "benchmarks.handwritten_vrnn"),
    "dmm": ModelPair("specs/dmm.dssm", "benchmarks.handwritten_dmm"),
}


@dataclass
class Job:
    """The settings of one run.

    :param str pair: a key of PAIRS.
    :param str implementation: "compiled" or "handwritten", optionally with
        ablation changes (see `benchmarks.ablation`).
    :param str mode: "train" (SVI steps, the benchmark proper) or "phases"
        (guide, model and backward pass timed apart, no optimizer step).
    :param int max_batches: batches per epoch to time, or None for the whole epoch.
    :param int sequence_length: crop or tile every sequence to this length, or None.
    :param bool smoke: one batch of `batch_size` sequences cut to 16 steps, and
        small latent, MLP and inference widths (SMOKE_SIZES).
    """

    pair: str = "arssm"
    implementation: str = "compiled"
    mode: str = "train"
    device: str = "cpu"
    threads: int = 2
    epochs: int = 1
    batch_size: int = 20
    warmup_batches: int = 1
    max_batches: int | None = None
    sequence_length: int | None = None
    smoke: bool = False
    seed: int = 0


def peak_memory_bytes(device: torch.device) -> int:
    """Return this process's peak memory: resident set on CPU, allocated tensors on CUDA."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and in bytes on macOS.
    return peak if sys.platform == "darwin" else peak * 1024


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that a clock read after it includes that work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def crop_or_tile(data: SequenceData, length: int) -> SequenceData:
    """Return every sequence repeated end to end as often as needed and cut to `length` steps."""
    sequences = []
    for i in range(len(data)):
        roll = data[i]
        repeats = math.ceil(length / len(roll))
        sequences.append(np.concatenate([roll] * repeats)[:length])
    return SequenceData(sequences, data.names, data.x_dim)


def random_rolls(count: int, length: int, keys: int = 88, seed: int = 0) -> SequenceData:
    """Return random binary piano rolls, for a smoke run where JSB is not available."""
    generator = np.random.default_rng(seed)
    rolls = [(generator.random((length, keys)) < 0.05).astype(np.float32) for _ in range(count)]
    return SequenceData(rolls, [f"random[{i}]" for i in range(count)], keys)


def training_data(job: Job) -> tuple[SequenceData, str]:
    """Return the training sequences of a job and a one-line description of them."""
    if job.smoke:
        # One small batch: the first sequences, cropped to a few steps.
        try:
            train = load_dataset("jsb").train
            source = "JSB"
        except DataError:
            train = random_rolls(job.batch_size, 16, seed=job.seed)
            source = "random piano rolls (JSB not found)"
        subset = [train[i][:16] for i in range(job.batch_size)]
        return SequenceData(subset, train.names[:job.batch_size], train.x_dim), \
            f"{source}, {job.batch_size} sequences of at most 16 steps"

    train = load_dataset("jsb").train
    if job.sequence_length is None:
        return train, "JSB train split"
    return crop_or_tile(train, job.sequence_length), \
        f"JSB train split, each sequence cropped or tiled to {job.sequence_length} steps"


def build_implementation(job: Job, x_dim: int) -> torch.nn.Module:
    """Build the job's model on the CPU; the hand-written one gets the compiled one's weights.

    Both start from the same parameters: the compiled model is built after
    seeding torch, and its weights are copied into the hand-written model.
    """
    from benchmarks import ablation

    pair = PAIRS[job.pair]
    sizes = {"x_dim": x_dim, **(SMOKE_SIZES if job.smoke else {})}
    base, changes = ablation.parse(job.implementation)

    torch.manual_seed(job.seed)
    compiled = build_model(pair.spec, guide="full", **sizes)
    if base == "compiled":
        return compiled

    handwritten_module = importlib.import_module(pair.handwritten)
    handwritten = handwritten_module.Model(**sizes, changes=changes)
    handwritten_module.copy_compiled_parameters(compiled, handwritten)
    return handwritten


def run_job(job: Job) -> dict:
    """Do one run and return its figures (see `_train` and `_phases` for the keys)."""
    device = torch.device(job.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("CUDA was requested but torch.cuda.is_available() is False")
    torch.set_num_threads(job.threads)
    pyro.clear_param_store()
    pyro.set_rng_seed(job.seed)

    train, data_description = training_data(job)
    model = build_implementation(job, train.x_dim).to(device)
    with ablation_context(job):
        if job.mode == "phases":
            figures = _phases(job, model, train, device)
        else:
            figures = _train(job, model, train, device)
    return {**asdict(job), **figures, "data": data_description,
            "torch_threads": torch.get_num_threads()}


def ablation_context(job: Job):
    from benchmarks import ablation

    base, changes = ablation.parse(job.implementation)
    if base != "compiled":
        return contextlib.nullcontext()
    return ablation.patched_blocks(changes)


def _batches(job: Job, train: SequenceData, epoch: int, device: torch.device):
    generator = torch.Generator().manual_seed(job.seed + epoch)
    batches = list(train.batches(job.batch_size, shuffle=True, generator=generator))
    if job.max_batches is not None:
        batches = batches[:job.max_batches]
    return [batch.to(device) for batch in batches]


def _train(job: Job, model, train: SequenceData, device: torch.device) -> dict:
    """Train with SVI and return seconds, sequences per second, peak memory and loss per step.

    The warm-up takes SVI steps on the first batches, so that one-time
    costs fall outside the timing (the first SVI step of a fresh process
    took about 2 s more than the next on the machine of docs/benchmarks.md). The parameters are then reset and a fresh optimizer made, so
    the timed epoch starts from the initial parameters.
    """
    elbo = Trace_ELBO(max_plate_nesting=1)
    epochs = [_batches(job, train, epoch, device) for epoch in range(job.epochs)]
    batches_per_epoch = math.ceil(len(train) / job.batch_size)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    memory_before = peak_memory_bytes(device) if device.type != "cuda" else 0
    initial = copy.deepcopy(model.state_dict())
    warmup = ClippedSVI(model.model, model.guide, pyro.optim.Adam({"lr": LEARNING_RATE}), elbo,
                        CLIP_NORM)
    for batch in epochs[0][:job.warmup_batches]:
        warmup.step(batch.x, batch.mask, MIN_ANNEAL)
    model.load_state_dict(initial)
    svi = ClippedSVI(model.model, model.guide, pyro.optim.Adam({"lr": LEARNING_RATE}), elbo,
                     CLIP_NORM)

    total_loss, total_steps, sequences = 0.0, 0, 0
    batch_seconds = []
    synchronize(device)
    wall_start, cpu_start = time.perf_counter(), time.process_time()
    for epoch, batches in enumerate(epochs):
        for index, batch in enumerate(batches):
            batch_start = time.perf_counter()
            factor = annealing_factor(epoch, index, batches_per_epoch, ANNEAL_EPOCHS, MIN_ANNEAL)
            total_loss += svi.step(batch.x, batch.mask, factor)
            total_steps += int(batch.mask.sum())
            sequences += len(batch.x)
            synchronize(device)
            batch_seconds.append(time.perf_counter() - batch_start)
    wall = time.perf_counter() - wall_start
    cpu = time.process_time() - cpu_start

    return {
        "seconds": wall,
        "cpu_seconds": cpu,
        "seconds_per_epoch": wall / job.epochs,
        "batch_seconds": batch_seconds,
        "sequences": sequences,
        "batches": sum(len(batches) for batches in epochs),
        "sequences_per_second": sequences / wall,
        "loss_per_step": total_loss / total_steps,
        "peak_memory_bytes": peak_memory_bytes(device) - memory_before,
    }


def _phases(job: Job, model, train: SequenceData, device: torch.device) -> dict:
    """Time the guide, the model, the log-density sums and the backward pass apart.

    Each is wall-clock time summed over the job's batches after the warm-up.
    No optimizer step is taken, so every run uses the same parameters.
    """
    batches = _batches(job, train, 0, device)
    for batch in batches[:job.warmup_batches]:
        _phase_times(model, batch, device)
    totals = {"guide": 0.0, "model": 0.0, "log_prob": 0.0, "backward": 0.0}
    cpu_start = time.process_time()
    for batch in batches:
        for phase, seconds in _phase_times(model, batch, device).items():
            totals[phase] += seconds
    return {"phase_seconds": totals, "seconds": sum(totals.values()),
            "cpu_seconds": time.process_time() - cpu_start, "batches": len(batches)}


def _phase_times(model, batch, device: torch.device) -> dict[str, float]:
    clock = [time.perf_counter()]

    def lap() -> float:
        synchronize(device)
        clock.append(time.perf_counter())
        return clock[-1] - clock[-2]

    guide_trace = poutine.trace(model.guide).get_trace(batch.x, batch.mask, MIN_ANNEAL)
    guide_seconds = lap()
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
        batch.x, batch.mask, MIN_ANNEAL)
    model_seconds = lap()
    loss = guide_trace.log_prob_sum() - model_trace.log_prob_sum()
    log_prob_seconds = lap()
    loss.backward()
    backward_seconds = lap()
    model.zero_grad(set_to_none=True)
    return {"guide": guide_seconds, "model": model_seconds, "log_prob": log_prob_seconds,
            "backward": backward_seconds}
