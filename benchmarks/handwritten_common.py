"""Parts shared by the hand-written Pyro models of the benchmark.

They are written the way a Pyro user would write them for one model, not
taken from runtime/blocks.py, so that the benchmark measures the compiled
design against ordinary code. The `copy_*` functions map a compiled
model's weights onto them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

MIN_SCALE = 1e-4


def reverse_within_length(sequence: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Reverse the first lengths[b] steps of each row b of a (batch, time, width) tensor.

    Padded steps stay where they are, so the result is still padded at the end.
    """
    steps = sequence.shape[1]
    positions = torch.arange(steps, device=sequence.device)
    source = lengths[:, None] - 1 - positions
    source = torch.where(source >= 0, source, positions)
    return sequence.gather(1, source[..., None].expand_as(sequence))


def run_packed(rnn: nn.GRU, inputs: torch.Tensor, lengths: torch.Tensor,
               h_0: torch.Tensor) -> torch.Tensor:
    """Run a GRU over the real steps of each sequence (packed), zero on padded steps."""
    batch, steps, _ = inputs.shape
    packed = pack_padded_sequence(inputs, lengths.cpu(), batch_first=True, enforce_sorted=False)
    outputs, _ = rnn(packed, h_0.expand(1, batch, -1).contiguous())
    outputs, _ = pad_packed_sequence(outputs, batch_first=True, total_length=steps)
    return outputs


def backward_summaries(rnn: nn.GRU, h_0: torch.Tensor, x: torch.Tensor,
                       lengths: torch.Tensor, packed: bool = True) -> torch.Tensor:
    """Return g[t], a GRU run backward over x[t:T] within each sequence's length.

    Packed, the GRU skips padded steps as Pyro's deep Markov model example
    does; unpacked, it also runs over the padding after each reversed sequence.
    """
    reversed_x = reverse_within_length(x, lengths)
    if packed:
        outputs = run_packed(rnn, reversed_x, lengths, h_0)
    else:
        outputs, _ = rnn(reversed_x, h_0.expand(1, x.shape[0], -1).contiguous())
    return reverse_within_length(outputs, lengths)


class GaussianMLP(nn.Module):
    """Features -> ReLU hidden layer -> loc and softplus scale of a diagonal Gaussian."""

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int):
        super().__init__()
        self.hidden = nn.Linear(input_dim, hidden_dim)
        self.loc = nn.Linear(hidden_dim, output_dim)
        self.scale = nn.Linear(hidden_dim, output_dim)

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = F.relu(self.hidden(features))
        return self.loc(hidden), F.softplus(self.scale(hidden)) + MIN_SCALE


def emission_mlp(input_dim: int, hidden_dim: int, x_dim: int) -> nn.Sequential:
    """Features -> ReLU hidden layer -> Bernoulli logits of each of the x_dim units of x."""
    return nn.Sequential(nn.Linear(input_dim, hidden_dim), nn.ReLU(),
                         nn.Linear(hidden_dim, x_dim))


class Combiner(nn.Module):
    """q(z[t] | features, summaries): the mean of tanh(A_i feature_i) and the summaries,
    mapped to a loc and a softplus scale."""

    def __init__(self, feature_dims: list[int], summary_dim: int, z_dim: int):
        super().__init__()
        self.projections = nn.ModuleList(nn.Linear(width, summary_dim) for width in feature_dims)
        self.loc = nn.Linear(summary_dim, z_dim)
        self.scale = nn.Linear(summary_dim, z_dim)

    def forward(self, features: list[torch.Tensor], summaries: list[torch.Tensor]
                ) -> tuple[torch.Tensor, torch.Tensor]:
        total = sum(summaries)
        for project, feature in zip(self.projections, features):
            total = total + torch.tanh(project(feature))
        combined = total / (len(features) + len(summaries))
        return self.loc(combined), F.softplus(self.scale(combined)) + MIN_SCALE


# --- weights from a compiled model ---------------------------------------------------

def copy_linear(target: nn.Linear, source: nn.Linear) -> None:
    target.weight.copy_(source.weight)
    target.bias.copy_(source.bias)


def copy_gru(target: nn.Module, source: nn.GRU) -> None:
    """Copy a one-layer nn.GRU's weights into an nn.GRUCell or another one-layer nn.GRU."""
    suffix = "" if isinstance(target, nn.GRUCell) else "_l0"
    for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
        getattr(target, name + suffix).copy_(getattr(source, name + "_l0"))


def copy_gaussian_head(target: GaussianMLP, source: nn.Module) -> None:
    """Copy a compiled GaussianHead (runtime.blocks) into a GaussianMLP."""
    copy_linear(target.hidden, source.hidden[0])
    copy_linear(target.loc, source.loc)
    copy_linear(target.scale, source.scale)


def copy_emission(target: nn.Sequential, source: nn.Module) -> None:
    """Copy a compiled Bernoulli Emission (runtime.blocks) into an `emission_mlp`."""
    copy_linear(target[0], source.net[0])
    copy_linear(target[2], source.net[2])


def copy_combiner(target: Combiner, source: nn.Module) -> None:
    """Copy a compiled Combiner (runtime.blocks) into a Combiner."""
    for target_projection, source_projection in zip(target.projections, source.projections):
        copy_linear(target_projection, source_projection)
    copy_linear(target.loc, source.loc)
    copy_linear(target.scale, source.scale)


def check_full_guide(compiled: nn.Module, name: str) -> None:
    """Raise ValueError unless `compiled` has the full-alignment guide without a flow."""
    if compiled.alignment != "full" or compiled.flow is not None:
        raise ValueError(f"the hand-written {name} has a full-alignment guide without a flow; "
                         f"build the compiled one with guide='full' and flow=None")
