"""A hand-written Pyro ArSSM in the per-step style, the baseline of the speed benchmark.

Generative model for t = 1..T, with learned h1[0] and h2[0]:

    z[t]  ~ Normal(transition(h1[t-1]))
    h1[t] = GRUCell(z[t], h1[t-1])
    x[t]  ~ Bernoulli(emission(h1[t], h2[t-1]))
    h2[t] = GRUCell(x[t], h2[t-1])

Guide with full alignment, q(z[t] | h1[t-1], h2[t-1], g[t]), where g[t] is
a backward GRU over x[t:T] (each sequence reversed within its own length)
and the combiner averages tanh(A h1[t-1]), tanh(B h2[t-1]) and g[t] before
mapping the average to a loc and a softplus scale.

Every step is its own sample site (z_1 .. z_T, x_1 .. x_T), and the model
and the guide each run their RNN cells inside a Python loop over time, as
Pyro's deep Markov model example does. Only the guide's RNN over x runs
fused over time. The objective is that of generated/arssm.py with
guide="full": `copy_compiled_parameters` maps that model's weights here,
and tests/test_benchmark.py checks that the log joints and the guide
densities of both agree on the same z.

The `vectorised` option moves parts of the model out of the loop, one at a
time, to measure what each part of the compiled design buys:

- "emission": the emission runs once on the stacked states and x is
  scored in one call (one site "x" instead of x_1 .. x_T).
- "x_rnn": h2, which reads only x, runs fused over time (nn.GRU on the
  GRUCell's weights) in the model and in the guide.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import pyro
import pyro.distributions as dist
from pyro import poutine

VECTORISED_PARTS = ("emission", "x_rnn")
_MIN_SCALE = 1e-4


def reverse_within_length(sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] steps of each row b of a (batch, time, width) tensor.

    Padded steps stay where they are, so the result is still padded at the end.
    """
    steps = sequence.shape[1]
    positions = torch.arange(steps, device=sequence.device)
    source = lengths[:, None] - 1 - positions
    source = torch.where(source >= 0, source, positions)
    return sequence.gather(1, source[..., None].expand_as(sequence))


def run_fused(cell: nn.GRUCell, template: nn.GRU, inputs: torch.Tensor,
              h_0: torch.Tensor) -> torch.Tensor:
    """Run a GRUCell's weights over (batch, time, input) in one fused nn.GRU call."""
    weights = {"weight_ih_l0": cell.weight_ih, "weight_hh_l0": cell.weight_hh,
               "bias_ih_l0": cell.bias_ih, "bias_hh_l0": cell.bias_hh}
    outputs, _ = functional_call(template, weights, (inputs, h_0[None].contiguous()))
    return outputs


def shift_one_step(states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Return h[t-1] for every t of a (batch, time, width) h[1:T], with `initial` as h[0]."""
    start = initial.expand(states.shape[0], 1, states.shape[-1])
    return torch.cat([start, states[:, :-1]], dim=1)


class GaussianMLP(nn.Module):
    """Features -> ReLU hidden layer -> loc and softplus scale of a diagonal Gaussian."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.loc = nn.Linear(hidden_dim, output_dim)
        self.scale = nn.Linear(hidden_dim, output_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.hidden(features))
        return self.loc(hidden), F.softplus(self.scale(hidden)) + _MIN_SCALE


class FullAlignmentCombiner(nn.Module):
    """q(z[t] | h1[t-1], h2[t-1], g[t]): the mean of tanh(A h1), tanh(B h2) and g, then loc and scale."""

    def __init__(self, h1_dim: int, h2_dim: int, summary_dim: int, z_dim: int):
        super().__init__()
        self.from_h1 = nn.Linear(h1_dim, summary_dim)
        self.from_h2 = nn.Linear(h2_dim, summary_dim)
        self.loc = nn.Linear(summary_dim, z_dim)
        self.scale = nn.Linear(summary_dim, z_dim)

    def forward(self, h1: torch.Tensor, h2: torch.Tensor, g: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        combined = (torch.tanh(self.from_h1(h1)) + torch.tanh(self.from_h2(h2)) + g) / 3
        return self.loc(combined), F.softplus(self.scale(combined)) + _MIN_SCALE


class HandwrittenArSSM(nn.Module):
    """ArSSM with a full-alignment guide, one Pyro sample site per time step.

    :param int x_dim: width of x (88 piano keys).
    :param int z_dim: width of z.
    :param int h_dim: width of the generative RNN states h1 and h2.
    :param int mlp: hidden width of the transition and emission MLPs.
    :param int inference: width of the guide's backward GRU over x.
    :param tuple vectorised: parts of the model taken out of the loop over
        time, a subset of VECTORISED_PARTS; empty for the plain per-step model.
    """

    def __init__(self, x_dim=88, z_dim=100, h_dim=200, mlp=100, inference=600,
                 vectorised=()):
        super().__init__()
        unknown = set(vectorised) - set(VECTORISED_PARTS)
        if unknown:
            raise ValueError(f"unknown vectorised parts {sorted(unknown)}; "
                             f"choose from {', '.join(VECTORISED_PARTS)}")
        self.vectorised = frozenset(vectorised)
        self.z_dim = z_dim

        self.h1_cell = nn.GRUCell(z_dim, h_dim)
        self.h2_cell = nn.GRUCell(x_dim, h_dim)
        self.h1_0 = nn.Parameter(torch.zeros(h_dim))
        self.h2_0 = nn.Parameter(torch.zeros(h_dim))
        self.transition = GaussianMLP(h_dim, mlp, z_dim)
        self.emission = nn.Sequential(nn.Linear(2 * h_dim, mlp), nn.ReLU(), nn.Linear(mlp, x_dim))

        self.inference_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.g_0 = nn.Parameter(torch.zeros(inference))
        self.combiner = FullAlignmentCombiner(h_dim, h_dim, inference, z_dim)

        # A weightless shape for the fused run of h2; kept in a tuple so that
        # nn.Module does not register its own (unused) parameters.
        self._h2_fused = (nn.GRU(x_dim, h_dim, batch_first=True),)

    def _h2_before_each_step(self, x: torch.Tensor) -> torch.Tensor:
        """h2[t-1] for t = 1..T in one fused call, shape (batch, time, h_dim)."""
        batch = x.shape[0]
        h2 = run_fused(self.h2_cell, self._h2_fused[0], x, self.h2_0.expand(batch, -1))
        return shift_one_step(h2, self.h2_0)

    def model(self, x, mask, annealing_factor=1.0):
        """p(x[1:T], z[1:T]) with sample sites z_t and x_t for t = 1..T."""
        pyro.module("handwritten_arssm", self)
        batch, steps, _ = x.shape
        h1 = self.h1_0.expand(batch, -1)
        h2 = self.h2_0.expand(batch, -1)
        if "x_rnn" in self.vectorised:
            h2_previous = self._h2_before_each_step(x)
        h1_steps, h2_previous_steps = [], []

        with pyro.plate("sequences", batch):
            for t in range(steps):
                if "x_rnn" in self.vectorised:
                    h2 = h2_previous[:, t]
                loc, scale = self.transition(h1)
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h1 = self.h1_cell(z_t, h1)

                if "emission" in self.vectorised:
                    h1_steps.append(h1)
                    h2_previous_steps.append(h2)
                else:
                    logits = self.emission(torch.cat([h1, h2], dim=-1))
                    with poutine.mask(mask=mask[:, t]):
                        pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=logits).to_event(1),
                                    obs=x[:, t])
                if "x_rnn" not in self.vectorised:
                    h2 = self.h2_cell(x[:, t], h2)

            if "emission" in self.vectorised:
                features = torch.cat([torch.stack(h1_steps, dim=1),
                                      torch.stack(h2_previous_steps, dim=1)], dim=-1)
                p_x = dist.Bernoulli(logits=self.emission(features))
                pyro.sample("x", p_x.mask(mask[..., None]).to_event(2), obs=x)

    def backward_summaries(self, x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """g[t] for every t: the backward GRU over x[t:T], shape (batch, time, inference)."""
        batch, steps, _ = x.shape
        packed = pack_padded_sequence(reverse_within_length(x, lengths), lengths.cpu(),
                                      batch_first=True, enforce_sorted=False)
        g_0 = self.g_0.expand(1, batch, -1).contiguous()
        outputs, _ = self.inference_rnn(packed, g_0)
        outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=steps)
        return reverse_within_length(outputs, lengths)

    def guide(self, x, mask, annealing_factor=1.0):
        """q(z[1:T] | x[1:T]) with full alignment, one sample site z_t per step."""
        pyro.module("handwritten_arssm", self)
        batch, steps, _ = x.shape
        lengths = mask.sum(-1)
        g = self.backward_summaries(x, lengths)
        h1 = self.h1_0.expand(batch, -1)
        h2 = self.h2_0.expand(batch, -1)
        if "x_rnn" in self.vectorised:
            h2_previous = self._h2_before_each_step(x)

        with pyro.plate("sequences", batch):
            for t in range(steps):
                if "x_rnn" in self.vectorised:
                    h2 = h2_previous[:, t]
                loc, scale = self.combiner(h1, h2, g[:, t])
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h1 = self.h1_cell(z_t, h1)
                if "x_rnn" not in self.vectorised:
                    h2 = self.h2_cell(x[:, t], h2)


def _copy_gru(target_cell: nn.GRUCell, source_rnn: nn.GRU) -> None:
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(target_cell, name).copy_(getattr(source_rnn, name + "_l0"))


def _copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


@torch.no_grad()
def copy_compiled_parameters(compiled: nn.Module, handwritten: HandwrittenArSSM) -> None:
    """Copy every weight of a compiled ArSSM (generated/arssm.py, guide="full") into `handwritten`.

    Afterwards both define the same model and guide. Raises ValueError for
    a partial-alignment or flow guide, which the hand-written model lacks.
    """
    if compiled.alignment != "full" or compiled.flow is not None:
        raise ValueError("the hand-written ArSSM has a full-alignment guide without a flow; "
                         "build the compiled one with guide='full' and flow=None")

    _copy_gru(handwritten.h1_cell, compiled.h1.rnn)
    _copy_gru(handwritten.h2_cell, compiled.h2.rnn)
    handwritten.h1_0.copy_(compiled.h1.h_0)
    handwritten.h2_0.copy_(compiled.h2.h_0)

    _copy_linear(handwritten.transition.hidden, compiled.transition.hidden[0])
    _copy_linear(handwritten.transition.loc, compiled.transition.loc)
    _copy_linear(handwritten.transition.scale, compiled.transition.scale)
    _copy_linear(handwritten.emission[0], compiled.emission.net[0])
    _copy_linear(handwritten.emission[2], compiled.emission.net[2])

    backward_rnn = compiled.inference_rnn.backward_rnn
    for name in ("weight_ih_l0", "weight_hh_l0", "bias_ih_l0", "bias_hh_l0"):
        getattr(handwritten.inference_rnn, name).copy_(getattr(backward_rnn.rnn, name))
    handwritten.g_0.copy_(backward_rnn.h_0)
    _copy_linear(handwritten.combiner.from_h1, compiled.combiner.projections[0])
    _copy_linear(handwritten.combiner.from_h2, compiled.combiner.projections[1])
    _copy_linear(handwritten.combiner.loc, compiled.combiner.loc)
    _copy_linear(handwritten.combiner.scale, compiled.combiner.scale)


Model = HandwrittenArSSM
