"""A spec made concrete for one tokenizer: encoded prompts and single-token targets.

Every tokenizer-level problem (a causal prompt whose [Y] is not at the end, a target that is
not one token) is reported with its field path, before any model weights are loaded."""
from __future__ import annotations

from dataclasses import dataclass

from .prompts import Prompt, PromptError, encode, target_id
from .spec import Spec, SpecError


@dataclass
class Fact:
    subject: str
    target: str
    target_id: int
    prompts: list[Prompt]


@dataclass
class EditPlan:
    kind: str  # update | erase
    relation: str
    facts: list[Fact]  # update: the edited fact first, then relation_facts
    new_target: str | None = None
    new_id: int | None = None
    where: str = ""  # field path of the edit in the spec
    skipped: dict | None = None  # source: pararel: templates and facts the model cannot use


def _fact(tok, causal, subject, target, texts, where, problems) -> Fact | None:
    prompts, tid = [], None
    for i, text in enumerate(texts):
        try:
            p = encode(tok, text, causal)
            prompts.append(p)
            tid = target_id(tok, p, target, causal)
        except PromptError as e:
            problems.append((f"{where}[{i}]", str(e)))
    return Fact(subject, target, tid, prompts) if tid is not None and len(prompts) == len(texts) else None


def make(spec: Spec, tok, causal: bool, file="<spec>", pararel_dir=None) -> list[EditPlan]:
    from . import pararel

    spec, skipped = pararel.expand(spec, tok, causal, pararel_dir, file)
    problems: list[tuple[str, str]] = []
    plans = []
    for k, edit in enumerate(spec.edits):
        base = f"edits[{k}].{edit.kind}"
        if edit.update is not None:
            u = edit.update
            field_name = "templates" if u.templates is not None else "prompts"
            main = _fact(tok, causal, u.subject or "", u.target, u.fact_prompts(), f"{base}.{field_name}", problems)
            new_id = None
            if main is not None:
                try:
                    new_id = target_id(tok, main.prompts[0], u.new_target, causal)
                except PromptError as e:
                    problems.append((f"{base}.new_target", str(e)))
            others = [
                _fact(tok, causal, f.subject, f.target, u.fact_prompts(f.subject), f"{base}.relation_facts[{j}]", problems)
                for j, f in enumerate(u.relation_facts)
            ]
            plans.append(EditPlan("update", u.relation, [main, *others], u.new_target, new_id, base))
        else:
            e = edit.erase
            facts = [
                _fact(tok, causal, f.subject, f.target, [t.replace("[X]", f.subject) for t in e.templates],
                      f"{base}.facts[{j}]", problems)
                for j, f in enumerate(e.facts)
            ]
            plans.append(EditPlan("erase", e.relation, facts, where=base))
    if problems:
        raise SpecError(file, problems)
    for p, s in zip(plans, skipped):
        p.skipped = s
    return plans
