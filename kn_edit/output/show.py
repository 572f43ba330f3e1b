"""Terminal tables (rich) of a report (output.report.Report)."""

from __future__ import annotations

from rich.console import Console
from rich.table import Table


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def summary(report, console: Console | None = None) -> None:
    console = console or Console()
    t = Table(title="kn-edit: edits")
    for col in ("#", "edit", "neurons", "change", "success", "accuracy before -> after"):
        t.add_column(col)
    for k, e in enumerate(report.edits):
        if e.kind == "update":
            t.add_row(str(k), e.title, str(e.neurons), _pct(e.change_rate), _pct(e.success_rate), "")
        else:
            what = f"erase {e.relation} ({e.facts} facts)"
            t.add_row(str(k), what, str(e.neurons), "", "", f"{_pct(e.accuracy_before)} -> {_pct(e.accuracy_after)}")
    console.print(t)
    p = Table(title="per prompt: top-1 before -> after")
    for col in ("#", "prompt", "before", "after"):
        p.add_column(col)
    for k, e in enumerate(report.edits):
        for r in e.prompts[:12]:
            p.add_row(str(k), r.prompt, r.before.shown, r.after.shown)
    console.print(p)


def aggregate(report, console: Console | None = None) -> None:
    """The aggregate metrics beside the random-neuron control, then the gates."""
    from .markdown import aggregate_rows

    console = console or Console()
    t = Table(title="kn-edit: aggregate metrics (edit vs random-neuron control)")
    for col in ("metric", "edit", "control"):
        t.add_column(col)
    for row in aggregate_rows(report):
        t.add_row(*row)
    console.print(t)
    results = report.gates.results if report.gates else []
    if not results:
        console.print("no gates set: status [bold]built[/bold] (unverified)")
        return
    g = Table(title=f"gates: {report.status}")
    for col in ("gate", "value", "passed"):
        g.add_column(col)
    for r in results:
        value = "not measured" if r.value is None else f"{r.value:.4g}"
        g.add_row(f"{r.name} {r.op} {r.threshold:g}", value, "yes" if r.passed else "[red]no[/red]")
    console.print(g)
