"""The typed report (`kn_edit_report.json`) and the neuron file (`neurons.json`): built once from the
edit records, written here, and read back by verify, push, the model card, report.md and the terminal.

Fields that do not apply are absent rather than null (an erase has no `new_target`, a fixed-scale
update no `scale_reached`); null means "measured nothing" (docs/report.md). `kn-edit schema --report`
prints the JSON schema.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from .. import __version__
from ..errors import InputError
from ..measure.metrics import failed
from ..model import arch

REPORT = "kn_edit_report.json"
NEURONS = "neurons.json"
SPEC_COPY = "kn_edit_spec.yaml"
SCHEMA_VERSION = 2
NEURONS_SCHEMA_VERSION = 1


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")

    def to_json(self) -> str:
        # json.dumps (not model_dump_json): floats written exactly as earlier versions wrote them
        return json.dumps(self.model_dump(mode="json", exclude_unset=True), indent=1) + "\n"


Value = float | int | None


class Answer(_Model):
    top1: str
    top1_id: int
    p_target: float  # of the whole target (a sequence probability when it has several tokens)
    p_new_target: float | None = None
    continuation: str | None = None  # the greedy continuation, as long as the longest target, when that is > 1 token

    @property
    def shown(self) -> str:
        return self.continuation if self.continuation is not None else self.top1


class PromptRow(_Model):
    subject: str
    target: str
    prompt: str
    before: Answer
    after: Answer
    held_out: bool = False


class EditMetrics(_Model):
    """Per edit (docs/report.md); an update has the update keys, an erase the erase keys."""

    change_rate: Value = None
    success_rate: Value = None
    efficacy: Value = None
    generalization: Value = None
    p_target_shift: Value = None
    p_new_shift: Value = None
    intra_kept: Value = None
    intra_right_kept: Value = None
    intra_ppl_before: Value = None
    intra_ppl_after: Value = None
    intra_ppl_change: Value = None
    inter_kept: Value = None
    inter_right_kept: Value = None
    inter_ppl_before: Value = None
    inter_ppl_after: Value = None
    inter_ppl_change: Value = None
    accuracy_before: Value = None
    accuracy_after: Value = None
    accuracy_change: Value = None
    ppl_before: Value = None
    ppl_after: Value = None
    ppl_change: Value = None
    other_accuracy_before: Value = None
    other_accuracy_after: Value = None
    other_accuracy_change: Value = None
    other_ppl_before: Value = None
    other_ppl_after: Value = None
    other_ppl_change: Value = None
    suppression: Value = None
    amplification: Value = None
    consistency: Value = None
    neurons: int | None = None


class EditReport(_Model):
    kind: Literal["update", "erase"]
    relation: str
    where: str
    neurons: int
    share: float
    # update
    subject: str | None = None
    target: str | None = None
    new_target: str | None = None
    dropped_shared: int | None = None
    rule: str | None = None
    lambda1: float | None = None
    lambda2: float | None = None
    sign_aware: bool | None = None
    scale: float | None = None
    norm_cap: float | None = None
    scale_searched: bool | None = None
    scale_reached: bool | None = None
    change_rate: float | None = None
    success_rate: float | None = None
    # erase
    facts: int | None = None
    accuracy_before: float | None = None
    accuracy_after: float | None = None
    skipped: dict[str, int] | None = None
    prompts: list[PromptRow]
    metrics: EditMetrics | None = None
    control: EditMetrics | None = None
    held_out: int = 0
    failed: bool | None = None  # did not hold on its own prompts (metrics.failed)

    @property
    def title(self) -> str:
        return f"{self.subject}: {self.target} -> {self.new_target}" if self.kind == "update" else f"erase {self.relation}"


class NeuronStats(_Model):
    neurons_per_fact: float | None = None
    layers: dict[str, int] = Field(default_factory=dict)
    overlap_same_relation: float | None = None
    overlap_other_relation: float | None = None


class Aggregate(EditMetrics):
    """Means over update edits (the update keys), over erase edits (erase_ + the erase keys),
    over all edits (suppression, amplification, consistency)."""

    erase_accuracy_before: Value = None
    erase_accuracy_after: Value = None
    erase_accuracy_change: Value = None
    erase_ppl_before: Value = None
    erase_ppl_after: Value = None
    erase_ppl_change: Value = None
    erase_other_accuracy_before: Value = None
    erase_other_accuracy_after: Value = None
    erase_other_accuracy_change: Value = None
    erase_other_ppl_before: Value = None
    erase_other_ppl_after: Value = None
    erase_other_ppl_change: Value = None
    success_over_control: Value = None
    edits_failed: Value = None
    text_ppl_before: Value = None
    text_ppl_after: Value = None
    text_ppl_change: Value = None
    probe_prompts: int | None = None
    probe_kept: Value = None
    neurons: NeuronStats | None = None  # type: ignore[assignment]
    control: Aggregate | None = None


class GateResult(_Model):
    name: str
    op: str
    threshold: float
    value: float | None
    passed: bool
    safety: bool = False  # one of the default checks (verify.safety), not a gate of the spec


class Gates(_Model):
    results: list[GateResult] = Field(default_factory=list)
    passed: bool = True


class Report(_Model):
    schema_version: int = SCHEMA_VERSION
    kn_edit_version: str
    status: Literal["built", "passed", "failed"]
    base_model: dict
    base: dict | None = None  # for the model card: base_model (Hub id), license, origin, pipeline_tag, layers
    spec_sha256: str
    seed: int
    device: str
    dtype: str
    method: dict
    changed_tensors: list[str]
    edits: list[EditReport]
    metrics: Aggregate | None = None
    gates: Gates | None = None
    warnings: list[str] = Field(default_factory=list)
    pararel: str | None = None  # the PARAREL directory read (source: pararel edits, solve.pararel_facts)
    verified_from: str | None = None

    @classmethod
    def read(cls, path) -> Report:
        return _read(cls, path)

    def failed_gates(self) -> list[GateResult]:
        return [r for r in (self.gates.results if self.gates else []) if not r.passed]


# ---- neurons.json ---------------------------------------------------------------------------


class NeuronEntry(_Model):
    layer: int
    index: int
    score: float
    activation: float


class FactNeurons(_Model):
    subject: str
    target: str
    share: float
    prompts: list[str]
    coarse_counts: list[int]
    coarse: list[list[list[int]]]
    neurons: list[NeuronEntry]


class EditNeurons(_Model):
    kind: str
    relation: str
    edited: list[list[int]]
    written: dict | None = None
    facts: list[FactNeurons]


class NeuronsDoc(_Model):
    schema_version: int = NEURONS_SCHEMA_VERSION
    edits: list[EditNeurons]

    @classmethod
    def read(cls, path) -> NeuronsDoc:
        return _read(cls, path)


def _read(cls, path):
    """A JSON document of the checkpoint; anything unreadable is bad input, said in one line."""
    try:
        return cls.model_validate_json(Path(path).read_bytes())
    except (OSError, ValueError, RecursionError) as e:
        why = e.strerror if isinstance(e, OSError) else " ".join(str(e).split())[:300]
        raise InputError(f"{path}: cannot read it as a kn-edit {cls.__name__}: {why}") from None


# ---- built from the edit records --------------------------------------------------------------

HOW = ("rule", "lambda1", "lambda2", "sign_aware", "scale", "norm_cap")


def written_dict(w) -> dict:
    return {k: getattr(w, k) for k in HOW}


def _answer(seen, tok, ids, target_ids, new_ids) -> Answer:
    tops, probs = seen[ids]
    top = tops[1][0]
    word = tok.decode([top])
    a = {"top1": word.strip() or repr(word), "top1_id": top, "p_target": probs[target_ids]}
    if new_ids is not None:
        a["p_new_target"] = probs[new_ids]
    longest = tops[max(tops)]
    if len(longest) > 1:
        a["continuation"] = tok.decode(list(longest)).strip()
    return Answer(**a)


def _rows(e, tok, before, after) -> list[PromptRow]:
    rows = []
    for f in e.shown:
        n = len(f.prompts)
        for j, p in enumerate(f.prompts):
            held = e.kind == "update" and j >= n - e.held_out
            rows.append(
                PromptRow(
                    subject=f.subject,
                    target=f.target,
                    prompt=p.text,
                    before=_answer(before, tok, p.ids, f.target_ids, e.new_ids),
                    after=_answer(after, tok, p.ids, f.target_ids, e.new_ids),
                    held_out=held,
                )
            )
    return rows


def _metrics(d: dict | None) -> EditMetrics | None:
    return None if d is None else EditMetrics(**d)


def edit_report(e, tok, before, after) -> EditReport:
    rows = _rows(e, tok, before, after)
    m = e.result.metrics
    fields = dict(kind=e.kind, relation=e.relation, where=e.where, neurons=len(e.neurons), share=e.located[0].share)
    if e.kind == "update":
        w = e.written
        fields.update(
            subject=e.fact.subject,
            target=e.fact.target,
            new_target=e.new_target,
            dropped_shared=len(e.dropped_shared),
            **written_dict(w),
            scale_searched=w.scale_searched,
        )
        if w.scale_searched:
            fields["scale_reached"] = w.scale_reached
        fields.update(change_rate=m["change_rate"], success_rate=m["success_rate"])
    else:
        fields.update(facts=len(e.facts), accuracy_before=m["accuracy_before"], accuracy_after=m["accuracy_after"])
    if e.skipped is not None:
        fields["skipped"] = e.skipped
    return EditReport(
        **fields,
        prompts=rows,
        metrics=_metrics(m),
        control=_metrics(e.result.control),
        held_out=e.held_out if e.kind == "update" else 0,
        failed=failed(e.kind, m),
    )


def aggregate_model(agg: dict) -> Aggregate:
    agg = dict(agg)
    control = agg.pop("control", None)
    return Aggregate(**agg, control=Aggregate(**control) if control is not None else None)


def make(batch, model, edits, before, after, agg: dict, gate_doc: dict, status: str, *, seed, device, dtype) -> Report:
    changed = {arch.value_param_name(model, l) for e in edits for l, _ in e.neurons}
    changed |= {
        name(model, l) for e in edits if e.keys for l, _ in e.keys for name in (arch.gate_param_name, arch.key_param_name)
    }
    changed = sorted(changed)
    return Report(
        schema_version=SCHEMA_VERSION,
        kn_edit_version=__version__,
        status=status,
        base_model=batch.source.identity,
        base=base_info(batch, model),
        spec_sha256=hashlib.sha256(batch.text.encode()).hexdigest(),
        seed=seed,
        device=device,
        dtype=dtype,
        method=batch.spec.method.model_dump(mode="json"),
        changed_tensors=changed,
        edits=[edit_report(e, batch.tok, before, after) for e in edits],
        metrics=aggregate_model(agg),
        gates=Gates(**gate_doc),
        warnings=list(batch.warnings),
        **({"pararel": batch.pararel} if batch.pararel else {}),
    )


def base_info(batch, model) -> dict:
    from ..model.load import provenance

    info = provenance(batch.source)
    if batch.spec.model.base_model:
        info["base_model"] = batch.spec.model.base_model
    info["pipeline_tag"] = "text-generation" if batch.causal else "fill-mask"
    layers, width = arch.shape(model)
    info["layers"], info["neurons_per_layer"] = layers, width - batch.added
    if batch.added:  # select: add: the checkpoint's FFNs are wider than the base model's
        info["added_neurons_per_layer"] = batch.added
    return info


def _neuron_list(located, neurons) -> list[NeuronEntry]:
    return [
        NeuronEntry(
            layer=l,
            index=i,
            score=round(located.score.get((l, i), 0.0), 8),
            activation=round(located.activation.get((l, i), 0.0), 8),
        )
        for l, i in neurons
    ]


def neurons_doc(edits) -> NeuronsDoc:
    out = []
    for e in edits:
        entry = dict(kind=e.kind, relation=e.relation, edited=[[l, i] for l, i in e.neurons])
        if e.written is not None:
            entry["written"] = written_dict(e.written)
        entry["facts"] = [
            FactNeurons(
                subject=f.subject,
                target=f.target,
                share=f.share,
                prompts=f.prompts,
                coarse_counts=[len(c) for c in f.coarse],
                coarse=[[list(n) for n in c] for c in f.coarse],
                neurons=_neuron_list(f, f.neurons),
            )
            for f in e.located
        ]
        out.append(EditNeurons(**entry))
    return NeuronsDoc(schema_version=NEURONS_SCHEMA_VERSION, edits=out)


def located_from(doc: NeuronsDoc, edits, built: Report) -> None:
    """Fill in the records' located neurons, edited neurons and rule from a checkpoint's neurons.json
    and report."""
    from ..locate.neurons import Located
    from ..plan.batch import Written

    if len(doc.edits) != len(edits):
        raise ValueError(f"{NEURONS} has {len(doc.edits)} edits, the spec {len(edits)}")
    for e, d in zip(edits, doc.edits, strict=True):
        e.neurons = [(int(l), int(i)) for l, i in d.edited]
        e.located = [
            Located(
                subject=f.subject,
                target=f.target,
                prompts=f.prompts,
                coarse=[[(int(l), int(i)) for l, i in c] for c in f.coarse],
                neurons=[(n.layer, n.index) for n in f.neurons],
                share=f.share,
            )
            for f in d.facts
        ]
        if d.written is not None:
            r = built.edits[e.index]
            e.written = Written(**d.written, scale_searched=bool(r.scale_searched), scale_reached=r.scale_reached)


def json_schema() -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:kn-edit:schema:report",
        **Report.model_json_schema(),
    }
    return json.dumps(schema, indent=2)
