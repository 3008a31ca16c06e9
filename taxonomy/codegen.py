"""Plan the network of a placed spec and render it as a Pyro module.

The plan decides, from the model graph alone, what each head reads at step t
(values at finite lags, or RNN states for whole histories), in which order a
step is computed, and what the guide conditions on. The Jinja2 templates in
templates/ turn the plan into Python.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path

import jinja2
import networkx as nx

from taxonomy.errors import SpecError
from taxonomy.graph import ModelGraph
from taxonomy.hierarchy import EDGE_KINDS, Placement, place
from taxonomy.lags import LagSet
from taxonomy.syntax import Reference

GENERATOR_VERSION = "1"


@dataclass(frozen=True)
class Feature:
    """One input of a head or a state at step t: a variable or state, `lag` steps back."""

    source: str
    lag: int
    is_state: bool

    @property
    def text(self) -> str:
        return f"{self.source}[t]" if self.lag == 0 else f"{self.source}[t-{self.lag}]"


@dataclass
class StatePlan:
    """A deterministic state h[t] = cell(inputs at t, h[t-1])."""

    name: str
    cell: str
    size: int
    inputs: list[Feature]
    origin: str          # the spec text it comes from
    line: int | None
    reads_latent: bool = False
    guide_only: bool = False


@dataclass
class GuidePlan:
    """What q(z[t] | ...) reads under one alignment."""

    alignment: str
    features: list[Feature]
    bidirectional: bool
    description: str
    loop_states: list[str] = field(default_factory=list)
    precomputed_states: list[str] = field(default_factory=list)
    # Loop states whose value at t the combiner reads, so they step before z[t] is drawn.
    states_before_draw: list[str] = field(default_factory=list)
    # Precomputed states that loop states read step by step.
    stepped_states: list[str] = field(default_factory=list)
    # Whether loop states read x step by step.
    loop_reads_x: bool = False
    # Whether this guide computes every state of the model, which may then reuse them.
    shares_states: bool = False


@dataclass
class Plan:
    """Everything the templates need to write one compiled module."""

    model: ModelGraph
    placement: Placement
    z: str
    x: str
    states: list[StatePlan]
    transition: list[Feature]
    emission: list[Feature]
    transition_origin: list[tuple[int, str]]
    emission_origin: list[tuple[int, str]]
    step_order: list[str]
    guides: dict[str, GuidePlan]
    needs_x_initial: bool

    @property
    def state_map(self) -> dict[str, StatePlan]:
        return {state.name: state for state in self.states}


def _statement_text(model: ModelGraph, line: int) -> str:
    return model.spec.line_text(line).split("#", 1)[0].strip()


class _Planner:
    def __init__(self, model: ModelGraph, placement: Placement):
        self.model = model
        self.placement = placement
        self.z = model.latents[0]
        self.x = model.observed[0]
        self.carried = model.carried_history()
        self.states: dict[str, StatePlan] = {}
        self.canonical: dict[str, str] = {}

        for declaration in model.spec.deterministic:
            inputs = self._features(declaration.inputs)
            self.states[declaration.name] = StatePlan(
                declaration.name, declaration.cell, model.graph.nodes[declaration.name]["size"],
                inputs, _statement_text(model, declaration.span.line), declaration.span.line)

    def canonical_state(self, variable: str, origin: str, line: int | None) -> str:
        """The shared RNN over `variable`[t] that realises whole-history references to it."""
        if variable not in self.canonical:
            name = f"h_{variable}"
            while name in self.model.graph or name in self.states:
                name += "_"
            self.canonical[variable] = name
            self.states[name] = StatePlan(
                name, "gru", self.model.sizes["rnn"], [Feature(variable, 0, False)],
                f"canonical realisation of {variable}[1:t]: {name}[t] = gru({variable}[t], "
                f"{name}[t-1]), first needed by `{origin}`", line)
            self.carried[name] = {variable: LagSet(frozenset(), 0)}
        return self.canonical[variable]

    def _features(self, references: tuple[Reference, ...] | list[Reference],
                  origin: str = "", line: int | None = None) -> list[Feature]:
        features: list[Feature] = []
        for reference in references:
            lags = LagSet.span(reference.oldest, reference.newest)
            is_state = self.model.graph.nodes[reference.name]["kind"] == "deterministic"
            new = [Feature(reference.name, lag, is_state)
                   for lag in sorted(lags.finite, reverse=True)]
            if lags.tail is not None:
                state = self.canonical_state(reference.name, origin, line)
                new.insert(0, Feature(state, lags.tail, True))
            features += [feature for feature in new if feature not in features]
        return features

    def head(self, child: str) -> tuple[list[Feature], list[tuple[int, str]]]:
        references, origin = [], []
        for dependency in self.model.spec.dependencies:
            if dependency.child.name == child:
                references.append(dependency)
                origin.append((dependency.span.line,
                               _statement_text(self.model, dependency.span.line)))
        features: list[Feature] = []
        for dependency in references:
            text = _statement_text(self.model, dependency.span.line)
            for feature in self._features(dependency.parents, text, dependency.span.line):
                if feature not in features:
                    features.append(feature)
        return features, origin

    def mark_latent_states(self) -> None:
        for name, state in self.states.items():
            state.reads_latent = self.z in self.carried.get(name, {}) or any(
                feature.source == self.z for feature in state.inputs)

    def state_order(self) -> list[str]:
        dependencies = nx.DiGraph()
        dependencies.add_nodes_from(self.states)
        for name, state in self.states.items():
            for feature in state.inputs:
                if feature.is_state:
                    dependencies.add_edge(feature.source, name)
        try:
            return list(nx.lexicographical_topological_sort(
                dependencies, key=lambda name: list(self.states).index(name)))
        except nx.NetworkXUnfeasible:
            cycle = [edge[0] for edge in nx.find_cycle(dependencies)]
            span = next(declaration.span for declaration in self.model.spec.deterministic
                        if declaration.name == cycle[0])
            raise self.model.error(
                f"deterministic states that read each other ({' -> '.join(cycle)}) are not "
                "supported yet", span,
                hint="merge them into one state with both inputs") from None

    def step_order(self, transition: list[Feature], emission: list[Feature]) -> list[str]:
        """Order of z, x and the states within one step: by the lag-0 reads."""
        same_step = nx.DiGraph()
        same_step.add_nodes_from([self.z, self.x, *self.states])
        consumers = [(self.z, transition), (self.x, emission)] + [
            (name, state.inputs) for name, state in self.states.items()]
        for consumer, features in consumers:
            for feature in features:
                if feature.lag == 0:
                    same_step.add_edge(feature.source, consumer)
        rank = {self.z: (0, 0), self.x: (2, 0)}
        rank.update({name: (1, index) for index, name in enumerate(self.states)})
        return list(nx.lexicographical_topological_sort(same_step, key=lambda n: rank[n]))

    def guide_step_order(self, guide: GuidePlan) -> list[str]:
        """Order of z and the guide's loop states within one step: by the lag-0 reads.

        The combiner reads its features at t before z[t] is drawn, so a state it
        reads at lag 0 (such as d[t] = gru(z[t-1], d[t-1])) steps first.
        """
        same_step = nx.DiGraph()
        same_step.add_nodes_from([self.z, *guide.loop_states])
        for feature in guide.features:
            if feature.lag == 0 and feature.source in guide.loop_states:
                same_step.add_edge(feature.source, self.z)
        for name in guide.loop_states:
            for feature in self.states[name].inputs:
                if feature.lag == 0 and feature.source in same_step:
                    same_step.add_edge(feature.source, name)
        rank = {self.z: -1}
        rank.update({name: index for index, name in enumerate(guide.loop_states)})
        return list(nx.lexicographical_topological_sort(same_step, key=lambda n: rank[n]))

    def _state_carrying(self, variable: str, tail: int, pure: bool,
                        preferred: list[Feature]) -> Feature | None:
        """A state and lag whose value carries exactly `variable`[1:t-tail]."""
        candidates = []
        for name, carried in self.carried.items():
            if variable not in carried:
                continue
            if pure and set(carried) != {variable}:
                continue
            seen = carried[variable]
            if seen.finite or seen.tail is None or seen.tail > tail:
                continue
            candidates.append(Feature(name, tail - seen.tail, True))
        candidates.sort(key=lambda feature: (feature not in preferred,
                                             list(self.states).index(feature.source)))
        return candidates[0] if candidates else None

    def guides(self, transition: list[Feature]) -> dict[str, GuidePlan]:
        facts = self.placement.guide
        partial = GuidePlan(
            "partial", [Feature(self.z, 1, False)], not facts.z_independent_of_past_x,
            f"q({self.z}[t] | {self.z}[t-1], {self.x}[{'t' if facts.z_independent_of_past_x else '1'}:T])")

        features: list[Feature] = []
        for lag in sorted(facts.z_lags.finite, reverse=True):
            features.append(Feature(self.z, lag, False))
        if facts.z_lags.tail is not None:
            state = self._state_carrying(self.z, facts.z_lags.tail, pure=False,
                                         preferred=transition)
            if state is None:
                name = self.canonical_state(self.z, "the full-alignment guide", None)
                self.states[name].guide_only = not any(
                    feature.source == name for feature in transition)
                state = Feature(name, facts.z_lags.tail, True)
            features.insert(0, state)
        bidirectional = False
        for lag in sorted(facts.x_past_lags.finite, reverse=True):
            features.append(Feature(self.x, lag, False))
        if facts.x_past_lags.tail is not None:
            state = self._state_carrying(self.x, facts.x_past_lags.tail, pure=True,
                                         preferred=transition)
            # NOTE: a state that also carries z, such as VRNN's h, is passed over
            # here, so VRNN reads x[1:t-1] through a bidirectional RNN although
            # h[t-1] and a window x[t-1] would carry it with a backward one.
            if state is None:
                bidirectional = True
            else:
                features.append(state)
        summary = "bidirectional RNN over x[1:T]" if bidirectional else \
            f"backward RNN over {self.x}[t:T]"
        description = (f"q({self.z}[t] | {', '.join(f.text for f in features)}, {summary}); "
                       f"exact factor p({self.z}[t] | "
                       f"{', '.join(facts.posterior_conditioning)})")
        full = GuidePlan("full", features, bidirectional, description)

        self.mark_latent_states()
        for guide in (partial, full):
            needed = [f.source for f in guide.features if f.is_state]
            closure: set[str] = set()
            while needed:
                name = needed.pop()
                if name in closure:
                    continue
                closure.add(name)
                needed += [f.source for f in self.states[name].inputs if f.is_state]
            ordered = [name for name in self.states if name in closure]
            guide.loop_states = [n for n in ordered if self.states[n].reads_latent]
            guide.precomputed_states = [n for n in ordered if not self.states[n].reads_latent]
        return {"partial": partial, "full": full}


def plan_model(model: ModelGraph, placement: Placement | None = None) -> Plan:
    """Decide the network of a model that lies inside the hierarchy."""
    placement = placement or place(model)
    problems = placement.problems()
    if problems:
        raise problems[0]

    planner = _Planner(model, placement)
    transition, transition_origin = planner.head(planner.z)
    emission, emission_origin = planner.head(planner.x)
    guides = planner.guides(transition)
    order = planner.state_order()
    for guide in guides.values():
        guide.loop_states = [n for n in order if n in guide.loop_states]
        guide.precomputed_states = [n for n in order if n in guide.precomputed_states]
        within_step = planner.guide_step_order(guide)
        guide.states_before_draw = within_step[:within_step.index(planner.z)]
        loop_inputs = [feature.source for name in guide.loop_states
                       for feature in planner.states[name].inputs]
        guide.stepped_states = [n for n in guide.precomputed_states if n in loop_inputs]
        guide.loop_reads_x = planner.x in loop_inputs
    states = [planner.states[name] for name in order]
    model_states = [state.name for state in states if not state.guide_only]
    for guide in guides.values():
        computed = set(guide.loop_states) | set(guide.precomputed_states)
        guide.shares_states = bool(model_states) and computed.issuperset(model_states)
    step_order = planner.step_order(transition, emission)

    all_features = transition + emission + [f for s in states for f in s.inputs] + [
        f for g in guides.values() for f in g.features]
    needs_x_initial = any(f.source == planner.x and f.lag > 0 for f in all_features)
    return Plan(model, placement, planner.z, planner.x, states, transition, emission,
                transition_origin, emission_origin, step_order, guides, needs_x_initial)


# --- rendering -------------------------------------------------------------

@functools.lru_cache(maxsize=1)
def _environment() -> jinja2.Environment:
    return jinja2.Environment(
        loader=jinja2.FileSystemLoader(str(Path(__file__).with_name("templates"))),
        undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True,
        keep_trailing_newline=True)


class _Expressions:
    """Python expressions for features, in the vectorised and the step-by-step code."""

    def __init__(self, plan: Plan):
        self.plan = plan

    def width(self, feature: Feature) -> str:
        if feature.is_state:
            return str(self.plan.state_map[feature.source].size)
        return "z_dim" if feature.source == self.plan.z else "x_dim"

    def widths(self, features: list[Feature]) -> str:
        return " + ".join(self.width(feature) for feature in features)

    def width_list(self, features: list[Feature]) -> str:
        return ", ".join(self.width(feature) for feature in features)

    def step_list(self, features: list[Feature]) -> str:
        return ", ".join(self.step(feature) for feature in features)

    def _in_guide_loop(self, guide: GuidePlan, feature: Feature) -> bool:
        return feature.source == self.plan.z or feature.source in guide.loop_states

    def guide_sequences(self, guide: GuidePlan) -> str:
        """Return the combiner's features known before the guide's loop, over all steps.

        Features that the loop computes are None here.
        """
        return ", ".join("None" if self._in_guide_loop(guide, feature) else self.local(feature)
                         for feature in guide.features)

    def guide_steps(self, guide: GuidePlan) -> str:
        """Return the combiner's features that the guide's loop computes, at step t.

        Features known before the loop are None here.
        """
        return ", ".join(self.step(feature) if self._in_guide_loop(guide, feature) else "None"
                         for feature in guide.features)

    def guide_states(self, guide: GuidePlan) -> str:
        """Return the model's states, as the guide computed them, over all steps."""
        values = [(state.name, f"torch.stack({state.name}_steps, dim=1)"
                   if state.name in guide.loop_states else state.name)
                  for state in self.plan.states if not state.guide_only]
        return ", ".join(f"{name}={value}" for name, value in values)

    def initial(self, feature: Feature) -> str:
        if feature.is_state:
            return f"self.{feature.source}.h_0"
        return f"self.{feature.source}_0"

    def sequence(self, feature: Feature) -> str:
        """The feature over all steps, shape (batch, time, width)."""
        name = f"states.{feature.source}" if feature.is_state else feature.source
        if feature.lag == 0:
            return name
        return f"blocks.shift({name}, {feature.lag}, {self.initial(feature)})"

    def step(self, feature: Feature) -> str:
        """The feature at step t inside a loop over steps (0-based t)."""
        history = f"{feature.source}_steps"
        if feature.lag == 0:
            return f"{history}[t]"
        return f"blocks.at_step({history}, t - {feature.lag}, {self.initial(feature)}, batch)"

    def local(self, feature: Feature) -> str:
        """The feature over all steps where states are local variables."""
        if feature.lag == 0:
            return feature.source
        return f"blocks.shift({feature.source}, {feature.lag}, {self.initial(feature)})"

    def concat_local(self, features: list[Feature]) -> str:
        return self.concat(features, "local")

    def concat(self, features: list[Feature], mode: str) -> str:
        parts = [getattr(self, mode)(feature) for feature in features]
        return parts[0] if len(parts) == 1 else f"torch.cat([{', '.join(parts)}], dim=-1)"

    @staticmethod
    def texts(features: list[Feature]) -> str:
        return ", ".join(feature.text for feature in features)


def render_module(plan: Plan, source_name: str) -> str:
    """Render the plan as the text of a Python module."""
    model = plan.model
    placement = plan.placement
    template = _environment().get_template("module.py.j2")
    return template.render(
        plan=plan, model=model, placement=placement, cell=placement.cell,
        markers=" ".join(EDGE_KINDS[edge].marker for edge in placement.cell.relaxed),
        known_as=", ".join(placement.cell.known_as) or "no named model",
        source_name=source_name, expr=_Expressions(plan), version=GENERATOR_VERSION,
        module_tag=model.name.lower())


def compile_model(model: ModelGraph, source_name: str | None = None) -> str:
    """Return the Python source of the compiled module for a model graph."""
    plan = plan_model(model)
    source = render_module(plan, source_name or model.path)
    try:
        compile(source, f"<compiled {model.name}>", "exec")
    except SyntaxError as error:  # a compiler bug, not a user mistake
        raise RuntimeError(f"the generated code for {model.path} does not parse: {error}")
    return source
