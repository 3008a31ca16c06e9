"""Variants of the two implementations that isolate what each part of the compiled design buys.

An implementation is named by a string:

- "compiled": the compiled model as generated.
- "compiled-without:NAME,NAME": the compiled model with speed-ups of
  runtime/blocks.py turned off, each replaced by the plain code it stands
  for ("compiled-without:all" turns off every one in SPEEDUPS).
- "handwritten": the per-step hand-written model.
- "handwritten+CHANGE+CHANGE": the hand-written model with changes to its
  per-step style (see `benchmarks.handwritten_arssm.CHANGES`).

The plain replacements compute the same values as the speed-ups (the tests
in tests/test_blocks.py compare them), so every variant has the same objective.
"""

from __future__ import annotations

import contextlib
from unittest import mock

import pyro.distributions as dist

from runtime import blocks

SPEEDUPS = {
    "reuse": "the model reuses the states the guide computed for its z",
    "skip_padding": "the guide's RNNs over x skip padded steps",
    "cell_kernels": "guide steps call torch's cell kernels, not the fused RNN on one step",
    "draw_arithmetic": "guide draws without building a Normal per step",
    "precomputed_combiner": "the combiner's x-only terms are computed for all steps at once",
}


def parse(implementation: str) -> tuple[str, tuple[str, ...]]:
    """Split an implementation name into its base ("compiled" or "handwritten") and its changes.

    Raises ValueError naming the unknown part.
    """
    if implementation.startswith("compiled"):
        rest = implementation.removeprefix("compiled")
        if not rest:
            return "compiled", ()
        if not rest.startswith("-without:"):
            raise ValueError(f"invalid implementation {implementation!r}; "
                             f"expected compiled or compiled-without:NAME,...")
        names = tuple(rest.removeprefix("-without:").split(","))
        if names == ("all",):
            return "compiled", tuple(SPEEDUPS)
        unknown = [name for name in names if name not in SPEEDUPS]
        if unknown:
            raise ValueError(f"unknown speed-ups {unknown} in {implementation!r}; "
                             f"choose from {', '.join(SPEEDUPS)} or all")
        return "compiled", names
    if implementation.startswith("handwritten"):
        parts = tuple(part for part in implementation.removeprefix("handwritten").split("+")
                      if part)
        return "handwritten", parts
    raise ValueError(f"invalid implementation {implementation!r}; "
                     f"expected one starting with compiled or handwritten")


def _store_nothing(self, z, x, states) -> None:
    pass


def _sequence_over_padding(original):
    def sequence(self, inputs, lengths=None):
        return original(self, inputs)
    return sequence


def _step_with_fused_rnn(self, inputs, carry=None):
    if carry is None:
        carry = self.initial(inputs.shape[0])
    output, carry = self.rnn(inputs[:, None], carry)
    return output[:, 0], carry


def _draw_step_with_normal(loc, scale, flow, use_mean=False):
    base = dist.Normal(loc, scale)
    u = loc if use_mean else base.rsample()
    log_q = base.log_prob(u).sum(-1)
    if flow is None:
        return u, log_q
    z, log_det = flow(u)
    return z, log_q - log_det


def _precompute_nothing(self, features, summaries):
    return ([None if feature is None else feature.unbind(1) for feature in features],
            [summary.unbind(1) for summary in summaries])


def _step_projecting_everything(self, known, t, features):
    known_features, summaries = known
    step_features = [feature if feature is not None else known_feature[t]
                     for feature, known_feature in zip(features, known_features)]
    return self(step_features, [summary[t] for summary in summaries])


@contextlib.contextmanager
def patched_blocks(disabled: tuple[str, ...]):
    """Within the block, replace each disabled speed-up of runtime/blocks.py by the plain code."""
    replacements = {
        "reuse": [(blocks.GuideStates, "store", _store_nothing)],
        "skip_padding": [(blocks.Recurrent, "sequence",
                          _sequence_over_padding(blocks.Recurrent.sequence))],
        "cell_kernels": [(blocks.Recurrent, "step", _step_with_fused_rnn)],
        "draw_arithmetic": [(blocks, "draw_step", _draw_step_with_normal)],
        "precomputed_combiner": [(blocks.Combiner, "precompute", _precompute_nothing),
                                 (blocks.Combiner, "step", _step_projecting_everything)],
    }
    with contextlib.ExitStack() as stack:
        for name in disabled:
            for owner, attribute, replacement in replacements[name]:
                stack.enter_context(mock.patch.object(owner, attribute, replacement))
        yield


def describe(implementation: str) -> str:
    """Return a table label for an implementation name."""
    base, changes = parse(implementation)
    if base == "compiled":
        if not changes:
            return "compiled, every speed-up on"
        if set(changes) == set(SPEEDUPS):
            return "compiled, every speed-up off"
        return "compiled with " + ", ".join(name for name in SPEEDUPS if name not in changes)
    if not changes:
        return "hand-written, per step"
    return "hand-written, " + ", ".join(changes)

