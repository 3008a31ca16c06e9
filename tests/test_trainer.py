import json
import math

import numpy as np
import pyro
import pytest
import torch
from support.sequences import binary_dataset, binary_split, gaussian_split
from support.toy_dssm import ExplodingDMM, LinearGaussian, ToyDMM

from runtime.data import Dataset, SequenceData
from runtime.trainer import (ClippedSVI, TrainConfig, TrainingError, annealing_factor,
                             default_config, resolve_device, train)


@pytest.fixture(autouse=True)
def keep_thread_count():
    # train() sets torch's process-wide thread count from config.threads.
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def small_config(**overrides) -> TrainConfig:
    # One thread: on tiny tensors, waking more OpenMP threads costs more than the work.
    values = {"epochs": 2, "batch_size": 4, "lr": 1e-2, "anneal_epochs": 2, "device": "cpu",
              "threads": 1}
    return default_config("music", **{**values, **overrides})


def toy_model(seed: int = 0) -> ToyDMM:
    torch.manual_seed(seed)
    return ToyDMM(x_dim=3)


def read_metrics(run_dir):
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def test_annealing_factor_rises_linearly_then_stays_at_one():
    factors = [annealing_factor(epoch, batch, 4, anneal_epochs=2, min_anneal=0.2)
               for epoch in range(3) for batch in range(4)]

    assert factors[0] == pytest.approx(0.2 + 0.8 / 8)
    assert factors[7] == pytest.approx(1.0)
    assert np.allclose(np.diff(factors[:8]), 0.8 / 8)
    assert factors[8:] == [1.0] * 4


def test_annealing_off_when_anneal_epochs_is_zero():
    assert annealing_factor(0, 0, 10, anneal_epochs=0, min_anneal=0.2) == 1.0


def test_default_config_follows_protocol_per_family():
    music = default_config("music")
    speech = default_config("speech")

    assert (music.lr, music.min_anneal) == (3e-4, 0.2)
    assert (speech.lr, speech.min_anneal) == (1e-3, 0.001)
    assert (music.clip_norm, music.anneal_epochs, music.batch_size) == (10.0, 100, 20)
    assert default_config("bernoulli").family == "music"
    assert default_config("exponential").family == "speech"
    assert default_config("music", lr=0.5).lr == 0.5


def test_default_config_rejects_unknown_family():
    with pytest.raises(TrainingError, match="unknown data family 'video'"):
        default_config("video")


@pytest.mark.parametrize("option, value, message", [
    ("elbo", "renyi", "unknown elbo 'renyi'"),
    ("lr", 0.0, "invalid lr"),
    ("min_anneal", 0.0, "invalid min_anneal"),
    ("device", "tpu", "unknown device 'tpu'"),
    ("weight_decay", -0.1, "invalid weight_decay"),
    ("dropout", 1.0, "invalid dropout"),
])
def test_invalid_option_raises_training_error(tmp_path, option, value, message):
    config = small_config(**{option: value})

    with pytest.raises(TrainingError, match=message):
        train(toy_model(), binary_dataset(), config, tmp_path / "run", progress=False)


def parameter_norm() -> float:
    return float(sum(value.detach().pow(2).sum() for _, value in
                     pyro.get_param_store().named_parameters()) ** 0.5)


def test_weight_decay_shrinks_parameters(tmp_path):
    norms = {}
    for weight_decay in (0.0, 5.0):
        pyro.clear_param_store()
        run_dir = tmp_path / f"decay-{weight_decay}"
        train(toy_model(), binary_dataset(), small_config(weight_decay=weight_decay), run_dir,
              progress=False)
        norms[weight_decay] = parameter_norm()
        assert json.loads((run_dir / "config.json").read_text())["weight_decay"] == weight_decay

    # Decoupled decay multiplies every parameter by (1 - lr * decay) each step.
    assert norms[5.0] < 0.9 * norms[0.0]


def test_dropout_without_dropout_layers_warns(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(), small_config(epochs=1, dropout=0.3), run_dir,
          progress=False)

    assert "dropout 0.3 has no effect" in (run_dir / "train.log").read_text()
    assert json.loads((run_dir / "config.json").read_text())["dropout"] == 0.3


def test_cuda_request_without_cuda_raises():
    if torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    with pytest.raises(TrainingError, match="CUDA is not available"):
        resolve_device("cuda")


def test_train_writes_run_directory(tmp_path):
    run_dir = tmp_path / "dmm-jsb"
    result = train(toy_model(), binary_dataset(), small_config(), run_dir, progress=False)

    names = {path.name for path in run_dir.iterdir()}
    assert {"config.json", "metrics.jsonl", "checkpoint-last.pt", "checkpoint-best.pt",
            "summary.json", "train.log"} <= names

    assert torch.get_num_threads() == 1
    config = json.loads((run_dir / "config.json").read_text())
    assert config["device"] == "cpu"
    assert config["lr"] == 1e-2

    metrics = read_metrics(run_dir)
    assert [row["epoch"] for row in metrics] == [1, 2]
    for row in metrics:
        assert {"train_loss_per_step", "valid_neg_elbo_per_step", "seconds",
                "annealing_factor", "lr"} <= set(row)
        assert math.isfinite(row["train_loss_per_step"])
        assert math.isfinite(row["valid_neg_elbo_per_step"])
    assert metrics[0]["annealing_factor"] == pytest.approx(0.6)
    assert metrics[1]["annealing_factor"] == pytest.approx(1.0)

    summary = json.loads((run_dir / "summary.json").read_text())
    best = min(metrics, key=lambda row: row["valid_neg_elbo_per_step"])
    assert summary["best_epoch"] == best["epoch"] == result.best_epoch
    assert summary["best_valid_neg_elbo_per_step"] == best["valid_neg_elbo_per_step"]
    assert summary["epochs"] == 2
    assert summary["seed"] == 0
    assert summary["final_train_loss_per_step"] == metrics[-1]["train_loss_per_step"]
    assert summary["wall_seconds"] > 0

    lines = (run_dir / "train.log").read_text().splitlines()
    assert lines[0].startswith("epoch     1  train ")
    assert len(lines[0].removesuffix("  best")) == len(lines[1].removesuffix("  best"))


def test_checkpoint_loads_with_weights_only(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir, progress=False)

    checkpoint = torch.load(run_dir / "checkpoint-last.pt", weights_only=True)

    assert checkpoint["epoch"] == 1
    assert "emitter.weight" in checkpoint["parameters"]["module"]
    assert "toy_dmm$$$emitter.weight" in checkpoint["parameters"]["param_store"]
    assert checkpoint["optimizer"]


def test_validation_figure_is_weighted_by_steps(tmp_path):
    # With the exact posterior as guide every importance weight equals p(x),
    # so the negative ELBO is exact and the validation figure deterministic.
    valid = gaussian_split(5, 2, seed=4, prefix="valid")
    data = Dataset(name="gauss", train=gaussian_split(6, 2, seed=5, prefix="train"),
                   valid=valid, test=valid, x_dim=2, family="gaussian")
    model = LinearGaussian(x_dim=2)
    train(model, data, small_config(epochs=1), tmp_path / "run", progress=False)

    batch = valid.batch(range(len(valid)))
    exact = -model.exact_log_likelihood(batch.x, batch.mask).sum() / batch.mask.sum()
    metrics = read_metrics(tmp_path / "run")
    assert metrics[0]["valid_neg_elbo_per_step"] == pytest.approx(float(exact), abs=1e-4)


def test_second_run_in_same_directory_without_resume_raises(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir, progress=False)

    with pytest.raises(TrainingError, match="already contains a run"):
        train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir, progress=False)


def test_resume_without_checkpoint_raises(tmp_path):
    with pytest.raises(TrainingError, match="cannot resume: .* not found, so no epoch"):
        train(toy_model(), binary_dataset(), small_config(resume=True), tmp_path / "run",
              progress=False)


def test_resume_from_garbage_checkpoint_raises(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir, progress=False)
    (run_dir / "checkpoint-last.pt").write_bytes(b"\x80\x04garbage")

    with pytest.raises(TrainingError, match="the file is damaged") as raised:
        train(toy_model(), binary_dataset(), small_config(epochs=2, resume=True), run_dir,
              progress=False)
    assert "weights_only" not in str(raised.value)


class Killed(Exception):
    pass


def kill_at(epoch: int, batch: int):
    def callback(info):
        if (info.epoch, info.batch) == (epoch, batch):
            raise Killed
    return callback


def without_seconds(row):
    return {key: value for key, value in row.items() if key != "seconds"}


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    data = binary_dataset()
    straight_dir, killed_dir = tmp_path / "straight", tmp_path / "killed"

    straight_model = toy_model(seed=0)
    train(straight_model, data, small_config(epochs=3), straight_dir, progress=False)
    straight_parameters = {name: value.detach().clone()
                           for name, value in pyro.get_param_store().named_parameters()}

    with pytest.raises(Killed):
        train(toy_model(seed=0), data, small_config(epochs=3), killed_dir, progress=False,
              callback=kill_at(epoch=3, batch=2))
    assert len(read_metrics(killed_dir)) == 2

    # A new process builds a new model; its initial values must not matter.
    resumed_model = toy_model(seed=123)
    train(resumed_model, data, small_config(epochs=3, resume=True), killed_dir, progress=False)
    resumed_parameters = dict(pyro.get_param_store().named_parameters())

    # Float sums on CPU can differ in the last bits between identical runs in
    # one process (vectorised kernels depend on memory alignment), hence the tolerance.
    resumed_rows, straight_rows = read_metrics(killed_dir), read_metrics(straight_dir)
    assert [row["epoch"] for row in resumed_rows] == [1, 2, 3]
    for resumed, straight in zip(resumed_rows, straight_rows):
        assert without_seconds(resumed) == pytest.approx(without_seconds(straight), rel=1e-6)
    assert resumed_parameters.keys() == straight_parameters.keys()
    for name, value in straight_parameters.items():
        assert torch.allclose(resumed_parameters[name], value, atol=1e-6), name
    for name, value in straight_model.state_dict().items():
        assert torch.allclose(resumed_model.state_dict()[name], value, atol=1e-6), name


@pytest.mark.parametrize("left_behind", [
    json.dumps({"epoch": 2, "train_loss_per_step": -1.0}) + "\n",
    '{"epoch": 2, "train_loss_per',
])
def test_resume_drops_metrics_rows_after_checkpoint(tmp_path, left_behind):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir, progress=False)
    first_row = read_metrics(run_dir)[0]
    with open(run_dir / "metrics.jsonl", "a") as handle:
        handle.write(left_behind)

    train(toy_model(), binary_dataset(), small_config(epochs=2, resume=True), run_dir,
          progress=False)

    metrics = read_metrics(run_dir)
    assert [row["epoch"] for row in metrics] == [1, 2]
    assert metrics[0] == first_row
    assert metrics[1]["train_loss_per_step"] > 0


def test_resume_of_finished_run_trains_no_more(tmp_path):
    run_dir = tmp_path / "run"
    first = train(toy_model(), binary_dataset(), small_config(epochs=1), run_dir,
                  progress=False)

    again = train(toy_model(), binary_dataset(), small_config(epochs=1, resume=True), run_dir,
                  progress=False)

    assert again.epochs == 1
    assert again.best_valid_neg_elbo_per_step == first.best_valid_neg_elbo_per_step
    assert len(read_metrics(run_dir)) == 1


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_run_resumes_and_evaluates_on_cpu(tmp_path):
    from runtime.evaluate import evaluate_run

    run_dir = tmp_path / "run"
    data = binary_dataset()
    train(toy_model(), data, small_config(epochs=1, device="cuda"), run_dir, progress=False)
    assert next(iter(pyro.get_param_store().values())).device.type == "cuda"

    train(toy_model(), data, small_config(epochs=2, device="cpu", resume=True), run_dir,
          progress=False)
    result = evaluate_run(run_dir, nll_samples=2, model_factory=lambda config, x_dim:
                          ToyDMM(x_dim=x_dim), data=data, device="cpu")

    assert [row["epoch"] for row in read_metrics(run_dir)] == [1, 2]
    assert math.isfinite(result.nll_per_step)


def test_nan_parameter_restores_and_halves_lr(tmp_path):
    run_dir = tmp_path / "run"
    corrupted = []

    def corrupt_once(info):
        if (info.epoch, info.batch) == (1, 2) and not corrupted:
            with torch.no_grad():
                pyro.get_param_store()["toy_dmm$$$emitter.weight"].unconstrained().fill_(math.nan)
            corrupted.append(info)

    model = toy_model()
    train(model, binary_dataset(), small_config(epochs=2), run_dir, progress=False,
          callback=corrupt_once)

    metrics = read_metrics(run_dir)
    assert [row["lr"] for row in metrics] == [5e-3, 5e-3]
    assert metrics[-1]["failures"] == 1
    for name, value in pyro.get_param_store().named_parameters():
        assert torch.isfinite(value).all(), name
    log_text = (run_dir / "train.log").read_text()
    assert "parameter 'toy_dmm$$$emitter.weight' has non-finite values" in log_text
    assert "halved the learning rate to 0.005" in log_text


def test_nan_before_validation_keeps_restored_optimizer_state(tmp_path):
    # Corrupting after the epoch's last step makes validation fail; the
    # restored Adam state has not reached any parameter when the checkpoint is written.
    run_dir = tmp_path / "run"

    def corrupt_last_step_of_epoch_2(info):
        if (info.epoch, info.batch) == (2, 3):
            with torch.no_grad():
                pyro.get_param_store()["toy_dmm$$$combiner.bias"].unconstrained().fill_(math.inf)

    train(toy_model(), binary_dataset(), small_config(epochs=2), run_dir, progress=False,
          callback=corrupt_last_step_of_epoch_2)

    metrics = read_metrics(run_dir)
    assert metrics[1]["valid_neg_elbo_per_step"] is None
    assert metrics[1]["lr"] == 5e-3
    checkpoint = torch.load(run_dir / "checkpoint-last.pt", weights_only=True)
    assert "toy_dmm$$$combiner.bias" in checkpoint["optimizer"]
    for state in checkpoint["optimizer"].values():
        assert state["param_groups"][0]["lr"] == 5e-3
    assert torch.isfinite(checkpoint["parameters"]["param_store"]["toy_dmm$$$combiner.bias"]).all()
    assert "validation of epoch 2" in (run_dir / "train.log").read_text()


def test_nan_emission_stops_after_repeated_failures(tmp_path):
    torch.manual_seed(0)
    model = ExplodingDMM(x_dim=3)

    with pytest.raises(TrainingError) as raised:
        train(model, binary_dataset(), small_config(epochs=5, max_failures=3), tmp_path / "run",
              progress=False)

    message = str(raised.value)
    assert "model site 'x_1' has a non-finite log_prob" in message
    assert "after 3 non-finite losses" in message
    assert (tmp_path / "run" / "train.log").read_text().count("halved the learning rate") == 2


def test_nan_in_data_takes_nonfinite_path(tmp_path):
    clean = binary_split(8, 3, seed=1, prefix="train")
    sequences = [clean[i].copy() for i in range(len(clean))]
    sequences[5][1, 2] = math.nan
    train_split = SequenceData(sequences, clean.names, 3)
    data = Dataset(name="bad", train=train_split, valid=binary_split(3, 3, 2, "valid"),
                   test=binary_split(3, 3, 3, "test"), x_dim=3, family="bernoulli")

    with pytest.raises(TrainingError, match=r"non-finite values in sequences train\[5\]"):
        train(toy_model(), data, small_config(epochs=5), tmp_path / "run", progress=False)

    metrics = read_metrics(tmp_path / "run")
    assert [row["failures"] for row in metrics] == [1, 2]


def test_clipped_svi_bounds_global_gradient_norm():
    # With plain SGD at learning rate 1 the update equals the clipped gradient.
    pyro.clear_param_store()
    model = toy_model()
    data = binary_dataset()
    batch = data.train.batch(range(4))
    svi = ClippedSVI(model.model, model.guide, pyro.optim.SGD({"lr": 1.0}),
                     pyro.infer.Trace_ELBO(max_plate_nesting=1), clip_norm=1e-3)
    before = {name: value.detach().clone() for name, value in model.state_dict().items()}

    svi.step(batch.x, batch.mask, 1.0)

    squared = sum(float(((value - before[name]) ** 2).sum())
                  for name, value in model.state_dict().items())
    assert 0 < math.sqrt(squared) <= 1e-3 + 1e-7


# torch 2.13 deprecates torch.jit.trace, which Pyro's JIT ELBOs are built on.
@pytest.mark.filterwarnings("ignore:`torch.jit.trace` is deprecated:DeprecationWarning")
def test_jit_elbo_trains_on_batches_of_varying_shape(tmp_path):
    run_dir = tmp_path / "run"
    train(toy_model(), binary_dataset(train=8), small_config(epochs=1, elbo="jit-trace"),
          run_dir, progress=False)

    row = read_metrics(run_dir)[0]
    assert math.isfinite(row["train_loss_per_step"])
    assert math.isfinite(row["valid_neg_elbo_per_step"])
