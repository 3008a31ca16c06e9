"""The .dssm language: what parses, what it parses to, and how mistakes are reported."""

from __future__ import annotations

import pytest

from taxonomy.errors import SpecError
from taxonomy.graph import DEFAULT_FLOW, DEFAULT_SIZES, build_graph
from taxonomy.lags import LagSet
from taxonomy.parser import load_spec, parse_spec

HEADER = "model M\nlatent z : normal[16]\nobserved x : bernoulli[88]\n"
BASE = HEADER + "z[t] <- z[t-1]\nx[t] <- z[t]\n"

# The language minimum, statement for statement: ArSSM in dependency-line form.
ARSSM_DEPENDENCY_LINES = """\
model ArSSM
latent z : normal[16]
observed x : bernoulli[88]
z[t] <- z[1:t-1]
x[t] <- z[1:t]
x[t] <- x[1:t-1]
guide partial
flow iaf[3, 20]
cell AR-HMM(z<-z, x<-z, x<-x)
size mlp = 100
size rnn = 200
size inference = 600
"""

# The same model with explicit deterministic states.
ARSSM_EXPLICIT = """\
model ArSSM
latent z : normal[16]
observed x : bernoulli[88]
deterministic h1[t] = gru[200](z[t])
deterministic h2[t] = gru[200](x[t])
z[t] <- h1[t-1]
x[t] <- h1[t], h2[t-1]
guide full
cell AR-HMM(z<-z, x<-z, x<-x)
"""


def parse_error(text: str, path: str = "spec.dssm") -> SpecError:
    with pytest.raises(SpecError) as caught:
        parse_spec(text, path)
    return caught.value


def graph_error(text: str, path: str = "spec.dssm") -> SpecError:
    with pytest.raises(SpecError) as caught:
        build_graph(parse_spec(text, path))
    return caught.value


def caret_column(error: SpecError) -> int:
    """The 1-based column the caret of a formatted error points at."""
    lines = error.format().splitlines()
    caret_line = next(line for line in lines if line.lstrip().startswith("^"))
    return caret_line.index("^") - 4 + 1


def shown_line(error: SpecError) -> str:
    """The source line a formatted error quotes, without its indent."""
    return error.format().splitlines()[1][4:]


# --- the language minimum -------------------------------------------------------------------


def test_minimum_dependency_form_parses_every_statement():
    spec = parse_spec(ARSSM_DEPENDENCY_LINES, "arssm.dssm")

    assert spec.model == "ArSSM"
    assert [(v.kind, v.name, v.family, v.dim) for v in spec.variables] == [
        ("latent", "z", "normal", 16), ("observed", "x", "bernoulli", 88)]
    assert spec.deterministic == []

    lines = [(d.child.name, [(r.name, r.oldest, r.newest) for r in d.parents])
             for d in spec.dependencies]
    assert lines == [("z", [("z", None, 1)]), ("x", [("z", None, 0)]), ("x", [("x", None, 1)])]

    settings = [(s.keyword, s.name, s.values) for s in spec.settings]
    assert settings == [("guide", "partial", ()), ("flow", "iaf", (3, 20)),
                        ("size", "mlp", (100,)), ("size", "rnn", (200,)),
                        ("size", "inference", (600,))]

    assert spec.cell.group == "AR-HMM"
    assert [(e.child, e.parent, e.order) for e in spec.cell.edges] == [
        ("z", "z", None), ("x", "z", None), ("x", "x", None)]


def test_minimum_explicit_form_parses_deterministic_states():
    spec = parse_spec(ARSSM_EXPLICIT)

    states = [(s.name, s.cell, s.size, [(r.name, r.oldest, r.newest) for r in s.inputs])
              for s in spec.deterministic]
    assert states == [("h1", "gru", 200, [("z", 0, 0)]), ("h2", "gru", 200, [("x", 0, 0)])]
    assert spec.deterministic[0].index.oldest == 0
    assert spec.deterministic[0].index.newest == 0

    x_line = spec.dependencies[1]
    assert [(r.name, r.oldest, r.newest) for r in x_line.parents] == [("h1", 0, 0), ("h2", 1, 1)]


def test_minimum_settings_reach_the_model_graph():
    model = build_graph(parse_spec(ARSSM_DEPENDENCY_LINES))

    assert model.guide == "partial"
    assert model.guide_declared
    assert model.flow == (3, 20)
    assert model.sizes == {"mlp": 100, "rnn": 200, "inference": 600}


def test_explicit_recurrence_is_a_lag_one_self_edge():
    model = build_graph(parse_spec(ARSSM_EXPLICIT))

    assert model.graph.nodes["h1"]["kind"] == "deterministic"
    assert model.graph.nodes["h1"]["cell"] == "gru"
    assert model.graph.edges["h1", "h1"]["lags"] == LagSet(frozenset({1}))
    # The recurrence is implied, so it is no parent in the model's own sense.
    assert "h1" not in model.parents("h1")
    assert model.parents("x") == {"h1": LagSet(frozenset({0})), "h2": LagSet(frozenset({1}))}


@pytest.mark.parametrize("family", ["bernoulli", "normal", "exponential"])
def test_every_observed_family_is_accepted(family):
    model = build_graph(parse_spec(BASE.replace("bernoulli", family)))

    assert model.graph.nodes["x"]["family"] == family
    assert model.graph.nodes["x"]["dim"] == 88


@pytest.mark.parametrize("cell", ["gru", "lstm", "rnn"])
def test_every_rnn_cell_is_accepted(cell):
    model = build_graph(parse_spec(BASE + f"deterministic h[t] = {cell}[32](z[t])\n"))

    assert model.graph.nodes["h"]["cell"] == cell
    assert model.graph.nodes["h"]["size"] == 32


def test_sizes_have_defaults():
    model = build_graph(parse_spec(BASE))

    assert model.sizes == DEFAULT_SIZES
    assert model.sizes == {"mlp": 100, "rnn": 200, "inference": 600}
    assert model.guide == "full"
    assert not model.guide_declared
    assert model.flow is None


def test_one_size_overrides_only_itself():
    model = build_graph(parse_spec(BASE + "size rnn = 64\n"))

    assert model.sizes == {"mlp": 100, "rnn": 64, "inference": 600}


def test_flow_without_sizes_takes_the_default():
    model = build_graph(parse_spec(BASE + "flow iaf\n"))

    assert model.flow == DEFAULT_FLOW


# --- index forms and references -------------------------------------------------------------


@pytest.mark.parametrize("index, oldest, newest, written", [
    ("t", 0, 0, "z[t]"),
    ("t-1", 1, 1, "z[t-1]"),
    ("t-7", 7, 7, "z[t-7]"),
    ("t-3:t-1", 3, 1, "z[t-3:t-1]"),
    ("t-1:t", 1, 0, "z[t-1:t]"),
    ("t-2:t-2", 2, 2, "z[t-2]"),
    ("1:t", None, 0, "z[1:t]"),
    ("1:t-1", None, 1, "z[1:t-1]"),
    ("1:t-4", None, 4, "z[1:t-4]"),
    ("t+1", -1, -1, "z[t+1]"),
    ("t:t+2", 0, -2, "z[t:t+2]"),
])
def test_index_forms_become_lags(index, oldest, newest, written):
    spec = parse_spec(HEADER + f"x[t] <- z[{index}]\n")
    (reference,) = spec.dependencies[0].parents

    assert reference.oldest == oldest
    assert reference.newest == newest
    assert reference.describe() == written


def test_spaces_inside_an_index_are_ignored():
    spec = parse_spec(HEADER + "x[t] <- z[ t - 3 : t - 1 ], x[ 1 : t-1 ]\n")

    assert [(r.oldest, r.newest) for r in spec.dependencies[0].parents] == [(3, 1), (None, 1)]


def test_several_references_on_one_line():
    spec = parse_spec(HEADER + "x[t] <- z[t], x[t-2:t-1], z[1:t-1]\n")
    parents = spec.dependencies[0].parents

    assert [r.describe() for r in parents] == ["z[t]", "x[t-2:t-1]", "z[1:t-1]"]


def test_lines_for_one_child_add_up():
    split = build_graph(parse_spec(HEADER + "z[t] <- z[t-1]\nx[t] <- z[t]\nx[t] <- z[t-2]\n"))
    joined = build_graph(parse_spec(HEADER + "z[t] <- z[t-1]\nx[t] <- z[t], z[t-2]\n"))

    assert split.graph.edges["z", "x"]["lags"] == LagSet(frozenset({0, 2}))
    assert split.graph.edges["z", "x"]["lags"] == joined.graph.edges["z", "x"]["lags"]
    assert len(split.graph.edges["z", "x"]["references"]) == 2


def test_whole_history_absorbs_finite_lags():
    model = build_graph(parse_spec(HEADER + "z[t] <- z[t-1]\nz[t] <- z[1:t-1], z[t-3]\n"
                                            "x[t] <- z[t]\n"))

    assert model.graph.edges["z", "z"]["lags"] == LagSet(frozenset(), 1)


def test_reference_spans_point_at_the_source():
    spec = parse_spec(HEADER + "x[t] <- z[t],  x[t-1]\n")
    first, second = spec.dependencies[0].parents

    assert (first.span.line, first.span.column, first.span.end_column) == (4, 9, 13)
    assert (second.span.line, second.span.column, second.span.end_column) == (4, 16, 22)


# --- comments, blank lines and line endings -------------------------------------------------


def test_comments_and_blank_lines_are_ignored():
    text = ("# a model\n\n   # indented comment\nmodel M  # trailing\n\n"
            "latent z : normal[16]#no space\nobserved x : bernoulli[88]\n"
            "z[t] <- z[t-1]   # transition\n\n\nx[t] <- z[t]\n# the end")
    spec = parse_spec(text)

    assert spec.model == "M"
    assert len(spec.variables) == 2
    assert len(spec.dependencies) == 2
    assert spec.dependencies[1].span.line == 11


def test_crlf_and_no_final_newline_parse():
    spec = parse_spec(BASE.replace("\n", "\r\n").rstrip("\r\n"))

    assert spec.model == "M"
    assert [d.child.name for d in spec.dependencies] == ["z", "x"]


def test_tabs_and_form_feeds_are_whitespace():
    spec = parse_spec("model\tM\nlatent\tz : normal[16]\x0c\nobserved x : bernoulli[88]\n")

    assert spec.model == "M"
    assert [v.name for v in spec.variables] == ["z", "x"]


def test_byte_order_mark_is_skipped(tmp_path):
    path = tmp_path / "bom.dssm"
    path.write_bytes(b"\xef\xbb\xbf" + BASE.encode())

    assert load_spec(path).model == "M"


# --- syntax errors: label, position, caret and hint -----------------------------------------


@pytest.mark.parametrize("line, label, column", [
    ("latent z : normal[16", "missing closing bracket ']'", 21),
    ("x[t] <- z[t-1", "missing closing bracket ']'", 14),
    ("deterministic h[t] = gru[200](z[t]", "missing closing parenthesis ')'", 35),
    ("cell HMM(", "missing closing parenthesis ')'", 10),
    ("x[t] z[t]", "a dependency needs '<-' between the child and its parents", 6),
    ("x[t] -> z[t]", "a dependency needs '<-' between the child and its parents", 6),
    ("x[t] <-", "a dependency needs at least one parent after '<-'", 8),
    ("latent z normal[16]", "a variable declaration reads `latent NAME : FAMILY[DIM]`", 10),
    ("observed x : bernoulli", "a variable declaration reads `latent NAME : FAMILY[DIM]`", 23),
    ("deterministic h = gru[200](z[t])",
     "a deterministic state reads `deterministic NAME[t] = CELL[SIZE](INPUTS)`", 17),
    ("deterministic h[t] = gru(z[t])",
     "a deterministic state reads `deterministic NAME[t] = CELL[SIZE](INPUTS)`", 25),
    ("x[t] <- z[s]", "an index is `t`, `t-k`, `t-k:t-j`, `1:t` or `1:t-1`", 11),
    ("x[t] <- z[]", "an index is `t`, `t-k`, `t-k:t-j`, `1:t` or `1:t-1`", 11),
    ("x[t] <- z[t-]", "an index is `t`, `t-k`, `t-k:t-j`, `1:t` or `1:t-1`", 13),
    ("x[t] <- z[t] x[t-1]", "references are separated by commas", 14),
    ("x[t] <- z", "a reference needs an index in brackets, such as z[t-1]", 10),
    ("x[t] <- z, x[t-1]", "a reference needs an index in brackets, such as z[t-1]", 10),
    ("latent z : normal[16] observed x : bernoulli[88]", "one statement per line", 23),
])
def test_syntax_error_is_labelled_at_its_column(line, label, column):
    error = parse_error(f"model M\n{line}\n")

    assert error.message.startswith(label)
    assert error.location.path == "spec.dssm"
    assert error.location.line == 2
    assert error.location.column == column
    assert error.format().startswith(f"spec.dssm:2:{column}: error: {label}")
    assert shown_line(error) == line
    assert caret_column(error) == column


def test_syntax_error_label_on_first_line():
    error = parse_error("x[t] <- z[t-1\n")

    assert error.message.startswith("missing closing bracket ']'")
    assert error.location.line == 1


def test_syntax_error_says_what_it_found():
    assert parse_error("model M\nx[t] <- z[t] x[t-1]\n").message.endswith("found 'x'")
    assert parse_error("model M\nx[t] <-\n").message.endswith("found end of line")
    assert parse_error("model M\nx[t] <- z[t] $\n").message.endswith("found character '$'")


def test_control_character_shown_as_question_mark():
    error = parse_error("model M\rlatent z : normal[16]\n")

    assert "U+000D" in error.message
    assert shown_line(error) == "model M?latent z : normal[16]"
    assert caret_column(error) == 8


def test_unicode_line_separator_does_not_shift_lines():
    error = parse_error("model M\nlatent z : normal[16]\u2028\nx[t] <- z[s]\n")

    # The parser counts lines at \n only; U+2028 is an unexpected character on line 2.
    assert error.location.line == 2
    assert shown_line(error) == "latent z : normal[16]?"


def test_tab_counts_as_one_column_under_the_caret():
    error = parse_error("model M\n\tx[t] <- z[s]\n")

    assert error.location.column == 12
    assert caret_column(error) == 12


def test_end_of_file_points_past_last_line():
    error = parse_error("model M\nlatent z : normal[16")

    assert error.location.line == 2
    assert error.location.column == len("latent z : normal[16") + 1


@pytest.mark.parametrize("line, hint", [
    ("latent 2z : normal[16]", "names must start with a letter or an underscore"),
    ("latent z-1 : normal[16]", "names are plain identifiers"),
])
def test_syntax_error_hint(line, hint):
    error = parse_error(f"model M\n{line}\n")

    assert error.hint is not None
    assert error.hint.startswith(hint)
    assert f"hint: {error.hint}" in error.format()


def test_absolute_step_other_than_history_start_is_rejected():
    error = parse_error(HEADER + "x[t] <- z[2:t-1]\n")

    assert error.message == "absolute step 2 is not supported"
    assert "1:t-1" in error.hint
    assert caret_column(error) == 11


def test_backwards_window_is_rejected():
    error = parse_error(HEADER + "x[t] <- z[t-1:t-3]\n")

    assert error.message == "window z[t-1:t-3] runs backwards"
    assert "t-3:t-1" in error.hint


def test_second_model_statement_is_rejected():
    error = parse_error("model A\nmodel B\n")

    assert error.message == "a second `model` statement"
    assert error.location.line == 2
    assert "'A' on line 1" in error.hint


def test_second_cell_statement_is_rejected():
    error = parse_error(BASE + "cell HMM()\ncell HMM()\n")

    assert error.message == "a second `cell` statement"
    assert error.location.line == 7


# --- did-you-mean ---------------------------------------------------------------------------


@pytest.mark.parametrize("line, word, keyword", [
    ("modle M", "modle", "model"),
    ("Model M", "Model", "model"),
    ("latnet z : normal[16]", "latnet", "latent"),
    ("obsreved x : bernoulli[88]", "obsreved", "observed"),
    ("determinstic h[t] = gru[8](z[t])", "determinstic", "deterministic"),
    ("gide full", "gide", "guide"),
    ("flwo iaf[3, 20]", "flwo", "flow"),
    ("cel HMM()", "cel", "cell"),
    ("sise mlp = 3", "sise", "size"),
])
def test_misspelt_keyword_did_you_mean(line, word, keyword):
    error = parse_error(f"model M\n{line}\n")

    assert error.message == f"unknown statement '{word}'"
    assert error.hint == f"did you mean '{keyword}'?"
    assert error.location.line == 2
    assert error.location.column == 1
    assert error.format().splitlines()[2].strip() == "^" + "~" * (len(word) - 1)


def test_unrelated_first_word_gets_no_keyword_hint():
    error = parse_error("model M\nbanana split\n")

    assert error.message.startswith("unexpected")
    assert error.hint is None or "did you mean" not in error.hint


@pytest.mark.parametrize("text, message, hint", [
    (BASE.replace("normal[16]", "norml[16]"), "unknown latent family 'norml'",
     "did you mean 'normal'?"),
    (BASE.replace("bernoulli", "bernouli"), "unknown observed family 'bernouli'",
     "did you mean 'bernoulli'?"),
    (BASE.replace("bernoulli", "exponentail"), "unknown observed family 'exponentail'",
     "did you mean 'exponential'?"),
    (BASE + "deterministic h[t] = gur[8](z[t])\n", "unknown RNN cell 'gur'",
     "did you mean 'gru'?"),
    (BASE + "deterministic h[t] = lsmt[8](z[t])\n", "unknown RNN cell 'lsmt'",
     "did you mean 'lstm'?"),
    (HEADER + "z[t] <- zz[t-1]\nx[t] <- z[t]\n", "unknown variable 'zz'", "did you mean 'z'?"),
    (HEADER + "z[t] <- z[t-1]\nxs[t] <- z[t]\n", "unknown variable 'xs'", "did you mean 'x'?"),
    (BASE + "deterministic hidden[t] = gru[8](z[t])\nx[t] <- hiden[t]\n",
     "unknown variable 'hiden'", "did you mean 'hidden'?"),
    (BASE + "guide parital\n", "unknown guide 'parital'", "did you mean 'partial'?"),
    (BASE + "flow iaff[3, 20]\n", "unknown flow 'iaff'", "did you mean 'iaf'?"),
    (BASE + "size mpl = 4\n", "unknown size 'mpl'", "did you mean 'mlp'?"),
    (BASE + "size infrence = 4\n", "unknown size 'infrence'", "did you mean 'inference'?"),
])
def test_misspelt_name_gets_did_you_mean(text, message, hint):
    error = graph_error(text)

    assert error.message == message
    assert error.hint == hint
    assert f"hint: {hint}" in error.format()


def test_misspelt_name_caret_underlines_the_name():
    error = graph_error(HEADER + "z[t] <- z[t-1]\nx[t] <- z[t], xx[t-1]\n")

    assert caret_column(error) == 15
    assert error.format().splitlines()[2].strip() == "^~"


@pytest.mark.parametrize("group, suggestion", [
    ("HNM", "HMM"), ("hmm", "HMM"), ("AR_HMM", "AR-HMM"), ("ARHMM", "AR-HMM"),
    ("F-HNM", "F-HMM"), ("DMM-aug", "DMM-Aug"), ("DMMAug", "DMM-Aug"),
])
def test_misspelt_group_gets_did_you_mean(group, suggestion):
    from taxonomy.hierarchy import check_text

    with pytest.raises(SpecError) as caught:
        check_text(BASE + f"cell {group}()\n", "spec.dssm")

    assert caught.value.message == f"unknown group '{group}'"
    assert caught.value.hint == f"did you mean '{suggestion}'?"
    assert caret_column(caught.value) == 6


def test_latent_family_must_be_normal():
    error = graph_error(BASE.replace("normal[16]", "bernoulli[16]"))

    assert error.message == "unknown latent family 'bernoulli'"
    assert "normal" in error.hint


def test_unknown_family_far_from_all_lists_the_choices():
    error = graph_error(BASE.replace("bernoulli", "poisson"))

    assert error.hint == "choose one of: bernoulli, normal, exponential"


# --- names ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, reason", [
    ("class", "is a Python keyword"),
    ("lambda", "is a Python keyword"),
    ("None", "is a Python keyword"),
    ("match", "is a Python keyword"),
    ("_", "is a Python keyword"),
    ("t", "is a reserved word of the spec language"),
    ("all", "is a reserved word of the spec language"),
    ("latent", "is a reserved word of the spec language"),
    ("__z", "starts with a double underscore"),
    ("zé", "is not a plain identifier"),
    ("ζ", "is not a plain identifier"),
])
def test_variable_name_that_is_not_plain_is_rejected(name, reason):
    error = graph_error(BASE.replace("latent z ", f"latent {name} "))

    assert error.message == f"variable name '{name}' {reason}"
    assert error.location.line == 2
    assert caret_column(error) == 8


@pytest.mark.parametrize("name", ["class", "t", "ArSSMé", "__M"])
def test_model_name_that_is_not_plain_is_rejected(name):
    error = graph_error(BASE.replace("model M", f"model {name}"))

    assert error.message.startswith(f"model name '{name}' ")
    assert caret_column(error) == 7


def test_deterministic_name_that_is_a_keyword_is_rejected():
    error = graph_error(BASE + "deterministic import[t] = gru[8](z[t])\n")

    assert error.message == "variable name 'import' is a Python keyword"


def test_underscores_and_digits_make_plain_names():
    model = build_graph(parse_spec(
        "model my_model_2\nlatent z_1 : normal[4]\nobserved _x : normal[4]\n"
        "deterministic h_2[t] = rnn[8](z_1[t])\nz_1[t] <- z_1[t-1]\n_x[t] <- h_2[t]\n"))

    assert model.name == "my_model_2"
    assert set(model.graph) == {"z_1", "_x", "h_2"}


# --- other checks of the model graph --------------------------------------------------------


@pytest.mark.parametrize("text, message", [
    (BASE + "latent z : normal[3]\n", "'z' is declared twice"),
    (BASE.replace("normal[16]", "normal[0]"), "'z' has dimension 0"),
    (BASE + "deterministic h[t] = gru[0](z[t])\n", "'h' has size 0"),
    (BASE + "deterministic h[t-1] = gru[8](z[t])\n",
     "a deterministic state is defined at step t, not h[t-1]"),
    (BASE + "deterministic h[t] = gru[8](h[t-1])\n", "'h' lists itself as an input"),
    (BASE + "deterministic h[t] = gru[8](z[1:t])\n",
     "a deterministic state reads single steps or windows, not the whole history z[1:t]"),
    (BASE + "deterministic h[t] = gru[8](z[t])\nh[t] <- z[t]\n",
     "'h' is a deterministic state; its inputs are given where it is defined"),
    (BASE + "deterministic h[t] = gru[8](z[t])\nx[t] <- h[1:t]\n",
     "h[1:t]: a deterministic state already carries the history"),
    (HEADER + "z[t-1] <- z[t-2]\n", "the child of a dependency is written at step t, not z[t-1]"),
    (BASE + "guide full\nguide partial\n", "`guide` is set twice"),
    (BASE + "size mlp = 3\nsize mlp = 4\n", "`size` is set twice"),
    (BASE + "flow iaf[3]\n", "`flow iaf` takes two positive integers: layers and hidden width"),
    (BASE + "flow iaf[0, 20]\n", "`flow iaf` takes two positive integers: layers and hidden width"),
    (BASE + "size rnn = 0\n", "size rnn must be a positive integer"),
    ("model M\nobserved x : bernoulli[88]\n", "no latent variable is declared"),
    ("model M\nlatent z : normal[16]\n", "no observed variable is declared"),
    ("latent z : normal[16]\nobserved x : bernoulli[88]\n", "missing `model NAME` statement"),
])
def test_graph_check_rejects(text, message):
    assert graph_error(text).message == message


def test_lag_beyond_limit_rejected():
    from taxonomy.graph import MAX_LAG

    build_graph(parse_spec(HEADER + f"z[t] <- z[t-{MAX_LAG}:t-1]\nx[t] <- z[t]\n"))
    error = graph_error(HEADER + f"z[t] <- z[t-{MAX_LAG + 1}:t-1]\nx[t] <- z[t]\n")

    assert f"reaches {MAX_LAG + 1} steps from t" in error.message
    assert "z[1:t-1]" in error.hint
    assert caret_column(error) == 9
