"""report.md and its figures (PNG, matplotlib Agg) in the checkpoint folder: for a person to read."""

from __future__ import annotations

import textwrap
from pathlib import Path

from .tables import fmt, table

REPORT_MD = "report.md"
FIGURES = {"layers": "fig_layers.png", "probs": "fig_probs.png", "control": "fig_control.png"}
# aggregate metrics shown in tables, in this order
SHOWN = [
    "change_rate", "success_rate", "efficacy", "generalization", "p_target_shift", "p_new_shift",
    "intra_kept", "intra_right_kept", "intra_ppl_before", "intra_ppl_after", "intra_ppl_change",
    "inter_kept", "inter_right_kept", "inter_ppl_before", "inter_ppl_after", "inter_ppl_change",
    "erase_accuracy_before", "erase_accuracy_after", "erase_ppl_change",
    "erase_other_accuracy_before", "erase_other_accuracy_after", "erase_other_ppl_change",
    "text_ppl_before", "text_ppl_after", "text_ppl_change", "probe_kept",
    "suppression", "amplification", "consistency",
]  # fmt: skip
# the control figure: one panel per unit
RATES = ["success_rate", "efficacy", "generalization", "change_rate", "intra_kept", "inter_kept", "probe_kept",
         "erase_accuracy_after", "erase_other_accuracy_after"]  # fmt: skip
CHANGES = ["intra_ppl_change", "inter_ppl_change", "text_ppl_change", "erase_ppl_change", "erase_other_ppl_change"]


def aggregate_rows(report) -> list[tuple[str, str, str]]:
    """(metric, edit, random control) for the metrics that were measured."""
    m = report.metrics
    if m is None:
        return []
    c = m.control
    return [
        (k, fmt(getattr(m, k, None)), fmt(getattr(c, k, None) if c else None)) for k in SHOWN if getattr(m, k, None) is not None
    ]


def gate_rows(report) -> list[tuple[str, str, str]]:
    return [(f"{r.name} {r.op} {r.threshold:g}", fmt(r.value), "yes" if r.passed else "**no**")
            for r in (report.gates.results if report.gates else [])]  # fmt: skip


def markdown(report, spec_text: str, figures: list[str]) -> str:
    """report: output.report.Report."""
    out = [f"# kn-edit report: {report.status}", "",
           f"Base model: `{report.base_model}`  ", f"kn-edit {report.kn_edit_version}, seed {report.seed}, "
           f"device {report.device}, dtype {report.dtype}", ""]  # fmt: skip
    if gate_rows(report):
        out += ["## Gates", "", table(["gate", "value", "passed"], gate_rows(report)), ""]
    else:
        out += ["No gates set in the spec: the checkpoint is unverified (status `built`).", ""]
    n_up = sum(e.kind == "update" for e in report.edits)
    n_er = len(report.edits) - n_up
    out += ["## Aggregate (edit vs random-neuron control)", "",
            f"Update metrics are means over the {n_up} update edit(s), `erase_` metrics over the {n_er} erase edit(s); "
            "every edit's own numbers are in its section below.", "",
            table(["metric", "edit", "control"], aggregate_rows(report)), ""]  # fmt: skip
    ns = report.metrics.neurons if report.metrics else None
    if ns:
        out += [f"Neurons per located fact: {fmt(ns.neurons_per_fact)}; shared between two facts of the same relation: "
                f"{fmt(ns.overlap_same_relation)}, of different relations: {fmt(ns.overlap_other_relation)}.", ""]  # fmt: skip
    for k, e in enumerate(report.edits):
        if e.kind == "update":
            rows = [(r.prompt + (" (held out)" if r.held_out else ""), f"{r.before.shown} -> {r.after.shown}",
                     f"{r.before.p_target:.3g} -> {r.after.p_target:.3g}",
                     f"{r.before.p_new_target:.3g} -> {r.after.p_new_target:.3g}") for r in e.prompts]  # fmt: skip
            header = ["prompt", "top-1", "p(target)", "p(new target)"]
        else:
            rows = [(r.prompt, f"{r.before.shown} -> {r.after.shown}", f"{r.before.p_target:.3g} -> {r.after.p_target:.3g}")
                    for r in e.prompts]  # fmt: skip
            header = ["prompt", "top-1", "p(target)"]
        out += [f"## Edit {k}: {e.title} ({e.neurons} neurons)", "", table(header, rows), ""]
        if e.metrics:
            m = e.metrics.model_dump(exclude_unset=True)
            c = e.control.model_dump(exclude_unset=True) if e.control else {}
            out += [table(["metric", "edit", "control"], [(n, fmt(v), fmt(c.get(n))) for n, v in m.items()]), ""]
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    out += ["## Spec", "", "```yaml", spec_text.rstrip(), "```", ""]
    return "\n".join(out)


def _short(text: str, n: int = 28) -> str:
    return textwrap.shorten(text, n, placeholder="...")


def figures(folder: Path, report, neurons_doc) -> list[str]:
    """Write the PNGs; [] when matplotlib is not installed. Each answers one question:
    where are the edited neurons (per edit, over all layers), did the probabilities move, and does
    the edit beat random neurons (one panel per unit)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    written = []
    edits = [(k, e, d) for k, (e, d) in enumerate(zip(report.edits, neurons_doc.edits, strict=True)) if d.edited]

    n_layers = (report.base or {}).get("layers") or 1 + max((l for _, _, d in edits for l, _ in d.edited), default=0)
    if edits:
        fig, ax = plt.subplots(figsize=(max(6, 0.25 * n_layers + 2), 3.2))
        bottom = [0] * n_layers
        for k, e, d in edits:
            counts = [sum(1 for l, _ in d.edited if l == layer) for layer in range(n_layers)]
            ax.bar(range(n_layers), counts, bottom=bottom, label=f"{k}: {_short(e.title)}")
            bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
        ax.set(xlabel="layer", ylabel="neurons written", title="Where the edits wrote: neurons per layer, by edit",
               xlim=(-0.6, n_layers - 0.4))  # fmt: skip
        ax.set_xticks(range(0, n_layers, max(1, n_layers // 15)))
        if len(edits) <= 12:
            ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        written.append(_save(fig, folder, FIGURES["layers"]))

    ups = [e for e in report.edits if e.kind == "update"]
    if ups:
        fig, ax = plt.subplots(figsize=(max(5, 1.3 * len(ups) + 3), 3.4))
        series = [("before", "p_target", "old target, before", "#9ecae1"), ("after", "p_target", "old target, after", "#3182bd"),
                  ("before", "p_new_target", "new target, before", "#fdae6b"), ("after", "p_new_target", "new target, after", "#e6550d")]  # fmt: skip
        for j, (when, p, label, colour) in enumerate(series):
            vals = [sum(getattr(getattr(r, when), p) for r in e.prompts) / len(e.prompts) for e in ups]
            ax.bar([i + 0.2 * (j - 1.5) for i in range(len(ups))], vals, width=0.2, label=label, color=colour)
        ax.set_xticks(range(len(ups)), [_short(f"{e.subject}: {e.new_target}", 22) for e in ups], fontsize=7,
                      rotation=30 if len(ups) > 4 else 0, ha="right" if len(ups) > 4 else "center")  # fmt: skip
        ax.set(ylabel="mean p over the edit's prompts", ylim=(0, 1),
               title="Did the answers move?")  # fmt: skip
        ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1))
        written.append(_save(fig, folder, FIGURES["probs"]))

    m = report.metrics
    if m is not None and m.control is not None:
        panels = []
        for names, label, title in (
            (RATES, "share of prompts", "rates"),
            (CHANGES, "relative change (after / before - 1)", "perplexity"),
        ):
            rows = [(n, getattr(m, n, None), getattr(m.control, n, None)) for n in names]
            rows = [r for r in rows if r[1] is not None and r[2] is not None]
            if rows:
                panels.append((rows, label, title))
        if panels:
            fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels) + 1, 0.45 * max(len(p[0]) for p in panels) + 1.6),
                                     squeeze=False)  # fmt: skip
            for ax, (rows, label, title) in zip(axes[0], panels, strict=True):
                y = list(range(len(rows)))
                ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, label="edit", color="#e6550d")
                ax.barh([i + 0.2 for i in y], [r[2] for r in rows], height=0.4, label="random neurons", color="#969696")
                ax.set_yticks(y, [r[0] for r in rows], fontsize=8)
                ax.invert_yaxis()
                ax.axvline(0, color="black", linewidth=0.6)
                ax.set(xlabel=label, title=title)
                if title == "rates":
                    ax.set_xlim(0, 1.05)
            axes[0][-1].legend(fontsize=7, loc="lower right")
            fig.suptitle("Does the edit beat random neurons? (edited vs the same number of random neurons)", fontsize=9)
            written.append(_save(fig, folder, FIGURES["control"]))
    return written


def _save(fig, folder: Path, name: str) -> str:
    fig.tight_layout()
    # no timestamp in the PNG metadata: same spec + model + seed, same bytes
    fig.savefig(folder / name, dpi=100, metadata={"Software": None})
    import matplotlib.pyplot as plt

    plt.close(fig)
    return name


def write(folder: Path, report, neurons_doc, spec_text: str) -> None:
    folder = Path(folder)
    figs = figures(folder, report, neurons_doc)
    (folder / REPORT_MD).write_text(markdown(report, spec_text, figs))
