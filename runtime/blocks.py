"""Building blocks that compiled models are assembled from.

Everything here works on padded batches: sequences are tensors of shape
(batch, time, features) and a boolean mask of shape (batch, time) marks the
real steps.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN

EMISSION_FAMILIES = ("bernoulli", "normal", "exponential")
_MIN_SCALE = 1e-4


def shift(sequence: torch.Tensor, lag: int, initial: torch.Tensor) -> torch.Tensor:
    """Delay a (batch, time, features) sequence by `lag` steps, filling the start with `initial`.

    shift(h, 1, h_0)[:, t] is h[:, t-1], the value one step back; lag 0 returns
    the sequence itself.
    """
    if lag == 0:
        return sequence
    batch, steps, width = sequence.shape
    start = initial.expand(batch, min(lag, steps), width)
    return torch.cat([start, sequence[:, :max(steps - lag, 0)]], dim=1)


def at_step(history: list[torch.Tensor], step: int, initial: torch.Tensor,
            batch: int) -> torch.Tensor:
    """history[step] of a list of per-step (batch, features) tensors, or `initial` before it.

    Steps count from 0 here, so a negative step is before the sequence starts.
    """
    if step >= 0:
        return history[step]
    return initial.expand(batch, initial.shape[-1])


def draw_step(loc: torch.Tensor, scale: torch.Tensor, flow: nn.Module | None,
              use_mean: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw z[t] from the guide's Gaussian, pushed through the flow if there is one.

    Returns z[t] (batch, z_dim) and log q(z[t] | ...) (batch,). With use_mean
    the Gaussian's mean replaces the draw, for reconstruction.
    """
    base = dist.Normal(loc, scale)
    u = loc if use_mean else base.rsample()
    log_q = base.log_prob(u).sum(-1)
    if flow is None:
        return u, log_q
    z, log_det = flow(u)
    return z, log_q - log_det


class StateCache:
    """Remember the deterministic states computed for the last latent sequence.

    The prior's log-density and the emission both need the states of the same
    z; this runs the RNNs once for both.
    """

    def __init__(self, compute):
        self.compute = compute
        self._z = None
        self._states = None

    def __call__(self, z: torch.Tensor):
        if z is not self._z:
            self._z, self._states = z, self.compute(z)
        return self._states


def reverse_padded(sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse each sequence within its own length; padding stays at the end.

    Running a forward RNN on the result and reversing back gives a backward
    RNN over x[t:T] that never reads a padded step.
    """
    steps = sequence.shape[1]
    positions = torch.arange(steps, device=sequence.device).expand(len(lengths), steps)
    reversed_positions = lengths[:, None] - 1 - positions
    index = torch.where(reversed_positions >= 0, reversed_positions, positions)
    return sequence.gather(1, index[..., None].expand_as(sequence))


class MLP(nn.Sequential):
    """A two-layer perceptron with ReLU: input -> hidden -> output."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__(nn.Linear(input_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, output_dim))


class GaussianHead(nn.Module):
    """Map features to the loc and positive scale of a diagonal Gaussian (a dual-head MLP)."""

    def __init__(self, input_dim: int, output_dim: int, hidden_dim: int):
        super().__init__()
        self.hidden = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU())
        self.loc = nn.Linear(hidden_dim, output_dim)
        self.scale = nn.Linear(hidden_dim, output_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(features)
        return self.loc(hidden), F.softplus(self.scale(hidden)) + _MIN_SCALE


class Emission(nn.Module):
    """p(x[t] | features) for one observation family.

    :param str family: "bernoulli" (logits), "normal" (loc and positive scale) or
        "exponential" (its mean v, for power spectrograms: -log p(P) = log v + P / v).
    """

    def __init__(self, family: str, input_dim: int, output_dim: int, hidden_dim: int):
        super().__init__()
        if family not in EMISSION_FAMILIES:
            raise ValueError(f"unknown emission family {family!r}; "
                             f"choose one of {', '.join(EMISSION_FAMILIES)}")
        self.family = family
        heads = 2 if family == "normal" else 1
        self.net = MLP(input_dim, hidden_dim, heads * output_dim)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        out = self.net(features)
        if self.family == "bernoulli":
            return dist.Bernoulli(logits=out)
        if self.family == "normal":
            loc, scale = out.chunk(2, dim=-1)
            return dist.Normal(loc, F.softplus(scale) + _MIN_SCALE)
        # Exponential with mean v = exp(out), clamped so that 1/v stays finite.
        log_mean = out.clamp(-30.0, 30.0)
        return dist.Exponential(rate=torch.exp(-log_mean))

    def mean(self, features: torch.Tensor) -> torch.Tensor:
        return self(features).mean

    def sample(self, features: torch.Tensor) -> torch.Tensor:
        return self(features).sample()


class Recurrent(nn.Module):
    """A deterministic RNN state h[t] = cell(input[t], h[t-1]) with a learned h[0].

    The same weights run a whole sequence at once (fused nn.GRU, nn.LSTM or
    nn.RNN) or one step at a time, so the model and the guide share them.
    """

    def __init__(self, cell: str, input_dim: int, hidden_dim: int):
        super().__init__()
        rnn_class = {"gru": nn.GRU, "lstm": nn.LSTM, "rnn": nn.RNN}[cell]
        self.cell = cell
        self.rnn = rnn_class(input_dim, hidden_dim, batch_first=True)
        self.h_0 = nn.Parameter(torch.zeros(hidden_dim))
        if cell == "lstm":
            self.c_0 = nn.Parameter(torch.zeros(hidden_dim))

    def initial(self, batch: int):
        h_0 = self.h_0.expand(1, batch, -1).contiguous()
        if self.cell == "lstm":
            return h_0, self.c_0.expand(1, batch, -1).contiguous()
        return h_0

    def sequence(self, inputs: torch.Tensor) -> torch.Tensor:
        """Run over (batch, time, input) and return h[1:T] as (batch, time, hidden)."""
        outputs, _ = self.rnn(inputs, self.initial(inputs.shape[0]))
        return outputs

    def step(self, inputs: torch.Tensor, carry=None):
        """One step: return (h[t], carry) from (batch, input) and the carry of step t-1."""
        if carry is None:
            carry = self.initial(inputs.shape[0])
        output, carry = self.rnn(inputs[:, None], carry)
        return output[:, 0], carry


class InferenceRNN(nn.Module):
    """The guide's RNN over the observations.

    The backward direction summarises x[t:T]; when the graph requires it, a
    forward direction adds x[1:t] (a bidirectional RNN).
    """

    def __init__(self, input_dim: int, hidden_dim: int, bidirectional: bool):
        super().__init__()
        self.backward_rnn = Recurrent("gru", input_dim, hidden_dim)
        self.forward_rnn = Recurrent("gru", input_dim, hidden_dim) if bidirectional else None

    def forward(self, x: torch.Tensor, lengths: torch.Tensor) -> list[torch.Tensor]:
        summaries = [reverse_padded(self.backward_rnn.sequence(reverse_padded(x, lengths)),
                                    lengths)]
        if self.forward_rnn is not None:
            summaries.append(self.forward_rnn.sequence(x))
        return summaries


class Combiner(nn.Module):
    """q(z[t] | ...): average tanh projections of the conditioning features with the
    inference RNN's summaries, then map to a loc and a softplus scale.

    :param list feature_dims: widths of the features projected through tanh
        (previous latents, generative RNN states, observation windows).
    :param int hidden_dim: width of the inference RNN, and of the average.
    """

    def __init__(self, feature_dims: list[int], hidden_dim: int, z_dim: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(width, hidden_dim) for width in feature_dims)
        self.loc = nn.Linear(hidden_dim, z_dim)
        self.scale = nn.Linear(hidden_dim, z_dim)

    def forward(self, features: list[torch.Tensor], summaries: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        terms = [torch.tanh(project(feature))
                 for project, feature in zip(self.projections, features)] + summaries
        combined = torch.stack(terms).mean(0)
        return self.loc(combined), F.softplus(self.scale(combined)) + _MIN_SCALE


class InverseAutoregressiveFlow(nn.Module):
    """K affine autoregressive layers of hidden width W on top of the guide's Gaussian.

    Each layer maps u to z = mu(u) + sigma(u) * u with a MADE network, so the
    log-determinant is the sum of log sigma; layers after the first see the
    dimensions in reversed order.
    """

    def __init__(self, z_dim: int, layers: int, hidden_dim: int):
        super().__init__()
        self.layers = nn.ModuleList(
            AffineAutoregressive(AutoRegressiveNN(z_dim, [hidden_dim]))
            for _ in range(layers))

    def forward(self, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return z and log |det dz/du| for a (batch, z_dim) sample u."""
        log_det = torch.zeros(u.shape[:-1], device=u.device, dtype=u.dtype)
        z = u
        for index, layer in enumerate(self.layers):
            if index % 2 == 1:
                z = z.flip(-1)
            out = layer(z)
            log_det = log_det + layer.log_abs_det_jacobian(z, out)
            z = out.flip(-1) if index % 2 == 1 else out
        return z, log_det


def zero_padding(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Set padded steps to zero, whatever they held (NaN included), without touching gradients of real steps."""
    return torch.where(mask[..., None], x, torch.zeros((), dtype=x.dtype, device=x.device))
