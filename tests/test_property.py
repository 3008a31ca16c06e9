"""Property tests: whatever text a user writes, the checker raises only SpecError."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from taxonomy.errors import SpecError
from taxonomy.graph import MAX_LAG
from taxonomy.hierarchy import GROUPS, check_text
from taxonomy.parser import load_spec, parse_spec
from taxonomy.scaffold import cell_spec_text

PROPERTY_SETTINGS = settings(max_examples=200, deadline=None,
                             suppress_health_check=[HealthCheck.too_slow])

# Names a user might write: mostly the usual ones, sometimes Python keywords,
# words of the spec language, or names that are not plain identifiers.
ODD_NAMES = st.sampled_from(["class", "lambda", "None", "match", "_", "t", "all", "model",
                             "latent", "cell", "__z", "zé", "ζ", "Z"]) \
    | st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,6}", fullmatch=True)
NAMES = st.sampled_from(["M", "ArSSM", "my_model", "z", "h1"]) | ODD_NAMES


def mostly(usual, unusual, clean: bool):
    """Draw from `usual`, or about one time in ten from `unusual` unless `clean` is set."""
    if clean:
        return usual
    return st.sampled_from([False] * 9 + [True]).flatmap(lambda odd: unusual if odd else usual)


def lags(clean: bool):
    # Small lags keep the unrolled graph small; the large ones must be rejected.
    return mostly(st.integers(0, 6), st.sampled_from([MAX_LAG + 1, 10**6]), clean)


@st.composite
def indices(draw, clean: bool, forms=("now", "back", "back", "window", "history")) -> str:
    form = draw(mostly(st.sampled_from(forms),
                       st.sampled_from(["ahead", "absolute", "backwards"]), clean))
    first, second = draw(lags(clean)), draw(lags(clean))
    if form == "now":
        return "t"
    if form == "back":
        return f"t-{first}"
    if form == "ahead":
        return f"t+{first}"
    if form == "window":
        oldest, newest = max(first, second), min(first, second)
        return f"t-{oldest}:t-{newest}" if newest else f"t-{oldest}:t"
    if form == "history":
        return f"1:t-{first}" if first else "1:t"
    if form == "absolute":
        return f"{draw(st.integers(0, 3))}:t-{first}"
    return f"t-{min(first, second)}:t-{max(first, second) + 1}"


@st.composite
def reference_lists(draw, clean: bool, stochastic: list[str], states: list[str],
                    history: bool = True) -> str:
    """One to three references; whole histories only of stochastic variables, if `history`."""
    names = mostly(st.sampled_from(["z", "x", "h", "g"]), ODD_NAMES, clean)
    references = []
    for _ in range(draw(st.integers(1, 3))):
        if clean:
            name = draw(st.sampled_from(stochastic + states))
        else:
            name = draw(names)
        forms = ["now", "back", "back", "window"]
        if history and name not in states:
            forms.append("history")
        references.append(f"{name}[{draw(indices(clean, forms))}]")
    return ", ".join(references)


@st.composite
def statements(draw) -> list[str]:
    """The lines of a spec; when `clean` is drawn, every line is well formed on its own."""
    clean = draw(st.booleans())
    lines = []
    if draw(mostly(st.just(True), st.just(False), clean)):
        lines.append(f"model {draw(mostly(st.just('M'), NAMES, clean))}")

    stochastic = []
    for kind, usual_name in (("latent", "z"), ("observed", "x")):
        for _ in range(draw(mostly(st.just(1), st.integers(0, 2), clean))):
            name = draw(mostly(st.just(usual_name), ODD_NAMES, clean))
            families = ["normal"] if kind == "latent" else ["normal", "bernoulli", "exponential"]
            family = draw(mostly(st.sampled_from(families),
                                 st.sampled_from(["norml", "gamma", "bernoulli"]), clean))
            dim = draw(mostly(st.integers(1, 20), st.just(0), clean))
            lines.append(f"{kind} {name} : {family}[{dim}]")
            stochastic.append(name)

    states = draw(st.lists(mostly(st.sampled_from(["h", "g"]), ODD_NAMES, clean),
                           max_size=2, unique=True))
    for state in states:
        cell = draw(mostly(st.sampled_from(["gru", "lstm", "rnn"]), st.just("gur"), clean))
        index = draw(mostly(st.just("t"), st.sampled_from(["t-1", "1:t"]), clean))
        size = draw(mostly(st.integers(1, 64), st.just(0), clean))
        others = [other for other in states if other != state]
        inputs = draw(reference_lists(clean, stochastic or ["z"], others, history=False))
        lines.append(f"deterministic {state}[{index}] = {cell}[{size}]({inputs})")

    # Half the clean specs start from a first-order model, so many of them land in a cell.
    if clean and draw(st.booleans()):
        lines += ["z[t] <- z[t-1]", "x[t] <- z[t]"]
    for child in ("z", "x"):
        for _ in range(draw(st.integers(0, 2))):
            name = draw(mostly(st.just(child), ODD_NAMES, clean))
            index = draw(mostly(st.just("t"), st.just("t-1"), clean))
            parents = draw(reference_lists(clean, stochastic or ["z"], states))
            lines.append(f"{name}[{index}] <- {parents}")

    if draw(st.booleans()):
        lines.append(f"guide {draw(mostly(st.sampled_from(['partial', 'full']), NAMES, clean))}")
    if draw(st.booleans()):
        sizes = draw(st.lists(mostly(st.integers(1, 30), st.just(0), clean),
                              min_size=2, max_size=2) | st.lists(st.integers(0, 30), max_size=3))
        name = draw(mostly(st.just("iaf"), st.just("maf"), clean))
        lines.append(f"flow {name}[{', '.join(map(str, sizes))}]" if sizes else f"flow {name}")
    for name in draw(st.lists(mostly(st.sampled_from(["mlp", "rnn", "inference"]),
                                     st.just("mpl"), clean), max_size=2, unique=True)):
        lines.append(f"size {name} = {draw(mostly(st.integers(1, 1000), st.just(0), clean))}")

    if draw(st.booleans()):
        group = draw(mostly(st.sampled_from(GROUPS), st.sampled_from(["HNM", "ar-hmm", "Cell"]),
                            clean))
        edges = []
        for _ in range(draw(st.integers(0, 4))):
            child = draw(mostly(st.sampled_from(["z", "x"]), st.just("q"), clean))
            parent = draw(mostly(st.sampled_from(["z", "x"]), st.just("q"), clean))
            order = draw(st.sampled_from(["", ":all", ":0", ":1", ":2", ":3"]))
            edges.append(f"{child}<-{parent}{order}")
        lines.append(f"cell {group}({', '.join(edges)})")

    return draw(st.permutations(lines)) if draw(st.booleans()) else lines


def assert_only_spec_errors(text: str) -> None:
    """Check `text` and use the result; anything but SpecError fails the test."""
    try:
        placement = check_text(text, "random.dssm")
    except SpecError as error:
        assert error.format().startswith("random.dssm")
        return

    data = placement.as_dict()
    json.dumps(data, ensure_ascii=False)
    problems = placement.problems()
    for problem in problems:
        assert isinstance(problem, SpecError)
        assert problem.format().startswith("random.dssm")

    assert (placement.cell is None) == bool(placement.outside)
    if placement.cell is not None:
        # A cell's scaffold lands where the spec did.
        assert check_text(cell_spec_text(placement.cell)).cell == placement.cell


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(statements())
def test_random_specs_raise_only_spec_errors(lines):
    assert_only_spec_errors("\n".join(lines) + "\n")


@st.composite
def near_valid_specs(draw) -> str:
    """A valid first-order model with random extra references and one deterministic state."""
    lines = ["model M", "latent z : normal[4]", "observed x : bernoulli[3]"]
    clean = draw(st.booleans())
    z_parents = draw(st.lists(reference_lists(clean, ["z", "x"], ["h"]), max_size=1))
    x_parents = draw(st.lists(reference_lists(clean, ["z", "x"], ["h"]), max_size=1))
    lines.append(", ".join(["z[t] <- z[t-1]", *z_parents]))
    lines.append(", ".join(["x[t] <- z[t]", *x_parents]))
    inputs = draw(reference_lists(clean, ["z", "x"], [], history=False))
    lines.append(f"deterministic h[t] = gru[8]({inputs})")
    if draw(st.booleans()):
        lines.append(f"cell {draw(st.sampled_from(GROUPS))}()")
    return "\n".join(lines) + "\n"


@pytest.mark.slow
@PROPERTY_SETTINGS
@given(near_valid_specs())
def test_near_valid_specs_raise_only_spec_errors(text):
    assert_only_spec_errors(text)


SPEC_TOKENS = ["model", "latent", "observed", "deterministic", "guide", "flow", "cell", "size",
               "z", "x", "h", "t", "all", "normal", "gru", "HMM", "AR-HMM", "iaf", "[", "]",
               "(", ")", "-", "+", ":", "<-", "->", ",", "=", "1", "3", "16", "#", " ", "\t",
               "\n", "\r\n", "\r", "\x0c", "\u2028", "\x85", "é", "\x00", "\ufeff"]


@PROPERTY_SETTINGS
@given(st.one_of(st.text(max_size=200),
                 st.lists(st.sampled_from(SPEC_TOKENS), max_size=60).map("".join)))
def test_random_text_parses_or_raises_spec_error(text):
    try:
        spec = parse_spec(text, "random.dssm")
    except SpecError as error:
        assert error.location.path == "random.dssm"
        line = error.location.line
        if line is not None:
            assert 1 <= line <= text.count("\n") + 1
        if line is not None and error.source_line is not None:
            # The quoted line is the one the position names, as a \n-split counts lines.
            assert error.source_line == text.split("\n")[line - 1].rstrip("\r")
        assert error.format().startswith("random.dssm")
        return

    assert spec.text == text
    assert_only_spec_errors(text)


@settings(max_examples=200, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=200)
       | st.lists(st.sampled_from(SPEC_TOKENS), max_size=60).map(
           lambda tokens: "".join(tokens).encode("utf-8")))
def test_random_bytes_load_or_raise_spec_error(tmp_path, data):
    path = tmp_path / "random.dssm"
    path.write_bytes(data)
    try:
        spec = load_spec(path)
    except SpecError as error:
        assert error.location.path == str(path)
        assert error.format().startswith(str(path))
        return

    assert spec.path == str(path)
