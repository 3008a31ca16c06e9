"""dssm's compiler: .dssm text -> syntax tree -> model graph -> hierarchy placement -> code.

The functions here are the Python API of the `dssm` command-line program.
"""

from taxonomy.errors import DssmError, SpecError
from taxonomy.graph import ModelGraph, build_graph
from taxonomy.hierarchy import Cell, Placement, check_spec, check_text, paper_cells, parse_cell
from taxonomy.parser import load_spec, parse_spec

__all__ = [
    "Cell", "DssmError", "ModelGraph", "Placement", "SpecError", "build_graph", "check_spec",
    "check_text", "load_spec", "paper_cells", "parse_cell", "parse_spec",
]
