"""The model card shows what the report holds and never crashes on missing sections."""
import yaml

from kn_edit import card

SPEC = "model: org/base\nedits:\n  - update: {subject: A, target: B, new_target: C, prompts: ['[Y] .']}\n"


def _meta(text):
    return yaml.safe_load(text.split("---", 2)[1])


def test_minimal_report_renders_unverified():
    text = card.render({}, SPEC, model_name="x")
    assert "unverified" in text and "altered on purpose" in text and SPEC.strip() in text
    assert "model-index" not in _meta(text) and "base_model" not in _meta(text)


def test_full_report_tables_and_model_index():
    report = {
        "status": "passed", "kn_edit_version": "9.9", "seed": 3,
        "base_model": {"kind": "hub", "name": "org/base", "revision": "a" * 40},
        "edits": [{"kind": "update", "relation": "P36", "subject": "A", "target": "B", "new_target": "C",
                   "neurons": 2, "change_rate": 1.0, "success_rate": 0.75},
                  {"kind": "erase", "relation": "P37", "facts": 6, "neurons": 4, "accuracy_before": 0.5}],
        "metrics": {"success": 0.75, "control": {"success": 0.05}},
        "gates": [{"name": "success", "min": 0.6, "value": 0.75, "passed": True}],
    }
    text = card.render(report, SPEC, model_name="org/edited")
    meta = _meta(text)
    assert meta["base_model"] == "org/base" and meta["kn_edit"]["status"] == "passed"
    results = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results[0]["metrics"]} == {"success_rate": 0.75, "change_rate": 1.0}
    assert {m["type"] for m in results[-1]["metrics"]} == {"success", "control.success"}
    assert "| 0 | P36 | A | B | C | 2 | 100.0% | 75.0% |" in text
    assert "| 1 | P37 | 6 | 4 | 50.0% | - |" in text
    assert "Random-neuron control" in text and "| control.success | 0.05 |" in text
    assert "| success | 0.6 | 0.75 | True |" in text and "a" * 40 in text


def test_same_input_same_bytes():
    r = {"status": "built", "edits": [{"kind": "erase", "relation": "P1", "facts": 2, "neurons": 1}]}
    assert card.render(r, SPEC, model_name="m") == card.render(r, SPEC, model_name="m")
