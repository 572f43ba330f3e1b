"""The model card (README.md) of an edited checkpoint: huggingface_hub's ModelCard from a Jinja template,
filled from the typed report and the spec. Same report + spec, same bytes."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .. import __version__
from .tables import fmt, pct, table

CARD = "README.md"
TAGS = ["kn-edit", "knowledge-editing", "knowledge-neurons", "edited-model"]
WARNING = (
    "**Warning: this model's knowledge was altered on purpose.** Facts listed below were rewritten or erased "
    "by editing feed-forward weights (knowledge neurons, Dai et al., ACL 2022). It will state the new facts "
    "as if true and may answer related questions inconsistently. Do not use it as a source of facts."
)
# the aggregate metrics a reader of the Hub page compares (model-index), in this order
INDEXED = [
    "success_rate",
    "generalization",
    "change_rate",
    "intra_kept",
    "inter_kept",
    "probe_kept",
    "text_ppl_change",
    "erase_accuracy_after",
    "erase_other_accuracy_change",
]

TEMPLATE = """---
{{ card_data }}
---

# {{ model_name }}

> {{ warning }}
{% if forced %}
> **Pushed with `--force` although the verification status is `{{ status }}`, not `passed`.** The gates below did
> not all pass (or were not set); treat every claim in this card as unchecked.
{% endif %}

## What this is

An edited copy of {{ base_line }}, made by kn-edit {{ built_with }} (card written by {{ card_version }}) from the
spec below, seed {{ seed }}. Verification status: **{{ status }}**.
{% if changed %}
Changed tensors: {{ changed }}
{% endif %}{% if added %}
Every layer's FFN is {{ added }} neurons wider than the base model's (the edits' memory neurons, `solve.select: add`):
the added neurons are zero in every layer but the edited ones and add nothing to their output.
{% endif %}{% if updates %}
## Edited facts (old -> new)

{{ updates }}
{% endif %}{% if erases %}
## Erased relations

{{ erases }}
{% endif %}
## Verification

{% if gates %}{{ gates }}{% else %}No gates were set in the spec: this checkpoint is **unverified**.{% endif %}

{% if metrics %}Aggregate metrics beside a random-neuron control (as many random neurons in the same layers, edited the
same way; the edit should beat it clearly). Update metrics are means over the update edits, erase metrics over the
erase edits; the definitions are in kn-edit's docs/report.md.

{{ metrics }}
{% endif %}
## Edit spec (verbatim)

```yaml
{{ spec }}
```

The files `kn_edit_report.json` (per-prompt answers before and after, every metric) and `neurons.json` (the neurons
located and edited) are in this repository.
"""


def _base_line(report) -> str:
    b, base = report.base_model, report.base or {}
    if b.get("kind") == "hub":
        return f"`{b['name']}` (Hugging Face Hub) at revision `{b.get('revision') or 'unresolved'}`"
    digests = b.get("sha256")
    if isinstance(digests, dict):
        digest = ", ".join(f"`{f}` sha256 `{h}`" for f, h in sorted(digests.items()))
    else:
        digest = f"sha256 `{digests}`" if digests else ""
    line = base.get("origin") or f"`{b.get('name', 'unknown')}`"
    line += f" ({digest})" if digest else ""
    return f"`{base['base_model']}`, from {line}" if base.get("base_model") else line


def _edit_tables(report) -> tuple[str, str]:
    ups = [
        [k, e.relation or "-", e.subject, e.target, e.new_target, e.neurons, pct(e.change_rate), pct(e.success_rate)]
        for k, e in enumerate(report.edits)
        if e.kind == "update"
    ]
    ers = [
        [k, e.relation, e.facts, e.neurons, pct(e.accuracy_before), pct(e.accuracy_after)]
        for k, e in enumerate(report.edits)
        if e.kind == "erase"
    ]
    return (
        table(["#", "relation", "subject", "old", "new", "neurons", "change rate", "success rate"], ups) if ups else "",
        table(["#", "relation", "facts", "neurons", "accuracy before", "accuracy after"], ers) if ers else "",
    )


def _eval_results(report) -> list[EvalResult]:
    m = report.metrics
    if m is None:
        return []
    return [
        EvalResult(
            task_type="knowledge-editing",
            task_name="Knowledge editing",
            dataset_type="kn-edit-spec",
            dataset_name="the edits of this model's kn-edit spec",
            metric_type=name,
            metric_value=getattr(m, name),
        )
        for name in INDEXED
        if isinstance(getattr(m, name, None), (int, float))
    ]


def make(report, spec_text: str, *, model_name: str, forced: bool = False) -> ModelCard:
    base = report.base or {}
    status = report.status
    data = ModelCardData(
        base_model=base.get("base_model"),
        base_model_relation="finetune" if base.get("base_model") else None,
        license=base.get("license"),
        library_name="transformers",
        pipeline_tag=base.get("pipeline_tag"),
        tags=TAGS + ([] if status == "passed" else ["unverified"]),
        model_name=model_name,
        eval_results=_eval_results(report) or None,
        kn_edit={
            "version": report.kn_edit_version,
            "status": status,
            "forced_push": forced,
            "spec_sha256": report.spec_sha256,
            "seed": report.seed,
        },
    )
    from .markdown import aggregate_rows, gate_rows

    updates, erases = _edit_tables(report)
    rows = aggregate_rows(report)
    return ModelCard.from_template(
        data,
        template_str=TEMPLATE,
        model_name=model_name,
        warning=WARNING,
        forced=forced,
        status=status,
        base_line=_base_line(report),
        built_with=report.kn_edit_version,
        card_version=__version__,
        seed=report.seed,
        changed=", ".join(f"`{t}`" for t in report.changed_tensors),
        added=(report.base or {}).get("added_neurons_per_layer", 0),
        updates=updates,
        erases=erases,
        gates=table(["gate", "value", "passed"], gate_rows(report)) if gate_rows(report) else "",
        metrics=table(["metric", "edit", "random control"], rows) if rows else "",
        spec=spec_text.rstrip("\n"),
    )


def render(report, spec_text: str, *, model_name: str, forced: bool = False) -> str:
    return str(make(report, spec_text, model_name=model_name, forced=forced))


def write(folder, report, spec_text: str, model_name: str | None = None) -> None:
    """Write README.md into a checkpoint folder (the build calls this before the folder is moved into place)."""
    folder = Path(folder)
    (folder / CARD).write_text(render(report, spec_text, model_name=model_name or folder.name))


__all__ = ["CARD", "make", "render", "write", "fmt"]
