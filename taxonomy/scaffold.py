"""Write a spec for any cell, in dependency-line form with a comment on each line."""

from __future__ import annotations

from taxonomy.hierarchy import EDGE_KINDS, GROUP_EDGES, Cell


def cell_file_stem(cell: Cell) -> str:
    """A file and model name for a cell, e.g. ar_hmm__zz_xx3 for AR-HMM(z<-z, x<-x:3)."""
    group = cell.group.lower().replace("-", "_")
    parts = []
    for edge, order in cell.orders:
        short = edge.replace("<-", "")
        if order == "all":
            parts.append(short)
        elif order != EDGE_KINDS[edge].base_order:
            parts.append(f"{short}{order}")
    return group + ("__" + "_".join(parts) if parts else "")


def _reference(name: str, order: int | str, newest: int) -> str:
    """The reference covering lags newest..order, in the shortest spec notation."""
    step = "t" if newest == 0 else f"t-{newest}"
    if order == "all":
        return f"{name}[1:{step}]"
    if order == newest:
        return f"{name}[{step}]"
    return f"{name}[t-{order}:{step}]"


def _explain(edge: str, order: int | str) -> str:
    kind = EDGE_KINDS[edge].name
    if order == "all":
        return f"{kind}: relaxed to the whole history"
    if order == EDGE_KINDS[edge].base_order:
        return f"{kind}: first order" if edge != "x<-z" else f"{kind}: the current latent only"
    return f"{kind}: order {order}"


def cell_spec_text(cell: Cell, model_name: str | None = None, latent_dim: int = 16,
                   observed_family: str = "bernoulli", observed_dim: int = 88) -> str:
    """Return a spec that lands in `cell`, one dependency line per edge."""
    name = model_name or cell_file_stem(cell)
    orders = dict(cell.orders)
    known = ", ".join(cell.known_as) if cell.known_as else "no named model yet"
    lines = [
        f"# Cell {cell.label} ({known}).",
        "# Written in dependency-line form; `dssm compile` realises each whole-history",
        "# edge with one RNN over z and one over x.",
        f"model {name}",
        "",
        f"latent   z : normal[{latent_dim}]",
        f"observed x : {observed_family}[{observed_dim}]",
        "",
    ]
    newest = {"z<-z": 1, "x<-z": 0, "x<-x": 1, "z<-x": 1}
    child = {"z<-z": "z", "x<-z": "x", "x<-x": "x", "z<-x": "z"}
    parent = {"z<-z": "z", "x<-z": "z", "x<-x": "x", "z<-x": "x"}
    rows = []
    for edge in GROUP_EDGES[cell.group]:
        order = orders[edge]
        statement = f"{child[edge]}[t] <- {_reference(parent[edge], order, newest[edge])}"
        rows.append((statement, _explain(edge, order)))
    width = max(len(statement) for statement, _ in rows)
    lines += [f"{statement.ljust(width)}   # {comment}" for statement, comment in rows]
    lines += ["", f"cell {cell.label}", ""]
    return "\n".join(lines)
