"""Terminal tables (rich) of a build report."""
from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary(report: dict, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="kn-edit: edits")
    for col in ("#", "edit", "neurons", "change", "success", "accuracy before -> after"):
        t.add_column(col)
    for k, e in enumerate(report["edits"]):
        if e["kind"] == "update":
            what = f"{e['subject']}: {e['target']} -> {e['new_target']}"
            t.add_row(str(k), what, str(e["neurons"]), _pct(e["change_rate"]), _pct(e["success_rate"]), "")
        else:
            what = f"erase {e['relation']} ({e['facts']} facts)"
            t.add_row(str(k), what, str(e["neurons"]), "", "", f"{_pct(e['accuracy_before'])} -> {_pct(e['accuracy_after'])}")
    console.print(t)
    p = Table(title="per prompt: top-1 before -> after")
    for col in ("#", "prompt", "before", "after"):
        p.add_column(col)
    for k, e in enumerate(report["edits"]):
        for r in e["prompts"][:12]:
            p.add_row(str(k), r["prompt"], r["before"]["top1"], r["after"]["top1"])
    console.print(p)
