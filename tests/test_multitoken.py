"""Multi-token targets end to end on the small trained models: a 2- and a 3-token new target take
(the greedy continuation / the k masks give the whole new target), far above random neurons, and the
report shows the continuation."""

import pytest
import torch
from conftest import build, update_edit
from transformers import AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

from kn_edit.measure import predict
from kn_edit.plan.prompts import encode, target_ids

AUTO = {"bert": AutoModelForMaskedLM, "llama": AutoModelForCausalLM}
NEW = {0: "city3 lang5", 5: "corp2 city6 lang1"}  # fact of "capital" -> a 2- and a 3-token new target


@pytest.fixture(scope="module", params=["bert", "llama"])
def built(request, tmp_path_factory, world):
    import yaml

    kind = request.param
    folder = tmp_path_factory.mktemp(f"multi_{kind}")
    model_dir = request.getfixturevalue(f"{kind}_dir")
    # the tiny models spread a fact over few neurons: a lower coarse threshold gives the solve enough
    # of them for a sequence (with the default 0.2 the 3-token edit does not take)
    method = {"locate": {"threshold": 0.01}, "solve": {"neurons": 40, "steps": 1000}}
    spec = {
        "model": str(model_dir),
        "seed": 0,
        "method": method,
        "edits": [update_edit(world, "capital", k, new) for k, new in NEW.items()],
    }
    (folder / "spec.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    return kind, folder, build(folder / "spec.yaml", folder / "out")


def test_multi_token_updates_take(built):
    kind, _, report = built
    for e in report["edits"]:
        assert e["metrics"]["efficacy"] == 1.0, (e["new_target"], e["prompts"])
        assert e["metrics"]["change_rate"] >= 0.75 and e["control"]["success_rate"] is not None
        for row in e["prompts"]:
            if not row["held_out"]:
                assert row["after"]["continuation"].startswith(e["new_target"])
            if kind == "llama":  # a masked LM's k-mask answer need not start with its 1-mask one
                assert row["before"]["continuation"].startswith(e["target"])
            assert row["after"]["p_new_target"] > 10 * row["before"]["p_new_target"]


def test_reloaded_checkpoint_answers_the_new_targets(built, world):
    """Read back with transformers alone: greedy decoding (causal) or k masks (masked) gives the new target."""
    kind, folder, _ = built
    tok = AutoTokenizer.from_pretrained(folder / "out")
    model = AUTO[kind].from_pretrained(folder / "out").eval()
    causal = kind == "llama"
    for k, new in NEW.items():
        s, _ = world.facts["capital"][k]
        for t in world.templates("capital")[:-1]:  # the located prompts (the last one is held out)
            p = encode(tok, t.replace("[X]", s), causal)
            want = target_ids(tok, p, new, causal)
            assert len(want) == len(new.split())
            if causal:
                ids = torch.tensor([p.ids])
                out = model.generate(ids, max_new_tokens=len(want), do_sample=False, attention_mask=torch.ones_like(ids))
                got = tuple(out[0, len(p.ids) :].tolist())
            else:
                got = predict.says(model, p, len(want))
            assert tok.decode(list(got)).strip() == new


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_answers_of_each_length(kind):
    """{k: k-token answer} with the first token always there: a causal model's are the prefixes of its
    greedy decoding, a masked LM's the top tokens at k masks; sequence probabilities multiply."""
    from test_attribution import prompt, tiny

    from kn_edit.plan.prompts import answering

    model, p = tiny(kind), prompt(kind)
    top = int(predict.predict(model, p).argmax())
    got = predict.answers(model, p, {2, 3}, top)
    assert set(got) == {1, 2, 3} and got[1] == (top,)
    if kind == "llama":
        ids = list(p.ids)
        for _ in range(3):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
        assert got[3] == tuple(ids[-3:]) and got[2] == got[3][:2]
    else:
        q = answering(p, (0, 0), False)
        assert got[2] == tuple(model(torch.tensor([q.ids])).logits[0, q.pos : q.pos + 2].argmax(-1).tolist())
    t = (got[1][0], 5)
    q = answering(p, t, kind == "llama")
    probs = model(torch.tensor([q.ids])).logits[0].softmax(-1)
    want = float(probs[q.pos, t[0]] * probs[q.pos + 1, t[1]])
    assert predict.answer_prob(model, p, t) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_batched_answers_are_the_single_ones(kind):
    """says_many / starts_many (batched, prompts of different lengths and k) give what says / starts
    give one prompt at a time."""
    from test_attribution import prompt, tiny

    model = tiny(kind)
    ps = [prompt(kind, seed) for seed in range(1, 6)]
    if kind == "llama":  # different lengths, so the batches are padded
        ps = [p if i % 2 else type(p)(p.text, p.ids[1:], p.pos - 1) for i, p in enumerate(ps)]
    ks = [1, 2, 3, 2, 1]
    got = predict.says_many(model, ps, ks, batch=2)
    assert got == [predict.says(model, p, k) for p, k in zip(ps, ks, strict=True)]
    assert predict.says_many(model, ps, 2) == [predict.says(model, p, 2) for p in ps]
    targets = [got[0], got[1], (got[2][0], got[2][1], got[2][2] + 1), (got[3][0] + 1, got[3][1]), (7,)]
    want = [predict.starts(model, p, t) for p, t in zip(ps, targets, strict=True)]
    assert want[:4] == [True, True, False, False]
    assert predict.starts_many(model, ps, targets, batch=2) == want
