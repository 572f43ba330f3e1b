"""The batch solve: its forward path equals the model's, it changes only the selected value slots,
the edits take, and preservation holds what it is asked to hold."""

import json

import pytest
import torch
from conftest import update_edit

from kn_edit import pipeline
from kn_edit.apply import solve as S
from kn_edit.measure.predict import predict_many
from kn_edit.model import arch
from kn_edit.plan.prompts import encode, target_id


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_partial_forward_equals_the_model(kind, request):
    """Blocks run from a middle layer on cached hidden states give the model's own logits."""
    loaded = pipeline.load(str(request.getfixturevalue(f"{kind}_dir")), device="cpu")
    m, tok = loaded.model, loaded.tok
    seqs = [tok("the capital of cap3 is city2 .").input_ids, tok("people in lan4 speak lang1 .").input_ids]
    for layer in range(len(arch.blocks(m))):
        for rows in S._rows(m, seqs, [list(range(len(s) - 1)) for s in seqs], layer, 8):
            ids = torch.tensor([seqs[k] for k in rows.order])
            want = m(input_ids=ids).logits[:, :-1].flatten(0, 1)
            torch.testing.assert_close(S._logits(m, rows, layer), want, rtol=1e-5, atol=1e-5)


def test_goal_reads_the_whole_new_target_and_the_old_target_first_token():
    """An update reads t' under teacher forcing (causal) or at k masks (masked); an erase the first token of t."""
    from kn_edit.plan.prompts import Prompt

    causal, masked = Prompt("a [Y]", (5, 6, 7), 2), Prompt("a [Y] .", (1, 5, 4, 2), 2)
    up, erase = S.Goal([causal], new_ids=(8, 9, 10)), S.Goal([causal], old_ids=(8, 9))
    assert up.reads(True) == [(Prompt("a [Y]", (5, 6, 7, 8, 9), 2), (8, 9, 10))]
    assert erase.reads(True) == [(Prompt("a [Y]", (5, 6, 7, 8), 2), (8,))]
    two_masks = Prompt("a [Y] .", (1, 5, 4, 4, 2), 2)
    assert S.Goal([masked], new_ids=(8, 9)).reads(False) == [(two_masks, (8, 9))]
    assert S.Goal([masked], old_ids=(8, 9)).reads(False) == [(two_masks, (8,))]
    assert S.Goal([causal], new_ids=3).reads(True) == [(causal, (3,))]


def test_a_prompt_two_updates_ask_for_different_targets_is_left_to_the_first():
    """The solve is not asked to pull one prompt two ways: a later update with another target loses it, one with
    the same target keeps it, an erase keeps all its prompts, and an update left with none is dropped."""
    from kn_edit.apply.write import claimed
    from kn_edit.plan.prompts import Prompt

    a, b, c = (Prompt(t, ids, 2) for t, ids in (("a [Y]", (5, 6, 7)), ("b [Y]", (5, 6, 8)), ("c [Y]", (5, 6, 9))))
    got = claimed(
        [
            S.Goal([a, b], new_ids=(10,)),
            S.Goal([b, c], new_ids=(11,)),
            S.Goal([b], new_ids=(10,)),
            S.Goal([a], new_ids=(12,)),
            S.Goal([b], old_ids=(13,)),
        ]
    )
    assert [(g.prompts, g.new_ids, g.old_ids) for g in got] == [
        ([a, b], (10,), None),
        ([c], (11,), None),
        ([b], (10,), None),
        ([b], None, (13,)),
    ]


def _prompts(tok, world, relation, k, causal=True):
    s, o = world.facts[relation][k]
    return [encode(tok, t.replace("[X]", s), causal) for t in world.templates(relation)], o


def test_solve_takes_and_changes_only_the_selected_slots(llama_dir, world):
    loaded = pipeline.load(str(llama_dir), device="cpu")
    m, tok = loaded.model, loaded.tok
    before = {k: v.clone() for k, v in m.state_dict().items()}
    goals = []
    for k in (0, 5, 10):
        ps, o = _prompts(tok, world, "capital", k)
        new = next(x for x in world.objects("capital") if x != o)
        goals.append(S.Goal(ps[:2], new_ids=target_id(tok, ps[0], new, True)))
    columns = [(l, i) for l in (2, 3) for i in range(0, 256, 8)]
    deltas, stats = S.solve(m, columns, goals, settings=S.Settings(steps=200, margin=1.0))
    assert stats.reached and set(deltas) == set(columns)
    from kn_edit.apply import rules

    rules.write(m, deltas)
    for g in goals:
        assert all((int(p.argmax()),) == g.new_ids for p in predict_many(m, g.prompts))
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed == {arch.value_param_name(m, 2), arch.value_param_name(m, 3)}
    for layer in (2, 3):
        diff = (arch.value_slots(m, layer) != before[arch.value_param_name(m, layer)].t()).any(1)
        assert set(diff.nonzero().flatten().tolist()) == {i for l, i in columns if l == layer}


def test_preservation_holds_what_it_is_asked_to_hold(llama_dir, world):
    """The same edits with preservation prompts in the objective move the output distribution less on
    other prompts, unseen ones, of the same relation and of other relations."""
    from kn_edit.apply import rules

    kl = {}
    for keep in (0.0, 20.0):
        loaded = pipeline.load(str(llama_dir), device="cpu")
        m, tok = loaded.model, loaded.tok
        goals = []
        for k in (0, 5, 10, 15):
            ps, o = _prompts(tok, world, "capital", k)
            new = next(x for x in world.objects("capital") if x != o)
            goals.append(S.Goal(ps, new_ids=target_id(tok, ps[0], new, True)))
        for rels in (("capital",), ("language", "maker")):
            others = [p for r in rels for k in range(24) if r != "capital" or k % 5 for p in _prompts(tok, world, r, k)[0][:2]]
            seen, keep_set = others[1::2], others[0::2]
            base = [p.clamp_min(1e-30).log() for p in predict_many(m, seen)]
            columns = [(l, i) for l in (2, 3) for i in range(0, 256, 4)]
            settings = S.Settings(steps=150, keep=keep, margin=1.0, sample=64)
            deltas, _ = S.solve(m, columns, goals, keep_set, settings=settings, causal=True)
            with rules.restored(m, columns):
                rules.write(m, deltas)
                after = [p.clamp_min(1e-30).log() for p in predict_many(m, seen)]
            kl[keep, rels] = sum(float((b.exp() * (b - a)).sum()) for b, a in zip(base, after, strict=True)) / len(seen)
    for rels in (("capital",), ("language", "maker")):
        assert kl[20.0, rels] < 0.5 * kl[0.0, rels], kl


def test_default_build_solves_the_batch(llama_dir, world, write_spec, tmp_path):
    from conftest import build

    spec = {"model": str(llama_dir), "method": {"steps": 4}, "edits": [update_edit(world, "capital", k) for k in (0, 5, 10, 15)]}
    from kn_edit import progress

    progress.timings.clear()
    report = build(write_spec(spec), tmp_path / "out")
    assert all(e["rule"] == "solve" for e in report["edits"])
    assert report["metrics"]["efficacy"] == 1.0
    # every phase of the build is timed (benchmarks/phases.py), and nothing else is
    assert set(progress.timings) == {"loading the model", "locating neurons", "choosing neurons", "measuring the base model",
                                     "suppressing and amplifying", "the random-neuron control", "plain text and probe prompts, base model",
                                     "writing the edits", "measuring the edited model", "saving the checkpoint"}  # fmt: skip
    assert all(t > 0 for t in progress.timings.values())


def _cli_build(spec_path, out):
    from click.testing import CliRunner

    from kn_edit.cli import main

    return CliRunner().invoke(main, ["build", str(spec_path), str(out), "--device", "cpu", "--no-cache"])


def test_an_edit_that_does_not_hold_fails_the_build_by_name(llama_dir, world, write_spec, tmp_path):
    """One solve step cannot make the edits: the build exits 1 naming the edits; `safety: false` lets it pass."""
    spec = {
        "model": str(llama_dir),
        "method": {"steps": 4, "solve": {"steps": 1, "lr": 0.001}},
        "edits": [update_edit(world, "capital", k) for k in (0, 5)],
    }
    r = _cli_build(write_spec(spec), tmp_path / "out")
    assert r.exit_code == 1, r.output
    assert "edit 1 (" in r.output and "did not hold" in r.output and "safety check edits_failed" in r.output
    report = json.loads((tmp_path / "out" / "kn_edit_report.json").read_text())
    assert report["status"] == "failed" and report["metrics"]["edits_failed"] == 2
    assert [g["name"] for g in report["gates"]["results"] if g["safety"]] == ["edits_failed", "text_ppl_change", "probe_kept"]

    spec["verify"] = {"safety": False}
    r = _cli_build(write_spec(spec, "loose.yaml"), tmp_path / "loose")
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "loose" / "kn_edit_report.json").read_text())["status"] == "built"


def test_few_prompts_warn_and_bound_the_neurons(llama_dir, world, write_spec, tmp_path):
    from conftest import build

    edit = update_edit(world, "capital", 0)
    edit["update"]["templates"] = edit["update"]["templates"][:2]
    spec = {"model": str(llama_dir), "method": {"steps": 4, "update": {"rule": "plain", "norm_cap": None}, "refine": {"share": 0.01, "adaptive_share": False}},
            "edits": [edit], "verify": {"safety": False}}  # fmt: skip
    report = build(write_spec(spec), tmp_path / "out")
    assert any("located on 2 prompt(s)" in w for w in report["warnings"]), report["warnings"]
    assert 0 < report["edits"][0]["neurons"] <= 5


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_erase_by_solve_keeps_other_relations(kind, request, world, write_spec, tmp_path):
    """The default erase: the relation stops answering, the other relations keep their answers."""
    from conftest import build

    model_dir = request.getfixturevalue(f"{kind}_dir")
    facts = [{"subject": s, "target": o} for s, o in world.facts["maker"][:12]]
    spec = {
        "model": str(model_dir),
        "method": {"steps": 4},
        "edits": [{"erase": {"relation": "maker", "templates": list(world.templates("maker")), "facts": facts}}],
        "verify": {"facts": [{"relation": r, "templates": list(world.templates(r)),
                              "facts": [{"subject": s, "target": o} for s, o in world.facts[r][:12]]} for r in ("capital", "language")]},
    }  # fmt: skip
    report = build(write_spec(spec), tmp_path / "out")
    e = report["edits"][0]
    assert e["accuracy_before"] >= 0.9 and e["accuracy_after"] <= 0.1 and not e["failed"]
    assert e["metrics"]["other_accuracy_change"] >= -0.1, e["metrics"]


@pytest.mark.parametrize("kind", ["bert", "llama"])
def test_prompts_know_where_their_subject_ends(kind, request, world):
    tok = pipeline.load(str(request.getfixturevalue(f"{kind}_dir")), device="cpu").tok
    causal = kind == "llama"
    s, _ = world.facts["capital"][3]
    for t in world.templates("capital"):
        p = encode(tok, t.replace("[X]", s), causal, s)
        assert p.subject is not None and p.subject != p.pos
        assert tok.decode(p.ids[: p.subject + 1]).strip().endswith(s) and not tok.decode(p.ids[: p.subject]).strip().endswith(s)
    assert encode(tok, world.templates("capital")[0].replace("[X]", s), causal, "nowhere").subject is None


def test_subject_specificity_equals_a_plain_computation(llama_dir, world):
    """a_f^2 / (a_f^2 + mean a_o^2) at the subject's last token, against activations read off the
    whole sequence with a plain hook on W2's input."""
    from kn_edit.apply.choose import specificity

    m, tok = (lambda x: (x.model, x.tok))(pipeline.load(str(llama_dir), device="cpu"))

    def prompts(k):
        s, _ = world.facts["capital"][k]
        return [encode(tok, t.replace("[X]", s), True, s) for t in world.templates("capital")]

    def acts(p):
        seen = []
        hooks = [arch.value_module(m, l).register_forward_pre_hook(lambda mod, a: seen.append(a[0][0, p.subject])) for l in range(len(arch.blocks(m)))]  # fmt: skip
        with torch.no_grad():
            m(torch.tensor([p.ids]))
        for h in hooks:
            h.remove()
        return torch.stack(seen)

    mine, others = prompts(0), [p for k in (1, 2, 3) for p in prompts(k)]
    a_f = torch.stack([acts(p) for p in mine]).mean(0)
    a_o = torch.stack([acts(p) for p in others]).pow(2).mean(0)
    spec, size = specificity(m, mine, others, at_subject=True)
    torch.testing.assert_close(spec, a_f**2 / (a_f**2 + a_o + 1e-12))
    torch.testing.assert_close(size, a_f.abs())
    assert 0 <= float(spec.min()) < 0.1 < 0.5 < float(spec.max()) <= 1  # some neurons fire for this subject more than others


def test_spread_equals_the_change_of_ffn_outputs_on_every_position(llama_dir, world):
    """The spread term, d^T C d from second moments gathered once, equals sum over layers of
    mean_x |FFN_edited(x) - FFN_base(x)|^2 / mean_x |FFN_base(x)|^2 read off the whole model with
    each layer's changes written into W2."""
    loaded = pipeline.load(str(llama_dir), device="cpu")
    m, tok = loaded.model, loaded.tok
    seqs = [tok(t.replace("[X]", s).replace("[Y]", o)).input_ids for s, o in world.facts["language"][:3] for t in world.templates("language")[:2]]  # fmt: skip
    columns = [(1, 3), (1, 40), (2, 7), (3, 100), (3, 101)]
    delta = S._Delta(m, columns)
    gen = torch.Generator().manual_seed(0)
    for d in delta.d.values():
        d.data = torch.randn(d.shape, generator=gen) * 0.05
    delta.moments(S._rows(m, seqs, [[0]] * len(seqs), 1, 1, True), 1)  # one row a sequence: no padding

    def outputs():
        seen = {l: [] for l in delta.d}
        hooks = [arch.value_module(m, l).register_forward_hook(lambda mod, a, o, l=l: seen[l].append(o[0])) for l in delta.d]
        with torch.no_grad():
            for ids in seqs:
                m(torch.tensor([ids]))
        for h in hooks:
            h.remove()
        return {l: torch.cat(v) for l, v in seen.items()}

    base, want = outputs(), 0.0
    for l, d in delta.d.items():  # one layer at a time: the term is each layer's own change, at the base inputs
        w = arch.value_slots(m, l)[delta.idx[l]].clone()
        with torch.no_grad():
            arch.value_slots(m, l)[delta.idx[l]] += d  # rows of W2 (value slots), as apply/rules.write does
        edited = outputs()
        with torch.no_grad():
            arch.value_slots(m, l)[delta.idx[l]] = w
        want += float((edited[l] - base[l]).pow(2).sum(-1).mean() / base[l].pow(2).sum(-1).mean())
    assert float(delta.spread()) == pytest.approx(want, rel=1e-3)


def test_an_unmet_edit_weighs_more_each_step_until_it_takes(llama_dir, world):
    """With a spread term strong enough to hold the edits back, a fixed weight leaves them unmet; a
    weight that rises while an edit prompt is not done (settings.rise) makes every one of them take."""
    from kn_edit.apply import rules

    loaded = pipeline.load(str(llama_dir), device="cpu")
    m, tok = loaded.model, loaded.tok
    goals = []
    for k in (0, 5, 10):
        ps, o = _prompts(tok, world, "capital", k)
        new = next(x for x in world.objects("capital") if x != o)
        goals.append(S.Goal(ps[:2], new_ids=target_id(tok, ps[0], new, True)))
    keep = [p for k in range(12) for p in _prompts(tok, world, "language", k)[0][:2]]
    columns = [(l, i) for l in (2, 3) for i in range(0, 256, 8)]
    reached = {}
    for rise in (1.0, 1.25):
        settings = S.Settings(steps=60, margin=1.0, spread=1e4, rise=rise)
        deltas, stats = S.solve(m, columns, goals, keep, settings=settings, causal=True)
        with rules.restored(m, columns):
            rules.write(m, deltas)
            took = [all((int(p.argmax()),) == g.new_ids for p in predict_many(m, g.prompts)) for g in goals]
        reached[rise] = (stats.reached, all(took))
    assert reached == {1.0: (False, False), 1.25: (True, True)}, reached


def test_min_steps_keep_working_on_preservation_after_the_edits_are_done(llama_dir, world):
    """An edit done in a few steps stops there by default; with min_steps the solve goes on, the edits stay
    done and the preservation prompts move back toward the base model."""
    from kn_edit.apply import rules

    loaded = pipeline.load(str(llama_dir), device="cpu")
    m, tok = loaded.model, loaded.tok
    ps, o = _prompts(tok, world, "capital", 0)
    goals = [S.Goal(ps[:2], new_ids=target_id(tok, ps[0], next(x for x in world.objects("capital") if x != o), True))]
    keep = [p for k in range(12) for p in _prompts(tok, world, "language", k)[0][:2]]
    base = [p.clamp_min(1e-30).log() for p in predict_many(m, keep)]
    columns = [(l, i) for l in (2, 3) for i in range(0, 256, 8)]
    seen = {}
    for min_steps in (0, 60):
        settings = S.Settings(steps=200, margin=1.0, lr=0.5, min_steps=min_steps, sample=len(keep))
        deltas, stats = S.solve(m, columns, goals, keep, settings=settings, causal=True)
        with rules.restored(m, columns):
            rules.write(m, deltas)
            after = [p.clamp_min(1e-30).log() for p in predict_many(m, keep)]
            took = all((int(p.argmax()),) == goals[0].new_ids for p in predict_many(m, goals[0].prompts))
        kl = sum(float((b.exp() * (b - a)).sum()) for b, a in zip(base, after, strict=True)) / len(keep)
        seen[min_steps] = (stats.steps, stats.reached, took, kl)
    assert seen[0][0] < 60 and seen[60][0] == 60 and all(s[1] and s[2] for s in seen.values()), seen
    assert seen[60][3] < 0.5 * seen[0][3], seen


def test_min_steps_unset_means_all_steps_for_a_spec_that_erases_and_none_otherwise():
    from kn_edit.apply.write import settings
    from kn_edit.spec import Method

    method = Method.model_validate({"solve": {"steps": 50}})
    assert (settings(method, 0, erases=True).min_steps, settings(method, 0).min_steps) == (50, 0)
    method = Method.model_validate({"solve": {"steps": 50, "min_steps": 7}})
    assert (settings(method, 0, erases=True).min_steps, settings(method, 0).min_steps) == (7, 7)


def test_patch_gives_each_edit_its_own_neurons_and_changes_only_their_rows(llama_dir, world, write_spec, tmp_path):
    """solve.select: patch: each edit takes, per patch layer, a neuron no other edit takes; its key
    (gate and up rows) is k = K^-1 x_e / (x_e K^-1 x_e) scaled, so it reads patch.SIZE at the subject;
    the checkpoint differs from the base in those neurons' gate rows, up rows and value slots only,
    and the edits take."""
    from conftest import build
    from safetensors.torch import load_file

    from kn_edit.apply import patch

    edits = [update_edit(world, "capital", k) for k in (0, 5, 10)]
    spec = {
        "model": str(llama_dir),
        "method": {"steps": 4, "solve": {"select": "patch", "min_layer": 0.0, "max_layer": 1.0, "steps": 200}},
        "edits": edits,
    }
    report = build(write_spec(spec), tmp_path / "out")
    assert report["metrics"]["efficacy"] == 1.0
    neurons = [tuple(n) for e in json.loads((tmp_path / "out" / "neurons.json").read_text())["edits"] for n in e["edited"]]
    assert len(neurons) == len(set(neurons)) == 3 * len({l for l, _ in neurons})
    base = pipeline.load(str(llama_dir), device="cpu").model
    edited = load_file(tmp_path / "out" / "model.safetensors")
    L = {l for l, _ in neurons}
    assert set(report["changed_tensors"]) == {
        f(base, l) for l in L for f in (arch.gate_param_name, arch.key_param_name, arch.value_param_name)
    }
    for name, t in base.state_dict().items():
        if name not in edited:
            continue
        rows = (edited[name] != t).any(1).nonzero().flatten().tolist() if t.dim() == 2 else []
        cols = (edited[name] != t).any(0).nonzero().flatten().tolist() if t.dim() == 2 else []
        layer = next((l for l in L if f".{l}.mlp." in name), None)
        if name in report["changed_tensors"]:
            mine = {i for l, i in neurons if l == layer}
            assert set(cols if name.endswith("down_proj.weight") else rows) <= mine and (rows or cols)
        else:
            assert torch.equal(edited[name], t), name
    # the key reads SIZE at the subject's last token of a located prompt (the mean over them: about SIZE)
    m = pipeline.load(str(tmp_path / "out"), device="cpu").model
    tok = pipeline.load(str(llama_dir), device="cpu").tok
    (l, i) = neurons[0]
    s, _ = world.facts["capital"][0]
    p = encode(tok, world.templates("capital")[0].replace("[X]", s), True, subject=s)
    seen = []
    h = arch.value_module(m, l).register_forward_hook(lambda mod, a, o: seen.append(a[0][0, p.subject, i]))
    with torch.no_grad():
        m(torch.tensor([list(p.ids)]))
    h.remove()
    assert float(seen[0]) == pytest.approx(patch.SIZE, rel=0.3)


def test_patch_key_is_the_constrained_least_squares_solution(llama_dir, world):
    """patch.choose's key equals a plain solve of: least mean (k . x + 1)^2 over every position of the
    background sequences, subject to k . x_p = 1 for every distinct FFN input x_p at the subject's last
    token (one per template, a subject opening its prompt giving one for all such templates), softened
    by the ridge rho = GRAM_RIDGE x mean diag(X K^-1 X^T): the KKT system
    [[2 K, X^T], [X, -rho/2 I]] [k, lam] = [-2 mu, 1]; gate and up rows are ALPHA k and SIZE / act(ALPHA) k;
    each edit's neurons are the least-used free ones. A prompt with its subject first and one with it
    later both read the key at >= 0.95 (the mean of their states did not: README, "Memory neurons")."""
    from types import SimpleNamespace

    from kn_edit.apply import patch

    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    subject = world.facts["capital"][0][0]
    templates = world.templates("capital") + ["[X] has its capital in [Y]."]
    ps = [encode(tok, t.replace("[X]", subject), True, subject=subject) for t in templates]
    assert len({p.subject for p in ps}) > 1  # the subject at the start and later
    seqs = [list(_prompts(tok, world, "capital", k)[0][0].ids) for k in (3, 4, 6, 7, 8)]
    e, f = SimpleNamespace(located_prompts=ps), SimpleNamespace(located_prompts=ps)
    patch.choose(m, [e, f], range(1, 3), seqs)
    assert [l for l, _ in e.neurons] == [1, 2] and not set(e.neurons) & set(f.neurons)
    for l in (1, 2):
        xs = []
        hook = arch.key_module(m, l).register_forward_hook(lambda mod, a, o: xs.append(a[0][0].double()))
        with torch.no_grad():
            for s in seqs:
                m(torch.tensor([s]))
            n = len(xs)
            for p in ps:
                m(torch.tensor([list(p.ids[: patch.read_at(p) + 1])]))
        hook.remove()
        X = torch.cat(xs[:n])
        states = []
        for x in xs[n:]:
            if not any(torch.equal(x[-1], s) for s in states):
                states.append(x[-1])
        xe = torch.stack(states)
        assert 1 < len(xe) < len(ps)
        K = X.T @ X / len(X)
        K = K + patch.RIDGE * K.diagonal().mean() * torch.eye(len(K), dtype=K.dtype)
        rho = patch.GRAM_RIDGE * float((xe @ torch.linalg.inv(K) @ xe.T).diagonal().mean())
        h, P = len(K), len(xe)
        A = torch.zeros(h + P, h + P, dtype=K.dtype)
        A[:h, :h], A[:h, h:], A[h:, :h], A[h:, h:] = 2 * K, xe.T, xe, -rho / 2 * torch.eye(P, dtype=K.dtype)
        b = torch.cat([-2 * X.mean(0), torch.ones(P, dtype=K.dtype)])
        k = torch.linalg.solve(A, b)[:h]
        (i,) = [i for ll, i in e.neurons if ll == l]
        g, u = e.keys[(l, i)]
        assert torch.allclose(g.double() / patch.ALPHA, k, rtol=1e-3, atol=1e-5 * float(k.abs().max()))
        act = float(patch._act(m, l)(torch.tensor(patch.ALPHA)))
        assert torch.allclose(u.double() * act / patch.SIZE, k, rtol=1e-3, atol=1e-5 * float(k.abs().max()))
        assert float((X @ k).mean()) < 0  # the background reads below 0
        assert (xe @ k).min() >= 0.95  # every template's state reads the key


def test_near_misses_key_the_up_row_apart_from_the_gate(llama_dir, world):
    """patch.choose with near misses: the gate row is the key without them (as above), the up row the
    least mean (u . x)^2 over the background with u . x_p = 1 at the subject's states and u . x_q = 0 at the
    near misses' (the KKT system of a plain solve, softened by the same ridge): the neuron then fires SIZE at
    the subject and nothing at the near misses, where the gate alone is open."""
    from types import SimpleNamespace

    from kn_edit.apply import patch

    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    subject, near = world.facts["capital"][0][0], [world.facts["capital"][k][0] for k in (1, 2)]
    templates = world.templates("capital")[:2]
    ps = [encode(tok, t.replace("[X]", subject), True, subject=subject) for t in templates]
    qs = [encode(tok, t.replace("[X]", n), True, subject=n) for t in templates for n in near]
    seqs = [list(_prompts(tok, world, "capital", k)[0][0].ids) for k in (3, 4, 6, 7, 8)]
    plain, apart = SimpleNamespace(located_prompts=ps), SimpleNamespace(located_prompts=ps)
    patch.choose(m, [plain], range(1, 2), seqs)
    patch.choose(m, [apart], range(1, 2), seqs, near=[qs])
    xs = []
    hook = arch.key_module(m, 1).register_forward_hook(lambda mod, a, o: xs.append(a[0][0].double()))
    with torch.no_grad():
        for s in seqs:
            m(torch.tensor([s]))
        n = len(xs)
        for p in ps + qs:
            m(torch.tensor([list(p.ids[: patch.read_at(p) + 1])]))
    hook.remove()
    X = torch.cat(xs[:n])
    xe, xq = torch.stack([x[-1] for x in xs[n : n + len(ps)]]), torch.stack([x[-1] for x in xs[n + len(ps) :]])
    xe, xq = torch.unique(xe, dim=0), torch.unique(xq, dim=0)
    K = X.T @ X / len(X)
    K = K + patch.RIDGE * K.diagonal().mean() * torch.eye(len(K), dtype=K.dtype)
    Ac = torch.cat([xe, xq])
    rho = patch.GRAM_RIDGE * float((Ac @ torch.linalg.inv(K) @ Ac.T).diagonal().mean())
    h, P = len(K), len(Ac)
    A = torch.zeros(h + P, h + P, dtype=K.dtype)
    A[:h, :h], A[:h, h:], A[h:, :h], A[h:, h:] = 2 * K, Ac.T, Ac, -rho / 2 * torch.eye(P, dtype=K.dtype)
    b = torch.cat([torch.zeros(h, dtype=K.dtype), torch.ones(len(xe), dtype=K.dtype), torch.zeros(len(xq), dtype=K.dtype)])
    u_ref = torch.linalg.solve(A, b)[:h]
    ((g0, _),), ((g, u),) = plain.keys.values(), apart.keys.values()
    assert torch.equal(g, g0)  # the gate is the key without near misses
    act = patch._act(m, 1)
    unit = u.double() * float(act(torch.tensor(patch.ALPHA))) / patch.SIZE
    assert torch.allclose(unit, u_ref, rtol=1e-3, atol=1e-5 * float(u_ref.abs().max()))
    fired = act(xe @ g.double()) * (xe @ u.double())
    # within the ridge's softening: the near misses' states lie close to the subject's (read after it)
    assert torch.allclose(fired, torch.full_like(fired, patch.SIZE), rtol=5e-3)
    assert (act(xq @ g.double()) * (xq @ u.double())).abs().max() < 5e-3 * patch.SIZE


def test_a_subject_that_opens_its_prompt_is_read_at_the_next_token(llama_dir, world):
    """patch._subject_states: a memory neuron's key reads a prompt at its subject's last token, or at the token
    after it where the subject is the prompt's first token (a first token reads alike whatever it is, so a key
    held to 1 there fired elsewhere); one row per distinct state: "[X] is made by" and "[X] is produced by" read
    their second token after the same two tokens, so they give one."""
    from kn_edit.apply import patch

    m, tok = (x := pipeline.load(str(llama_dir), device="cpu")).model, x.tok
    s = world.facts["maker"][0][0]
    ps = [encode(tok, t.replace("[X]", s), True, subject=s) for t in world.templates("maker")]
    assert [p.subject for p in ps] == [0, 0, 3, 0]
    assert [patch.read_at(p) for p in ps] == [1, 1, 3, 1]
    xs = []
    hook = arch.key_module(m, 1).register_forward_hook(lambda mod, a, o: xs.append(a[0][0].double()))
    with torch.no_grad():
        for p in ps:
            m(torch.tensor([list(p.ids)]))
    hook.remove()
    want = torch.unique(torch.stack([x[i] for x, i in zip(xs, (1, 1, 3, 1), strict=True)]), dim=0)
    got = patch._subject_states(m, ps, [1])[1]
    assert got.shape == want.shape == (3, want.shape[1])
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_a_build_keys_the_up_row_apart_for_a_subject_of_two_words(llama_dir, world, write_spec):
    """solve.near_misses reaches the keys through a build: with it, the memory neuron of an update whose
    subject has two words has an up row that is not the gate's key (held to 0 at the near misses); the
    one-word subject's, and every neuron with near_misses: 0, keep the up row at the gate's key."""
    from kn_edit.options import BuildOptions

    s, t = world.facts["capital"][0][0], world.facts["capital"][1][0]
    two = {"update": update_edit(world, "capital", 0)["update"] | {"subject": f"{t} {s}"}}
    rows = {}
    for n in (0, 4):
        spec = {
            "model": str(llama_dir),
            "method": {"steps": 4, "solve": {"select": "add", "min_layer": 0.25, "max_layer": 0.5, "steps": 1, "near_misses": n}},
            "edits": [two, update_edit(world, "capital", 5)],
            "verify": {"control_draws": 0, "safety": False},
        }
        result = pipeline.edit(write_spec(spec, f"near{n}.yaml"), options=BuildOptions(device="cpu", no_cache=True))
        rows[n] = [next(iter(e.keys.values())) for e in result.batch.edits]
        result.undo()
    for n, edit in ((0, 0), (0, 1), (4, 1), (4, 0)):
        g, u = (r.double() for r in rows[n][edit])
        cos = float(g @ u / (g.norm() * u.norm()))
        assert (cos > 1 - 1e-6) == ((n, edit) != (4, 0)), (n, edit, cos)


def test_patch_on_a_family_without_a_gate_is_refused_by_field(bert_dir, world, write_spec, tmp_path):
    spec = {"model": str(bert_dir), "method": {"solve": {"select": "patch"}}, "edits": [update_edit(world, "capital", 0)]}
    r = _cli_build(write_spec(spec), tmp_path / "out")
    assert r.exit_code == 2, r.output
    assert "method.solve.select" in r.output and "gated MLP" in r.output and not (tmp_path / "out").exists()


def test_add_widens_the_ffn_and_keeps_every_base_weight(llama_dir, world, write_spec, tmp_path):
    """solve.select: add: each edit gets a neuron added to each chosen layer (numbered from the base
    width on); the checkpoint's FFNs are as many neurons wider in every layer, its config says so,
    every base weight is kept, the added neurons are zero but in the edited layers, each edit's neuron
    in the first edited layer fires SIZE at its subject in every located prompt, `verify` accepts the
    checkpoint (its report equal to the build's) and rejects one whose padding is not zero, and undo
    gives back the base model bit for bit. Whether the edits take is not asked of this 4-layer model:
    it has moved the subject to the answer by layer 1, so a change at the subject there barely reaches
    the answer (the random-neuron control at the same layers does not take either); tests/test_smollm2.py
    asks it of a real model, where add is the default."""
    import shutil

    from safetensors.torch import load_file, save_file

    from kn_edit.apply import patch
    from kn_edit.errors import CheckpointChanged
    from kn_edit.options import BuildOptions, RunOptions

    edits = [update_edit(world, "capital", k) for k in (0, 5, 10)]
    spec = {
        "model": str(llama_dir),
        "method": {"steps": 4, "solve": {"select": "add", "min_layer": 0.25, "max_layer": 0.75, "steps": 200}},
        "edits": edits,
    }
    out = tmp_path / "out"
    result = pipeline.edit(write_spec(spec), options=BuildOptions(device="cpu", no_cache=True))
    result.save(out)
    report = json.loads((out / "kn_edit_report.json").read_text())
    base = pipeline.load(str(llama_dir), device="cpu").model
    width = arch.shape(base)[1]
    assert report["base"]["neurons_per_layer"] == width and report["base"]["added_neurons_per_layer"] == 3
    assert json.loads((out / "config.json").read_text())["intermediate_size"] == width + 3
    neurons = [tuple(n) for e in json.loads((out / "neurons.json").read_text())["edits"] for n in e["edited"]]
    assert sorted(neurons) == [(l, width + j) for l in (1, 2) for j in range(3)]
    edited = load_file(out / "model.safetensors")
    for name, t in base.state_dict().items():
        got = edited.get(name, t)  # tied weights are saved once
        assert torch.equal(got[tuple(slice(0, n) for n in t.shape)], t), name  # every base weight kept
        if got.shape != t.shape:
            dim = 1 if name.endswith("down_proj.weight") else 0
            layer = int(name.split(".layers.")[1].split(".")[0])
            assert got.narrow(dim, width, 3).ne(0).any(1 - dim).tolist() == [layer in (1, 2)] * 3, name
    assert "Every layer's FFN is 3 neurons wider" in (out / "README.md").read_text()
    for e in result.batch.edits:  # the key: act(gate . x) (up . x) = SIZE at every subject state
        (i,) = [i for l, i in e.neurons if l == 1]
        xs = []
        hook = arch.key_module(base, 1).register_forward_hook(lambda mod, a, o: xs.append(a[0][0, -1].double()))
        with torch.no_grad():
            for p in e.located_prompts:
                base(torch.tensor([list(p.ids[: patch.read_at(p) + 1])]))
        hook.remove()
        g, u = (edited[f"model.layers.1.mlp.{w}_proj.weight"][i].double() for w in ("gate", "up"))
        fired = torch.stack([patch._act(base, 1)(g @ x) * (u @ x) for x in xs])
        assert torch.allclose(fired, torch.full_like(fired, patch.SIZE), rtol=1e-3), fired
    assert pipeline.verify(out, options=RunOptions(device="cpu")).metrics.efficacy == report["metrics"]["efficacy"]
    # a padding that is not zero where no edit wrote is caught
    bad = tmp_path / "bad"
    shutil.copytree(out, bad)
    edited["model.layers.0.mlp.down_proj.weight"][0, width] = 1.0
    save_file(edited, bad / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointChanged, match="not only by zeros"):
        pipeline.check_untouched(bad, base, set(report["changed_tensors"]))
    # undo narrows the FFNs back: the base model, bit for bit
    assert arch.shape(result.model)[1] == width + 3
    result.undo()
    assert arch.shape(result.model)[1] == width and result.model.config.intermediate_size == width
    state = result.model.state_dict()
    assert all(torch.equal(state[name], t) for name, t in base.state_dict().items())


@pytest.mark.parametrize(
    ("layers", "select", "written"),
    [(30, "add", [5, 6]), (18, "add", [3]), (10, "add", [1]), (9, "subject", range(0, 5)), (4, "subject", range(0, 2))],
)
def test_auto_adds_neurons_from_ten_layers_on_in_their_fraction_of_the_depth(layers, select, written):
    """select: auto is add on gated causal LMs of 10 layers or more, in layers 0.167-0.234 of the depth
    (SmolLM2's 30: 5 and 6; Gemma 3 270M's 18: 3), subject (0.1-0.6) below 10 layers."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from kn_edit.apply import choose
    from kn_edit.spec import Solve

    cfg = LlamaConfig(
        vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2
    )
    model = LlamaForCausalLM(cfg)
    solve = Solve()
    assert choose.selection(model, solve) == select
    assert list(choose.layer_range(model, solve, select)) == list(written)
