"""dmm_aug__zz_xz_zx, compiled by dssm from specs/cells/dmm_aug__zz_xz_zx.dssm.

Cell DMM-Aug(z<-z, x<-z, z<-x) ○ ◑ ◐, known as: no named model.

Generative process for t = 1..T; values before step 1 are learned parameters:
    z[t] ~ Normal(transition(h_z[t-1], h_x[t-1]))
    h_z[t] = gru(z[t], h_z[t-1])
    x[t] ~ Bernoulli(emission(h_z[t], x[t-1]))
    h_x[t] = gru(x[t], h_x[t-1])

Guide, by alignment:
    partial: q(z[t] | z[t-1], x[1:T])
    full:    q(z[t] | h_z[t-1], h_x[t-1], backward RNN over x[t:T]); exact factor p(z[t] | z[1:t-1], x[1:T])

Generated code (generator version 1): edit the spec and run `dssm compile`.
"""

from typing import NamedTuple

import torch
from torch import nn

import pyro
import pyro.distributions as dist
from pyro import poutine

from runtime import blocks
from runtime.sequences import PosteriorSequence, PriorSequence


class States(NamedTuple):
    """The deterministic states over all steps, each (batch, time, size)."""

    h_z: torch.Tensor
    h_x: torch.Tensor


class dmm_aug__zz_xz_zx(nn.Module):
    """dmm_aug__zz_xz_zx over padded batches: x (batch, time, x_dim) and a bool mask (batch, time).

    :param int x_dim: width of x; the spec declares 88.
    :param int z_dim: width of z; the spec declares 16.
    :param str x_family: emission family: bernoulli, normal or exponential.
    :param str guide: "partial" or "full" alignment.
    :param tuple flow: (layers, hidden width) of an inverse autoregressive flow
        on the guide, or None.
    :param int mlp: hidden width of the transition, emission and their MLPs.
    :param int inference: width of the guide's RNN over x.
    """

    spec = "specs/cells/dmm_aug__zz_xz_zx.dssm"
    cell = "DMM-Aug(z<-z, x<-z, z<-x)"

    def __init__(self, x_dim=88, z_dim=16, x_family="bernoulli", guide="full",
                 flow=None, mlp=100, inference=600):
        super().__init__()
        if guide not in ("partial", "full"):
            raise ValueError(f"guide must be 'partial' or 'full', not {guide!r}")
        self.x_dim, self.z_dim, self.alignment = x_dim, z_dim, guide

        # z[0] and x[0]: the values read before step 1
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.x_0 = nn.Parameter(torch.zeros(x_dim))

        # canonical realisation of z[1:t]: h_z[t] = gru(z[t], h_z[t-1]), first needed by `z[t] <- z[1:t-1]`  (spec line 9)
        self.h_z = blocks.Recurrent("gru", z_dim, 200)

        # canonical realisation of x[1:t]: h_x[t] = gru(x[t], h_x[t-1]), first needed by `z[t] <- x[1:t-1]`  (spec line 12)
        self.h_x = blocks.Recurrent("gru", x_dim, 200)

        # z[t] <- z[1:t-1]  (spec line 9)
        # z[t] <- x[1:t-1]  (spec line 12)
        self.transition = blocks.GaussianHead(200 + 200, z_dim, mlp)
        # x[t] <- z[1:t]  (spec line 10)
        # x[t] <- x[t-1]  (spec line 11)
        self.emission = blocks.Emission(x_family, 200 + x_dim, x_dim, mlp)

        if guide == "partial":
            # q(z[t] | z[t-1], x[1:T])
            self.inference_rnn = blocks.InferenceRNN(x_dim, inference, bidirectional=True)
            self.combiner = blocks.Combiner([z_dim], inference, z_dim)
        else:
            # q(z[t] | h_z[t-1], h_x[t-1], backward RNN over x[t:T]); exact factor p(z[t] | z[1:t-1], x[1:T])
            self.inference_rnn = blocks.InferenceRNN(x_dim, inference, bidirectional=False)
            self.combiner = blocks.Combiner([200, 200], inference, z_dim)
        self.flow = blocks.InverseAutoregressiveFlow(z_dim, *flow) if flow else None
        # The states the guide computed for its last draw, which the model reuses.
        self._guide_states = blocks.GuideStates()

    def _states(self, z, x):
        """Run every deterministic state over the whole sequence at once."""
        h_z = self.h_z.sequence(z)
        h_x = self.h_x.sequence(x)
        return States(h_z, h_x)

    def _transition(self, z, x, states):
        """Loc and scale of p(z[t] | h_z[t-1], h_x[t-1]) for every t."""
        return self.transition(torch.cat([blocks.shift(states.h_z, 1, self.h_z.h_0), blocks.shift(states.h_x, 1, self.h_x.h_0)], dim=-1))

    def _emission(self, z, x, states):
        """p(x[t] | h_z[t], x[t-1]) for every t."""
        return self.emission(torch.cat([states.h_z, blocks.shift(x, 1, self.x_0)], dim=-1))

    def model(self, x, mask, annealing_factor=1.0):
        """The generative model p(x[1:T], z[1:T]), scored over all steps at once."""
        pyro.module("dmm_aug__zz_xz_zx", self)
        batch, steps, _ = x.shape
        x = blocks.zero_padding(x, mask)
        states = blocks.StateCache(lambda z: self._states(z, x),
                                   known=self._guide_states.take(x))

        with pyro.plate("sequences", batch):
            with poutine.scale(scale=annealing_factor):
                z = pyro.sample("z", PriorSequence(
                    params=lambda z: self._transition(z, x, states(z)),
                    sampler=lambda: self._generate(batch, steps, x=x)[0],
                    mask=mask, z_dim=self.z_dim))
            p_x = self._emission(z, x, states(z))
            pyro.sample("x", p_x.mask(mask[..., None]).to_event(2), obs=x)

    def _generate(self, batch, steps, x=None):
        """Draw z[1:T] and x[1:T] step by step; a given x is kept (teacher forcing)."""
        z_steps, x_steps = [], []
        h_z_steps, h_z_carry = [], None
        h_x_steps, h_x_carry = [], None
        for t in range(steps):
            loc, scale = self.transition(torch.cat([blocks.at_step(h_z_steps, t - 1, self.h_z.h_0, batch), blocks.at_step(h_x_steps, t - 1, self.h_x.h_0, batch)], dim=-1))
            z_steps.append(dist.Normal(loc, scale).rsample())
            h_z_t, h_z_carry = self.h_z.step(z_steps[t], h_z_carry)
            h_z_steps.append(h_z_t)
            if x is None:
                x_steps.append(self.emission(torch.cat([h_z_steps[t], blocks.at_step(x_steps, t - 1, self.x_0, batch)], dim=-1)).sample())
            else:
                x_steps.append(x[:, t])
            h_x_t, h_x_carry = self.h_x.step(x_steps[t], h_x_carry)
            h_x_steps.append(h_x_t)
        return torch.stack(z_steps, dim=1), torch.stack(x_steps, dim=1)

    def guide(self, x, mask, annealing_factor=1.0):
        """The guide q(z[1:T] | x[1:T]), drawn step by step under the chosen alignment."""
        pyro.module("dmm_aug__zz_xz_zx", self)
        x = blocks.zero_padding(x, mask)
        lengths = mask.sum(-1)

        with pyro.plate("sequences", x.shape[0]):
            with poutine.scale(scale=annealing_factor):
                pyro.sample("z", PosteriorSequence(
                    lambda: self._draw_posterior(x, lengths), mask, self.z_dim))

    def _draw_posterior(self, x, lengths, use_mean=False):
        """Return z[1:T], log q per step, and the Gaussian's loc and scale per step."""
        if self.alignment == "partial":
            return self._draw_partial(x, lengths, use_mean)
        return self._draw_full(x, lengths, use_mean)

    def _draw_partial(self, x, lengths, use_mean):
        """Partial alignment: q(z[t] | z[t-1], x[1:T])."""
        batch, steps, _ = x.shape
        summaries = self.inference_rnn(x, lengths)
        # The combiner's terms that read only x, for all steps at once.
        known = self.combiner.precompute([None], summaries)
        z_steps, log_q, locs, scales = [], [], [], []
        for t in range(steps):
            loc, scale = self.combiner.step(known, t, [blocks.at_step(z_steps, t - 1, self.z_0, batch)])
            z_t, log_q_t = blocks.draw_step(loc, scale, self.flow, use_mean)
            z_steps.append(z_t)
            log_q.append(log_q_t)
            locs.append(loc)
            scales.append(scale)
        z = torch.stack(z_steps, dim=1)
        return (z, torch.stack(log_q, dim=1),
                torch.stack(locs, dim=1), torch.stack(scales, dim=1), self.flow is not None)

    def _draw_full(self, x, lengths, use_mean):
        """Full alignment: q(z[t] | h_z[t-1], h_x[t-1], backward RNN over x[t:T])."""
        batch, steps, _ = x.shape
        summaries = self.inference_rnn(x, lengths)
        h_x = self.h_x.sequence(x, lengths)
        # The combiner's terms that read only x, for all steps at once.
        known = self.combiner.precompute([None, blocks.shift(h_x, 1, self.h_x.h_0)], summaries)
        z_steps, log_q, locs, scales = [], [], [], []
        h_z_steps, h_z_carry = [], None
        for t in range(steps):
            loc, scale = self.combiner.step(known, t, [blocks.at_step(h_z_steps, t - 1, self.h_z.h_0, batch), None])
            z_t, log_q_t = blocks.draw_step(loc, scale, self.flow, use_mean)
            z_steps.append(z_t)
            log_q.append(log_q_t)
            locs.append(loc)
            scales.append(scale)
            h_z_t, h_z_carry = self.h_z.step(z_steps[t], h_z_carry)
            h_z_steps.append(h_z_t)
        z = torch.stack(z_steps, dim=1)
        self._guide_states.store(z, x, States(h_z=torch.stack(h_z_steps, dim=1), h_x=h_x))
        return (z, torch.stack(log_q, dim=1),
                torch.stack(locs, dim=1), torch.stack(scales, dim=1), self.flow is not None)

    @torch.no_grad()
    def sample(self, num_sequences, steps):
        """Draw x[1:steps] from the prior: unconditional generation."""
        return self._generate(num_sequences, steps)[1]

    @torch.no_grad()
    def reconstruct(self, x, mask, num_samples=1):
        """Mean of x[t] given the guide's z, with x teacher-forced.

        Without a flow z is the guide's mean path; with one, the emission
        means of num_samples draws are averaged.
        """
        x = blocks.zero_padding(x, mask)
        lengths = mask.sum(-1)
        if self.flow is None:
            draws = [self._draw_posterior(x, lengths, use_mean=True)[0]]
        else:
            draws = [self._draw_posterior(x, lengths)[0] for _ in range(num_samples)]
        means = [self._emission(z, x, self._states(z, x)).mean for z in draws]
        return torch.stack(means).mean(0)


Model = dmm_aug__zz_xz_zx
