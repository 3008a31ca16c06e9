"""A hand-written Pyro SRNN in the per-step style, with the objective of generated/srnn.py.

Generative model for t = 1..T, with learned z[0], x[0] and d[0]:

    d[t] = GRUCell(x[t-1], d[t-1])
    z[t] ~ Normal(transition(z[t-1], d[t]))
    x[t] ~ Bernoulli(emission(z[t], d[t]))

Guide with full alignment, q(z[t] | z[t-1], d[t], g[t]), where g[t] is a
backward GRU over x[t:T] and the combiner averages tanh(A z[t-1]),
tanh(B d[t]) and g[t]. Every step is its own sample site, and model and
guide each step d with its GRUCell inside the loop.
"""

from __future__ import annotations

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine

from benchmarks.handwritten_common import (Combiner, GaussianMLP, backward_summaries,
                                           check_full_guide, copy_combiner, copy_emission,
                                           copy_gaussian_head, copy_gru, emission_mlp)


class HandwrittenSRNN(nn.Module):
    """SRNN with a full-alignment guide, one Pyro sample site per time step.

    :param int x_dim: width of x (88 piano keys).
    :param int z_dim: width of z.
    :param int d_dim: width of the deterministic state d.
    :param int mlp: hidden width of the transition and emission MLPs.
    :param int inference: width of the guide's backward GRU over x.
    :param tuple changes: must be empty; only the hand-written ArSSM has
        variants (see `benchmarks.handwritten_arssm.CHANGES`).
    """

    def __init__(self, x_dim=88, z_dim=100, d_dim=200, mlp=100, inference=600, changes=()):
        super().__init__()
        if changes:
            raise ValueError(f"the hand-written SRNN has no variants, so changes "
                             f"{tuple(changes)} are invalid")
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.x_0 = nn.Parameter(torch.zeros(x_dim))
        self.d_0 = nn.Parameter(torch.zeros(d_dim))
        self.d_cell = nn.GRUCell(x_dim, d_dim)
        self.transition = GaussianMLP(z_dim + d_dim, mlp, z_dim)
        self.emission = emission_mlp(z_dim + d_dim, mlp, x_dim)
        self.inference_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.g_0 = nn.Parameter(torch.zeros(inference))
        self.combiner = Combiner([z_dim, d_dim], inference, z_dim)

    def model(self, x, mask, annealing_factor=1.0):
        """p(x[1:T], z[1:T]) with sample sites z_t and x_t for t = 1..T."""
        pyro.module("handwritten_srnn", self)
        batch, steps, _ = x.shape
        z_previous = self.z_0.expand(batch, -1)
        x_previous = self.x_0.expand(batch, -1)
        d = self.d_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                d = self.d_cell(x_previous, d)
                loc, scale = self.transition(torch.cat([z_previous, d], dim=-1))
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                logits = self.emission(torch.cat([z_t, d], dim=-1))
                with poutine.mask(mask=mask[:, t]):
                    pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=logits).to_event(1),
                                obs=x[:, t])
                z_previous, x_previous = z_t, x[:, t]

    def guide(self, x, mask, annealing_factor=1.0):
        """q(z[1:T] | x[1:T]) with full alignment, one sample site z_t per step."""
        pyro.module("handwritten_srnn", self)
        batch, steps, _ = x.shape
        g = backward_summaries(self.inference_rnn, self.g_0, x, mask.sum(-1))
        z_previous = self.z_0.expand(batch, -1)
        x_previous = self.x_0.expand(batch, -1)
        d = self.d_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                d = self.d_cell(x_previous, d)
                loc, scale = self.combiner([z_previous, d], [g[:, t]])
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_previous = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                x_previous = x[:, t]


@torch.no_grad()
def copy_compiled_parameters(compiled: nn.Module, handwritten: HandwrittenSRNN) -> None:
    """Copy every weight of a compiled SRNN (generated/srnn.py, guide="full") into `handwritten`."""
    check_full_guide(compiled, "SRNN")
    handwritten.z_0.copy_(compiled.z_0)
    handwritten.x_0.copy_(compiled.x_0)
    handwritten.d_0.copy_(compiled.d.h_0)
    copy_gru(handwritten.d_cell, compiled.d.rnn)
    copy_gaussian_head(handwritten.transition, compiled.transition)
    copy_emission(handwritten.emission, compiled.emission)
    copy_gru(handwritten.inference_rnn, compiled.inference_rnn.backward_rnn.rnn)
    handwritten.g_0.copy_(compiled.inference_rnn.backward_rnn.h_0)
    copy_combiner(handwritten.combiner, compiled.combiner)


Model = HandwrittenSRNN
