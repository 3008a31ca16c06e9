"""Read a .dssm file and turn its text into the syntax tree of `taxonomy.syntax`."""

from __future__ import annotations

import functools
import os
from pathlib import Path

from lark import Lark, Token, Transformer, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from taxonomy.errors import Location, SpecError, did_you_mean
from taxonomy.syntax import (CellAssertion, CellEdge, DeterministicDecl, Dependency, Reference,
                             Setting, Span, Spec, VariableDecl)

KEYWORDS = ("model", "latent", "observed", "deterministic", "guide", "flow", "cell", "size")

# Example mistakes and the label each gets, matched against the parser state
# where a real error happens (Lark's match_examples).
_EXAMPLE_MISTAKES = {
    "missing closing bracket ']'": [
        "latent z : normal[16\n",
        "x[t] <- z[t\n",
        "x[t] <- z[t-1\n",
        "deterministic h[t] = gru[200](z[t)\n",
    ],
    "missing closing parenthesis ')'": [
        "deterministic h[t] = gru[200](z[t]\n",
        "cell HMM(\n",
    ],
    "a dependency needs '<-' between the child and its parents": [
        "x[t] z[t]\n",
        "x[t] = z[t]\n",
        "x[t] -> z[t]\n",
    ],
    "a dependency needs at least one parent after '<-'": [
        "x[t] <-\n",
    ],
    "a variable declaration reads `latent NAME : FAMILY[DIM]`": [
        "latent z normal[16]\n",
        "latent z : normal\n",
        "latent z : normal[]\n",
        "observed x bernoulli[88]\n",
        "latent : normal[16]\n",
    ],
    "a deterministic state reads `deterministic NAME[t] = CELL[SIZE](INPUTS)`": [
        "deterministic h = gru[200](z[t])\n",
        "deterministic h[t] gru[200](z[t])\n",
        "deterministic h[t] = gru(z[t])\n",
        "deterministic h[t] = gru[200]\n",
    ],
    "an index is `t`, `t-k`, `t-k:t-j`, `1:t` or `1:t-1`": [
        "x[t] <- z[]\n",
        "x[t] <- z[s]\n",
        "x[t] <- z[t-]\n",
        "x[t] <- z[t*2]\n",
    ],
    "references are separated by commas": [
        "x[t] <- z[t] x[t-1]\n",
    ],
    "a reference needs an index in brackets, such as z[t-1]": [
        "x[t] <- z\n",
        "x[t] <- z, x[t-1]\n",
    ],
    "one statement per line": [
        "model A model B\n",
        "latent z : normal[16] observed x : bernoulli[88]\n",
    ],
}


@functools.lru_cache(maxsize=1)
def _examples_in_context() -> dict[str, list[str]]:
    # The parser state of a mistake depends on whether a statement came before
    # it, so each example is matched both first in the file and after one.
    return {label: examples + ["model A\n" + example for example in examples]
            for label, examples in _EXAMPLE_MISTAKES.items()}


@functools.lru_cache(maxsize=1)
def _lark() -> Lark:
    grammar = (Path(__file__).with_name("grammar.lark")).read_text(encoding="utf-8")
    return Lark(grammar, parser="lalr", propagate_positions=True, maybe_placeholders=True)


def read_spec_text(path: str | os.PathLike) -> str:
    """Read a spec file as UTF-8 text, raising SpecError for anything that is not one."""
    name = str(path)
    location = Location(name)

    if os.path.isdir(name):
        raise SpecError("is a directory, not a spec file", location,
                        hint=f"pass the spec files themselves, e.g. {name.rstrip('/')}/*.dssm")
    try:
        with open(name, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        hint = None
        if not name.endswith(".dssm") and os.path.exists(name + ".dssm"):
            hint = f"did you mean '{name}.dssm'?"
        raise SpecError("no such file", location, hint=hint or "check the path") from None
    except PermissionError:
        raise SpecError("permission denied: the file cannot be read", location,
                        hint="check the file's permissions") from None
    except OSError as error:
        raise SpecError(f"cannot read the file: {error.strerror or error}", location) from None

    if b"\x00" in data:
        raise SpecError("binary file: a spec is UTF-8 text", location,
                        hint="pass a .dssm text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        before = data[:error.start]
        line = before.count(b"\n") + 1
        line_start = before.rfind(b"\n") + 1
        line_end = data.find(b"\n", error.start)
        source_line = data[line_start:None if line_end < 0 else line_end].decode(
            "utf-8", errors="replace")
        column = len(before[line_start:].decode("utf-8", errors="replace")) + 1
        raise SpecError(f"not valid UTF-8 (byte 0x{data[error.start]:02x})",
                        Location(name, line, column),
                        hint="save the spec as UTF-8 text", source_line=source_line) from None

    if text.startswith("\ufeff"):
        text = text[1:]
    if not any(line.split("#", 1)[0].strip() for line in text.splitlines()):
        raise SpecError("empty spec: it declares nothing", Location(name, 1, 1),
                        hint="start with `model NAME`, then declare `latent` and `observed` "
                             "variables and their dependencies")
    return text


def load_spec(path: str | os.PathLike) -> Spec:
    """Read and parse the spec file at `path`."""
    return parse_spec(read_spec_text(path), str(path))


def parse_spec(text: str, path: str = "<spec>") -> Spec:
    """Parse spec text; `path` only names the source in error messages."""
    try:
        tree = _lark().parse(text + "\n")
    except UnexpectedInput as error:
        raise _syntax_error(error, text, path) from None

    spec = Spec(path=path, text=text)
    _SpecBuilder(spec).visit(tree)
    return spec


def _span(meta_or_token) -> Span:
    if isinstance(meta_or_token, Token):
        return Span(meta_or_token.line, meta_or_token.column, meta_or_token.end_column)
    return Span(meta_or_token.line, meta_or_token.column, meta_or_token.end_column
                if meta_or_token.end_line == meta_or_token.line else meta_or_token.column + 1)


def _syntax_error(error: UnexpectedInput, text: str, path: str) -> SpecError:
    lines = [line.rstrip("\r") for line in text.split("\n")]
    line = getattr(error, "line", None)
    column = getattr(error, "column", None)
    if isinstance(error, UnexpectedEOF) or line in (None, -1) or line > len(lines):
        line, column = len(lines), len(lines[-1]) + 1
    source_line = lines[line - 1] if line <= len(lines) else ""

    misspelt = _misspelt_keyword(source_line)
    if misspelt is not None:
        word, hint = misspelt
        start = source_line.index(word) + 1
        return SpecError(f"unknown statement '{word}'", Location(path, line, start,
                                                                 start + len(word)),
                         hint=hint, source_line=source_line)

    label = error.match_examples(_lark().parse, _examples_in_context(), use_accepts=True)
    found = _describe_found(error, source_line, column)
    message = f"{label}; found {found}" if label else f"unexpected {found}"

    hint = None
    if hint is None and isinstance(error, UnexpectedToken) and error.token.type == "INT" \
            and column and column > 1 and source_line[column - 2:column - 1] in ("[", ":"):
        hint = "steps are written relative to t, e.g. t, t-1, t-3:t-1 or 1:t-1"
    if hint is None and _starts_with_digit_name(error, source_line, column):
        hint = "names must start with a letter or an underscore"
    if hint is None and column and column > 1 and source_line[column - 1:column] in ("-", ".") \
            and (source_line[column - 2:column - 1].isalnum()) and "[" not in source_line[:column]:
        hint = "names are plain identifiers: letters, digits and underscores"

    end_column = None
    if isinstance(error, UnexpectedToken) and error.token.end_column:
        end_column = error.token.end_column
    return SpecError(message, Location(path, line, column, end_column), hint=hint,
                     source_line=source_line)


def _describe_found(error: UnexpectedInput, source_line: str, column: int) -> str:
    if isinstance(error, UnexpectedEOF):
        return "end of file"
    if isinstance(error, UnexpectedToken):
        if error.token.type in ("_NL", "$END"):
            return "end of line"
        return f"'{error.token}'"
    if isinstance(error, UnexpectedCharacters):
        char = source_line[column - 1:column] if column else ""
        if not char:
            return "end of line"
        if not char.isprintable() or char.isspace():
            return f"character U+{ord(char):04X}"
        return f"character '{char}'"
    return "input"


def _misspelt_keyword(source_line: str) -> tuple[str, str] | None:
    """Return the first word of a broken line and a did-you-mean, if it is a misspelt keyword.

    Only a word followed by another word counts, because a line that starts
    with `name[` is a dependency, whatever the name.
    """
    words = source_line.split("#", 1)[0].split()
    if len(words) < 2 or "<-" in source_line:
        return None
    first = words[0]
    if first in KEYWORDS or not first.isidentifier():
        return None
    hint = did_you_mean(first, KEYWORDS)
    return (first, hint) if hint else None


def _starts_with_digit_name(error: UnexpectedInput, source_line: str, column: int | None) -> bool:
    if not column:
        return False
    rest = source_line[column - 1:]
    return len(rest) > 1 and rest[0].isdigit() and (rest.lstrip("0123456789")[:1].isalpha()
                                                   or rest.lstrip("0123456789")[:1] == "_")


class _SpecBuilder:
    """Walk the Lark tree once and fill a Spec; nothing after this sees Lark objects."""

    def __init__(self, spec: Spec):
        self.spec = spec

    def visit(self, tree: Tree) -> None:
        for statement in tree.children:
            getattr(self, statement.data)(statement)

    def _error(self, message: str, span: Span, hint: str | None = None) -> SpecError:
        return SpecError(message, Location(self.spec.path, span.line, span.column, span.end_column),
                         hint=hint, source_line=self.spec.line_text(span.line))

    def model_decl(self, tree: Tree) -> None:
        (name,) = tree.children
        if self.spec.model is not None:
            raise self._error("a second `model` statement", _span(tree.meta),
                              hint=f"the model is already named '{self.spec.model}' on line "
                                   f"{self.spec.model_span.line}; a spec holds one model")
        self.spec.model = str(name)
        self.spec.model_span = _span(name)

    def variable_decl(self, tree: Tree) -> None:
        kind_tree, name, family, dim = tree.children
        self.spec.variables.append(VariableDecl(
            kind=str(kind_tree.children[0]), name=str(name), family=str(family), dim=int(dim),
            span=_span(tree.meta), name_span=_span(name), family_span=_span(family)))

    def deterministic_decl(self, tree: Tree) -> None:
        name, index, cell, size, inputs = tree.children
        self.spec.deterministic.append(DeterministicDecl(
            name=str(name), cell=str(cell), size=int(size),
            inputs=tuple(self._reference(ref) for ref in inputs.children),
            span=_span(tree.meta), name_span=_span(name), cell_span=_span(cell),
            index=self._index(name, index, _span(name))))

    def dependency(self, tree: Tree) -> None:
        name, index, parents = tree.children
        self.spec.dependencies.append(Dependency(
            child=self._index(name, index, Span(name.line, name.column, index.meta.end_column + 1)),
            parents=tuple(self._reference(ref) for ref in parents.children),
            span=_span(tree.meta)))

    def guide_decl(self, tree: Tree) -> None:
        (name,) = tree.children
        self.spec.settings.append(Setting("guide", str(name), (), _span(tree.meta), _span(name)))

    def flow_decl(self, tree: Tree) -> None:
        name, *values = tree.children
        # `flow iaf` without brackets leaves None placeholders: the default sizes.
        self.spec.settings.append(Setting("flow", str(name),
                                          tuple(int(v) for v in values if v is not None),
                                          _span(tree.meta), _span(name)))

    def size_decl(self, tree: Tree) -> None:
        name, value = tree.children
        self.spec.settings.append(Setting("size", str(name), (int(value),), _span(tree.meta),
                                          _span(name)))

    def cell_decl(self, tree: Tree) -> None:
        group, *edges = tree.children
        if self.spec.cell is not None:
            raise self._error("a second `cell` statement", _span(tree.meta),
                              hint=f"the cell is already asserted on line "
                                   f"{self.spec.cell.span.line}")
        parsed = []
        for edge in edges:
            if edge is None:
                continue
            child, parent, order = edge.children
            if order is None:
                value: int | str | None = None
            elif str(order) == "all":
                value = "all"
            else:
                value = int(order)
            parsed.append(CellEdge(str(child), str(parent), value, _span(edge.meta)))
        self.spec.cell = CellAssertion(str(group), tuple(parsed), _span(tree.meta), _span(group))

    def _reference(self, tree: Tree) -> Reference:
        name, index = tree.children
        return self._index(name, index, _span(tree.meta))

    def _index(self, name: Token, index: Tree, span: Span) -> Reference:
        if index.data == "window":
            first, last = index.children
            oldest = self._step(first, allow_start=True)
            newest = self._step(last, allow_start=False)
            if oldest is not None and oldest < newest:
                raise self._error(f"window {name}[{_text(self.spec, index)}] runs backwards",
                                  _span(index.meta),
                                  hint="write the older step first, e.g. t-3:t-1")
        else:
            (step,) = index.children
            oldest = newest = self._step(step, allow_start=False)
        return Reference(str(name), oldest, newest, span, _span(name))

    def _step(self, step: Tree, allow_start: bool) -> int | None:
        if step.data == "step_now":
            return 0
        if step.data == "step_back":
            return int(step.children[0])
        if step.data == "step_ahead":
            return -int(step.children[0])

        value = int(step.children[0])
        if allow_start and value == 1:
            return None
        raise self._error(f"absolute step {value} is not supported", _span(step.meta),
                          hint="write steps relative to t (t, t-1, t-3:t-1); only the whole "
                               "history may start at step 1, as in 1:t-1")


def _text(spec: Spec, tree: Tree) -> str:
    return spec.line_text(tree.meta.line)[tree.meta.column - 1:tree.meta.end_column - 1]
