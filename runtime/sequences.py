"""Distributions over a whole latent sequence z[1:T], one Pyro sample site per sequence.

A compiled model samples z step by step but scores it in one vectorised
call: the prior p(z[1:T] | x) runs its RNNs fused over time, and the guide
keeps the log-density of the sample it drew. Both have batch shape (batch,)
and event shape (time, z_dim); padded steps add nothing to the log-density.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.distributions import constraints, kl_divergence, register_kl

import pyro.distributions as dist
from pyro.distributions import TorchDistribution


def _masked_sum(per_step: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum (batch, time) terms over the real steps only (where() keeps NaN out of gradients)."""
    return torch.where(mask, per_step, torch.zeros_like(per_step)).sum(-1)


class _SequenceDistribution(TorchDistribution):
    arg_constraints: dict = {}
    support = constraints.independent(constraints.real, 2)
    has_rsample = True

    def expand(self, batch_shape, _instance=None):
        # pyro.plate expands every site to its batch shape; these sites already
        # have it, and an expanded copy would lose track of the guide's draw.
        if torch.Size(batch_shape) == self.batch_shape:
            return self
        raise NotImplementedError(
            f"{type(self).__name__} has batch shape {tuple(self.batch_shape)} and cannot be "
            f"expanded to {tuple(batch_shape)}; draw more sequences by enlarging the batch")


class PriorSequence(_SequenceDistribution):
    """p(z[1:T] | x) as a chain of diagonal Gaussians.

    :param callable params: maps z (batch, time, z_dim) to the loc and scale of
        every p(z[t] | parents), computed from z shifted in time.
    :param callable sampler: draws z (batch, time, z_dim) step by step.
    :param torch.Tensor mask: (batch, time) bool, True on real steps.
    """

    def __init__(self, params: Callable, sampler: Callable, mask: torch.Tensor, z_dim: int,
                 validate_args=None):
        self.params, self.sampler, self.mask = params, sampler, mask
        super().__init__(mask.shape[:1], torch.Size((mask.shape[1], z_dim)),
                         validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("PriorSequence draws one sequence per batch element; "
                                      "use a pyro.plate for more")
        return self.sampler()

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        loc, scale = self.params(value)
        per_step = dist.Normal(loc, scale).log_prob(value).sum(-1)
        return _masked_sum(per_step, self.mask)


class PosteriorSequence(_SequenceDistribution):
    """q(z[1:T] | x): drawn step by step by the guide, which also returns its log-density.

    :param callable sampler: returns (z, log_q, loc, scale, flow_used) with z
        (batch, time, z_dim), log_q (batch, time) per-step log-densities, and the
        base Gaussian's loc and scale (batch, time, z_dim).
    :param torch.Tensor mask: (batch, time) bool, True on real steps.
    """

    def __init__(self, sampler: Callable, mask: torch.Tensor, z_dim: int, validate_args=None):
        self.sampler, self.mask = sampler, mask
        self._drawn: tuple | None = None
        super().__init__(mask.shape[:1], torch.Size((mask.shape[1], z_dim)),
                         validate_args=validate_args)

    def rsample(self, sample_shape=torch.Size()):
        if sample_shape:
            raise NotImplementedError("PosteriorSequence draws one sequence per batch element; "
                                      "use a pyro.plate for more")
        self._drawn = self.sampler()
        return self._drawn[0]

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        if self._drawn is None or value is not self._drawn[0]:
            raise NotImplementedError(
                "the guide can score only the sequence it drew itself; replaying another "
                "value into the guide (e.g. poutine.replay on the guide) is not supported")
        return _masked_sum(self._drawn[1], self.mask)

    @property
    def base_params(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Loc and scale of the Gaussian factors of the last draw, or None under a flow."""
        if self._drawn is None or self._drawn[4]:
            return None
        return self._drawn[2], self._drawn[3]


@register_kl(PosteriorSequence, PriorSequence)
def _kl_posterior_prior(q: PosteriorSequence, p: PriorSequence) -> torch.Tensor:
    """Sum over t of KL(q(z[t] | ...) || p(z[t] | z[1:t-1], ...)), at the guide's own draw.

    This is the analytic-KL estimator that TraceMeanField_ELBO uses for
    per-step sites, taken over the whole sequence at once.
    """
    params = q.base_params
    if params is None:
        raise NotImplementedError("no analytic KL under an IAF; the ELBO falls back to sampling")
    z = q._drawn[0]
    prior_loc, prior_scale = p.params(z)
    per_step = kl_divergence(dist.Normal(*params), dist.Normal(prior_loc, prior_scale)).sum(-1)
    return _masked_sum(per_step, q.mask)
