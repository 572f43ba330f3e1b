"""Facts and templates from a PARAREL-format directory, expanded into explicit spec edits.

A directory holds templates as `patterns/P*.jsonl` (one `{"pattern": ...}` per line) and facts
as `trex/P*.jsonl` (`{"sub_label", "obj_label"}`) or as one JSON file
`{relation: [[subject, object], ...]}` (`query_pairs.json`, at the top or under `authors/`).

Edits with `source: pararel` become ordinary Update / Erase edits, so the rest of the pipeline
does not know where they came from. Templates the model cannot use (for a causal model, [Y]
not at the end) and facts whose target the tokenizer cannot read (an unknown token, or other tokens
in different prompts) are skipped and counted; targets of several tokens are kept.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ..spec import EditSpec, Erase, Spec, SpecError, Update, _check_templates
from .prompts import PromptError, causal_ok, encode, target_ids, unknown

ENV = "KN_EDIT_PARAREL"
PAIRS = ("query_pairs.json", "authors/query_pairs.json")


def find_dir(cli_dir=None, spec_dir=None, base: Path | None = None, file="<spec>", need="edits use source: pararel") -> Path:
    """The directory to read: command line, then the spec's `pararel` (relative to the spec file), then $KN_EDIT_PARAREL."""
    if cli_dir:
        d, where = Path(cli_dir), "--pararel"
    elif spec_dir:
        d, where = Path(spec_dir), "pararel"
        if not d.is_absolute() and base is not None:
            d = base / d
    elif os.environ.get(ENV):
        d, where = Path(os.environ[ENV]), f"${ENV}"
    else:
        raise SpecError(
            file,
            [
                (
                    "pararel",
                    f"{need} but no PARAREL directory is given (set pararel: DIR in the spec, pass --pararel DIR or set {ENV})",
                )
            ],
        )
    d = d.expanduser()
    if not d.is_dir():
        raise SpecError(file, [("pararel", f"PARAREL directory not found: {d} (from {where})")])
    return d


def templates(d: Path, relation: str, file="<spec>", where="relation") -> list[str]:
    path = Path(d) / "patterns" / f"{relation}.jsonl"
    if not path.is_file():
        raise SpecError(file, [(where, f"relation {relation!r} has no templates in {d} (expected patterns/{relation}.jsonl)")])
    return [json.loads(line)["pattern"] for line in path.read_text().splitlines() if line.strip()]


def facts(d: Path, relation: str, file="<spec>", where="relation") -> list[tuple[str, str]]:
    """The relation's (subject, object) pairs in file order, without repeats."""
    d = Path(d)
    trex = d / "trex" / f"{relation}.jsonl"
    if trex.is_file():
        rows = [json.loads(line) for line in trex.read_text().splitlines() if line.strip()]
        pairs = [(r["sub_label"], r["obj_label"]) for r in rows]
    else:
        found = [d / p for p in PAIRS if (d / p).is_file()]
        table = json.loads(found[0].read_text()) if found else {}
        if relation not in table:
            raise SpecError(
                file,
                [
                    (
                        where,
                        f"relation {relation!r} has no facts in {d} (expected trex/{relation}.jsonl or {relation} in {PAIRS[0]})",
                    )
                ],
            )
        pairs = [(s, o) for s, o in table[relation]]
    return list(dict.fromkeys(pairs))


@dataclass
class Usable:
    """What of a relation a model can use."""

    templates: list[str]
    facts: list[tuple[str, str]]
    skipped_templates: int
    skipped_facts: int

    @property
    def skipped(self) -> dict:
        return {"templates": self.skipped_templates, "facts": self.skipped_facts}


def usable_templates(all_templates: list[str], causal: bool) -> list[str]:
    return [t for t in all_templates if not _check_templates([t], True) and (not causal or causal_ok(t))]


def tokenizes(tok, causal: bool, temps: list[str], subject: str, target: str) -> bool:
    """Whether target is the same tokens (one or more, none unknown) at the answer position of every
    prompt of the fact."""
    if unknown(tok, subject):
        return False
    try:
        return len({target_ids(tok, encode(tok, t.replace("[X]", subject), causal), target, causal) for t in temps}) == 1
    except PromptError:
        return False


def usable(tok, causal: bool, all_templates: list[str], all_facts: list[tuple[str, str]]) -> Usable:
    temps = usable_templates(all_templates, causal)
    ok = [(s, o) for s, o in all_facts if temps and tokenizes(tok, causal, temps, s, o)]
    return Usable(temps, ok, len(all_templates) - len(temps), len(all_facts) - len(ok))


def _expand_update(u: Update, d, tok, causal, file, where) -> tuple[Update, dict]:
    temps_all = templates(d, u.relation, file, f"{where}.relation")
    temps = usable_templates(temps_all, causal)
    if not temps:
        raise SpecError(
            file, [(f"{where}.relation", f"none of the {len(temps_all)} templates of {u.relation} is usable by this model")]
        )
    pairs = [(s, o) for s, o in facts(d, u.relation, file, f"{where}.relation") if s == u.subject]
    if not pairs:
        raise SpecError(file, [(f"{where}.subject", f"{u.subject!r} is not a subject of {u.relation} in {d}")])
    if u.target is not None:
        if u.target not in [o for _, o in pairs]:
            raise SpecError(
                file,
                [
                    (
                        f"{where}.target",
                        f"{u.relation} has no fact {u.subject!r} -> {u.target!r} (the data has {[o for _, o in pairs]})",
                    )
                ],
            )
        target = u.target
    else:
        target = pairs[0][1]
    fields = u.model_dump(exclude={"source"})
    fields.update(target=target, templates=temps, prompts=None)
    try:
        return Update(**fields), {"templates": len(temps_all) - len(temps), "facts": 0}
    except ValueError as e:
        raise SpecError(file, [(where, str(e).splitlines()[-1])]) from None


def _expand_erase(e: Erase, d, tok, causal, file, where) -> tuple[Erase, dict]:
    use = usable(
        tok, causal, templates(d, e.relation, file, f"{where}.relation"), facts(d, e.relation, file, f"{where}.relation")
    )
    if not use.templates:
        raise SpecError(file, [(f"{where}.relation", f"none of the templates of {e.relation} is usable by this model")])
    if not use.facts:
        raise SpecError(file, [(f"{where}.relation", f"no fact of {e.relation} has a target this model's tokenizer can read")])
    chosen = use.facts[: e.facts] if isinstance(e.facts, int) else use.facts
    return Erase(
        relation=e.relation, templates=use.templates, facts=[{"subject": s, "target": o} for s, o in chosen]
    ), use.skipped


def expand(
    spec: Spec, tok, causal: bool, cli_dir=None, file="<spec>", solving=True
) -> tuple[Spec, list[dict | None], Path | None]:
    """The spec with every `source: pararel` edit made explicit, per edit the skip counts (None: explicit),
    and the directory read (None: nothing reads one). solving: the edits will be solved, so
    `solve.pararel_facts` reads the directory too."""
    base = Path(file).parent if file != "<spec>" else None
    if not any((x.update or x.erase).source == "pararel" for x in spec.edits):
        if not (solving and spec.method.solve.pararel_facts):
            return spec, [None] * len(spec.edits), None
        d = find_dir(cli_dir, spec.pararel, base, file, need="method.solve.pararel_facts is set")
        return spec, [None] * len(spec.edits), d.resolve()
    d = find_dir(cli_dir, spec.pararel, base, file)
    out, skipped = [], []
    for k, edit in enumerate(spec.edits):
        where = f"edits[{k}].{edit.kind}"
        if edit.update is not None and edit.update.source == "pararel":
            u, s = _expand_update(edit.update, d, tok, causal, file, where)
            out.append(EditSpec(update=u))
        elif edit.erase is not None and edit.erase.source == "pararel":
            e, s = _expand_erase(edit.erase, d, tok, causal, file, where)
            out.append(EditSpec(erase=e))
        else:
            out.append(edit)
            s = None
        skipped.append(s)
    return spec.model_copy(update={"edits": out}), skipped, d.resolve()


def known(model, tok, causal: bool, temps: list[str], subject: str, target: str, need: float = 0.5) -> bool:
    """Whether the model's answer is the target on more than `need` of the fact's prompts (the
    greedy continuation starts with it; a masked LM: its top tokens at as many masks)."""
    from ..measure.predict import starts

    hits, misses = 0, 0
    for t in temps:
        p = encode(tok, t.replace("[X]", subject), causal, subject)
        if starts(model, p, target_ids(tok, p, target, causal)):
            hits += 1
        else:
            misses += 1
            if misses >= (1 - need) * len(temps):  # more than `need` is out of reach
                return False
    return hits > need * len(temps)


def pick(model, tok, causal: bool, use: Usable, n: int, seed: int = 0, need: float = 0.5, min_tokens: int = 1) -> list[dict]:
    """Up to n facts the model knows whose answer has at least min_tokens tokens, in data order, each
    with a new target drawn (seeded) from the relation's other objects."""
    import random

    rng = random.Random(seed)
    objects = sorted({o for _, o in use.facts})
    out = []
    for s, o in use.facts:
        if len(out) == n:
            break
        others = [x for x in objects if x != o]
        if (
            min_tokens > 1
            and len(target_ids(tok, encode(tok, use.templates[0].replace("[X]", s), causal), o, causal)) < min_tokens
        ):
            continue
        if others and known(model, tok, causal, use.templates, s, o, need):
            out.append({"subject": s, "target": o, "new_target": rng.choice(others)})
    return out
