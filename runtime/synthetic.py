"""Synthetic data with a known generating model: sequences drawn from a compiled spec.

`load_synthetic(spec, sequences, steps, seed)` compiles the spec, initialises
its model at random from `seed`, and draws every sequence from the model's
prior with `Model.sample`. A model trained on this data can be compared with
the cell that generated it, which real data sets cannot offer.

As a data set name: `synthetic:SPEC?n=200&T=40&seed=0`. Every option may be
left out; the defaults are n=100, T=50 and seed=0. The spec path is read
relative to the working directory, so a run trained on
`synthetic:specs/dmm.dssm` must be evaluated from the same folder.
"""

from __future__ import annotations

import inspect
import logging
import math
from pathlib import Path
from urllib.parse import parse_qsl

import numpy as np
import torch

from runtime.data import SYNTHETIC_PREFIX, DataError, Dataset, SequenceData
from taxonomy.errors import SpecError

log = logging.getLogger("dssm.data")

DEFAULT_SEQUENCES = 100
DEFAULT_STEPS = 50
DEFAULT_SEED = 0
# Options of a synthetic data set name, mapped to load_synthetic's parameters.
NAME_OPTIONS = {"n": "sequences", "T": "steps", "seed": "seed"}
# The shares of the validation and test splits; the training split gets the rest.
VALID_SHARE = 0.1
TEST_SHARE = 0.1


def load_synthetic(spec: str | Path, sequences: int = DEFAULT_SEQUENCES,
                   steps: int = DEFAULT_STEPS, seed: int = DEFAULT_SEED,
                   name: str | None = None) -> Dataset:
    """Draw `sequences` sequences of `steps` steps from the spec's model, initialised from `seed`.

    The model is built with the sizes and emission family the spec declares.
    The sequences are split 80/10/10 into train, valid and test in the order
    drawn, with at least one sequence in each split. Drawing runs on one thread
    under its own random state, so neither torch's thread count nor the
    caller's random state changes the data.

    NOTE: the same spec, sizes and seed give the same data with the same torch
    build on the same kind of CPU. Other builds or CPUs may round differently.

    :param spec: the .dssm file of the generating model.
    :param int sequences: the number of sequences over all three splits (at least 3).
    :param int steps: the length of every sequence.
    :param int seed: seeds the model's initial parameters and the draws.
    :param str name: the data set's name; defaults to the `synthetic:` name of these options.
    :raises DataError: for invalid sizes, a spec that does not compile, or non-finite draws.
    """
    from taxonomy.build import load_module

    if sequences < 3:
        raise DataError(f"synthetic data needs at least 3 sequences (one per split), "
                        f"not n={sequences}")
    if steps < 1:
        raise DataError(f"synthetic sequences need at least 1 step, not T={steps}")
    path = Path(spec)
    if not path.is_file():
        raise DataError(f"{spec}: spec not found; synthetic data is drawn from the model "
                        "of a .dssm file, e.g. synthetic:specs/dmm.dssm")
    try:
        module = load_module(path)
    except SpecError as error:
        raise DataError(f"cannot draw synthetic data from {spec}, because the spec does not "
                        f"compile:\n{error.format()}") from None

    drawn = _draw(module.Model, sequences, steps, seed)
    if not np.isfinite(drawn).all():
        raise DataError(f"the model of {spec} drew non-finite values with seed {seed}; "
                        "try another seed")

    family = inspect.signature(module.Model).parameters["x_family"].default
    name = name or synthetic_name(spec, sequences, steps, seed)
    valid_count = max(1, math.floor(sequences * VALID_SHARE))
    test_count = max(1, math.floor(sequences * TEST_SHARE))
    train_count = sequences - valid_count - test_count

    bounds = {"train": (0, train_count), "valid": (train_count, train_count + valid_count),
              "test": (train_count + valid_count, sequences)}
    splits = {split: SequenceData(list(drawn[start:stop]),
                                  [f"{split}[{i}]" for i in range(stop - start)],
                                  drawn.shape[2])
              for split, (start, stop) in bounds.items()}
    log.info("%s: %d train, %d valid and %d test sequences of %d steps", name,
             train_count, valid_count, test_count, steps)
    return Dataset(name=name, train=splits["train"], valid=splits["valid"],
                   test=splits["test"], x_dim=drawn.shape[2], family=family, sources=[path])


def synthetic_name(spec: str | Path, sequences: int, steps: int, seed: int) -> str:
    """Return the data set name that `load_dataset` turns back into these options."""
    return f"{SYNTHETIC_PREFIX}{Path(spec).as_posix()}?n={sequences}&T={steps}&seed={seed}"


def load_synthetic_name(name: str) -> Dataset:
    """Load a `synthetic:SPEC?n=..&T=..&seed=..` data set name; see the module docstring."""
    text = name[len(SYNTHETIC_PREFIX):]
    spec, _, query = text.partition("?")
    if not spec:
        raise DataError("'synthetic:' needs a spec file, e.g. synthetic:specs/dmm.dssm?n=200&T=40")

    options = {}
    for key, value in parse_qsl(query, keep_blank_values=True, separator="&"):
        if key not in NAME_OPTIONS:
            raise DataError(f"unknown option '{key}' in the data set name '{name}'; "
                            f"known options: {', '.join(NAME_OPTIONS)}")
        try:
            options[NAME_OPTIONS[key]] = int(value)
        except ValueError:
            raise DataError(f"option {key} in '{name}' must be an integer, "
                            f"not '{value}'") from None
    return load_synthetic(spec, name=name, **options)


def _draw(model_class, sequences: int, steps: int, seed: int) -> np.ndarray:
    """Build and sample the model under a private random state, on one thread."""
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = model_class()
            model.eval()
            return model.sample(sequences, steps).cpu().numpy().astype(np.float32)
    finally:
        torch.set_num_threads(threads)
