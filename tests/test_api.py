"""The Python API: a spec built in Python, applied to a model in memory, undone, saved; and the
README's notebook example, run as written."""

import re
from pathlib import Path

import pytest
import torch
import yaml
from conftest import changed, update_edit
from safetensors.torch import load_file

import kn_edit

README = Path(__file__).resolve().parents[1] / "README.md"


def test_edit_in_memory_undo_and_save(llama_dir, world, tmp_path):
    spec = kn_edit.Spec(
        model=str(llama_dir),
        method={"locate": {"steps": 4}, "update": {"norm_cap": None}},
        edits=[update_edit(world, "capital", 0)],
    )
    loaded = kn_edit.load(str(llama_dir), device="cpu")
    weights = {k: v.clone() for k, v in loaded.model.state_dict().items()}
    result = kn_edit.edit(spec, loaded, kn_edit.BuildOptions(no_cache=True))
    e = result.report.edits[0]
    assert e.success_rate == 1.0 and e.neurons > 0 and result.report.status == "built"
    edited = changed(weights, loaded.model.state_dict())
    assert edited == set(result.report.changed_tensors) and edited
    out = result.save(tmp_path / "out")
    saved = load_file(out / "model.safetensors")
    assert all(torch.equal(saved[k], loaded.model.state_dict()[k]) for k in edited)
    result.undo()
    assert all(torch.equal(v, weights[k]) for k, v in loaded.model.state_dict().items())
    # the written report reads back as the same typed report
    assert kn_edit.Report.read(out / "kn_edit_report.json") == result.report


def test_readme_notebook_example_runs(llama_dir, world, tmp_path, monkeypatch):
    block = re.search(r"```python\n(# notebook.*?)```", README.read_text(), re.S)
    assert block, "README has no notebook example"
    code = block.group(1)
    assert len(code.strip().splitlines()) < 15
    # the example edits the demo model; here it runs on the tiny test model, same calls
    s, o = world.facts["capital"][0]
    new = next(x for x in world.objects("capital") if x != o)
    spec = {
        "model": str(llama_dir),
        "method": {"steps": 4, "norm_cap": None},
        "edits": [{"update": {"subject": s, "target": o, "new_target": new, "templates": list(world.templates("capital"))}}],
    }
    (tmp_path / "edits").mkdir()
    (tmp_path / "edits" / "demo.yaml").write_text(yaml.safe_dump(spec))
    monkeypatch.chdir(tmp_path)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)
    assert (tmp_path / "out" / "notebook" / "model.safetensors").is_file()
    assert namespace["result"].report.edits[0].success_rate == 1.0


@pytest.mark.parametrize("value", ["unk", "zero"])
def test_erase_without_unknown_token_is_a_spec_error(tmp_path, value):
    """A tokenizer with no unknown token cannot erase to [UNK]: said before anything is located."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    words = ["a", "b", "is", "x", "y", "of"]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core)
    tok.save_pretrained(tmp_path / "m")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(vocab_size=len(words), n_embd=16, n_layer=1, n_head=2, n_positions=16)).save_pretrained(
        tmp_path / "m"
    )
    assert tok.unk_token_id is None
    spec = {
        "model": str(tmp_path / "m"),
        "method": {"erase": {"rule": "paper", "value": value}},
        "edits": [{"erase": {"relation": "r", "templates": ["[X] is [Y]"], "facts": [{"subject": "a", "target": "x"}]}}],
    }
    if value == "unk":
        with pytest.raises(kn_edit.SpecError, match=r"method\.erase\.value: unk: this model's tokenizer has no unknown token"):
            kn_edit.edit(kn_edit.Spec.model_validate(spec), options=kn_edit.BuildOptions(no_cache=True, device="cpu"))
    else:
        r = kn_edit.edit(kn_edit.Spec.model_validate(spec), options=kn_edit.BuildOptions(no_cache=True, device="cpu"))
        assert r.report.edits[0].kind == "erase"
