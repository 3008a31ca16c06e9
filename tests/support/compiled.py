"""Shared helpers for the tests of compiled models: spec lists, cached imports, expectations."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from support import equations
from taxonomy.build import load_module

REPO = Path(__file__).resolve().parents[2]
SPECS = REPO / "specs"
ALL_SPECS = sorted(SPECS.rglob("*.dssm"))
CELL_SPECS = sorted((SPECS / "cells").glob("*.dssm"))


@pytest.fixture(autouse=True)
def one_torch_thread():
    # Tiny tensors run far slower on several threads when another process
    # keeps a core busy.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@functools.lru_cache(maxsize=None)
def compiled(path: str | Path):
    """The compiled module of a spec, imported once per test session."""
    return load_module(path)


def spec_id(path: Path) -> str:
    return path.relative_to(SPECS).with_suffix("").as_posix()


@dataclass(frozen=True)
class NamedModel:
    """The facts that a named model's equations give, written out by hand.

    :param generative: the reference loop of its generative process.
    :param full_guide: the reference loop of its full-alignment combiner features.
    :param cell: its cell in the notation of specs/cells file names.
    :param partial_rnn: "backward" when z[t] is independent of x[1:t-1] given z[t-1].
    :param exact_factor: the minimal conditioning set of p(z[t] | z[1:t-1], x[1:T]).
    :param full_features: what the full-alignment combiner reads besides the inference RNN.
    :param full_rnn: the inference RNN of the full alignment.
    """

    generative: object
    full_guide: object
    cell: str
    partial_rnn: str
    exact_factor: tuple[str, ...]
    full_features: tuple[str, ...]
    full_rnn: str


# Derived from each model's equations (see tests/support/equations.py): the
# exact factor keeps z[t]'s parents, its children and its children's other parents.
NAMED = {
    "dmm": NamedModel(equations.dmm, equations.full_z_only, "hmm", "backward",
                      ("z[t-1]", "x[t:T]"), ("z[t-1]",), "backward"),
    "rssm": NamedModel(equations.rssm, equations.full_rssm, "hmm__zz_xz", "bidirectional",
                       ("z[1:t-1]", "x[t:T]"), ("h[t-1]",), "backward"),
    "ar_hmm": NamedModel(equations.ar_hmm, equations.full_z_and_previous_x, "ar_hmm",
                         "backward", ("z[t-1]", "x[t-1:T]"), ("z[t-1]", "x[t-1]"), "backward"),
    "arssm": NamedModel(equations.arssm, equations.full_two_states, "ar_hmm__zz_xz_xx",
                        "bidirectional", ("z[1:t-1]", "x[1:T]"), ("h1[t-1]", "h2[t-1]"),
                        "backward"),
    "f_hmm": NamedModel(equations.f_hmm, equations.full_z_and_previous_x, "f_hmm",
                        "bidirectional", ("z[t-1]", "x[t-1:T]"), ("z[t-1]", "x[t-1]"),
                        "backward"),
    "fssm": NamedModel(equations.fssm, equations.full_two_states, "f_hmm__zz_xz_zx",
                       "bidirectional", ("z[1:t-1]", "x[1:T]"), ("h1[t-1]", "h2[t-1]"),
                       "backward"),
    "dmm_aug": NamedModel(equations.dmm_aug, equations.full_z_and_previous_x, "dmm_aug",
                          "bidirectional", ("z[t-1]", "x[t-1:T]"), ("z[t-1]", "x[t-1]"),
                          "backward"),
    "srnn": NamedModel(equations.srnn, equations.full_srnn, "dmm_aug__xx_zx", "bidirectional",
                       ("z[t-1]", "x[1:T]"), ("z[t-1]", "d[t]"), "backward"),
    # h[t-1] carries x[1:t-2] only, and the planner looks for a state that
    # carries exactly x[1:t-1], so the full alignment reads x through a
    # bidirectional RNN.
    "vrnn": NamedModel(equations.vrnn, equations.full_vrnn, "dmm_aug__zz_xz_xx_zx",
                       "bidirectional", ("z[1:t-1]", "x[1:T]"), ("h[t-1]",), "bidirectional"),
}

GROUP_EDGES = {
    "hmm": ("z<-z", "x<-z"),
    "ar_hmm": ("z<-z", "x<-z", "x<-x"),
    "f_hmm": ("z<-z", "x<-z", "z<-x"),
    "dmm_aug": ("z<-z", "x<-z", "x<-x", "z<-x"),
}
BASE_ORDER = {"z<-z": 1, "x<-z": 0, "x<-x": 1, "z<-x": 1}
EDGE_TOKENS = {"zz": "z<-z", "xz": "x<-z", "xx": "x<-x", "zx": "z<-x"}


def orders_from_cell_name(name: str) -> dict[str, int | str | None]:
    """Edge orders of a paper cell named as in specs/cells, e.g. 'ar_hmm__zz_xx'.

    Relaxed edges have order "all", the others their base order, and edges
    outside the group None.
    """
    group, _, relaxed = name.partition("__")
    relaxed_edges = {EDGE_TOKENS[token] for token in relaxed.split("_") if token}
    orders: dict[str, int | str | None] = dict.fromkeys(BASE_ORDER)
    for edge in GROUP_EDGES[group]:
        orders[edge] = "all" if edge in relaxed_edges else BASE_ORDER[edge]
    return orders


def lags_of(edge: str, order: int | str | None, steps: int) -> set[int]:
    """The lags an edge of this order reads, assuming a contiguous window, below `steps`."""
    if order is None:
        return set()
    lowest = 0 if edge == "x<-z" else 1
    highest = steps if order == "all" else order
    return set(range(lowest, highest + 1))
