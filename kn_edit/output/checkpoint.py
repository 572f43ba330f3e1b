"""Write a checkpoint folder atomically: built beside OUT, renamed into place at the end.

A failed or interrupted build leaves OUT as it was; an existing OUT is replaced only with
force, and only once the new one is complete."""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from pathlib import Path

from ..errors import OutputExists


def check_free(out: Path, force: bool) -> None:
    if out.exists() and not force:
        raise OutputExists(f"{out} exists; pass --force to replace it")


@contextlib.contextmanager
def staged(out: Path, force: bool):
    out = Path(out)
    check_free(out, force)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        yield tmp
        check_free(out, force)
        old = None
        if out.exists():
            old = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.old-"))
            out.rename(old / "x")
        tmp.rename(out)
        if old is not None:
            shutil.rmtree(old)
    except BaseException:
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
