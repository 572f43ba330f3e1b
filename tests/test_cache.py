"""Neuron cache and sharded location: resumable, shared, and byte-identical to a plain build."""

import json
import logging

import pytest
from click.testing import CliRunner
from conftest import build as conftest_build
from conftest import update_edit

from kn_edit.cli import main
from kn_edit.errors import ShardError
from kn_edit.locate import attribution
from kn_edit.locate import cache as cachemod
from kn_edit.locate.shards import locate_shard, parse_shard
from kn_edit.model import arch
from kn_edit.plan.batch import prepare
from kn_edit.spec import Locate

STEPS = 4


def spec_data(world, llama_dir, **method):
    """An update of capital[0] (with capital[1:4] as relation facts) and erasures of capital[0:6] and
    language[0:4]: 14 facts in the edits, 10 distinct ones (4 prompts each)."""
    upd = update_edit(world, "capital", 0)
    upd["update"]["relation_facts"] = [{"subject": s, "target": o} for s, o in world.facts["capital"][1:4]]
    erase = lambda rel, k: {
        "erase": {
            "relation": rel,
            "templates": list(world.templates(rel)),
            "facts": [{"subject": s, "target": o} for s, o in world.facts[rel][:k]],
        }
    }
    return {
        "model": str(llama_dir),
        "seed": 0,
        "method": {"steps": STEPS, "erase_min_facts": 2, **method},
        "edits": [upd, erase("capital", 6), erase("language", 4)],
    }


FACTS, PROMPTS = 10, 4  # distinct facts, prompts per fact


@pytest.fixture
def calls(monkeypatch):
    """Counts attribution runs (one per prompt located)."""
    n = {"scores": 0}
    real = attribution.scores

    def counted(*a, **k):
        n["scores"] += 1
        return real(*a, **k)

    monkeypatch.setattr(attribution, "scores", counted)
    return n


def build(spec_path, out, cache=None):
    conftest_build(spec_path, out, cache=cache)
    return (out / "model.safetensors").read_bytes(), (out / "neurons.json").read_text()


def entries(cache_dir):
    return sorted(cache_dir.glob("*/*.json"))


def test_sharded_locate_then_build_is_byte_identical(world, llama_dir, write_spec, tmp_path, calls):
    spec = write_spec(spec_data(world, llama_dir))
    plain = build(spec, tmp_path / "plain")
    cache_dir = tmp_path / "cache"
    stats = [locate_shard(spec, cache_dir, (i, 2)) for i in range(2)]
    facts = stats[0]["facts"]
    assert facts == FACTS
    assert [s["assigned"] for s in stats] == [5, 5] and [s["computed"] for s in stats] == [5, 5]
    assert len(entries(cache_dir)) == facts

    calls["scores"] = 0
    merged = build(spec, tmp_path / "merged", cache=cache_dir)
    assert calls["scores"] == 0
    assert merged == plain

    # a second run of a shard finds everything cached
    assert locate_shard(spec, cache_dir, (1, 2))["computed"] == 0


def test_changed_setting_recomputes_only_what_it_affects(world, llama_dir, write_spec, tmp_path, calls):
    cache_dir = tmp_path / "cache"
    spec = write_spec(spec_data(world, llama_dir), "a.yaml")
    build(spec, tmp_path / "a", cache=cache_dir)
    first = calls["scores"]
    assert first == FACTS * PROMPTS  # a fact listed twice is located once

    edit_only = write_spec(spec_data(world, llama_dir, lambda2=4.0, share=0.5), "b.yaml")
    calls["scores"] = 0
    build(edit_only, tmp_path / "b", cache=cache_dir)
    assert calls["scores"] == 0

    located = write_spec(spec_data(world, llama_dir, threshold=0.3), "c.yaml")
    calls["scores"] = 0
    build(located, tmp_path / "c", cache=cache_dir)
    assert calls["scores"] == first
    assert len(entries(cache_dir)) == 2 * FACTS


def test_corrupt_entry_is_detected_and_recomputed(world, llama_dir, write_spec, tmp_path, calls, caplog):
    cache_dir = tmp_path / "cache"
    spec = write_spec(spec_data(world, llama_dir))
    good = build(spec, tmp_path / "a", cache=cache_dir)
    victim, truncated = entries(cache_dir)[:2]
    doc = json.loads(victim.read_text())
    l, i, v = doc["located"]["score"][0]
    doc["located"]["score"][0] = [l, i, v * 2]  # plausible JSON, wrong numbers: only the checksum tells
    victim.write_text(json.dumps(doc))
    truncated.write_bytes(truncated.read_bytes()[:100])

    again = _rebuilt_warning_twice(calls, caplog, spec, tmp_path / "b", cache_dir)
    assert again == good
    assert json.loads(victim.read_text())["located"]["score"][0] == [l, i, v]


def test_interrupted_run_resumes(world, llama_dir, write_spec, tmp_path, calls, monkeypatch):
    cache_dir = tmp_path / "cache"
    spec = write_spec(spec_data(world, llama_dir))
    counted = attribution.scores

    def dies(*a, **k):
        if calls["scores"] == 2 * PROMPTS + 1:  # two facts done, the third cut off on its second prompt
            raise KeyboardInterrupt
        return counted(*a, **k)

    monkeypatch.setattr(attribution, "scores", dies)
    with pytest.raises(KeyboardInterrupt):
        build(spec, tmp_path / "out", cache=cache_dir)
    assert not (tmp_path / "out").exists()
    assert len(entries(cache_dir)) == 2
    assert not list(cache_dir.glob("*/.*.tmp"))

    monkeypatch.setattr(attribution, "scores", counted)
    calls["scores"] = 0
    resumed = build(spec, tmp_path / "out", cache=cache_dir)
    assert calls["scores"] == (FACTS - 2) * PROMPTS
    assert resumed == build(spec, tmp_path / "plain")


def test_key_covers_model_prompts_and_dtype(world, llama_dir, write_spec, tmp_path):
    prep = prepare(write_spec(spec_data(world, llama_dir)))
    method = prep.spec.method.locate
    f, g = prep.edits[0].facts[:2]
    a = cachemod.Cache(tmp_path / "x", {"kind": "folder", "sha256": {"model.safetensors": "0" * 64}})
    b = cachemod.Cache(tmp_path / "x", {"kind": "folder", "sha256": {"model.safetensors": "1" * 64}})
    assert a.key(f, method) != b.key(f, method)
    assert a.key(f, method) != a.key(g, method)
    assert a.key(f, method) != cachemod.Cache(tmp_path / "x", a.identity, "bfloat16").key(f, method)
    assert a.key(f, method) == cachemod.Cache(tmp_path / "y", dict(a.identity), "fp32").key(f, method)


def test_a_default_rule_keeps_the_keys_other_rules_change_them(world, llama_dir, write_spec, tmp_path):
    """Entries written before quadrature rules existed keep their keys: the default rule stays out."""
    prep = prepare(write_spec(spec_data(world, llama_dir)))
    method = prep.spec.method.locate
    f = prep.edits[0].facts[0]
    a = cachemod.Cache(tmp_path / "x", {"kind": "folder", "sha256": {"model.safetensors": "0" * 64}})
    assert method.rule == "riemann"
    assert cachemod.inputs(a.identity, f, method, "float32")["method"] == {"steps": STEPS, "threshold": 0.2, "engine": "fast"}
    keys = {r: a.key(f, method.model_copy(update={"rule": r})) for r in attribution.QUADRATURE}
    assert keys["riemann"] == a.key(f, method)
    assert len(set(keys.values())) == len(attribution.QUADRATURE)
    own = lambda rule, m: Locate.model_validate({"steps": STEPS, "layer_rules": {0: {"rule": rule, "steps": m}}})
    assert len({a.key(f, method), a.key(f, own("gauss", 4)), a.key(f, own("gauss", 5)), a.key(f, own("midpoint", 4))}) == 4


def test_the_rule_reaches_attribution(world, llama_dir, write_spec):
    from kn_edit.locate.neurons import coarse
    from kn_edit.locate.stage import locate_fact
    from kn_edit.pipeline import load

    prep = prepare(write_spec(spec_data(world, llama_dir, locate={"rule": "gauss"})))
    method = prep.spec.method.locate
    assert (method.rule, method.steps) == ("gauss", STEPS)
    f = prep.edits[0].facts[0]
    model = load(str(llama_dir), device="cpu").model
    got = locate_fact(model, f, method)
    mean = lambda rule: (
        sum(attribution.fast(model, p, f.target_ids, attribution.Quadrature(STEPS, rule)) for p in f.prompts) / len(f.prompts)
    )
    gauss, paper = mean("gauss"), mean("riemann")
    assert got.coarse == [
        coarse(attribution.fast(model, p, f.target_ids, attribution.Quadrature(STEPS, "gauss")), 0.2) for p in f.prompts
    ]
    assert got.score == pytest.approx({n: float(gauss[n]) for n in got.score}, rel=1e-5)
    assert got.score != pytest.approx({n: float(paper[n]) for n in got.score}, rel=1e-3)


def test_layer_rules_reach_attribution_and_are_checked_against_the_model(world, llama_dir, write_spec, tmp_path):
    """Located with a layer of its own rule: the scores are attribution's with those layer rules (not
    the uniform rule's); a layer the model lacks is one line naming the spec file and the field (exit 2)."""
    from kn_edit.locate.stage import locate_fact
    from kn_edit.pipeline import load

    own = {"rule": "gauss", "layer_rules": {0: {"rule": "riemann", "steps": STEPS}}}
    prep = prepare(write_spec(spec_data(world, llama_dir, locate=own)))
    method = prep.spec.method.locate
    f = prep.edits[0].facts[0]
    model = load(str(llama_dir), device="cpu").model
    got = locate_fact(model, f, method)
    mean = lambda q: sum(attribution.fast(model, p, f.target_ids, q) for p in f.prompts) / len(f.prompts)
    want = mean(attribution.Quadrature(STEPS, "gauss", layers={0: ("riemann", STEPS)}))
    assert got.score == pytest.approx({n: float(want[n]) for n in got.score}, rel=1e-5)
    uniform = mean(attribution.Quadrature(STEPS, "gauss"))
    assert any(l == 0 for l, _ in got.score)  # layer 0 is among the located, so the rule shows
    assert got.score != pytest.approx({n: float(uniform[n]) for n in got.score}, rel=1e-3)
    # the activations come from attribution's own clean pass: those of a plain forward pass
    acts = sum(attribution.clean_activations(model, p)[0] for p in f.prompts) / len(f.prompts)
    assert got.activation == pytest.approx({n: float(acts[n]) for n in got.activation}, rel=1e-4, abs=1e-6)

    L = arch.shape(model)[0]
    path = write_spec(spec_data(world, llama_dir, locate={"layer_rules": {L: {"rule": "gauss", "steps": 4}}}))
    r = CliRunner().invoke(main, ["build", str(path), str(tmp_path / "out"), "--device", "cpu"])
    assert r.exit_code == 2, r.output
    assert (
        r.output.strip()
        == f"error: {path}: method.locate.layer_rules: layer {L} is not a layer of this model (it has 0..{L - 1})"
    )
    assert not (tmp_path / "out").exists()


def test_parse_shard():
    assert parse_shard("1/4", env={}) == (1, 4)
    assert parse_shard(None, env={}) == (0, 1)
    assert parse_shard(None, env={"RANK": "3", "WORLD_SIZE": "8"}) == (3, 8)
    assert parse_shard("0/2", env={"RANK": "3", "WORLD_SIZE": "8"}) == (0, 2)
    for bad in ("2/2", "-1/2", "1", "a/b", "1/0"):
        with pytest.raises(ShardError, match="i/N|0 <= i < N"):
            parse_shard(bad, env={})


def test_cli_locate_shards_then_build(world, llama_dir, write_spec, tmp_path):
    spec = write_spec(spec_data(world, llama_dir))
    cache_dir = tmp_path / "cache"
    r = CliRunner().invoke(main, ["locate", str(spec), "--shard", "5/2", "--cache", str(cache_dir)])
    assert r.exit_code == 2 and "--shard" in r.output
    for i in range(3):
        r = CliRunner().invoke(main, ["locate", str(spec), "--shard", f"{i}/3", "--cache", str(cache_dir), "--device", "cpu"])
        assert r.exit_code == 0, r.output
        assert f"shard {i}/3 on cpu: {[4, 3, 3][i]} of 10 facts, {[4, 3, 3][i]} computed" in r.output
    r = CliRunner().invoke(main, ["build", str(spec), str(tmp_path / "out"), "--cache", str(cache_dir), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    r = CliRunner(env={"RANK": "1", "WORLD_SIZE": "3"}).invoke(main, ["locate", str(spec), "--cache", str(cache_dir)])
    assert r.exit_code == 0 and "shard 1/3 on cpu: 3 of 10 facts, 0 computed, 3 already cached" in r.output


def test_locate_keys_facts_as_build_does_with_held_out_prompts(world, llama_dir, write_spec, tmp_path, calls):
    # build locates an update's fact without its held-out prompts; locate must store that same entry
    data = {**spec_data(world, llama_dir), "verify": {"held_out": 1}}
    spec = write_spec(data)
    cache_dir = tmp_path / "cache"
    locate_shard(spec, cache_dir, (0, 1))
    calls["scores"] = 0
    build(spec, tmp_path / "out", cache=cache_dir)
    assert calls["scores"] == 0


def test_unusable_entries_are_misses_warned_and_overwritten(world, llama_dir, write_spec, tmp_path, calls, caplog):
    """Deeply nested JSON (RecursionError) and an entry whose checksum holds but whose neurons do not
    exist in the model: each is a miss with a warning, recomputed and overwritten."""
    cache_dir = tmp_path / "cache"
    spec = write_spec(spec_data(world, llama_dir))
    good = build(spec, tmp_path / "a", cache=cache_dir)
    nested, impossible = entries(cache_dir)[:2]
    kept = impossible.read_text()
    nested.write_text("[" * 200_000 + "]" * 200_000)
    doc = json.loads(impossible.read_text())
    doc["located"]["coarse"][0].append([999, 0])  # no layer 999 in the tiny model
    body = {k: doc[k] for k in ("format", "format_version", "key", "inputs", "located")}
    doc["checksum"] = cachemod._digest(body)  # a valid checksum: only the model's shape tells
    impossible.write_text(json.dumps(doc))

    again = _rebuilt_warning_twice(calls, caplog, spec, tmp_path / "b", cache_dir)
    assert again == good
    assert json.loads(impossible.read_text())["located"] == json.loads(kept)["located"]
    assert json.loads(nested.read_text())["format"] == cachemod.FORMAT


def test_unwritable_cache_is_one_line_before_any_work(world, llama_dir, write_spec, tmp_path, calls):
    (tmp_path / "file").write_text("not a folder")
    spec = write_spec(spec_data(world, llama_dir))
    r = CliRunner().invoke(
        main, ["build", str(spec), str(tmp_path / "out"), "--device", "cpu", "--cache", str(tmp_path / "file" / "c")]
    )
    assert r.exit_code == 2, r.output
    assert (
        r.output.strip()
        == f"error: neuron cache {tmp_path / 'file' / 'c'}: cannot write there: Not a directory (use --cache DIR or --no-cache)"
    )
    assert calls["scores"] == 0 and not (tmp_path / "out").exists()


def test_a_full_disk_under_the_cache_is_a_warning(world, llama_dir, write_spec, tmp_path, monkeypatch, caplog):
    def full(*a, **k):
        raise OSError(28, "No space left on device")  # a full disk cannot be made here

    monkeypatch.setattr(cachemod.Cache, "_write", full)
    spec = write_spec(spec_data(world, llama_dir))
    with caplog.at_level(logging.WARNING, logger="kn_edit.cache"):
        got = build(spec, tmp_path / "a", cache=tmp_path / "cache")
    assert got == build(spec, tmp_path / "b")
    assert sum("No space left on device" in r.message for r in caplog.records) >= FACTS


def _rebuilt_warning_twice(calls, caplog, spec, out, cache_dir):
    """A build over a cache with two damaged entries: both recomputed, both warned about."""
    calls["scores"] = 0
    with caplog.at_level(logging.WARNING, logger="kn_edit.cache"):
        again = build(spec, out, cache=cache_dir)
    assert calls["scores"] == 2 * PROMPTS
    assert sum("corrupt neuron cache entry" in r.message for r in caplog.records) == 2
    return again


def test_batch_stays_out_of_the_key_at_one(world, llama_dir, write_spec, tmp_path):
    """Prompts per pass change the scores' last bits: batch > 1 is keyed; the default 1 is not."""
    prep = prepare(write_spec(spec_data(world, llama_dir)))
    method = prep.spec.method.locate
    f = prep.edits[0].facts[0]
    a = cachemod.Cache(tmp_path / "x", {"kind": "folder", "sha256": {"model.safetensors": "0" * 64}})
    assert method.batch == 1 and "batch" not in cachemod.inputs(a.identity, f, method, "float32")["method"]
    keys = {b: a.key(f, method.model_copy(update={"batch": b})) for b in (1, 2, 8)}
    assert keys[1] == a.key(f, method) and len(set(keys.values())) == 3


def test_batched_locate_finds_the_same_neurons_and_caches_them(world, llama_dir, write_spec, tmp_path, monkeypatch):
    """method.locate.batch: 3: the prompts of all facts attributed 3 per pass. The build's neurons are those
    of one prompt at a time (scores within float rounding), every distinct fact is located once and
    stored, and a second build and a shard find them all."""
    prompts = []
    real = attribution.scores_many
    monkeypatch.setattr(
        attribution, "scores_many", lambda m, items, *a, **k: prompts.append(len(items)) or real(m, items, *a, **k)
    )
    plain = json.loads(build(write_spec(spec_data(world, llama_dir), "a.yaml"), tmp_path / "a")[1])
    spec = write_spec(spec_data(world, llama_dir, locate={"batch": 3}), "b.yaml")
    cache_dir = tmp_path / "cache"
    prompts.clear()
    batched = json.loads(build(spec, tmp_path / "b", cache=cache_dir)[1])
    assert sum(prompts) == FACTS * PROMPTS  # a fact listed twice is located once
    assert len(entries(cache_dir)) == FACTS
    facts = lambda doc: [f for e in doc["edits"] for f in e["facts"]]
    which = lambda doc: [(e["edited"], [(f["coarse"], [(n["layer"], n["index"]) for n in f["neurons"]]) for f in e["facts"]]) for e in doc["edits"]]  # fmt: skip
    scores = lambda doc: [n["score"] for f in facts(doc) for n in f["neurons"]]
    assert which(batched) == which(plain) and len(facts(plain)) == 11  # the update, 6 + 4 erased
    assert scores(batched) == pytest.approx(scores(plain), rel=1e-5)
    prompts.clear()
    again = json.loads(build(spec, tmp_path / "c", cache=cache_dir)[1])
    assert sum(prompts) == 0 and again == batched
    stats = locate_shard(spec, cache_dir, (0, 1))
    assert stats["computed"] == 0 and stats["cached"] == FACTS
