"""What can be checked of the container image without Docker: its install step works in a clean
virtual environment, and the entry point it names is the package's console script."""

import json
import re
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import tomllib

ROOT = Path(__file__).resolve().parents[1]


def instructions():
    text = re.sub(r"\\\n", " ", (ROOT / "Dockerfile").read_text())
    rows = [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]
    return [tuple(r.split(None, 1)) for r in rows]


def test_dockerfile_is_conventional():
    ins = instructions()
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    args = dict(a.split("=", 1) for k, a in ins if k == "ARG" and "=" in a)
    base = next(a for k, a in ins if k == "FROM").replace("${BASE}", args.get("BASE", ""))
    assert re.fullmatch(r"pytorch/pytorch:[\d.]+-cuda[\d.]+-cudnn\d+-runtime", base), base
    entry = json.loads(next(a for k, a in ins if k == "ENTRYPOINT"))
    assert entry == ["kn-edit"] and pyproject["project"]["scripts"]["kn-edit"] == "kn_edit.cli:main"
    user = [a for k, a in ins if k == "USER"]
    assert user and user[-1] not in ("root", "0")
    env = " ".join(a for k, a in ins if k == "ENV")
    volumes = json.loads(next(a for k, a in ins if k == "VOLUME"))
    hf_home = re.search(r"HF_HOME=(\S+)", env).group(1)
    assert any(hf_home.startswith(v) for v in volumes)
    installs = [a for k, a in ins if k == "RUN" and "pip install" in a]
    extras = set(re.findall(r"\[([\w,-]+)\]", " ".join(installs))[0].split(","))
    assert extras <= set(pyproject["project"]["optional-dependencies"]) and not extras & {"test", "dev"}
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert ignore[ignore.index("*") + 1 :].count("!kn_edit/") == 1


def test_install_step_in_a_clean_venv(tmp_path):
    """The Dockerfile's `pip install` (without its dependencies, which need the network): the wheel
    holds the package, its data and the console script the ENTRYPOINT runs."""
    # what the image's COPY gets through .dockerignore, built outside the work tree
    src = tmp_path / "src"
    shutil.copytree(ROOT / "kn_edit", src / "kn_edit", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        if (ROOT / name).exists():
            shutil.copy(ROOT / name, src / name)
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(src)],
        check=True,
        cwd=tmp_path,
    )
    (wheel,) = wheels.glob("kn_edit-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert "kn_edit/cli.py" in names and "kn_edit/specs/demo.yaml" in names and not any(n.startswith("tests/") for n in names)
    assert "kn_edit/model/architectures.yaml" in names and "kn_edit/apply/rules.py" in names
    env = tmp_path / "venv"
    venv.create(env, with_pip=False)
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(env / "bin" / "python"), "install", "-q", "--no-deps", str(wheel)],
        check=True,
    )
    # the clean venv has none of the dependencies (they need the network): borrow ours, after its own
    deps = next(p for p in sys.path if p.endswith("site-packages"))
    r = subprocess.run([str(env / "bin" / "kn-edit"), "--version"], capture_output=True, text=True, env={"PYTHONPATH": deps})
    assert r.returncode == 0 and "kn-edit, version" in r.stdout, r.stderr
    where = subprocess.run(
        [str(env / "bin" / "python"), "-c", "import kn_edit; print(kn_edit.__file__)"],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONPATH": deps},
        cwd=tmp_path,
    ).stdout
    assert where.startswith(str(env))
