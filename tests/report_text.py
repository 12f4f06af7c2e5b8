"""Reading the report's markdown back in tests (shared by the report test modules)."""

from __future__ import annotations


def table(text: str, heading: str) -> tuple[list[str], dict[str, list[str]]]:
    """The first markdown table from ``heading`` on (``heading`` may be the start of its header row):
    the header cells and ``{first cell: row cells}``."""
    text = text[text.index(heading):]
    rows = []
    for ln in text.splitlines()[0 if heading.startswith("|") else 1:]:
        if ln.startswith("|"):
            rows.append([c.strip() for c in ln.strip().strip("|").split(" | ")])
        elif rows:
            break
    return rows[0], {r[0]: r for r in rows[2:]}
