"""A hand-written Pyro DMM in the per-step style, with the objective of generated/dmm.py.

Generative model for t = 1..T, with a learned z[0]:

    z[t] ~ Normal(transition(z[t-1]))
    x[t] ~ Bernoulli(emission(z[t]))

Guide with full alignment, q(z[t] | z[t-1], g[t]), where g[t] is a backward
GRU over x[t:T] and the combiner averages tanh(A z[t-1]) and g[t]. Every
step is its own sample site (z_1 .. z_T, x_1 .. x_T).
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


class HandwrittenDMM(nn.Module):
    """DMM with a full-alignment guide, one Pyro sample site per time step.

    :param int x_dim: width of x (88 piano keys).
    :param int z_dim: width of z.
    :param int mlp: hidden width of the transition and emission MLPs.
    :param int inference: width of the guide's backward GRU over x.
    :param tuple changes: must be empty; only the hand-written ArSSM has
        variants (see `benchmarks.handwritten_arssm.CHANGES`).
    """

    def __init__(self, x_dim=88, z_dim=100, mlp=100, inference=600, changes=()):
        super().__init__()
        if changes:
            raise ValueError(f"the hand-written DMM has no variants, so changes "
                             f"{tuple(changes)} are invalid")
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.transition = GaussianMLP(z_dim, mlp, z_dim)
        self.emission = emission_mlp(z_dim, mlp, x_dim)
        self.inference_rnn = nn.GRU(x_dim, inference, batch_first=True)
        self.g_0 = nn.Parameter(torch.zeros(inference))
        self.combiner = Combiner([z_dim], inference, z_dim)

    def model(self, x, mask, annealing_factor=1.0):
        """p(x[1:T], z[1:T]) with sample sites z_t and x_t for t = 1..T."""
        pyro.module("handwritten_dmm", self)
        batch, steps, _ = x.shape
        z_previous = self.z_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                loc, scale = self.transition(z_previous)
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_t = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))
                with poutine.mask(mask=mask[:, t]):
                    pyro.sample(f"x_{t + 1}", dist.Bernoulli(logits=self.emission(z_t)).to_event(1),
                                obs=x[:, t])
                z_previous = z_t

    def guide(self, x, mask, annealing_factor=1.0):
        """q(z[1:T] | x[1:T]) with full alignment, one sample site z_t per step."""
        pyro.module("handwritten_dmm", self)
        batch, steps, _ = x.shape
        g = backward_summaries(self.inference_rnn, self.g_0, x, mask.sum(-1))
        z_previous = self.z_0.expand(batch, -1)
        with pyro.plate("sequences", batch):
            for t in range(steps):
                loc, scale = self.combiner([z_previous], [g[:, t]])
                with poutine.mask(mask=mask[:, t]), poutine.scale(scale=annealing_factor):
                    z_previous = pyro.sample(f"z_{t + 1}", dist.Normal(loc, scale).to_event(1))


@torch.no_grad()
def copy_compiled_parameters(compiled: nn.Module, handwritten: HandwrittenDMM) -> None:
    """Copy every weight of a compiled DMM (generated/dmm.py, guide="full") into `handwritten`."""
    check_full_guide(compiled, "DMM")
    handwritten.z_0.copy_(compiled.z_0)
    copy_gaussian_head(handwritten.transition, compiled.transition)
    copy_emission(handwritten.emission, compiled.emission)
    copy_gru(handwritten.inference_rnn, compiled.inference_rnn.backward_rnn.rnn)
    handwritten.g_0.copy_(compiled.inference_rnn.backward_rnn.h_0)
    copy_combiner(handwritten.combiner, compiled.combiner)


Model = HandwrittenDMM
