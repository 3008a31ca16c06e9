"""A hand-written Pyro VRNN in the per-step style, with the objective of generated/vrnn.py.

Generative model for t = 1..T, with learned x[0] and h[0]:

    z[t] ~ Normal(transition(x[t-1], h[t-1]))
    h[t] = GRUCell([x[t-1], z[t]], h[t-1])
    x[t] ~ Bernoulli(emission(h[t]))

Guide with full alignment, q(z[t] | h[t-1], b[t], f[t]), where b[t] is a
backward GRU over x[t:T], f[t] a forward GRU over x[1:t], and the combiner
averages tanh(A h[t-1]), b[t] and f[t]. Every step is its own sample site,
and model and guide each step h with its GRUCell inside the loop.
"""

from __future__ import annotations

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine

from benchmarks.handwritten_common import (Combiner, GaussianMLP, backward_summaries,
                                           check_full_guide, copy_combiner, copy_emission,
                                           copy_gaussian_head, copy_gru, emission_mlp,
                                           run_packed)


class HandwrittenVRNN(nn.Module):
    """VRNN with a full-alignment guide, one Pyro sample site per time step.

    :param int x_dim: width of x (88 piano keys).
    :param int z_dim: width of z.
    :param int h_dim: width of the deterministic state h.
    :param int mlp: hidden width of the transition and emission MLPs.
    :param int inference: width of each direction of the guide's GRU over x.
    :param tuple changes: must be empty; only the hand-written ArSSM has
        variants (see `benchmarks.handwritten_arssm.CHANGES`).
    """

    def __init__(self, x_dim=88, z_dim=100, h_dim=200, mlp=100, inference=600, changes=()):
        super().__init__()
        if changes:
            raise ValueError(f"the hand-written VRNN has no variants, so changes "
                             f"{tuple(changes)} are invalid")
        self.x_0 = nn.Parameter(torch.zeros(x_dim))
        self.h_0 = nn.Parameter(torch.zeros(h_dim))
        self.h_cell = nn.GRUCell(x_dim + z_dim, h_dim)
        self.transition = GaussianMLP(x_dim + h_dim, mlp, z_dim)
        self.emission = emission_mlp(h_dim, mlp, x_dim)
        self.backward_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.backward_0 = nn.Parameter(torch.zeros(inference))
        self.forward_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.forward_0 = nn.Parameter(torch.zeros(inference))
        self.combiner = Combiner([h_dim], inference, z_dim)

    def model(self, x, mask, annealing_factor=1.0):
        """p(x[1:T], z[1:T]) with sample sites z_t and x_t for t = 1..T."""
        pyro.module("handwritten_vrnn", self)
        batch, steps, _ = x.shape
        x_previous = self.x_0.expand(batch, -1)
        h = self.h_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                loc, scale = self.transition(torch.cat([x_previous, h], dim=-1))
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h = self.h_cell(torch.cat([x_previous, z_t], dim=-1), h)
                with poutine.mask(mask=mask[:, t]):
                    pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=self.emission(h)).to_event(1),
                                obs=x[:, t])
                x_previous = x[:, t]

    def guide(self, x, mask, annealing_factor=1.0):
        """q(z[1:T] | x[1:T]) with full alignment, one sample site z_t per step."""
        pyro.module("handwritten_vrnn", self)
        batch, steps, _ = x.shape
        lengths = mask.sum(-1)
        backward = backward_summaries(self.backward_rnn, self.backward_0, x, lengths)
        forward = run_packed(self.forward_rnn, x, lengths, self.forward_0)
        x_previous = self.x_0.expand(batch, -1)
        h = self.h_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                loc, scale = self.combiner([h], [backward[:, t], forward[:, t]])
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                h = self.h_cell(torch.cat([x_previous, z_t], dim=-1), h)
                x_previous = x[:, t]


@torch.no_grad()
def copy_compiled_parameters(compiled: nn.Module, handwritten: HandwrittenVRNN) -> None:
    """Copy every weight of a compiled VRNN (generated/vrnn.py, guide="full") into `handwritten`."""
    check_full_guide(compiled, "VRNN")
    handwritten.x_0.copy_(compiled.x_0)
    handwritten.h_0.copy_(compiled.h.h_0)
    copy_gru(handwritten.h_cell, compiled.h.rnn)
    copy_gaussian_head(handwritten.transition, compiled.transition)
    copy_emission(handwritten.emission, compiled.emission)
    inference = compiled.inference_rnn
    copy_gru(handwritten.backward_rnn, inference.backward_rnn.rnn)
    handwritten.backward_0.copy_(inference.backward_rnn.h_0)
    copy_gru(handwritten.forward_rnn, inference.forward_rnn.rnn)
    handwritten.forward_0.copy_(inference.forward_rnn.h_0)
    copy_combiner(handwritten.combiner, compiled.combiner)


Model = HandwrittenVRNN
