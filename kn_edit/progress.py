"""What the user sees while a build runs: a bar or a status line per phase on a terminal, nothing on a
pipe; `logging` lines (logger "kn_edit") with -v. transformers' and huggingface_hub's bars follow the
same rule."""

from __future__ import annotations

import contextlib
import logging
import sys
import time

from tqdm.auto import tqdm

log = logging.getLogger("kn_edit")
_quiet = False
timings: dict[str, float] = {}  # seconds per phase name in this process, summed (benchmarks/phases.py reads it)


def configure(quiet: bool = False, verbose: int = 0) -> None:
    """-q: no bars or status lines; -v: INFO log lines, -vv: DEBUG."""
    global _quiet
    _quiet = quiet
    if verbose:
        logging.basicConfig(format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
        log.setLevel(logging.DEBUG if verbose > 1 else logging.INFO)
    if not shown():
        from huggingface_hub.utils import disable_progress_bars
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        disable_progress_bars()


def shown() -> bool:
    return not _quiet and sys.stderr.isatty()


def bar(total: int, desc: str, unit: str = "it"):
    return tqdm(total=total, desc=desc, unit=unit, disable=not shown(), leave=False, file=sys.stderr)


@contextlib.contextmanager
def timed(name: str):
    """Adds the time the block takes to `timings[name]`, and logs it."""
    t = time.perf_counter()
    try:
        yield
    finally:
        took = time.perf_counter() - t
        timings[name] = timings.get(name, 0.0) + took
        log.info("%s: %.1f s", name, took)


@contextlib.contextmanager
def phase(name: str, timed_as: str | None = None):
    """A status line while the phase runs (terminal only), and log lines; timed as `timed_as` (default: name)."""
    log.info(name)
    with timed(timed_as or name):
        if not shown():
            yield
            return
        from rich.console import Console

        with Console(stderr=True).status(name):
            yield
