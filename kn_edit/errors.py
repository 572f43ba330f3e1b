"""One error base class. The CLI catches it once and exits with its code: 2 for bad input
(nothing was done), 1 for a failure while doing it."""

from __future__ import annotations


class KnEditError(Exception):
    exit_code = 1
    prefix = "error: "  # how the CLI introduces the message


class InputError(KnEditError, ValueError):
    """Bad input: a spec, a model folder, an output path, an option."""

    exit_code = 2


class SpecError(InputError):
    """Each line names the file, the field path and what was expected."""

    def __init__(self, file, problems: list[tuple[str, str]]):
        self.file = str(file)
        self.problems = problems
        super().__init__("\n".join(f"{self.file}: {loc}: {msg}" if loc else f"{self.file}: {msg}" for loc, msg in problems))


class ModelError(InputError):
    """The model cannot be found, read or used."""


class OutputExists(InputError, FileExistsError):
    pass


class ShardError(InputError):
    pass


class PushRefused(InputError):
    """The checkpoint may not be pushed as it is (not verified, not a checkpoint)."""


class PushError(KnEditError, RuntimeError):
    """The Hub (or the way to it) failed; the local checkpoint is untouched."""


class GatesFailed(KnEditError):
    """A build or verify whose gates did not pass (the checkpoint is kept, marked failed)."""

    prefix = ""


class CheckpointChanged(KnEditError):
    """A checkpoint's files differ from what its build wrote (or its untouched tensors from the base)."""
