"""report.md and its figures (PNG, matplotlib Agg) in the checkpoint folder: for a person to read."""

from __future__ import annotations

from pathlib import Path

REPORT_MD = "report.md"
FIGURES = {"layers": "fig_layers.png", "probs": "fig_probs.png", "control": "fig_control.png"}
# aggregate metrics shown in tables and the control figure, in this order
SHOWN = [
    "change_rate",
    "success_rate",
    "generalization",
    "p_target_shift",
    "p_new_shift",
    "intra_ppl_before",
    "intra_ppl_after",
    "intra_ppl_change",
    "inter_ppl_before",
    "inter_ppl_after",
    "inter_ppl_change",
    "erase_accuracy_before",
    "erase_accuracy_after",
    "erase_ppl_change",
    "erase_other_accuracy_before",
    "erase_other_accuracy_after",
    "erase_other_ppl_change",
    "suppression",
    "amplification",
    "consistency",
]


def fmt(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    return str(x)


def aggregate_rows(report) -> list[tuple[str, str, str]]:
    """(metric, edit, random control) for the metrics that were measured."""
    m = report.metrics
    if m is None:
        return []
    c = m.control
    return [(k, fmt(getattr(m, k)), fmt(getattr(c, k) if c else None)) for k in SHOWN if getattr(m, k) is not None]


def _table(header, rows) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(x).replace("|", "\\|") for x in r) + " |" for r in rows]
    return "\n".join(lines)


def markdown(report, spec_text: str, figures: list[str]) -> str:
    """report: output.report.Report."""
    out = [
        f"# kn-edit report: {report.status}",
        "",
        f"Base model: `{report.base_model}`  ",
        f"kn-edit {report.kn_edit_version}, seed {report.seed}, device {report.device}, dtype {report.dtype}",
        "",
    ]
    results = report.gates.results if report.gates else []
    if results:
        out += [
            "## Gates",
            "",
            _table(
                ["gate", "value", "passed"],
                [(f"{r.name} {r.op} {r.threshold:g}", fmt(r.value), "yes" if r.passed else "**no**") for r in results],
            ),
            "",
        ]
    else:
        out += ["No gates set in the spec: the checkpoint is unverified (status `built`).", ""]
    out += ["## Aggregate (edit vs random-neuron control)", "", _table(["metric", "edit", "control"], aggregate_rows(report)), ""]
    ns = report.metrics.neurons if report.metrics else None
    if ns:
        out += [
            f"Neurons per located fact: {fmt(ns.neurons_per_fact)}; shared between two facts of the same relation: "
            f"{fmt(ns.overlap_same_relation)}, of different relations: {fmt(ns.overlap_other_relation)}.",
            "",
        ]
    for k, e in enumerate(report.edits):
        if e.kind == "update":
            rows = [
                (
                    r.prompt + (" (held out)" if r.held_out else ""),
                    f"{r.before.top1} -> {r.after.top1}",
                    f"{r.before.p_target:.3g} -> {r.after.p_target:.3g}",
                    f"{r.before.p_new_target:.3g} -> {r.after.p_new_target:.3g}",
                )
                for r in e.prompts
            ]
            header = ["prompt", "top-1", "p(target)", "p(new target)"]
        else:
            rows = [
                (r.prompt, f"{r.before.top1} -> {r.after.top1}", f"{r.before.p_target:.3g} -> {r.after.p_target:.3g}")
                for r in e.prompts
            ]
            header = ["prompt", "top-1", "p(target)"]
        out += [f"## Edit {k}: {e.title} ({e.neurons} neurons)", "", _table(header, rows), ""]
        if e.metrics:
            m = e.metrics.model_dump(exclude_unset=True)
            c = e.control.model_dump(exclude_unset=True) if e.control else {}
            out += [_table(["metric", "edit", "control"], [(n, fmt(v), fmt(c.get(n))) for n, v in m.items()]), ""]
    if figures:
        out += ["## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures] + [""]
    out += ["## Spec", "", "```yaml", spec_text.rstrip(), "```", ""]
    return "\n".join(out)


def figures(folder: Path, report, neurons_doc) -> list[str]:
    """Write the PNGs; [] when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    matplotlib.rcParams["svg.hashsalt"] = "kn-edit"
    written = []

    layers = {}
    for e in neurons_doc.edits:
        for l, _ in e.edited:
            layers[l] = layers.get(l, 0) + 1
    fig, ax = plt.subplots(figsize=(6, 3))
    ax.bar(list(layers), list(layers.values()))
    ax.set(xlabel="layer", ylabel="edited neurons", title="layer distribution of the edited neurons")
    written.append(_save(fig, folder, FIGURES["layers"]))

    ups = [e for e in report.edits if e.kind == "update"]
    if ups:
        fig, ax = plt.subplots(figsize=(max(4, 1.6 * len(ups)), 3))
        keys = [("before", "p_target"), ("after", "p_target"), ("before", "p_new_target"), ("after", "p_new_target")]
        for j, (when, p) in enumerate(keys):
            vals = [sum(getattr(getattr(r, when), p) for r in e.prompts) / len(e.prompts) for e in ups]
            ax.bar([i + 0.2 * j for i in range(len(ups))], vals, width=0.2, label=f"{p} {when}")
        ax.set_xticks([i + 0.3 for i in range(len(ups))], [f"{e.subject}" for e in ups])
        ax.set(ylabel="mean probability", title="old and new target, before/after")
        ax.legend(fontsize=7)
        written.append(_save(fig, folder, FIGURES["probs"]))

    rows = [(k, float(a), float(c)) for k, a, c in aggregate_rows(report) if c != "-" and a != "-"]
    if rows:
        fig, ax = plt.subplots(figsize=(7, 0.35 * len(rows) + 1))
        y = list(range(len(rows)))
        ax.barh([i - 0.2 for i in y], [r[1] for r in rows], height=0.4, label="edit")
        ax.barh([i + 0.2 for i in y], [r[2] for r in rows], height=0.4, label="random control")
        ax.set_yticks(y, [r[0] for r in rows])
        ax.invert_yaxis()
        ax.set(title="edit vs random-neuron control")
        ax.legend(fontsize=7)
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
