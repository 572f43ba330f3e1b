"""The fast engine against the reference engine and against a plain per-step loop of the
paper's formula, on tiny random models of every architecture family arch.py supports; every
quadrature rule of the integral, and the default (the paper's left Riemann sum) unchanged bit for bit."""

import numpy as np
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


def nodes(rule, m):
    """Points and weights of each rule on [0, 1], written out from the textbook formulas."""
    if rule == "riemann":  # the paper's: left end points
        return [k / m for k in range(m)], [1 / m] * m
    if rule == "midpoint":
        return [(k + 0.5) / m for k in range(m)], [1 / m] * m
    if rule == "trapezoid":
        return [k / (m - 1) for k in range(m)], [(0.5 if k in (0, m - 1) else 1) / (m - 1) for k in range(m)]
    if rule == "lobatto":  # end points and the roots of P'_{m-1}; weights from the moments int_0^1 x^k = 1/(k+1)
        inner = np.polynomial.legendre.legroots(np.polynomial.legendre.legder([0] * (m - 1) + [1])) if m > 2 else []
        a = [0.0] + sorted((float(x) + 1) / 2 for x in inner) + [1.0]
        w = np.linalg.solve(np.vander(a, increasing=True).T, [1 / (k + 1) for k in range(m)])
        return a, list(w)
    x, w = np.polynomial.legendre.leggauss(m)
    return list((x + 1) / 2), list(w / 2)


def plain(model, p, target, steps, rule="riemann", layer_rules=None):
    """The formula with nothing shared: one forward and backward per (layer, step). target: a token,
    or a k-token answer: the product of its tokens' probabilities at positions pos .. pos + k - 1 of
    the prompt with the answer appended (causal) or k masks (masked), scaling at pos alone.
    layer_rules: {layer: (rule, steps)} for layers with their own."""
    targets = (target,) if isinstance(target, int) else target
    p = answering(p, targets, arch.arch_of(model).causal)
    acts, _ = attribution.clean_activations(model, p)
    ids = torch.tensor([p.ids])
    out = torch.zeros_like(acts)
    for l in range(acts.shape[0]):
        alphas, weights = nodes(*(layer_rules or {}).get(l, (rule, steps)))
        for alpha, w in zip(alphas, weights):
            x = (float(alpha) * acts[l]).requires_grad_(True)

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
            out[l] += float(w) * g
        out[l] *= acts[l]
    return out


@pytest.mark.parametrize("rule", attribution.QUADRATURE)
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fast_equals_reference_with_sdpa_attention(kind, rule):
    """The attention that models load with by default (the fast engine picks its own kernel)."""
    model = tiny(kind, "sdpa")
    p = prompt(kind, 3)
    same(
        attribution.fast(model, p, 11, attribution.Quadrature(8, rule)),
        attribution.reference(model, p, 11, attribution.Quadrature(8, rule)),
    )


def same(a, b):
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("rule", attribution.QUADRATURE)
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_fast_equals_reference(kind, rule):
    model = tiny(kind)
    assert arch.arch_of(model).name == kind
    for seed in (1, 2):
        p = prompt(kind, seed)
        target = 7 + seed
        ref = attribution.reference(model, p, target, attribution.Quadrature(8, rule))
        fast = attribution.fast(model, p, target, attribution.Quadrature(8, rule))
        assert ref.abs().max() > 0
        same(fast, ref)
        assert coarse(fast, 0.2) == coarse(ref, 0.2)
        assert len(coarse(ref, 0.2)) > 0


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_reference_equals_plain_loop(kind):
    model = tiny(kind)
    p = prompt(kind)
    same(attribution.reference(model, p, 9, 4), plain(model, p, 9, 4))


@pytest.mark.parametrize("kind", ["roberta", "gpt2"])
def test_fast_equals_plain_loop(kind):
    model = tiny(kind)
    p = prompt(kind)
    same(attribution.fast(model, p, 9, 4), plain(model, p, 9, 4))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_multi_token_fast_equals_reference_equals_plain(kind, attn):
    """A 2- and a 3-token answer: the fast engine (k rows against the prefix, or k masks) against the
    reference, and the reference against the plain loop."""
    model = tiny(kind, attn)
    for seed, targets in ((1, (9, 4)), (2, (11, 30, 7))):
        p = prompt(kind, seed)
        ref = attribution.reference(model, p, targets, 4)
        assert ref.abs().max() > 0
        same(attribution.fast(model, p, targets, 4), ref)
        same(attribution.fast(model, p, targets, 4, max_rows=4), ref)  # one layer per group
        if attn == "eager":
            same(ref, plain(model, p, targets, steps=4))
        # the answer's later tokens count: not the first token's attribution
        assert not torch.allclose(ref, attribution.reference(model, p, targets[0], 4))


@pytest.mark.parametrize("rule", [r for r in attribution.QUADRATURE if r != "riemann"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_rules_fast_equals_reference_equals_plain(kind, rule):
    """Each rule: the reference against the plain loop of its formula, the fast engine (one group, and
    one layer per group) against the reference, for a 1- and a 2-token answer."""
    model = tiny(kind)
    p = prompt(kind, 2)
    for target in (9, (9, 4)):
        ref = attribution.reference(model, p, target, attribution.Quadrature(5, rule))
        assert ref.abs().max() > 0
        same(ref, plain(model, p, target, steps=5, rule=rule))
        same(attribution.fast(model, p, target, attribution.Quadrature(5, rule)), ref)
        same(attribution.fast(model, p, target, attribution.Quadrature(5, rule), max_rows=5), ref)
        # not the paper's sum under another name
        assert (ref - attribution.reference(model, p, target, 5)).norm() > 1e-4 * ref.norm()


def old_reference(model, prompt, target, steps=20):
    """attribution.reference as it was before quadrature rules (verbatim but for the names)."""
    targets = attribution.as_ids(target)
    prompt = answering(prompt, targets, arch.arch_of(model).causal)
    acts, _ = attribution.clean_activations(model, prompt)
    ids = torch.tensor([prompt.ids], device=model.device).expand(steps, -1)
    alphas = torch.arange(steps, device=model.device, dtype=torch.float32) / steps
    scores = torch.zeros_like(acts)
    for l in range(acts.shape[0]):
        scaled = (alphas[:, None] * acts[l][None]).requires_grad_(True)
        with attribution.patched(model, l, lambda x: attribution._replace_at(x, 0, prompt.pos, scaled), len(prompt.ids)):
            p = attribution.answer_prob(model(ids).logits, prompt.pos, targets)
        (grad,) = torch.autograd.grad(p.sum(), scaled)
        scores[l] = grad.sum(0) * acts[l] / steps
    return scores


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_default_rule_is_the_papers_bit_for_bit(kind, monkeypatch):
    """The default (riemann) computes what the code did before the rules existed, bit for bit: the
    reference against a verbatim copy of its old self; the fast engine's alphas k/m and its sum
    act * sum_k grad_k / m, as the old code formed them, on the gradients it computed."""
    model = tiny(kind)
    p = prompt(kind)
    old = old_reference(model, p, (9, 4), steps=7)
    assert torch.equal(attribution.reference(model, p, (9, 4), 7), old)
    assert torch.equal(attribution.reference(model, p, (9, 4), attribution.Quadrature(7, "riemann")), old)
    assert torch.equal(attribution.scores(model, p, (9, 4), 7, "reference"), old)

    seen = []
    real = attribution._group_grads

    def recorded(model, a, layers, taps, inputs, acts, answer_pos, targets, points, dtype):
        grads = real(model, a, layers, taps, inputs, acts, answer_pos, targets, points, dtype)
        seen.append((acts, [points[l][0] for l in layers], grads))
        return grads

    monkeypatch.setattr(attribution, "_group_grads", recorded)
    for dtype in (None, torch.bfloat16):
        seen.clear()
        got = attribution.fast(model, p, 9, 7, dtype=dtype, max_rows=7 * 3 + 7 * 2)  # layers 0-1, then 2
        assert len(seen) == 2
        acts = seen[0][0]
        for _, alphas, _ in seen:
            for x in alphas:
                assert torch.equal(x, torch.arange(7, dtype=torch.float32) / 7)
        grads = [g for _, _, gs in seen for g in gs]
        assert torch.equal(got, torch.stack([g.float().sum(0) * acts[l] / 7 for l, g in enumerate(grads)]))
        assert torch.equal(attribution.scores(model, p, 9, 7, "fast", dtype), attribution.fast(model, p, 9, 7, dtype))


def test_quadrature_rules():
    """Points in [0, 1], weights summing to 1, and each rule exact where its theory says."""
    integral = lambda rule, m, f: sum(w * f(a) for a, w in zip(*map(lambda t: t.double().tolist(), weighted(rule, m))))
    for rule in attribution.QUADRATURE:
        for m in (2, 3, 8):
            a, w = weighted(rule, m)
            assert a.shape == w.shape == (m,) and a.dtype == w.dtype == torch.float32
            assert 0 <= float(a.min()) and float(a.max()) <= 1
            assert abs(float(w.double().sum()) - 1) < 1e-6
            ref_a, ref_w = nodes(rule, m)
            torch.testing.assert_close(a, torch.tensor(ref_a, dtype=torch.float32))
            torch.testing.assert_close(w, torch.tensor(ref_w, dtype=torch.float32))
    assert abs(integral("riemann", 4, lambda x: x) - 3 / 8) < 1e-6  # left sum: low by h/2
    for rule in ("midpoint", "trapezoid"):
        assert abs(integral(rule, 5, lambda x: 3 * x + 1) - 2.5) < 1e-6
    assert abs(integral("gauss", 4, lambda x: 8 * x**7) - 1) < 1e-6  # degree 2m - 1
    assert abs(integral("gauss", 4, lambda x: 9 * x**8) - 1) > 1e-6
    assert abs(integral("lobatto", 4, lambda x: 6 * x**5) - 1) < 1e-6  # degree 2m - 3
    assert abs(integral("lobatto", 4, lambda x: 7 * x**6) - 1) > 1e-6
    a, w = attribution.quadrature("lobatto", 3)  # Simpson's rule
    assert a.tolist() == pytest.approx([0, 0.5, 1]) and w.tolist() == pytest.approx([1 / 6, 4 / 6, 1 / 6])
    for rule in attribution.ENDS:
        with pytest.raises(ValueError, match="steps >= 2"):
            attribution.quadrature(rule, 1)
    with pytest.raises(ValueError, match="unknown quadrature rule"):
        attribution.quadrature("simpson", 4)


def test_like_riemann_is_the_left_sum_from_fewer_points():
    """like_riemann M adds (g(0) - g(1)) / 2M to a rule with both end points: on a linear g (where the
    trapezoid rule is exact) that is the left Riemann sum of M points exactly; on a model it is the
    paper's sum (riemann, m = 20) within a small fraction of that sum's own distance to the integral."""
    for rule, m in (("lobatto", 2), ("lobatto", 5), ("trapezoid", 3)):
        a, w = attribution.quadrature(rule, m, like_riemann=20)
        f = lambda x: 3 * x - 1
        assert float((w.double() * f(a.double())).sum()) == pytest.approx(sum(f(k / 20) for k in range(20)) / 20, abs=1e-6)
    for rule in ("riemann", "midpoint", "gauss"):
        with pytest.raises(ValueError, match="both end points"):
            attribution.quadrature(rule, 4, like_riemann=20)
    model = tiny("llama")
    p = prompt("llama", 2)
    paper = attribution.fast(model, p, 9, 20)
    integral = attribution.fast(model, p, 9, attribution.Quadrature(48, "gauss"))
    like = attribution.fast(model, p, 9, attribution.Quadrature(6, "lobatto", 20))
    same(like, attribution.reference(model, p, 9, attribution.Quadrature(6, "lobatto", 20)))
    dist = lambda x: float((x - paper).norm() / paper.norm())
    assert dist(like) < 0.1 * dist(integral)


def weighted(rule, m):
    a, w = attribution.quadrature(rule, m)
    return a, torch.full((m,), 1 / m) if w is None else w


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_rules_converge_to_the_integral(kind):
    """Against the integral (Gauss-Legendre, m = 48, checked against an independent 512-step Riemann
    sum), each rule's error falls with m at its order: O(1/m) for the paper's left sum, O(1/m^2) for
    midpoint and trapezoid, Gauss-Legendre at float32 precision from m = 4; and midpoint at m = 4
    is closer than the paper's m = 20."""
    model = tiny(kind)
    p = prompt(kind, 2)
    exact = attribution.fast(model, p, 9, attribution.Quadrature(48, "gauss"))
    err = lambda rule, m: float((attribution.fast(model, p, 9, attribution.Quadrature(m, rule)) - exact).norm() / exact.norm())
    assert err("riemann", 512) < 1e-4
    r = [err("riemann", m) for m in (4, 8, 16)]
    assert 0.4 < r[1] / r[0] < 0.6 and 0.4 < r[2] / r[1] < 0.6  # halves when m doubles
    for rule, m1, m2 in (("midpoint", 2, 4), ("trapezoid", 2, 4)):
        h1, h2 = (1 / m1, 1 / m2) if rule == "midpoint" else (1 / (m1 - 1), 1 / (m2 - 1))
        assert err(rule, m2) < 1.5 * (h2 / h1) ** 2 * err(rule, m1)
        assert err(rule, m2) < err(rule, m1) < r[0]
    assert err("gauss", 4) < 1e-5
    assert err("midpoint", 4) < err("riemann", 20)


def test_one_token_answer_is_the_token():
    model = tiny("llama")
    p = prompt("llama")
    assert torch.equal(attribution.fast(model, p, (9,), 4), attribution.fast(model, p, 9, 4))
    assert torch.equal(attribution.reference(model, p, (9,), 4), attribution.reference(model, p, 9, 4))


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_layer_groups_change_nothing(kind):
    model = tiny(kind)
    p = prompt(kind)
    whole = attribution.fast(model, p, 9, 6, max_rows=10**6)
    for rows in (1, 6 * 3 + 6 * 2):  # one layer per group; layers 0-1 together, then layer 2
        same(attribution.fast(model, p, 9, 6, max_rows=rows), whole)


def test_layer_groups():
    assert [list(g) for g in attribution.layer_groups(4, 2, 1)] == [[0], [1], [2], [3]]
    assert [list(g) for g in attribution.layer_groups(4, 2, 14)] == [[0, 1], [2, 3]]
    assert [list(g) for g in attribution.layer_groups(4, 2, 20)] == [[0, 1, 2, 3]]


def test_parameters_restored():
    model = tiny("gpt2")
    model.transformer.h[0].mlp.c_fc.weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    attribution.fast(model, prompt("gpt2"), 9, 2)
    assert [p.requires_grad for p in model.parameters()] == before
    assert any(before) and not all(before)


def test_bf16_close_and_copy_follows_edits():
    model = tiny("llama")
    p = prompt("llama")
    fp32 = attribution.fast(model, p, 9, 8)
    bf16 = attribution.fast(model, p, 9, 8, dtype=torch.bfloat16)
    assert bf16.dtype == torch.float32
    assert torch.corrcoef(torch.stack([fp32.flatten(), bf16.flatten()]))[0, 1] > 0.98
    assert next(iter(model.parameters())).dtype == torch.float32
    # an in-place weight edit must reach the low-precision copy
    with torch.no_grad():
        arch.value_slots(model, 2).zero_()
    after = attribution.fast(model, p, 9, 8, dtype=torch.bfloat16)
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


def several(kind):
    """Prompts of lengths 7, 5, 7, 6 with answers of 1-3 tokens (for masked LMs at other positions)."""
    causal = arch.for_type(kind).causal
    out = []
    for seed, n, at, target in ((1, 7, 3, 9), (2, 5, 1, (9, 4, 11)), (3, 7, 4, (4, 5)), (4, 6, 2, 12)):
        ids = torch.randint(3, 50, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        out.append((Prompt("x", tuple(ids), n - 1 if causal else at), target))
    return out


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_batched_prompts_equal_the_reference(kind, attn):
    """Several prompts in one pass (fast_many) against the reference engine prompt by prompt: the
    paper's rule and another, all layers in one group and one layer per group."""
    model = tiny(kind, attn)
    items = several(kind)
    for rule in ("riemann", "gauss"):
        refs = [attribution.reference(model, p, t, attribution.Quadrature(4, rule)) for p, t in items]
        for max_rows in (None, 4 * len(items)):
            got = attribution.fast_many(model, items, attribution.Quadrature(4, rule), max_rows=max_rows)
            assert len(got) == len(items)
            for g, ref in zip(got, refs):
                same(g, ref)
                assert coarse(g, 0.2) == coarse(ref, 0.2)


@pytest.mark.parametrize("kind", sorted(CONFIGS))
def test_layer_rules_fast_equals_reference_equals_plain(kind):
    """Layers with their own rule and m (here layer 0 riemann 7, layer 2 midpoint 3, the rest gauss 4):
    each layer's scores are its own rule's, in the reference (against the plain loop), the fast engine
    (one group and one layer per group) and several prompts per pass; a layer the model lacks is refused."""
    model = tiny(kind)
    own = {0: ("riemann", 7), 2: ("midpoint", 3)}
    for target in (9, (9, 4)):
        p = prompt(kind, 2)
        ref = attribution.reference(model, p, target, attribution.Quadrature(4, "gauss", layers=own))
        same(ref, plain(model, p, target, steps=4, rule="gauss", layer_rules=own))
        for max_rows in (None, 7):
            same(attribution.fast(model, p, target, attribution.Quadrature(4, "gauss", layers=own), max_rows=max_rows), ref)
        # layer by layer, each is the uniform rule's number for that layer
        for l, (rule, m) in {0: own[0], 1: ("gauss", 4), 2: own[2]}.items():
            same(ref[l], attribution.reference(model, p, target, attribution.Quadrature(m, rule))[l])
    items = several(kind)
    for max_rows in (None, 4 * len(items)):
        got = attribution.fast_many(model, items, attribution.Quadrature(4, "gauss", layers=own), max_rows=max_rows)
        for g, (p, t) in zip(got, items, strict=True):
            same(g, attribution.reference(model, p, t, attribution.Quadrature(4, "gauss", layers=own)))
    with pytest.raises(ValueError, match="layer 3 is not a layer of this model"):
        attribution.fast(model, prompt(kind), 9, attribution.Quadrature(4, layers={3: ("riemann", 4)}))


def test_scores_many_keeps_the_order_and_batch_one_is_the_plain_path(monkeypatch):
    """scores_many: batch 1 is `scores` prompt by prompt, bit for bit; batch 3 sorts the prompts by shape
    into passes of at most 3 and gives the scores back in the order asked; the reference engine and
    one-prompt passes take no batched path."""
    model = tiny("llama")
    items = several("llama") * 2
    one = attribution.scores_many(model, items, 4)
    for s, (p, t) in zip(one, items, strict=True):
        assert torch.equal(s, attribution.scores(model, p, t, 4))
    passes, ticks = [], []
    real = attribution._fast_many
    shape = lambda its: [(len(p.ids), len(attribution.as_ids(t))) for p, t in its]
    monkeypatch.setattr(attribution, "_fast_many", lambda m, its, *a: passes.append(shape(its)) or real(m, its, *a))
    many = attribution.scores_many(model, items, 4, batch=3, tick=ticks.append)
    assert ticks == [3, 3, 2]
    # sorted by the answer's length, then the prompt's: the two 3-token answers share a pass of their own
    assert passes == [[(6, 1), (6, 1), (7, 1)], [(7, 1), (7, 2), (7, 2)], [(5, 3), (5, 3)]]
    for s, ref in zip(many, one, strict=True):
        same(s, ref)
    passes.clear()
    assert torch.equal(attribution.scores_many(model, items[:1], 4, batch=3)[0], one[0])
    ref = attribution.scores_many(model, items[:2], 4, engine="reference", batch=3)
    assert not passes and all(torch.equal(r, attribution.reference(model, p, t, 4)) for r, (p, t) in zip(ref, items))


def test_batched_prompts_in_bf16():
    model = tiny("llama")
    items = several("llama")
    for g, (p, t) in zip(attribution.fast_many(model, items, 8, dtype=torch.bfloat16), items, strict=True):
        alone = attribution.fast(model, p, t, 8, dtype=torch.bfloat16)
        assert g.dtype == torch.float32
        assert torch.corrcoef(torch.stack([g.flatten(), alone.flatten()]))[0, 1] > 0.999


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_scores_with_activations_from_the_clean_pass(kind):
    """scores(with_acts=True), both engines and a 1- and 2-token answer: the same scores as without, and the
    activations of a plain forward pass of the prompt the answer is read from; a step count is the paper's
    Quadrature."""
    model = tiny(kind)
    p = prompt(kind)
    causal = arch.for_type(kind).causal
    for target in (9, (9, 4)):
        plain_acts = attribution.clean_activations(model, answering(p, attribution.as_ids(target), causal))[0]
        for eng in ("reference", "fast"):
            s, a = attribution.scores(model, p, target, 4, eng, with_acts=True)
            assert torch.equal(s, attribution.scores(model, p, target, attribution.Quadrature(4), eng))
            if eng == "reference":
                assert torch.equal(a, plain_acts)
            else:
                torch.testing.assert_close(a, plain_acts, rtol=1e-4, atol=1e-6)
        assert attribution.Quadrature.of(4) == attribution.Quadrature(4, "riemann", None, {})
