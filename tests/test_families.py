"""Every model family of architectures.yaml on a tiny random model of its own (no download): the fast
attribution engine equals the reference, an update changes only the chosen columns of W2, the batch
solve's block-by-block logits equal the model's, an edited checkpoint reloads with the family's Auto
class and gives the edited logits, and erase writes the unknown token's embedding.

A new regular family is an entry in kn_edit/model/architectures.yaml plus one line in FAMILIES."""

import copy
from functools import cache

import pytest
import torch
from test_attribution import same
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM

from kn_edit.apply import rules, solve
from kn_edit.locate import attribution
from kn_edit.model import arch
from kn_edit.plan.prompts import Prompt

V = 50
SMALL = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=3, vocab_size=V)
GQA = dict(num_key_value_heads=2, **SMALL)
FALCON = dict(hidden_size=32, num_attention_heads=4, num_hidden_layers=3, vocab_size=V)
SLIDING = ["sliding_attention", "full_attention", "sliding_attention"]
# name -> (model_type, config); names are what the README's table cites
FAMILIES = {
    "bert": ("bert", SMALL),
    "roberta": ("roberta", dict(pad_token_id=1, **SMALL)),
    "xlm-roberta": ("xlm-roberta", dict(pad_token_id=1, **SMALL)),
    "camembert": ("camembert", dict(pad_token_id=1, **SMALL)),
    "electra": ("electra", dict(embedding_size=32, **SMALL)),
    "electra-small-embeddings": ("electra", dict(embedding_size=16, **SMALL)),  # the generator head maps 32 -> 16
    "distilbert": ("distilbert", dict(dim=32, hidden_dim=64, n_heads=4, n_layers=3, vocab_size=V)),
    "modernbert": ("modernbert", dict(local_attention=4, global_attn_every_n_layers=2, **SMALL)),  # fused GLU, local windows
    "gpt2": ("gpt2", dict(n_embd=32, n_inner=64, n_head=4, n_layer=3, vocab_size=V)),
    "llama": ("llama", GQA),
    "mistral": ("mistral", dict(sliding_window=4, **GQA)),  # window < prompt: sliding masks matter
    "qwen2": ("qwen2", GQA),
    "qwen3": ("qwen3", dict(head_dim=8, **GQA)),
    "olmo": ("olmo", GQA),
    "olmo2": ("olmo2", GQA),
    "olmo3": ("olmo3", dict(sliding_window=4, layer_types=SLIDING, **GQA)),
    "gemma": ("gemma", dict(head_dim=8, **GQA)),
    "gemma2": ("gemma2", dict(head_dim=8, sliding_window=4, final_logit_softcapping=5.0, layer_types=SLIDING, **GQA)),
    "gemma3": ("gemma3_text", dict(head_dim=8, sliding_window=4, final_logit_softcapping=5.0, layer_types=SLIDING, **GQA)),
    "phi3": ("phi3", GQA),
    "phi": ("phi", SMALL),
    "starcoder2": ("starcoder2", GQA),
    "gpt_neox": ("gpt_neox", SMALL),
    "gptj": ("gptj", dict(n_embd=32, n_inner=64, n_head=4, n_layer=3, rotary_dim=4, vocab_size=V)),
    "falcon": ("falcon", FALCON),  # parallel attention and MLP, multi-query attention
    "falcon-new": ("falcon", dict(new_decoder_architecture=True, num_kv_heads=2, **FALCON)),
    "opt": ("opt", dict(ffn_dim=64, word_embed_proj_dim=32, **FALCON)),
}
UNK = 1


def auto(model_type):
    return AutoModelForCausalLM if arch.for_type(model_type).causal else AutoModelForMaskedLM


@cache
def _tiny(name):
    model_type, kw = FAMILIES[name]
    torch.manual_seed(0)
    config = AutoConfig.for_model(model_type, **{"pad_token_id": 0, "bos_token_id": None, "eos_token_id": None, **kw})
    model = auto(model_type).from_config(config).eval()
    with torch.no_grad():  # random init gives a nearly flat output; sharpen it so p(target) has real gradients
        arch.output_embedding(model).mul_(8.0)
    assert model_type in arch.check(model).model_types
    return model


def tiny(name):
    return copy.deepcopy(_tiny(name))


def prompt(model, seed=1, n=7):
    ids = torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return Prompt("x", tuple(ids), n - 1 if arch.arch_of(model).causal else 3)


def logits(model, p):
    with torch.no_grad():
        return model(torch.tensor([p.ids])).logits[0, p.pos]


@pytest.mark.parametrize("name", FAMILIES)
def test_fast_equals_reference(name):
    model = tiny(name)
    p = prompt(model)
    # one token, a 3-token answer, and a quadrature rule with other points and weights than the paper's
    for target, rule in ((9, "riemann"), ((9, 4, 11), "riemann"), ((9, 4), "gauss")):
        ref = attribution.reference(model, p, target, attribution.Quadrature(4, rule))
        assert ref.abs().max() > 0
        same(attribution.fast(model, p, target, attribution.Quadrature(4, rule)), ref)


@pytest.mark.parametrize("name", FAMILIES)
def test_batched_prompts_equal_one_at_a_time(name):
    """Several prompts in one pass (attribution.fast_many): prompts of other lengths (right-padded, the
    padding masked) and, for masked LMs, other answer positions, with 1-, 2- and 3-token answers, each
    get the scores they get alone (two of them have the same length: no padding between them)."""
    model = tiny(name)
    causal = arch.arch_of(model).causal
    items = []
    for seed, n, at, target in ((1, 7, 3, 9), (2, 5, 1, (9, 4, 11)), (3, 7, 4, (4, 5)), (4, 6, 2, 12), (5, 7, 2, 9)):
        ids = torch.randint(3, V, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
        items.append((Prompt("x", tuple(ids), n - 1 if causal else at), target))  # masked: the answer anywhere
    for got, (p, target) in zip(attribution.fast_many(model, items, 4), items, strict=True):
        same(got, attribution.fast(model, p, target, 4))


@pytest.mark.parametrize("name", FAMILIES)
def test_solve_runs_the_blocks_as_the_model_does(name):
    """The batch update's logits (blocks from the middle, padded rows) are the model's own."""
    model = tiny(name)
    causal = arch.arch_of(model).causal
    ps = [prompt(model, seed, n) for seed, n in ((1, 7), (2, 5), (3, 7))]
    for layer in (0, 2):
        rows = solve._rows(model, [list(p.ids) for p in ps], [[p.pos] for p in ps], layer, 8, causal)
        with torch.no_grad():
            got = torch.cat([solve._logits(model, r, layer) for r in rows])
        order = [k for r in rows for k in r.order]
        torch.testing.assert_close(got, torch.stack([logits(model, ps[k]) for k in order]), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", FAMILIES)
def test_update_writes_only_the_chosen_columns_and_reloads(name, tmp_path):
    model = tiny(name)
    p = prompt(model)
    acts, _ = attribution.clean_activations(model, p)
    top = acts.abs().argsort(-1, descending=True)  # active neurons, so that the solve moves them
    columns = sorted([(0, int(top[0, 0])), (2, int(top[2, 0])), (2, int(top[2, 1]))])
    base = {k: v.clone() for k, v in model.state_dict().items()}
    before = logits(model, p)
    deltas, _ = solve.solve(model, columns, [solve.Goal([p], new_ids=9)], settings=solve.Settings(steps=3, keep=0, text=0),
                            causal=arch.arch_of(model).causal)  # fmt: skip
    rules.write(model, deltas)
    after = logits(model, p)
    assert after.log_softmax(-1)[9] > before.log_softmax(-1)[9]
    changed = {k for k, v in model.state_dict().items() if not torch.equal(v, base[k])}
    assert changed == {arch.value_param_name(model, 0), arch.value_param_name(model, 2)}
    for layer in (0, 2):
        name_ = arch.value_param_name(model, layer)
        diff = model.state_dict()[name_] != base[name_]
        axis = 1 if arch.arch_of(model).conv1d else 0  # columns of a Linear weight, rows of a Conv1D one
        assert diff.any(axis).nonzero().flatten().tolist() == [i for l, i in columns if l == layer]

    model.save_pretrained(tmp_path)
    again = auto(model.config.model_type).from_pretrained(tmp_path).eval()
    assert type(again) is type(model)
    torch.testing.assert_close(logits(again, p), after)


@pytest.mark.parametrize("name", [n for n in FAMILIES if n != "electra-small-embeddings"])
def test_erase_writes_the_unknown_token(name):
    model = tiny(name)
    p = prompt(model)
    before = logits(model, p)
    rules.erase(model, [(1, 4)], "unk", UNK)
    assert torch.equal(arch.value_slots(model, 1)[4], arch.output_embedding(model)[UNK])
    assert not torch.equal(logits(model, p), before)


def test_unknown_and_unsupported_families_say_why():
    with pytest.raises(arch.UnsupportedModel, match="no entry for it"):
        arch.for_type("bloom")
    with pytest.raises(arch.UnsupportedModel, match="share one set of FFN weights"):
        arch.for_type("albert")
    cfg = dict(FAMILIES["opt"][1], do_layer_norm_before=False)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("opt", **cfg))
    with pytest.raises(arch.UnsupportedModel, match="do_layer_norm_before=False"):
        arch.check(model)
    model = tiny("llama")
    del model.model.layers[0].mlp.down_proj
    with pytest.raises(arch.UnsupportedModel, match="value 'mlp.down_proj'"):
        arch.check(model)


def test_rules_writing_embeddings_need_slots_of_their_size():
    """ELECTRA generators may score in a smaller embedding space than the blocks' (the solve works there)."""
    model = tiny("electra-small-embeddings")
    for write in (
        lambda: rules.erase(model, [(1, 4)], "unk", UNK),
        lambda: rules.update(model, [(1, 4)], 7, 9, "authors", 1.0, 8.0),
    ):
        with pytest.raises(ValueError, match=r"output embedding \(16\) and value slots \(32\) differ in size"):
            write()


@pytest.mark.parametrize("name", ["gemma3", "modernbert", "opt"])
def test_build_end_to_end(name, world, write_spec, tmp_path):
    """A whole build (locate, solve, verify, save) on an untrained model of the family with a real tokenizer."""
    import synth
    from conftest import build, changed, update_edit

    model_type, kw = FAMILIES[name]
    tok = synth.tokenizer(world, arch.for_type(model_type).causal)
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, **{**kw, "vocab_size": len(tok), "pad_token_id": 0, "bos_token_id": None, "eos_token_id": None}
    )
    auto(model_type).from_config(config).save_pretrained(tmp_path / "base")
    tok.save_pretrained(tmp_path / "base")
    spec = {"model": str(tmp_path / "base"), "method": {"steps": 4}, "verify": {"safety": False}}
    report = build(write_spec({**spec, "edits": [update_edit(world, "capital", 2)]}), tmp_path / "out")
    a = arch.for_type(model_type)
    ffn = [p for p in (a.value, a.gate, a.key) if p]  # gate and key: where select: auto adds neurons
    assert report["changed_tensors"] and all(any(p in t for p in ffn) for t in report["changed_tensors"])
    assert any(a.value in t for t in report["changed_tensors"])
    base, edited = (auto(model_type).from_pretrained(tmp_path / d).state_dict() for d in ("base", "out"))
    assert sorted(changed(base, edited)) == sorted(report["changed_tensors"])
