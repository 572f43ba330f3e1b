"""The edit spec: a YAML file kept in git. Schema, defaults (the paper's), and precise errors."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator


class SpecError(ValueError):
    """Bad input. Each line names the file, the field path and what was expected."""

    def __init__(self, file, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(f"{self.file}: {loc}: {msg}" if loc else f"{self.file}: {msg}" for loc, msg in problems))


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ModelRef(_Strict):
    name: str = Field(description="Hub id, local model folder, .gguf file, or pypi:PACKAGE (a GGUF file inside an installed package)")
    revision: str | None = Field(None, description="Hub branch, tag or commit")


class Method(_Strict):
    steps: int = Field(20, ge=1, le=1000, description="Riemann steps m of integrated gradients (alpha = k/m, k = 0..m-1)")
    threshold: float = Field(0.2, gt=0, le=1, description="per prompt, keep neurons scoring >= threshold x the prompt's max score")
    share: float = Field(0.7, gt=0, le=1, description="keep neurons found in >= share of a fact's prompts")
    adaptive_share: bool = Field(True, description="move share by share_step until the mean neurons per fact lies in target_neurons")
    share_step: float = Field(0.05, gt=0, le=0.5)
    target_neurons: tuple[int, int] = Field((2, 5), description="[min, max] mean neurons per fact for the adaptive share")
    update_rule: Literal["auto", "authors", "plain"] = Field(
        "auto", description="authors: v -= l1*|v|/|e_t| e_t, v += l2*|v|/|e_t'| e_t'; plain: v -= l1*e_t, v += l2*e_t'; "
        "auto: plain on gated MLPs (signed activations), authors elsewhere"
    )
    sign_aware: bool | Literal["auto"] = Field(
        "auto", description="flip the update direction of neurons whose activation on the fact is negative; auto: on gated MLPs"
    )
    lambda1: float | None = Field(None, ge=0, description="scale of the old target's removal (default 1)")
    lambda2: float | None = Field(None, ge=0, description="scale of the new target's addition (default: authors 8, plain 1)")
    scale: Literal["auto", "search", "fixed"] = Field(
        "auto", description="search: multiply the update by the smallest scale of a geometric grid at which the edit "
        "succeeds on the fact's prompts; fixed: scale 1; auto: search on gated MLPs, fixed elsewhere"
    )
    scale_min: float = Field(0.25, gt=0, description="search: first scale of the grid")
    scale_max: float = Field(64.0, gt=0, description="search: last scale of the grid, written when none succeeds")
    scale_factor: float = Field(1.41421356, gt=1, description="search: ratio of consecutive scales")
    scale_need: float = Field(1.0, gt=0, le=1, description="search: share of the fact's prompts that must answer new_target")
    norm_cap: float | None = Field(None, gt=0, description="limit each slot's change to norm_cap x its norm")
    relation_filter: float = Field(
        0.1, ge=0, le=1, description="update: leave out neurons shared by more than this share of the given relation_facts"
    )
    erase_min_facts: int = Field(5, ge=1, description="erase: neurons shared by >= this many of the relation's facts")
    erase_value: Literal["unk", "zero"] = Field("unk", description="erase: the value slot becomes the [UNK] embedding or zero")
    engine: Literal["fast", "reference"] = Field("fast", description="attribution engine; both give the same numbers")

    @model_validator(mode="after")
    def _range(self):
        lo, hi = self.target_neurons
        if not 0 < lo <= hi:
            raise ValueError(f"target_neurons must be [min, max] with 0 < min <= max, got {list(self.target_neurons)}")
        if self.scale_min > self.scale_max:
            raise ValueError(f"scale_min ({self.scale_min}) must not exceed scale_max ({self.scale_max})")
        return self


class Fact(_Strict):
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
    target: str = Field(min_length=1, description="the answer the model gives now (t)")
    new_target: str = Field(min_length=1, description="the answer it should give (t')")
    templates: list[str] | None = Field(None, min_length=1, description="prompts with [X] and [Y]")
    prompts: list[str] | None = Field(None, min_length=1, description="prompts with the subject filled in and [Y]")
    relation_facts: list[Fact] = Field(default_factory=list, description="other facts of the relation, for the shared-neuron filter")

    @model_validator(mode="after")
    def _prompts(self):
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
    templates: list[str] = Field(min_length=1, description="prompts with [X] and [Y]")
    facts: list[Fact] = Field(min_length=1, description="the relation's facts: subject and target")

    @model_validator(mode="after")
    def _templates(self):
        errors = _check_templates(self.templates, True)
        if errors:
            raise ValueError("; ".join(errors))
        return self


class Edit(_Strict):
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


class Spec(_Strict):
    model: ModelRef
    seed: int = Field(0, description="seeds everything random (controls); same spec + model + seed = same bytes")
    method: Method = Field(default_factory=Method)
    edits: list[Edit] = Field(min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _model_shorthand(cls, data):
        if isinstance(data, dict) and isinstance(data.get("model"), str):
            data = {**data, "model": {"name": data["model"]}}
        return data


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def parse(data, file="<spec>") -> Spec:
    try:
        return Spec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            # drop pydantic's union/validator noise from the path
            loc = tuple(p for p in err["loc"] if not (isinstance(p, str) and p.startswith("function-")))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = "unknown key"
            elif err["type"] == "missing":
                msg = "required field is missing"
            problems.append((_loc(loc), msg))
        raise SpecError(file, problems) from None


def load(path) -> tuple[Spec, str]:
    """The spec and its verbatim text."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(path, [("", f"cannot read: {e.strerror}")]) from None
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
    return json.dumps(Spec.model_json_schema(), indent=2)
