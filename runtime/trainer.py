"""The training loop shared by all compiled models.

`train(model, data, config, run_dir)` fits a compiled model (an nn.Module
with Pyro `model(x, mask, annealing_factor)` and `guide(...)` methods) by
stochastic variational inference with KL annealing, and writes a run
directory:

- config.json: the resolved `TrainConfig`.
- metrics.jsonl: one JSON object per epoch with epoch, train_loss_per_step,
  valid_neg_elbo_per_step, seconds, annealing_factor, lr and failures.
- checkpoint-last.pt, checkpoint-best.pt: everything needed to resume.
- summary.json: best and final figures; `update_summary` adds keys later.
- train.log: the per-epoch lines and every recovery from a non-finite loss.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyro
import torch
from pyro import poutine
from pyro.infer import (SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO,
                        TraceMeanField_ELBO)
from pyro.infer.util import zero_grads
from tqdm import tqdm

from runtime.blocks import set_dropout
from runtime.checkpoint import (CheckpointError, capture_parameters, capture_rng_states,
                                copy_optimizer_state, initialize_parameters,
                                load_checkpoint, restore_parameters, restore_rng_states,
                                save_checkpoint)
from taxonomy.errors import DssmError
from taxonomy.writing import write_text_atomically

log = logging.getLogger("dssm.trainer")

ELBOS = {
    "trace": Trace_ELBO,
    "meanfield": TraceMeanField_ELBO,
    "jit-trace": JitTrace_ELBO,
    "jit-meanfield": JitTraceMeanField_ELBO,
}

# The protocol's learning rate and smallest annealing factor per data family:
# 3e-4 and 0.2 for polyphonic music, 1e-3 and 0.001 for speech.
FAMILY_DEFAULTS = {
    "music": {"lr": 3e-4, "min_anneal": 0.2},
    "speech": {"lr": 1e-3, "min_anneal": 0.001},
}
# `Dataset.family` names the emission family; each belongs to one data family.
# Real-valued data (synthetic:SPEC with a normal emission) takes the speech defaults.
EMISSION_FAMILIES = {"bernoulli": "music", "exponential": "speech", "normal": "speech"}

CONFIG_FILE = "config.json"
METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
LOG_FILE = "train.log"
LAST_CHECKPOINT = "checkpoint-last.pt"
BEST_CHECKPOINT = "checkpoint-best.pt"


class TrainingError(DssmError):
    """A training run that cannot start, resume or go on (invalid options, repeated NaN)."""


@dataclass
class TrainConfig:
    """Options of one training run, as `config.json` stores them.

    :param str family: "music" or "speech"; sets the defaults of `default_config`.
    :param str dataset: the data set's name for `runtime.data.load_dataset`, or None.
    :param str spec: the spec file the model was compiled from, or None.
    :param int epochs: the number of passes over the training split.
    :param int batch_size: sequences per mini-batch.
    :param float lr: Adam's learning rate at the start.
    :param float clip_norm: the largest norm of the gradient of all parameters together.
    :param float weight_decay: decoupled weight decay (AdamW) per unit of learning
        rate; 0 keeps plain Adam.
    :param float dropout: the dropout rate on the features entering the
        transition and emission heads during training, in [0, 1). The paper-sized
        ArSSM overfits JSB Chorales without it.
    :param int anneal_epochs: the epochs over which the annealing factor rises
        linearly from `min_anneal` to 1; 0 turns annealing off.
    :param float min_anneal: the annealing factor of the first mini-batch.
    :param str guide: the guide's alignment ("partial" or "full"); read by the
        code that builds the model, not by the trainer.
    :param int iaf: the number of inverse autoregressive flow layers in the
        guide; read by the code that builds the model.
    :param str elbo: "trace", "meanfield", "jit-trace" or "jit-meanfield".
    :param int seed: seeds torch, numpy, Python's `random` and the batch order.
    :param str device: "cpu", "cuda" or "auto" (cuda when available).
    :param int threads: torch's intra-op thread count, or None to keep torch's default.
    :param bool resume: carry on from `checkpoint-last.pt` in the run directory.
    :param int max_failures: the number of non-finite losses after which
        training stops; each earlier one restores the last good state and
        halves the learning rate.
    :param int snapshot_every: mini-batches between in-memory copies of the
        last good state; one is also taken at the start of each epoch.
    """

    family: str = "music"
    dataset: str | None = None
    spec: str | None = None
    epochs: int = 500
    batch_size: int = 20
    lr: float = 3e-4
    clip_norm: float = 10.0
    weight_decay: float = 0.0
    dropout: float = 0.0
    anneal_epochs: int = 100
    min_anneal: float = 0.2
    guide: str = "partial"
    iaf: int = 0
    elbo: str = "trace"
    seed: int = 0
    device: str = "auto"
    threads: int | None = None
    resume: bool = False
    max_failures: int = 3
    snapshot_every: int = 50

    def validate(self) -> None:
        """Raise TrainingError naming the first option with an invalid value."""
        positive = {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr,
                    "clip_norm": self.clip_norm, "max_failures": self.max_failures,
                    "snapshot_every": self.snapshot_every}
        for name, value in positive.items():
            if not value > 0:
                raise TrainingError(f"invalid {name} {value!r}: it must be positive")
        if not self.weight_decay >= 0:
            raise TrainingError(f"invalid weight_decay {self.weight_decay!r}: "
                                f"it must be 0 (none) or positive")
        if not 0 <= self.dropout < 1:
            raise TrainingError(f"invalid dropout {self.dropout!r}: it must be in [0, 1)")
        if self.anneal_epochs < 0:
            raise TrainingError(f"invalid anneal_epochs {self.anneal_epochs!r}: "
                                f"it must be 0 (no annealing) or positive")
        if not 0 < self.min_anneal <= 1:
            raise TrainingError(f"invalid min_anneal {self.min_anneal!r}: "
                                f"it must be in (0, 1]")
        if self.elbo not in ELBOS:
            raise TrainingError(f"unknown elbo '{self.elbo}'; choose one of {', '.join(ELBOS)}")
        if self.device not in ("cpu", "cuda", "auto") and not self.device.startswith("cuda:"):
            raise TrainingError(f"unknown device '{self.device}'; choose cpu, cuda or auto")
        if self.threads is not None and self.threads < 1:
            raise TrainingError(f"invalid threads {self.threads!r}: it must be at least 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build a config from `to_dict` output; unknown keys raise TrainingError."""
        known = {field.name for field in dataclasses.fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise TrainingError(f"unknown training options {unknown}; known: {sorted(known)}")
        return cls(**values)


@dataclass(frozen=True)
class TrainingResult:
    """The figures of a finished `train` call, also stored in summary.json.

    :param Path run_dir: the run directory.
    :param int epochs: the epochs completed, counting those before a resume.
    :param int best_epoch: the epoch of checkpoint-best.pt (1-based).
    :param float best_valid_neg_elbo_per_step: its validation negative ELBO per step.
    :param float final_train_loss_per_step: the last epoch's annealed training loss per step.
    :param float final_valid_neg_elbo_per_step: the last epoch's validation figure.
    :param float wall_seconds: training time in seconds, over all sessions of the run.
    """

    run_dir: Path
    epochs: int
    best_epoch: int | None
    best_valid_neg_elbo_per_step: float | None
    final_train_loss_per_step: float | None
    final_valid_neg_elbo_per_step: float | None
    wall_seconds: float


@dataclass(frozen=True)
class StepInfo:
    """Progress passed to a `train` callback after each optimizer step (epoch and batch count from 1)."""

    epoch: int
    batch: int
    loss_per_step: float
    annealing_factor: float
    lr: float


def default_config(dataset_family: str, **overrides: Any) -> TrainConfig:
    """Return the protocol's configuration for "music" or "speech", with `overrides` applied.

    The emission families of `runtime.data.Dataset.family` ("bernoulli",
    "exponential") are accepted too. Music: lr 3e-4, min_anneal 0.2;
    speech: lr 1e-3, min_anneal 0.001; both: batch 20, clip_norm 10,
    anneal_epochs 100.
    """
    family = EMISSION_FAMILIES.get(dataset_family, dataset_family)
    if family not in FAMILY_DEFAULTS:
        raise TrainingError(f"unknown data family '{dataset_family}'; choose music or speech")
    values = {"family": family, **FAMILY_DEFAULTS[family], **overrides}
    return TrainConfig.from_dict(values)


def annealing_factor(epoch: int, batch: int, batches_per_epoch: int,
                     anneal_epochs: int, min_anneal: float) -> float:
    """Return the KL annealing factor of a mini-batch (epoch and batch count from 0).

    It rises linearly from `min_anneal` at the first mini-batch and reaches
    1 at the last mini-batch of epoch `anneal_epochs`, then stays at 1.
    """
    if epoch >= anneal_epochs:
        return 1.0
    progress = (epoch * batches_per_epoch + batch + 1) / (anneal_epochs * batches_per_epoch)
    return min_anneal + (1.0 - min_anneal) * progress


def resolve_device(name: str) -> torch.device:
    """Turn "auto" into cuda when available, else cpu; reject cuda where there is none."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TrainingError(f"device '{name}' requested but CUDA is not available; "
                            f"use --device cpu or auto")
    return torch.device(name)


def update_summary(run_dir: str | Path, values: dict[str, Any]) -> dict[str, Any]:
    """Merge `values` into run_dir/summary.json, keeping its other keys; return the result."""
    path = Path(run_dir) / SUMMARY_FILE
    summary = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
    summary.update(values)
    write_text_atomically(path, json.dumps(summary, indent=1, allow_nan=False) + "\n")
    return summary


def describe_nonfinite(model, batch, annealing_factor: float = 1.0,
                       names: list[str] | None = None) -> str | None:
    """Name what makes the loss of `batch` non-finite, or return None when nothing is.

    Looks, in order, at the batch's x, at every parameter's value and
    gradient in Pyro's param store, and at each sample site of a fresh guide
    trace and the model replayed on it (sampled value, then log_prob).
    `names` maps a batch's `index` entries to sequence names for the message.
    """
    bad_rows = (~torch.isfinite(batch.x)).flatten(1).any(1)
    if bad_rows.any():
        indices = batch.index[bad_rows.to(batch.index.device)].tolist()
        labels = [names[i] if names is not None else str(i) for i in indices]
        return f"the data's x has non-finite values in sequences {', '.join(labels)}"

    for name, value in pyro.get_param_store().named_parameters():
        if not torch.isfinite(value).all():
            return f"parameter '{name}' has non-finite values"
        if value.grad is not None and not torch.isfinite(value.grad).all():
            return f"parameter '{name}' has a non-finite gradient"

    # Validation would raise at the first NaN distribution parameter; turned
    # off, the NaN reaches the log_prob of the site at fault.
    with torch.no_grad(), pyro.validation_enabled(False), poutine.block():
        guide_trace = poutine.trace(model.guide).get_trace(batch.x, batch.mask, annealing_factor)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
            batch.x, batch.mask, annealing_factor)
        for role, trace in (("guide", guide_trace), ("model", model_trace)):
            for name, site in trace.nodes.items():
                if site["type"] != "sample":
                    continue
                if not site["is_observed"] and not torch.isfinite(site["value"]).all():
                    return f"{role} site '{name}' sampled non-finite values"
                if not torch.isfinite(site["fn"].log_prob(site["value"])).all():
                    return f"{role} site '{name}' has a non-finite log_prob"
    return None


class _NonFiniteLoss(Exception):
    def __init__(self, problem: str):
        super().__init__(problem)
        self.problem = problem


def optimizer_state(optim) -> dict[str, Any]:
    """Return a PyroOptim's state by parameter name, including state not yet handed to a parameter.

    `PyroOptim.set_state` keeps the state of each parameter aside until that
    parameter's next step, and `get_state` leaves such state out. Without
    the merge, a state restored just before a checkpoint would be lost. The attribute
    read here is private to `pyro.optim.PyroOptim` (Pyro 1.9).
    """
    return {**getattr(optim, "_state_waiting_to_be_consumed", {}), **optim.get_state()}


class _Snapshot:
    """An in-memory copy of the last good parameters and optimizer state."""

    def __init__(self, model, optim, where: str):
        self.parameters = capture_parameters(model)
        self.optimizer = copy_optimizer_state(optimizer_state(optim))
        self.where = where


class ClippedSVI(SVI):
    """SVI whose step clips the gradient norm of all parameters together.

    Pyro's `SVI.step` applies the optimizer right after computing gradients,
    and `PyroOptim`'s clip arguments clip each parameter tensor on its own.
    This step instead checks the loss and the gradients for non-finite values,
    clips the global gradient norm to `clip_norm` as `torch.nn.utils.clip_grad_norm_`
    does, and only then updates the parameters.

    :param float clip_norm: the largest global gradient norm.
    """

    def __init__(self, model, guide, optim, loss, clip_norm: float):
        super().__init__(model, guide, optim, loss)
        self.clip_norm = clip_norm

    def step(self, *args, **kwargs) -> float:
        """Take one gradient step; raise _NonFiniteLoss without stepping when the loss or a gradient is non-finite."""
        with poutine.trace(param_only=True) as param_capture:
            loss = self.loss_and_grads(self.model, self.guide, *args, **kwargs)
        params = {site["value"].unconstrained() for site in param_capture.trace.nodes.values()}

        loss = float(loss)
        gradient_norm = torch.nn.utils.clip_grad_norm_(list(params), self.clip_norm)
        if not (math.isfinite(loss) and torch.isfinite(gradient_norm)):
            raise _NonFiniteLoss(f"loss {loss}, gradient norm {float(gradient_norm)}")

        self.optim(params)
        zero_grads(params)
        return loss


def train(model, data, config: TrainConfig, run_dir: str | Path, *,
          callback: Callable[[StepInfo], None] | None = None,
          progress: bool = True) -> TrainingResult:
    """Train `model` on `data.train`, validating on `data.valid` after every epoch.

    :param model: a compiled model (nn.Module with `model` and `guide`
        methods); its parameters must reach Pyro through `pyro.module` or
        `pyro.param`, as SVI requires. Pyro's param store is cleared first.
    :param data: an object with `train` and `valid` splits (`runtime.data.Dataset`);
        `valid` may be None or empty, and then the best checkpoint is the one
        with the lowest training loss.
    :param TrainConfig config: the options; `config.resume` continues the run
        in `run_dir` from checkpoint-last.pt.
    :param run_dir: the run directory, created when missing.
    :param callback: called after each optimizer step with a `StepInfo`; an
        exception it raises stops training as a kill would.
    :param bool progress: show a progress bar and the per-epoch lines on stderr.
    :raises TrainingError: for invalid options, a missing or existing run,
        or `config.max_failures` non-finite losses.
    """
    config.validate()
    return _Training(model, data, config, Path(run_dir), callback, progress).run()


class _Training:
    """Mutable state of one `train` call: counters, optimizer, snapshot and run files."""

    def __init__(self, model, data, config: TrainConfig, run_dir: Path, callback, progress):
        self.model = model
        self.config = config
        self.run_dir = run_dir
        self.callback = callback
        self.progress = progress
        self.device = resolve_device(config.device)

        self.train_data = data.train
        self.valid_data = getattr(data, "valid", None)
        if self.valid_data is not None and len(self.valid_data) == 0:
            self.valid_data = None
        if len(self.train_data) == 0:
            raise TrainingError("the training split has no sequences")
        self.batches_per_epoch = math.ceil(len(self.train_data) / config.batch_size)

        # Counters that checkpoints carry over a resume.
        self.epoch = 0
        self.lr = config.lr
        self.failures = 0
        self.best_score: float | None = None
        self.best_epoch: int | None = None
        self.wall_seconds = 0.0
        self.last_annealing_factor = config.min_anneal if config.anneal_epochs else 1.0
        self.last_row: dict[str, Any] | None = None

        self.batch_generator = torch.Generator()
        self.optim = self._make_optimizer(self.lr)
        self.svi_by_shape: dict[tuple, ClippedSVI] = {}
        self.snapshot: _Snapshot | None = None

    # Setup

    def run(self) -> TrainingResult:
        config = self.config
        if config.threads is not None:
            torch.set_num_threads(config.threads)
        self.run_dir.mkdir(parents=True, exist_ok=True)

        pyro.clear_param_store()
        self.model.to(self.device)
        pyro.set_rng_seed(config.seed)
        self.batch_generator.manual_seed(config.seed)

        if config.resume:
            self._resume()
        else:
            self._start()
        layers = set_dropout(self.model, config.dropout)
        if config.dropout and not layers:
            self._log(f"warning: dropout {config.dropout} has no effect, because the model "
                      f"has no dropout layers", level=logging.WARNING)

        self.session_started = time.perf_counter()
        self.previous_wall_seconds = self.wall_seconds
        while self.epoch < config.epochs:
            self._train_epoch()
            self._finish_epoch()
        return self._result()

    def _start(self) -> None:
        if (self.run_dir / LAST_CHECKPOINT).exists():
            raise TrainingError(f"{self.run_dir} already contains a run ({LAST_CHECKPOINT}); "
                                f"pass --resume to continue it, or choose another --out")
        # Creating every parameter now lets the first epoch's snapshot hold
        # them all, `pyro.param` sites included.
        first = next(iter(self.train_data.batches(1))).to(self.device)
        initialize_parameters(self.model, first.x, first.mask)

        # Files of an earlier start that never finished an epoch are replaced.
        (self.run_dir / BEST_CHECKPOINT).unlink(missing_ok=True)
        (self.run_dir / SUMMARY_FILE).unlink(missing_ok=True)
        self._write_config()
        write_text_atomically(self.run_dir / METRICS_FILE, "")
        (self.run_dir / LOG_FILE).write_text("", encoding="utf-8")
        update_summary(self.run_dir, {"run": self.run_dir.name, "seed": self.config.seed,
                                      "epochs": 0})

    def _resume(self) -> None:
        path = self.run_dir / LAST_CHECKPOINT
        if not path.exists():
            raise TrainingError(f"cannot resume: {path} not found, so no epoch of this run "
                                f"finished; remove {self.run_dir} and train without --resume, "
                                f"or choose another --out")
        try:
            checkpoint = load_checkpoint(path, self.device)
        except CheckpointError as error:
            raise TrainingError(f"cannot resume: {error}") from error
        self._warn_about_changed_options(checkpoint["config"])

        # Pyro creates parameters lazily; one pass on a batch creates them (and
        # their constraints) before the saved values are copied in.
        first = next(iter(self.train_data.batches(1))).to(self.device)
        initialize_parameters(self.model, first.x, first.mask)
        restore_parameters(self.model, checkpoint["parameters"])

        self.epoch = checkpoint["epoch"]
        self.lr = checkpoint["lr"]
        self.failures = checkpoint["failures"]
        self.best_score = checkpoint["best_score"]
        self.best_epoch = checkpoint["best_epoch"]
        self.wall_seconds = checkpoint["wall_seconds"]
        self.last_annealing_factor = checkpoint["annealing_factor"]
        self.last_row = checkpoint["last_row"]
        self.optim = self._make_optimizer(self.lr)
        self.optim.set_state(checkpoint["optimizer"])
        restore_rng_states(checkpoint["rng"], self.batch_generator)

        self._write_config()
        self._rewrite_metrics()
        self._log(f"resumed from {path} after epoch {self.epoch}")

    def _warn_about_changed_options(self, saved: dict[str, Any]) -> None:
        ignored = {"epochs", "resume", "device", "threads"}
        current = self.config.to_dict()
        changed = sorted(key for key in current
                         if key not in ignored and key in saved and saved[key] != current[key])
        if changed:
            self._log(f"warning: resuming with options changed since the checkpoint: "
                      f"{', '.join(f'{key} {saved[key]!r} -> {current[key]!r}' for key in changed)}",
                      level=logging.WARNING)

    def _write_config(self) -> None:
        resolved = {**self.config.to_dict(), "device": str(self.device)}
        write_text_atomically(self.run_dir / CONFIG_FILE, json.dumps(resolved, indent=1) + "\n")

    def _rewrite_metrics(self) -> None:
        """Make metrics.jsonl end at the checkpoint's epoch.

        A kill can leave a row after the checkpoint, or half a row. Rows up to
        the checkpoint's epoch are kept and the checkpoint's own row is
        rewritten from the copy the checkpoint carries.
        """
        path = self.run_dir / METRICS_FILE
        lines = path.read_text(encoding="utf-8").splitlines() if path.exists() else []
        rows = []
        for line in filter(str.strip, lines):
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                self._log(f"warning: dropped an unreadable line of {path}: {line[:60]!r}",
                          level=logging.WARNING)
        rows = [row for row in rows if row.get("epoch", math.inf) < self.epoch]
        if self.last_row is not None:
            rows.append(self.last_row)
        write_text_atomically(path, "".join(json.dumps(row, allow_nan=False) + "\n"
                                            for row in rows))

    def _make_optimizer(self, lr: float):
        if self.config.weight_decay:
            return pyro.optim.AdamW({"lr": lr, "weight_decay": self.config.weight_decay})
        return pyro.optim.Adam({"lr": lr})

    def _svi_for(self, batch) -> ClippedSVI:
        """Return the SVI object for the batch's shape.

        A JIT-compiled ELBO is traced once, for the shapes of its first call, and
        Pyro keys its cache on the number of arguments only, so the JIT
        variants keep one ELBO per (batch size, steps) shape. Each distinct
        shape compiles once.
        """
        jit = self.config.elbo.startswith("jit-")
        key = tuple(batch.x.shape) if jit else ()
        if key not in self.svi_by_shape:
            elbo = ELBOS[self.config.elbo](max_plate_nesting=self._max_plate_nesting(),
                                           **({"ignore_jit_warnings": True} if jit else {}))
            self.svi_by_shape[key] = ClippedSVI(self.model.model, self.model.guide, self.optim,
                                                elbo, self.config.clip_norm)
        svi = self.svi_by_shape[key]
        svi.optim = self.optim
        return svi

    def _max_plate_nesting(self) -> int:
        # Given explicitly, because Pyro otherwise guesses it by running the
        # model once, which draws random numbers and would make a resumed run
        # differ from an uninterrupted one.
        return getattr(self.model, "max_plate_nesting", 1)

    # The loop

    def _annealing_factor(self, batch_index: int) -> float:
        return annealing_factor(self.epoch, batch_index, self.batches_per_epoch,
                                self.config.anneal_epochs, self.config.min_anneal)

    def _train_epoch(self) -> None:
        config = self.config
        epoch_number = self.epoch + 1
        self.epoch_started = time.perf_counter()
        self.snapshot = _Snapshot(self.model, self.optim, f"the start of epoch {epoch_number}")
        self.model.train()

        total_loss, total_steps, sequences = 0.0, 0, 0
        batches = self.train_data.batches(config.batch_size, shuffle=True,
                                          generator=self.batch_generator)
        bar = tqdm(total=self.batches_per_epoch, desc=f"epoch {epoch_number}", unit="batch",
                   file=sys.stderr, leave=False, disable=not self.progress)
        with bar:
            for batch_index, batch in enumerate(batches):
                factor = self._annealing_factor(batch_index)
                self.last_annealing_factor = factor
                batch = batch.to(self.device)
                try:
                    loss = self._step(batch, factor)
                except _NonFiniteLoss as failure:
                    self._recover(failure.problem, f"epoch {epoch_number}, batch {batch_index + 1}")
                    bar.update()
                    continue

                steps = int(batch.mask.sum())
                total_loss += loss
                total_steps += steps
                sequences += len(batch.x)
                elapsed = time.perf_counter() - self.epoch_started
                bar.set_postfix(loss=f"{total_loss / max(total_steps, 1):.4f}",
                                seq_s=f"{sequences / max(elapsed, 1e-9):.1f}")
                bar.update()

                if (batch_index + 1) % config.snapshot_every == 0:
                    self.snapshot = _Snapshot(self.model, self.optim,
                                              f"epoch {epoch_number}, batch {batch_index + 1}")
                if self.callback is not None:
                    self.callback(StepInfo(epoch=epoch_number, batch=batch_index + 1,
                                           loss_per_step=loss / max(steps, 1),
                                           annealing_factor=factor, lr=self.lr))

        self.train_loss = total_loss / total_steps if total_steps else None

    def _step(self, batch, factor: float) -> float:
        svi = self._svi_for(batch)
        if self.config.elbo.startswith("jit-"):
            # A tensor argument is an input of the compiled trace; a float
            # would be baked into it as a constant.
            factor_argument = torch.tensor(factor, device=self.device)
        else:
            factor_argument = factor

        try:
            return svi.step(batch.x, batch.mask, factor_argument)
        except (_NonFiniteLoss, ValueError) as error:
            # Distribution validation raises ValueError on NaN parameters or
            # values. A ValueError with nothing non-finite behind it is a bug
            # in the model, so it goes to the caller unchanged.
            problem = describe_nonfinite(self.model, batch, factor, self._names(self.train_data))
            for _, value in pyro.get_param_store().named_parameters():
                value.grad = None
            if problem is None and isinstance(error, ValueError):
                raise
            raise _NonFiniteLoss(problem or f"no site or parameter is non-finite when "
                                            f"traced again ({error})") from error

    def _validate(self) -> float | None:
        """Return the validation negative ELBO per step (annealing factor 1), or None when non-finite."""
        if self.valid_data is None:
            return None
        elbo = ELBOS[self.config.elbo.removeprefix("jit-")](
            max_plate_nesting=self._max_plate_nesting())
        self.model.eval()
        total_loss, total_steps = 0.0, 0
        for batch_index, batch in enumerate(self.valid_data.batches(self.config.batch_size)):
            batch = batch.to(self.device)
            try:
                with torch.no_grad():
                    loss = float(elbo.loss(self.model.model, self.model.guide,
                                           batch.x, batch.mask, 1.0))
            except ValueError as error:
                loss = math.nan
                failure = error
            else:
                failure = None
            if not math.isfinite(loss):
                problem = describe_nonfinite(self.model, batch, 1.0, self._names(self.valid_data))
                if problem is None and failure is not None:
                    raise failure
                self._recover(problem or f"validation loss {loss}",
                              f"validation of epoch {self.epoch + 1}, batch {batch_index + 1}")
                return None
            total_loss += loss
            total_steps += int(batch.mask.sum())
        return total_loss / total_steps

    @staticmethod
    def _names(split) -> list[str] | None:
        return getattr(split, "names", None)

    def _recover(self, problem: str, where: str) -> None:
        """Restore the last good state and halve the learning rate, or stop after too many failures."""
        self.failures += 1
        message = f"non-finite loss at {where}: {problem}"
        if self.failures >= self.config.max_failures:
            self._log(f"error: {message}", level=logging.ERROR)
            raise TrainingError(
                f"{message}. Training stopped after {self.failures} non-finite losses; "
                f"{self.run_dir / LAST_CHECKPOINT} contains the last completed epoch. Check the "
                f"data for NaN or infinite values, or lower the learning rate (now {self.lr:.3g})")

        self.lr /= 2
        restore_parameters(self.model, self.snapshot.parameters)
        self.optim = self._make_optimizer(self.lr)
        self.optim.set_state(copy_optimizer_state(self.snapshot.optimizer, lr=self.lr))
        self._log(f"warning: {message}; restored the parameters of {self.snapshot.where} and "
                  f"halved the learning rate to {self.lr:.3g} "
                  f"(failure {self.failures} of {self.config.max_failures})",
                  level=logging.WARNING)

    def _finish_epoch(self) -> None:
        valid_loss = self._validate()
        self.model.train()
        self.epoch += 1

        score = valid_loss if self.valid_data is not None else self.train_loss
        improved = score is not None and (self.best_score is None or score < self.best_score)
        if improved:
            self.best_score = score
            self.best_epoch = self.epoch

        row = {"epoch": self.epoch, "train_loss_per_step": self.train_loss,
               "valid_neg_elbo_per_step": valid_loss,
               "seconds": time.perf_counter() - self.epoch_started,
               "annealing_factor": self.last_annealing_factor, "lr": self.lr,
               "failures": self.failures}
        self.last_row = row

        # Checkpoint first: a kill between the two writes leaves a metrics row
        # that the resume drops, never a checkpoint without its row.
        self.wall_seconds = (self.previous_wall_seconds
                             + time.perf_counter() - self.session_started)
        checkpoint = self._checkpoint()
        save_checkpoint(self.run_dir / LAST_CHECKPOINT, checkpoint)
        if improved:
            save_checkpoint(self.run_dir / BEST_CHECKPOINT, checkpoint)
        with open(self.run_dir / METRICS_FILE, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(row, allow_nan=False) + "\n")
        update_summary(self.run_dir, self._summary())

        self._log(self._epoch_line(row, improved))

    def _checkpoint(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "parameters": capture_parameters(self.model),
            "optimizer": optimizer_state(self.optim),
            "lr": self.lr,
            "failures": self.failures,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "wall_seconds": self.wall_seconds,
            "annealing_factor": self.last_annealing_factor,
            "last_row": self.last_row,
            "rng": capture_rng_states(self.batch_generator),
            "config": self.config.to_dict(),
        }

    # Reporting

    def _epoch_line(self, row: dict[str, Any], improved: bool) -> str:
        def number(value):
            return f"{value:10.4f}" if value is not None else f"{'-':>10}"

        return (f"epoch {row['epoch']:5d}  train {number(row['train_loss_per_step'])}  "
                f"valid {number(row['valid_neg_elbo_per_step'])}  "
                f"anneal {row['annealing_factor']:6.4f}  lr {row['lr']:9.3e}  "
                f"{row['seconds']:8.2f} s" + ("  best" if improved else ""))

    def _log(self, line: str, level: int = logging.INFO) -> None:
        log.log(level, line)
        if self.progress:
            tqdm.write(line, file=sys.stderr)
        with open(self.run_dir / LOG_FILE, "a", encoding="utf-8") as handle:
            handle.write(line + "\n")

    def _summary(self) -> dict[str, Any]:
        row = self.last_row or {}
        return {
            "run": self.run_dir.name,
            "seed": self.config.seed,
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "best_valid_neg_elbo_per_step": self.best_score if self.valid_data is not None else None,
            "final_train_loss_per_step": row.get("train_loss_per_step"),
            "final_valid_neg_elbo_per_step": row.get("valid_neg_elbo_per_step"),
            "wall_seconds": self.wall_seconds,
            "failures": self.failures,
            "final_lr": self.lr,
            "device": str(self.device),
        }

    def _result(self) -> TrainingResult:
        summary = update_summary(self.run_dir, self._summary())
        return TrainingResult(run_dir=self.run_dir, epochs=summary["epochs"],
                              best_epoch=summary["best_epoch"],
                              best_valid_neg_elbo_per_step=summary["best_valid_neg_elbo_per_step"],
                              final_train_loss_per_step=summary["final_train_loss_per_step"],
                              final_valid_neg_elbo_per_step=summary["final_valid_neg_elbo_per_step"],
                              wall_seconds=summary["wall_seconds"])
