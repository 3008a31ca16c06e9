"""Building blocks that compiled models are assembled from.

Everything here works on padded batches: sequences are tensors of shape
(batch, time, features) and a boolean mask of shape (batch, time) marks the
real steps.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

import pyro.distributions as dist
from pyro.distributions.transforms import AffineAutoregressive
from pyro.nn import AutoRegressiveNN

EMISSION_FAMILIES = ("bernoulli", "normal", "exponential")
_MIN_SCALE = 1e-4
_HALF_LOG_TWO_PI = 0.5 * math.log(2 * math.pi)

# Steps per block when Recurrent.sequence skips padding: a block runs the
# rows still inside their length, so at most SKIP_BLOCK - 1 padded steps per
# row are computed.
SKIP_BLOCK = 16

# One step of each cell on nn.GRU / nn.LSTM / nn.RNN weights, the kernels that
# nn.GRUCell, nn.LSTMCell and nn.RNNCell call (torch 2.x). Calling the fused
# module on a sequence of length one took about 40% longer per step (forward
# and backward, batch 20, width 200, torch 2.13 on CPU).
_CELL_STEPS = {"gru": torch.gru_cell, "lstm": torch.lstm_cell, "rnn": torch.rnn_tanh_cell}


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
    # u = loc + scale * noise, so log N(u; loc, scale) needs only the noise and
    # the scale; building a Normal at every step costs more than the arithmetic.
    noise = torch.zeros_like(loc) if use_mean else torch.randn_like(loc)
    u = loc + scale * noise
    log_q = (-0.5 * noise.square() - scale.log() - _HALF_LOG_TWO_PI).sum(-1)
    if flow is None:
        return u, log_q
    z, log_det = flow(u)
    return z, log_q - log_det


class StateCache:
    """Remember the deterministic states computed for the last latent sequence.

    The prior's log-density and the emission both need the states of the same
    z; this runs the RNNs once for both.

    :param callable compute: maps z (batch, time, z_dim) to the states.
    :param tuple known: (z, states) computed elsewhere (by the guide, see
        `GuideStates`), returned without computing when called with that z.
    """

    def __init__(self, compute, known: tuple | None = None):
        self.compute = compute
        self._z, self._states = known if known is not None else (None, None)

    def __call__(self, z: torch.Tensor):
        if z is not self._z:
            self._z, self._states = z, self.compute(z)
        return self._states


class GuideStates:
    """The model's deterministic states as the guide computed them for its last draw of z.

    A full-alignment guide runs the same RNNs with the same weights over the
    z it draws and over x. The model, replayed on that z, reuses them instead
    of running the RNNs again, with the same values and gradients. Reuse needs
    the identical z tensor and an equal (zero-padded) x. States computed
    without gradients are not reused where gradients are needed.
    """

    def __init__(self):
        self._entry = None

    def store(self, z: torch.Tensor, x: torch.Tensor, states) -> None:
        self._entry = (z, x, states, torch.is_grad_enabled())

    def take(self, x: torch.Tensor) -> tuple | None:
        """Return (z, states) stored for this x and forget them, or None.

        Forgetting them keeps the guide's graph from outliving one model call;
        a second model call on the same draw computes the states itself.
        """
        entry, self._entry = self._entry, None
        if entry is None:
            return None
        z, stored_x, states, had_grad = entry
        if torch.is_grad_enabled() and not had_grad:
            return None
        if stored_x.shape != x.shape or not torch.equal(stored_x, x):
            return None
        return z, states

    # A stored draw belongs to one forward pass: copies and pickles start empty.
    def __deepcopy__(self, memo):
        return GuideStates()

    def __getstate__(self):
        return {"_entry": None}


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
        self.dropout = nn.Dropout(0.0)
        self.hidden = nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU())
        self.loc = nn.Linear(hidden_dim, output_dim)
        self.scale = nn.Linear(hidden_dim, output_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.hidden(self.dropout(features))
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
        self.dropout = nn.Dropout(0.0)
        self.net = MLP(input_dim, hidden_dim, heads * output_dim)

    def forward(self, features: torch.Tensor) -> dist.Distribution:
        out = self.net(self.dropout(features))
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


def set_dropout(model: nn.Module, rate: float) -> int:
    """Set the rate of every nn.Dropout layer of `model` and return how many there are.

    In a compiled model these act on the features entering the transition and
    emission heads. They are identities at rate 0 and in evaluation mode.
    """
    layers = [module for module in model.modules() if isinstance(module, nn.Dropout)]
    for layer in layers:
        layer.p = rate
    return len(layers)


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

    def sequence(self, inputs: torch.Tensor, lengths: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """Run over (batch, time, input) and return h[1:T] as (batch, time, hidden).

        With `lengths` (batch,), most steps past each sequence's length are
        skipped. The outputs there are unspecified (zero, or the RNN run on
        the padding), so they must stay masked.
        """
        initial = self.initial(inputs.shape[0])
        if lengths is None:
            outputs, _ = self.rnn(inputs, initial)
            return outputs
        return self._sequence_within_lengths(inputs, lengths, initial)

    def _sequence_within_lengths(self, inputs, lengths, initial):
        # Rows are sorted by length, so the rows still running at any step come
        # first. Each block of SKIP_BLOCK steps runs the fused RNN on those rows
        # alone. Packed sequences would skip every padded step, but on CPU
        # (torch 2.13) their backward pass cost more than the padding it skips.
        batch, steps, _ = inputs.shape
        order = torch.argsort(lengths, descending=True)
        inputs = inputs[order]
        carry = _map_carry(initial, lambda state: state[:, order])
        starts = range(0, steps, SKIP_BLOCK)
        running = (lengths[None, :] > torch.tensor(starts, device=lengths.device)[:, None])
        running_rows = running.sum(1).tolist()

        pieces = [inputs.new_zeros(batch, 0, self.rnn.hidden_size)]
        for start, rows in zip(starts, running_rows):
            if rows == 0:
                break
            outputs, new_carry = self.rnn(inputs[:rows, start:start + SKIP_BLOCK],
                                          _map_carry(carry, lambda state: state[:, :rows].contiguous()))
            pieces.append(F.pad(outputs, (0, 0, 0, 0, 0, batch - rows)))
            carry = _merge_carry(new_carry, carry, rows)
        outputs = torch.cat(pieces, dim=1)
        outputs = F.pad(outputs, (0, 0, 0, steps - outputs.shape[1]))
        return outputs[torch.argsort(order)]

    def step(self, inputs: torch.Tensor, carry=None):
        """One step: return (h[t], carry) from (batch, input) and the carry of step t-1."""
        if carry is None:
            carry = self.initial(inputs.shape[0])
            carry = (carry[0][0], carry[1][0]) if self.cell == "lstm" else carry[0]
        weights = (self.rnn.weight_ih_l0, self.rnn.weight_hh_l0,
                   self.rnn.bias_ih_l0, self.rnn.bias_hh_l0)
        if self.cell == "lstm":
            carry = torch.lstm_cell(inputs, carry, *weights)
            return carry[0], carry
        output = _CELL_STEPS[self.cell](inputs, carry, *weights)
        return output, output


def _map_carry(carry, function):
    """Apply `function` to an RNN carry: one tensor, or LSTM's (h, c)."""
    if isinstance(carry, tuple):
        return tuple(function(state) for state in carry)
    return function(carry)


def _merge_carry(new_carry, old_carry, rows: int):
    """Return the new carry for the first `rows` rows and the old one for the rest.

    The batch is dimension 1 of each carry tensor.
    """
    if isinstance(new_carry, tuple):
        return tuple(_merge_carry(new, old, rows) for new, old in zip(new_carry, old_carry))
    return torch.cat([new_carry, old_carry[:, rows:]], dim=1)


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
        """Return the summaries (batch, time, hidden); their values on padded steps are unspecified.

        Both directions skip most padded steps, because this RNN is the widest
        in most models and random batches of 20 JSB chorales are about 40% padding.
        """
        backward = self.backward_rnn.sequence(reverse_padded(x, lengths), lengths)
        summaries = [reverse_padded(backward, lengths)]
        if self.forward_rnn is not None:
            summaries.append(self.forward_rnn.sequence(x, lengths))
        return summaries


class CombinerTerms(NamedTuple):
    """The combiner's terms known before the guide's loop: their sum at each step
    (batch, hidden) and the number of terms in the average, those known included."""

    sums: tuple[torch.Tensor, ...]
    count: int


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

    def precompute(self, features: list[torch.Tensor | None], summaries: list[torch.Tensor]
                   ) -> CombinerTerms:
        """Sum, over all steps at once, the terms that do not depend on the guide's draws.

        :param list features: for each projection, its feature over all steps
            (batch, time, width) when it reads only x, or None when the
            guide's loop computes it.
        :param list summaries: the inference RNN's summaries (batch, time, hidden).
        """
        terms = [torch.tanh(project(feature))
                 for project, feature in zip(self.projections, features)
                 if feature is not None] + list(summaries)
        return CombinerTerms(sum(terms[1:], terms[0]).unbind(1),
                             len(self.projections) + len(summaries))

    def step(self, known: CombinerTerms, t: int, features: list[torch.Tensor | None]
             ) -> tuple[torch.Tensor, torch.Tensor]:
        """Return the loc and scale at step t from the precomputed terms and the
        features the loop computes (None where `precompute` was given a feature)."""
        combined = known.sums[t]
        for project, feature in zip(self.projections, features):
            if feature is not None:
                combined = combined + torch.tanh(project(feature))
        combined = combined / known.count
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
