"""Draw a spec's graphical model, and the whole hierarchy, with Graphviz.

The pictures follow figure 1 of Tang et al., "A Hierarchical Taxonomy For
Deep State Space Models". Observed variables are grey circles, latents white
circles and deterministic states white diamonds. Edges into random variables
are solid and edges into deterministic states dotted. Graphviz is an optional
dependency, imported only when a picture is drawn, so the compiler works
without it.
"""

from __future__ import annotations

import logging
import os
import shutil
import textwrap
from collections.abc import Iterable
from html import escape
from pathlib import Path

from taxonomy.errors import DssmError, SpecError
from taxonomy.graph import ModelGraph, unroll
from taxonomy.hierarchy import EDGE_KINDS, GROUP_EDGES, GROUPS, Cell, Placement, check_spec, \
    paper_cells
from taxonomy.scaffold import cell_file_stem
from taxonomy.writing import write_bytes_atomically, write_text_atomically

log = logging.getLogger("dssm")

FORMATS = (".svg", ".png", ".pdf", ".dot")
INSTALL_HINT = ("Install Graphviz (`apt-get install graphviz`, `brew install graphviz` or "
                "https://graphviz.org/download/), or write a .dot file instead.")

TEXT_FONT = "Helvetica"
VARIABLE_FONT = "Times-Roman"
OBSERVED_FILL = "#c8c8c8"
BASE_MODELS_FILL = "#fcefc7"  # the pale yellow of the base-model box in that figure
CELLS_FILL = "#fbe3cc"        # the pale orange of its cell box
HIGHLIGHT_FILL = "#8fc1e3"
SCORE_COLOURMAP = "YlGnBu"    # matplotlib's colour map for scores: pale is high, dark is low
SCORE_COLOUR_RANGE = (0.15, 0.95)  # the part of the map used, so no score looks white
SCORE_LEGEND_STEPS = 9        # swatches in the legend's colour bar
FUTURE_COLOUR = "#b03a2e"

NODE_STYLES = {
    "latent": {"shape": "circle", "width": "0.46", "fillcolor": "white"},
    "observed": {"shape": "circle", "width": "0.46", "fillcolor": OBSERVED_FILL},
    "deterministic": {"shape": "diamond", "width": "0.66", "height": "0.66",
                      "fillcolor": "white"},
}
STEP_SPACING = 1.15  # inches between the columns of consecutive steps
ROW_SPACING = 0.85   # inches between the rows of consecutive variables
MAX_SPEC_NAMES = 3   # spec model names listed in a taxonomy cell before "+N more"


def draw_spec(spec_path: str | os.PathLike, output_path: str | os.PathLike,
              steps: int = 3) -> None:
    """Draw the graphical model of the spec at `spec_path`, unrolled over `steps` steps.

    The suffix of `output_path` picks the format: .svg, .png, .pdf or .dot. A
    spec that does not parse or build raises its SpecError. A spec outside the
    hierarchy is drawn too, with the reason in its caption.
    """
    suffix = _output_suffix(output_path)
    if steps < 1:
        raise DssmError(f"--steps is {steps}, but a drawing needs at least 1 step")
    placement = check_spec(str(spec_path))
    diagram = spec_diagram(placement, steps)
    _write(diagram, output_path, suffix)


def draw_taxonomy(output_path: str | os.PathLike,
                  specs: Iterable[str | os.PathLike] | None = None,
                  scores: dict[Cell, float] | None = None, score_label: str = "score") -> None:
    """Draw the four groups and their cells as lattices, highlighting the cells of `specs`.

    `specs` lists spec files and folders (searched recursively for *.dssm).
    Specs that do not check are skipped with a warning. With `scores`, each
    cell that has a score is filled on a colour scale (darker is lower) and
    shows the value, every other cell is white, and the legend contains a colour
    bar titled `score_label`.
    """
    suffix = _output_suffix(output_path)
    found = cells_of_specs(specs) if specs else {}
    _write(taxonomy_diagram(found, scores, score_label), output_path, suffix)


# ---------------------------------------------------------------- one spec


def spec_diagram(placement: Placement, steps: int = 3):
    """Return the graphviz.Digraph of a placed spec unrolled over `steps` steps.

    Each variable is one row and each step one column, with pinned positions
    for neato, whose spline router bends edges around the nodes they would
    otherwise cross (a skipped step, a row between parent and child).
    """
    graphviz = _import_graphviz()
    model = placement.model
    rows = variable_rows(model)

    diagram = graphviz.Digraph(model.name, engine="neato",
                               comment=f"{model.name}: render with `neato -Tsvg`")
    diagram.attr(layout="neato", splines="true", sep="+12", esep="+8", outputorder="edgesfirst",
                 pad="0.25", label=_spec_caption(placement), labelloc="b", fontname=TEXT_FONT,
                 fontsize="13")
    diagram.attr("node", fixedsize="true", style="filled", penwidth="1.1",
                 fontname=VARIABLE_FONT, fontsize="15")
    diagram.attr("edge", arrowsize="0.65", penwidth="1.1")

    for row, name in enumerate(rows):
        kind = model.graph.nodes[name]["kind"]
        height = (len(rows) - 1 - row) * ROW_SPACING
        for step in range(1, steps + 1):
            diagram.node(spec_node_id(name, step), label=_variable_label(name, step),
                         pos=f"{(step - 1) * STEP_SPACING:.3f},{height:.3f}!",
                         **NODE_STYLES[kind])

    # unroll() drops the edges from before step 1: initial states are parameters.
    unrolled = unroll(model, steps, include_future=True)
    for (parent, source), (child, target), data in sorted(unrolled.edges(data=True),
                                                          key=_edge_order(rows)):
        attributes = {"style": "dotted" if data["deterministic"] else "solid"}
        if data.get("future"):
            attributes["color"] = FUTURE_COLOUR
        diagram.edge(spec_node_id(parent, source), spec_node_id(child, target), **attributes)
    return diagram


def spec_node_id(name: str, step: int) -> str:
    """Return the DOT node id of variable `name` at `step`, e.g. h1_3.

    The id is unique because variable names are identifiers and the step follows
    the last underscore.
    """
    return f"{name}_{step}"


def variable_rows(model: ModelGraph) -> list[str]:
    """Order the variables top to bottom as the paper does.

    A deterministic state that reads and feeds only latents sits above them, one
    that reads only observations sits below them, and any other state between
    the latent and the observed rows, so that most edges join adjacent rows.
    """
    latents, observed = model.latents, model.observed
    carried = model.carried_history()
    above, between, below = [], [], []
    for state in model.deterministic:
        reads = set(carried[state])
        feeds = _fed_variables(model, state)
        if reads and reads <= set(latents) and feeds <= set(latents):
            above.append(state)
        elif reads and reads <= set(observed):
            below.append(state)
        else:
            between.append(state)
    return above + latents + between + observed + below


def _fed_variables(model: ModelGraph, state: str) -> set[str]:
    """Return the random variables that read `state`, directly or through other states."""
    fed, seen, frontier = set(), {state}, [state]
    while frontier:
        node = frontier.pop()
        for child in model.graph.successors(node):
            if child in seen:
                continue
            seen.add(child)
            if model.is_stochastic(child):
                fed.add(child)
            else:
                frontier.append(child)
    return fed


def _variable_label(name: str, step: int) -> str:
    # graphviz treats a label in angle brackets as an HTML-like label.
    return f"<<I>{escape(name)}</I><SUB>{step}</SUB>>"


def _edge_order(rows: list[str]):
    def key(edge):
        (parent, source), (child, target), _ = edge
        return (target, rows.index(child), source, rows.index(parent))
    return key


def _spec_caption(placement: Placement) -> str:
    name = placement.model.name
    if placement.cell is None:
        reason = placement.outside[0].message
        text = f"{name} — outside the hierarchy: {reason}"
    else:
        text = f"{name} — {placement.cell.label}"
        if placement.cell.markers:
            text += f"  {placement.cell.markers}"
    # A literal backslash-n is Graphviz's line break in a plain label.
    return "\\n".join(textwrap.wrap(text, width=60)) or text


# ---------------------------------------------------------------- the hierarchy


def cells_of_specs(paths: Iterable[str | os.PathLike]) -> dict[Cell, list[str]]:
    """Map each cell to the model names of the specs under `paths` that land in it.

    Folders are searched recursively for *.dssm files. A spec that does not
    check, is outside the hierarchy or contradicts its own `cell` statement is
    skipped with a warning on the "dssm" logger.
    """
    found: dict[Cell, list[str]] = {}
    for path in _spec_files(paths):
        try:
            placement = check_spec(str(path))
        except SpecError as error:
            log.warning("skipping %s", error.format().splitlines()[0])
            continue
        problems = placement.problems()
        if problems:
            log.warning("skipping %s", problems[0].format().splitlines()[0])
            continue
        names = found.setdefault(placement.cell, [])
        if placement.model.name not in names:
            names.append(placement.model.name)
    return found


def _spec_files(paths: Iterable[str | os.PathLike]) -> list[Path]:
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(path.rglob("*.dssm"))
            if not inside:
                log.warning("no .dssm files under %s", path)
            files += inside
        elif path.is_file():
            files.append(path)
        else:
            raise DssmError(f"{path}: no such spec file or folder")
    return files


def taxonomy_diagram(found: dict[Cell, list[str]] | None = None,
                     scores: dict[Cell, float] | None = None, score_label: str = "score"):
    """Return the graphviz.Digraph of the hierarchy.

    The four base models sit on top, each drawn as its three-step graph. Below
    each, its cells form a Hasse diagram: an edge joins two cells when the lower
    one relaxes exactly one edge fewer. `found` maps cells to the model names of
    the specs that highlight them. `scores` colours cells in place of the
    highlight (see `draw_taxonomy`). A finite-order cell is drawn only when it
    has specs or a score, and dashed edges join it to the paper cells on either
    side of it.
    """
    graphviz = _import_graphviz()
    found = found or {}
    fills = _CellFills(found, scores)
    diagram = graphviz.Digraph("taxonomy", engine="dot",
                               comment="the DSSM hierarchy: render with `dot -Tsvg`")
    # remincross=false: the final crossing pass of dot 2.43 can reverse the flat
    # edges that order each row, so rows would read differently per group.
    diagram.attr(newrank="true", remincross="false", nodesep="0.18", ranksep="0.42",
                 pad="0.25", fontname=TEXT_FONT, fontsize="13", labelloc="b",
                 label=_legend(found, fills, score_label))
    diagram.attr("node", fontname=TEXT_FONT, fontsize="11")
    diagram.attr("edge", arrowsize="0.6", penwidth="0.9", color="#555555")

    with diagram.subgraph(name="cluster_base_models") as top:
        top.attr(label="", style="rounded,filled", fillcolor=BASE_MODELS_FILL,
                 color="#c9a227", margin="10")
        for group in GROUPS:
            _draw_base_model(top, group, found.get(Cell.paper(group, ()), []), fills)

    edges = []
    for group in GROUPS:
        cells = [cell for cell in paper_cells(group) if cell.relaxed]
        finite = sorted(cell for cell in {*found, *fills.scores}
                        if cell.group == group and not cell.is_paper_cell)
        with diagram.subgraph(name=f"cluster_{_slug(group)}") as cluster:
            cluster.attr(label=f"{group}: {len(cells) + 1} cells", labelloc="b",
                         style="rounded,filled", fillcolor=CELLS_FILL, color="#d08c4a",
                         fontname=TEXT_FONT, fontsize="12", margin="8")
            for size in range(1, len(GROUP_EDGES[group]) + 1):
                row = [cell for cell in cells if len(cell.relaxed) == size]
                _draw_cell_row(cluster, row, found, fills)
            for cell in finite:
                cluster.node(taxonomy_node_id(cell),
                             label=_cell_label(cell, found.get(cell), fills.scores.get(cell)),
                             **_cell_style(cell, fills))
        edges += _lattice_edges(cells, finite)

    for lower, upper, attributes in edges:
        diagram.edge(taxonomy_node_id(lower), taxonomy_node_id(upper), **attributes)
    return diagram


def taxonomy_node_id(cell: Cell) -> str:
    """Return the DOT node id of a cell, e.g. ar_hmm__zz_xx3 for AR-HMM(z<-z, x<-x:3).

    The cell's label cannot be the id, because DOT reads a colon in an edge's
    node as a port. The label goes in the node's tooltip instead.
    """
    return cell_file_stem(cell)


def _draw_base_model(top, group: str, spec_names: list[str], fills: _CellFills) -> None:
    """Draw the base model's graph over three steps, with its cell node beneath."""
    prefix = _slug(group)
    autoregression = "x<-x" in GROUP_EDGES[group]
    feedforward = "z<-x" in GROUP_EDGES[group]
    with top.subgraph(name=f"cluster_base_{prefix}") as box:
        box.attr(label="", style="invis", margin="4")
        box.attr("node", fixedsize="true", width="0.3", style="filled", penwidth="0.9",
                 fontname=VARIABLE_FONT, fontsize="11")
        box.attr("edge", arrowsize="0.45", penwidth="0.8", color="black")
        for name, fill in (("z", "white"), ("x", OBSERVED_FILL)):
            with box.subgraph(name=f"{prefix}_{name}_row") as row:
                row.attr(rank="same")
                for step in (1, 2, 3):
                    row.node(f"{prefix}_{name}{step}", label=_variable_label(name, step),
                             shape="circle", fillcolor=fill)
        for step in (1, 2, 3):
            box.edge(f"{prefix}_z{step}", f"{prefix}_x{step}")
        for step in (1, 2):
            box.edge(f"{prefix}_z{step}", f"{prefix}_z{step + 1}")
            if autoregression:
                box.edge(f"{prefix}_x{step}", f"{prefix}_x{step + 1}")
            if feedforward:
                # Drawn as z[t+1] -> x[t] reversed, so dot keeps z above x.
                box.edge(f"{prefix}_z{step + 1}", f"{prefix}_x{step}", dir="back")

        cell = Cell.paper(group, ())
        known = [name for name in cell.known_as if name != group]
        lines = [f"<B>{escape(group)}</B>"]
        lines += [f"<I>{escape(name)}</I>" for name in known]
        lines += _spec_name_lines([name for name in spec_names if name not in cell.known_as])
        lines += _score_lines(fills.scores.get(cell))
        box.node(taxonomy_node_id(cell), label="<" + "<BR/>".join(lines) + ">", shape="box",
                 tooltip=cell.label, fixedsize="false", style="rounded,filled",
                 fontname=TEXT_FONT, fontsize="12", margin="0.08,0.03", **fills.of(cell))
        # Keep the cell node under the middle step of the drawing.
        box.edge(f"{prefix}_x2", taxonomy_node_id(cell), style="invis", weight="10")


def _draw_cell_row(cluster, row: list[Cell], found: dict[Cell, list[str]],
                   fills: _CellFills) -> None:
    """Draw the cells that relax the same number of edges on one rank, in EDGES order."""
    with cluster.subgraph(name=f"{taxonomy_node_id(row[0])}_row") as rank:
        rank.attr(rank="same")
        for cell in row:
            rank.node(taxonomy_node_id(cell),
                      label=_cell_label(cell, found.get(cell), fills.scores.get(cell)),
                      **_cell_style(cell, fills))
        # Invisible edges fix the left-to-right order, so every group reads alike.
        for left, right in zip(row, row[1:]):
            rank.edge(taxonomy_node_id(left), taxonomy_node_id(right), style="invis")


def _lattice_edges(cells: list[Cell], finite: list[Cell]) -> list[tuple[Cell, Cell, dict]]:
    """List the covering pairs of the paper cells and the links of the finite-order cells.

    The base cell (no relaxed edge) is the bottom of each lattice.
    """
    group = cells[0].group
    paper = [Cell.paper(group, ())] + cells
    edges = [(lower, upper, {}) for lower in paper for upper in paper
             if set(lower.relaxed) < set(upper.relaxed)
             and len(upper.relaxed) == len(lower.relaxed) + 1]
    for cell in finite:
        below = Cell.paper(group, cell.relaxed)
        above = Cell.paper(group, cell.relaxed + cell.finite_relaxed)
        edges.append((below, cell, {"style": "dashed"}))
        # A finite-order cell lies between `below` and `above`. This edge stays
        # out of the ranking, so the lattice rows keep their places.
        edges.append((cell, above, {"style": "dashed", "constraint": "false"}))
    return edges


def _cell_label(cell: Cell, spec_names: list[str] | None, score: float | None = None) -> str:
    if cell.is_paper_cell:
        edges = ", ".join(cell.relaxed)
    else:
        edges = cell.label[len(cell.group) + 1:-1]
    lines = [escape(edges)]
    if cell.markers:
        lines.append(cell.markers)
    lines += [f"<I>{escape(name)}</I>" for name in cell.known_as]
    lines += _spec_name_lines([name for name in spec_names or [] if name not in cell.known_as])
    lines += _score_lines(score)
    return "<" + "<BR/>".join(lines) + ">"


def _spec_name_lines(names: list[str]) -> list[str]:
    if not names:
        return []
    listed = names[:MAX_SPEC_NAMES]
    lines = [f"<B>{escape(name)}</B>" for name in listed]
    if len(names) > len(listed):
        lines.append(f"+{len(names) - len(listed)} more")
    return [f'<FONT POINT-SIZE="10">{line}</FONT>' for line in lines]


def _score_lines(score: float | None) -> list[str]:
    return [] if score is None else [f"<B>{score:.3f}</B>"]


def _cell_style(cell: Cell, fills: _CellFills) -> dict[str, str]:
    style = "rounded,filled" if cell.is_paper_cell else "rounded,filled,dashed"
    return {"shape": "box", "style": style, "margin": "0.08,0.03", "tooltip": cell.label,
            **fills.of(cell)}


class _CellFills:
    """The fill of each cell: the highlight of `found`, or a colour scale over `scores`."""

    def __init__(self, found: dict[Cell, list[str]], scores: dict[Cell, float] | None):
        self.found = found
        self.coloured = scores is not None
        self.scores = {cell: float(value) for cell, value in (scores or {}).items()}
        values = self.scores.values()
        self.low, self.high = (min(values), max(values)) if values else (0.0, 0.0)

    def of(self, cell: Cell) -> dict[str, str]:
        """Return the fillcolor, and a fontcolor readable on it, of `cell`."""
        if not self.coloured:
            return {"fillcolor": HIGHLIGHT_FILL if cell in self.found else "white"}
        if cell not in self.scores:
            return {"fillcolor": "white"}
        return self.colour(self.scores[cell])

    def colour(self, value: float) -> dict[str, str]:
        """Return the fill and font colours of a score: the darkest is the lowest score."""
        from matplotlib import colormaps
        from matplotlib.colors import to_hex

        share = 0.0 if self.high == self.low else (value - self.low) / (self.high - self.low)
        start, stop = SCORE_COLOUR_RANGE
        red, green, blue, _ = colormaps[SCORE_COLOURMAP](stop - share * (stop - start))
        # Relative luminance (ITU-R BT.709 weights): dark fills get white text.
        luminance = 0.2126 * red + 0.7152 * green + 0.0722 * blue
        return {"fillcolor": to_hex((red, green, blue)),
                "fontcolor": "white" if luminance < 0.45 else "black"}

    def colour_bar(self, label: str) -> str:
        """Return an HTML-like table: `label`, the lowest score, swatches, the highest."""
        if not self.scores:
            return f"{escape(label)}: no cell has a score"
        steps = SCORE_LEGEND_STEPS if self.high > self.low else 1
        values = [self.low + (self.high - self.low) * i / max(steps - 1, 1) for i in range(steps)]
        swatches = "".join(f'<TD BGCOLOR="{self.colour(value)["fillcolor"]}" WIDTH="22" '
                           'HEIGHT="14"> </TD>' for value in values)
        return (f'<TABLE BORDER="0" CELLSPACING="0" CELLPADDING="2"><TR>'
                f"<TD>{escape(label)}:&nbsp;&nbsp;{self.low:.3f}</TD>{swatches}"
                f"<TD>{self.high:.3f}</TD><TD>&nbsp;&nbsp;white: no score</TD></TR></TABLE>")


def _legend(found: dict[Cell, list[str]], fills: _CellFills | None = None,
            score_label: str = "score") -> str:
    gap = "&nbsp;" * 6
    markers = gap.join(f"{kind.marker} {escape(kind.edge)} relaxed ({kind.name})"
                       for kind in EDGE_KINDS.values())
    notes = ["each group counts its base model (top) among its cells",
             "<I>italic</I>: known model"]
    coloured = fills is not None and fills.coloured
    if found and not coloured:
        notes.append(f'<FONT COLOR="{HIGHLIGHT_FILL}">■</FONT> <B>bold</B>: '
                     "model names of the specs in the cell")
    elif found:
        notes.append("<B>bold</B>: model names of the specs in the cell")
    if any(not cell.is_paper_cell for cell in {*found, *(fills.scores if fills else {})}):
        notes.append("dashed: finite-order cell")
    if not coloured:
        return f"<{markers}<BR/>{gap.join(notes)}>"
    # An HTML-like label is text or one table, so the colour bar needs a table around both.
    return (f'<<TABLE BORDER="0" CELLSPACING="0"><TR><TD>{markers}<BR/>{gap.join(notes)}</TD>'
            f"</TR><TR><TD>{fills.colour_bar(score_label)}</TD></TR></TABLE>>")


def _slug(group: str) -> str:
    return group.lower().replace("-", "_")


# ---------------------------------------------------------------- output


def _output_suffix(output_path: str | os.PathLike) -> str:
    suffix = Path(output_path).suffix.lower()
    if suffix not in FORMATS:
        raise DssmError(f"{output_path}: unsupported output format '{suffix or '(none)'}'. "
                        f"Use one of {', '.join(FORMATS)}")
    return suffix


def _write(diagram, output_path: str | os.PathLike, suffix: str) -> None:
    """Write the DOT source, or the output of Graphviz for the other formats, atomically."""
    if suffix == ".dot":
        write_text_atomically(output_path, diagram.source)
        return

    import graphviz

    if shutil.which(diagram.engine) is None:
        raise DssmError(f"cannot write {output_path}, because Graphviz's `{diagram.engine}` "
                        f"program is not on PATH. {INSTALL_HINT}")
    if suffix == ".png":
        diagram.attr(dpi="150")
    try:
        data = diagram.pipe(format=suffix[1:])
    except graphviz.ExecutableNotFound:
        raise DssmError(f"cannot write {output_path}, because Graphviz's `{diagram.engine}` "
                        f"program is not on PATH. {INSTALL_HINT}") from None
    except graphviz.CalledProcessError as error:
        message = (error.stderr or b"").decode(errors="replace").strip()
        raise DssmError(f"Graphviz failed to write {output_path}: {message}") from None
    write_bytes_atomically(output_path, data)


def _import_graphviz():
    try:
        import graphviz
    except ImportError:
        raise DssmError("drawing needs the graphviz Python package, which is not installed. "
                        "Install it with `pip install graphviz`") from None
    return graphviz
