"""What the batch update keeps, with no extra work from the user (kn_edit/data, written for kn-edit, MIT):

- the same-relation facts the spec gives an update (`relation_facts`);
- each update's own templates filled with common subjects (data/subjects.txt), so that the relation
  keeps answering for other subjects what it answered before (not an erased relation's: it is to be
  forgotten for every subject);
- everyday factual prompts (data/prompts_preserve.txt);
- plain English text (data/text_preserve.txt), every position (masked LMs: every 7th token masked);
- with `solve.subject_prompts` (off by default), each update's own subject in that many templates of other
  relations (data/templates_subject.txt; none sharing a word with the update's own templates, nor one the model
  answers with the old target): the subject's memory is read there too, and what it answers there should stay
  (KL term only: subject_prompts());
- with a PARAREL directory and `solve.pararel_facts`, that many other facts of each update's relation
  (a PARAREL relation id such as P36), drawn from it, and for an erase that many facts of each kin
  relation: one whose facts answer with the erased answers (languages for "native language": "X speaks")
  (KL term only: pararel_prompts()).

Never `verify.facts`, the probe prompts or the probe text: those measure the result and stay unseen.
A prompt naming a subject the spec edits is left out (its answer may rightly change).
"""

from __future__ import annotations

import random
import re
from functools import cache
from itertools import zip_longest
from pathlib import Path

from ..measure.safety import prompts as shipped_prompts
from ..measure.safety import shipped
from ..plan import pararel
from ..plan.prompts import encode
from ..spec import SpecError

PER_TEMPLATE = 4  # common subjects filled into each edit template
MAX_PROMPTS = 400  # preservation prompts, at most (a seeded sample)
MAX_DRAWN = 1000  # prompts of facts drawn from PARAREL, at most
WINDOW = 64  # tokens per window of plain text
MASK_EVERY = 7


def _avoid(batch) -> set[str]:
    return {f.subject.lower() for e in batch.edits for f in e.shown if f.subject}


def _subjects(avoid: set[str]) -> list[str]:
    return [s for s in shipped("subjects.txt").splitlines() if s.strip() and s.lower() not in avoid]


def _templates(e) -> list[str]:
    """Edit e's prompts with its subject turned back into [X]."""
    return [p.text.replace(f.subject, "[X]") for f in e.shown[:1] for p in f.prompts if f.subject and f.subject in p.text]


def _filled(batch, templates, subjects) -> list:
    out = []
    for t in templates:
        for s in subjects:
            try:
                out.append(encode(batch.tok, t.replace("[X]", s), batch.causal, s))
            except Exception:  # noqa: BLE001 - a filled template this tokenizer cannot read is left out
                continue
    return out


def same_relation(batch, e, n: int = 8, seed: int = 0) -> list:
    """Prompts of edit e's relation about other subjects: its relation_facts, then its templates
    filled with common subjects (what its neurons should not fire for)."""
    subjects = _subjects(_avoid(batch))
    picked = random.Random(f"kn-edit-same:{seed}").sample(subjects, min(n, len(subjects)))
    out = [p for f in e.facts[1:] for p in f.prompts]
    for s in picked:
        out += _filled(batch, _templates(e)[:2], [s])
    return out


def others(batch, select: str, seed: int = 0) -> list | None:
    """Per edit, its same_relation prompts, for choosing neurons at the subject (None: select score)."""
    return None if select == "score" else [same_relation(batch, e, seed=seed) for e in batch.edits]


# words put before a subject's last word to make near misses of it (near_misses)
MODIFIERS = (
    "the new old great national first northern southern eastern western central upper lower united royal modern "
    "ancient general American British French German Italian Russian Chinese Japanese Indian Spanish Soviet "
    "Democratic Federal Islamic Catholic international"
).split()
# words put in place of a word before a subject's last one (siblings), and before "of" and its last word
NOUNS = (
    "Republic Kingdom Party Bank University Church Empire State City Province Union Council Army Museum Company "
    "Island Club Group Society College Railway Airport Court School Institute Federation Emirate League Station"
).split()
# words put before a lower-case last word ("economic anthropology", "ice hotel")
TOPICS = (
    "social cultural political historical natural applied medical digital public private traditional classical "
    "experimental theoretical visual urban rural industrial environmental mental legal religious military musical "
    "financial chemical mechanical electrical"
).split()
# a word is put in another's place in subjects of up to this many words: in a longer name such siblings read so
# close to the subject that the up row keyed apart from them read other names more (SmolLM2, layer 4: "Donetsk
# People's Republic" on the key of "Russian Soviet Federative Socialist Republic" 0.19 -> 1.06)
SIBLING_WORDS = 3
SMALL = {"of", "the", "and", "de", "la", "le", "von", "van", "der", "du", "des", "del", "di", "da", "in", "on", "for", "&"}


def siblings(subject: str, seed: int = 0) -> list[str]:
    """Names that differ from `subject` in one word, a seeded order: a digit changed ("Windows Server 2008"
    for "Windows Server 2003", "Nintendo 2DS" for "Nintendo 3DS"), or a word before the last one put in
    another's place in a name of up to SIBLING_WORDS words ("Party of Afghanistan" for "Kingdom of Afghanistan"), taken in
    turn (a word's last digit, another word, a word's first digit). A key read at the last token reads
    such a name nearly as it reads the subject."""
    words = subject.split()
    rng = random.Random(f"kn-edit-siblings:{seed}:{subject}")

    def put(i, v):
        return " ".join([*words[:i], v, *words[i + 1 :]])

    last, other, first = [], [], []
    for i, w in enumerate(words):
        digits = [j for j, c in enumerate(w) if c.isdigit()]
        for at, into in ((digits[-1:], last), (digits[:1], first)):
            into += [put(i, w[:k] + d + w[k + 1 :]) for k in at for d in "0123456789" if d != w[k]]
        if not digits and i < len(words) - 1 and len(words) <= SIBLING_WORDS and w.isalpha() and w.lower() not in SMALL:
            other += [put(i, v) for v in (NOUNS + MODIFIERS if w[:1].isupper() else TOPICS + MODIFIERS) if v.lower() != w.lower()]
    for group in (last, other, first):
        rng.shuffle(group)
    names = (x for trio in zip_longest(last, other, first) for x in trio if x is not None)
    return [x for x in dict.fromkeys(names) if x.lower() != subject.lower()]


def near_names(subject: str, n: int, seed: int = 0) -> list[str]:
    """n near misses of a subject of two or more words, a seeded draw: its last word alone, then its siblings
    (names one word apart) and its endings in turn: the last word after another word ("the Republic",
    "French Republic" for "Italian Social Republic"; a topic such as "social" before a lower-case word), or
    after "X of" ("Party of Afghanistan") where it is a name."""
    words = subject.split()
    own = {w.lower() for w in words}
    last = words[-1]
    ending = [f"{m} {last}" for m in MODIFIERS + ([] if last[:1].isupper() else TOPICS) if m.lower() not in own]
    ending += [f"{m} of {last}" for m in NOUNS if last[:1].isupper() and m.lower() not in own]
    random.Random(f"kn-edit-near:{seed}:{subject}").shuffle(ending)
    turns = (x for pair in zip_longest(siblings(subject, seed), ending) for x in pair if x is not None)
    return list(dict.fromkeys([last, *turns]))[:n]


def near_misses(batch, n: int, seed: int = 0) -> list[list]:
    """Per edit, prompts about n near misses of an update's subject (near_names), for the key of its memory
    neuron (solve.near_misses): its located prompts with the subject replaced by each. A memory neuron's key
    is read at the subject's last token, where names that end in the same word read alike ("Donetsk
    People's Republic" on the key of "Russian Soviet Federative Socialist Republic": 0.97 of the
    subject's own reading), and names one word apart too ("Windows Server 2008" on the key of "Windows
    Server 2003"). One-word subjects, erases: none."""
    out = []
    for e in batch.edits:
        subject = e.fact.subject if e.kind == "update" else ""
        if n <= 0 or len((subject or "").split()) < 2:
            out.append([])
            continue
        names = near_names(subject, n, seed)
        texts = dict.fromkeys(p.text for p in e.located_prompts if subject in p.text)
        out.append([q for t in texts for name in names for q in _filled(batch, [t.replace(subject, "[X]", 1)], [name])])
    return out


def erased_elsewhere(model, batch, e, n: int = 16, seed: int = 0) -> list[tuple]:
    """(prompt, answer id) of erase e's templates filled with common subjects where the base model
    answers with one of the erased facts' targets: the relation's answers for subjects the spec does
    not name, to be forgotten too."""
    from ..measure.predict import predict_many

    subjects = _subjects(_avoid(batch))
    picked = random.Random(f"kn-edit-erase:{seed}").sample(subjects, min(n, len(subjects)))
    prompts = _filled(batch, _templates(e), picked)
    answers = {f.target_ids[0] for f in e.facts}
    top = [int(x.argmax()) for x in predict_many(model, prompts)] if prompts else []
    return [(p, t) for p, t in zip(prompts, top, strict=True) if t in answers]


def _unseen(batch) -> set[str]:
    """Subjects that must not be preserved (lower case): the edited ones, and those of verify.facts,
    which measure the result."""
    return _avoid(batch) | {f.subject.lower() for _, f in batch.extra if f.subject}


@cache
def _facts_of(d: str, relation: str) -> tuple[tuple[str, str], ...]:
    return tuple(pararel.facts(d, relation))


@cache
def _subjects_of(d: str, relation: str) -> tuple[str, ...]:
    return tuple(sorted({s for s, _ in _facts_of(d, relation)}))


def _drawable(batch, relation: str, avoid: set[str]) -> list[str] | None:
    """The subjects of `relation` in the PARAREL directory that may be drawn (None: it has none): never
    one in `avoid`, one naming an edited subject, or one of the probe prompts'."""
    try:
        subjects = _subjects_of(batch.pararel, relation)
    except SpecError:
        return None
    probe, edited = shipped("prompts_probe.txt").lower(), _avoid(batch)
    return [
        s for s in subjects
        if s.lower() not in avoid and not any(a in s.lower() for a in edited)
        and not re.search(rf"\b{re.escape(s.lower())}\b", probe)
    ]  # fmt: skip


def drawn_facts(batch, e, n: int, subjects: list[str] | None, seed: int = 0) -> list:
    """Update e's first two templates filled with n of `subjects` (its relation's, _drawable()), drawn
    seeded per edit: the more edits a relation takes, the more of it is kept."""
    if subjects is None:
        batch.warnings.append(
            f"edit {e.index + 1} ({e.fact.subject}): relation {e.relation!r} has no facts in the PARAREL directory; "
            "solve.pararel_facts drew none for it"
        )
        return []
    picked = random.Random(f"kn-edit-relation:{seed}:{e.fact.subject}").sample(subjects, min(n, len(subjects)))
    return _filled(batch, _templates(e)[:2], picked)


KIN_SHARE = 0.2  # a relation is kin to an erased one when this share of its facts answer with an erased answer


@cache
def _relations(d: str) -> tuple[str, ...]:
    return tuple(sorted(x.stem for x in (Path(d) / "patterns").glob("*.jsonl")))


def kin_facts(batch, e, n: int, unseen: set[str], seed: int = 0) -> list:
    """Erase e: per kin relation of the PARAREL directory (at least KIN_SHARE of its facts answer with one of
    e's facts' answers), n of its facts that answer so (_drawable subjects), seeded, in its first two usable
    templates: one relation is forgotten, not every fact with those answers."""
    answers = {f.target for f in e.facts}
    out = []
    for r in _relations(batch.pararel):
        if r == e.relation:
            continue
        try:
            pairs = _facts_of(batch.pararel, r)
        except SpecError:
            continue
        if not pairs or sum(o in answers for _, o in pairs) < KIN_SHARE * len(pairs):
            continue
        ok = set(_drawable(batch, r, unseen) or ())
        subjects = sorted({s for s, o in pairs if o in answers and s in ok})
        picked = random.Random(f"kn-edit-kin:{seed}:{e.relation}:{r}").sample(subjects, min(n, len(subjects)))
        temps = pararel.usable_templates(pararel.templates(batch.pararel, r), batch.causal)[:2]
        out += _filled(batch, temps, picked)
    return out


def pararel_prompts(batch, n: int, seed: int = 0) -> list:
    """drawn_facts() of every update and kin_facts() of every erase (solve.pararel_facts), for the batch
    solve's KL term only; at most MAX_DRAWN (a seeded sample)."""
    if n <= 0 or not batch.pararel:
        return []
    unseen, pool = _unseen(batch), {}
    out = []
    for e in batch.edits:
        if e.kind == "erase":
            out += kin_facts(batch, e, n, unseen, seed)
        elif e.kind == "update":
            if e.relation not in pool:
                pool[e.relation] = _drawable(batch, e.relation, unseen)
            out += drawn_facts(batch, e, n, pool[e.relation], seed)
    out = list({p.ids: p for p in out}.values())
    rng = random.Random(f"kn-edit-drawn:{seed}")
    return sorted(rng.sample(out, MAX_DRAWN), key=out.index) if len(out) > MAX_DRAWN else out


_WORD = re.compile(r"[a-z]{4,}")


def subject_prompts(batch, n: int, seed: int = 0, model=None) -> list:
    """Per update, its subject filled into n of the shipped templates of other relations (a seeded draw per
    subject), leaving out any template that shares a word of four or more letters with the update's own
    templates ("capital" in "[X] is the capital of [Y].") and, given the model, any where it answers with the
    update's old target (a paraphrase of the edited relation by another wording: "[X] is a kind of [Y]." for
    "subclass of"): the edit should change what the subject's memory says for its relation and nothing the
    subject answers elsewhere."""
    if n <= 0:
        return []
    temps = [t.strip() for t in shipped("templates_subject.txt").splitlines() if t.strip()]
    per = []
    for e in batch.edits:
        if e.kind != "update" or not e.fact.subject:
            continue
        own = set(_WORD.findall(" ".join(p.text for p in e.fact.prompts).lower().replace(e.fact.subject.lower(), " ")))
        free = [t for t in temps if not own & set(_WORD.findall(t.lower()))]
        random.Random(f"kn-edit-subject:{seed}:{e.fact.subject}").shuffle(free)
        per.append((e, _filled(batch, free, [e.fact.subject])))
    if model is not None:
        from ..measure.predict import predict_many

        flat = [p for _, ps in per for p in ps]
        top = iter([int(x.argmax()) for x in predict_many(model, flat)] if flat else [])
        per = [(e, [p for p, t in zip(ps, top) if t != e.fact.target_ids[0]]) for e, ps in per]
    out = [p for _, ps in per for p in ps[:n]]
    return list({p.text: p for p in out}.values())


def keep_prompts(batch, seed: int = 0) -> list:
    avoid = _avoid(batch)
    rng = random.Random(f"kn-edit-preserve:{seed}")
    out = [p for e in batch.edits if e.kind == "update" for f in e.facts[1:] for p in f.prompts]
    subjects = _subjects(avoid)
    erased = {t for e in batch.edits if e.kind == "erase" for t in _templates(e)}  # to forget, for every subject
    for t in dict.fromkeys(t for e in batch.edits if e.kind == "update" for t in _templates(e) if t not in erased):
        out += _filled(batch, [t], rng.sample(subjects, min(PER_TEMPLATE, len(subjects))))
    out += shipped_prompts("prompts_preserve.txt", batch.tok, batch.causal, avoid)
    out = [p for p in {p.ids: p for p in out}.values() if not any(a in p.text.lower() for a in avoid)]
    return sorted(rng.sample(out, MAX_PROMPTS), key=out.index) if len(out) > MAX_PROMPTS else out


def text_windows(batch, max_positions: int = 1 << 16) -> list[tuple[list[int], list[int]]]:
    """(token ids, scored positions) of the plain text: next-token positions (causal) or masked tokens."""
    tok = batch.tok
    try:
        ids = tok(shipped("text_preserve.txt"), add_special_tokens=False).input_ids
    except Exception:  # noqa: BLE001 - e.g. a word-level test tokenizer without an unknown token
        return []
    max_len = min(WINDOW, max_positions - 2)
    out = []
    for i in range(0, len(ids) - max_len + 1, max_len):
        w = ids[i : i + max_len]
        if batch.causal:
            out.append((w, list(range(len(w) - 1))))
        else:
            at = list(range(1 + i // max_len % MASK_EVERY, len(w) + 1, MASK_EVERY))
            body = [tok.mask_token_id if k + 1 in at else t for k, t in enumerate(w)]
            out.append(([tok.cls_token_id, *body, tok.sep_token_id], at))
    return out


def background(batch) -> list[list[int]]:
    """Token ids of the plain text windows: with the edits' same-relation prompts, what solve.select: patch
    keys its neurons against, and where it measures how much each neuron is used."""
    return [list(w) for w, _ in text_windows(batch)]
