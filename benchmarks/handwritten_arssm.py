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

The `changes` option departs from that style one part at a time, to
measure what each part of the compiled design buys (see CHANGES).
"""

from __future__ import annotations

import torch
from torch import nn
from torch.func import functional_call

import pyro
import pyro.distributions as dist
from pyro import poutine

from benchmarks.handwritten_common import (Combiner, GaussianMLP, backward_summaries,
                                           check_full_guide, copy_combiner, copy_emission,
                                           copy_gaussian_head, copy_gru, emission_mlp)

CHANGES = {
    "unbound": "g, x and the mask are split into steps once (unbind) instead of "
               "sliced at every step",
    "unpacked": "the guide's GRU over x runs over padded steps instead of packed sequences",
    "emission": "the emission runs once on the stacked states, and x is scored in one "
                "call (one site x instead of x_1 .. x_T)",
    "x_rnn": "h2, which reads only x, runs fused over time (nn.GRU on the GRUCell's "
             "weights) in the model and in the guide",
}


def run_fused(cell: nn.GRUCell, template: nn.GRU, inputs: torch.Tensor,
              h_0: torch.Tensor) -> torch.Tensor:
    """Run a GRUCell's weights over (batch, time, input) in one fused nn.GRU call."""
    weights = {"weight_ih_l0": cell.weight_ih, "weight_hh_l0": cell.weight_hh,
               "bias_ih_l0": cell.bias_ih, "bias_hh_l0": cell.bias_hh}
    outputs, _ = functional_call(template, weights, (inputs, h_0[None].contiguous()))
    return outputs


class _Slices:
    """Step t of a (batch, time, ...) tensor, sliced out at each access as a plain loop does."""

    def __init__(self, sequence: torch.Tensor):
        self.sequence = sequence

    def __getitem__(self, t: int) -> torch.Tensor:
        return self.sequence[:, t]


def shift_one_step(states: torch.Tensor, initial: torch.Tensor) -> torch.Tensor:
    """Return h[t-1] for every t of a (batch, time, width) h[1:T], with `initial` as h[0]."""
    start = initial.expand(states.shape[0], 1, states.shape[-1])
    return torch.cat([start, states[:, :-1]], dim=1)


class HandwrittenArSSM(nn.Module):
    """ArSSM with a full-alignment guide, one Pyro sample site per time step.

    :param int x_dim: width of x (88 piano keys).
    :param int z_dim: width of z.
    :param int h_dim: width of the generative RNN states h1 and h2.
    :param int mlp: hidden width of the transition and emission MLPs.
    :param int inference: width of the guide's backward GRU over x.
    :param tuple changes: departures from the per-step style, keys of CHANGES;
        empty for the plain per-step model.
    """

    def __init__(self, x_dim=88, z_dim=100, h_dim=200, mlp=100, inference=600,
                 changes=()):
        super().__init__()
        unknown = set(changes) - set(CHANGES)
        if unknown:
            raise ValueError(f"unknown changes {sorted(unknown)}; "
                             f"choose from {', '.join(CHANGES)}")
        self.changes = frozenset(changes)
        self.z_dim = z_dim

        self.h1_cell = nn.GRUCell(z_dim, h_dim)
        self.h2_cell = nn.GRUCell(x_dim, h_dim)
        self.h1_0 = nn.Parameter(torch.zeros(h_dim))
        self.h2_0 = nn.Parameter(torch.zeros(h_dim))
        self.transition = GaussianMLP(h_dim, mlp, z_dim)
        self.emission = emission_mlp(2 * h_dim, mlp, x_dim)

        self.inference_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.g_0 = nn.Parameter(torch.zeros(inference))
        self.combiner = Combiner([h_dim, h_dim], inference, z_dim)

        # A weightless shape for the fused run of h2; kept in a tuple so that
        # nn.Module does not register its own (unused) parameters.
        self._h2_fused = (nn.GRU(x_dim, h_dim, batch_first=True),)

    def _steps(self, sequence: torch.Tensor):
        """Return the steps of a (batch, time, ...) tensor, indexable by t."""
        if "unbound" in self.changes:
            return sequence.unbind(1)
        return _Slices(sequence)

    def _h2_before_each_step(self, x: torch.Tensor) -> torch.Tensor:
        """h2[t-1] for t = 1..T in one fused call, shape (batch, time, h_dim)."""
        batch = x.shape[0]
        h2 = run_fused(self.h2_cell, self._h2_fused[0], x, self.h2_0.expand(batch, -1))
        return shift_one_step(h2, self.h2_0)

    def model(self, x, mask, annealing_factor=1.0):
        """p(x[1:T], z[1:T]) with sample sites z_t and x_t for t = 1..T."""
        pyro.module("handwritten_arssm", self)
        batch, steps, _ = x.shape
        x_steps, mask_steps = self._steps(x), self._steps(mask)
        h1 = self.h1_0.expand(batch, -1)
        h2 = self.h2_0.expand(batch, -1)
        if "x_rnn" in self.changes:
            h2_previous = self._steps(self._h2_before_each_step(x))
        h1_steps, h2_previous_steps = [], []

        with pyro.plate("sequences", batch):
            for t in range(steps):
                if "x_rnn" in self.changes:
                    h2 = h2_previous[t]
                loc, scale = self.transition(h1)
                with poutine.mask(mask=mask_steps[t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h1 = self.h1_cell(z_t, h1)

                if "emission" in self.changes:
                    h1_steps.append(h1)
                    h2_previous_steps.append(h2)
                else:
                    logits = self.emission(torch.cat([h1, h2], dim=-1))
                    with poutine.mask(mask=mask_steps[t]):
                        pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=logits).to_event(1),
                                    obs=x_steps[t])
                if "x_rnn" not in self.changes:
                    h2 = self.h2_cell(x_steps[t], h2)

            if "emission" in self.changes:
                features = torch.cat([torch.stack(h1_steps, dim=1),
                                      torch.stack(h2_previous_steps, dim=1)], dim=-1)
                p_x = dist.Bernoulli(logits=self.emission(features))
                pyro.sample("x", p_x.mask(mask[..., None]).to_event(2), obs=x)

    def guide(self, x, mask, annealing_factor=1.0):
        """q(z[1:T] | x[1:T]) with full alignment, one sample site z_t per step."""
        pyro.module("handwritten_arssm", self)
        batch, steps, _ = x.shape
        g = backward_summaries(self.inference_rnn, self.g_0, x, mask.sum(-1),
                               packed="unpacked" not in self.changes)
        g_steps, x_steps, mask_steps = self._steps(g), self._steps(x), self._steps(mask)
        h1 = self.h1_0.expand(batch, -1)
        h2 = self.h2_0.expand(batch, -1)
        if "x_rnn" in self.changes:
            h2_previous = self._steps(self._h2_before_each_step(x))

        with pyro.plate("sequences", batch):
            for t in range(steps):
                if "x_rnn" in self.changes:
                    h2 = h2_previous[t]
                loc, scale = self.combiner([h1, h2], [g_steps[t]])
                with poutine.mask(mask=mask_steps[t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h1 = self.h1_cell(z_t, h1)
                if "x_rnn" not in self.changes:
                    h2 = self.h2_cell(x_steps[t], h2)


@torch.no_grad()
def copy_compiled_parameters(compiled: nn.Module, handwritten: HandwrittenArSSM) -> None:
    """Copy every weight of a compiled ArSSM (generated/arssm.py, guide="full") into `handwritten`.

    Afterwards both define the same model and guide. Raises ValueError for
    a partial-alignment or flow guide, which the hand-written model lacks.
    """
    check_full_guide(compiled, "ArSSM")
    copy_gru(handwritten.h1_cell, compiled.h1.rnn)
    copy_gru(handwritten.h2_cell, compiled.h2.rnn)
    handwritten.h1_0.copy_(compiled.h1.h_0)
    handwritten.h2_0.copy_(compiled.h2.h_0)
    copy_gaussian_head(handwritten.transition, compiled.transition)
    copy_emission(handwritten.emission, compiled.emission)
    copy_gru(handwritten.inference_rnn, compiled.inference_rnn.backward_rnn.rnn)
    handwritten.g_0.copy_(compiled.inference_rnn.backward_rnn.h_0)
    copy_combiner(handwritten.combiner, compiled.combiner)


Model = HandwrittenArSSM
