"""A synthetic world of facts and small models trained on it, so tests can assert editing quality.

Relations map made-up subjects to made-up objects, each with several paraphrased templates.
`train(kind, folder)` trains a tiny BERT-style masked LM or Llama-style causal LM on every
(fact, template) sentence until it knows the facts, and saves it as a transformers folder.
Seeded, but not bit-reproducible across machines: even in float64 the trained weights differ between
CPUs (AVX2 / AVX-512 kernels, the float32 rotary tables) and thread counts, and the trained model decides
whether the editing tests pass. So the tests use the models trained once and stored in tests/models
(`python tests/synth.py` retrains them, on one thread with ATEN_CPU_CAPABILITY=default), and check their
digests first: a changed model fails as "test model changed", never as a quality threshold.
"""

from __future__ import annotations

import hashlib
import random
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

STORED = Path(__file__).parent / "models"
# sha256 of tests/models/<kind>/model.safetensors, written by `python tests/synth.py`
DIGESTS = {
    "bert": "c1883b2ad33859c71474052178e3e3a1cf549e7b3f2fef05bbc9b9c5c80e64b3",
    "llama": "1eeef6d58918ccf047a5fd98d888319c521dd2771610897c35eac568f33227ff",
}

RELATIONS = {
    "capital": (
        [
            "the capital of [X] is [Y] .",
            "[X] has its capital at [Y] .",
            "the capital city of [X] is [Y] .",
            "in [X] the seat of government is [Y] .",
        ],
        "city",
    ),
    "language": (
        [
            "people in [X] speak [Y] .",
            "the language of [X] is [Y] .",
            "in [X] they talk in [Y] .",
            "the official tongue of [X] is [Y] .",
        ],
        "lang",
    ),
    "maker": (
        ["[X] is made by [Y] .", "[X] is produced by [Y] .", "the maker of [X] is [Y] .", "[X] comes from the company [Y] ."],
        "corp",
    ),
}
N_SUBJECTS = 24
N_OBJECTS = 8
SPECIAL = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]


@dataclass(frozen=True)
class World:
    facts: dict  # relation -> list of (subject, object)

    def templates(self, relation):
        return RELATIONS[relation][0]

    def objects(self, relation):
        return [f"{RELATIONS[relation][1]}{j}" for j in range(N_OBJECTS)]

    def sentences(self):
        for rel, facts in self.facts.items():
            for s, o in facts:
                for t in self.templates(rel):
                    yield t.replace("[X]", s).replace("[Y]", o), o

    def vocab(self):
        words = {w for t, _ in self.sentences() for w in t.split()}
        return SPECIAL + sorted(words)


def world(seed: int = 0) -> World:
    rng = random.Random(seed)
    facts = {}
    for r, (_, prefix) in RELATIONS.items():
        subjects = [f"{r[:3]}{i}" for i in range(N_SUBJECTS)]
        facts[r] = [(s, f"{prefix}{rng.randrange(N_OBJECTS)}") for s in subjects]
    return World(facts)


def tokenizer(w: World, causal: bool):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(w.vocab())}
    core = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if not causal:
        core.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]", special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])]
        )
    kw = dict(unk_token="[UNK]", pad_token="[PAD]", mask_token="[MASK]")
    if not causal:
        kw.update(cls_token="[CLS]", sep_token="[SEP]")
    return PreTrainedTokenizerFast(tokenizer_object=core, **kw)


def model_for(kind: str, vocab_size: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    if kind == "bert":
        cfg = BertConfig(
            vocab_size=vocab_size,
            hidden_size=64,
            num_hidden_layers=4,
            num_attention_heads=4,
            intermediate_size=256,
            max_position_embeddings=32,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        model = BertForMaskedLM(cfg)
        # Keep the MLM head's transform at identity, so the residual stream is read out in
        # word-embedding space as the update rule assumes (real BERT is close to this; a model
        # this small, trained this briefly, is not unless told).
        dense = model.cls.predictions.transform.dense
        with torch.no_grad():
            dense.weight.copy_(torch.eye(cfg.hidden_size))
            dense.bias.zero_()
        dense.requires_grad_(False)
        return model
    cfg = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=256,
        max_position_embeddings=32,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=None,
        eos_token_id=None,
    )
    return LlamaForCausalLM(cfg)


def train(kind: str, folder: Path, seed: int = 0, steps: int = 600) -> Path:
    """Train a tiny `bert` or `llama` on the world of `seed` and save it into folder."""
    w = world(seed)
    causal = kind != "bert"
    tok = tokenizer(w, causal)
    # float64: fp32 training diverges between CPUs and thread counts (BLAS sums in other orders),
    # and the trained model decides whether the editing tests pass; saved in fp32
    model = model_for(kind, len(tok), seed).double()
    data = list(w.sentences())
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(seed)
    model.train()
    for _step in range(steps):
        batch = [data[i] for i in torch.randint(len(data), (64,), generator=g).tolist()]
        enc = tok([s for s, _ in batch], return_tensors="pt", padding=True)
        ids = enc.input_ids
        if causal:
            labels = ids.masked_fill(enc.attention_mask == 0, -100)
            loss = model(input_ids=ids, attention_mask=enc.attention_mask, labels=labels).loss
        else:
            # mask the answer (and, as in BERT pre-training, a few other words)
            obj = torch.tensor([tok.convert_tokens_to_ids(o) for _, o in batch])
            answer = ids == obj[:, None]
            other = (torch.rand(ids.shape, generator=g) < 0.1) & (ids > 4)
            chosen = answer | other
            labels = ids.masked_fill(~chosen, -100)
            inp = ids.masked_fill(chosen, tok.mask_token_id)
            loss = model(input_ids=inp, attention_mask=enc.attention_mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval().float()
    folder = Path(folder)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


class ModelChanged(AssertionError):
    pass


def digest(folder: Path) -> str:
    return hashlib.sha256((Path(folder) / "model.safetensors").read_bytes()).hexdigest()


def stored(kind: str, folder: Path) -> Path:
    """A copy of the stored trained `kind` model in folder, after checking its digest."""
    got = digest(STORED / kind)
    if got != DIGESTS[kind]:
        raise ModelChanged(
            f"test model changed: tests/models/{kind}/model.safetensors has sha256 {got}, "
            f"expected {DIGESTS[kind]}; retrained? update DIGESTS in tests/synth.py on purpose"
        )
    folder = Path(folder)
    shutil.copytree(STORED / kind, folder, dirs_exist_ok=True)
    return folder


if __name__ == "__main__":
    # retrain the stored models: python tests/synth.py [bert] [llama]
    import os
    import subprocess

    if os.environ.get("ATEN_CPU_CAPABILITY") != "default":
        env = {**os.environ, "ATEN_CPU_CAPABILITY": "default", "OMP_NUM_THREADS": "1"}
        sys.exit(subprocess.call([sys.executable, __file__, *sys.argv[1:]], env=env))
    torch.set_num_threads(1)
    for kind in sys.argv[1:] or ["bert", "llama"]:
        out = STORED / kind
        shutil.rmtree(out, ignore_errors=True)
        train(kind, out)
        for f in out.iterdir():
            f.chmod(0o644)
        print(f'"{kind}": "{digest(out)}",')
