"""Drawings of specs and of the hierarchy, checked on their DOT source."""

from __future__ import annotations

import logging
import re
import shutil
import sys
from pathlib import Path

import pytest

from taxonomy import render
from taxonomy.cli import main
from taxonomy.errors import DssmError, SpecError
from taxonomy.hierarchy import EDGE_KINDS, GROUP_EDGES, GROUPS, check_spec, paper_cells, \
    parse_cell
from taxonomy.render import draw_spec, draw_taxonomy
from taxonomy.scaffold import cell_spec_text

SPECS = Path(__file__).resolve().parents[1] / "specs"
needs_dot = pytest.mark.skipif(shutil.which("dot") is None or shutil.which("neato") is None,
                               reason="Graphviz's dot and neato programs are not installed")

ATTRIBUTE = re.compile(r'(\w+)=(<.*?>(?= \w+=|$)|"(?:[^"\\]|\\.)*"|[^\s"]+)')
STATEMENT = re.compile(r'^\s*("(?:[^"\\]|\\.)*"|[\w.]+)(?:\s*->\s*("(?:[^"\\]|\\.)*"|[\w.]+))?'
                       r'\s*(?:\[(.*)\])?\s*$')


def parse_dot(source: str) -> tuple[dict, dict, dict]:
    """Read the graph attributes, nodes and edges of DOT written by the graphviz package.

    Nodes map an id to its attributes plus "clusters", the subgraphs that contain
    it. Edges map (tail, head) to attributes. The parser covers only the DOT
    that render.py writes, one statement per line.
    """
    graph, nodes, edges = {}, {}, {}
    subgraphs = []
    for line in source.splitlines():
        stripped = line.strip()
        if stripped.startswith("subgraph "):
            subgraphs.append(stripped.split()[1])
            continue
        if stripped == "}":
            if subgraphs:
                subgraphs.pop()
            continue
        match = STATEMENT.match(line)
        if match is None:
            if not subgraphs and "=" in stripped and not stripped.startswith("//"):
                graph.update(_attributes(stripped))
            continue
        first, second, text = match.groups()
        attributes = _attributes(text or "")
        if first in ("node", "edge", "graph"):
            continue
        if second is None:
            attributes["clusters"] = list(subgraphs)
            nodes[first.strip('"')] = attributes
        else:
            edges[first.strip('"'), second.strip('"')] = attributes
    return graph, nodes, edges


def _attributes(text: str) -> dict[str, str]:
    return {key: value.strip('"') for key, value in ATTRIBUTE.findall(text)}


def spec_dot(tmp_path: Path, spec: Path, steps: int = 3) -> tuple[dict, dict, dict]:
    output = tmp_path / f"{spec.stem}.dot"
    draw_spec(spec, output, steps=steps)
    return parse_dot(output.read_text(encoding="utf-8"))


def taxonomy_dot(tmp_path: Path, specs=None) -> tuple[dict, dict, dict]:
    output = tmp_path / "taxonomy.dot"
    draw_taxonomy(output, specs=specs)
    return parse_dot(output.read_text(encoding="utf-8"))


def write_spec(folder: Path, name: str, text: str) -> Path:
    path = folder / f"{name}.dssm"
    path.write_text(text, encoding="utf-8")
    return path


STORN_LIKE = """model StornLike
latent   z : normal[4]
observed x : bernoulli[3]
deterministic h[t] = gru[8](x[t-1], z[t])
z[t] <- x[t-1]
x[t] <- h[t]
"""

# HMM(z<-z) realised by a state that reads only z and feeds only z.
LATENT_HISTORY = """model LatentHistory
latent   z : normal[4]
observed x : bernoulli[3]
deterministic h[t] = gru[8](z[t])
z[t] <- h[t-1]
x[t] <- z[t]
"""


# ---------------------------------------------------------------- dssm draw


def test_spec_node_shapes_follow_kind(tmp_path):
    _, nodes, _ = spec_dot(tmp_path, SPECS / "arssm.dssm")

    for step in (1, 2, 3):
        assert nodes[f"z_{step}"]["shape"] == "circle"
        assert nodes[f"z_{step}"]["fillcolor"] == "white"
        assert nodes[f"x_{step}"]["shape"] == "circle"
        assert nodes[f"x_{step}"]["fillcolor"] == render.OBSERVED_FILL
        for state in ("h1", "h2"):
            assert nodes[f"{state}_{step}"]["shape"] == "diamond"
            assert nodes[f"{state}_{step}"]["fillcolor"] == "white"


def test_spec_labels_carry_step_subscript(tmp_path):
    _, nodes, _ = spec_dot(tmp_path, SPECS / "arssm.dssm")

    assert nodes["z_1"]["label"] == "<<I>z</I><SUB>1</SUB>>"
    assert nodes["h1_3"]["label"] == "<<I>h1</I><SUB>3</SUB>>"


@pytest.mark.parametrize("spec", ["vrnn", "arssm", "srnn", "rssm", "fssm", "dmm"])
def test_spec_edge_style_follows_child_kind(tmp_path, spec):
    _, nodes, edges = spec_dot(tmp_path, SPECS / f"{spec}.dssm")

    assert edges
    for (tail, head), attributes in edges.items():
        into_state = nodes[head]["shape"] == "diamond"
        expected = "dotted" if into_state else "solid"
        assert attributes["style"] == expected, f"{tail} -> {head}"


def test_spec_unrolls_each_variable_over_steps(tmp_path):
    _, nodes, _ = spec_dot(tmp_path, SPECS / "arssm.dssm")
    assert set(nodes) == {f"{name}_{step}" for name in ("z", "x", "h1", "h2")
                          for step in (1, 2, 3)}

    _, nodes, _ = spec_dot(tmp_path, SPECS / "arssm.dssm", steps=5)
    assert {f"z_{step}" for step in range(1, 6)} <= set(nodes)
    assert "z_6" not in nodes


def test_spec_draws_no_edge_from_before_step_one(tmp_path):
    _, nodes, edges = spec_dot(tmp_path, SPECS / "vrnn.dssm")

    for tail, head in edges:
        assert tail in nodes
        assert head in nodes
    # z[1] reads only h[0] and x[0], which are initial-state parameters.
    assert not [edge for edge in edges if edge[1] == "z_1"]


def test_vrnn_paths_z_through_h_to_x(tmp_path):
    _, _, edges = spec_dot(tmp_path, SPECS / "vrnn.dssm")

    for step in (1, 2, 3):
        assert edges[f"z_{step}", f"h_{step}"]["style"] == "dotted"
        assert edges[f"h_{step}", f"x_{step}"]["style"] == "solid"
    for step in (1, 2):
        assert edges[f"h_{step}", f"h_{step + 1}"]["style"] == "dotted"
        assert edges[f"h_{step}", f"z_{step + 1}"]["style"] == "solid"
        assert edges[f"x_{step}", f"h_{step + 1}"]["style"] == "dotted"


def test_spec_draws_edges_that_skip_steps(tmp_path):
    spec = write_spec(tmp_path, "order3", cell_spec_text(parse_cell("AR-HMM(z<-z:3)")))
    _, _, edges = spec_dot(tmp_path, spec)

    assert ("z_1", "z_3") in edges
    assert ("x_1", "x_3") not in edges


def test_spec_caption_names_cell_and_markers(tmp_path):
    graph, _, _ = spec_dot(tmp_path, SPECS / "arssm.dssm")

    markers = " ".join(EDGE_KINDS[edge].marker for edge in ("z<-z", "x<-z", "x<-x"))
    assert graph["label"] == f"ArSSM — AR-HMM(z<-z, x<-z, x<-x)  {markers}"
    assert EDGE_KINDS["z<-x"].marker not in graph["label"]


def test_spec_outside_hierarchy_caption_gives_reason(tmp_path):
    spec = write_spec(tmp_path, "storn_like", STORN_LIKE)
    reason = check_spec(str(spec)).outside[0].message
    graph, nodes, _ = spec_dot(tmp_path, spec)

    caption = graph["label"].replace("\\n", " ")
    assert "outside the hierarchy: " in caption
    assert reason in caption
    assert "h_2" in nodes


def test_spec_future_edges_are_drawn_in_colour(tmp_path):
    spec = write_spec(tmp_path, "smoother", "model Smoother\nlatent z : normal[2]\n"
                      "observed x : bernoulli[2]\nz[t] <- z[t-1], x[t+1]\nx[t] <- z[t]\n")
    _, _, edges = spec_dot(tmp_path, spec)

    assert edges["x_2", "z_1"]["color"] == render.FUTURE_COLOUR
    assert "color" not in edges["z_1", "z_2"]


def test_spec_rows_follow_paper_order(tmp_path):
    latent_history = write_spec(tmp_path, "latent_history", LATENT_HISTORY)
    cases = {
        SPECS / "arssm.dssm": ["z", "h1", "x", "h2"],
        SPECS / "vrnn.dssm": ["z", "h", "x"],
        SPECS / "srnn.dssm": ["z", "x", "d"],
        latent_history: ["h", "z", "x"],
    }
    for spec, expected in cases.items():
        assert render.variable_rows(check_spec(str(spec)).model) == expected, spec.name


def test_spec_positions_pin_rows_and_steps(tmp_path):
    _, nodes, _ = spec_dot(tmp_path, SPECS / "arssm.dssm")

    def position(node):
        x, y = nodes[node]["pos"].rstrip("!").split(",")
        return float(x), float(y)

    heights = [position(f"{name}_1")[1] for name in ("z", "h1", "x", "h2")]
    assert heights == sorted(heights, reverse=True)
    assert len(set(heights)) == 4
    for name in ("z", "h1", "x", "h2"):
        columns = [position(f"{name}_{step}")[0] for step in (1, 2, 3)]
        assert columns == sorted(columns)
        assert len(set(columns)) == 3
        assert len({position(f"{name}_{step}")[1] for step in (1, 2, 3)}) == 1


def test_dot_output_needs_no_graphviz_program(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    output = tmp_path / "vrnn.dot"
    draw_spec(SPECS / "vrnn.dssm", output)
    assert "digraph VRNN" in output.read_text(encoding="utf-8")

    draw_taxonomy(tmp_path / "taxonomy.dot")
    assert "digraph taxonomy" in (tmp_path / "taxonomy.dot").read_text(encoding="utf-8")


@pytest.mark.parametrize("suffix", [".svg", ".png", ".pdf"])
def test_render_without_program_gives_hint(tmp_path, monkeypatch, suffix):
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    monkeypatch.setattr(shutil, "which", lambda *args, **kwargs: None)

    with pytest.raises(DssmError, match="apt-get install graphviz") as raised:
        draw_spec(SPECS / "vrnn.dssm", tmp_path / f"vrnn{suffix}")
    assert ".dot" in str(raised.value)
    assert not (tmp_path / f"vrnn{suffix}").exists()

    with pytest.raises(DssmError, match="brew install graphviz"):
        draw_taxonomy(tmp_path / f"taxonomy{suffix}")


def test_missing_graphviz_package_gives_hint(tmp_path, monkeypatch):
    # A None entry in sys.modules makes `import graphviz` raise ImportError.
    monkeypatch.setitem(sys.modules, "graphviz", None)

    with pytest.raises(DssmError, match="pip install graphviz"):
        draw_spec(SPECS / "vrnn.dssm", tmp_path / "vrnn.dot")
    with pytest.raises(DssmError, match="pip install graphviz"):
        draw_taxonomy(tmp_path / "taxonomy.dot")


def test_unknown_suffix_raises_with_supported_formats(tmp_path):
    with pytest.raises(DssmError) as raised:
        draw_spec(SPECS / "vrnn.dssm", tmp_path / "vrnn.jpg")
    for suffix in (".svg", ".png", ".pdf", ".dot"):
        assert suffix in str(raised.value)

    with pytest.raises(DssmError, match=r"\.svg"):
        draw_taxonomy(tmp_path / "taxonomy")


def test_bad_spec_raises_its_spec_error(tmp_path):
    spec = write_spec(tmp_path, "bad", "model Bad\nlatent z : normal[2]\n"
                      "observed x : bernoulli[2]\nz[t] <- y[t-1]\n")
    with pytest.raises(SpecError) as expected:
        check_spec(str(spec))

    with pytest.raises(SpecError) as raised:
        draw_spec(spec, tmp_path / "bad.dot")
    assert raised.value.format() == expected.value.format()
    assert not (tmp_path / "bad.dot").exists()


def test_steps_below_one_rejected(tmp_path):
    with pytest.raises(DssmError, match="steps"):
        draw_spec(SPECS / "vrnn.dssm", tmp_path / "vrnn.dot", steps=0)


@needs_dot
@pytest.mark.parametrize("suffix, magic", [(".svg", b"<?xml"), (".png", b"\x89PNG"),
                                           (".pdf", b"%PDF")])
def test_spec_renders_each_format(tmp_path, suffix, magic):
    output = tmp_path / f"vrnn{suffix}"
    draw_spec(SPECS / "vrnn.dssm", output)
    assert output.read_bytes().startswith(magic)


# ---------------------------------------------------------------- dssm taxonomy


def cell_nodes(nodes: dict) -> dict[str, dict]:
    """The nodes that stand for cells, keyed by the cell label in their tooltip."""
    return {attributes["tooltip"]: attributes for attributes in nodes.values()
            if "tooltip" in attributes}


def test_taxonomy_draws_36_paper_cells(tmp_path):
    _, nodes, _ = taxonomy_dot(tmp_path)
    cells = cell_nodes(nodes)

    assert len(cells) == 36
    assert set(cells) == {cell.label for cell in paper_cells()}


def test_taxonomy_puts_base_models_on_top(tmp_path):
    _, nodes, _ = taxonomy_dot(tmp_path)
    cells = cell_nodes(nodes)

    for group in GROUPS:
        base = cells[f"{group}()"]
        assert "cluster_base_models" in base["clusters"]
        assert f"<B>{group}</B>" in base["label"]
        for cell in paper_cells(group):
            if cell.relaxed:
                clusters = cells[cell.label]["clusters"]
                assert "cluster_base_models" not in clusters
                assert f"cluster_{group.lower().replace('-', '_')}" in clusters


def test_taxonomy_cell_labels_show_relaxation(tmp_path):
    _, nodes, _ = taxonomy_dot(tmp_path)
    cells = cell_nodes(nodes)

    arssm = cells["AR-HMM(z<-z, x<-z, x<-x)"]["label"]
    assert "z&lt;-z, x&lt;-z, x&lt;-x" in arssm
    for edge in GROUP_EDGES["AR-HMM"]:
        assert EDGE_KINDS[edge].marker in arssm
    assert "<I>ArSSM</I>" in arssm
    assert "<I>VRNN</I>" in cells["DMM-Aug(z<-z, x<-z, x<-x, z<-x)"]["label"]


def test_taxonomy_edges_form_hasse_diagram(tmp_path):
    _, nodes, edges = taxonomy_dot(tmp_path)
    label_of = {node: attributes["tooltip"] for node, attributes in nodes.items()
                if "tooltip" in attributes}

    lattice = [(label_of[tail], label_of[head]) for (tail, head), attributes in edges.items()
               if tail in label_of and head in label_of and attributes.get("style") != "invis"]
    for group, group_edges in GROUP_EDGES.items():
        count = len(group_edges)
        in_group = [edge for edge in lattice if edge[0].startswith(f"{group}(")]
        # A Boolean lattice on k edges has k * 2^(k-1) covering pairs.
        assert len(in_group) == count * 2 ** (count - 1), group
    for tail, head in lattice:
        lower, upper = set(parse_cell(tail).relaxed), set(parse_cell(head).relaxed)
        assert lower < upper, (tail, head)
        assert len(upper - lower) == 1, (tail, head)


def test_taxonomy_highlights_cells_of_specs(tmp_path):
    _, nodes, _ = taxonomy_dot(tmp_path, specs=[SPECS / "vrnn.dssm", SPECS / "dmm.dssm"])
    cells = cell_nodes(nodes)

    vrnn = cells["DMM-Aug(z<-z, x<-z, x<-x, z<-x)"]
    assert vrnn["fillcolor"] == render.HIGHLIGHT_FILL
    assert cells["HMM()"]["fillcolor"] == render.HIGHLIGHT_FILL
    highlighted = [label for label, attributes in cells.items()
                   if attributes["fillcolor"] == render.HIGHLIGHT_FILL]
    assert sorted(highlighted) == ["DMM-Aug(z<-z, x<-z, x<-x, z<-x)", "HMM()"]


def test_taxonomy_adds_spec_model_names(tmp_path):
    spec = write_spec(tmp_path, "my_rssm", cell_spec_text(parse_cell("HMM(z<-z, x<-z)"),
                                                          model_name="MyRssm"))
    _, nodes, _ = taxonomy_dot(tmp_path, specs=[tmp_path])
    cells = cell_nodes(nodes)

    assert spec.exists()
    assert "<B>MyRssm</B>" in cells["HMM(z<-z, x<-z)"]["label"]
    assert "MyRssm" not in cells["HMM(z<-z)"]["label"]


def test_taxonomy_finds_specs_in_folders_recursively(tmp_path):
    nested = tmp_path / "a" / "b"
    nested.mkdir(parents=True)
    write_spec(nested, "srnn_like", cell_spec_text(parse_cell("DMM-Aug(x<-x, z<-x)"),
                                                   model_name="SrnnLike"))
    _, nodes, _ = taxonomy_dot(tmp_path, specs=[tmp_path])

    assert cell_nodes(nodes)["DMM-Aug(x<-x, z<-x)"]["fillcolor"] == render.HIGHLIGHT_FILL


def test_taxonomy_finite_cell_needs_spec(tmp_path):
    finite = parse_cell("AR-HMM(z<-z:3)")
    _, nodes, _ = taxonomy_dot(tmp_path)
    assert finite.label not in cell_nodes(nodes)

    write_spec(tmp_path, "order3", cell_spec_text(finite, model_name="Order3"))
    _, nodes, edges = taxonomy_dot(tmp_path, specs=[tmp_path])
    cells = cell_nodes(nodes)

    assert len(cells) == 37
    node = cells[finite.label]
    assert "cluster_ar_hmm" in node["clusters"]
    assert "dashed" in node["style"]
    assert "<B>Order3</B>" in node["label"]
    finite_id = render.taxonomy_node_id(finite)
    below = render.taxonomy_node_id(parse_cell("AR-HMM()"))
    above = render.taxonomy_node_id(parse_cell("AR-HMM(z<-z)"))
    assert edges[below, finite_id]["style"] == "dashed"
    assert edges[finite_id, above]["style"] == "dashed"


def test_taxonomy_skips_failing_specs(tmp_path, caplog):
    bad = write_spec(tmp_path, "bad", "model Bad\nlatent z : normal[2]\n")
    outside = write_spec(tmp_path, "storn_like", STORN_LIKE)
    good = write_spec(tmp_path, "good", (SPECS / "arssm.dssm").read_text(encoding="utf-8"))

    with caplog.at_level(logging.WARNING, logger="dssm"):
        _, nodes, _ = taxonomy_dot(tmp_path, specs=[tmp_path])

    messages = [record.getMessage() for record in caplog.records]
    assert any(str(bad) in message for message in messages)
    outside_messages = [message for message in messages if str(outside) in message]
    assert outside_messages
    assert "outside the hierarchy" in outside_messages[0]
    assert not any(str(good) in message for message in messages)
    assert cell_nodes(nodes)["AR-HMM(z<-z, x<-z, x<-x)"]["fillcolor"] == render.HIGHLIGHT_FILL


def test_taxonomy_missing_spec_path_raises(tmp_path):
    with pytest.raises(DssmError, match="no such spec file or folder"):
        draw_taxonomy(tmp_path / "taxonomy.dot", specs=[tmp_path / "missing"])


@needs_dot
def test_taxonomy_renders_svg(tmp_path):
    output = tmp_path / "taxonomy.svg"
    draw_taxonomy(output, specs=[SPECS / "vrnn.dssm"])
    text = output.read_text(encoding="utf-8")
    assert text.startswith("<?xml")
    assert "VRNN" in text


# ---------------------------------------------------------------- command line


def test_cli_draw_writes_file(tmp_path, capsys):
    output = tmp_path / "vrnn.dot"
    assert main(["draw", str(SPECS / "vrnn.dssm"), "-o", str(output), "--steps", "4"]) == 0

    assert "h_4" in output.read_text(encoding="utf-8")
    assert str(output) in capsys.readouterr().err


def test_cli_draw_bad_spec_prints_error(tmp_path, capsys):
    spec = write_spec(tmp_path, "bad", "model Bad\nlatent z : normal[2]\n"
                      "observed x : bernoulli[2]\nz[t] <- y[t-1]\n")
    assert main(["draw", str(spec), "-o", str(tmp_path / "bad.svg")]) == 1

    error = capsys.readouterr().err
    assert f"{spec}:4:9: error: unknown variable 'y'" in error
    assert "Traceback" not in error


def test_cli_taxonomy_writes_file(tmp_path):
    output = tmp_path / "taxonomy.dot"
    assert main(["taxonomy", "-o", str(output), "--specs", str(SPECS)]) == 0

    _, nodes, _ = parse_dot(output.read_text(encoding="utf-8"))
    cells = cell_nodes(nodes)
    assert cells["AR-HMM(z<-z, x<-z, x<-x)"]["fillcolor"] == render.HIGHLIGHT_FILL


def test_cli_unknown_suffix_returns_one(tmp_path, capsys):
    assert main(["taxonomy", "-o", str(tmp_path / "taxonomy.gif")]) == 1
    assert "unsupported output format '.gif'" in capsys.readouterr().err


@needs_dot
def test_cli_draw_renders_svg(tmp_path):
    output = tmp_path / "arssm.svg"
    assert main(["draw", str(SPECS / "arssm.dssm"), "-o", str(output)]) == 0
    assert output.read_text(encoding="utf-8").startswith("<?xml")
