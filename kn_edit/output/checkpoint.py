"""Write a checkpoint folder atomically: built beside OUT, renamed into place at the end.

A failed or interrupted build leaves OUT as it was; an existing OUT is replaced only with
force, and only once the new one is complete. OUT may not be, hold or lie inside a protected
path (the base model, the caches). The staging folders carry the builder's pid: those of dead
processes are removed by the next build to the same OUT, and an old checkpoint left aside by an
interrupted swap is put back."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path

from ..errors import InputError, KnEditError, OutputExists
from ..model.load import sha256

MANIFEST = "kn_edit_manifest.json"  # {file: sha256} of every file the checkpoint is made of


def check_free(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExists(f"{out} exists; pass --force to replace it")


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_out(out: Path, force: bool, protect=()) -> None:
    """Everything that can be known about OUT before a build: clear of the protected paths, free
    (or forced), and its folder writable."""
    out = Path(out)
    recover(out)
    real = out.resolve()
    for p in protect:
        if _overlaps(real, Path(p).resolve()):
            raise InputError(f"{out}: refusing to write a checkpoint here: it is, holds or lies inside {p}")
    check_free(out, force)
    if out.exists() and not out.is_dir():
        raise InputError(f"{out} exists and is not a folder")
    parent = real.parent
    while not parent.exists():
        parent = parent.parent
    try:
        os.rmdir(tempfile.mkdtemp(dir=parent, prefix=f".{out.name}.probe-"))
    except OSError as e:
        raise InputError(f"{out}: cannot write in {parent}: {e.strerror}") from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    return True


def recover(out: Path) -> None:
    """Clean up after builds to `out` that were killed: their staging folders go, and an old
    checkpoint set aside just before the final rename comes back if `out` is missing."""
    out = Path(out)
    if not out.parent.is_dir():
        return
    for p in sorted(q for q in out.parent.iterdir() if q.name.startswith(f".{out.name}.")):
        kind, _, rest = p.name[len(out.name) + 2 :].partition("-")
        pid = rest.split("-", 1)[0]
        if kind not in ("tmp", "old") or not pid.isdigit() or _alive(int(pid)):
            continue
        if kind == "old" and (p / "x").is_dir() and not out.exists():
            (p / "x").rename(out)
        shutil.rmtree(p, ignore_errors=True)


def _normal_modes(folder: Path) -> None:
    """mkdtemp makes 0700: give the folder the modes of one made by mkdir under the umask."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for p in folder.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def write_manifest(folder: Path) -> dict:
    files = {p.relative_to(folder).as_posix(): sha256(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    (folder / MANIFEST).write_text(json.dumps(files, indent=1) + "\n")
    return files


def read_manifest(folder: Path) -> dict:
    try:
        files = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError, RecursionError) as e:
        raise InputError(f"{folder}: cannot read {MANIFEST}: {e}") from None
    if not isinstance(files, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
        raise InputError(f"{folder}/{MANIFEST}: expected an object of file name -> sha256")
    return files


@contextlib.contextmanager
def staged(out: Path, force: bool, protect=()):
    out = Path(out)
    check_out(out, force, protect)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-{os.getpid()}-"))
    old = None
    try:
        try:
            yield tmp
            write_manifest(tmp)
            _normal_modes(tmp)
        except OSError as e:
            raise KnEditError(f"writing {out} failed: {e.strerror or e}; {out} was left as it was") from None
        check_free(out, force)
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-{os.getpid()}-"))
            out.rename(old / "x")  # killed from here to the next rename: recover() puts it back
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
        if old is not None and (old / "x").is_dir() and not out.exists():
            (old / "x").rename(out)
            shutil.rmtree(old, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_model(model, tok, dtype, folder: Path) -> None:
    """The model's weights in `dtype` (the model in memory is left as it is), and its tokenizer."""
    copies = {}  # by storage: tied weights stay one tensor
    state = {k: copies.setdefault(v.data_ptr(), v.detach().to(dtype)) for k, v in model.state_dict().items()}
    model.save_pretrained(folder, state_dict=state, safe_serialization=True)
    was = model.config.dtype
    model.config.dtype = dtype  # save_pretrained wrote the dtype of the model in memory
    try:
        model.config.save_pretrained(folder)
    finally:
        model.config.dtype = was
    tok.save_pretrained(folder)
