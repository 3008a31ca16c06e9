"""Place a model graph in the hierarchy of deep state space models.

A model has one latent z and one observed x and four kinds of edge:
transition z<-z and emission x<-z (always present), autoregression x<-x and
feedforward z<-x (each present or not, which gives the four groups). Each
edge has a Markov order: the largest lag, or "all" for the whole history.
An edge is relaxed when its order goes past the first-order base form; a
cell is a group plus the order of each edge.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import networkx as nx

from taxonomy.errors import SpecError, did_you_mean
from taxonomy.graph import ModelGraph, build_graph, unroll
from taxonomy.lags import LagSet
from taxonomy.parser import load_spec
from taxonomy.syntax import CellAssertion, Span


@dataclass(frozen=True)
class EdgeKind:
    """One of the four kinds of dependency, written child<-parent."""

    edge: str
    name: str
    base_order: int
    marker: str
    marker_name: str


EDGE_KINDS = {
    "z<-z": EdgeKind("z<-z", "transition", 1, "○", "white circle"),
    "x<-z": EdgeKind("x<-z", "emission", 0, "◑", "half circle (x given z)"),
    "x<-x": EdgeKind("x<-x", "autoregression", 1, "●", "black circle"),
    "z<-x": EdgeKind("z<-x", "feedforward", 1, "◐", "half circle (z given x)"),
}
EDGES = tuple(EDGE_KINDS)

GROUP_EDGES = {
    "HMM": ("z<-z", "x<-z"),
    "AR-HMM": ("z<-z", "x<-z", "x<-x"),
    "F-HMM": ("z<-z", "x<-z", "z<-x"),
    "DMM-Aug": ("z<-z", "x<-z", "x<-x", "z<-x"),
}
GROUPS = tuple(GROUP_EDGES)

# Named models and the cell each occupies: (group, fully relaxed edges).
KNOWN_MODELS = {
    "DMM": ("HMM", ()),
    "RSSM": ("HMM", ("z<-z", "x<-z")),
    "AR-HMM": ("AR-HMM", ()),
    "ArSSM": ("AR-HMM", ("z<-z", "x<-z", "x<-x")),
    "F-HMM": ("F-HMM", ()),
    "FSSM": ("F-HMM", ("z<-z", "x<-z", "z<-x")),
    "DMM-Aug": ("DMM-Aug", ()),
    "SRNN": ("DMM-Aug", ("x<-x", "z<-x")),
    "VRNN": ("DMM-Aug", ("z<-z", "x<-z", "x<-x", "z<-x")),
}

# The first-order Markov property each edge relaxes, as a d-separation query on
# the unrolled graph: (target, conditioned-away nodes, conditioning set), each
# a list of (variable, offset from t) where None stands for the rest of the past.
MARKOV_PROPERTIES = {
    "z<-z": "z[t] independent of z[1:t-2] given z[t-1], x[1:t-1]",
    "x<-z": "x[t] independent of z[1:t-1] given z[t], x[1:t-1]",
    "x<-x": "x[t] independent of x[1:t-2] given x[t-1], z[1:t]",
    "z<-x": "z[t] independent of x[1:t-2] given x[t-1], z[1:t-1]",
}


@dataclass(frozen=True)
class Cell:
    """A group plus the Markov order of each of its edges.

    :param str group: HMM, AR-HMM, F-HMM or DMM-Aug.
    :param dict orders: edge -> order (int or "all"); edges outside the group are absent.
    """

    group: str
    orders: tuple[tuple[str, int | str], ...]

    @classmethod
    def make(cls, group: str, orders: dict[str, int | str]) -> "Cell":
        return cls(group, tuple((edge, orders[edge]) for edge in GROUP_EDGES[group]))

    @classmethod
    def paper(cls, group: str, relaxed: tuple[str, ...] | frozenset[str]) -> "Cell":
        return cls.make(group, {edge: "all" if edge in relaxed else EDGE_KINDS[edge].base_order
                                for edge in GROUP_EDGES[group]})

    @property
    def order_map(self) -> dict[str, int | str | None]:
        result: dict[str, int | str | None] = {edge: None for edge in EDGES}
        result.update(dict(self.orders))
        return result

    @property
    def relaxed(self) -> tuple[str, ...]:
        """The edges relaxed to the whole history."""
        return tuple(edge for edge, order in self.orders if order == "all")

    @property
    def finite_relaxed(self) -> tuple[str, ...]:
        """The edges relaxed to a finite order above the base one."""
        return tuple(edge for edge, order in self.orders
                     if order != "all" and order > EDGE_KINDS[edge].base_order)

    @property
    def is_paper_cell(self) -> bool:
        return not self.finite_relaxed

    @property
    def markers(self) -> str:
        return " ".join(EDGE_KINDS[edge].marker for edge in self.relaxed)

    @property
    def label(self) -> str:
        """The cell in the notation of a spec's `cell` statement."""
        parts = [edge for edge in self.relaxed]
        parts += [f"{edge}:{order}" for edge, order in self.orders
                  if edge in self.finite_relaxed]
        parts.sort(key=lambda part: EDGES.index(part.split(":")[0]))
        return f"{self.group}({', '.join(parts)})"

    @property
    def known_as(self) -> list[str]:
        if not self.is_paper_cell:
            return []
        return [name for name, (group, relaxed) in KNOWN_MODELS.items()
                if group == self.group and set(relaxed) == set(self.relaxed)]

    def __lt__(self, other: "Cell") -> bool:
        return cell_sort_key(self) < cell_sort_key(other)


def cell_sort_key(cell: Cell) -> tuple:
    orders = tuple(10**6 if order == "all" else order for _, order in cell.orders)
    relaxed_mask = tuple(EDGES.index(edge) for edge in cell.relaxed)
    return (GROUPS.index(cell.group), len(cell.relaxed), relaxed_mask, orders)


def paper_cells(group: str | None = None) -> list[Cell]:
    """The 36 cells the paper draws: every subset of each group's edges fully relaxed."""
    cells = []
    for name in GROUPS if group is None else (group,):
        edges = GROUP_EDGES[name]
        for size in range(len(edges) + 1):
            for relaxed in combinations(edges, size):
                cells.append(Cell.paper(name, relaxed))
    return cells


@dataclass
class OutsideReason:
    """Why a spec is outside the hierarchy: a short code, a message, where, and the fix."""

    code: str
    message: str
    span: Span | None
    hint: str | None = None

    def as_dict(self) -> dict:
        return {"reason": self.code, "message": self.message,
                "line": self.span.line if self.span else None}


@dataclass
class GuideFacts:
    """What the guide needs from the graph.

    :param bool z_independent_of_past_x: z[t] is d-separated from x[1:t-1] by z[t-1],
        so partial alignment conditions on x[t:T] through a backward RNN; otherwise
        it needs x[1:T] through a bidirectional one.
    :param list posterior_conditioning: the minimal conditioning set of the exact
        posterior factor p(z[t] | z[1:t-1], x[1:T]), in spec notation.
    """

    z_independent_of_past_x: bool
    posterior_conditioning: list[str]
    z_lags: LagSet = field(default_factory=LagSet)
    x_past_lags: LagSet = field(default_factory=LagSet)
    x_current_and_future: bool = True

    @property
    def partial_rnn(self) -> str:
        return "backward" if self.z_independent_of_past_x else "bidirectional"

    def as_dict(self) -> dict:
        return {"z_independent_of_past_x": self.z_independent_of_past_x,
                "partial_alignment_rnn": self.partial_rnn,
                "posterior_conditioning": self.posterior_conditioning}


@dataclass
class Placement:
    """Where a spec sits in the hierarchy, or why it is outside."""

    model: ModelGraph
    orders: dict[str, int | str | None]
    cell: Cell | None
    outside: list[OutsideReason] = field(default_factory=list)
    markov_properties: dict[str, bool] = field(default_factory=dict)
    guide: GuideFacts | None = None

    @property
    def group(self) -> str | None:
        return self.cell.group if self.cell else None

    @property
    def relaxed(self) -> list[str]:
        return list(self.cell.relaxed) if self.cell else []

    @property
    def known_as(self) -> list[str]:
        return self.cell.known_as if self.cell else []

    def assertion_error(self) -> SpecError | None:
        """The error for a `cell` statement that does not match the placement, if any."""
        asserted = self.model.spec.cell
        if asserted is None or self.cell is None:
            return None
        expected = asserted_cell(self.model)
        if expected == self.cell:
            return None
        return self.model.error(
            f"the spec asserts cell {expected.label if expected else asserted.group} "
            f"but lands in {self.cell.label}", asserted.span,
            hint=f"orders found: {format_orders(self.orders)}; change the dependencies or "
                 f"write `cell {self.cell.label}`")

    def problems(self) -> list[SpecError]:
        """Everything that makes `dssm check` fail for this spec."""
        errors = [self.model.error(f"outside the hierarchy: {reason.message}", reason.span,
                                   hint=reason.hint) for reason in self.outside]
        mismatch = self.assertion_error()
        if mismatch is not None:
            errors.append(mismatch)
        return errors

    def as_dict(self) -> dict:
        asserted = self.model.spec.cell
        return {
            "model": self.model.name,
            "path": self.model.path,
            "group": self.group,
            "cell": self.cell.label if self.cell else None,
            "paper_cell": self.cell.is_paper_cell if self.cell else None,
            "orders": self.orders,
            "relaxed": self.relaxed,
            "markers": [EDGE_KINDS[edge].marker for edge in self.relaxed],
            "marker_names": [EDGE_KINDS[edge].marker_name for edge in self.relaxed],
            "known_as": self.known_as,
            "outside": [reason.as_dict() for reason in self.outside],
            "markov_properties": self.markov_properties,
            "guide": self.guide.as_dict() if self.guide else None,
            "asserted_cell": None if asserted is None else
            (asserted_cell(self.model).label if asserted_cell(self.model) else asserted.group),
            "assertion_holds": None if asserted is None else self.assertion_error() is None,
        }


def format_orders(orders: dict[str, int | str | None]) -> str:
    return ", ".join(f"{edge} {'-' if order is None else order}" for edge, order in orders.items())


def asserted_cell(model: ModelGraph) -> Cell | None:
    """The Cell a spec's `cell` statement names; raises SpecError for a malformed one."""
    if model.spec.cell is None:
        return None
    return cell_from_assertion(model.spec.cell, model.error)


def cell_from_assertion(asserted: CellAssertion, error) -> Cell:
    """Turn a parsed `cell GROUP(edges)` into a Cell; `error(message, span, hint)` builds errors."""
    if asserted.group not in GROUP_EDGES:
        raise error(f"unknown group '{asserted.group}'", asserted.group_span,
                    hint=did_you_mean(asserted.group, GROUPS) or "groups: " + ", ".join(GROUPS))
    group_edges = GROUP_EDGES[asserted.group]
    orders: dict[str, int | str] = {edge: EDGE_KINDS[edge].base_order for edge in group_edges}
    listed: set[str] = set()
    for cell_edge in asserted.edges:
        edge = f"{cell_edge.child}<-{cell_edge.parent}"
        if edge not in EDGE_KINDS:
            raise error(f"unknown edge '{edge}'", cell_edge.span,
                        hint=did_you_mean(edge, EDGES) or "edges: " + ", ".join(EDGES))
        if edge in listed:
            raise error(f"edge {edge} is listed twice", cell_edge.span,
                        hint="give each edge once, with its order if it is finite")
        listed.add(edge)
        if edge not in group_edges:
            raise error(f"group {asserted.group} has no {edge} edge", cell_edge.span,
                        hint=f"its edges are {', '.join(group_edges)}")
        order = "all" if cell_edge.order is None else cell_edge.order
        if order != "all" and order < EDGE_KINDS[edge].base_order:
            raise error(f"order {order} is below the base order of {edge}", cell_edge.span,
                        hint=f"the base order is {EDGE_KINDS[edge].base_order}; "
                             "leave the edge out for it")
        orders[edge] = order
    return Cell.make(asserted.group, orders)


def parse_cell(label: str) -> Cell:
    """Parse a cell written as in a `cell` statement, e.g. "AR-HMM(z<-z, x<-x:3)"."""
    from taxonomy.errors import Location
    from taxonomy.parser import parse_spec

    source = "<cell>"
    spec = parse_spec(f"cell {label.strip()}", source)
    if spec.cell is None or spec.variables or spec.dependencies or spec.model:
        raise SpecError(f"not a cell: '{label}'", Location(source),
                        hint="write a cell as GROUP(EDGES), e.g. 'AR-HMM(z<-z, x<-x)'")

    def error(message, span, hint=None):
        return SpecError(message, Location(source, span.line, span.column, span.end_column),
                         hint=hint, source_line=spec.line_text(span.line))

    return cell_from_assertion(spec.cell, error)


def check_spec(path: str) -> Placement:
    """Parse, build and place the spec at `path` (the Python API of `dssm check`)."""
    return place(build_graph(load_spec(path)))


def place(model: ModelGraph) -> Placement:
    """Place a model graph in the hierarchy."""
    asserted_cell(model)  # reject a malformed `cell` statement early

    outside = _structural_reasons(model)
    latents, observed = model.latents, model.observed
    if len(latents) > 1:
        second = model.graph.nodes[latents[1]]["span"]
        outside.append(OutsideReason(
            "more-than-one-latent", f"more than one latent variable ({', '.join(latents)})",
            second, hint="the hierarchy covers one latent and one observed variable; "
                         "merge them into one vector"))
    if len(observed) > 1:
        second = model.graph.nodes[observed[1]]["span"]
        outside.append(OutsideReason(
            "more-than-one-observed",
            f"more than one observed variable ({', '.join(observed)})", second,
            hint="the hierarchy covers one latent and one observed variable; "
                 "merge them into one vector"))
    if len(latents) > 1 or len(observed) > 1:
        return Placement(model, {edge: None for edge in EDGES}, None, outside)

    z, x = latents[0], observed[0]
    dependencies = model.stochastic_dependencies()
    edge_lags = {
        "z<-z": dependencies[z].get(z, LagSet()),
        "x<-z": dependencies[x].get(z, LagSet()),
        "x<-x": dependencies[x].get(x, LagSet()),
        "z<-x": dependencies[z].get(x, LagSet()),
    }
    outside += _edge_reasons(model, z, x, edge_lags)

    orders = {edge: _order(edge, lags) for edge, lags in edge_lags.items()}
    if outside:
        return Placement(model, orders, None, outside)

    has_autoregression = orders["x<-x"] is not None
    has_feedforward = orders["z<-x"] is not None
    group = {(False, False): "HMM", (True, False): "AR-HMM", (False, True): "F-HMM",
             (True, True): "DMM-Aug"}[(has_autoregression, has_feedforward)]
    cell = Cell.make(group, {edge: orders[edge] for edge in GROUP_EDGES[group]})

    analysis = _UnrolledAnalysis(model, z, x, edge_lags)
    return Placement(model, orders, cell, [], analysis.markov_properties(),
                     analysis.guide_facts())


def _order(edge: str, lags: LagSet) -> int | str | None:
    """The order of an edge, counting only the lags that are legal for it."""
    lowest = 0 if edge == "x<-z" else 1
    legal = LagSet(frozenset(lag for lag in lags.finite if lag >= lowest),
                   None if lags.tail is None else max(lags.tail, lowest))
    return legal.order()


def _structural_reasons(model: ModelGraph) -> list[OutsideReason]:
    reasons = []
    for _, reference in model.references():
        if reference.newest < 0:
            reasons.append(OutsideReason(
                "future-reference", f"{reference.describe()} refers to the future",
                reference.span, hint="a model may only depend on steps up to t"))

    same_step = nx.DiGraph()
    for parent, child, data in model.graph.edges(data=True):
        if 0 in data["lags"]:
            same_step.add_edge(parent, child, references=data["references"])
    try:
        cycle = nx.find_cycle(same_step)
    except nx.NetworkXNoCycle:
        cycle = None
    if cycle:
        path = " -> ".join(f"{parent}[t]" for parent, _ in cycle) + f" -> {cycle[0][0]}[t]"
        parent, child = cycle[-1]
        span = next((ref.span for ref in same_step.edges[parent, child]["references"]
                     if 0 in LagSet.span(ref.oldest, ref.newest)), None)
        hint = (f"read {parent}[t-1] instead of {parent}[t]" if len(cycle) == 1 else
                "break the cycle by reading one of these at t-1")
        reasons.append(OutsideReason("cycle-within-step", f"a cycle within one step: {path}",
                                     span, hint=hint))
    return reasons


def _edge_reasons(model: ModelGraph, z: str, x: str, edge_lags: dict[str, LagSet]
                  ) -> list[OutsideReason]:
    reasons = []
    z_span = _dependency_span(model, z) or model.graph.nodes[z]["span"]
    x_span = _dependency_span(model, x) or model.graph.nodes[x]["span"]

    transition = edge_lags["z<-z"]
    if not LagSet(frozenset(lag for lag in transition.finite if lag > 0), transition.tail):
        reasons.append(OutsideReason(
            "no-transition", f"{z}[t] depends on no earlier {z}: the latent does not evolve "
                             "(as in STORN or RVAE)", z_span,
            hint=f"add `{z}[t] <- {z}[t-1]`"))
    elif 1 not in transition:
        reasons.append(OutsideReason(
            "transition-without-previous-latent",
            f"the transition of {z}[t] does not read {z}[t-1]", z_span,
            hint=f"add {z}[t-1] to the parents of {z}[t]"))

    if 0 not in edge_lags["x<-z"]:
        reasons.append(OutsideReason(
            "emission-without-current-latent", f"the emission of {x}[t] does not read {z}[t]",
            x_span, hint=f"add `{x}[t] <- {z}[t]`"))

    if 0 in edge_lags["z<-x"]:
        reasons.append(OutsideReason(
            "observation-feeds-latent-at-same-step",
            f"{x}[t] feeds {z}[t] at the same step", z_span,
            hint=f"let {z}[t] read {x}[t-1] instead"))
    return reasons


def _dependency_span(model: ModelGraph, child: str) -> Span | None:
    for dependency in model.spec.dependencies:
        if dependency.child.name == child:
            return dependency.span
    return None


class _UnrolledAnalysis:
    """D-separation queries on the model unrolled over enough steps."""

    def __init__(self, model: ModelGraph, z: str, x: str, edge_lags: dict[str, LagSet]):
        # A whole-history reference 1:t-k starts k steps back, so k counts like a
        # finite lag. Unless t lies past it, the edge is missing from the unrolled graph.
        reach = [1]
        for data in model.graph.edges.values():
            reach += data["lags"].finite
            if data["lags"].tail is not None:
                reach.append(data["lags"].tail)
        horizon = max(reach)
        self.z, self.x = z, x
        self.step = 3 * horizon + 3         # the step t the queries are about
        self.steps = self.step + horizon + 2  # T: the future observations after t
        self.unrolled = unroll(model, self.steps)
        self.order = list(nx.topological_sort(self.unrolled))

    def _determined(self, given: set) -> set:
        """Extend `given` by the deterministic states that it fixes.

        A deterministic state is a function of its parents, so it is known once
        they all are (D-separation with functional nodes, Geiger et al. 1990).
        """
        known = set(given)
        for node in self.order:
            if node in known or self.unrolled.nodes[node]["kind"] != "deterministic":
                continue
            if all(parent in known for parent in self.unrolled.predecessors(node)):
                known.add(node)
        return known

    def _separated(self, targets, others, given) -> bool:
        given = self._determined(set(given))
        others = set(others) - given - set(targets)
        if not others:
            return True
        return nx.is_d_separator(self.unrolled, set(targets), others, given)

    def markov_properties(self) -> dict[str, bool]:
        """Whether each first-order Markov property of MARKOV_PROPERTIES holds."""
        z, x, t = self.z, self.x, self.step
        past = range(1, t)
        return {
            "z<-z": self._separated({(z, t)}, {(z, s) for s in range(1, t - 1)},
                                    {(z, t - 1)} | {(x, s) for s in past}),
            "x<-z": self._separated({(x, t)}, {(z, s) for s in past},
                                    {(z, t)} | {(x, s) for s in past}),
            "x<-x": self._separated({(x, t)}, {(x, s) for s in range(1, t - 1)},
                                    {(x, t - 1)} | {(z, s) for s in range(1, t + 1)}),
            "z<-x": self._separated({(z, t)}, {(x, s) for s in range(1, t - 1)},
                                    {(x, t - 1)} | {(z, s) for s in past}),
        }

    def guide_facts(self) -> GuideFacts:
        z, x, t = self.z, self.x, self.step
        independent = self._separated({(z, t)}, {(x, s) for s in range(1, t)}, {(z, t - 1)})

        # Shrink z[1:t-1], x[1:T] to a minimal conditioning set of p(z[t] | ...),
        # dropping the oldest first; d-separation's contraction property makes
        # the set left over separate z[t] from everything dropped.
        candidates = [(z, s) for s in range(1, t)] + [(x, s) for s in range(1, self.steps + 1)]
        kept: list[tuple[str, int]] = []
        start = 0
        while start < len(candidates):
            end = self._droppable_run_end(kept, candidates, start)
            if end < len(candidates):
                kept.append(candidates[end])
            start = end + 1
        return GuideFacts(independent, self._describe(kept),
                          z_lags=self._past_lags(kept, z), x_past_lags=self._past_lags(kept, x),
                          x_current_and_future=all((x, s) in kept
                                                   for s in range(t, self.steps + 1)))

    def _droppable_run_end(self, kept: list, candidates: list, start: int) -> int:
        """Return the largest `end` such that z[t] is separated from candidates[start:end].

        Dropping candidates one at a time, oldest first, drops exactly this run
        and then keeps candidates[end]. By weak union and decomposition, every
        shorter run is separable whenever a longer one is. By contraction,
        candidates[end] cannot be dropped after the run. So a doubling and then
        a binary search find the run in a logarithmic number of queries, which
        keeps long windows such as z[t-50:t-1] fast.
        """
        target = {(self.z, self.step)}

        def separable(end: int) -> bool:
            return self._separated(target, set(candidates[start:end]),
                                   kept + candidates[end:])

        low, size = start, 1
        while low + size <= len(candidates) and separable(low + size):
            low, size = low + size, size * 2
        # separable(low) holds; separable(high) does not, or high is past the end.
        high = min(low + size, len(candidates) + 1)
        while high - low > 1:
            middle = (low + high) // 2
            if separable(middle):
                low = middle
            else:
                high = middle
        return low

    def _past_lags(self, kept: list[tuple[str, int]], name: str) -> LagSet:
        """The lags before t kept for `name`; a run that reaches step 1 becomes a tail."""
        t = self.step
        lags = sorted(t - s for variable, s in kept if variable == name and s < t)
        if not lags or lags[-1] != t - 1:
            return LagSet(frozenset(lags))
        tail = lags[-1]
        while tail - 1 in lags:
            tail -= 1
        return LagSet(frozenset(lag for lag in lags if lag < tail), tail)

    def _describe(self, kept: list[tuple[str, int]]) -> list[str]:
        t, last = self.step, self.steps
        parts = []
        for name in (self.z, self.x):
            steps = sorted(s for variable, s in kept if variable == name)
            runs: list[list[int]] = []
            for s in steps:
                if runs and runs[-1][-1] == s - 1:
                    runs[-1].append(s)
                else:
                    runs.append([s])
            for run in runs:
                first = "1" if run[0] == 1 else _relative(run[0], t)
                end = "T" if run[-1] == last else _relative(run[-1], t)
                parts.append(f"{name}[{first}]" if first == end else f"{name}[{first}:{end}]")
        return parts


def _relative(step: int, t: int) -> str:
    offset = step - t
    return "t" if offset == 0 else (f"t{offset}" if offset < 0 else f"t+{offset}")


def check_text(text: str, path: str = "<spec>") -> Placement:
    """Place spec text that is not in a file (for notebooks and tests)."""
    from taxonomy.parser import parse_spec

    return place(build_graph(parse_spec(text, path)))
