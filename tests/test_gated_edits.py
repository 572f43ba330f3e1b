"""Update rules for gated MLPs: sign-aware direction, scale search, per-architecture defaults.

The mechanics do not need a model that knows facts, so these tests use an untrained synthetic
Llama (no training time); the trained ones are exercised end to end in the build tests."""

import pytest
import synth
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from kn_edit.apply import rules as edits
from kn_edit.apply.choose import resolve
from kn_edit.locate.stage import locate_fact
from kn_edit.measure import predict as verify
from kn_edit.model import arch
from kn_edit.plan.batch import Fact
from kn_edit.plan.prompts import encode, target_id
from kn_edit.spec import Method


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory, world):
    folder = tmp_path_factory.mktemp("untrained-llama")
    tok = synth.tokenizer(world, True)
    synth.model_for("llama", len(tok), seed=0).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def llama(llama_dir):
    return AutoModelForCausalLM.from_pretrained(llama_dir).eval(), AutoTokenizer.from_pretrained(llama_dir)


def fresh(llama_dir):
    m = AutoModelForCausalLM.from_pretrained(llama_dir).eval()
    m.requires_grad_(False)
    return m


def test_sign_aware_rows_follow_the_formula(llama_dir):
    m = fresh(llama_dir)
    emb = arch.output_embedding(m).detach().clone()
    ns = [(1, 5), (2, 7), (3, 9)]
    signs = {(1, 5): 0.4, (2, 7): -1.3, (3, 9): -0.01}
    before = {n: arch.value_slots(m, n[0])[n[1]].detach().clone() for n in ns}
    edits.update(m, ns, 7, 9, "plain", 2.0, 3.0, signs=signs, scale=0.5)
    for n in ns:
        s = 1.0 if signs[n] > 0 else -1.0
        expect = before[n] + s * 0.5 * (-2.0 * emb[7] + 3.0 * emb[9])
        torch.testing.assert_close(arch.value_slots(m, n[0])[n[1]], expect)

    m = fresh(llama_dir)
    edits.update(m, ns, 7, 9, "authors", 1.0, 8.0, signs=signs)
    for n in ns:
        v, s = before[n], (1.0 if signs[n] > 0 else -1.0)
        expect = v + s * (-v.norm() / emb[7].norm() * emb[7] + 8.0 * v.norm() / emb[9].norm() * emb[9])
        torch.testing.assert_close(arch.value_slots(m, n[0])[n[1]], expect)
        # the flipped rows moved away from e_t', the others towards it
        assert s * float((arch.value_slots(m, n[0])[n[1]] - v) @ emb[9]) > 0


def test_norm_cap_limits_the_change(llama_dir):
    m = fresh(llama_dir)
    v = arch.value_slots(m, 2)[3].detach().clone()
    edits.update(m, [(2, 3)], 7, 9, "plain", 1.0, 1.0, scale=1000.0, cap=0.5)
    change = arch.value_slots(m, 2)[3] - v
    assert float(change.norm()) == pytest.approx(0.5 * float(v.norm()), rel=1e-4)


def test_grid_is_geometric_and_bounded():
    g = edits.grid(0.25, 4.0, 2.0)
    assert g == [0.25, 0.5, 1.0, 2.0, 4.0]
    assert edits.grid(1.0, 3.0, 2.0) == [1.0, 2.0, 3.0]


def _fact(llama, world):
    model, tok = llama
    s, o = world.facts["capital"][3]
    new = next(x for x in world.objects("capital") if x != o)
    ps = [encode(tok, t.replace("[X]", s), True) for t in world.templates("capital")]
    return ps, target_id(tok, ps[0], o, True), target_id(tok, ps[0], new, True)


def _weights(m):
    return {l: arch.value_slots(m, l).detach().clone() for l in range(arch.shape(m)[0])}


def test_scale_search_writes_the_smallest_working_scale(llama, llama_dir, world):
    ps, old, new = _fact(llama, world)
    m = fresh(llama_dir)
    located = locate_fact(m, Fact("", "", old, ps), Method(steps=4).locate)
    ns = sorted(located.score, key=lambda n: -located.score[n])[:8]
    signs = located.activation
    base = _weights(m)
    scales = edits.grid(0.05, 200.0, 1.5)
    ds = edits.deltas(m, ns, old, new, "plain", 1.0, 1.0, signs)
    r = edits.search_scale(m, ds, ps, new, scales, need=0.75)
    assert r.ok and r.success >= 0.75

    x = fresh(llama_dir)
    rows = {n: arch.value_slots(x, n[0])[n[1]].clone() for n in ns}

    def works(scale):
        edits.write(x, edits.deltas(x, ns, old, new, "plain", 1.0, 1.0, signs), scale)
        ok = verify.rate(int(verify.predict(x, p).argmax()) == new for p in ps) >= 0.75
        with torch.no_grad():
            for (layer, i), row in rows.items():
                arch.value_slots(x, layer)[i] = row
        return ok

    k = scales.index(r.scale)
    assert k > 0, "the grid should start below the working scale for this test to mean something"
    assert works(r.scale) and not any(works(s) for s in scales[:k])
    # the tries left no trace: the weights are the base plus exactly one write at the chosen scale
    x = fresh(llama_dir)
    edits.write(x, edits.deltas(x, ns, old, new, "plain", 1.0, 1.0, signs), r.scale)
    after, expect = _weights(m), _weights(x)
    for layer in base:
        assert torch.equal(after[layer], expect[layer])


def test_scale_search_failure_writes_the_largest_scale_only(llama, llama_dir, world):
    ps, old, new = _fact(llama, world)
    m = fresh(llama_dir)
    ns = [(0, 1), (1, 2)]
    ds = edits.deltas(m, ns, old, new, "plain", 1.0, 1.0)
    r = edits.search_scale(m, ds, ps, new, [1e-6, 2e-6])
    assert not r.ok and r.scale == 2e-6 and r.tries == 2
    x = fresh(llama_dir)
    edits.write(x, edits.deltas(x, ns, old, new, "plain", 1.0, 1.0), 2e-6)
    for layer, w in _weights(m).items():
        assert torch.equal(w, _weights(x)[layer])


def test_defaults_per_architecture():
    gated, dense = arch.for_type("llama").gated, arch.for_type("bert").gated
    assert gated and not dense
    g = resolve(Method().update, gated)
    assert (g.rule, g.sign_aware, g.search, g.lambda1, g.lambda2, g.cap) == ("plain", True, True, 1.0, 1.0, 1.0)
    b = resolve(Method().update, dense)
    assert (b.rule, b.sign_aware, b.search, b.lambda1, b.lambda2, b.cap) == ("authors", False, False, 1.0, 8.0, None)
    assert resolve(Method(norm_cap=None).update, gated).cap is None
    # the authors' rule stays available on gated models, for fidelity to the paper
    f = resolve(Method(update_rule="authors", sign_aware=False, scale="fixed", norm_cap=None).update, gated)
    assert (f.rule, f.sign_aware, f.search, f.lambda2, f.cap) == ("authors", False, False, 8.0, None)


def test_build_records_the_chosen_scale(llama_dir, world, write_spec, tmp_path):
    from conftest import build, update_edit

    spec = {
        "model": str(llama_dir),
        "method": {"steps": 4, "update": {"rule": "plain"}},
        "edits": [update_edit(world, "capital", 2)],
    }
    spec = write_spec({**spec, "verify": {"safety": False}})
    report = build(spec, tmp_path / "out")
    e = report["edits"][0]
    assert e["rule"] == "plain" and e["sign_aware"] and e["scale_searched"]
    grid = edits.grid(0.25, 64.0, 1.41421356)
    assert e["scale"] in grid
    assert e["success_rate"] == 1.0 if e["scale_reached"] else e["scale"] == grid[-1]
