"""Synthetic data drawn from a compiled spec: shape, determinism, families and names."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from runtime.data import DataError, load_dataset
from runtime.runs import train_spec
from runtime.synthetic import load_synthetic, synthetic_name


def write_spec(folder, name: str, family: str = "bernoulli", x_dim: int = 5) -> str:
    """Write a tiny HMM spec with an emission of `family` and return its path."""
    path = folder / f"{name}.dssm"
    path.write_text(f"model {name}\n"
                    "latent   z : normal[2]\n"
                    f"observed x : {family}[{x_dim}]\n"
                    "size mlp = 8\nsize rnn = 8\nsize inference = 8\n"
                    "z[t] <- z[t-1]\n"
                    "x[t] <- z[t]\n", encoding="utf-8")
    return str(path)


def test_synthetic_splits_have_requested_shape(tmp_path):
    spec = write_spec(tmp_path, "tiny", x_dim=5)

    data = load_synthetic(spec, sequences=10, steps=7, seed=0)

    assert (len(data.train), len(data.valid), len(data.test)) == (8, 1, 1)
    assert data.x_dim == 5
    assert data.family == "bernoulli"
    for split in data.splits.values():
        assert all(split[i].shape == (7, 5) for i in range(len(split)))


def test_smallest_synthetic_set_has_one_sequence_per_split(tmp_path):
    data = load_synthetic(write_spec(tmp_path, "tiny"), sequences=3, steps=2, seed=0)

    assert (len(data.train), len(data.valid), len(data.test)) == (1, 1, 1)


def test_synthetic_data_repeats_with_its_seed(tmp_path):
    spec = write_spec(tmp_path, "tiny")

    first = load_synthetic(spec, sequences=6, steps=5, seed=3)
    again = load_synthetic(spec, sequences=6, steps=5, seed=3)
    other = load_synthetic(spec, sequences=6, steps=5, seed=4)

    np.testing.assert_array_equal(first.train.steps, again.train.steps)
    np.testing.assert_array_equal(first.test.steps, again.test.steps)
    assert not np.array_equal(first.train.steps, other.train.steps)


def test_synthetic_data_keeps_caller_state(tmp_path):
    spec = write_spec(tmp_path, "tiny", family="normal")
    threads = torch.get_num_threads()
    reference = load_synthetic(spec, sequences=4, steps=3, seed=1).train.steps

    torch.manual_seed(123)
    state = torch.get_rng_state()
    torch.set_num_threads(2)
    try:
        drawn = load_synthetic(spec, sequences=4, steps=3, seed=1).train.steps
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

    np.testing.assert_array_equal(reference, drawn)
    assert torch.equal(torch.get_rng_state(), state)


@pytest.mark.parametrize("family", ["bernoulli", "normal", "exponential"])
def test_synthetic_values_fit_the_emission_family(tmp_path, family):
    data = load_synthetic(write_spec(tmp_path, "tiny", family=family), sequences=5, steps=6,
                          seed=0)
    values = data.train.steps

    assert data.family == family
    assert np.isfinite(values).all()
    if family == "bernoulli":
        assert set(np.unique(values)) <= {0.0, 1.0}
    elif family == "exponential":
        assert (values > 0).all()
    else:
        assert (values < 0).any()
        assert (values > 0).any()


def test_dataset_name_options_reach_the_sampler(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "tiny")

    data = load_dataset("synthetic:tiny.dssm?n=5&T=4&seed=2")
    direct = load_synthetic("tiny.dssm", sequences=5, steps=4, seed=2)

    assert data.name == "synthetic:tiny.dssm?n=5&T=4&seed=2"
    assert data.train.total_steps == 3 * 4
    np.testing.assert_array_equal(data.train.steps, direct.train.steps)


def test_synthetic_name_round_trips(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "tiny")
    name = synthetic_name("tiny.dssm", 4, 3, 7)

    assert name == "synthetic:tiny.dssm?n=4&T=3&seed=7"
    assert load_dataset(name).name == name


def test_dataset_name_defaults_apply(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "tiny")

    data = load_dataset("synthetic:tiny.dssm")

    assert len(data.train) + len(data.valid) + len(data.test) == 100
    assert data.train[0].shape[0] == 50


@pytest.mark.parametrize("name, message", [
    ("synthetic:", "needs a spec file"),
    ("synthetic:tiny.dssm?n=10&steps=4", "unknown option 'steps'"),
    ("synthetic:tiny.dssm?n=ten", "must be an integer"),
    ("synthetic:tiny.dssm?n=2", "at least 3 sequences"),
    ("synthetic:tiny.dssm?T=0", "at least 1 step"),
    ("synthetic:missing.dssm", "missing.dssm: spec not found"),
])
def test_invalid_synthetic_names_raise_data_error(tmp_path, monkeypatch, name, message):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "tiny")

    with pytest.raises(DataError, match=message):
        load_dataset(name)


def test_spec_outside_hierarchy_cannot_draw_data(tmp_path):
    spec = tmp_path / "static.dssm"
    spec.write_text("model static\nlatent z : normal[2]\nobserved x : bernoulli[3]\n"
                    "x[t] <- z[t]\n", encoding="utf-8")

    with pytest.raises(DataError, match="does not compile"):
        load_synthetic(spec, sequences=4, steps=3)


def test_train_spec_runs_on_real_valued_synthetic_data(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    write_spec(tmp_path, "tiny", family="normal", x_dim=3)

    summary = train_spec("tiny.dssm", "synthetic:tiny.dssm?n=6&T=4&seed=0", "run",
                         {"epochs": 1, "threads": 1, "batch_size": 4}, progress=False)

    assert np.isfinite(summary["test_neg_elbo_per_step"])
    assert summary["dataset"] == "synthetic:tiny.dssm?n=6&T=4&seed=0"
