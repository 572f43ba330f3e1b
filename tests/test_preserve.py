"""What the batch solve keeps beyond the shipped data: with a PARAREL directory, other facts of each
update's relation (solve.pararel_facts), never an edited subject nor what verify measures."""

import json

import pytest

from kn_edit.apply import preserve
from kn_edit.plan import pararel
from kn_edit.plan.batch import prepare
from kn_edit.spec import SpecError


@pytest.fixture(autouse=True)
def no_env_dir(monkeypatch):
    monkeypatch.delenv(pararel.ENV, raising=False)


def _pararel(d, facts: dict):
    (d / "patterns").mkdir(parents=True)
    (d / "trex").mkdir()
    for r, rows in facts.items():
        (d / "patterns" / f"{r}.jsonl").write_text(json.dumps({"pattern": f"[X] is {r} of [Y] ."}) + "\n")
        (d / "trex" / f"{r}.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in rows))
    return d


def _update(world, k=0):
    s, o = world.facts["capital"][k]
    new = next(x for x in world.objects("capital") if x != o)
    return {
        "update": {
            "relation": "capital",
            "subject": s,
            "target": o,
            "new_target": new,
            "templates": list(world.templates("capital")),
        }
    }


def test_pararel_facts_of_the_relation_not_the_edits_nor_what_verify_measures(llama_dir, world, tmp_path, write_spec):
    facts = world.facts["capital"]
    d = _pararel(tmp_path / "p", {"capital": facts, "maker": world.facts["maker"]})
    temps = list(world.templates("capital"))
    measured = facts[5][0]
    verify = {"facts": [{"relation": "capital", "templates": temps[:1], "facts": [{"subject": measured, "target": facts[5][1]}]}]}
    doc = {"model": str(llama_dir), "pararel": str(d), "edits": [_update(world, 0), _update(world, 1)], "verify": verify}
    assert prepare(write_spec(doc, "off.yaml")).pararel is None  # pararel_facts 0: the directory is not read
    batch = prepare(write_spec(doc | {"method": {"solve": {"pararel_facts": 4}}}))
    assert batch.pararel == str(d.resolve())
    got = preserve.pararel_prompts(batch, 30)
    named = {s for s, _ in facts if any(t.replace("[X]", s).replace(" [Y] .", "") in p.text for p in got for t in temps[:2])}
    edited = (facts[0][0], facts[1][0])
    assert named == {s for s, _ in facts if not any(a in s for a in edited)} - {measured}  # all the others, both edits drawing
    assert len(named) >= 10
    assert all(not any(m in p.text for m, _ in world.facts["maker"]) for p in got)  # its own relation only
    few = preserve.pararel_prompts(batch, 3)
    assert 3 <= len(few) <= 2 * 2 * 3 and few == preserve.pararel_prompts(batch, 3)  # seeded: the same draw
    assert preserve.pararel_prompts(batch, 0) == []
    plain = prepare(write_spec({"model": str(llama_dir), "edits": [_update(world)]}, "plain.yaml"))
    assert plain.pararel is None and preserve.pararel_prompts(plain, 30) == []


def test_pararel_facts_need_a_directory_that_is_there(llama_dir, world, write_spec, monkeypatch):
    facts = {"method": {"solve": {"pararel_facts": 4}}}
    spec = write_spec({"model": str(llama_dir), "pararel": "missing-dir", "edits": [_update(world)]} | facts)
    with pytest.raises(SpecError, match="pararel: PARAREL directory not found"):
        prepare(spec)
    assert prepare(spec, solving=False).pararel is None  # a check of a built checkpoint, a locate: not read
    with pytest.raises(SpecError, match="pararel_facts is set but no PARAREL directory is given"):
        prepare(write_spec({"model": str(llama_dir), "edits": [_update(world)]} | facts, "none.yaml"))
    monkeypatch.setenv(pararel.ENV, "/nowhere/at/all")  # a stale variable breaks nothing that does not read it
    assert prepare(write_spec({"model": str(llama_dir), "edits": [_update(world)]}, "plain.yaml")).pararel is None


def test_a_relation_the_directory_lacks_is_a_warning(llama_dir, world, tmp_path, write_spec):
    d = _pararel(tmp_path / "p", {"maker": world.facts["maker"]})
    doc = {"model": str(llama_dir), "pararel": str(d), "edits": [_update(world)], "method": {"solve": {"pararel_facts": 4}}}
    batch = prepare(write_spec(doc))
    assert preserve.pararel_prompts(batch, 4) == []
    assert len(batch.warnings) == 1 and "relation 'capital' has no facts in the PARAREL directory" in batch.warnings[0]


def test_prompts_kept_by_the_kl_alone_hold_their_answers(llama_dir, world, monkeypatch):
    """near prompts: kept by the KL term as keep prompts are, but outside the spread term's moments."""
    import torch

    from kn_edit import pipeline
    from kn_edit.apply import solve as S
    from kn_edit.measure.predict import predict_many
    from kn_edit.plan.prompts import encode, target_id

    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    temps = list(world.templates("capital"))
    (s, o), rest = world.facts["capital"][0], world.facts["capital"][1:12]
    ps = [encode(tok, t.replace("[X]", s), True) for t in temps[:2]]
    goal = S.Goal(ps, new_ids=target_id(tok, ps[0], next(x for x in world.objects("capital") if x != o), True))
    near = [encode(tok, temps[0].replace("[X]", x), True) for x, _ in rest]
    base = [int(p.argmax()) for p in predict_many(m, near)]
    columns = [(l, i) for l in (1, 2) for i in range(0, 256, 4)]
    kept, seen = {}, []
    moments = S._Delta.moments
    monkeypatch.setattr(S._Delta, "moments", lambda self, rows, layer: seen.append(len(rows)) or moments(self, rows, layer))
    for with_near in (False, True):
        st = S.Settings(steps=60, margin=1.0, keep=10)
        deltas, stats = S.solve(m, columns, [goal], settings=st, causal=True, near=near if with_near else ())
        assert stats.reached
        with torch.no_grad():
            saved = {c: S.arch.value_slots(m, c[0])[c[1]].clone() for c in deltas}
            for (l, i), d in deltas.items():
                S.arch.value_slots(m, l)[i] += d
            kept[with_near] = sum(int(p.argmax()) == b for p, b in zip(predict_many(m, near), base, strict=True))
            for (l, i), v in saved.items():
                S.arch.value_slots(m, l)[i] = v
    assert kept[True] >= kept[False] and kept[True] >= len(near) - 1, kept
    assert seen[0] == seen[1]  # not in the spread term's moments


def test_an_erase_keeps_the_kin_relations_facts(llama_dir, world, tmp_path, write_spec):
    """pararel_facts with an erase: facts of each relation whose answers are the erased answers (here `seat`,
    other subjects answering with cities), in that relation's own templates; not a relation with other
    answers (`maker`), not the erased relation, not a subject the spec names."""
    given = world.facts["capital"][:6]
    answers = {o for _, o in given}
    seat = [(s, world.facts["capital"][k][1]) for k, (s, _) in enumerate(world.facts["language"])]
    d = tmp_path / "p"
    (d / "patterns").mkdir(parents=True)
    (d / "trex").mkdir()
    for r, rows, temps in (("capital", world.facts["capital"], world.templates("capital")), ("seat", seat, world.templates("capital")[2:]),
                           ("maker", world.facts["maker"], world.templates("maker"))):  # fmt: skip
        (d / "patterns" / f"{r}.jsonl").write_text("".join(json.dumps({"pattern": t}) + "\n" for t in temps))
        (d / "trex" / f"{r}.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in rows))
    named = seat[0][0]  # a subject verify measures is never kept
    verify = {
        "facts": [
            {"relation": "seat", "templates": world.templates("capital")[:1], "facts": [{"subject": named, "target": seat[0][1]}]}
        ]
    }
    erase = {"erase": {"relation": "capital", "templates": list(world.templates("capital")), "facts": [{"subject": s, "target": o} for s, o in given]}}  # fmt: skip
    doc = {
        "model": str(llama_dir),
        "pararel": str(d),
        "edits": [erase],
        "verify": verify,
        "method": {"solve": {"pararel_facts": 5}},
    }
    batch = prepare(write_spec(doc))
    got = preserve.pararel_prompts(batch, 5)
    kin = {s for s, o in seat if o in answers and s != named}
    assert len(kin) > 5 and len(got) == 5 * 2  # 5 facts, the relation's two templates
    said = {s for s, _ in seat if any(f" {s} " in f" {p.text} " for p in got)}
    assert said <= kin and len(said) == 5
    assert all(any(p.text.startswith(t.split("[X]")[0]) for t in world.templates("capital")[2:]) for p in got)
    assert not any(s in p.text for p in got for s, _ in world.facts["maker"] + world.facts["capital"])
    assert got == preserve.pararel_prompts(batch, 5)  # seeded


def test_subject_prompts_put_the_edited_subject_into_other_relations_only(llama_dir, world, write_spec):
    """solve.subject_prompts: each update's own subject in shipped templates of other relations; none that
    shares a word with the update's templates (a paraphrase of the edited relation), seeded."""
    from kn_edit.measure.safety import shipped

    edits = [_update(world, 0), _update(world, 3)]
    b = prepare(write_spec({"model": str(llama_dir), "edits": edits}))
    out = preserve.subject_prompts(b, 100)
    subjects = [world.facts["capital"][k][0] for k in (0, 3)]
    shipped_temps = [t for t in shipped("templates_subject.txt").splitlines() if t.strip()]
    own_words = {"capital", "city", "seat", "government"}  # the world's capital templates' words of >= 4 letters
    free = [t for t in shipped_temps if not own_words & set(t.lower().replace(".", " ").split())]
    assert 0 < len(free) < len(shipped_temps)  # "[X] is the capital of [Y]." is left out
    for s in subjects:
        mine = [p.text for p in out if p.text.split()[0] == s or f" {s} " in p.text]
        assert sorted(mine) == sorted(t.replace("[X]", s) for t in free)
    assert all("capital" not in p.text for p in out)
    few = preserve.subject_prompts(b, 3, seed=1)
    assert len(few) == 6 and [p.ids for p in few] == [p.ids for p in preserve.subject_prompts(b, 3, seed=1)]
    assert preserve.subject_prompts(b, 0) == []


def test_the_edited_subject_keeps_its_other_relations(llama_dir, world):
    """about: the edited subject in other relations' prompts, held by the KL term: the edit still takes, and
    what the subject's prompts of other relations answer moves less, on those prompts and on unseen ones."""
    import torch

    from kn_edit import pipeline
    from kn_edit.apply import solve as S
    from kn_edit.measure.predict import predict_many
    from kn_edit.plan.prompts import encode, target_id

    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    (s, o) = world.facts["capital"][0]
    ps = [encode(tok, t.replace("[X]", s), True) for t in world.templates("capital")[:2]]
    goal = S.Goal(ps, new_ids=target_id(tok, ps[0], next(x for x in world.objects("capital") if x != o), True))
    other = [encode(tok, t.replace("[X]", s), True) for r in ("language", "maker") for t in world.templates(r)]
    about = [p for k, p in enumerate(other) if k % 4 != 3]  # the 4th template of each relation stays unseen
    base = [p.clamp_min(1e-30).log() for p in predict_many(m, other)]
    columns = [(l, i) for l in (1, 2) for i in range(0, 256, 4)]
    kl = {}
    for with_about in (False, True):
        deltas, stats = S.solve(m, columns, [goal], settings=S.Settings(steps=80, margin=1.0, keep=10), causal=True,
                                about=about if with_about else ())  # fmt: skip
        assert stats.reached
        with torch.no_grad():
            saved = {c: S.arch.value_slots(m, c[0])[c[1]].clone() for c in deltas}
            for (l, i), d in deltas.items():
                S.arch.value_slots(m, l)[i] += d
            after = [p.clamp_min(1e-30).log() for p in predict_many(m, other)]
            for (l, i), v in saved.items():
                S.arch.value_slots(m, l)[i] = v
        each = [float((b.exp() * (b - a)).sum()) for b, a in zip(base, after, strict=True)]
        kl[with_about] = [sum(each[k] for k in range(len(other)) if (k % 4 == 3) == held) / 2 for held in (False, True)]
    assert kl[True][0] < 0.5 * kl[False][0] and kl[True][1] < kl[False][1], kl


def test_subject_prompts_leave_out_where_the_model_answers_with_the_old_target(llama_dir, world, write_spec):
    """Given the model, a template where it answers the edited subject with the old target is left out (a
    paraphrase of the edited relation in other words: there the KL would hold the edit back)."""
    from kn_edit import pipeline
    from kn_edit.measure.predict import predict_many
    from kn_edit.measure.safety import shipped
    from kn_edit.plan.prompts import encode, target_id

    b = prepare(write_spec({"model": str(llama_dir), "edits": [_update(world, 0)]}))
    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    s, o = world.facts["capital"][0]
    free = [t for t in shipped("templates_subject.txt").splitlines() if t.strip() and "capital" not in t]
    filled = [encode(tok, t.replace("[X]", s), True) for t in free]
    says_old = [int(x.argmax()) == target_id(tok, p, o, True) for p, x in zip(filled, predict_many(m, filled), strict=True)]
    assert 0 < sum(says_old) < len(free)  # the tiny model answers its city for "The official language of [X] is"
    assert sorted(p.text for p in preserve.subject_prompts(b, 100)) == sorted(p.text for p in filled)
    kept = sorted(p.text for p in preserve.subject_prompts(b, 100, model=m))
    assert kept == sorted(p.text for p, old in zip(filled, says_old, strict=True) if not old)


def test_near_misses_end_in_the_subjects_last_word(llama_dir, world, write_spec):
    """solve.near_misses: per update with a subject of two or more words, its located prompts with the subject
    replaced by its last word alone and after other words (never the subject, nor one of its own words
    again), and by its siblings in turn; n names, seeded; none for a one-word subject or when n is 0."""
    s, t = world.facts["capital"][0][0], world.facts["capital"][1][0]
    two = {"update": _update(world, 0)["update"] | {"subject": f"{t} {s}"}}
    b = prepare(write_spec({"model": str(llama_dir), "edits": [two, _update(world, 3)], "verify": {"held_out": 1}}))
    got = preserve.near_misses(b, 4)
    assert len(got) == 2 and got[1] == []  # the one-word subject: none
    located = [p.text for p in b.edits[0].located_prompts]
    assert len(located) == 3  # the fourth template is held out, and not used
    texts = {p.text for p in got[0]}
    assert len(got[0]) == len(texts) == 3 * 4  # every located prompt, 4 names
    for p in got[0]:
        ending = [s, *(f"{m} {s}" for m in preserve.MODIFIERS + preserve.TOPICS)]
        name = next(n for n in ending + preserve.siblings(f"{t} {s}") if p.text.replace(n, f"{t} {s}") in located)
        assert name != f"{t} {s}" and (name not in ending or t not in p.text.split()) and p.subject is not None
    assert any(p.text == located[0].replace(f"{t} {s}", s) for p in got[0])  # the last word alone is always one
    assert [p.ids for p in preserve.near_misses(b, 4)[0]] == [p.ids for p in got[0]]  # seeded
    assert {p.text for p in preserve.near_misses(b, 4, seed=1)[0]} != texts
    assert preserve.near_misses(b, 0) == [[], []]


def test_siblings_differ_from_the_subject_in_one_word():
    """preserve.siblings: names one word apart from the subject, where a key read at the last token reads
    nearly as at the subject: one digit changed (in a word's last or first digit), or a word before the last
    one put in another's place (never a small word such as "of", never the last word); never the subject;
    a seeded order that takes the kinds in turn; none for a one-word subject without digits."""
    for subject, sibling in (
        ("Windows Server 2003", "Windows Server 2008"),
        ("Nintendo 3DS", "Nintendo 2DS"),
        ("Kingdom of Afghanistan", "Party of Afghanistan"),
    ):
        got = preserve.siblings(subject)
        words = subject.split()
        assert sibling in got and subject not in got and len(got) == len(set(got))
        for name in got:
            other = name.split()
            assert len(other) == len(words)
            ((i, (a, b)),) = [(i, ab) for i, ab in enumerate(zip(words, other)) if ab[0] != ab[1]]
            if any(c.isdigit() for c in a):  # one digit changed, the rest of the word kept
                ((x, y),) = [xy for xy in zip(a, b) if xy[0] != xy[1]]
                assert len(a) == len(b) and x.isdigit() and y.isdigit()
            else:
                assert i < len(words) - 1 and a not in preserve.SMALL and b in preserve.NOUNS + preserve.MODIFIERS
        assert got == preserve.siblings(subject) and got != preserve.siblings(subject, seed=1)
    digits = [
        any(c.isdigit() for c in n.split()[-1]) and n.split()[:-1] == ["Windows", "Server"]
        for n in preserve.siblings("Windows Server 2003")
    ]
    assert digits[0] and not digits[1]  # a digit first, then a word: the kinds in turn
    assert preserve.siblings("Israel") == [] and "Model 4" in preserve.siblings("Model 3")
    assert not any(n.split()[1] != "of" for n in preserve.siblings("Kingdom of Spain"))  # "of" and "Spain" stay
    assert preserve.siblings("Russian Soviet Federative Socialist Republic") == []  # no word put in a long name
    assert "social anthropology" in preserve.siblings("cultural anthropology")  # a topic before a lower-case word


def test_near_names_take_the_last_word_then_siblings_and_endings_in_turn():
    """preserve.near_names: the subject's last word first, then siblings and endings in turn: the last word
    after a modifier (after a topic too where it is lower case), or after "X of" where it is a name; n names,
    distinct, never the subject, seeded."""
    for subject, n in (("Vichy France", 16), ("economic anthropology", 12), ("Windows Server 2003", 20)):
        got = preserve.near_names(subject, n)
        last = subject.split()[-1]
        assert got[0] == last and len(got) == len(set(got)) == n and subject not in got
        sib = set(preserve.siblings(subject))
        assert got[1] in sib or not sib
        for name in got[1:]:
            head = name.removesuffix(f" {last}")
            ending = head in preserve.MODIFIERS or head.removesuffix(" of") in preserve.NOUNS or head in preserve.TOPICS
            assert name in sib or ending, name
        assert got == preserve.near_names(subject, n) and got != preserve.near_names(subject, n, seed=1)
    france = preserve.near_names("Vichy France", 40)
    assert any(n.endswith(" of France") for n in france) and not any(n.split()[0] in preserve.TOPICS for n in france)
    anthropology = preserve.near_names("economic anthropology", 40)
    assert any(n.split()[0] in preserve.TOPICS for n in anthropology) and not any(" of " in n for n in anthropology)
