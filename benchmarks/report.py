"""docs/benchmarks.md: sections of Markdown, each written by one benchmark."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> list[str]:
    """A Markdown table; cells are rendered with ``str``."""
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    for row in rows:
        if len(row) != len(headers):
            raise ValueError(f"row {row!r} has {len(row)} cells for {len(headers)} headers")
        lines.append("| " + " | ".join(str(cell) for cell in row) + " |")
    return lines


@dataclass
class Section:
    """One benchmark's part of the report."""

    title: str
    lines: list[str] = field(default_factory=list)
    goals: list[list[str]] = field(default_factory=list)

    def goal_table(self, rows: Sequence[Sequence[str]]) -> None:
        """A table of goals (goal, measured, verdict); they also go to the report's summary."""
        self.goals += [list(r) for r in rows]
        self.table(["goal", "measured", "verdict"], rows)

    def para(self, *text: str) -> None:
        """A paragraph (the pieces are joined with spaces)."""
        self.lines += [" ".join(text), ""]

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
        """A table followed by a blank line."""
        self.lines += [*table(headers, rows), ""]

    def code(self, text: str, lang: str = "") -> None:
        """A fenced block."""
        self.lines += [f"```{lang}", *text.rstrip("\n").splitlines(), "```", ""]


@dataclass
class Report:
    """The whole document: a title, a preamble, then the sections in the order added."""

    title: str
    preamble: list[str] = field(default_factory=list)
    sections: list[Section] = field(default_factory=list)

    def section(self, title: str) -> Section:
        """Start a new section and return it."""
        section = Section(title)
        self.sections.append(section)
        return section

    def render(self) -> str:
        """The document as Markdown."""
        lines = [f"# {self.title}", "", *self.preamble]
        goals = [[s.title, *g] for s in self.sections for g in s.goals]
        if goals:
            lines += ["## Summary", "", *table(["area", "goal", "measured", "verdict"], goals), ""]
        for s in self.sections:
            lines += [f"## {s.title}", "", *s.lines]
        return "\n".join(lines).rstrip("\n") + "\n"

    def write(self, path: Path) -> None:
        """Write the document, creating its folder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(self.render(), encoding="utf-8")
