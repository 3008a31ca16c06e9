"""The compiler's plan and the Python it writes: imports, comments, branches, guides."""

import ast
import math
import re

import pyro
import pytest
import torch
from pyro.infer import Trace_ELBO
from support.compiled import ALL_SPECS, NAMED, one_torch_thread, spec_id

from taxonomy.codegen import Feature, compile_model, plan_model
from taxonomy.graph import build_graph
from taxonomy.parser import load_spec, parse_spec

__all__ = ["one_torch_thread"]  # the autouse fixture, imported for pytest

SPEC_IDS = [spec_id(path) for path in ALL_SPECS]


def source_of(path):
    return compile_model(build_graph(load_spec(path)), path.as_posix())


def plan_of_text(text, path="<spec>"):
    return plan_model(build_graph(parse_spec(text, path)))


@pytest.fixture(scope="module")
def sources():
    return {spec_id(path): source_of(path) for path in ALL_SPECS}


@pytest.fixture(scope="module")
def plans():
    return {spec_id(path): plan_model(build_graph(load_spec(path))) for path in ALL_SPECS}


# --- what the generated modules contain --------------------------------------

@pytest.mark.parametrize("name", SPEC_IDS)
def test_module_imports_only_torch_pyro_and_runtime(name, sources):
    imported = []
    for node in ast.walk(ast.parse(sources[name])):
        if isinstance(node, ast.Import):
            imported += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            imported += [f"{node.module}.{alias.name}" for alias in node.names]

    # typing.NamedTuple, from the standard library, types the States tuple.
    allowed = ("torch", "torch.", "pyro", "pyro.", "runtime.blocks", "runtime.sequences.",
               "typing.NamedTuple")
    assert imported
    assert [module for module in imported if not module.startswith(allowed)] == []


@pytest.mark.parametrize("name", SPEC_IDS)
def test_module_uses_every_import(name, sources):
    tree = ast.parse(sources[name])
    bound = set()
    for node in tree.body:
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            bound |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}

    assert bound - used == set()


@pytest.mark.parametrize("name", SPEC_IDS)
def test_module_uses_every_submodule_and_parameter(name, sources):
    tree = ast.parse(sources[name])
    created, read = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call):
            created |= {target.attr for target in node.targets
                        if isinstance(target, ast.Attribute)
                        and isinstance(target.value, ast.Name) and target.value.id == "self"}
        if (isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Load)
                and isinstance(node.value, ast.Name) and node.value.id == "self"):
            read.add(node.attr)

    assert created
    assert created - read == set()


# The only branches a compiled module may take: options chosen when the model
# is built or called, never features of the spec.
RUNTIME_CONDITIONS = {
    "guide not in ('partial', 'full')",
    "guide == 'partial'",
    "x is None",
    "self.alignment == 'partial'",
    "self.flow is None",
    "flow",
}


@pytest.mark.parametrize("name", SPEC_IDS)
def test_module_branches_only_on_runtime_options(name, sources):
    tree = ast.parse(sources[name])
    conditions = {ast.unparse(node.test) for node in ast.walk(tree)
                  if isinstance(node, (ast.If, ast.IfExp, ast.While))}

    assert conditions <= RUNTIME_CONDITIONS


def test_stateless_spec_has_no_state_code(sources):
    source = sources["dmm"]

    assert "States" not in source
    assert "_states" not in source
    assert "NamedTuple" not in source
    assert "x_0" not in source


def test_initial_x_only_where_a_lag_reads_it(sources, plans):
    for name, plan in plans.items():
        reads_past_x = any(feature.source == plan.x and feature.lag > 0 for feature in
                           plan.transition + plan.emission
                           + [f for state in plan.states for f in state.inputs]
                           + [f for guide in plan.guides.values() for f in guide.features])
        assert (f"self.{plan.x}_0 = " in sources[name]) == reads_past_x, name


def _statement(spec_text, line):
    return spec_text.split("\n")[line - 1].split("#", 1)[0].strip()


@pytest.mark.parametrize("path", ALL_SPECS, ids=spec_id)
def test_comments_cite_the_spec_lines_they_implement(path, sources):
    spec = load_spec(path)
    cited = {}
    for match in re.finditer(r"# (.*?)  \(spec line (\d+)\)", sources[spec_id(path)]):
        cited.setdefault(int(match.group(2)), []).append(match.group(1))

    statements = [d.span.line for d in spec.dependencies] + [
        d.span.line for d in spec.deterministic]
    assert set(statements) <= set(cited)
    for line, comments in cited.items():
        statement = _statement(spec.text, line)
        for comment in comments:
            assert comment == statement or f"`{statement}`" in comment, (line, comment)


def test_docstring_states_the_generative_process(sources):
    docstring = ast.get_docstring(ast.parse(sources["arssm"]))
    process = ["z[t] ~ Normal(transition(h1[t-1]))", "h1[t] = gru(z[t], h1[t-1])",
               "x[t] ~ Bernoulli(emission(h1[t], h2[t-1]))", "h2[t] = gru(x[t], h2[t-1])"]

    positions = [docstring.find(line) for line in process]
    assert -1 not in positions
    assert positions == sorted(positions)
    assert "Cell AR-HMM(z<-z, x<-z, x<-x)" in docstring
    assert "known as: ArSSM" in docstring


def test_code_is_named_after_the_spec_variables():
    text = """model Renamed
latent   s : normal[2]
observed y : bernoulli[3]
deterministic memory[t] = gru[4](y[t])
s[t] <- s[t-1], memory[t-1]
y[t] <- s[t]
"""
    source = compile_model(build_graph(parse_spec(text, "renamed.dssm")))
    namespace = {}
    exec(compile(source, "renamed", "exec"), namespace)
    pyro.clear_param_store()
    model = namespace["Model"](x_dim=3, z_dim=2, mlp=4, inference=4)
    y = torch.bernoulli(torch.full((2, 4, 3), 0.5))
    mask = torch.ones(2, 4, dtype=torch.bool)

    trace = pyro.poutine.trace(model.model).get_trace(y, mask)
    loss = Trace_ELBO().loss(model.model, model.guide, y, mask)

    names = {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name)}
    assert "def model(self, y, mask, annealing_factor=1.0):" in source
    assert "self.memory = blocks.Recurrent(" in source
    assert {"s", "y", "memory"} <= names
    assert not {"z", "x"} & names
    assert {"s", "y"} <= set(trace.nodes)
    assert math.isfinite(loss)


# --- the plan: realisations ---------------------------------------------------

def test_explicit_states_are_used_as_written(plans):
    plan = plans["arssm"]

    assert [state.name for state in plan.states] == ["h1", "h2"]
    assert [f.text for f in plan.transition] == ["h1[t-1]"]
    assert [f.text for f in plan.emission] == ["h1[t]", "h2[t-1]"]


def test_canonical_rnns_are_shared_by_every_edge(plans):
    plan = plans["cells/dmm_aug__zz_xz_xx_zx"]

    assert [(state.name, [f.text for f in state.inputs]) for state in plan.states] == [
        ("h_z", ["z[t]"]), ("h_x", ["x[t]"])]
    assert [f.text for f in plan.transition] == ["h_z[t-1]", "h_x[t-1]"]
    assert [f.text for f in plan.emission] == ["h_z[t]", "h_x[t-1]"]


def test_one_canonical_rnn_serves_transition_and_emission(plans):
    plan = plans["cells/hmm__zz_xz"]

    assert [state.name for state in plan.states] == ["h_z"]
    assert [f.text for f in plan.transition] == ["h_z[t-1]"]
    assert [f.text for f in plan.emission] == ["h_z[t]"]


def test_finite_orders_become_windows_oldest_first():
    plan = plan_of_text("""model Windows
latent   z : normal[2]
observed x : bernoulli[3]
z[t] <- z[t-3:t-1]
x[t] <- z[t-1:t], x[t-2:t-1]
""")

    assert plan.states == []
    assert [f.text for f in plan.transition] == ["z[t-3]", "z[t-2]", "z[t-1]"]
    assert [f.text for f in plan.emission] == ["z[t-1]", "z[t]", "x[t-2]", "x[t-1]"]


def test_canonical_name_avoids_declared_names():
    plan = plan_of_text("""model Clash
latent   z : normal[2]
observed x : bernoulli[3]
deterministic h_z[t] = gru[4](x[t])
z[t] <- z[1:t-1], h_z[t-1]
x[t] <- z[t]
""")

    assert [state.name for state in plan.states] == ["h_z", "h_z_"]
    assert [f.text for f in plan.transition] == ["h_z_[t-1]", "h_z[t-1]"]


# --- the plan: guides against the graph ---------------------------------------

@pytest.mark.parametrize("stem", list(NAMED))
def test_named_guides_follow_the_posterior_factorisation(stem, plans):
    named = NAMED[stem]
    plan = plans[stem]

    assert tuple(plan.placement.guide.posterior_conditioning) == named.exact_factor
    assert [f.text for f in plan.guides["partial"].features] == ["z[t-1]"]
    assert plan.guides["partial"].bidirectional == (named.partial_rnn == "bidirectional")
    assert tuple(f.text for f in plan.guides["full"].features) == named.full_features
    assert plan.guides["full"].bidirectional == (named.full_rnn == "bidirectional")


def _carried(plan, feature, horizon):
    """The (variable, lag) pairs a feature at step t is a function of, up to `horizon`."""
    if feature.lag > horizon:
        return set()
    if not feature.is_state:
        return {(feature.source, feature.lag)}
    pairs = set()
    # h[t-k] = cell(inputs at t-k, h[t-k-1]) reads its inputs at t-k, t-k-1, ...
    for back in range(horizon - feature.lag + 1):
        for source in plan.state_map[feature.source].inputs:
            pairs |= _carried(plan, Feature(source.source, source.lag + feature.lag + back,
                                            source.is_state), horizon)
    return pairs


@pytest.mark.parametrize("name", SPEC_IDS)
def test_full_guide_reads_exactly_the_posterior_conditioning_set(name, plans):
    # The exact factor p(z[t] | z[1:t-1], x[1:T]) comes from d-separation on
    # the unrolled graph; the combiner's features together with the
    # inference RNN must carry that set, and only more x where a
    # bidirectional RNN reads all of it.
    horizon = 8
    plan = plans[name]
    facts = plan.placement.guide
    guide = plan.guides["full"]
    needed = {(plan.z, lag) for lag in facts.z_lags.lags_up_to(horizon)} | {
        (plan.x, lag) for lag in facts.x_past_lags.lags_up_to(horizon)}
    provided = set()
    for feature in guide.features:
        provided |= _carried(plan, feature, horizon)
    provided_z = {pair for pair in provided if pair[0] == plan.z}
    provided_x = {pair for pair in provided if pair[0] == plan.x}

    assert facts.x_current_and_future
    assert provided_z == {pair for pair in needed if pair[0] == plan.z}
    if guide.bidirectional:
        assert facts.x_past_lags.unbounded
    else:
        assert provided_x == {pair for pair in needed if pair[0] == plan.x}


@pytest.mark.parametrize("name", SPEC_IDS)
def test_partial_guide_is_bidirectional_where_past_x_informs_z(name, plans):
    plan = plans[name]
    partial = plan.guides["partial"]

    assert [f.text for f in partial.features] == [f"{plan.z}[t-1]"]
    assert partial.bidirectional == (not plan.placement.guide.z_independent_of_past_x)


def test_guide_steps_a_state_it_reads_at_lag_zero_first():
    plan = plan_of_text("""model StateReadAtLagZero
latent   z : normal[2]
observed x : bernoulli[3]
deterministic d[t] = gru[6](z[t-1])
z[t] <- d[t]
x[t] <- z[t]
""")

    assert [f.text for f in plan.guides["full"].features] == ["d[t]"]
    assert plan.guides["full"].states_before_draw == ["d"]
    assert plan.step_order == ["d", "z", "x"]


@pytest.mark.parametrize("name", SPEC_IDS)
def test_named_and_cell_guides_draw_before_stepping_states(name, plans):
    for guide in plans[name].guides.values():
        assert guide.states_before_draw == []


def test_spec_settings_become_constructor_defaults():
    text = """model Settings
latent   z : normal[2]
observed x : exponential[3]
z[t] <- z[1:t-1]
x[t] <- z[t]
guide partial
flow iaf[2, 5]
size mlp = 7
size inference = 9
size rnn = 4
"""
    source = compile_model(build_graph(parse_spec(text, "settings.dssm")))
    namespace = {}
    exec(compile(source, "settings", "exec"), namespace)

    model = namespace["Model"]()

    assert model.alignment == "partial"
    assert len(model.flow.layers) == 2
    assert model.emission.family == "exponential"
    assert model.transition.hidden[0].out_features == 7
    assert model.inference_rnn.backward_rnn.h_0.shape == (9,)
    assert model.h_z.h_0.shape == (4,)
    assert (model.x_dim, model.z_dim) == (3, 2)
