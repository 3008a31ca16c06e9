"""The exception hierarchy: every problem with a user's spec is a SpecError."""

from __future__ import annotations

import difflib
from collections.abc import Iterable
from dataclasses import dataclass


@dataclass(frozen=True)
class Location:
    """A position in a spec file; line and column count from 1."""

    path: str
    line: int | None = None
    column: int | None = None
    end_column: int | None = None


class DssmError(Exception):
    """Root of the exceptions this package raises for problems in user input."""


class SpecError(DssmError):
    """A spec that cannot be read, parsed, checked or compiled.

    :param str message: what is wrong, in one sentence.
    :param Location location: where it is wrong; line and column may be unknown.
    :param str hint: the likely fix, or None.
    :param str source_line: the text of the offending line, shown with a caret.
    """

    def __init__(self, message: str, location: Location, hint: str | None = None,
                 source_line: str | None = None):
        super().__init__(message)
        self.message = message
        self.location = location
        self.hint = hint
        self.source_line = source_line

    def format(self) -> str:
        """Render as `FILE:LINE:COL: error: MESSAGE`, the line, a caret and the hint."""
        loc = self.location
        position = loc.path
        if loc.line is not None:
            position += f":{loc.line}"
            if loc.column is not None:
                position += f":{loc.column}"
        lines = [f"{position}: error: {self.message}"]

        if self.source_line is not None and loc.column is not None:
            # One character per column, as the parser counts them: a tab is one
            # space and a control character one '?', so the caret lines up.
            text = self.source_line.rstrip("\r\n").replace("\t", " ")
            text = "".join(char if char.isprintable() else "?" for char in text)
            width = 1
            if loc.end_column is not None and loc.end_column > loc.column:
                width = loc.end_column - loc.column
            lines.append(f"    {text}")
            lines.append("    " + " " * (loc.column - 1) + "^" + "~" * (width - 1))

        if self.hint:
            lines.append(f"hint: {self.hint}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def did_you_mean(word: str, choices: Iterable[str]) -> str | None:
    """Return "did you mean 'X'?" for the closest choice, or None when none is close."""
    matches = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if not matches:
        lowered = {choice.lower(): choice for choice in choices}
        if word.lower() in lowered:
            matches = [lowered[word.lower()]]
    return f"did you mean '{matches[0]}'?" if matches else None
