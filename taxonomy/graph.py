"""The model graph: a checked spec as a NetworkX graph of variables and lagged edges.

Nodes are the spec's variables, named as in the spec, with the attribute
`kind` ("latent", "observed" or "deterministic"). An edge parent -> child
carries `lags`, the LagSet of steps back at which the child reads the parent,
and `references`, the spec references it came from. A deterministic state's
recurrence on its own previous value is an edge from the state to itself at
lag 1.
"""

from __future__ import annotations

import keyword
from collections.abc import Iterable
from dataclasses import dataclass, field

import networkx as nx

from taxonomy.errors import Location, SpecError, did_you_mean
from taxonomy.lags import LagSet
from taxonomy.parser import KEYWORDS
from taxonomy.syntax import Reference, Span, Spec

FAMILIES = ("bernoulli", "normal", "exponential")
LATENT_FAMILIES = ("normal",)
RNN_CELLS = ("gru", "lstm", "rnn")
GUIDES = ("partial", "full")
FLOWS = ("iaf",)
DEFAULT_SIZES = {
    "mlp": 100,        # hidden width of every MLP head (prior, emission, combiner)
    "rnn": 200,        # width of the RNN states of the canonical realisation
    "inference": 600,  # width of the guide's RNN over the observations
}
# IAF layers and hidden width when `flow iaf` gives no sizes; see default_flow_width.
DEFAULT_FLOW = (3, 20)


def default_flow_width(latent_dim: int) -> int:
    """Return the IAF hidden width used when none is given: 20, or the latent dimension if larger.

    Each autoregressive layer needs a hidden width of at least the latent dimension.
    """
    return max(DEFAULT_FLOW[1], latent_dim)
RESERVED = set(KEYWORDS) | {"t", "all"}
# Names the generated module uses itself: imports, its classes, method
# arguments and loop variables. A spec variable with one of them would shadow it.
GENERATED_NAMES = {
    "torch", "nn", "pyro", "dist", "poutine", "blocks", "NamedTuple", "PriorSequence",
    "PosteriorSequence", "States", "Model", "self", "batch", "steps", "mask", "lengths",
    "states", "summaries", "summary", "loc", "scale", "log_q", "locs", "scales", "draws",
    "means", "num_samples", "num_sequences", "use_mean", "annealing_factor", "x_dim",
    "z_dim", "x_family", "guide", "flow", "mlp", "inference", "super",
}
# Suffixes the generated code appends to a variable's name (initial value,
# per-step lists, RNN carries, values at step t).
GENERATED_SUFFIXES = ("_0", "_steps", "_carry", "_t")
# The checker unrolls a model over about 4 * MAX_LAG steps, and its d-separation
# queries take time roughly cubic in the largest lag (about 6 s for lag 50 on a
# 2-core machine). So finite lags stop here, and longer memory is a whole history.
MAX_LAG = 50
STOCHASTIC = ("latent", "observed")


@dataclass
class ModelGraph:
    """A spec after the name and type checks, with its graph.

    :param Spec spec: the parsed spec.
    :param networkx.DiGraph graph: variables and lagged edges, see the module docstring.
    """

    spec: Spec
    graph: nx.DiGraph
    guide: str = "full"
    guide_declared: bool = False
    flow: tuple[int, int] | None = None
    sizes: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_SIZES))

    @property
    def name(self) -> str:
        return self.spec.model

    @property
    def path(self) -> str:
        return self.spec.path

    def nodes_of_kind(self, *kinds: str) -> list[str]:
        return [node for node, kind in self.graph.nodes(data="kind") if kind in kinds]

    @property
    def latents(self) -> list[str]:
        return self.nodes_of_kind("latent")

    @property
    def observed(self) -> list[str]:
        return self.nodes_of_kind("observed")

    @property
    def deterministic(self) -> list[str]:
        return self.nodes_of_kind("deterministic")

    def is_stochastic(self, name: str) -> bool:
        return self.graph.nodes[name]["kind"] in STOCHASTIC

    def parents(self, child: str) -> dict[str, LagSet]:
        """Direct parents of `child` and the lags at which it reads them (recurrence excluded)."""
        recurrent = self.graph.nodes[child]["kind"] == "deterministic"
        return {parent: data["lags"] for parent, _, data in self.graph.in_edges(child, data=True)
                if not (recurrent and parent == child)}

    def error(self, message: str, span: Span | None, hint: str | None = None) -> SpecError:
        if span is None:
            return SpecError(message, Location(self.path), hint=hint)
        return SpecError(message, Location(self.path, span.line, span.column, span.end_column),
                         hint=hint, source_line=self.spec.line_text(span.line))

    def carried_history(self) -> dict[str, dict[str, LagSet]]:
        """For each deterministic state h, the stochastic variables h[t] is a function of.

        h[t] = cell(inputs, h[t-1]) unrolls to a function of every input from its
        smallest lag on, so each entry is a whole-history LagSet. States that
        feed each other are solved by iterating to a fixed point.
        """
        states = self.deterministic
        carried: dict[str, dict[str, LagSet]] = {state: {} for state in states}

        # Lags only shrink towards their least value, so this settles within a
        # few rounds per state unless a future reference drives them down.
        for _ in range(4 * (len(states) + 1)):
            changed = False
            for state in states:
                update: dict[str, LagSet] = {}
                for parent, lags in self.parents(state).items():
                    for variable, seen in self._reads(parent, lags, carried).items():
                        update[variable] = update.get(variable, LagSet()) | seen
                update = {variable: lags.as_history() for variable, lags in update.items()}
                if update != carried[state]:
                    carried[state] = update
                    changed = True
            if not changed:
                break
        return carried

    def stochastic_dependencies(self) -> dict[str, dict[str, LagSet]]:
        """For each stochastic child, the stochastic variables and lags it depends on.

        Dependencies through deterministic states are resolved, so the explicit
        and the dependency-line form of a model give the same answer.
        """
        carried = self.carried_history()
        result: dict[str, dict[str, LagSet]] = {}
        for child in self.nodes_of_kind(*STOCHASTIC):
            dependencies: dict[str, LagSet] = {}
            for parent, lags in self.parents(child).items():
                for variable, seen in self._reads(parent, lags, carried).items():
                    dependencies[variable] = dependencies.get(variable, LagSet()) | seen
            result[child] = dependencies
        return result

    def _reads(self, parent: str, lags: LagSet, carried: dict[str, dict[str, LagSet]]
               ) -> dict[str, LagSet]:
        if self.is_stochastic(parent):
            return {parent: lags}
        smallest = lags.smallest()
        return {variable: seen.shifted(smallest) for variable, seen in carried[parent].items()}

    def references(self) -> Iterable[tuple[str, Reference]]:
        """Every reference in the spec with the node that reads it."""
        for dependency in self.spec.dependencies:
            for reference in dependency.parents:
                yield dependency.child.name, reference
        for state in self.spec.deterministic:
            for reference in state.inputs:
                yield state.name, reference


def build_graph(spec: Spec) -> ModelGraph:
    """Check the names, types and settings of a parsed spec and build its graph."""
    if spec.model is None:
        raise SpecError("missing `model NAME` statement", Location(spec.path, 1, 1),
                        hint="start the spec with a line such as `model ArSSM`",
                        source_line=spec.line_text(1))

    graph = nx.DiGraph()
    model = ModelGraph(spec=spec, graph=graph)
    _check_name(model, spec.model, spec.model_span, "model")

    declared: dict[str, Span] = {}

    def declare(name: str, span: Span) -> None:
        _check_name(model, name, span, "variable")
        if name in declared:
            raise model.error(f"'{name}' is declared twice", span,
                              hint=f"it is first declared on line {declared[name].line}")
        declared[name] = span

    for variable in spec.variables:
        declare(variable.name, variable.name_span)
        families = LATENT_FAMILIES if variable.kind == "latent" else FAMILIES
        if variable.family not in families:
            hint = did_you_mean(variable.family, families)
            if variable.kind == "latent" and variable.family in FAMILIES:
                hint = "latent variables are diagonal Gaussians: write `normal`"
            raise model.error(f"unknown {variable.kind} family '{variable.family}'",
                              variable.family_span,
                              hint=hint or "choose one of: " + ", ".join(families))
        if variable.dim < 1:
            raise model.error(f"'{variable.name}' has dimension {variable.dim}", variable.span,
                              hint="a dimension is a positive integer, e.g. normal[16]")
        graph.add_node(variable.name, kind=variable.kind, family=variable.family,
                       dim=variable.dim, span=variable.span)

    for state in spec.deterministic:
        declare(state.name, state.name_span)
        if state.index.oldest != 0 or state.index.newest != 0:
            raise model.error(f"a deterministic state is defined at step t, not "
                              f"{state.index.describe()}", state.index.span,
                              hint=f"write `deterministic {state.name}[t] = ...`")
        if state.cell not in RNN_CELLS:
            raise model.error(f"unknown RNN cell '{state.cell}'", state.cell_span,
                              hint=did_you_mean(state.cell, RNN_CELLS)
                              or "choose one of: " + ", ".join(RNN_CELLS))
        if state.size < 1:
            raise model.error(f"'{state.name}' has size {state.size}", state.cell_span,
                              hint="a state size is a positive integer, e.g. gru[200]")
        graph.add_node(state.name, kind="deterministic", cell=state.cell, size=state.size,
                       span=state.span)
        graph.add_edge(state.name, state.name, lags=LagSet(frozenset({1})), references=[])

    for name, span in declared.items():
        for suffix in GENERATED_SUFFIXES:
            base = name[:-len(suffix)]
            if name.endswith(suffix) and base in declared:
                raise model.error(
                    f"variable name '{name}' clashes with the compiled code's name for "
                    f"'{base}' ({suffix} is added to '{base}' there)", span,
                    hint=f"choose another name, e.g. '{base}{suffix.replace('_', '')}'")

    if not model.latents:
        raise model.error("no latent variable is declared", None,
                          hint="declare one, e.g. `latent z : normal[16]`")
    if not model.observed:
        raise model.error("no observed variable is declared", None,
                          hint="declare one, e.g. `observed x : bernoulli[88]`")

    for state in spec.deterministic:
        for reference in state.inputs:
            _check_reference(model, reference)
            if reference.name == state.name:
                raise model.error(f"'{state.name}' lists itself as an input", reference.span,
                                  hint=f"the recurrence on {state.name}[t-1] is implied; "
                                       "list only the other inputs")
            if reference.is_whole_history:
                raise model.error(f"a deterministic state reads single steps or windows, not "
                                  f"the whole history {reference.describe()}", reference.span,
                                  hint=f"{state.name} already carries the history of its "
                                       f"inputs: write {reference.name}[t-{reference.newest}]"
                                  if reference.newest else
                                  f"{state.name} already carries the history of its inputs: "
                                  f"write {reference.name}[t]")
            _add_reference(graph, state.name, reference)

    for dependency in spec.dependencies:
        child = dependency.child
        if child.name not in graph:
            raise model.error(f"unknown variable '{child.name}'", child.name_span,
                              hint=did_you_mean(child.name, list(graph))
                              or "declare it as `latent` or `observed` first")
        if graph.nodes[child.name]["kind"] == "deterministic":
            raise model.error(f"'{child.name}' is a deterministic state; its inputs are given "
                              "where it is defined", child.span,
                              hint="list them in its `deterministic` line")
        if child.oldest != 0 or child.newest != 0:
            raise model.error(f"the child of a dependency is written at step t, not "
                              f"{child.describe()}", child.span,
                              hint=f"write `{child.name}[t] <- ...` and shift the parents")
        for reference in dependency.parents:
            _check_reference(model, reference)
            if (graph.nodes[reference.name]["kind"] == "deterministic"
                    and reference.is_whole_history):
                raise model.error(f"{reference.describe()}: a deterministic state already "
                                  "carries the history", reference.span,
                                  hint=f"refer to {reference.name}[t] or "
                                       f"{reference.name}[t-1]")
            _add_reference(graph, child.name, reference)

    _apply_settings(model)
    return model


def _add_reference(graph: nx.DiGraph, child: str, reference: Reference) -> None:
    lags = LagSet.span(reference.oldest, reference.newest)
    if graph.has_edge(reference.name, child):
        data = graph.edges[reference.name, child]
        data["lags"] = data["lags"] | lags
        data["references"].append(reference)
    else:
        graph.add_edge(reference.name, child, lags=lags, references=[reference])


def _check_reference(model: ModelGraph, reference: Reference) -> None:
    if reference.name not in model.graph:
        hint = did_you_mean(reference.name, list(model.graph))
        raise model.error(f"unknown variable '{reference.name}'", reference.name_span,
                          hint=hint or "declare it with `latent`, `observed` or "
                                       "`deterministic` first")
    farthest = max(abs(reference.newest), abs(reference.oldest or 0))
    if farthest > MAX_LAG:
        raise model.error(f"{reference.describe()} reaches {farthest} steps from t, more than "
                          f"the {MAX_LAG} the checker supports", reference.span,
                          hint=f"for a longer memory write the whole history, e.g. "
                               f"{reference.name}[1:t-1]")


def _check_name(model: ModelGraph, name: str, span: Span, what: str) -> None:
    problem = name_problem(name)
    if problem is not None:
        reason, hint = problem
        raise model.error(f"{what} name '{name}' {reason}", span, hint=hint)


def name_problem(name: str) -> tuple[str, str] | None:
    """Why `name` cannot name a model or variable, and the fix; None when it can.

    Names become Python identifiers in generated code.
    """
    if not (name.isidentifier() and name.isascii()):
        return ("is not a plain identifier",
                "use ASCII letters, digits and underscores, starting with a letter")
    if keyword.iskeyword(name) or keyword.issoftkeyword(name):
        return "is a Python keyword", f"choose another name, e.g. '{name}_'"
    if name in RESERVED:
        return "is a reserved word of the spec language", f"choose another name, e.g. '{name}_'"
    if name.startswith("__"):
        return ("starts with a double underscore",
                f"choose another name, e.g. '{name.lstrip('_') or 'name'}'")
    if name in GENERATED_NAMES:
        return ("is a name the compiled module uses itself",
                f"choose another name, e.g. '{name}_'")
    return None


def _apply_settings(model: ModelGraph) -> None:
    seen: dict[tuple[str, str], Span] = {}
    for setting in model.spec.settings:
        key = (setting.keyword, setting.name if setting.keyword == "size" else "")
        if key in seen:
            raise model.error(f"`{setting.keyword}` is set twice", setting.span,
                              hint=f"it is first set on line {seen[key].line}")
        seen[key] = setting.span

        if setting.keyword == "guide":
            if setting.name not in GUIDES:
                raise model.error(f"unknown guide '{setting.name}'", setting.name_span,
                                  hint=did_you_mean(setting.name, GUIDES)
                                  or "write `guide partial` or `guide full`")
            model.guide = setting.name
            model.guide_declared = True
        elif setting.keyword == "flow":
            if setting.name not in FLOWS:
                raise model.error(f"unknown flow '{setting.name}'", setting.name_span,
                                  hint=did_you_mean(setting.name, FLOWS)
                                  or "write `flow iaf[LAYERS, WIDTH]`")
            latent_dims = [data["dim"] for _, data in model.graph.nodes(data=True)
                           if data["kind"] == "latent"]
            if not setting.values:
                model.flow = (DEFAULT_FLOW[0], default_flow_width(max(latent_dims, default=0)))
                continue
            if len(setting.values) != 2 or min(setting.values) < 1:
                raise model.error("`flow iaf` takes two positive integers: layers and hidden "
                                  "width", setting.span, hint="e.g. `flow iaf[3, 20]`")
            model.flow = (setting.values[0], setting.values[1])
            if latent_dims and model.flow[1] < max(latent_dims):
                raise model.error(
                    f"the IAF's hidden width {model.flow[1]} is below the latent dimension "
                    f"{max(latent_dims)}", setting.span,
                    hint=f"each autoregressive layer needs a hidden width of at least the "
                         f"latent dimension: write `flow iaf[{model.flow[0]}, "
                         f"{max(latent_dims)}]` or larger")
        elif setting.keyword == "size":
            if setting.name not in DEFAULT_SIZES:
                raise model.error(f"unknown size '{setting.name}'", setting.name_span,
                                  hint=did_you_mean(setting.name, DEFAULT_SIZES)
                                  or "sizes: " + ", ".join(DEFAULT_SIZES))
            if setting.values[0] < 1:
                raise model.error(f"size {setting.name} must be a positive integer",
                                  setting.span)
            model.sizes[setting.name] = setting.values[0]


def unroll(model: ModelGraph, steps: int, include_future: bool = False) -> nx.DiGraph:
    """Unroll the model over `steps` steps; nodes are (name, step) with step from 1.

    An edge read at a lag that reaches before step 1 is dropped, as the initial
    states are parameters, not variables.
    """
    unrolled = nx.DiGraph()
    for node, data in model.graph.nodes(data=True):
        for step in range(1, steps + 1):
            unrolled.add_node((node, step), kind=data["kind"])

    for parent, child, data in model.graph.edges(data=True):
        lags: LagSet = data["lags"]
        for step in range(1, steps + 1):
            for lag in lags.lags_up_to(step - 1):
                if lag < 0:
                    continue
                source = step - lag
                if 1 <= source <= steps:
                    unrolled.add_edge((parent, source), (child, step),
                                      deterministic=model.graph.nodes[child]["kind"]
                                      == "deterministic")
            if include_future:
                for lag in lags.finite:
                    if lag < 0 and step - lag <= steps:
                        unrolled.add_edge((parent, step - lag), (child, step), future=True,
                                          deterministic=model.graph.nodes[child]["kind"]
                                          == "deterministic")
    return unrolled
