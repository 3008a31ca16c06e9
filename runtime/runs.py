"""Train, evaluate and sample compiled specs: what the `dssm` subcommands run.

A run directory is self-contained: besides the trainer's files it holds a
copy of the spec (`spec.dssm`), from which every later command rebuilds the
model.
"""

from __future__ import annotations

import inspect
import logging
import shutil
from pathlib import Path

import pyro
import torch

from runtime.data import load_dataset
from runtime.evaluate import EvaluationError, _load_best_parameters, _read_config, evaluate_run
from runtime.trainer import (LAST_CHECKPOINT, TrainConfig, TrainingError, default_config,
                             resolve_device, train, update_summary)
from taxonomy.graph import default_flow_width

log = logging.getLogger("dssm.runs")

RUN_SPEC = "spec.dssm"
# Emission families that fit each kind of data; the first is the default.
FAMILIES_FOR_DATA = {"bernoulli": ("bernoulli",), "exponential": ("exponential", "normal")}


def emission_family(spec_family: str, data_family: str) -> str:
    """The spec's emission family when it fits the data, else the data's own (with a note)."""
    allowed = FAMILIES_FOR_DATA.get(data_family, (data_family,))
    if spec_family in allowed:
        return spec_family
    log.warning("the spec's %s emission does not fit %s data; using %s", spec_family,
             data_family, allowed[0])
    return allowed[0]


def model_factory(spec_path: str | Path, data_family: str):
    """Return a function (config, x_dim) -> model that compiles the spec at `spec_path`."""
    from taxonomy.build import load_module

    module = load_module(spec_path)

    def build(config: TrainConfig, x_dim: int):
        defaults = inspect.signature(module.Model).parameters
        spec_family, spec_flow = defaults["x_family"].default, defaults["flow"].default
        width = spec_flow[1] if spec_flow else default_flow_width(defaults["z_dim"].default)
        return module.Model(x_dim=x_dim, x_family=emission_family(spec_family, data_family),
                            guide=config.guide, flow=(config.iaf, width) if config.iaf else None)

    return build


def spec_training_defaults(spec_path: str | Path) -> dict:
    """The guide and IAF layers a spec declares, as training defaults."""
    from taxonomy.graph import build_graph
    from taxonomy.parser import load_spec

    model = build_graph(load_spec(spec_path))
    return {"guide": model.guide, "iaf": model.flow[0] if model.flow else 0}


def train_spec(spec: str, dataset: str, run_dir: str, options: dict, evaluate_test: bool = True,
               progress: bool = True) -> dict:
    """Compile `spec`, train it on `dataset` into `run_dir`, and evaluate the test split.

    :param dict options: TrainConfig fields set on the command line; None values
        fall back to the spec's declarations, then to the protocol's defaults.
    :returns: the run's summary.json contents.
    """
    run = Path(run_dir)
    data = load_dataset(dataset)
    resume = bool(options.get("resume"))
    spec_copy = run / RUN_SPEC
    if resume:
        if not spec_copy.is_file():
            raise TrainingError(f"{run} holds no run to resume ({RUN_SPEC} is missing)")
        spec_source = spec_copy
    else:
        spec_source = Path(spec)

    chosen = {key: value for key, value in options.items() if value is not None}
    chosen = {**spec_training_defaults(spec_source), **chosen}
    config = default_config(data.family, dataset=dataset, spec=str(spec), **chosen)
    config.validate()
    factory = model_factory(spec_source, data.family)

    if not resume:
        if (run / LAST_CHECKPOINT).exists():
            raise TrainingError(f"{run} already contains a run; pass --resume to continue it "
                                "or choose another --out")
        if (run / "config.json").exists():
            raise TrainingError(f"{run} contains a run that finished no epoch "
                                f"({LAST_CHECKPOINT} is missing); remove the folder or "
                                f"choose another --out")
        run.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(spec, spec_copy)

    if config.threads:
        torch.set_num_threads(config.threads)
    # Seeded here, so the initial parameters depend on the seed and on nothing
    # this process ran before (the trainer seeds again for its own draws).
    pyro.set_rng_seed(config.seed)
    model = factory(config, data.x_dim)
    train(model, data, config, run, progress=progress)
    if evaluate_test:
        evaluate_run(run, split="test", model_factory=factory, data=data)
    return update_summary(run, {"spec": str(spec), "dataset": dataset})


def evaluate_saved_run(run_dir: str, split: str = "test", nll_samples: int = 0,
                       device: str | None = None):
    """`dssm eval`: evaluate a run's best checkpoint and record the figures."""
    run = Path(run_dir)
    config = _read_config(run)
    data = load_dataset(config.dataset)
    factory = model_factory(_run_spec(run), data.family)
    return evaluate_run(run, split=split, nll_samples=nll_samples, model_factory=factory,
                        data=data, device=device)


def load_trained_model(run_dir: str, device: str | None = None):
    """Rebuild a run's model with its best parameters; return (model, config, data)."""
    run = Path(run_dir)
    config = _read_config(run)
    data = load_dataset(config.dataset)
    target = resolve_device(device or "auto")
    model = model_factory(_run_spec(run), data.family)(config, data.x_dim).to(target)
    _load_best_parameters(model, run, data.valid if len(data.valid) else data.train, target)
    model.eval()
    return model, config, data


def sample_run(run_dir: str, steps: int, output: str, num_sequences: int = 1,
               seed: int = 0, device: str | None = None) -> list[Path]:
    """`dssm sample`: draw a piano roll from the prior; write MIDI and a PNG beside it."""
    from runtime.music_output import plot_piano_roll, write_midi

    if steps < 1:
        raise EvaluationError("--steps must be at least 1")
    model, config, data = load_trained_model(run_dir, device)
    if data.family != "bernoulli":
        raise EvaluationError(f"{run_dir} was trained on {config.dataset}, not on piano "
                              "rolls; sampling to MIDI needs a music run")
    torch.manual_seed(seed)
    roll = model.sample(num_sequences, steps)[0].cpu().numpy()

    midi = Path(output)
    picture = midi.with_suffix(".png")
    write_midi(roll, midi)
    plot_piano_roll(roll, picture, title=f"{Path(run_dir).name}: {steps} steps from the prior")
    return [midi, picture]


def _run_spec(run: Path) -> Path:
    path = run / RUN_SPEC
    if not path.is_file():
        raise EvaluationError(f"{path} not found; is {run} a run directory written by "
                              "'dssm train'?")
    return path
