"""Located neurons cached per fact on disk, so that builds resume and shards share their work.

An entry holds what locate() returns for one fact (coarse sets per prompt, mean scores and
activations, the prompts) - not the refined set, whose share is chosen later over a group.
Its key is the sha256 of a canonical JSON of everything that determines that result: the
model's identity (weights' hash or Hub commit), the encoded prompts, the target, the settings
that affect location (steps, threshold, engine, quadrature rule, like_riemann and per-layer rules, prompts per pass, compute dtype) and
ATTRIBUTION_VERSION.
Settings added after the first format leave the key unchanged at their default (`ADDED`), so entries
written before them stay valid.
The on-disk format is described in docs/cache.md.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from pathlib import Path

from ..errors import InputError
from ..model.arch import shape
from ..model.load import cache_dir
from .neurons import Located
from .stage import locate_facts

# Bump when attribution.py, locate.py or neurons.coarse change the numbers they produce.
ATTRIBUTION_VERSION = 2  # 2: activations from attribution's own clean pass
FORMAT = "kn-edit-neurons"
FORMAT_VERSION = 1

log = logging.getLogger(__name__)
_DTYPE_NAMES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
# method.locate settings added later -> the default at which they stay out of the key
ADDED = {"rule": "riemann", "batch": 1, "layer_rules": {}, "like_riemann": None}


def default_dir() -> Path:
    return cache_dir() / "neurons"


def _canonical(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _digest(obj) -> str:
    return hashlib.sha256(_canonical(obj)).hexdigest()


def _method(method) -> dict:
    """method (spec.Locate) as keyed: settings of ADDED left out at their default."""
    d = method.model_dump(mode="json")
    return {k: v for k, v in d.items() if k not in ADDED or v != ADDED[k]}


def inputs(identity: dict, fact, method, dtype: str) -> dict:
    """Everything the located neurons of `fact` (a plan.batch.Fact) depend on; method: spec.Locate."""
    return {
        "attribution_version": ATTRIBUTION_VERSION,
        "model": identity,
        "subject": fact.subject,
        "target": fact.target,
        # one token as before (the keys of single-token facts unchanged), else the list
        "target_id": fact.target_ids[0] if len(fact.target_ids) == 1 else list(fact.target_ids),
        "prompts": [{"text": p.text, "ids": list(p.ids), "pos": p.pos} for p in fact.prompts],
        "method": _method(method),
        "dtype": _DTYPE_NAMES.get(dtype, dtype),
    }


def _pairs(d: dict) -> list:
    return [[l, i, v] for (l, i), v in sorted(d.items())]


def _to_json(x: Located) -> dict:
    return {
        "subject": x.subject,
        "target": x.target,
        "prompts": x.prompts,
        "coarse": [[list(n) for n in s] for s in x.coarse],
        "score": _pairs(x.score),
        "activation": _pairs(x.activation),
    }


def _from_json(d: dict) -> Located:
    return Located(
        subject=d["subject"],
        target=d["target"],
        prompts=list(d["prompts"]),
        coarse=[[(int(l), int(i)) for l, i in s] for s in d["coarse"]],
        score={(int(l), int(i)): float(v) for l, i, v in d["score"]},
        activation={(int(l), int(i)): float(v) for l, i, v in d["activation"]},
    )


def _fits(x: Located, shape: tuple[int, int]) -> bool:
    """Whether every neuron of the entry exists in a model of `shape` (layers, neurons per layer)."""
    layers, width = shape
    neurons = [n for s in x.coarse for n in s] + list(x.score) + list(x.activation)
    return all(0 <= l < layers and 0 <= i < width for l, i in neurons)


class Cache:
    """Per-fact entries under `root`, for one loaded model (identity) and compute dtype."""

    def __init__(self, root, identity: dict, dtype: str = "float32"):
        self.root = Path(root).expanduser()
        self.identity = identity
        self.dtype = dtype
        self.hits = self.misses = self.corrupt = 0
        try:  # found now, not after the first fact has been located
            self.root.mkdir(parents=True, exist_ok=True)
            os.rmdir(tempfile.mkdtemp(dir=self.root, prefix=".probe-"))
        except OSError as e:
            raise InputError(
                f"neuron cache {self.root}: cannot write there: {e.strerror} (use --cache DIR or --no-cache)"
            ) from None

    def key(self, fact, method) -> str:
        return _digest(inputs(self.identity, fact, method, self.dtype))

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.json"

    def _read(self, key: str, shape: tuple[int, int] | None = None) -> Located | None:
        p = self.path(key)
        if not p.is_file():
            return None
        try:
            doc = json.loads(p.read_bytes())
            body = {k: doc[k] for k in ("format", "format_version", "key", "inputs", "located")}
            ok = (
                doc["checksum"] == _digest(body)
                and body["format"] == FORMAT
                and body["format_version"] == FORMAT_VERSION
                and body["key"] == key == _digest(body["inputs"])
            )
            located = _from_json(body["located"]) if ok else None
            if located is not None and shape is not None and not _fits(located, shape):
                ok, located = False, None
        except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
            ok, located = False, None
            log.debug("unreadable cache entry %s: %s", p, e)
        if not ok:
            self.corrupt += 1
            log.warning("corrupt neuron cache entry %s: ignored and recomputed", p)
        return located

    def _write(self, key: str, inp: dict, located: Located, extra: dict) -> None:
        body = {"format": FORMAT, "format_version": FORMAT_VERSION, "key": key, "inputs": inp, "located": _to_json(located)}
        doc = {**body, "checksum": _digest(body), "info": extra}
        p = self.path(key)
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=p.parent, prefix=f".{key[:16]}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(json.dumps(doc, indent=1).encode() + b"\n")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, p)  # atomic: readers see the old entry, none, or the whole new one
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def locate(self, model, fact, method, compute_dtype=None, tick=lambda: None) -> Located:
        """The fact's located neurons: from the cache when a valid entry exists, else computed and stored."""
        return self.locate_many(model, [fact], method, compute_dtype, tick)[0]

    def locate_many(self, model, facts, method, compute_dtype=None, tick=lambda: None) -> list[Located]:
        """`locate` of each fact, those not in the cache located together (stage.locate_facts: with
        method.batch > 1, their prompts share passes). A fact given twice is located once."""
        inps = [inputs(self.identity, f, method, self.dtype) for f in facts]
        keys = [_digest(i) for i in inps]
        got: dict = {}
        todo, seen = [], set()  # todo: the first occurrence of each key not found
        for n, k in enumerate(keys):
            if k in seen:
                continue
            seen.add(k)
            hit = self._read(k, shape(model))
            if hit is None:
                todo.append(n)
            else:
                got[k] = hit
        device = str(next(model.parameters()).device)

        def store(i, located):  # as each fact is done: an interrupted run keeps what it did
            j = todo[i]
            got[keys[j]] = located
            try:
                self._write(keys[j], inps[j], located, {"device": device})
            except OSError as e:
                log.warning("cannot store neuron cache entry %s: %s", self.path(keys[j]), e.strerror or e)

        locate_facts(model, [facts[j] for j in todo], method, compute_dtype, tick, store)
        first = set(todo)
        self.misses += len(todo)
        self.hits += len(facts) - len(todo)  # as located one after the other: a repeated fact is found
        out = []
        for n, (f, k) in enumerate(zip(facts, keys)):
            if n not in first:
                for _ in f.prompts:
                    tick()
            out.append(got[k] if n in first else _from_json(_to_json(got[k])))  # each its own copy
        return out
