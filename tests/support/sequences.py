"""Tiny in-memory data sets in the shape `runtime.data.load_dataset` returns."""

from __future__ import annotations

import numpy as np

from runtime.data import Dataset, SequenceData


def binary_split(count: int, x_dim: int, seed: int, prefix: str,
                 min_steps: int = 2, max_steps: int = 6) -> SequenceData:
    """Return `count` random binary sequences of 2 to 6 steps, named PREFIX[i]."""
    rng = np.random.default_rng(seed)
    sequences = [(rng.random((int(rng.integers(min_steps, max_steps + 1)), x_dim)) < 0.3)
                 .astype(np.float32) for _ in range(count)]
    return SequenceData(sequences, [f"{prefix}[{i}]" for i in range(count)], x_dim)


def binary_dataset(x_dim: int = 3, train: int = 12, valid: int = 5, test: int = 5) -> Dataset:
    """Return a small Bernoulli data set with fixed contents."""
    return Dataset(name="toy", train=binary_split(train, x_dim, 1, "train"),
                   valid=binary_split(valid, x_dim, 2, "valid"),
                   test=binary_split(test, x_dim, 3, "test"), x_dim=x_dim, family="bernoulli")


def gaussian_split(count: int, x_dim: int, seed: int, prefix: str,
                   noise_scale: float = 0.5) -> SequenceData:
    """Return sequences drawn from `LinearGaussian`: a level per sequence plus noise."""
    rng = np.random.default_rng(seed)
    sequences = []
    for _ in range(count):
        steps = int(rng.integers(1, 8))
        level = rng.normal(size=(1, x_dim))
        sequences.append((level + noise_scale * rng.normal(size=(steps, x_dim)))
                         .astype(np.float32))
    return SequenceData(sequences, [f"{prefix}[{i}]" for i in range(count)], x_dim)
