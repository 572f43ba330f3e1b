"""The model card (README.md) of an edited checkpoint, built from its report and spec.

It shows what the report holds: sections the report lacks (metrics, gates, controls) are left
out rather than guessed. Rendering is deterministic: same report + spec, same bytes."""

from __future__ import annotations

import json
from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__

CARD = "README.md"
TAGS = ["kn-edit", "knowledge-editing", "knowledge-neurons", "edited-model"]
WARNING = (
    "**Warning: this model's knowledge was altered on purpose.** Facts listed below were rewritten or erased "
    "by editing feed-forward weights (knowledge neurons, Dai et al., ACL 2022). It will state the new facts "
    "as if true and may answer related questions inconsistently. Do not use it as a source of facts."
)


def _pct(x) -> str:
    return f"{100 * x:.1f}%" if isinstance(x, (int, float)) and not isinstance(x, bool) else _cell(x)


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.4g}"
    if isinstance(x, (dict, list)):
        x = json.dumps(x, sort_keys=True)
    return str(x).replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) if not isinstance(c, str) else c.replace("|", "\\|") for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _flatten(obj, prefix="") -> list[tuple[str, object]]:
    """(dotted key, leaf value) pairs of a nested report section, in order."""
    if isinstance(obj, dict):
        return [kv for k, v in obj.items() for kv in _flatten(v, f"{prefix}.{k}" if prefix else str(k))]
    if isinstance(obj, list) and obj and all(isinstance(v, dict) for v in obj):
        return [kv for i, v in enumerate(obj) for kv in _flatten(v, f"{prefix}[{i}]")]
    return [(prefix, obj)]


def _base_model(report: dict) -> tuple[str | None, str]:
    """(Hub id for the metadata or None, a one-line description of the base model)."""
    b = report.get("base_model") or {}
    kind, name = b.get("kind"), b.get("name") or b.get("package") or "unknown"
    if kind == "hub":
        return name, f"`{name}` (Hub) at revision `{b.get('revision') or 'unresolved'}`"
    extra = ", ".join(f"{k} `{v}`" for k, v in sorted(b.items()) if k not in ("kind", "name") and not isinstance(v, dict))
    if isinstance(b.get("sha256"), dict):
        extra = ", ".join(f"`{f}` sha256 `{h}`" for f, h in sorted(b["sha256"].items()))
    return None, f"`{name}` ({kind or 'local'}{'; ' + extra if extra else ''})"


def _edit_rows(report: dict):
    updates, erases = [], []
    for k, e in enumerate(report.get("edits") or []):
        if e.get("kind") == "update":
            updates.append(
                [
                    k,
                    e.get("relation") or "-",
                    e.get("subject"),
                    e.get("target"),
                    e.get("new_target"),
                    e.get("neurons"),
                    _pct(e.get("change_rate")),
                    _pct(e.get("success_rate")),
                ]
            )
        elif e.get("kind") == "erase":
            erases.append(
                [
                    k,
                    e.get("relation"),
                    e.get("facts"),
                    e.get("neurons"),
                    _pct(e.get("accuracy_before")),
                    _pct(e.get("accuracy_after")),
                ]
            )
    return updates, erases


def _eval_results(report: dict) -> list[EvalResult]:
    """model-index entries: the paper's per-edit metrics, and numeric top-level verification metrics."""
    out = []
    for k, e in enumerate(report.get("edits") or []):
        if e.get("kind") == "update":
            name, metrics = (
                f"edit {k}: {e.get('subject')} {e.get('target')} -> {e.get('new_target')}",
                ("success_rate", "change_rate"),
            )
        else:
            name, metrics = f"edit {k}: erase {e.get('relation')}", ("accuracy_before", "accuracy_after")
        for m in metrics:
            if isinstance(e.get(m), (int, float)):
                out.append(
                    EvalResult(
                        task_type="knowledge-editing",
                        task_name="Knowledge editing",
                        dataset_type="kn-edit-spec",
                        dataset_name=name,
                        dataset_config=f"edit-{k}",
                        metric_type=m,
                        metric_value=e[m],
                    )
                )
    for key, v in _flatten(report.get("metrics") or {}):
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            out.append(
                EvalResult(
                    task_type="knowledge-editing",
                    task_name="Knowledge editing",
                    dataset_type="kn-edit-verification",
                    dataset_name="kn-edit verification",
                    metric_type=key,
                    metric_value=v,
                )
            )
    return out


def make(report, spec_text: str, *, model_name: str, forced: bool = False) -> ModelCard:
    report = report.model_dump(mode="json", exclude_unset=True)
    hub_id, base_line = _base_model(report)
    status = report.get("status", "unknown")
    evals = _eval_results(report)
    data = ModelCardData(
        base_model=hub_id,
        base_model_relation="finetune" if hub_id else None,
        library_name="transformers",
        tags=TAGS + ([] if status == "passed" else ["unverified"]),
        model_name=model_name,
        eval_results=evals or None,
        kn_edit={
            "version": report.get("kn_edit_version", __version__),
            "status": status,
            "forced_push": forced,
            "spec_sha256": report.get("spec_sha256"),
            "seed": report.get("seed"),
        },
    )
    parts = [f"# {model_name}", "", f"> {WARNING}", ""]
    if forced:
        parts += [
            f"> **Pushed with `--force` although the verification status is `{status}`, not `passed`.** "
            "The gates below did not all pass (or were not set); treat every claim in this card as unchecked.",
            "",
        ]
    parts += [
        "## What this is",
        "",
        f"An edited copy of {base_line}, made by kn-edit {report.get('kn_edit_version', __version__)} "
        f"(card written by {__version__}) from the spec below, seed {report.get('seed')}. "
        f"Verification status: **{status}**.",
        "",
    ]
    if report.get("changed_tensors"):
        parts += ["Changed tensors: " + ", ".join(f"`{t}`" for t in report["changed_tensors"]), ""]
    updates, erases = _edit_rows(report)
    if updates:
        parts += [
            "## Edited facts (old -> new)",
            "",
            _table(["#", "relation", "subject", "old", "new", "neurons", "change rate", "success rate"], updates),
            "",
        ]
    if erases:
        parts += [
            "## Erased relations",
            "",
            _table(["#", "relation", "facts", "neurons", "accuracy before", "accuracy after"], erases),
            "",
        ]
    parts += _verification(report)
    parts += [
        "## Edit spec (verbatim)",
        "",
        "```yaml",
        spec_text.rstrip("\n"),
        "```",
        "",
        "The files `kn_edit_report.json` (full per-prompt results) and `neurons.json` (the neurons edited) "
        "are in this repository.",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(parts))


def _verification(report: dict) -> list[str]:
    out = []
    gates = (report.get("gates") or {}).get("results")
    if gates:
        rows = [[f"{r['name']} {r['op']} {r['threshold']:g}", r["value"], "yes" if r["passed"] else "**no**"] for r in gates]
        out += ["## Verification gates", "", _table(["gate", "value", "passed"], rows), ""]
    metrics = report.get("metrics")
    if metrics:
        flat = _flatten(metrics)
        control = [(k, v) for k, v in flat if "control" in k.lower() or "random" in k.lower()]
        main = [(k, v) for k, v in flat if (k, v) not in control]
        out += ["## Verification metrics", "", _table(["metric", "value"], [[k, v] for k, v in main]), ""]
        if control:
            out += [
                "### Random-neuron control",
                "",
                "The same number of randomly chosen neurons, edited the same way; the edit should beat it clearly.",
                "",
                _table(["metric", "value"], [[k, v] for k, v in control]),
                "",
            ]
    if not gates and not metrics:
        out += ["## Verification", "", "No verification gates or metrics in the report: this checkpoint is unverified.", ""]
    return out


def render(report, spec_text: str, *, model_name: str, forced: bool = False) -> str:
    return str(make(report, spec_text, model_name=model_name, forced=forced))


def write(folder, report, spec_text: str, model_name: str | None = None) -> None:
    """Write README.md into a checkpoint folder (the build calls this before the folder is moved into place)."""
    folder = Path(folder)
    (folder / CARD).write_text(render(report, spec_text, model_name=model_name or folder.name))
