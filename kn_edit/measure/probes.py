"""What each edit is judged on: its own facts' prompts (some held out from locating) and
neighbour facts of the same relation (intra) and of other relations (inter)."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..plan.batch import Fact


@dataclass
class Probe:
    """The prompts one edit is measured on. `facts` are the edited/erased facts."""

    kind: str
    relation: str
    facts: list[Fact]
    held: list[set[int]]  # per fact: indices of held-out prompts
    intra: list[Fact] = field(default_factory=list)  # update: same relation
    inter: list[Fact] = field(default_factory=list)  # other relations
    new_ids: tuple[int, ...] | None = None


def attach(edits, extra: list[tuple[str, Fact]], neighbours: int) -> None:
    """Set each edit's `probe`. Neighbours are taken in spec order from every fact the spec names
    (relation_facts, erased facts, verify.facts), leaving out facts an update edits and relations
    an erase edits (they are meant to change); the first `neighbours` of the same relation are
    intra, the first `neighbours` of other relations inter."""
    edited = {(e.relation, e.fact.subject) for e in edits if e.kind == "update"}
    erased = {e.relation for e in edits if e.kind == "erase"}
    pool, seen = [], set()
    for rel, f in [(e.relation, f) for e in edits for f in e.facts] + list(extra):
        key = (rel, f.subject)
        if key in seen or key in edited or rel in erased:
            continue
        seen.add(key)
        pool.append((rel, f))
    for e in edits:
        inter = [f for r, f in pool if r != e.relation][:neighbours]
        if e.kind == "update":
            n = len(e.fact.prompts)
            intra = [f for r, f in pool if r == e.relation][:neighbours]
            e.probe = Probe("update", e.relation, e.facts[:1], [set(range(n - e.held_out, n))], intra, inter, e.new_ids)
        else:
            e.probe = Probe("erase", e.relation, e.facts, [set() for _ in e.facts], [], inter)
