"""End to end on small trained models: the edit works, far better than random neurons, stays
mostly local, touches only the located value slots, and is reproducible to the byte."""

import json
import random

import pytest
import torch
from click.testing import CliRunner
from conftest import build, changed, padded, update_edit
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from kn_edit.cli import main
from kn_edit.measure import predict as verify
from kn_edit.model import arch
from kn_edit.model import load as models
from kn_edit.plan.prompts import encode, target_id

AUTO = {"bert": AutoModelForMaskedLM, "llama": AutoModelForCausalLM}
EDITED = [0, 5, 10, 15]  # facts of the "capital" relation that the specs update


# On models this small a value slot must change by more than its own norm before an edit takes,
# so the gated default's norm cap (chosen on SmolLM2, see the README) is lifted here.
UNCAPPED = {"norm_cap": None}


def spec_for(model_dir, world, **method):
    return {
        "model": str(model_dir),
        "seed": 0,
        "method": {**UNCAPPED, **method},
        "edits": [update_edit(world, "capital", k) for k in EDITED],
    }


@pytest.fixture(scope="module", params=["bert", "llama"])
def built(request, tmp_path_factory):
    kind = request.param
    model_dir = request.getfixturevalue(f"{kind}_dir")
    world = request.getfixturevalue("world")
    folder = tmp_path_factory.mktemp(f"built-{kind}")
    (folder / "spec.yaml").write_text(json.dumps(spec_for(model_dir, world)))
    report = build(folder / "spec.yaml", folder / "out")
    return kind, model_dir, world, folder, report


def answers(model, tok, causal, world, relation, subjects=None):
    out = {}
    for s, _o in world.facts[relation]:
        if subjects is None or s in subjects:
            for t in world.templates(relation):
                p = encode(tok, t.replace("[X]", s), causal)
                out[(s, t)] = int(verify.predict(model, p).argmax())
    return out


def test_update_succeeds_far_above_random_neurons_and_stays_local(built):
    """The checkpoint's weight changes moved onto random columns of the same layers (read from the
    safetensors files, whatever rule wrote them) do not make the edits."""
    kind, model_dir, world, folder, report = built
    causal = kind != "bert"
    success = [e["success_rate"] for e in report["edits"]]
    assert sum(success) / len(success) >= 0.75, success

    src = models.resolve(model_dir)
    tok = models.load_tokenizer(src)
    base_w = load_file(model_dir / "model.safetensors")
    new_w = load_file(folder / "out" / "model.safetensors")
    m, _ = models.load_model(src)
    rng = random.Random(0)
    values = {arch.value_param_name(m, l) for l in range(arch.shape(m)[0])}
    with torch.no_grad():
        for name, w in m.named_parameters():
            if name not in values or name not in changed(base_w, {name: new_w[name]}):
                continue
            # [hidden, intermediate (+ added)]: changed columns are value slots (added neurons' too; their
            # keys are not moved: the control writes existing neurons, as kn-edit's own does)
            diff = new_w[name] - padded(base_w[name], new_w[name])
            cols = diff.abs().sum(0).nonzero().flatten().tolist()
            moved = rng.sample([c for c in range(w.shape[1]) if c not in cols], len(cols))
            for c, r in zip(cols, moved, strict=True):
                w[:, r] += diff[:, c]
    hits = total = 0
    for k in EDITED:
        s, _ = world.facts["capital"][k]
        new = update_edit(world, "capital", k)["update"]["new_target"]
        for t in world.templates("capital"):
            p = encode(tok, t.replace("[X]", s), causal)
            hits += int(verify.predict(m, p).argmax()) == target_id(tok, p, new, causal)
            total += 1
    random_success = hits / total
    assert random_success <= 0.25 and sum(success) / len(success) >= random_success + 0.5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_one_update_leaves_other_relations_mostly_unchanged(kind, request, world, write_spec, tmp_path):
    # One edit: other relations keep most answers. Several edits of one relation at once are much
    # less local on models this small (measured in the README), so that is not asserted here.
    model_dir = request.getfixturevalue(f"{kind}_dir")
    spec = {"model": str(model_dir), "method": UNCAPPED, "edits": [update_edit(world, "capital", 0)]}
    report = build(write_spec(spec), tmp_path / "out")
    assert report["edits"][0]["success_rate"] == 1.0
    src = models.resolve(model_dir)
    tok = models.load_tokenizer(src)
    base, _ = models.load_model(src)
    edited = AUTO[kind].from_pretrained(tmp_path / "out").eval()
    kept = []
    for rel in ("language", "maker"):
        a, b = answers(base, tok, kind != "bert", world, rel), answers(edited, tok, kind != "bert", world, rel)
        kept += [a[x] == b[x] for x in a]
    assert sum(kept) / len(kept) >= 0.8, sum(kept) / len(kept)


def test_only_located_value_slots_change(built):
    """Only the edited neurons' value slots change (and, where the default adds memory neurons, their
    gate and up rows; every other weight of a widened FFN is the base's, or zero)."""
    kind, model_dir, world, folder, report = built
    base = load_file(model_dir / "model.safetensors")
    new = load_file(folder / "out" / "model.safetensors")
    assert base.keys() == new.keys()
    neurons = json.loads((folder / "out" / "neurons.json").read_text())
    expected = {}
    model = AUTO[kind].from_pretrained(model_dir)
    width = arch.shape(model)[1]
    keyed = any(i >= width for e in neurons["edits"] for _, i in e["edited"])  # added neurons (select: add)
    names = (arch.value_param_name,) + ((arch.gate_param_name, arch.key_param_name) if keyed else ())
    for e in neurons["edits"]:
        for layer, idx in e["edited"]:
            for name in names:
                expected.setdefault(name(model, layer), set()).add(idx)
    assert changed(base, new) == set(expected) == set(report["changed_tensors"])
    for name, idx in expected.items():
        w_old, w_new = padded(base[name], new[name]), new[name]
        differ = (
            (w_old != w_new).any(0) if name.endswith(("down_proj.weight", "output.dense.weight")) else (w_old != w_new).any(1)
        )
        assert set(differ.nonzero().flatten().tolist()) == idx


def test_reload_reproduces_edited_logits_and_report(built):
    kind, model_dir, world, folder, report = built
    out = folder / "out"
    tok = AutoTokenizer.from_pretrained(out)
    m = AUTO[kind].from_pretrained(out).eval()
    for e in report["edits"]:
        for row in e["prompts"]:
            p = encode(tok, row["prompt"], kind != "bert")
            probs = verify.predict(m, p)
            assert int(probs.argmax()) == row["after"]["top1_id"]
            assert probs[target_id(tok, p, e["new_target"], kind != "bert")].item() == pytest.approx(
                row["after"]["p_new_target"], abs=1e-5
            )
    assert (out / "kn_edit_spec.yaml").read_text() == (folder / "spec.yaml").read_text()


def test_same_spec_same_bytes_and_no_overwrite(built, tmp_path):
    kind, model_dir, world, folder, report = built
    first = (folder / "out" / "model.safetensors").read_bytes()
    spec = folder / "spec.yaml"
    r = CliRunner().invoke(main, ["build", str(spec), str(folder / "out"), "--device", "cpu"])
    assert r.exit_code == 2 and "exists; pass --force" in r.output
    assert (folder / "out" / "model.safetensors").read_bytes() == first
    r = CliRunner().invoke(main, ["build", str(spec), str(tmp_path / "again"), "--device", "cpu"])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "again" / "model.safetensors").read_bytes() == first
    assert json.loads((tmp_path / "again" / "kn_edit_report.json").read_text())["edits"] == report["edits"]


def test_failed_build_keeps_existing_checkpoint(built, monkeypatch):
    kind, model_dir, world, folder, report = built
    good = (folder / "out" / "model.safetensors").read_bytes()

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr("kn_edit.output.checkpoint.save_model", boom)
    with pytest.raises(RuntimeError):
        build(folder / "spec.yaml", folder / "out", force=True)
    assert (folder / "out" / "model.safetensors").read_bytes() == good
    assert not [p for p in folder.iterdir() if p.name.startswith(".out.")]


def test_erase_relation(bert_dir, world, write_spec, tmp_path):
    facts = [{"subject": s, "target": o} for s, o in world.facts["maker"]]
    # neurons shared by >= 2 of the relation's 24 located facts (the paper's 5 is for thousands of facts;
    # at >= 3 the float64-trained tiny BERT keeps its answers: too few neurons are shared by 3)
    spec = {
        "model": str(bert_dir),
        "method": {"erase": {"rule": "paper", "min_facts": 2}},
        "edits": [{"erase": {"relation": "maker", "templates": list(world.templates("maker")), "facts": facts}}],
    }
    report = build(write_spec(spec), tmp_path / "out")
    e = report["edits"][0]
    assert e["neurons"] > 0 and e["accuracy_before"] >= 0.9
    assert e["accuracy_after"] < e["accuracy_before"]
    unk = AutoTokenizer.from_pretrained(bert_dir).unk_token_id
    m = AutoModelForMaskedLM.from_pretrained(tmp_path / "out")
    emb = m.get_output_embeddings().weight
    layer, idx = json.loads((tmp_path / "out" / "neurons.json").read_text())["edits"][0]["edited"][0]
    assert torch.equal(arch.value_slots(m, layer)[idx], emb[unk])
