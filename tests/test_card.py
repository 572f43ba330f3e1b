"""The model card shows what the report holds, as the product writes it."""

import json

import pytest
import yaml
from conftest import build, update_edit

from kn_edit.output import card
from kn_edit.output.report import Report


def _meta(text):
    return yaml.safe_load(text.split("---", 2)[1])


@pytest.fixture(scope="module")
def checkpoint(bert_dir, world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("card")
    spec = {
        "model": str(bert_dir),
        "method": {"steps": 4},
        "edits": [update_edit(world, "capital", 0)],
        "verify": {"gates": ["success_rate >= 0.5", "change_rate > 2"]},
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    build(folder / "spec.yaml", folder / "out")
    return folder / "out"


def test_card_of_a_build(checkpoint):
    report = Report.read(checkpoint / "kn_edit_report.json")
    spec_text = (checkpoint / "kn_edit_spec.yaml").read_text()
    text = (checkpoint / card.CARD).read_text()
    assert text == card.render(report, spec_text, model_name=checkpoint.name)  # same input, same bytes
    assert "altered on purpose" in text and spec_text.strip() in text
    meta = _meta(text)
    assert meta["kn_edit"]["status"] == report.status == "failed"  # change_rate > 2 cannot pass
    e = report.edits[0]
    assert f"| 0 | capital | {e.subject} | {e.target} | {e.new_target} | {e.neurons} |" in text
    # gates as a table, one row each, not a JSON blob
    assert "| change_rate > 2 |" in text and "| success_rate >= 0.5 |" in text and '"results"' not in text
    results = meta["model-index"][0]["results"]
    assert {m["type"]: m["value"] for m in results[0]["metrics"]}["success_rate"] == e.success_rate


def test_unverified_card_says_so(checkpoint, tmp_path):
    doc = json.loads((checkpoint / "kn_edit_report.json").read_text())
    doc.update(status="built", gates={"results": [], "passed": True})
    text = card.render(Report.model_validate(doc), "model: x\n", model_name="m")
    assert "unverified" in _meta(text)["tags"] and "base_model" not in _meta(text)
