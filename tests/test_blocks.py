"""The speed-ups in runtime/blocks.py compute what the plain formulation computes."""

import copy

import pyro
import pyro.distributions as dist
import pytest
import torch
from pyro import poutine

from runtime import blocks
from taxonomy.build import build_model

SMALL = {"x_dim": 6, "z_dim": 3, "mlp": 5, "inference": 7}


def padded_batch(lengths, x_dim=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.tensor(lengths)
    steps = int(lengths.max())
    mask = torch.arange(steps)[None] < lengths[:, None]
    x = (torch.rand(len(lengths), steps, x_dim, generator=generator) < 0.5).float()
    return x * mask[..., None], mask


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_recurrent_step_matches_sequence(cell):
    torch.manual_seed(0)
    recurrent = blocks.Recurrent(cell, 4, 5)
    torch.nn.init.normal_(recurrent.h_0)
    inputs = torch.randn(3, 6, 4)

    carry, steps = None, []
    for t in range(6):
        output, carry = recurrent.step(inputs[:, t], carry)
        steps.append(output)

    torch.testing.assert_close(torch.stack(steps, dim=1), recurrent.sequence(inputs))


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_sequence_within_lengths_matches_real_steps(cell):
    torch.manual_seed(0)
    recurrent = blocks.Recurrent(cell, 4, 5)
    steps = 2 * blocks.SKIP_BLOCK + 3
    inputs = torch.randn(4, steps, 4)
    lengths = torch.tensor([3, steps, 0, blocks.SKIP_BLOCK + 1])
    mask = torch.arange(steps)[None] < lengths[:, None]

    skipping = recurrent.sequence(inputs, lengths)
    full = recurrent.sequence(inputs)

    assert skipping.shape == full.shape
    torch.testing.assert_close(skipping[mask], full[mask])


def test_sequence_within_lengths_passes_gradients_of_real_steps():
    torch.manual_seed(0)
    recurrent = blocks.Recurrent("gru", 4, 5)
    inputs = torch.randn(3, 20, 4, requires_grad=True)
    lengths = torch.tensor([20, 5, 17])
    mask = torch.arange(20)[None] < lengths[:, None]

    skipping_grad, = torch.autograd.grad(recurrent.sequence(inputs, lengths)[mask].sum(), inputs)
    full_grad, = torch.autograd.grad(recurrent.sequence(inputs)[mask].sum(), inputs)

    torch.testing.assert_close(skipping_grad, full_grad)


def test_draw_step_log_density_is_the_normal_log_density():
    torch.manual_seed(0)
    loc, scale = torch.randn(4, 3), torch.rand(4, 3) + 0.1

    z, log_q = blocks.draw_step(loc, scale, flow=None)
    mean, log_q_at_mean = blocks.draw_step(loc, scale, flow=None, use_mean=True)

    torch.testing.assert_close(log_q, dist.Normal(loc, scale).log_prob(z).sum(-1))
    torch.testing.assert_close(mean, loc)
    torch.testing.assert_close(log_q_at_mean, dist.Normal(loc, scale).log_prob(loc).sum(-1))


def test_combiner_step_matches_forward_with_precomputed_terms():
    torch.manual_seed(0)
    combiner = blocks.Combiner([2, 4, 3], 5, 2)
    features = [torch.randn(3, 6, width) for width in (2, 4, 3)]
    summaries = [torch.randn(3, 6, 5), torch.randn(3, 6, 5)]

    known = combiner.precompute([None, features[1], None], summaries)

    assert known.count == 5
    for t in range(6):
        expected = combiner([feature[:, t] for feature in features],
                            [summary[:, t] for summary in summaries])
        stepped = combiner.step(known, t, [features[0][:, t], None, features[2][:, t]])
        torch.testing.assert_close(stepped, expected)


def joint_terms(model, x, mask):
    """The guide's trace, the model replayed on it, and log p - log q per sequence."""
    guide_trace = poutine.trace(model.guide).get_trace(x, mask, 0.5)
    model_trace = poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(
        x, mask, 0.5)
    guide_trace.compute_log_prob()
    model_trace.compute_log_prob()
    log_p = sum(site["log_prob"] for site in model_trace.nodes.values()
                if site["type"] == "sample")
    return guide_trace, log_p - guide_trace.nodes["z"]["log_prob"]


def count_state_runs(model):
    calls = []
    original = model._states
    model._states = lambda z, x: calls.append(1) or original(z, x)
    return calls


def test_model_reuses_the_full_guides_states():
    torch.manual_seed(0)
    model = build_model("specs/arssm.dssm", guide="full", **SMALL)
    x, mask = padded_batch([5, 2, 4])
    calls = count_state_runs(model)

    joint_terms(model, x, mask)

    assert calls == []


class NothingStored(blocks.GuideStates):
    """A slot that never keeps the guide's states, so the model computes its own."""

    def store(self, z, x, states):
        pass


def test_reused_states_give_the_recomputed_elbo_and_gradients():
    torch.manual_seed(0)
    model = build_model("specs/arssm.dssm", guide="full", **SMALL)
    names = [name for name, _ in model.named_parameters()]
    x, mask = padded_batch([5, 2, 4])
    pyro.set_rng_seed(1)
    _, reused = joint_terms(model, x, mask)
    reused_grads = torch.autograd.grad(reused.sum(), list(model.parameters()), allow_unused=True)

    model._guide_states = NothingStored()
    pyro.set_rng_seed(1)
    _, recomputed = joint_terms(model, x, mask)
    recomputed_grads = torch.autograd.grad(recomputed.sum(), list(model.parameters()),
                                           allow_unused=True)

    torch.testing.assert_close(reused, recomputed)
    for name, reused_grad, recomputed_grad in zip(names, reused_grads, recomputed_grads):
        assert (reused_grad is None) == (recomputed_grad is None), name
        if reused_grad is not None:
            torch.testing.assert_close(reused_grad, recomputed_grad, msg=name)


def test_states_are_not_reused_for_another_x():
    torch.manual_seed(0)
    model = build_model("specs/arssm.dssm", guide="full", **SMALL)
    x, mask = padded_batch([5, 2, 4])
    other_x, _ = padded_batch([5, 2, 4], seed=1)
    calls = count_state_runs(model)

    guide_trace = poutine.trace(model.guide).get_trace(x, mask, 1.0)
    poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(other_x, mask, 1.0)

    assert calls == [1]


def test_states_drawn_without_gradients_are_not_reused_with_them():
    torch.manual_seed(0)
    model = build_model("specs/arssm.dssm", guide="full", **SMALL)
    x, mask = padded_batch([5, 2, 4])
    calls = count_state_runs(model)

    with torch.no_grad():
        guide_trace = poutine.trace(model.guide).get_trace(x, mask, 1.0)
    poutine.trace(poutine.replay(model.model, trace=guide_trace)).get_trace(x, mask, 1.0)

    assert calls == [1]


def test_model_copies_after_a_guide_draw():
    torch.manual_seed(0)
    model = build_model("specs/arssm.dssm", guide="full", **SMALL)
    x, mask = padded_batch([5, 2, 4])
    poutine.trace(model.guide).get_trace(x, mask, 1.0)

    copied = copy.deepcopy(model)

    assert copied._guide_states.take(blocks.zero_padding(x, mask)) is None


def test_set_dropout_acts_only_in_training():
    model = build_model("specs/arssm.dssm", **SMALL)
    keys = set(model.state_dict())
    features = torch.randn(4, 200 + 200)

    assert blocks.set_dropout(model, 0.5) == 2
    assert set(model.state_dict()) == keys
    model.eval()
    first = model.emission(features).logits
    assert torch.equal(first, model.emission(features).logits)
    model.train()
    assert not torch.equal(first, model.emission(features).logits)


def test_dropout_off_by_default():
    model = build_model("specs/arssm.dssm", **SMALL)
    features = torch.randn(4, 200 + 200)

    assert torch.equal(model.emission(features).logits, model.emission(features).logits)
    loc, _ = model.transition(features[:, :200])
    assert torch.equal(loc, model.transition(features[:, :200])[0])
