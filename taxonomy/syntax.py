"""The syntax tree of a spec: plain dataclasses, one per kind of statement.

Steps are stored as lags relative to the current step t: `t` is lag 0, `t-2`
is lag 2 and `t+1` is lag -1. A window `t-k:t-j` runs from lag k (oldest) to
lag j (newest); the whole history `1:t-j` has no oldest lag (None).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from taxonomy.errors import Location


@dataclass(frozen=True)
class Span:
    """Where a construct sits in the spec: 1-based line and columns."""

    line: int
    column: int
    end_column: int


@dataclass(frozen=True)
class Reference:
    """`name[index]`: a variable over the lags from `oldest` (None: step 1) to `newest`."""

    name: str
    oldest: int | None
    newest: int
    span: Span
    name_span: Span

    @property
    def is_whole_history(self) -> bool:
        return self.oldest is None

    def describe(self) -> str:
        """Write the reference back in spec notation."""
        def step(lag: int) -> str:
            if lag == 0:
                return "t"
            return f"t-{lag}" if lag > 0 else f"t+{-lag}"

        if self.oldest is None:
            return f"{self.name}[1:{step(self.newest)}]"
        if self.oldest == self.newest:
            return f"{self.name}[{step(self.newest)}]"
        return f"{self.name}[{step(self.oldest)}:{step(self.newest)}]"


@dataclass(frozen=True)
class VariableDecl:
    """`latent z : normal[16]` or `observed x : bernoulli[88]`."""

    kind: str
    name: str
    family: str
    dim: int
    span: Span
    name_span: Span
    family_span: Span


@dataclass(frozen=True)
class DeterministicDecl:
    """`deterministic h[t] = gru[200](inputs...)`; the recurrence on h[t-1] is implied."""

    name: str
    cell: str
    size: int
    inputs: tuple[Reference, ...]
    span: Span
    name_span: Span
    cell_span: Span
    index: Reference


@dataclass(frozen=True)
class Dependency:
    """`child[t] <- parents...`: one dependency line."""

    child: Reference
    parents: tuple[Reference, ...]
    span: Span


@dataclass(frozen=True)
class CellEdge:
    """One edge in a `cell` assertion: `z<-z` (fully relaxed) or `z<-z:3` (order 3)."""

    child: str
    parent: str
    order: int | str | None
    span: Span


@dataclass(frozen=True)
class CellAssertion:
    """`cell GROUP(edges...)`: where the author says the spec must land."""

    group: str
    edges: tuple[CellEdge, ...]
    span: Span
    group_span: Span


@dataclass(frozen=True)
class Setting:
    """A keyword statement with a value: `guide full`, `flow iaf[3, 20]`, `size mlp = 100`."""

    keyword: str
    name: str
    values: tuple[int, ...]
    span: Span
    name_span: Span


@dataclass
class Spec:
    """A whole spec file, statements kept in source order by kind."""

    path: str
    text: str
    model: str | None = None
    model_span: Span | None = None
    variables: list[VariableDecl] = field(default_factory=list)
    deterministic: list[DeterministicDecl] = field(default_factory=list)
    dependencies: list[Dependency] = field(default_factory=list)
    settings: list[Setting] = field(default_factory=list)
    cell: CellAssertion | None = None

    def line_text(self, line: int) -> str:
        # Split at \n only, as the parser counts lines, so a form feed or a
        # lone \r inside a line does not shift the lines after it.
        lines = self.text.split("\n")
        return lines[line - 1].rstrip("\r") if 0 < line <= len(lines) else ""
