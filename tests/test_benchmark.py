"""The speed benchmark compares models with the same objective, and its smoke mode runs."""

import importlib
import subprocess
import sys

import numpy as np
import pyro
import pytest
import torch
from pyro import poutine

from benchmarks import ablation
from benchmarks.handwritten_arssm import CHANGES, HandwrittenArSSM, copy_compiled_parameters
from benchmarks.handwritten_common import reverse_within_length
from benchmarks.measure import PAIRS, crop_or_tile
from benchmarks.train_speed import REPOSITORY, main
from runtime.data import SequenceData
from taxonomy.build import build_model

# Tiny widths; h1 and h2 keep the 200 units that specs/arssm.dssm declares.
SIZES = {"x_dim": 6, "z_dim": 3, "mlp": 5, "inference": 7}


def tiny_compiled(name="arssm", seed=0):
    torch.manual_seed(seed)
    compiled = build_model(f"specs/{name}.dssm", guide="full", **SIZES)
    # Random weights everywhere, learned initial states included, so that a
    # weight copied to the wrong place changes the densities.
    with torch.no_grad():
        for parameter in compiled.parameters():
            parameter.normal_(0.0, 0.3)
    return compiled


def padded_batch(lengths, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    steps = int(lengths.max())
    mask = torch.arange(steps)[None] < lengths[:, None]
    x = (torch.rand(len(lengths), steps, SIZES["x_dim"], generator=generator) < 0.5).float()
    return x * mask[..., None], mask


def per_sequence_log_prob(trace):
    """Sum the scaled, masked log-densities of every sample site, per sequence."""
    trace.compute_log_prob()
    return sum(site["log_prob"] for site in trace.nodes.values() if site["type"] == "sample")


@pytest.mark.parametrize("name, changes", [
    ("arssm", ()),
    ("arssm", ("unbound", "unpacked")),
    ("arssm", ("emission",)),
    ("arssm", tuple(CHANGES)),
    ("srnn", ()),
    ("vrnn", ()),
    ("dmm", ()),
])
def test_handwritten_model_has_compiled_objective(name, changes):
    compiled = tiny_compiled(name)
    handwritten_module = importlib.import_module(PAIRS[name].handwritten)
    handwritten = handwritten_module.Model(**SIZES, changes=changes)
    handwritten_module.copy_compiled_parameters(compiled, handwritten)
    x, mask = padded_batch([5, 3, 1, 4])
    annealing = 0.3

    guide_trace = poutine.trace(compiled.guide).get_trace(x, mask, annealing)
    model_trace = poutine.trace(poutine.replay(compiled.model, trace=guide_trace)).get_trace(
        x, mask, annealing)
    z = guide_trace.nodes["z"]["value"]
    same_z = {f"z_{t + 1}": z[:, t] for t in range(z.shape[1])}
    handwritten_guide = poutine.trace(poutine.condition(handwritten.guide, data=same_z)
                                      ).get_trace(x, mask, annealing)
    handwritten_model = poutine.trace(poutine.condition(handwritten.model, data=same_z)
                                      ).get_trace(x, mask, annealing)

    torch.testing.assert_close(per_sequence_log_prob(handwritten_model),
                               per_sequence_log_prob(model_trace), rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(per_sequence_log_prob(handwritten_guide),
                               per_sequence_log_prob(guide_trace), rtol=1e-5, atol=1e-4)


def test_handwritten_arssm_has_one_site_per_step():
    handwritten = HandwrittenArSSM(**SIZES)
    x, mask = padded_batch([3, 2])

    trace = poutine.trace(handwritten.model).get_trace(x, mask)

    # The plate's subsample site counts as stochastic in Pyro's traces.
    assert [name for name in trace.stochastic_nodes if name != "sequences"] == [
        "z_1", "z_2", "z_3"]
    assert trace.observation_nodes == ["x_1", "x_2", "x_3"]


def test_copy_rejects_partial_alignment():
    torch.manual_seed(0)
    partial = build_model("specs/arssm.dssm", guide="partial", **SIZES)

    with pytest.raises(ValueError, match="full-alignment guide"):
        copy_compiled_parameters(partial, HandwrittenArSSM(**SIZES))


def test_unknown_change_is_rejected():
    with pytest.raises(ValueError, match="unknown changes"):
        HandwrittenArSSM(**SIZES, changes=("transition",))


def test_reverse_within_length_keeps_padding_in_place():
    sequence = torch.arange(8.0).reshape(2, 4, 1)
    lengths = torch.tensor([4, 2])

    reversed_sequence = reverse_within_length(sequence, lengths)

    assert reversed_sequence[0, :, 0].tolist() == [3.0, 2.0, 1.0, 0.0]
    assert reversed_sequence[1, :, 0].tolist() == [5.0, 4.0, 6.0, 7.0]


def test_compiled_without_speedups_has_same_objective():
    compiled = tiny_compiled()
    x, mask = padded_batch([5, 3, 1, 4])

    def elbo_terms():
        pyro.set_rng_seed(3)
        guide_trace = poutine.trace(compiled.guide).get_trace(x, mask, 1.0)
        model_trace = poutine.trace(poutine.replay(compiled.model, trace=guide_trace)
                                    ).get_trace(x, mask, 1.0)
        return per_sequence_log_prob(model_trace), per_sequence_log_prob(guide_trace)

    fast = elbo_terms()
    with ablation.patched_blocks(tuple(ablation.SPEEDUPS)):
        plain = elbo_terms()

    torch.testing.assert_close(plain[0], fast[0], rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(plain[1], fast[1], rtol=1e-5, atol=1e-4)


def test_patched_blocks_restores_the_speedups():
    from runtime import blocks

    draw_step = blocks.draw_step
    with ablation.patched_blocks(("draw_arithmetic",)):
        assert blocks.draw_step is not draw_step

    assert blocks.draw_step is draw_step


@pytest.mark.parametrize("name, expected", [
    ("compiled", ("compiled", ())),
    ("compiled-without:reuse,cell_kernels", ("compiled", ("reuse", "cell_kernels"))),
    ("compiled-without:all", ("compiled", tuple(ablation.SPEEDUPS))),
    ("handwritten", ("handwritten", ())),
    ("handwritten+emission+x_rnn", ("handwritten", ("emission", "x_rnn"))),
])
def test_implementation_names_parse(name, expected):
    assert ablation.parse(name) == expected


@pytest.mark.parametrize("name", ["compiled-without:speed", "compiledish", "pyro"])
def test_invalid_implementation_names_raise(name):
    with pytest.raises(ValueError, match=name):
        ablation.parse(name)


def test_crop_or_tile_gives_every_sequence_the_length():
    rolls = [np.eye(3, dtype=np.float32), np.ones((5, 3), dtype=np.float32)]
    data = SequenceData(rolls, ["a", "b"], 3)

    tiled = crop_or_tile(data, 7)

    assert tiled.lengths.tolist() == [7, 7]
    np.testing.assert_array_equal(tiled[0], np.concatenate([np.eye(3)] * 3)[:7])
    np.testing.assert_array_equal(tiled[1], np.ones((7, 3)))


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message without CUDA")
def test_cuda_request_without_cuda_fails_clearly(capsys):
    status = main(["--device", "cuda"])

    assert status == 2
    error = capsys.readouterr().err
    assert "CUDA is not available" in error
    assert "--device cpu" in error
    assert "Traceback" not in error


@pytest.mark.slow
def test_smoke_mode_runs():
    finished = subprocess.run([sys.executable, "-m", "benchmarks.train_speed", "--smoke"],
                              cwd=REPOSITORY, capture_output=True, text=True, timeout=300)

    assert finished.returncode == 0, finished.stderr
    assert "ratio compiled / hand-written" in finished.stdout
    assert "| compiled |" in finished.stdout
    assert "| handwritten |" in finished.stdout


def test_unknown_model_fails_clearly(capsys):
    status = main(["--smoke", "--models", "arssm,rnn"])

    assert status == 2
    assert "no hand-written model for rnn" in capsys.readouterr().err
