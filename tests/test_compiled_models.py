"""Compiled models checked against their equations, written out by hand in plain torch.

The references in support/equations.py use a compiled model's sub-networks
(GRU weights, transition and emission heads, combiner) but none of its
methods, and loop over time themselves. Tiny dimensions and float64 keep the
comparisons tight.
"""

import math
import time

import pyro
import pytest
import torch
import torch.nn.functional as F
from pyro import poutine
from pyro.infer import (SVI, JitTrace_ELBO, JitTraceMeanField_ELBO, Trace_ELBO,
                        TraceMeanField_ELBO)
from pyro.optim import Adam
from support import equations
from support.compiled import (ALL_SPECS, CELL_SPECS, NAMED, SPECS, compiled, lags_of,
                              one_torch_thread, orders_from_cell_name, spec_id)
from torch.distributions import kl as torch_kl

from runtime import blocks
from runtime.sequences import PosteriorSequence, PriorSequence
from taxonomy.build import load_module

__all__ = ["one_torch_thread"]  # the autouse fixture, imported for pytest

X_DIM, Z_DIM = 3, 2
SMALL = {"x_dim": X_DIM, "z_dim": Z_DIM, "mlp": 6, "inference": 5}
NAMED_IDS = list(NAMED)

# Specs with finite orders above the base ones, and realisations that the
# specs in specs/cells do not use, with the orders of their edges.
EXTRA_SPECS = {
    "windows": ("""model Windows
latent   z : normal[2]
observed x : bernoulli[3]
z[t] <- z[t-3:t-1]
x[t] <- z[t-1:t], x[t-2:t-1]
cell AR-HMM(z<-z:3, x<-z:1, x<-x:2)
""", {"z<-z": 3, "x<-z": 1, "x<-x": 2, "z<-x": None}),
    "feedforward_window": ("""model FeedforwardWindow
latent   z : normal[2]
observed x : bernoulli[3]
deterministic h[t] = lstm[6](z[t])
z[t] <- h[t-1], x[t-2:t-1]
x[t] <- z[t]
cell F-HMM(z<-z, z<-x:2)
""", {"z<-z": "all", "x<-z": 0, "x<-x": None, "z<-x": 2}),
    "chained_states": ("""model ChainedStates
latent   z : normal[2]
observed x : bernoulli[3]
deterministic a[t] = gru[6](x[t])
deterministic b[t] = rnn[6](a[t], z[t])
z[t] <- b[t-1], z[t-1]
x[t] <- z[t], x[t-3:t-1]
cell DMM-Aug(z<-z, z<-x, x<-x:3)
""", {"z<-z": "all", "x<-z": 0, "x<-x": 3, "z<-x": "all"}),
    # d[t] carries z[1:t-1] and the transition reads it at lag 0, so the guide
    # must step d before it draws z[t].
    "state_read_at_lag_zero": ("""model StateReadAtLagZero
latent   z : normal[2]
observed x : bernoulli[3]
deterministic d[t] = gru[6](z[t-1])
z[t] <- d[t]
x[t] <- z[t]
cell HMM(z<-z)
""", {"z<-z": "all", "x<-z": 0, "x<-x": None, "z<-x": None}),
}


@pytest.fixture(scope="module")
def extra_specs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("extra_specs")
    paths = {}
    for name, (text, _) in EXTRA_SPECS.items():
        paths[name] = folder / f"{name}.dssm"
        paths[name].write_text(text, encoding="utf-8")
    return paths


def named_spec(stem):
    return SPECS / f"{stem}.dssm"


def fixed_model(path, guide="full", seed=0, **options):
    """A float64 model whose parameters, initial states included, are random but fixed."""
    torch.manual_seed(seed)
    model = compiled(path).Model(guide=guide, **{**SMALL, **options}).double()
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def ragged_batch(lengths=(5, 3), steps=5, seed=0, padding=7.0):
    """Binary x (batch, steps, X_DIM) with junk in the padding, its mask, and x zero-padded."""
    generator = torch.Generator().manual_seed(seed)
    x = torch.bernoulli(torch.full((len(lengths), steps, X_DIM), 0.5),
                        generator=generator).double()
    mask = torch.arange(steps) < torch.tensor(lengths)[:, None]
    junk = torch.where(mask[..., None], x, torch.full_like(x, padding))
    return junk, mask, torch.where(mask[..., None], x, torch.zeros_like(x))


def per_sequence_elbo(model, x, mask, seed, analytic_kl=False):
    """The ELBO estimate per sequence at one draw of the guide.

    log p(x, z) - log q(z), or log p(x | z) - KL(q || p) with the registered
    KL as TraceMeanField_ELBO computes it.
    """
    pyro.set_rng_seed(seed)
    guide_trace = poutine.trace(model.guide).get_trace(x, mask)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x, mask)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    if analytic_kl:
        kl = torch_kl.kl_divergence(guide_trace.nodes["z"]["fn"], model_trace.nodes["z"]["fn"])
        return model_trace.nodes["x"]["log_prob"] - kl
    return (model_trace.nodes["z"]["log_prob"] + model_trace.nodes["x"]["log_prob"]
            - guide_trace.nodes["z"]["log_prob"])


def vectorised_params(model, z, x):
    """Transition (loc and scale) and emission logits at every step, from the scoring code."""
    arguments = (z, x, model._states(z, x)) if hasattr(model, "_states") else (z, x)
    loc, scale = model._transition(*arguments)
    return torch.cat([loc, scale], -1), model._emission(*arguments).logits


# --- the named models against their equations --------------------------------

@pytest.mark.parametrize("stem", NAMED_IDS)
def test_log_joint_matches_equations(stem):
    model = fixed_model(named_spec(stem))
    x, mask, clean = ragged_batch()
    z = torch.randn(2, 5, Z_DIM, dtype=torch.float64)

    trace = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(x, mask)
    trace.compute_log_prob()
    log_pz, log_px = equations.log_joint(NAMED[stem].generative, model, z, clean, mask)

    assert torch.allclose(trace.nodes["z"]["log_prob"], log_pz, rtol=1e-10, atol=1e-10)
    assert torch.allclose(trace.nodes["x"]["log_prob"], log_px, rtol=1e-10, atol=1e-10)
    assert torch.allclose(trace.log_prob_sum(), (log_pz + log_px).sum(), rtol=1e-10)


@pytest.mark.parametrize("alignment", ["partial", "full"])
@pytest.mark.parametrize("stem", NAMED_IDS)
def test_guide_density_matches_equations(stem, alignment):
    named = NAMED[stem]
    model = fixed_model(named_spec(stem), guide=alignment)
    x, mask, clean = ragged_batch()

    pyro.set_rng_seed(1)
    trace = poutine.trace(model.guide).get_trace(x, mask)
    trace.compute_log_prob()
    z = trace.nodes["z"]["value"]
    if alignment == "partial":
        reference, rnn = equations.partial_guide, named.partial_rnn
    else:
        reference, rnn = named.full_guide, named.full_rnn
    loc, scale = equations.guide_params(reference, model, clean, mask.sum(-1),
                                        rnn == "bidirectional", z)
    log_q = equations.masked_sum(equations.normal_log_density(z, loc, scale), mask)

    assert torch.allclose(trace.nodes["z"]["log_prob"], log_q, rtol=1e-10, atol=1e-10)
    assert torch.isfinite(z[mask]).all()


@pytest.mark.parametrize("stem", NAMED_IDS)
def test_guide_mean_path_matches_equations(stem):
    # The mean path is deterministic, so this also checks what the guide draws.
    named = NAMED[stem]
    model = fixed_model(named_spec(stem))
    x, mask, clean = ragged_batch()

    drawn = model._draw_posterior(blocks.zero_padding(x, mask), mask.sum(-1), use_mean=True)
    loc, scale = equations.guide_params(named.full_guide, model, clean, mask.sum(-1),
                                        named.full_rnn == "bidirectional")

    assert torch.allclose(drawn[0][mask], loc[mask], rtol=1e-10, atol=1e-10)
    assert torch.allclose(drawn[3][mask], scale[mask], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stem", NAMED_IDS)
def test_reconstruction_teacher_forces_x(stem):
    named = NAMED[stem]
    model = fixed_model(named_spec(stem))
    x, mask, clean = ragged_batch()

    mean_path, _ = equations.guide_params(named.full_guide, model, clean, mask.sum(-1),
                                          named.full_rnn == "bidirectional")
    expected = equations.emission_means(named.generative, model, mean_path, clean)
    reconstruction = model.reconstruct(x, mask)

    assert reconstruction.shape == x.shape
    assert torch.allclose(reconstruction[mask], expected[mask], rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stem", NAMED_IDS)
def test_prior_samples_follow_equations(stem):
    model = fixed_model(named_spec(stem))

    pyro.set_rng_seed(3)
    sampled = model.sample(4, 6)
    pyro.set_rng_seed(3)
    z_expected, x_expected = equations.sample_prior(NAMED[stem].generative, model, 4, 6)
    pyro.set_rng_seed(3)
    z_generated, _ = model._generate(4, 6)

    assert sampled.shape == (4, 6, X_DIM)
    assert torch.equal(sampled, x_expected)
    assert torch.allclose(z_generated, z_expected, rtol=1e-10, atol=1e-10)


def test_annealing_factor_scales_only_latent_sites():
    model = fixed_model(named_spec("arssm"))
    x, mask, clean = ragged_batch()
    z = torch.randn(2, 5, Z_DIM, dtype=torch.float64)

    trace = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(
        x, mask, annealing_factor=0.25)
    guide_trace = poutine.trace(model.guide).get_trace(x, mask, annealing_factor=0.25)
    log_pz, log_px = equations.log_joint(NAMED["arssm"].generative, model, z, clean, mask)

    assert trace.nodes["z"]["scale"] == 0.25
    assert trace.nodes["x"]["scale"] == 1.0
    assert guide_trace.nodes["z"]["scale"] == 0.25
    assert torch.allclose(trace.log_prob_sum(), 0.25 * log_pz.sum() + log_px.sum(), rtol=1e-10)


def test_exponential_log_joint_matches_its_mean():
    # The speech ArSSM: x[t] ~ Exponential with mean v = exp(emission output),
    # so log p(P) = -log v - P / v.
    model = fixed_model(SPECS / "speech" / "arssm_speech.dssm")
    _, mask, _ = ragged_batch()
    generator = torch.Generator().manual_seed(4)
    power = torch.rand(2, 5, X_DIM, generator=generator, dtype=torch.float64) * 3
    z = torch.randn(2, 5, Z_DIM, dtype=torch.float64)

    trace = poutine.trace(poutine.condition(model.model, data={"z": z})).get_trace(power, mask)
    trace.compute_log_prob()
    observed = []

    def observe(t, features):
        log_mean = model.emission.net(features)
        observed.append((-log_mean - power[:, t] * torch.exp(-log_mean)).sum(-1))
        return power[:, t]

    equations.arssm(model, 2, 5, lambda t, features: z[:, t], observe)
    expected = equations.masked_sum(torch.stack(observed, 1), mask)

    assert torch.allclose(trace.nodes["x"]["log_prob"], expected, rtol=1e-10)


# --- building blocks ----------------------------------------------------------

def test_emission_families_read_their_parameters():
    torch.manual_seed(0)
    features = torch.randn(4, 5)

    bernoulli = blocks.Emission("bernoulli", 5, 3, 7)
    assert torch.equal(bernoulli(features).logits, bernoulli.net(features))

    normal = blocks.Emission("normal", 5, 3, 7)
    with torch.no_grad():
        normal.net[2].bias[3:] = -50.0    # a very negative raw scale stays positive
    raw = normal.net(features)
    distribution = normal(features)
    assert torch.equal(distribution.loc, raw[:, :3])
    assert (distribution.scale > 0).all()
    assert torch.allclose(distribution.scale, F.softplus(raw[:, 3:]), atol=2e-4)

    exponential = blocks.Emission("exponential", 5, 3, 7)
    log_mean = exponential.net(features)
    power = torch.rand(4, 3) * 2
    assert torch.allclose(exponential(features).mean, torch.exp(log_mean))
    assert torch.allclose(exponential(features).log_prob(power),
                          -log_mean - power * torch.exp(-log_mean), atol=1e-5)

    with pytest.raises(ValueError, match="unknown emission family 'poisson'"):
        blocks.Emission("poisson", 5, 3, 7)


def test_combiner_averages_tanh_projections_with_summaries():
    torch.manual_seed(0)
    combiner = blocks.Combiner([2, 4], 3, 2)
    features = [torch.randn(5, 2), torch.randn(5, 4)]
    summaries = [torch.randn(5, 3)]

    loc, scale = combiner(features, summaries)
    combined = (torch.tanh(combiner.projections[0](features[0]))
                + torch.tanh(combiner.projections[1](features[1])) + summaries[0]) / 3

    assert torch.allclose(loc, combiner.loc(combined), atol=1e-6)
    assert torch.allclose(scale, F.softplus(combiner.scale(combined)), atol=2e-4)
    assert (scale > 0).all()


def test_iaf_log_determinant_enters_guide_density():
    torch.manual_seed(0)
    model = fixed_model(named_spec("dmm"), guide="partial", flow=(2, 6))
    x, mask, clean = ragged_batch()

    pyro.set_rng_seed(5)
    trace = poutine.trace(model.guide).get_trace(x, mask)
    trace.compute_log_prob()

    # Redo the draws in the same order: u ~ N(loc, scale), z = flow(u), and
    # log q(z) = log N(u) - log |det dz/du| with the Jacobian from autograd.
    summaries = equations.inference_summaries(model.inference_rnn, clean, mask.sum(-1),
                                              NAMED["dmm"].partial_rnn == "bidirectional")
    pyro.set_rng_seed(5)
    z_previous = equations.initial(model.z_0, 2)
    zs, log_q = [], []
    for t in range(5):
        loc, scale = model.combiner([z_previous], [summary[:, t] for summary in summaries])
        u = pyro.distributions.Normal(loc, scale).rsample()
        z_t = model.flow(u)[0]
        log_det = torch.stack([
            torch.linalg.slogdet(torch.autograd.functional.jacobian(
                lambda v: model.flow(v[None])[0][0], u[b].detach()))[1] for b in range(2)])
        log_q.append(equations.normal_log_density(u, loc, scale) - log_det)
        zs.append(z_t)
        z_previous = z_t
    expected = equations.masked_sum(torch.stack(log_q, 1), mask)

    assert torch.allclose(trace.nodes["z"]["value"][mask], torch.stack(zs, 1)[mask], rtol=1e-10)
    assert torch.allclose(trace.nodes["z"]["log_prob"], expected, rtol=1e-8, atol=1e-8)
    assert (log_det.abs() > 1e-3).all()


# --- conditional independences of every spec ----------------------------------

def _cell_orders(path):
    if path.parent.name == "cells":
        return orders_from_cell_name(path.stem)
    if path.stem in NAMED:
        return orders_from_cell_name(NAMED[path.stem].cell)
    if path.stem == "arssm_speech":
        return orders_from_cell_name(NAMED["arssm"].cell)
    raise AssertionError(f"no expected orders for {path}; add them to this test")


def _check_independences(model, orders, x_family="bernoulli"):
    steps, perturbed = 8, 2
    generator = torch.Generator().manual_seed(0)
    z = torch.randn(2, steps, Z_DIM, generator=generator, dtype=torch.float64)
    x = torch.bernoulli(torch.full((2, steps, X_DIM), 0.5), generator=generator).double()
    transition, emission = vectorised_params(model, z, x)

    def changed(before, after):
        return {t for t in range(steps) if (before[:, t] - after[:, t]).abs().max() > 1e-9}

    z_moved = z.clone()
    z_moved[:, perturbed] += 1.0
    x_moved = x.clone()
    x_moved[:, perturbed] = 1 - x_moved[:, perturbed]
    after_z = vectorised_params(model, z_moved, x)
    after_x = vectorised_params(model, z, x_moved)

    def expected(edge):
        return {perturbed + lag for lag in lags_of(edge, orders[edge], steps)
                if perturbed + lag < steps}

    assert changed(transition, after_z[0]) == expected("z<-z"), "z<-z"
    assert changed(emission, after_z[1]) == expected("x<-z"), "x<-z"
    assert changed(emission, after_x[1]) == expected("x<-x"), "x<-x"
    assert changed(transition, after_x[0]) == expected("z<-x"), "z<-x"


@pytest.mark.parametrize("path", ALL_SPECS, ids=spec_id)
def test_dependencies_follow_the_cell(path):
    # Perturb z[s] or x[s] and see which steps' p(z[t]) and p(x[t]) move:
    # exactly those t with t - s among the lags of the edge's order.
    model = fixed_model(path, x_family="bernoulli")
    with torch.no_grad():
        _check_independences(model, _cell_orders(path))


@pytest.mark.parametrize("name", EXTRA_SPECS)
def test_finite_orders_use_windows(name, extra_specs):
    model = fixed_model(extra_specs[name])
    with torch.no_grad():
        _check_independences(model, EXTRA_SPECS[name][1])


def test_paper_cells_are_all_compiled():
    assert len(CELL_SPECS) == 36


def _teacher_forced_prior_matches_scoring(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((3, 6, X_DIM), 0.5), generator=generator).double()

    pyro.set_rng_seed(7)
    noise = [torch.empty(3, Z_DIM, dtype=torch.float64).normal_() for _ in range(6)]
    pyro.set_rng_seed(7)
    z, x_kept = model._generate(3, 6, x=x)
    arguments = (z, x, model._states(z, x)) if hasattr(model, "_states") else (z, x)
    loc, scale = model._transition(*arguments)

    assert torch.equal(x_kept, x)
    assert torch.allclose(z, loc + scale * torch.stack(noise, 1), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", ALL_SPECS, ids=spec_id)
def test_step_by_step_sampler_agrees_with_scoring(path):
    # The prior sampler runs the states step by step, but the log density runs
    # them fused over time. The same z must come out of both.
    with torch.no_grad():
        _teacher_forced_prior_matches_scoring(fixed_model(path, x_family="bernoulli"))


@pytest.mark.parametrize("name", EXTRA_SPECS)
def test_step_by_step_sampler_agrees_for_extra_specs(name, extra_specs):
    with torch.no_grad():
        _teacher_forced_prior_matches_scoring(fixed_model(extra_specs[name]))


@pytest.mark.parametrize("alignment", ["partial", "full"])
@pytest.mark.parametrize("name", EXTRA_SPECS)
def test_extra_specs_score_under_both_alignments(name, alignment, extra_specs):
    model = fixed_model(extra_specs[name], guide=alignment)
    x, mask, _ = ragged_batch(lengths=(6, 2), steps=6)

    elbo = per_sequence_elbo(model, x, mask, seed=0)
    sample = model.sample(2, 4)

    assert torch.isfinite(elbo).all()
    assert sample.shape == (2, 4, X_DIM)


# --- ragged batches -----------------------------------------------------------

@pytest.mark.parametrize("alignment", ["partial", "full"])
@pytest.mark.parametrize("stem", ["arssm", "vrnn", "srnn"])
def test_padding_adds_nothing_to_elbo(stem, alignment):
    model = fixed_model(named_spec(stem), guide=alignment)
    x, mask, _ = ragged_batch(lengths=(5, 3), steps=5, padding=0.5)
    longer, longer_mask, _ = ragged_batch(lengths=(5, 3), steps=9, padding=-3.0)
    longer[:, :5] = torch.where(mask[..., None], x, longer[:, :5])
    longer[1, 3:] = float("nan")

    elbo = per_sequence_elbo(model, x, mask, seed=2)
    elbo_longer = per_sequence_elbo(model, longer, longer_mask, seed=2)

    assert torch.allclose(elbo, elbo_longer, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("stem", ["arssm", "vrnn", "srnn", "dmm"])
def test_padding_leaks_nothing_into_inference(stem):
    model = fixed_model(named_spec(stem), guide="partial")
    x, mask, _ = ragged_batch(lengths=(5, 2), steps=5, padding=9.0)

    summaries = model.inference_rnn(blocks.zero_padding(x, mask), mask.sum(-1))
    alone = model.inference_rnn(x[1:, :2], torch.tensor([2]))
    reconstruction = model.reconstruct(x, mask)
    reconstruction_alone = model.reconstruct(x[1:, :2], mask[1:, :2])

    for padded, unpadded in zip(summaries, alone):
        assert torch.allclose(padded[1, :2], unpadded[0], rtol=1e-10, atol=1e-12)
    assert torch.allclose(reconstruction[1, :2], reconstruction_alone[0], rtol=1e-10)


@pytest.mark.parametrize("stem, alignment", [("arssm", "full"), ("vrnn", "partial")])
def test_length_one_beside_length_160(stem, alignment):
    model = fixed_model(named_spec(stem), guide=alignment)
    x, mask, _ = ragged_batch(lengths=(1, 160), steps=160, padding=float("nan"))

    pyro.set_rng_seed(0)
    loss = Trace_ELBO().differentiable_loss(model.model, model.guide, x, mask)
    loss.backward()
    alone = per_sequence_elbo(model, x[:1, :1], mask[:1, :1], seed=0)
    together = per_sequence_elbo(model, x, mask, seed=0)

    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    assert torch.allclose(together[0], alone[0], rtol=1e-10)


@pytest.mark.parametrize("x_family", ["bernoulli", "normal", "exponential"])
@pytest.mark.parametrize("elbo", [Trace_ELBO, TraceMeanField_ELBO])
def test_nan_padding_keeps_gradients_finite(elbo, x_family):
    model = fixed_model(named_spec("arssm"), x_family=x_family)
    x, mask, _ = ragged_batch(lengths=(5, 2), padding=float("nan"))

    loss = elbo().differentiable_loss(model.model, model.guide, x, mask)
    loss.backward()
    gradients = [p.grad for p in model.parameters() if p.grad is not None]

    assert torch.isfinite(loss)
    assert gradients
    assert all(torch.isfinite(gradient).all() for gradient in gradients)


# --- ELBO estimators ----------------------------------------------------------

def _copies(x, mask, count):
    return x.expand(count, *x.shape[1:]).contiguous(), mask.expand(count, -1).contiguous()


def test_mean_field_elbo_matches_trace_elbo_in_expectation():
    # A batch of copies of one sequence gives independent draws in one call.
    model = fixed_model(named_spec("arssm"))
    x, mask, _ = ragged_batch(lengths=(5, 3))
    copies, copies_mask = _copies(x[1:], mask[1:], 400)

    sampled = per_sequence_elbo(model, copies, copies_mask, seed=0).detach()
    analytic = per_sequence_elbo(model, copies, copies_mask, seed=1, analytic_kl=True).detach()

    error = math.sqrt(sampled.var() / len(sampled) + analytic.var() / len(analytic))
    assert abs(sampled.mean() - analytic.mean()) < 4 * error


def test_registered_kl_is_what_mean_field_elbo_uses(monkeypatch):
    model = fixed_model(named_spec("arssm"))
    x, mask, clean = ragged_batch()
    key = (PosteriorSequence, PriorSequence)
    registered = torch_kl._KL_REGISTRY[key]
    calls = []

    def spy(q, p):
        calls.append(registered(q, p))
        return calls[-1]

    monkeypatch.setitem(torch_kl._KL_REGISTRY, key, spy)
    monkeypatch.setattr(torch_kl, "_KL_MEMOIZE", {})
    pyro.set_rng_seed(0)
    loss = TraceMeanField_ELBO().loss(model.model, model.guide, x, mask)
    pyro.set_rng_seed(0)
    guide_trace = poutine.trace(model.guide).get_trace(x, mask)
    z = guide_trace.nodes["z"]["value"]

    # The KL by hand, step by step at the guide's draw.
    loc_q, scale_q = equations.guide_params(NAMED["arssm"].full_guide, model, clean,
                                            mask.sum(-1), False, z)
    loc_p, scale_p = equations.transition_params(NAMED["arssm"].generative, model, z, clean)
    kl = equations.masked_sum(equations.gaussian_kl(loc_q, scale_q, loc_p, scale_p), mask)
    _, log_px = equations.log_joint(NAMED["arssm"].generative, model, z, clean, mask)

    assert len(calls) == 1
    assert torch.allclose(calls[0], kl, rtol=1e-10)
    assert loss == pytest.approx(float((kl - log_px).sum().detach()), rel=1e-8)


def test_mean_field_falls_back_to_sampling_under_iaf():
    model = fixed_model(named_spec("dmm"), flow=(2, 6))
    x, mask, _ = ragged_batch()

    pyro.set_rng_seed(0)
    mean_field = TraceMeanField_ELBO().loss(model.model, model.guide, x, mask)
    pyro.set_rng_seed(0)
    trace = Trace_ELBO().loss(model.model, model.guide, x, mask)

    assert math.isfinite(mean_field)
    assert mean_field == pytest.approx(trace, rel=1e-10)


# torch 2.13 deprecates torch.jit.trace, which Pyro's JIT ELBOs are built on.
@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("jit_elbo, elbo", [(JitTrace_ELBO, Trace_ELBO),
                                            (JitTraceMeanField_ELBO, TraceMeanField_ELBO)])
def test_jit_elbo_matches_eager_on_fixed_shape_batches(jit_elbo, elbo):
    # JIT-traced draws come from another stream of random numbers than eager
    # ones, so compare expectations over a batch of copies. Compiling on one
    # batch and scoring another of the same shape shows that neither x nor the
    # mask is frozen into the trace.
    pyro.clear_param_store()
    model = fixed_model(named_spec("arssm"))
    x, mask, _ = ragged_batch(lengths=(5, 2))
    first, first_mask = _copies(x[:1], mask[:1], 300)
    second, second_mask = _copies(x[1:], mask[1:], 300)
    estimator = jit_elbo(ignore_jit_warnings=True)

    estimator.loss(model.model, model.guide, first, first_mask)
    compiled_loss = estimator.loss(model.model, model.guide, second, second_mask) / 300
    eager = -torch.cat([per_sequence_elbo(model, second, second_mask, seed=seed,
                                          analytic_kl=elbo is TraceMeanField_ELBO).detach()
                        for seed in range(2)])
    error = math.sqrt(eager.var() / 300 + eager.var() / len(eager))

    assert abs(compiled_loss - float(eager.mean())) < 4 * error


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore::DeprecationWarning")
@pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning")
@pytest.mark.parametrize("jit_elbo, elbo", [(JitTrace_ELBO, Trace_ELBO),
                                            (JitTraceMeanField_ELBO, TraceMeanField_ELBO)])
def test_jit_elbo_trains_the_same_parameters(jit_elbo, elbo):
    x, mask, _ = ragged_batch(lengths=(5, 3))
    changed = {}
    for estimator in (jit_elbo(ignore_jit_warnings=True), elbo()):
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = compiled(named_spec("vrnn")).Model(**SMALL)
        before = {name: p.detach().clone() for name, p in model.named_parameters()}
        svi = SVI(model.model, model.guide, Adam({"lr": 0.05}), estimator)

        losses = [svi.step(x.float(), mask) for _ in range(3)]

        assert all(math.isfinite(loss) for loss in losses)
        changed[estimator] = {name for name, p in model.named_parameters()
                              if not torch.equal(before[name], p)}

    jit_changed, eager_changed = changed.values()
    assert jit_changed == eager_changed
    assert len(eager_changed) > 10


# --- devices ------------------------------------------------------------------

@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("stem", ["arssm", "vrnn"])
def test_same_code_runs_on_cuda(stem):
    model = fixed_model(named_spec(stem))
    x, mask, _ = ragged_batch()
    z = torch.randn(2, 5, Z_DIM, dtype=torch.float64)
    conditioned = poutine.condition(model.model, data={"z": z})
    on_cpu = poutine.trace(conditioned).get_trace(x, mask).log_prob_sum()

    model.cuda()
    conditioned = poutine.condition(model.model, data={"z": z.cuda()})
    on_cuda = poutine.trace(conditioned).get_trace(x.cuda(), mask.cuda()).log_prob_sum()
    loss = Trace_ELBO().differentiable_loss(model.model, model.guide, x.cuda(), mask.cuda())
    loss.backward()

    assert torch.allclose(on_cuda.cpu(), on_cpu, rtol=1e-8)
    assert torch.isfinite(loss)
    assert model.sample(2, 4).device.type == "cuda"
    assert model.reconstruct(x.cuda(), mask.cuda()).device.type == "cuda"


# --- every spec compiles, imports and trains ----------------------------------

@pytest.mark.slow
def test_every_spec_trains_with_falling_loss():
    # The loss before and after training is taken at the same guide draws,
    # so a few steps show the fall without Monte Carlo noise hiding it.
    generator = torch.Generator().manual_seed(0)
    x = torch.bernoulli(torch.full((6, 4, X_DIM), 0.2), generator=generator)
    mask = torch.arange(4) < torch.tensor([2, 3, 4, 2, 3, 4])[:, None]
    failures = []
    for path in ALL_SPECS:
        pyro.clear_param_store()
        pyro.set_rng_seed(0)
        model = compiled(path).Model(**SMALL, x_family="bernoulli")
        svi = SVI(model.model, model.guide, Adam({"lr": 0.01}), Trace_ELBO())
        pyro.set_rng_seed(1)
        before = svi.evaluate_loss(x, mask)
        losses = [svi.step(x, mask) for _ in range(8)]
        pyro.set_rng_seed(1)
        after = svi.evaluate_loss(x, mask)
        if not all(math.isfinite(loss) for loss in losses) or not after < before:
            failures.append(f"{spec_id(path)}: {before:.2f} -> {after:.2f}")

    assert not failures


def test_every_spec_compiles_within_a_second():
    seconds = {}
    for path in ALL_SPECS:
        start = time.perf_counter()
        module = load_module(path)
        seconds[spec_id(path)] = time.perf_counter() - start
        assert issubclass(module.Model, torch.nn.Module)
        assert module.Model.spec == path.as_posix()

    slowest = max(seconds, key=seconds.get)
    assert seconds[slowest] < 1.0, f"{slowest} took {seconds[slowest]:.2f} s"
