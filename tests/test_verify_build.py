"""Build with gates on the tiny BERT: metrics in the report, exit code 1 on a failing gate,
`kn-edit verify` recomputes the same numbers, and the control leaves the weights alone."""

import json

import pytest
import torch
from click.testing import CliRunner
from conftest import update_edit

from kn_edit.apply import rules as edits
from kn_edit.cli import main
from kn_edit.measure import evaluate as metrics
from kn_edit.model import arch
from kn_edit.model import load as models


def _spec(bert_dir, world, gates):
    e0 = update_edit(world, "capital", 0)
    e0["update"]["relation_facts"] = [{"subject": s, "target": o} for s, o in world.facts["capital"][1:4]]
    maker = {
        "relation": "maker",
        "templates": list(world.templates("maker")),
        "facts": [{"subject": s, "target": o} for s, o in world.facts["maker"][:3]],
    }
    return {
        "model": str(bert_dir),
        "seed": 0,
        "method": {"steps": 4},
        "edits": [e0],
        "verify": {"neighbours": 2, "held_out": 1, "facts": [maker], **gates},
    }


@pytest.fixture(scope="module")
def built(bert_dir, world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("gated")
    spec = folder / "spec.yaml"
    import yaml

    spec.write_text(yaml.safe_dump(_spec(bert_dir, world, {"success_rate": ">= 1.5", "change_rate": ">= 0"})))
    res = CliRunner().invoke(main, ["build", str(spec), str(folder / "out"), "--device", "cpu"])
    return folder, res


def test_failing_gate_exits_1_and_keeps_checkpoint_marked_failed(built):
    folder, res = built
    assert res.exit_code == 1, res.output
    assert "gate success_rate >= 1.5 failed" in res.output
    report = json.loads((folder / "out" / "kn_edit_report.json").read_text())
    assert report["schema_version"] == 2 and report["status"] == "failed"
    by = {r["name"]: r for r in report["gates"]["results"]}
    assert not by["success_rate"]["passed"] and by["change_rate"]["passed"] and not report["gates"]["passed"]
    assert (folder / "out" / "report.md").read_text().startswith("# kn-edit report: failed")


def test_report_metrics_agree_with_the_prompt_rows(built):
    folder, _ = built
    report = json.loads((folder / "out" / "kn_edit_report.json").read_text())
    e = report["edits"][0]
    rows = e["prompts"]
    new = e["new_target"]
    assert e["metrics"]["success_rate"] == pytest.approx(sum(r["after"]["top1"] == new for r in rows) / len(rows))
    held = [r for r in rows if r["held_out"]]
    assert len(held) == 1 and e["metrics"]["generalization"] == float(held[0]["after"]["top1"] == new)
    shift = sum(r["after"]["p_new_target"] - r["before"]["p_new_target"] for r in rows) / len(rows)
    assert e["metrics"]["p_new_shift"] == pytest.approx(shift, abs=1e-6)
    # the control is matched: same count; it is reported beside every metric of the edit
    assert e["control"]["neurons"] == e["metrics"]["neurons"] == e["neurons"]
    assert set(e["metrics"]) - {"consistency"} == set(e["control"])
    assert report["metrics"]["intra_ppl_before"] > 1 and report["metrics"]["inter_ppl_before"] > 1
    neurons = json.loads((folder / "out" / "neurons.json").read_text())
    assert all(len(f["coarse"]) == len(f["prompts"]) for f in neurons["edits"][0]["facts"])


def test_verify_recomputes_the_build_numbers(built):
    folder, _ = built
    out = folder / "re.json"
    res = CliRunner().invoke(main, ["verify", str(folder / "out"), "--device", "cpu", "-o", str(out)])
    assert res.exit_code == 1, res.output
    again = json.loads(out.read_text())
    report = json.loads((folder / "out" / "kn_edit_report.json").read_text())
    for k, v in report["metrics"].items():
        if isinstance(v, float):
            assert again["metrics"][k] == pytest.approx(v, rel=1e-5, abs=1e-7), k
    assert again["edits"][0]["control"] == pytest.approx(report["edits"][0]["control"], rel=1e-5, abs=1e-7)

    # a spec with gates that pass turns the verdict around
    import yaml

    spec = yaml.safe_load((folder / "spec.yaml").read_text())
    spec["verify"] = {**spec["verify"], "success_rate": ">= 0", "change_rate": ">= 0"}
    (folder / "pass.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(main, ["verify", str(folder / "out"), "--spec", str(folder / "pass.yaml"), "--device", "cpu"])
    assert res.exit_code == 0, res.output
    assert "status: passed" in res.output


def test_control_restores_the_weights_bit_for_bit(bert_dir):
    model, _ = models.load_model(models.resolve(str(bert_dir)))
    before = [arch.value_slots(model, l).clone() for l in range(arch.shape(model)[0])]
    neurons = [(0, 1), (2, 5)]
    with edits.restored(model, neurons):
        with torch.no_grad():
            for l, i in neurons:
                arch.value_slots(model, l)[i] += 1.0
        assert not torch.equal(arch.value_slots(model, 0), before[0])
    assert all(torch.equal(arch.value_slots(model, l), b) for l, b in enumerate(before))


def test_suppression_matches_a_plain_reference(bert_dir, world):
    """Zeroing neurons at the answer position = subtracting activation x value slot from W2's
    output there (computed here with an output hook, independently of metrics.scaled_p)."""
    from kn_edit.locate import attribution
    from kn_edit.measure import predict as verify
    from kn_edit.plan.prompts import encode, target_id

    src = models.resolve(str(bert_dir))
    tok = models.load_tokenizer(src)
    model, _ = models.load_model(src)
    s, o = world.facts["capital"][0]
    p = encode(tok, world.templates("capital")[0].replace("[X]", s), False)
    t = target_id(tok, p, o, False)
    acts, probs = attribution.clean_activations(model, p)
    # one layer: there the change of W2's output is exactly -activation x slot (zeroing neurons of a
    # lower layer would also change this layer's activations)
    layer = int(acts.abs().max(1).values.argmax())
    neurons = [(layer, i) for i in acts[layer].abs().topk(4).indices.tolist()]
    assert metrics.scaled_p(model, p, neurons, 1.0, t) == pytest.approx(float(probs[t]), rel=1e-5)

    hooks = []
    for layer in {l for l, _ in neurons}:

        def sub(mod, args, out, layer=layer):
            out = out.clone()
            for l, i in neurons:
                if l == layer:
                    out[0, p.pos] -= acts[l, i] * arch.value_slots(model, l)[i]
            return out

        hooks.append(arch.value_module(model, layer).register_forward_hook(sub))
    try:
        ref = float(verify.predict(model, p)[t])
    finally:
        for h in hooks:
            h.remove()
    got = metrics.scaled_p(model, p, neurons, 0.0, t)
    assert got == pytest.approx(ref, rel=1e-4) and got != pytest.approx(float(probs[t]), rel=1e-6)


def test_two_edits_that_read_one_prompt_are_measured_with_both_answers_and_warned(llama_dir, world, write_spec):
    """Two relations whose templates read alike for a shared subject ("X, developed by [Y]." and "X, developed
    by [Y]"): one prompt, measured once with both edits' answers (it used to keep one edit's, and the control's
    metrics failed on the other's), and a warning that at most one new target can hold there."""
    from kn_edit import pipeline
    from kn_edit.measure import probes
    from kn_edit.plan.batch import prepare

    s, o = world.facts["capital"][0]
    first, second = [x for x in world.objects("capital") if x != o][:2]
    edits = [
        {"update": {"relation": "capital", "subject": s, "target": o, "new_target": first, "templates": ["the capital of [X] is [Y] ."]}},
        {"update": {"relation": "seat", "subject": s, "target": o, "new_target": second, "templates": ["the capital of [X] is [Y]"]}},
    ]  # fmt: skip
    batch = prepare(write_spec({"model": str(llama_dir), "edits": edits}))
    assert [w for w in batch.warnings if "ask the same prompt" in w and first in w and second in w]
    a, b = batch.edits
    assert a.fact.prompts[0].ids == b.fact.prompts[0].ids and a.fact.prompts[0].text != b.fact.prompts[0].text
    probes.attach(batch.edits, batch.extra, batch.spec.verify.neighbours)
    m = pipeline.load(str(llama_dir), device="cpu").model
    seen = metrics.measure(m, batch.edits)
    assert {a.new_ids, b.new_ids, a.fact.target_ids} <= set(seen[a.fact.prompts[0].ids][1])
    for e in batch.edits:  # what failed before: each edit's metrics read its own new target
        assert metrics.edit_metrics(e.probe, seen, seen)["p_new_shift"] == 0.0
