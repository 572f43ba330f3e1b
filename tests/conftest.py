import os
import sys
from pathlib import Path

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
import synth  # noqa: E402

PARAREL = Path(os.environ.get("KN_EDIT_PARAREL", Path(__file__).resolve().parents[2] / "shared" / "pararel"))


@pytest.fixture(scope="session", autouse=True)
def private_caches(tmp_path_factory):
    """kn-edit's caches (neurons, GGUF conversions) in a folder of this test run, never the user's."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("KN_EDIT_CACHE", str(tmp_path_factory.mktemp("kn_edit_cache")))
        yield


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory):
    return synth.stored("bert", tmp_path_factory.mktemp("bert"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory):
    return synth.stored("llama", tmp_path_factory.mktemp("llama"))


@pytest.fixture(scope="session")
def world():
    return synth.world(0)


@pytest.fixture
def write_spec(tmp_path):
    def write(data, name="spec.yaml"):
        p = tmp_path / name
        p.write_text(data if isinstance(data, str) else yaml.safe_dump(data, sort_keys=False))
        return p

    return write


def update_edit(world, relation, k, new_target=None):
    """An update edit of the k-th fact of `relation` to another object of the relation."""
    s, o = world.facts[relation][k]
    new = new_target or next(x for x in world.objects(relation) if x != o)
    return {
        "update": {
            "relation": relation,
            "subject": s,
            "target": o,
            "new_target": new,
            "templates": list(world.templates(relation)),
        }
    }


def build(spec_path, out, cache=None, **options):
    """A build through the Python API, as the CLI runs it (on the CPU; no neuron cache unless
    given); returns the report as written to the checkpoint (JSON)."""
    import json

    from kn_edit import BuildOptions
    from kn_edit import build as api_build

    opts = BuildOptions(device="cpu", cache=cache, no_cache=cache is None, **options)
    api_build(spec_path, out, opts)
    return json.loads((Path(out) / "kn_edit_report.json").read_text())


def padded(base, like):
    """`base` zero-padded to `like`'s shape: how a base tensor reads in a checkpoint whose FFNs
    solve.select: add widened (unchanged tensors come back as they were)."""
    import torch

    if base.shape == like.shape:
        return base
    out = torch.zeros(like.shape, dtype=base.dtype)
    out[tuple(slice(0, n) for n in base.shape)] = base
    return out


def changed(base: dict, new: dict) -> set[str]:
    """Names of the tensors of `new` that differ from `base`'s (beyond zero padding)."""
    import torch

    return {k for k in base if k in new and not torch.equal(padded(base[k], new[k]), new[k])}
