"""Sharded neuron location: each process (or Ray task) locates its share of a spec's facts into
the neuron cache; `kn-edit build` then finds them all there.

Facts are ordered as the spec lists them (duplicates, by cache key, counted once) and fact j
goes to shard j mod N, so every shard computes the same assignment without talking to the others.
"""

from __future__ import annotations

import os
from pathlib import Path

from tqdm.auto import tqdm

from ..errors import ShardError
from .cache import Cache


def parse_shard(text: str | None, env=None) -> tuple[int, int]:
    """`i/N`; without it RANK and WORLD_SIZE (set by torchrun); without those, everything (0/1)."""
    env = os.environ if env is None else env
    if text is None:
        if "RANK" not in env and "WORLD_SIZE" not in env:
            return 0, 1
        text, source = f"{env.get('RANK', '0')}/{env.get('WORLD_SIZE', '1')}", "RANK/WORLD_SIZE"
    else:
        source = "--shard"
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise ShardError(f"{source}: expected i/N with whole numbers, got {text!r}") from None
    if not 0 <= i < n:
        raise ShardError(f"{source}: expected 0 <= i < N, got {text!r}")
    return i, n


def unique_facts(batch, store: Cache, method) -> list:
    """The facts exactly as build locates them (held-out prompts left out), each once. method: spec.Locate."""
    seen, out = set(), []
    for e in batch.edits:
        for f in (x for g in e.locate_groups() for x in g):
            k = store.key(f, method)
            if k not in seen:
                seen.add(k)
                out.append(f)
    return out


def locate_shard(spec_path, cache_dir, shard=(0, 1), device="auto", dtype="float32", pararel_dir=None) -> dict:
    """Locate shard i of N of the spec's facts into cache_dir; returns counts."""
    from ..model.load import DTYPES, pick_device
    from ..pipeline import load, seed_everything
    from ..plan.batch import prepare

    i, n = shard
    batch = prepare(spec_path, pararel_dir, solving=False)
    seed_everything(batch.spec.seed)
    device = pick_device(device)
    loaded = load(batch.spec.model.name, batch.spec.model.revision, device)
    store = Cache(cache_dir, loaded.source.identity, dtype)
    method = batch.spec.method.locate
    facts = unique_facts(batch, store, method)
    mine = facts[i::n]
    with tqdm(total=sum(len(f.prompts) for f in mine), desc=f"locating (shard {i}/{n})", unit="prompt", disable=None) as bar:
        store.locate_many(loaded.model, mine, method, DTYPES[dtype], lambda: bar.update(1))  # `batch` prompts per pass
    return {
        "shard": f"{i}/{n}",
        "device": device,
        "facts": len(facts),
        "assigned": len(mine),
        "computed": store.misses,
        "cached": store.hits,
        "corrupt": store.corrupt,
    }


def locate_ray(spec_path, cache_dir, workers=None, device="auto", dtype="float32", address=None, pararel_dir=None) -> list[dict]:
    """Spread the shards over a Ray cluster (or a local one): one task per worker, one GPU each
    when the cluster has GPUs. The spec, the model and cache_dir must be reachable from every node."""
    try:
        import ray
    except ImportError:
        raise ShardError("the ray executor needs Ray: pip install 'kn-edit[ray]'") from None
    if not ray.is_initialized():
        ray.init(address=address or os.environ.get("RAY_ADDRESS"), log_to_driver=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    n = workers or gpus or sum(1 for node in ray.nodes() if node.get("Alive"))
    task = ray.remote(num_gpus=1 if gpus else 0)(locate_shard)
    dev = ("cuda" if gpus else "cpu") if device == "auto" else device
    spec_path, cache_dir = str(Path(spec_path).resolve()), str(Path(cache_dir).expanduser().resolve())
    pararel_dir = str(Path(pararel_dir).resolve()) if pararel_dir else None
    return ray.get([task.remote(spec_path, cache_dir, (i, n), dev, dtype, pararel_dir) for i in range(n)])
