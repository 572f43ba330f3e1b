"""A spec made concrete for one tokenizer: one record per edit (`Edit`), which every later step
fills in: locate (`located`), choose (`neurons`, `written`), verify (`probe`, `result`).

Targets are token ids, one or more (`Fact.target_ids`, `Edit.new_ids`). Every tokenizer-level
problem (a causal prompt whose [Y] is not at the end, a target that merges with the text around
[Y] or tokenizes differently in two prompts) is reported with its field path, before any model
weights are loaded."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..errors import SpecError
from ..locate.neurons import Located, Neuron
from ..model import load as loading
from ..spec import Spec
from ..spec import load as load_spec
from .prompts import Prompt, PromptError, as_ids, encode, pieces, target_ids, unknown


@dataclass
class Fact:
    """A fact's prompts and target tokens for one tokenizer."""

    subject: str
    target: str
    target_ids: tuple[int, ...]  # one id is taken as (id,)
    prompts: list[Prompt]
    relation: str = ""

    def __post_init__(self):
        self.target_ids = as_ids(self.target_ids)

    def first(self, n: int) -> Fact:
        return Fact(self.subject, self.target, self.target_ids, self.prompts[:n], self.relation)


@dataclass
class Written:
    """How an update's value slots were written."""

    rule: str  # solve | authors | plain
    lambda1: float | None = None  # authors / plain only, as are the next four
    lambda2: float | None = None
    sign_aware: bool | None = None
    scale: float | None = None
    norm_cap: float | None = None
    scale_searched: bool = False
    scale_reached: bool | None = None  # search only: False when no scale of the grid worked


@dataclass
class Edit:
    """One edit of the spec, as it goes through the steps."""

    index: int
    kind: str  # update | erase
    relation: str
    where: str  # field path of the edit in the spec
    facts: list[Fact]  # update: the edited fact first, then relation_facts; erase: the relation's facts
    new_target: str | None = None
    new_ids: tuple[int, ...] | None = None
    skipped: dict | None = None  # source: pararel: templates and facts the model cannot use
    held_out: int = 0  # update: the last held_out prompts of the edited fact are not used to locate
    # locate: per fact of `facts` (the edited fact on its located prompts only)
    located: list[Located] = field(default_factory=list)
    # choose
    neurons: list[Neuron] = field(default_factory=list)  # the value slots the edit writes
    dropped_shared: list[Neuron] = field(default_factory=list)  # update: left out by the relation filter
    written: Written | None = None  # update: rule, lambdas, scale
    keys: dict | None = None  # solve.select: patch: {(layer, neuron): (gate row, up row)} written before the solve
    # verify
    probe: object | None = None  # measure.probes.Probe
    result: object | None = None  # measure.evaluate.EditResult

    @property
    def fact(self) -> Fact:
        return self.facts[0]

    @property
    def shown(self) -> list[Fact]:
        """The facts the edit is judged on: the updated fact, or all erased facts."""
        return self.facts[:1] if self.kind == "update" else self.facts

    @property
    def located_prompts(self) -> list:
        """An update's prompts less the held-out ones: those it is located, chosen and solved on."""
        return self.fact.prompts[: len(self.fact.prompts) - self.held_out]

    def locate_groups(self) -> list[list[Fact]]:
        """Facts located together (they share one adaptive share): an update's fact, less its
        held-out prompts, and its relation_facts separately; an erase's facts together."""
        if self.kind == "update":
            return [[self.fact.first(len(self.located_prompts))], self.facts[1:]]
        return [self.facts]


@dataclass
class Batch:
    """Everything known before the weights are loaded: the spec, the tokenizer and the edit records."""

    spec: Spec
    text: str  # the spec file verbatim
    file: str
    source: loading.Source
    tok: object
    causal: bool
    edits: list[Edit]
    extra: list[tuple[str, Fact]] = field(default_factory=list)  # verify.facts: (relation, fact)
    pararel: str | None = None  # the PARAREL directory read: source: pararel edits, solve.pararel_facts
    solve_stats: object | None = None  # apply.solve.Stats of the batch solve, once applied
    added: int = 0  # neurons added to every layer's FFN (solve.select: add), once applied
    warnings: list[str] = field(default_factory=list)  # for the report and the terminal


def prepare(spec: Spec | str | Path, pararel_dir=None, *, text: str | None = None, file=None, solving: bool = True) -> Batch:
    """A spec file (or a Spec, with the text it came from and its file) checked against its model's
    tokenizer; no weights are loaded. solving=False: the edits will not be solved (a check of a built
    checkpoint, a locate), so a PARAREL directory is read only for `source: pararel` edits."""
    if isinstance(spec, Spec):
        file = str(file or "<spec>")
        if text is None:
            text = yaml.safe_dump(spec.model_dump(mode="json", exclude_defaults=True), sort_keys=False, allow_unicode=True)
    else:
        file = str(spec)
        spec, text = load_spec(spec)
    src = loading.resolve(spec.model.name, spec.model.revision)
    tok = loading.load_tokenizer(src)
    causal = loading.is_causal(src)
    edits, used = make(spec, tok, causal, file, pararel_dir, solving)
    batch = Batch(spec, text, file, src, tok, causal, edits, facts_of_verify(spec, tok, causal, file), used)
    batch.warnings += contradictions(edits)
    return batch


def contradictions(edits) -> list[str]:
    """Warnings for updates that ask one prompt (the same tokens) for different new targets: at most one of
    them can hold there (two relations whose templates read alike for a shared subject). The batch solve asks
    such a prompt of the first alone (apply/write.py claimed)."""
    seen, out = {}, []
    for e in edits:
        if e.kind != "update":
            continue
        for p in e.fact.prompts:
            first = seen.setdefault(p.ids, (e, p))[0]
            if first is not e and first.new_ids != e.new_ids:
                out.append(
                    f"{first.where} and {e.where} ask the same prompt {p.text!r} for {first.new_target!r} and "
                    f"{e.new_target!r}: at most one can hold there (the batch solve asks it of the first)"
                )
    return out


def fact(tok, causal, subject, target, texts, where, problems, relation: str = "", at: str = "") -> Fact | None:
    """`where`: the field path of the prompts (templates, prompts), `at` that of the subject and target."""
    if subject and unknown(tok, subject):
        problems.append((f"{at}.subject", f"{subject!r} has words this model's vocabulary lacks (they become {tok.unk_token!r})"))
        return None
    prompts = []
    for i, text in enumerate(texts):
        try:
            prompts.append(encode(tok, text, causal, subject))
        except PromptError as e:
            problems.append((f"{where}[{i}]", str(e)))
    if len(prompts) < len(texts):
        return None
    ids = None
    try:
        for p in prompts:
            got = target_ids(tok, p, target, causal)
            if ids is not None and got != ids:
                raise PromptError(differs(tok, target, ids, got))
            ids = got
    except PromptError as e:
        problems.append((f"{at}.target", str(e)))
        return None
    return Fact(subject, target, ids, prompts, relation)


def differs(tok, target: str, first, got) -> str:
    return f"{target!r} tokenizes as {pieces(tok, got)} here but as {pieces(tok, first)} in the first prompt"


def make(spec: Spec, tok, causal: bool, file="<spec>", pararel_dir=None, solving=True) -> tuple[list[Edit], str | None]:
    """The edit records, and the PARAREL directory read (source: pararel edits, solve.pararel_facts)."""
    from . import pararel

    spec, skipped, used = pararel.expand(spec, tok, causal, pararel_dir, file, solving)
    problems: list[tuple[str, str]] = []
    out = []
    for k, edit in enumerate(spec.edits):
        base = f"edits[{k}].{edit.kind}"
        if edit.update is not None:
            u = edit.update
            field_name = "templates" if u.templates is not None else "prompts"
            main = fact(
                tok, causal, u.subject or "", u.target, u.fact_prompts(), f"{base}.{field_name}", problems, u.relation, base
            )
            new_ids = None
            if main is not None:
                try:
                    new_ids = target_ids(tok, main.prompts[0], u.new_target, causal)
                    for p in main.prompts[1:]:
                        if (got := target_ids(tok, p, u.new_target, causal)) != new_ids:
                            raise PromptError(differs(tok, u.new_target, new_ids, got))
                except PromptError as e:
                    problems.append((f"{base}.new_target", str(e)))
            others = [
                fact(
                    tok,
                    causal,
                    f.subject,
                    f.target,
                    u.fact_prompts(f.subject),
                    f"{base}.templates",
                    problems,
                    u.relation,
                    f"{base}.relation_facts[{j}]",
                )
                for j, f in enumerate(u.relation_facts)
            ]
            out.append(
                Edit(
                    k,
                    "update",
                    u.relation,
                    base,
                    [main, *others],
                    u.new_target,
                    new_ids,
                    skipped[k],
                    held_out=spec.verify.held_out,
                )
            )
        else:
            e = edit.erase
            facts = [
                fact(
                    tok,
                    causal,
                    f.subject,
                    f.target,
                    [t.replace("[X]", f.subject) for t in e.templates],
                    f"{base}.templates",
                    problems,
                    e.relation,
                    f"{base}.facts[{j}]",
                )
                for j, f in enumerate(e.facts)
            ]
            out.append(Edit(k, "erase", e.relation, base, facts, skipped=skipped[k]))
    if problems:
        raise SpecError(file, problems)
    paper = spec.method.erase.rule == "paper" and spec.method.erase.value == "unk"
    if any(e.kind == "erase" for e in out) and paper and getattr(tok, "unk_token_id", None) is None:
        raise SpecError(
            file,
            [
                (
                    "method.erase.value",
                    "unk: this model's tokenizer has no unknown token to erase with; "
                    "use value: zero (flat form: erase_value: zero)",
                )
            ],
        )
    h = spec.verify.held_out
    problems = [
        ("verify.held_out", f"{e.where} has {len(e.fact.prompts)} prompts; held_out {h} must leave at least one for locating")
        for e in out
        if e.kind == "update" and h >= len(e.fact.prompts)
    ]
    if problems:
        raise SpecError(file, problems)
    return out, None if used is None else str(used)


def tokenized(batch: Batch) -> list[str]:
    """How each edit's targets tokenize, one line per edit (the tokens of a multi-token one listed)."""

    def show(text, ids):
        return f"{text!r} ({len(ids)} tokens: {pieces(batch.tok, ids)})" if len(ids) > 1 else f"{text!r} (1 token)"

    out = []
    for e in batch.edits:
        if e.kind == "update":
            out.append(f"{e.where}: {show(e.fact.target, e.fact.target_ids)} -> {show(e.new_target, e.new_ids)}")
        else:
            multi = [show(f.target, f.target_ids) for f in e.facts if len(f.target_ids) > 1]
            out.append(f"{e.where}: {len(e.facts)} facts" + (f", multi-token targets: {', '.join(multi)}" if multi else ""))
    return out


def facts_of_verify(spec: Spec, tok, causal, file="<spec>") -> list[tuple[str, Fact]]:
    """verify.facts encoded for this tokenizer: (relation, fact)."""
    problems, out = [], []
    for i, g in enumerate(spec.verify.facts):
        for j, f in enumerate(g.facts):
            texts = [t.replace("[X]", f.subject) for t in g.templates]
            at = f"verify.facts[{i}]"
            pf = fact(tok, causal, f.subject, f.target, texts, f"{at}.templates", problems, g.relation, f"{at}.facts[{j}]")
            if pf is not None:
                out.append((g.relation, pf))
    if problems:
        raise SpecError(file, problems)
    return out
