"""The fast engine against the reference engine and against a plain per-step loop of the
paper's formula, on tiny random models of every architecture family arch.py supports."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from kn_edit.locate import attribution
from kn_edit.locate.neurons import coarse
from kn_edit.model import arch
from kn_edit.plan.prompts import Prompt, answering

SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=50)
CONFIGS = {
    "bert": dict(model_type="bert", max_position_embeddings=32, **SMALL),
    "roberta": dict(model_type="roberta", max_position_embeddings=40, pad_token_id=1, **SMALL),
    "llama": dict(model_type="llama", num_key_value_heads=2, max_position_embeddings=32, **SMALL),
    "gpt2": dict(model_type="gpt2", n_embd=32, n_inner=64, n_head=4, n_layer=3, n_positions=32, vocab_size=50),
}


def tiny(kind, attn="eager"):
    torch.manual_seed(0)
    cfg = dict(CONFIGS[kind])
    config = AutoConfig.for_model(cfg.pop("model_type"), **cfg)
    auto = AutoModelForCausalLM if arch.for_type(kind).causal else AutoModelForMaskedLM
    model = auto.from_config(config, attn_implementation=attn).eval()
    # random init gives a nearly flat output; sharpen it so p(target) has real gradients
    with torch.no_grad():
        arch.output_embedding(model).mul_(8.0)
    return model


def prompt(kind, seed=1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 50, (7,), generator=g).tolist()
    pos = 6 if arch.for_type(kind).causal else 3
    return Prompt("x", tuple(ids), pos)


def plain(model, p, target, steps):
    """The formula with nothing shared: one forward and backward per (layer, step). target: a token,
    or a k-token answer: the product of its tokens' probabilities at positions pos .. pos + k - 1 of
    the prompt with the answer appended (causal) or k masks (masked), scaling at pos alone."""
    targets = (target,) if isinstance(target, int) else target
    p = answering(p, targets, arch.arch_of(model).causal)
    acts, _ = attribution.clean_activations(model, p)
    ids = torch.tensor([p.ids])
    out = torch.zeros_like(acts)
    for l in range(acts.shape[0]):
        for k in range(steps):
            x = (k / steps * acts[l]).requires_grad_(True)

            def put(mod, args):
                a = args[0].clone()
                a[0, p.pos] = x
                return (a,)

            h = arch.value_module(model, l).register_forward_pre_hook(put)
            try:
                logits = model(ids).logits[0]
                prob = 1.0
                for j, t in enumerate(targets):
                    prob = prob * logits[p.pos + j].softmax(-1)[t]
            finally:
                h.remove()
            (g,) = torch.autograd.grad(prob, x)
            out[l] += g
        out[l] *= acts[l] / steps
    return out


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fast_equals_reference_with_sdpa_attention(kind):
    """The attention that models load with by default (the fast engine picks its own kernel)."""
    model = tiny(kind, "sdpa")
    p = prompt(kind, 3)
    same(attribution.fast(model, p, 11, steps=8), attribution.reference(model, p, 11, steps=8))


def same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fast_equals_reference(kind):
    model = tiny(kind)
    assert arch.arch_of(model).name == kind
    for seed in (1, 2):
        p = prompt(kind, seed)
        target = 7 + seed
        ref = attribution.reference(model, p, target, steps=8)
        fast = attribution.fast(model, p, target, steps=8)
        assert ref.abs().max() > 0
        same(fast, ref)
        assert coarse(fast, 0.2) == coarse(ref, 0.2)
        assert len(coarse(ref, 0.2)) > 0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_reference_equals_plain_loop(kind):
    model = tiny(kind)
    p = prompt(kind)
    same(attribution.reference(model, p, 9, steps=4), plain(model, p, 9, steps=4))


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_fast_equals_plain_loop(kind):
    model = tiny(kind)
    p = prompt(kind)
    same(attribution.fast(model, p, 9, steps=4), plain(model, p, 9, steps=4))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_multi_token_fast_equals_reference_equals_plain(kind, attn):
    """A 2- and a 3-token answer: the fast engine (k rows against the prefix, or k masks) against the
    reference, and the reference against the plain loop."""
    model = tiny(kind, attn)
    for seed, targets in ((1, (9, 4)), (2, (11, 30, 7))):
        p = prompt(kind, seed)
        ref = attribution.reference(model, p, targets, steps=4)
        assert ref.abs().max() > 0
        same(attribution.fast(model, p, targets, steps=4), ref)
        same(attribution.fast(model, p, targets, steps=4, max_rows=4), ref)  # one layer per group
        if attn == "eager":
            same(ref, plain(model, p, targets, steps=4))
        # the answer's later tokens count: not the first token's attribution
        assert not torch.allclose(ref, attribution.reference(model, p, targets[0], steps=4))


def test_one_token_answer_is_the_token():
    model = tiny("llama")
    p = prompt("llama")
    assert torch.equal(attribution.fast(model, p, (9,), steps=4), attribution.fast(model, p, 9, steps=4))
    assert torch.equal(attribution.reference(model, p, (9,), steps=4), attribution.reference(model, p, 9, steps=4))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_layer_groups_change_nothing(kind):
    model = tiny(kind)
    p = prompt(kind)
    whole = attribution.fast(model, p, 9, steps=6, max_rows=10**6)
    for rows in (1, 6 * 3 + 6 * 2):  # one layer per group; layers 0-1 together, then layer 2
        same(attribution.fast(model, p, 9, steps=6, max_rows=rows), whole)


def test_layer_groups():
    assert [list(g) for g in attribution.layer_groups(4, 2, 1)] == [[0], [1], [2], [3]]
    assert [list(g) for g in attribution.layer_groups(4, 2, 14)] == [[0, 1], [2, 3]]
    assert [list(g) for g in attribution.layer_groups(4, 2, 20)] == [[0, 1, 2, 3]]


def test_parameters_restored():
    model = tiny("gpt2")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    attribution.fast(model, prompt("gpt2"), 9, steps=2)
    assert [p.requires_grad for p in model.parameters()] == before
    assert any(before) and not all(before)


def test_bf16_close_and_copy_follows_edits():
    model = tiny("llama")
    p = prompt("llama")
    fp32 = attribution.fast(model, p, 9, steps=8)
    bf16 = attribution.fast(model, p, 9, steps=8, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1] > 0.98
    assert next(iter(model.parameters())).dtype == torch.float32
    # an in-place weight edit must reach the low-precision copy
    with torch.no_grad():
        arch.value_slots(model, 2).zero_()
    after = attribution.fast(model, p, 9, steps=8, dtype=torch.bfloat16)
    assert bf16[2].abs().max() > 0 and after[2].abs().max() == 0  # no gradient through a zero W2
    low = attribution.low_precision(model, torch.bfloat16)
    assert low is not model and float(arch.value_slots(low, 2).detach().abs().max()) == 0.0


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_predict_many_equals_predict(kind):
    """Right-padded batches (verify.predict_many) give each prompt's own answer distribution."""
    from kn_edit.measure import predict as verify

    model = tiny(kind, "sdpa")
    causal = arch.for_type(kind).causal
    ps = []
    for n in (4, 7, 5):
        ids = torch.randint(3, 50, (n,), generator=torch.Generator().manual_seed(n)).tolist()
        ps.append(Prompt("x", tuple(ids), n - 1 if causal else 2))
    for one, many in zip((verify.predict(model, p) for p in ps), verify.predict_many(model, ps, batch=2)):
        torch.testing.assert_close(many, one, rtol=1e-4, atol=1e-6)
