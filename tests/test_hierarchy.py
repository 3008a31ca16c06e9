"""Placing specs in the hierarchy: cells, orders, outside reasons and d-separation facts."""

from __future__ import annotations

from pathlib import Path

import pytest

from taxonomy.errors import SpecError
from taxonomy.explore import finite_order_cells
from taxonomy.hierarchy import (EDGE_KINDS, EDGES, GROUP_EDGES, GROUPS, KNOWN_MODELS, Cell,
                                check_spec, check_text, paper_cells, parse_cell)
from taxonomy.scaffold import cell_spec_text

SPECS = Path(__file__).resolve().parent.parent / "specs"
CELL_SPECS = sorted((SPECS / "cells").glob("*.dssm"))
HEADER = "model M\nlatent z : normal[16]\nobserved x : bernoulli[88]\n"

GROUP_PREFIXES = {"hmm": "HMM", "ar_hmm": "AR-HMM", "f_hmm": "F-HMM", "dmm_aug": "DMM-Aug"}
EDGE_SHORT_NAMES = {"zz": "z<-z", "xz": "x<-z", "xx": "x<-x", "zx": "z<-x"}


def cell_named_by_file(path: Path) -> tuple[str, set[str]]:
    """The group and relaxed edges a cell file's name stands for, e.g. ar_hmm__zz_xx."""
    group, _, edges = path.stem.partition("__")
    return GROUP_PREFIXES[group], {EDGE_SHORT_NAMES[edge] for edge in edges.split("_") if edge}


def place(body: str):
    return check_text(HEADER + body, "spec.dssm")


# --- the 36 cells of the paper --------------------------------------------------------------


def test_paper_has_36_distinct_cells():
    cells = paper_cells()

    assert len(cells) == 36
    assert len(set(cells)) == 36
    assert {group: len(paper_cells(group)) for group in GROUPS} == {
        "HMM": 4, "AR-HMM": 8, "F-HMM": 8, "DMM-Aug": 16}
    assert all(cell.is_paper_cell for cell in cells)


def test_cell_files_cover_every_paper_cell():
    assert len(CELL_SPECS) == 36

    landed = {check_spec(str(path)).cell for path in CELL_SPECS}
    assert landed == set(paper_cells())


@pytest.mark.parametrize("path", CELL_SPECS, ids=lambda path: path.stem)
def test_cell_file_lands_in_its_cell(path):
    group, relaxed = cell_named_by_file(path)
    placement = check_spec(str(path))

    assert placement.problems() == []
    assert placement.outside == []
    assert placement.group == group
    assert set(placement.relaxed) == relaxed
    assert placement.cell.is_paper_cell
    assert placement.as_dict()["assertion_holds"] is True


@pytest.mark.parametrize("cell", paper_cells(), ids=lambda cell: cell.label)
def test_scaffolded_paper_cell_lands_in_it(cell):
    placement = check_text(cell_spec_text(cell))

    assert placement.problems() == []
    assert placement.cell == cell
    assert placement.relaxed == list(cell.relaxed)
    for edge in EDGES:
        expected = dict(cell.orders).get(edge)
        assert placement.orders[edge] == expected


@pytest.mark.parametrize("cell", paper_cells(), ids=lambda cell: cell.label)
def test_cell_label_parses_back(cell):
    assert parse_cell(cell.label) == cell


def test_every_known_model_names_one_paper_cell():
    named = {}
    for cell in paper_cells():
        for model in cell.known_as:
            named[model] = cell

    assert set(named) == set(KNOWN_MODELS)
    for model, (group, relaxed) in KNOWN_MODELS.items():
        assert named[model] == Cell.paper(group, relaxed)


# --- the named models -----------------------------------------------------------------------


@pytest.mark.parametrize("file, group, relaxed, known_as", [
    ("dmm.dssm", "HMM", [], ["DMM"]),
    ("rssm.dssm", "HMM", ["z<-z", "x<-z"], ["RSSM"]),
    ("ar_hmm.dssm", "AR-HMM", [], ["AR-HMM"]),
    ("arssm.dssm", "AR-HMM", ["z<-z", "x<-z", "x<-x"], ["ArSSM"]),
    ("f_hmm.dssm", "F-HMM", [], ["F-HMM"]),
    ("fssm.dssm", "F-HMM", ["z<-z", "x<-z", "z<-x"], ["FSSM"]),
    ("dmm_aug.dssm", "DMM-Aug", [], ["DMM-Aug"]),
    ("srnn.dssm", "DMM-Aug", ["x<-x", "z<-x"], ["SRNN"]),
    ("vrnn.dssm", "DMM-Aug", ["z<-z", "x<-z", "x<-x", "z<-x"], ["VRNN"]),
])
def test_named_model_lands_in_its_cell(file, group, relaxed, known_as):
    placement = check_spec(str(SPECS / file))

    assert placement.problems() == []
    assert placement.group == group
    assert placement.relaxed == relaxed
    assert placement.known_as == known_as


def test_vrnn_lands_in_dmm_aug_with_all_edges_relaxed():
    placement = check_spec(str(SPECS / "vrnn.dssm"))
    data = placement.as_dict()

    assert data["cell"] == "DMM-Aug(z<-z, x<-z, x<-x, z<-x)"
    assert data["orders"] == {"z<-z": "all", "x<-z": "all", "x<-x": "all", "z<-x": "all"}
    assert data["markers"] == ["○", "◑", "●", "◐"]
    assert data["marker_names"] == ["white circle", "half circle (x given z)", "black circle",
                                    "half circle (z given x)"]


def test_srnn_keeps_first_order_transition_and_emission():
    placement = check_spec(str(SPECS / "srnn.dssm"))

    assert placement.orders == {"z<-z": 1, "x<-z": 0, "x<-x": "all", "z<-x": "all"}


# --- explicit and dependency-line forms -----------------------------------------------------


ARSSM_DEPENDENCY_LINES = """
z[t] <- z[1:t-1]
x[t] <- z[1:t]
x[t] <- x[1:t-1]
"""


def test_both_arssm_forms_land_together():
    explicit = check_spec(str(SPECS / "arssm.dssm"))
    lines = place(ARSSM_DEPENDENCY_LINES)

    assert lines.cell == explicit.cell
    assert lines.orders == explicit.orders
    assert lines.markov_properties == explicit.markov_properties
    assert lines.guide.as_dict() == explicit.guide.as_dict()


@pytest.mark.parametrize("file, cell_file", [
    ("rssm.dssm", "hmm__zz_xz.dssm"),
    ("fssm.dssm", "f_hmm__zz_xz_zx.dssm"),
    ("srnn.dssm", "dmm_aug__xx_zx.dssm"),
    ("vrnn.dssm", "dmm_aug__zz_xz_xx_zx.dssm"),
])
def test_rnn_model_and_cell_file_land_together(file, cell_file):
    explicit = check_spec(str(SPECS / file))
    lines = check_spec(str(SPECS / "cells" / cell_file))

    assert explicit.cell == lines.cell
    assert explicit.orders == lines.orders
    assert explicit.guide.as_dict() == lines.guide.as_dict()


def test_one_state_carrying_both_histories_relaxes_four_edges():
    # VRNN's arrangement with lstm and the inputs in the other order.
    placement = place("deterministic h[t] = lstm[32](z[t], x[t-1])\n"
                      "z[t] <- h[t-1], x[t-1]\nx[t] <- h[t]\n")

    assert placement.cell == Cell.paper("DMM-Aug", EDGES)


def test_state_of_states_carries_the_inner_history():
    # g reads h, and h reads z, so x reads the whole z history through g.
    placement = place("deterministic h[t] = gru[8](z[t])\ndeterministic g[t] = rnn[8](h[t])\n"
                      "z[t] <- z[t-1]\nx[t] <- z[t], g[t-1]\n")

    assert placement.orders["x<-z"] == "all"
    assert placement.cell.label == "HMM(x<-z)"


def test_state_read_at_lag_shifts_its_history():
    # h[t] carries z[1:t-1]; read at t-1 it gives z[1:t-2], so z[t-1] is missing.
    placement = place("deterministic h[t] = gru[8](z[t-1])\nz[t] <- h[t-1]\nx[t] <- z[t]\n")

    assert [reason.code for reason in placement.outside] == ["transition-without-previous-latent"]


# --- finite orders --------------------------------------------------------------------------


@pytest.mark.parametrize("body, orders, label", [
    ("z[t] <- z[t-3:t-1]\nx[t] <- z[t]\n", {"z<-z": 3, "x<-z": 0}, "HMM(z<-z:3)"),
    ("z[t] <- z[t-1]\nx[t] <- z[t-1:t]\n", {"z<-z": 1, "x<-z": 1}, "HMM(x<-z:1)"),
    ("z[t] <- z[t-3:t-1]\nx[t] <- z[t-1:t]\n", {"z<-z": 3, "x<-z": 1}, "HMM(z<-z:3, x<-z:1)"),
    ("z[t] <- z[t-1]\nx[t] <- z[t], x[t-2:t-1]\n", {"z<-z": 1, "x<-z": 0, "x<-x": 2},
     "AR-HMM(x<-x:2)"),
    ("z[t] <- z[1:t-1], x[t-4:t-1]\nx[t] <- z[t]\n", {"z<-z": "all", "x<-z": 0, "z<-x": 4},
     "F-HMM(z<-z, z<-x:4)"),
])
def test_finite_order_is_a_cell_of_its_own(body, orders, label):
    placement = place(body)

    assert placement.problems() == []
    assert {edge: order for edge, order in placement.orders.items()
            if order is not None} == orders
    assert placement.cell.label == label
    assert not placement.cell.is_paper_cell
    assert placement.known_as == []
    assert parse_cell(label) == placement.cell


def test_finite_order_cell_assertion_holds():
    placement = place("z[t] <- z[t-3:t-1]\nx[t] <- z[t-1:t]\ncell HMM(z<-z:3, x<-z:1)\n")

    assert placement.problems() == []
    assert placement.as_dict()["assertion_holds"] is True


def test_finite_order_differs_from_the_paper_cell():
    finite = place("z[t] <- z[t-3:t-1]\nx[t] <- z[t]\n")
    relaxed = place("z[t] <- z[1:t-1]\nx[t] <- z[t]\n")

    assert finite.cell != relaxed.cell
    assert finite.relaxed == []
    assert finite.cell.finite_relaxed == ("z<-z",)
    assert relaxed.relaxed == ["z<-z"]


@pytest.mark.parametrize("cell", [cell for group in GROUPS for cell in finite_order_cells(group, 2)
                                  if not cell.is_paper_cell][::7], ids=lambda cell: cell.label)
def test_scaffolded_finite_cell_lands_in_it(cell):
    placement = check_text(cell_spec_text(cell))

    assert placement.problems() == []
    assert placement.cell == cell


def test_base_order_written_out_is_the_base_cell():
    placement = place("z[t] <- z[t-1]\nx[t] <- z[t]\ncell HMM(z<-z:1, x<-z:0)\n")

    assert placement.cell == Cell.paper("HMM", ())
    assert placement.problems() == []


# --- outside the hierarchy ------------------------------------------------------------------


@pytest.mark.parametrize("body, code, line", [
    # STORN: the latents are independent noise that an RNN over x mixes in.
    ("deterministic h[t] = gru[8](x[t-1], z[t])\nx[t] <- h[t]\n", "no-transition", 2),
    # RVAE (causal form): an RNN over independent latents.
    ("deterministic h[t] = gru[8](z[t])\nx[t] <- h[t]\n", "no-transition", 2),
    ("z[t] <- x[t-1]\nx[t] <- z[t]\n", "no-transition", 4),
    ("z[t] <- z[t-2]\nx[t] <- z[t]\n", "transition-without-previous-latent", 4),
    ("z[t] <- z[1:t-2]\nx[t] <- z[t]\n", "transition-without-previous-latent", 4),
    ("z[t] <- z[t-1]\nx[t] <- z[t-1]\n", "emission-without-current-latent", 5),
    ("z[t] <- z[t-1]\nx[t] <- x[t-1]\n", "emission-without-current-latent", 5),
    ("z[t] <- z[t-1]\nx[t] <- z[t], z[t+1]\n", "future-reference", 5),
    ("z[t] <- z[t-1], x[t:t+2]\nx[t] <- z[t]\n", "future-reference", 4),
    ("deterministic h[t] = gru[8](x[t+1])\nz[t] <- z[t-1], h[t-1]\nx[t] <- z[t]\n",
     "future-reference", 4),
    ("z[t] <- z[t-1]\nx[t] <- z[t], x[t]\n", "cycle-within-step", 5),
    ("deterministic h[t] = gru[8](g[t])\ndeterministic g[t] = gru[8](h[t])\n"
     "z[t] <- z[t-1]\nx[t] <- z[t]\n", "cycle-within-step", 4),
])
def test_outside_reason(body, code, line):
    placement = place(body)
    codes = [reason.code for reason in placement.outside]

    assert code in codes
    assert placement.cell is None
    assert placement.group is None
    assert placement.guide is None
    reason = placement.outside[codes.index(code)]
    assert reason.span.line == line
    assert any(problem.message == f"outside the hierarchy: {reason.message}"
               for problem in placement.problems())
    assert {"reason": code, "message": reason.message, "line": line} in \
        placement.as_dict()["outside"]


def test_observation_feeding_latent_at_same_step_is_outside():
    placement = place("z[t] <- z[t-1], x[t]\nx[t] <- z[t]\n")
    codes = [reason.code for reason in placement.outside]

    assert "observation-feeds-latent-at-same-step" in codes
    # Since x[t] reads z[t] too, the same-step edges also form a cycle.
    assert "cycle-within-step" in codes


def test_same_step_feed_through_a_state_is_outside():
    placement = place("deterministic h[t] = gru[8](x[t])\nz[t] <- z[t-1], h[t]\n"
                      "x[t] <- z[t]\n")

    assert "observation-feeds-latent-at-same-step" in [r.code for r in placement.outside]


def test_storn_message_names_the_models():
    placement = place("z[t] <- x[t-1]\nx[t] <- z[t]\n")
    (reason,) = placement.outside

    assert "STORN" in reason.message
    assert "RVAE" in reason.message
    assert reason.hint == "add `z[t] <- z[t-1]`"


def test_cycle_message_walks_the_cycle():
    placement = place("deterministic h[t] = gru[8](g[t])\ndeterministic g[t] = gru[8](h[t])\n"
                      "z[t] <- z[t-1]\nx[t] <- z[t]\n")
    (reason,) = placement.outside

    assert reason.message in ("a cycle within one step: h[t] -> g[t] -> h[t]",
                              "a cycle within one step: g[t] -> h[t] -> g[t]")


@pytest.mark.parametrize("declarations, code, line", [
    ("latent z : normal[16]\nlatent w : normal[16]\nobserved x : bernoulli[88]\n",
     "more-than-one-latent", 3),
    ("latent z : normal[16]\nobserved x : bernoulli[88]\nobserved y : normal[4]\n",
     "more-than-one-observed", 4),
])
def test_more_than_one_variable_is_outside(declarations, code, line):
    placement = check_text("model M\n" + declarations + "z[t] <- z[t-1]\nx[t] <- z[t]\n")
    (reason,) = placement.outside

    assert reason.code == code
    assert reason.span.line == line
    assert placement.cell is None
    assert placement.orders == {edge: None for edge in EDGES}


def test_every_outside_reason_has_a_hint():
    bodies = ["z[t] <- x[t-1]\nx[t] <- z[t]\n", "z[t] <- z[t-2]\nx[t] <- z[t]\n",
              "z[t] <- z[t-1]\nx[t] <- z[t-1]\n", "z[t] <- z[t-1], x[t]\nx[t] <- z[t]\n",
              "z[t] <- z[t-1]\nx[t] <- z[t+1]\n"]
    for body in bodies:
        for reason in place(body).outside:
            assert reason.hint, reason.code


# --- cell assertions ------------------------------------------------------------------------


def test_cell_mismatch_shows_both_placements():
    placement = place("z[t] <- z[t-1]\nx[t] <- z[t]\ncell AR-HMM(z<-z, x<-x)\n")
    (problem,) = placement.problems()

    assert problem.message == "the spec asserts cell AR-HMM(z<-z, x<-x) but lands in HMM()"
    assert problem.location.line == 6
    assert "write `cell HMM()`" in problem.hint
    assert "z<-z 1" in problem.hint
    data = placement.as_dict()
    assert data["asserted_cell"] == "AR-HMM(z<-z, x<-x)"
    assert data["cell"] == "HMM()"
    assert data["assertion_holds"] is False


def test_cell_mismatch_on_finite_order():
    placement = place("z[t] <- z[t-3:t-1]\nx[t] <- z[t]\ncell HMM(z<-z)\n")
    (problem,) = placement.problems()

    assert problem.message == "the spec asserts cell HMM(z<-z) but lands in HMM(z<-z:3)"


def test_empty_cell_assertion_is_the_base_cell():
    assert place("z[t] <- z[t-1]\nx[t] <- z[t]\ncell HMM()\n").problems() == []
    assert len(place("z[t] <- z[1:t-1]\nx[t] <- z[t]\ncell HMM()\n").problems()) == 1


def test_outside_spec_skips_cell_assertion():
    placement = place("z[t] <- x[t-1]\nx[t] <- z[t]\ncell HMM()\n")

    assert [problem.message.startswith("outside the hierarchy")
            for problem in placement.problems()] == [True]


@pytest.mark.parametrize("cell, message", [
    ("HMM(x<-x)", "group HMM has no x<-x edge"),
    ("HMM(q<-z)", "unknown edge 'q<-z'"),
    ("HMM(z<-z:0)", "order 0 is below the base order of z<-z"),
    ("HMM(z<-z, z<-z:3)", "edge z<-z is listed twice"),
    ("Markov()", "unknown group 'Markov'"),
])
def test_malformed_cell_assertion_is_an_error(cell, message):
    with pytest.raises(SpecError) as caught:
        place(f"z[t] <- z[t-1]\nx[t] <- z[t]\ncell {cell}\n")

    assert caught.value.message == message
    assert caught.value.location.line == 6


def test_parse_cell_rejects_other_statements():
    with pytest.raises(SpecError):
        parse_cell("HMM() \nmodel M")
    with pytest.raises(SpecError):
        parse_cell("HMM(")


# --- d-separation facts ---------------------------------------------------------------------


@pytest.mark.parametrize("file, independent, conditioning", [
    # DMM: z[t-1] blocks every path from the past, and x[t:T] are z[t]'s descendants.
    ("dmm.dssm", True, ["z[t-1]", "x[t:T]"]),
    # ArSSM: h1[t-1] carries z[1:t-1], and x[t] is a collider of z[t] with x[1:t-1].
    ("arssm.dssm", False, ["z[1:t-1]", "x[1:T]"]),
])
def test_guide_facts_of_dmm_and_arssm(file, independent, conditioning):
    guide = check_spec(str(SPECS / file)).guide

    assert guide.z_independent_of_past_x is independent
    assert guide.partial_rnn == ("backward" if independent else "bidirectional")
    assert guide.posterior_conditioning == conditioning


@pytest.mark.parametrize("body, independent, conditioning", [
    # AR-HMM: x[t-1] -> x[t] <- z[t] is a collider with nothing below it observed,
    # so z[t-1] alone separates z[t] from x[1:t-1]. Observing x[t] opens the
    # collider, which makes x[t-1] part of the posterior conditioning set.
    ("z[t] <- z[t-1]\nx[t] <- z[t], x[t-1]\n", True, ["z[t-1]", "x[t-1:T]"]),
    # F-HMM: x[t-1] is a parent of z[t].
    ("z[t] <- z[t-1], x[t-1]\nx[t] <- z[t]\n", False, ["z[t-1]", "x[t-1:T]"]),
    # RSSM in dependency lines: z[t] and x[t-1] share the parent z[t-2]; given
    # all past latents, the past observations add nothing.
    ("z[t] <- z[1:t-1]\nx[t] <- z[1:t]\n", False, ["z[1:t-1]", "x[t:T]"]),
    # Third-order transition: z[t-2] is a parent of z[t] and of x[t-2]. The
    # future z[t+1] reads back only to z[t-2], so z[t-3:t-1] suffices.
    ("z[t] <- z[t-3:t-1]\nx[t] <- z[t]\n", False, ["z[t-3:t-1]", "x[t:T]"]),
    # A whole-history edge starting far back: z[t+k] reads z[1:t+k-10], so the
    # future latents make every past latent a co-parent.
    ("z[t] <- z[t-1], z[1:t-10]\nx[t] <- z[t]\n", False, ["z[1:t-1]", "x[t:T]"]),
    # x[t] reads x[1:t-12]; the future x[t+k] read ever later x, all co-parents
    # of z[t]'s observed descendants.
    ("z[t] <- z[t-1]\nx[t] <- z[t], x[1:t-12]\n", True, ["z[t-1]", "x[1:T]"]),
])
def test_guide_facts_reasoned_from_the_graph(body, independent, conditioning):
    guide = place(body).guide

    assert guide.z_independent_of_past_x is independent
    assert guide.posterior_conditioning == conditioning


def test_srnn_partial_guide_needs_both_directions():
    # d[t] = gru(x[t-1], d[t-1]) feeds z[t], so z[t] reads the whole past of x.
    guide = check_spec(str(SPECS / "srnn.dssm")).guide

    assert guide.partial_rnn == "bidirectional"
    assert guide.posterior_conditioning == ["z[t-1]", "x[1:T]"]


def test_long_window_needs_few_separation_queries(monkeypatch):
    import networkx as nx

    queries = []
    original = nx.is_d_separator

    def counting(*args, **kwargs):
        queries.append(1)
        return original(*args, **kwargs)

    monkeypatch.setattr(nx, "is_d_separator", counting)
    placement = place("z[t] <- z[t-40:t-1]\nx[t] <- z[t]\n")

    assert placement.guide.posterior_conditioning == ["z[t-40:t-1]", "x[t:T]"]
    # One query per candidate would be about 290: z[1:t-1] and x[1:T] with
    # t = 123 and T = 165. Only the kept candidates cost one query each.
    assert len(queries) < 150


# --- Markov properties ----------------------------------------------------------------------


def holds_exactly_at_base_order(placement) -> None:
    for edge, holds in placement.markov_properties.items():
        order = placement.orders[edge]
        expected = order is None or order == EDGE_KINDS[edge].base_order
        assert holds == expected, (placement.cell.label, edge, order)


@pytest.mark.parametrize("cell", paper_cells(), ids=lambda cell: cell.label)
def test_markov_properties_agree_with_paper_cell(cell):
    holds_exactly_at_base_order(check_text(cell_spec_text(cell)))


def test_markov_properties_agree_with_finite_cells():
    for group in GROUPS:
        for cell in finite_order_cells(group, 2):
            holds_exactly_at_base_order(check_text(cell_spec_text(cell)))


@pytest.mark.parametrize("file", sorted(path.name for path in SPECS.glob("*.dssm")))
def test_markov_properties_agree_with_named_model(file):
    placement = check_spec(str(SPECS / file))

    assert set(placement.markov_properties) == set(EDGES)
    holds_exactly_at_base_order(placement)


def test_group_edges_are_those_of_the_taxonomy():
    assert GROUP_EDGES == {
        "HMM": ("z<-z", "x<-z"),
        "AR-HMM": ("z<-z", "x<-z", "x<-x"),
        "F-HMM": ("z<-z", "x<-z", "z<-x"),
        "DMM-Aug": ("z<-z", "x<-z", "x<-x", "z<-x"),
    }
    assert {edge: kind.base_order for edge, kind in EDGE_KINDS.items()} == {
        "z<-z": 1, "x<-z": 0, "x<-x": 1, "z<-x": 1}
