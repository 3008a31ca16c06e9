import json
import math

import pyro
import pyro.distributions as dist
import pytest
import torch
from support.sequences import binary_dataset, gaussian_split
from support.toy_dssm import LinearGaussian, ToyDMM

from runtime.data import Dataset
from runtime.evaluate import EvaluationError, evaluate, evaluate_run
from runtime.trainer import default_config, train


@pytest.fixture(autouse=True)
def fresh_param_store_on_one_thread():
    # One thread: on tiny tensors, waking more OpenMP threads costs more than the work.
    pyro.clear_param_store()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def exact_nll_per_step(model, split):
    batch = split.batch(range(len(split)))
    return float(-model.exact_log_likelihood(batch.x, batch.mask).sum() / batch.mask.sum())


def test_exact_posterior_gives_exact_nll_and_elbo():
    split = gaussian_split(6, 2, seed=0, prefix="test")
    model = LinearGaussian(x_dim=2)
    pyro.set_rng_seed(0)

    result = evaluate(model, split, num_samples=4, batch_size=4)

    exact = exact_nll_per_step(model, split)
    assert result.nll_per_step == pytest.approx(exact, abs=1e-4)
    assert result.neg_elbo_per_step == pytest.approx(exact, abs=1e-4)
    assert result.steps == int(split.lengths.sum())
    assert result.sequences == 6
    assert result.nll_samples == 4


def test_wrong_guide_nll_lies_between_exact_and_elbo():
    split = gaussian_split(20, 2, seed=1, prefix="test")
    model = LinearGaussian(x_dim=2, guide_shift=0.2)
    pyro.set_rng_seed(0)

    result = evaluate(model, split, num_samples=100, batch_size=10)

    exact = exact_nll_per_step(model, split)
    elbo_gap = result.neg_elbo_per_step - exact
    nll_gap = result.nll_per_step - exact
    assert elbo_gap > 0.1
    # Importance sampling is biased upwards and closes most of the gap with K = 100.
    assert -0.01 < nll_gap < 0.25 * elbo_gap


def test_nll_estimate_below_neg_elbo_for_dmm():
    torch.manual_seed(0)
    model = ToyDMM(x_dim=3)
    pyro.set_rng_seed(0)

    result = evaluate(model, binary_dataset().test, num_samples=10, batch_size=3)

    assert result.nll_per_step <= result.neg_elbo_per_step + 0.05
    assert result.nll_per_step > 0


def test_no_samples_gives_no_nll():
    torch.manual_seed(0)
    result = evaluate(ToyDMM(x_dim=3), binary_dataset().test)

    assert result.nll_per_step is None
    assert math.isfinite(result.neg_elbo_per_step)


class GlobalSiteModel(LinearGaussian):
    """A model with one latent shared by all sequences, outside the sequences plate."""

    def model(self, x, mask, annealing_factor=1.0):
        shared = pyro.sample("shared", dist.Normal(0.0, 1.0))
        with pyro.plate("sequences", x.shape[0], dim=-1):
            emission = dist.Normal(shared.expand(x.shape), 1.0)
            pyro.sample("x", emission.mask(mask.unsqueeze(-1)).to_event(2), obs=x)

    def guide(self, x, mask, annealing_factor=1.0):
        pyro.sample("shared", dist.Normal(0.0, 1.0))


def test_site_without_batch_dimension_rejected_for_nll():
    split = gaussian_split(3, 2, seed=0, prefix="test")

    with pytest.raises(NotImplementedError, match="site 'shared' has a log_prob of shape"):
        evaluate(GlobalSiteModel(x_dim=2), split, num_samples=2)


def test_nan_parameter_raises_evaluation_error():
    torch.manual_seed(0)
    model = ToyDMM(x_dim=3)
    with torch.no_grad():
        model.emitter.bias.fill_(math.nan)

    with pytest.raises(EvaluationError, match=r"parameter 'toy_dmm\$\$\$emitter.bias'"):
        evaluate(model, binary_dataset().test)


def make_toy(config, x_dim):
    return ToyDMM(x_dim=x_dim)


def trained_run(tmp_path):
    data = binary_dataset()
    config = default_config("music", epochs=1, batch_size=4, lr=1e-2, device="cpu", threads=1)
    torch.manual_seed(0)
    model = ToyDMM(x_dim=3)
    train(model, data, config, tmp_path / "run", progress=False)
    return model, data, config


def test_evaluate_run_records_figures_in_summary(tmp_path):
    model, data, config = trained_run(tmp_path)
    run_dir = tmp_path / "run"
    pyro.set_rng_seed(config.seed)
    in_memory = evaluate(model, data.test, num_samples=3, batch_size=config.batch_size)

    result = evaluate_run(run_dir, split="test", nll_samples=3, model_factory=make_toy, data=data)

    # One epoch: the best checkpoint contains the trained parameters, and the seed is the run's.
    assert result.neg_elbo_per_step == pytest.approx(in_memory.neg_elbo_per_step, rel=1e-6)
    assert result.nll_per_step == pytest.approx(in_memory.nll_per_step, rel=1e-6)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["test_neg_elbo_per_step"] == result.neg_elbo_per_step
    assert summary["test_nll_per_step"] == result.nll_per_step
    assert summary["test_nll_samples"] == 3
    assert summary["best_epoch"] == 1


def test_evaluate_run_keys_other_splits_by_name(tmp_path):
    _, data, _ = trained_run(tmp_path)
    run_dir = tmp_path / "run"
    evaluate_run(run_dir, split="test", model_factory=make_toy, data=data)

    evaluate_run(run_dir, split="valid", model_factory=make_toy, data=data)

    summary = json.loads((run_dir / "summary.json").read_text())
    assert "valid_neg_elbo_per_step" in summary
    assert "test_neg_elbo_per_step" in summary
    assert "valid_nll_per_step" not in summary


def test_evaluate_run_rejects_unknown_split(tmp_path):
    _, data, _ = trained_run(tmp_path)

    with pytest.raises(EvaluationError, match="unknown split 'dev'"):
        evaluate_run(tmp_path / "run", split="dev", model_factory=make_toy, data=data)


def test_evaluate_run_on_missing_run_raises(tmp_path):
    with pytest.raises(EvaluationError, match="config.json not found"):
        evaluate_run(tmp_path / "nothing", model_factory=make_toy, data=binary_dataset())


def test_evaluate_run_on_mismatched_model_raises(tmp_path):
    _, data, _ = trained_run(tmp_path)

    def wider_model(config, x_dim):
        return ToyDMM(x_dim=x_dim, z_dim=5)

    with pytest.raises(EvaluationError, match="does not fit the model"):
        evaluate_run(tmp_path / "run", model_factory=wider_model, data=data)
