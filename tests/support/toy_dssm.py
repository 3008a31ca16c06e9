"""Small hand-written models with the compiled-model interface, for testing the runtime.

A compiled model is an nn.Module with `model(x, mask, annealing_factor)`,
`guide(x, mask, annealing_factor)`, `sample(num_sequences, steps)` and
`reconstruct(x, mask, num_samples)`. Every sample site sits in the
"sequences" plate at dim -1, padded steps are masked inside the
distributions, and latent sites are scaled by the annealing factor.
"""

from __future__ import annotations

import math

import pyro
import pyro.distributions as dist
import torch
from pyro import poutine
from torch import nn


class ToyDMM(nn.Module):
    """A tiny deep Markov model with a Bernoulli emission and a backward-RNN guide.

    z[t] ~ Normal(loc(z[t-1]), softplus(scale(z[t-1]))),
    x[t] ~ Bernoulli(logits=emitter(z[t])),
    q(z[t] | z[t-1], x[t:T]) from a combiner of z[t-1] and a backward GRU state.

    :param int x_dim: the dimension of one observed step.
    :param int z_dim: the dimension of the latent state.
    :param int hidden_dim: the width of the guide's GRU.
    """

    def __init__(self, x_dim: int = 3, z_dim: int = 2, hidden_dim: int = 4):
        super().__init__()
        self.x_dim = x_dim
        self.z_dim = z_dim
        self.transition = nn.Linear(z_dim, 2 * z_dim)
        self.emitter = nn.Linear(z_dim, x_dim)
        self.backward_rnn = nn.GRU(x_dim, hidden_dim, batch_first=True)
        self.combiner = nn.Linear(z_dim + hidden_dim, 2 * z_dim)
        self.z_0 = nn.Parameter(torch.zeros(z_dim))
        self.z_q_0 = nn.Parameter(torch.zeros(z_dim))

    def transition_dist(self, z_previous, step_mask):
        loc, raw_scale = self.transition(z_previous).chunk(2, dim=-1)
        scale = nn.functional.softplus(raw_scale) + 1e-3
        return dist.Normal(loc, scale).mask(step_mask.unsqueeze(-1)).to_event(1)

    def emission_dist(self, z, step_mask):
        return dist.Bernoulli(logits=self.emitter(z)).mask(step_mask.unsqueeze(-1)).to_event(1)

    def model(self, x, mask, annealing_factor=1.0):
        pyro.module("toy_dmm", self)
        batch_size, steps, _ = x.shape
        z_previous = self.z_0.expand(batch_size, self.z_dim)
        with pyro.plate("sequences", batch_size, dim=-1):
            for t in range(steps):
                with poutine.scale(scale=annealing_factor):
                    z = pyro.sample(f"z_{t + 1}", self.transition_dist(z_previous, mask[:, t]))
                pyro.sample(f"x_{t + 1}", self.emission_dist(z, mask[:, t]), obs=x[:, t])
                z_previous = z

    def guide(self, x, mask, annealing_factor=1.0):
        pyro.module("toy_dmm", self)
        batch_size, steps, _ = x.shape

        # The backward RNN reads x[t:T]: run it over the time-reversed sequence.
        # Padding comes first in the reversed order, which is good enough for a test model.
        reversed_states, _ = self.backward_rnn(x.flip(1))
        states = reversed_states.flip(1)

        z_previous = self.z_q_0.expand(batch_size, self.z_dim)
        with pyro.plate("sequences", batch_size, dim=-1):
            for t in range(steps):
                combined = torch.cat([torch.tanh(z_previous), states[:, t]], dim=-1)
                loc, raw_scale = self.combiner(combined).chunk(2, dim=-1)
                scale = nn.functional.softplus(raw_scale) + 1e-3
                posterior = dist.Normal(loc, scale).mask(mask[:, t].unsqueeze(-1)).to_event(1)
                with poutine.scale(scale=annealing_factor):
                    z_previous = pyro.sample(f"z_{t + 1}", posterior)

    @torch.no_grad()
    def sample(self, num_sequences: int, steps: int) -> torch.Tensor:
        mask = torch.ones(num_sequences, steps, dtype=torch.bool)
        x = torch.zeros(num_sequences, steps, self.x_dim)
        trace = poutine.trace(poutine.uncondition(self.model)).get_trace(x, mask)
        return torch.stack([trace.nodes[f"x_{t + 1}"]["value"] for t in range(steps)], dim=1)

    @torch.no_grad()
    def reconstruct(self, x, mask, num_samples: int = 1) -> torch.Tensor:
        means = torch.zeros_like(x)
        for _ in range(num_samples):
            guide_trace = poutine.trace(self.guide).get_trace(x, mask)
            for t in range(x.shape[1]):
                z = guide_trace.nodes[f"z_{t + 1}"]["value"]
                means[:, t] += torch.sigmoid(self.emitter(z)) / num_samples
        return means


class LinearGaussian(nn.Module):
    """A linear-Gaussian model whose guide can be the exact posterior.

    Each sequence has one latent level z ~ Normal(0, 1) per dimension and
    x[t] ~ Normal(z, noise_scale) at every real step. With n real steps the
    posterior is Normal(sum(x) / (n + s^2), s / sqrt(n + s^2)) for
    s = noise_scale, and log p(x) is a closed-form Gaussian density.

    :param int x_dim: the dimension of one observed step.
    :param float noise_scale: the observation noise's standard deviation s.
    :param float guide_shift: added to the exact posterior mean; 0 gives the
        exact posterior, anything else a deliberately wrong guide.
    """

    def __init__(self, x_dim: int = 2, noise_scale: float = 0.5, guide_shift: float = 0.0):
        super().__init__()
        self.x_dim = x_dim
        self.noise_scale = noise_scale
        self.guide_shift = guide_shift
        # An unused parameter gives the trainer something to checkpoint.
        self.unused = nn.Parameter(torch.zeros(1))

    def model(self, x, mask, annealing_factor=1.0):
        batch_size = x.shape[0]
        with pyro.plate("sequences", batch_size, dim=-1):
            with poutine.scale(scale=annealing_factor):
                z = pyro.sample("z", dist.Normal(x.new_zeros(batch_size, self.x_dim), 1.0)
                                .to_event(1))
            emission = dist.Normal(z.unsqueeze(1).expand(x.shape), self.noise_scale)
            pyro.sample("x", emission.mask(mask.unsqueeze(-1)).to_event(2), obs=x)

    def posterior(self, x, mask):
        """Return the exact posterior's mean and standard deviation, each (B, D)."""
        variance = self.noise_scale ** 2
        steps = mask.sum(1, keepdim=True).to(x.dtype)
        total = (x * mask.unsqueeze(-1)).sum(1)
        loc = total / (steps + variance)
        scale = (self.noise_scale / torch.sqrt(steps + variance)).expand_as(loc)
        return loc, scale

    def guide(self, x, mask, annealing_factor=1.0):
        loc, scale = self.posterior(x, mask)
        with pyro.plate("sequences", x.shape[0], dim=-1):
            with poutine.scale(scale=annealing_factor):
                pyro.sample("z", dist.Normal(loc + self.guide_shift, scale).to_event(1))

    def exact_log_likelihood(self, x, mask) -> torch.Tensor:
        """Return log p(x) of each sequence, shape (B,).

        Per dimension the n real steps are jointly Normal(0, s^2 I + 1 1^T),
        whose determinant is s^(2n) (1 + n / s^2) and whose inverse is
        (I - 1 1^T / (n + s^2)) / s^2.
        """
        variance = self.noise_scale ** 2
        steps = mask.sum(1).to(x.dtype)
        masked = x * mask.unsqueeze(-1)
        total = masked.sum(1)
        squares = (masked ** 2).sum(1)
        quadratic = (squares - total ** 2 / (steps + variance).unsqueeze(-1)) / variance
        log_det = steps * math.log(variance) + torch.log1p(steps / variance)
        per_dimension = -0.5 * (quadratic + log_det.unsqueeze(-1)
                                + steps.unsqueeze(-1) * math.log(2 * math.pi))
        return per_dimension.sum(-1)

    def sample(self, num_sequences: int, steps: int) -> torch.Tensor:
        z = torch.randn(num_sequences, 1, self.x_dim)
        return z + self.noise_scale * torch.randn(num_sequences, steps, self.x_dim)

    def reconstruct(self, x, mask, num_samples: int = 1) -> torch.Tensor:
        loc, _ = self.posterior(x, mask)
        return (loc + self.guide_shift).unsqueeze(1).expand(x.shape) * mask.unsqueeze(-1)


class ExplodingDMM(ToyDMM):
    """A ToyDMM whose emission logits are NaN on every call, as after a divergence."""

    def emission_dist(self, z, step_mask):
        logits = self.emitter(z) * torch.tensor(float("nan"))
        return dist.Bernoulli(logits=logits).mask(step_mask.unsqueeze(-1)).to_event(1)
