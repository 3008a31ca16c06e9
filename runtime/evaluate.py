"""Test figures of a trained model: negative ELBO and importance-sampled NLL per time step.

The negative ELBO is an upper bound on the negative log-likelihood. The
importance-sampled estimate

    log p(x) ~ logsumexp_k [log p(x, z_k) - log q(z_k | x)] - log K,  z_k ~ q(z | x),

is a tighter bound in expectation that approaches log p(x) as K grows.
Both are summed over sequences and divided by the number of real steps.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import pyro
import torch
from pyro import poutine
from pyro.poutine.util import site_is_subsample
from torch import nn

from runtime.checkpoint import (CheckpointError, initialize_parameters, load_checkpoint,
                                restore_parameters)
from runtime.trainer import (BEST_CHECKPOINT, CONFIG_FILE, ELBOS, TrainConfig, TrainingError,
                             describe_nonfinite, resolve_device, update_summary)
from taxonomy.errors import DssmError


class EvaluationError(DssmError):
    """An evaluation that cannot run or gives a non-finite figure."""


class EvaluationResult(NamedTuple):
    """Figures of one split, in nats per time step.

    :param float neg_elbo_per_step: the negative ELBO (annealing factor 1).
    :param float nll_per_step: the importance-sampled negative log-likelihood,
        or None when no samples were requested.
    :param int nll_samples: K, the importance samples per sequence.
    :param int sequences: the sequences evaluated.
    :param int steps: the real time steps evaluated.
    """

    neg_elbo_per_step: float
    nll_per_step: float | None
    nll_samples: int
    sequences: int
    steps: int


def sequence_log_prob(trace, batch_size: int) -> torch.Tensor:
    """Sum the log_prob of every sample site of `trace` per sequence, shape (B,).

    Each site's log_prob must have the batch dimension first (shape (B,) or
    (B, ...)); the other dimensions are summed.
    """
    trace.compute_log_prob()
    total = torch.zeros(batch_size)
    for name, site in trace.nodes.items():
        if site["type"] != "sample" or site_is_subsample(site):
            continue
        log_prob = site["log_prob"]
        if log_prob.dim() == 0 or log_prob.shape[0] != batch_size:
            raise NotImplementedError(
                f"site '{name}' has a log_prob of shape {tuple(log_prob.shape)}, but the "
                f"importance-sampled NLL needs every site's log_prob to start with the batch "
                f"dimension {batch_size}; put the site inside the 'sequences' plate")
        total = total.to(log_prob.device) + log_prob.reshape(batch_size, -1).sum(1)
    return total


def log_likelihood_estimate(model, x: torch.Tensor, mask: torch.Tensor,
                            num_samples: int) -> torch.Tensor:
    """Return the importance-sampled log p(x) of each sequence, shape (B,), with K guide samples."""
    batch_size = x.shape[0]
    log_weights = []
    for _ in range(num_samples):
        guide_trace = poutine.trace(model.guide).get_trace(x, mask, 1.0)
        model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
            x, mask, 1.0)
        log_weights.append(sequence_log_prob(model_trace, batch_size)
                           - sequence_log_prob(guide_trace, batch_size))
    return torch.logsumexp(torch.stack(log_weights), dim=0) - math.log(num_samples)


def evaluate(model, split_data, num_samples: int = 0, batch_size: int = 20,
             elbo: str = "trace", device: torch.device | str | None = None) -> EvaluationResult:
    """Compute the negative ELBO and, when `num_samples` > 0, the NLL per step over a split.

    :param model: a compiled model whose parameters are in Pyro's param store.
    :param split_data: a `runtime.data.SequenceData`.
    :param int num_samples: K importance samples per sequence for the NLL; 0 skips it.
    :param int batch_size: sequences per batch.
    :param str elbo: the ELBO estimator for the negative ELBO: "trace" or
        "meanfield" ("jit-" prefixes are dropped).
    :param device: where batches go; by default the model's parameters' device.
    :raises EvaluationError: when a figure is non-finite, naming the site at fault.
    """
    if num_samples < 0:
        raise EvaluationError(f"invalid number of NLL samples {num_samples}: use 0 or more")
    if len(split_data) == 0:
        raise EvaluationError("the split to evaluate has no sequences")
    if device is None:
        device = next(iter(model.parameters()), torch.zeros(0)).device
    estimator = ELBOS[elbo.removeprefix("jit-")](max_plate_nesting=getattr(
        model, "max_plate_nesting", 1))

    was_training = model.training
    model.eval()
    neg_elbo, neg_log_likelihood, steps = 0.0, 0.0, 0
    try:
        with torch.no_grad():
            for batch in split_data.batches(batch_size):
                batch = batch.to(device)
                batch_neg_elbo, batch_log_likelihood = _batch_figures(
                    model, batch, estimator, num_samples, getattr(split_data, "names", None))
                neg_elbo += batch_neg_elbo
                neg_log_likelihood -= batch_log_likelihood
                steps += int(batch.mask.sum())
    finally:
        model.train(was_training)

    return EvaluationResult(neg_elbo_per_step=neg_elbo / steps,
                            nll_per_step=neg_log_likelihood / steps if num_samples else None,
                            nll_samples=num_samples, sequences=len(split_data), steps=steps)


def _batch_figures(model, batch, estimator, num_samples: int, names) -> tuple[float, float]:
    """Return the batch's summed negative ELBO and, with samples, its summed log p(x) estimate."""
    try:
        neg_elbo = float(estimator.loss(model.model, model.guide, batch.x, batch.mask, 1.0))
        log_likelihood = 0.0
        if num_samples:
            log_likelihood = float(log_likelihood_estimate(model, batch.x, batch.mask,
                                                           num_samples).sum())
    except ValueError as error:
        # Distribution validation raises ValueError on NaN; any other
        # ValueError is a bug in the model and goes to the caller unchanged.
        problem = describe_nonfinite(model, batch, 1.0, names)
        if problem is None:
            raise
        raise EvaluationError(f"evaluation failed on non-finite values: {problem}") from error

    if not (math.isfinite(neg_elbo) and math.isfinite(log_likelihood)):
        problem = describe_nonfinite(model, batch, 1.0, names)
        raise EvaluationError(
            f"the negative ELBO ({neg_elbo}) or log-likelihood ({log_likelihood}) is "
            f"non-finite: {problem or 'no site or parameter is non-finite when traced again'}")
    return neg_elbo, log_likelihood


def evaluate_run(run_dir: str | Path, split: str = "test", nll_samples: int = 0,
                 model_factory: Callable[[TrainConfig, int], nn.Module] | None = None,
                 data=None, batch_size: int | None = None,
                 device: str | None = None) -> EvaluationResult:
    """Evaluate a run's best checkpoint on a split and record the figures in its summary.json.

    Writes `{split}_neg_elbo_per_step`, `{split}_nll_samples` and, when
    `nll_samples` > 0, `{split}_nll_per_step`, keeping summary.json's other keys.

    :param run_dir: a run directory written by `runtime.trainer.train`.
    :param str split: "train", "valid" or "test".
    :param int nll_samples: K importance samples per sequence; 0 skips the NLL.
    :param model_factory: builds an untrained model from the run's `TrainConfig`
        and the data's x_dim; required.
    :param data: the data set (`runtime.data.Dataset`); by default
        `load_dataset(config.dataset)`.
    :param int batch_size: sequences per batch; by default the run's.
    :param str device: "cpu", "cuda" or "auto" (the default): the run's
        checkpoint maps to it whatever device trained the run.
    """
    run_dir = Path(run_dir)
    if model_factory is None:
        raise TypeError("evaluate_run needs a model_factory to build the model")
    config = _read_config(run_dir)

    if data is None:
        if not config.dataset:
            raise EvaluationError(f"{run_dir / CONFIG_FILE} names no data set; pass the data")
        from runtime.data import load_dataset

        data = load_dataset(config.dataset)
    splits = {"train": data.train, "valid": data.valid, "test": data.test}
    if split not in splits:
        raise EvaluationError(f"unknown split '{split}'; choose train, valid or test")

    try:
        target = resolve_device(device or "auto")
    except TrainingError as error:
        raise EvaluationError(str(error)) from error
    model = model_factory(config, data.x_dim).to(target)
    _load_best_parameters(model, run_dir, splits[split], target)

    # A fixed seed makes the reported figures reproducible.
    pyro.set_rng_seed(config.seed)
    result = evaluate(model, splits[split], num_samples=nll_samples,
                      batch_size=batch_size or config.batch_size, elbo=config.elbo,
                      device=target)

    figures: dict[str, Any] = {f"{split}_neg_elbo_per_step": result.neg_elbo_per_step,
                               f"{split}_nll_samples": nll_samples}
    if result.nll_per_step is not None:
        figures[f"{split}_nll_per_step"] = result.nll_per_step
    update_summary(run_dir, figures)
    return result


def _read_config(run_dir: Path) -> TrainConfig:
    path = run_dir / CONFIG_FILE
    if not path.is_file():
        raise EvaluationError(f"{path} not found; is {run_dir} a run directory written by "
                              f"'dssm train'?")
    try:
        return TrainConfig.from_dict(json.loads(path.read_text(encoding="utf-8")))
    except (json.JSONDecodeError, TrainingError) as error:
        raise EvaluationError(f"cannot read {path}: {error}") from error


def _load_best_parameters(model, run_dir: Path, split_data, device: torch.device) -> None:
    path = run_dir / BEST_CHECKPOINT
    if not path.is_file():
        raise EvaluationError(f"checkpoint {path} not found; train the run for at least one "
                              f"epoch first")
    try:
        checkpoint = load_checkpoint(path, device)
    except CheckpointError as error:
        raise EvaluationError(str(error)) from error

    pyro.clear_param_store()
    first = next(iter(split_data.batches(1))).to(device)
    initialize_parameters(model, first.x, first.mask)
    try:
        restore_parameters(model, checkpoint["parameters"])
    except (KeyError, RuntimeError) as error:
        raise EvaluationError(f"{path} does not fit the model built from "
                              f"{run_dir / CONFIG_FILE}: {error}") from error
