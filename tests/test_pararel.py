"""PARAREL input: expansion of source: pararel edits, skip counts, error paths, spec-from-pararel."""

import json

import pytest
import yaml
from click.testing import CliRunner
from conftest import PARAREL
from synth import RELATIONS

from kn_edit.cli import main
from kn_edit.plan import pararel
from kn_edit.plan.batch import prepare
from kn_edit.spec import SpecError

UNUSABLE = "[Y] is where [X] keeps its capital ."  # [Y] not at the end: a causal model cannot use it
MULTI = "city1 city2"  # two tokens of the tiny models
UNKNOWN = "atlantis"  # not in the tiny models' vocabulary


@pytest.fixture
def pdir(tmp_path, world):
    """The synthetic world in PARAREL format: patterns/ and trex/ for capital and maker,
    the query_pairs form for language; plus one unusable template, one multi-token fact and one fact
    whose target is an unknown word."""
    d = tmp_path / "pararel"
    (d / "patterns").mkdir(parents=True)
    (d / "trex").mkdir()
    for rel, (temps, _) in RELATIONS.items():
        rows = [{"pattern": t} for t in temps] + ([{"pattern": UNUSABLE}] if rel == "capital" else [])
        (d / "patterns" / f"{rel}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    for rel in ("capital", "maker"):
        facts = world.facts[rel] + ([("cap98", UNKNOWN), ("mak23", MULTI)] if rel == "capital" else [])
        (d / "trex" / f"{rel}.jsonl").write_text("".join(json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in facts))
    (d / "authors").mkdir()
    (d / "authors" / "query_pairs.json").write_text(json.dumps({"language": [list(f) for f in world.facts["language"]]}))
    return d


def _spec(model, edits, **extra):
    return {"model": str(model), **extra, "edits": edits}


def test_erase_expands_with_skip_counts(llama_dir, pdir, world, write_spec):
    path = write_spec(_spec(llama_dir, [{"erase": {"relation": "capital", "source": "pararel", "facts": 5}}], pararel=str(pdir)))
    prep = prepare(path)
    (p,) = prep.edits
    assert p.kind == "erase" and p.skipped == {"templates": 1, "facts": 1}
    assert [(f.subject, f.target) for f in p.facts] == world.facts["capital"][:5]
    (p,) = prepare(
        write_spec(_spec(llama_dir, [{"erase": {"relation": "capital", "source": "pararel"}}], pararel=str(pdir)))
    ).edits
    assert p.facts[-1].subject == "mak23" and len(p.facts[-1].target_ids) == 2  # several tokens: kept
    assert all(len(f.prompts) == 4 and all(not pr.text.startswith("[Y]") for pr in f.prompts) for f in p.facts)


def test_masked_model_keeps_the_y_first_template(bert_dir, pdir, world, write_spec):
    path = write_spec(_spec(bert_dir, [{"erase": {"relation": "capital", "source": "pararel"}}]))
    (p,) = prepare(path, pdir).edits
    assert p.skipped == {"templates": 0, "facts": 1}
    assert len(p.facts) == len(world.facts["capital"]) + 1 and len(p.facts[0].prompts) == 5


def test_update_takes_templates_and_target_from_data(llama_dir, pdir, world, write_spec, monkeypatch):
    monkeypatch.setenv(pararel.ENV, str(pdir))
    s, o = world.facts["language"][3]
    new = next(x for x in world.objects("language") if x != o)
    path = write_spec(
        _spec(llama_dir, [{"update": {"relation": "language", "subject": s, "new_target": new, "source": "pararel"}}])
    )
    (p,) = prepare(path).edits
    assert (p.facts[0].subject, p.facts[0].target, p.new_target) == (s, o, new)
    assert [pr.text for pr in p.facts[0].prompts] == [t.replace("[X]", s) for t in world.templates("language")]
    assert p.skipped == {"templates": 0, "facts": 0}


def test_cli_dir_wins_over_spec_and_env(llama_dir, pdir, tmp_path, write_spec, monkeypatch):
    monkeypatch.setenv(pararel.ENV, str(tmp_path / "nowhere"))
    path = write_spec(
        _spec(llama_dir, [{"erase": {"relation": "maker", "source": "pararel", "facts": 2}}], pararel="also-nowhere")
    )
    (p,) = prepare(path, pdir).edits
    assert len(p.facts) == 2 and p.skipped == {"templates": 0, "facts": 0}


@pytest.mark.parametrize(
    "edit, extra, field, words",
    [
        ({"erase": {"relation": "capital", "source": "pararel"}}, {}, "pararel", "no PARAREL directory"),
        ({"erase": {"relation": "capital", "source": "pararel"}}, {"pararel": "missing-dir"}, "pararel", "not found"),
        ({"erase": {"relation": "P999", "source": "pararel"}}, None, "edits[0].erase.relation", "no templates"),
        (
            {"update": {"relation": "capital", "subject": "nobody", "new_target": "city1", "source": "pararel"}},
            None,
            "edits[0].update.subject",
            "not a subject",
        ),
        (
            {
                "update": {
                    "relation": "capital",
                    "subject": "cap0",
                    "target": "city7x",
                    "new_target": "city1",
                    "source": "pararel",
                }
            },
            None,
            "edits[0].update.target",
            "has no fact",
        ),
        (
            {"update": {"relation": "capital", "subject": "cap0", "new_target": UNKNOWN, "source": "pararel"}},
            None,
            "edits[0].update.new_target",
            "unknown to this model",
        ),
        (
            {"erase": {"relation": "capital", "source": "pararel", "templates": ["[X] is [Y] ."]}},
            None,
            "edits[0].erase",
            "leave out templates",
        ),
    ],
)
def test_errors_name_the_field(llama_dir, pdir, write_spec, monkeypatch, edit, extra, field, words):
    monkeypatch.delenv(pararel.ENV, raising=False)
    path = write_spec(_spec(llama_dir, [edit], **(extra if extra is not None else {"pararel": str(pdir)})))
    with pytest.raises(SpecError) as e:
        prepare(path)
    assert any(loc == field and words in msg for loc, msg in e.value.problems), e.value.problems


def test_explicit_spec_still_errors_on_unusable_template(llama_dir, world, write_spec):
    s, o = world.facts["capital"][0]
    path = write_spec(
        _spec(llama_dir, [{"erase": {"relation": "capital", "templates": [UNUSABLE], "facts": [{"subject": s, "target": o}]}}])
    )
    with pytest.raises(SpecError, match=r"\[Y\] must end the prompt"):
        prepare(path)


def test_missing_relation_facts(llama_dir, pdir, write_spec):
    (pdir / "patterns" / "P1.jsonl").write_text(json.dumps({"pattern": "[X] is [Y] ."}) + "\n")
    path = write_spec(_spec(llama_dir, [{"erase": {"relation": "P1", "source": "pararel"}}], pararel=str(pdir)))
    with pytest.raises(SpecError, match="has no facts"):
        prepare(path)


def test_spec_from_pararel_picks_known_facts(llama_dir, pdir, world, tmp_path):
    out = tmp_path / "picked.yaml"
    r = CliRunner().invoke(
        main,
        [
            "spec-from-pararel",
            "--relation",
            "capital",
            "--facts",
            "3",
            "--model",
            str(llama_dir),
            "--pararel",
            str(pdir),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    spec = yaml.safe_load(out.read_text())
    ups = [e["update"] for e in spec["edits"]]
    assert len(ups) == 3
    known = dict(world.facts["capital"])
    for u in ups:
        assert (
            known[u["subject"]] == u["target"]
            and u["new_target"] in [*world.objects("capital"), MULTI]
            and u["new_target"] != u["target"]
        )
    # the tiny model knows its world: the first facts in data order are the ones picked
    assert [u["subject"] for u in ups] == [s for s, _ in world.facts["capital"][:3]]
    # and the written spec is valid as it stands
    r = CliRunner().invoke(main, ["validate", str(out)])
    assert r.exit_code == 0, r.output


def test_known_rejects_facts_the_model_does_not_know(llama_dir, pdir, world):
    from kn_edit.model import load as models

    src = models.resolve(str(llama_dir))
    tok, (model, _) = models.load_tokenizer(src), models.load_model(src)
    temps = list(world.templates("capital"))
    s, o = world.facts["capital"][0]
    wrong = next(x for x in world.objects("capital") if x != o)
    assert pararel.known(model, tok, True, temps, s, o)
    assert not pararel.known(model, tok, True, temps, s, wrong)


@pytest.mark.skipif(not (PARAREL / "patterns").is_dir(), reason="PARAREL data not available")
def test_real_pararel_relation():
    temps = pararel.templates(PARAREL, "P36")
    facts = pararel.facts(PARAREL, "P36")
    assert len(temps) >= 4 and all("[X]" in t and "[Y]" in t for t in temps)
    assert len(facts) > 100 and ("Germany", "Berlin") in facts
    usable = pararel.usable_templates(temps, causal=True)
    assert 0 < len(usable) < len(temps) and all(t.rstrip(" .").endswith("[Y]") for t in usable)


def test_erase_facts_list_errors_keep_a_clean_path():
    from kn_edit.spec import parse

    bad = {"model": "m", "edits": [{"erase": {"relation": "P1", "templates": ["[X] is [Y] ."], "facts": [{"subject": "a"}]}}]}
    with pytest.raises(SpecError) as e:
        parse(bad)
    assert e.value.problems == [("edits[0].erase.facts[0].target", "required field is missing")]


def test_spec_from_pararel_min_tokens_keeps_multi_token_answers_only(llama_dir, pdir):
    """The tiny world's one multi-token answer (mak23 -> MULTI) is a fact the model never learnt."""
    args = ["spec-from-pararel", "--relation", "capital", "--model", str(llama_dir), "--pararel", str(pdir)]
    r = CliRunner().invoke(main, [*args, "--min-tokens", "2"])
    assert r.exit_code != 0 and "knows none" in r.output, r.output
    r = CliRunner().invoke(main, [*args, "--min-tokens", "1", "--facts", "1"])
    assert r.exit_code == 0 and "subject: cap0" in r.output, r.output
