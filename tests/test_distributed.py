"""Distributed `kn-edit locate`: on a local Ray cluster and as two torchrun ranks, the neuron cache it
fills is byte for byte the cache of a single-process locate.

Every process runs on one CPU thread: on the CPU the attribution scores depend on the thread count
(last bits), so a cache is byte-identical only to one computed with the same number of threads.
The Ray test skips where Ray is not installed, unless KN_EDIT_REQUIRE_RAY=1 (CI) makes that a failure.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cache import spec_data

from kn_edit.cli import main

ROOT = Path(__file__).resolve().parents[1]
ENV = {
    "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    "OMP_NUM_THREADS": "1",
}
TIMEOUT = 600  # seconds; a hung rank fails the test instead of the CI job


def tree(root: Path) -> dict:
    """Every path under root (relative) with its bytes; None for a folder."""
    return {p.relative_to(root).as_posix(): (p.read_bytes() if p.is_file() else None) for p in sorted(root.rglob("*"))}


def run(args, **kw):
    r = subprocess.run(args, env={**os.environ, **ENV}, capture_output=True, text=True, timeout=TIMEOUT, **kw)
    assert r.returncode == 0, f"{args} exited {r.returncode}\n{r.stdout}\n{r.stderr}"
    return r.stdout + r.stderr


@pytest.fixture(scope="module")
def spec(world, llama_dir, tmp_path_factory):
    import yaml

    p = tmp_path_factory.mktemp("spec") / "spec.yaml"
    p.write_text(yaml.safe_dump(spec_data(world, llama_dir), sort_keys=False))
    return p


@pytest.fixture(scope="module")
def single(spec, tmp_path_factory):
    """The cache of a plain `kn-edit locate` in one process: 10 facts, as files and bytes."""
    cache_dir = tmp_path_factory.mktemp("single") / "cache"
    out = run([sys.executable, "-m", "kn_edit", "locate", str(spec), "--cache", str(cache_dir), "--device", "cpu"])
    assert "shard 0/1 on cpu: 10 of 10 facts, 10 computed" in out
    got = tree(cache_dir)
    assert sum(v is not None for v in got.values()) == 10
    return got


def test_torchrun_two_ranks_equal_single_process(spec, single, tmp_path):
    """`torchrun --nproc-per-node 2 -m kn_edit locate`: RANK/WORLD_SIZE choose each process's shard."""
    cache_dir = tmp_path / "cache"
    out = run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
        + ["-m", "kn_edit", "locate", str(spec), "--cache", str(cache_dir), "--device", "cpu"]
    )
    for i in range(2):
        assert f"shard {i}/2 on cpu: 5 of 10 facts, 5 computed" in out, out
    assert tree(cache_dir) == single


@pytest.fixture(scope="module")
def ray():
    """Ray, or a skip; with KN_EDIT_REQUIRE_RAY=1 (CI installs the ray extra) a missing Ray is a failure."""
    if os.environ.get("KN_EDIT_REQUIRE_RAY") == "1":
        import ray

        return ray
    return pytest.importorskip("ray")


def test_ray_executor_equals_single_process(ray, spec, single, tmp_path):
    """`kn-edit locate --executor ray --workers 2` on a local two-CPU Ray cluster."""
    cache_dir = tmp_path / "cache"
    ray.init(num_cpus=2, include_dashboard=False, runtime_env={"env_vars": ENV})
    try:
        r = CliRunner().invoke(main, ["locate", str(spec), "--executor", "ray", "--workers", "2", "--cache", str(cache_dir)])
    finally:
        ray.shutdown()
    assert r.exit_code == 0, r.output
    for i in range(2):
        assert f"shard {i}/2 on cpu: 5 of 10 facts, 5 computed" in r.output, r.output
    assert tree(cache_dir) == single
