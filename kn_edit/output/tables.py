"""Markdown tables and number formats, shared by report.md and the model card."""

from __future__ import annotations


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, bool):
        return "yes" if x else "no"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(header, rows) -> str:
    cell = lambda x: (x if isinstance(x, str) else fmt(x)).replace("|", "\\|").replace("\n", " ")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(x) for x in r) + " |" for r in rows]
    return "\n".join(lines)
