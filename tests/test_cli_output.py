"""What a user sees: JSON on stdout that validates against the published schema, progress on a terminal
and nothing on a pipe, -h, the saved dtype."""

import fcntl
import json
import os
import pty
import struct
import subprocess
import sys
import termios

import jsonschema
import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import update_edit
from safetensors import safe_open

from kn_edit.cli import main


@pytest.fixture
def spec(bert_dir, world, tmp_path):
    data = {"model": str(bert_dir), "method": {"steps": 2}, "edits": [update_edit(world, "capital", 0)],
            "verify": {"gates": ["success_rate >= 0.5"]}}  # fmt: skip
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _run(args, stderr, env=None):
    cmd = [sys.executable, "-m", "kn_edit", *map(str, args)]
    return subprocess.run(cmd, stdout=subprocess.PIPE, stderr=stderr, env={**os.environ, **(env or {})}, timeout=300)


def test_json_on_stdout_validates_against_the_published_schema(spec, tmp_path):
    schema = json.loads(CliRunner().invoke(main, ["schema", "--report"]).output)
    r = _run(["build", spec, tmp_path / "out", "--device", "cpu", "--no-cache", "--json"], subprocess.PIPE)
    assert r.returncode == 0, r.stderr.decode()
    report = json.loads(r.stdout)  # stdout holds the JSON and nothing else
    jsonschema.validate(report, schema)
    assert report["status"] == "passed" and "status: passed" in r.stderr.decode()
    r = _run(["verify", tmp_path / "out", "--device", "cpu", "--json"], subprocess.PIPE)
    assert r.returncode == 0, r.stderr.decode()
    jsonschema.validate(json.loads(r.stdout), schema)


def test_no_progress_on_a_pipe_and_progress_on_a_terminal(spec, tmp_path):
    piped = _run(["build", spec, tmp_path / "piped", "--device", "cpu", "--no-cache"], subprocess.PIPE)
    err = piped.stderr.decode()
    assert piped.returncode == 0, err
    assert "\r" not in err and "it/s" not in err and "Loading weights" not in err and "locating" not in err
    # the same build with stderr on a terminal: the phases show
    leader, follower = pty.openpty()
    fcntl.ioctl(follower, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))  # a new pty has 0 columns
    try:
        cmd = [sys.executable, "-m", "kn_edit", "build", str(spec), str(tmp_path / "tty"), "--device", "cpu", "--no-cache"]
        tty = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=follower)  # read while it runs: a full pty blocks it
        os.close(follower)
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 1 << 16)
            except OSError:
                break
            if not chunk:
                break
            seen += chunk
    finally:
        os.close(leader)
    assert tty.wait(timeout=300) == 0
    assert b"locating neurons" in seen and b"choosing neurons" in seen
    quiet = _run(["-q", "build", spec, tmp_path / "quiet", "--device", "cpu", "--no-cache"], subprocess.PIPE)
    assert b"locating" not in quiet.stderr


def test_short_help():
    for args in (["-h"], ["build", "-h"], ["verify", "-h"]):
        r = CliRunner().invoke(main, args)
        assert r.exit_code == 0 and "Usage:" in r.output


def test_save_dtype(spec, tmp_path):
    r = CliRunner().invoke(main, ["build", str(spec), str(tmp_path / "bf16"), "--device", "cpu", "--no-cache",
                                  "--save-dtype", "bf16"])  # fmt: skip
    assert r.exit_code == 0, r.output
    with safe_open(tmp_path / "bf16" / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}
    assert json.loads((tmp_path / "bf16" / "config.json").read_text())["dtype"] == "bfloat16"
