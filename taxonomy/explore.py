"""List the cells of the hierarchy and write specs for them."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

from taxonomy.errors import DssmError, SpecError
from taxonomy.graph import name_problem
from taxonomy.hierarchy import EDGE_KINDS, GROUP_EDGES, GROUPS, Cell, check_spec, paper_cells, \
    parse_cell
from taxonomy.scaffold import cell_file_stem, cell_spec_text
from taxonomy.writing import write_text_atomically


def finite_order_cells(group: str, max_order: int) -> list[Cell]:
    """Every cell of `group` whose orders are finite and at most `max_order`, or "all"."""
    choices = []
    for edge in GROUP_EDGES[group]:
        base = EDGE_KINDS[edge].base_order
        choices.append([*range(base, max(base, max_order) + 1), "all"])
    return [Cell.make(group, dict(zip(GROUP_EDGES[group], orders)))
            for orders in itertools.product(*choices)]


def spec_cells(specs_dir: str | os.PathLike) -> dict[Cell, list[str]]:
    """The cell of every spec under `specs_dir` that checks without problems."""
    found: dict[Cell, list[str]] = {}
    for path in sorted(Path(specs_dir).rglob("*.dssm")):
        try:
            placement = check_spec(str(path))
        except SpecError:
            continue
        if placement.cell is not None and not placement.problems():
            found.setdefault(placement.cell, []).append(str(path))
    return found


def list_cells(group: str | None = None, max_order: int | None = None,
               specs_dir: str | os.PathLike = "specs") -> list[dict]:
    """One row per cell: its label, group, orders, known models and the specs that hold it."""
    if group is not None and group not in GROUP_EDGES:
        raise DssmError(f"unknown group '{group}'; groups: {', '.join(GROUPS)}")
    if max_order is not None and max_order < 1:
        raise DssmError("--max-order must be at least 1")

    cells = set(paper_cells(group))
    if max_order is not None:
        for name in (group,) if group else GROUPS:
            cells.update(finite_order_cells(name, max_order))
    found = spec_cells(specs_dir) if Path(specs_dir).is_dir() else {}
    return [{"cell": cell.label, "group": cell.group, "orders": dict(cell.orders),
             "paper_cell": cell.is_paper_cell, "known_as": cell.known_as,
             "specs": found.get(cell, [])}
            for cell in sorted(cells)]


def write_cell_specs(labels: list[str], output: str, paper_cells: bool = False,
                     force: bool = False) -> list[str]:
    """Write a spec for each cell; one cell may go to a .dssm file, several go to a folder."""
    cells = [parse_cell(label) for label in labels]
    if paper_cells:
        cells += globals()["paper_cells"]()
    # A cell named and also among the paper cells is written once.
    cells = list(dict.fromkeys(cells))
    if not cells:
        raise DssmError("name a cell, e.g. 'AR-HMM(z<-z, x<-x)', or pass --paper-cells")

    if len(cells) == 1 and output.endswith(".dssm"):
        targets = [(cells[0], Path(output))]
    else:
        folder = Path(output)
        if folder.suffix == ".dssm":
            raise DssmError(f"{output}: several cells need a folder, not a .dssm file")
        try:
            folder.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise DssmError(f"cannot create the folder {output}: {error.strerror or error}; "
                            "choose another --output") from None
        targets = [(cell, folder / f"{cell_file_stem(cell)}.dssm") for cell in cells]

    # Check every target first, so a refusal leaves the folder as it was.
    existing = [str(path) for _, path in targets if path.exists()]
    if existing and not force:
        named = ", ".join(existing[:3])
        if len(existing) > 3:
            named += f" and {len(existing) - 3} more"
        raise DssmError(f"{named} already exist{'s' if len(existing) == 1 else ''}; "
                        "pass --force to overwrite")

    written = []
    for cell, path in targets:
        name = path.stem if name_problem(path.stem) is None else cell_file_stem(cell)
        try:
            write_text_atomically(path, cell_spec_text(cell, model_name=name))
        except OSError as error:
            raise DssmError(f"cannot write {path}: {error.strerror or error}") from None
        written.append(str(path))
    return written
