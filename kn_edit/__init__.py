"""kn-edit: declarative knowledge-neuron edits (Dai et al., ACL 2022) -> verified checkpoints.

import kn_edit
spec = kn_edit.Spec.from_yaml("edits/demo.yaml")          # or kn_edit.Spec(model=..., edits=[...])
loaded = kn_edit.load(spec.model.name)                    # model + tokenizer, in memory
result = kn_edit.edit(spec, loaded)                       # locate, choose, apply, verify (in place)
result.report.metrics.success_rate
result.save("out/demo")                                   # an atomic checkpoint folder
result.undo()                                             # the model as it was, bit for bit
"""

__version__ = "0.1.0"

from .errors import InputError, KnEditError, ModelError, SpecError  # noqa: E402
from .options import BuildOptions, HubOptions, RunOptions  # noqa: E402
from .spec import EditSpec, Erase, Method, Spec, Update  # noqa: E402

__all__ = [
    "Spec",
    "EditSpec",
    "Update",
    "Erase",
    "Method",
    "BuildOptions",
    "RunOptions",
    "HubOptions",
    "load",
    "edit",
    "build",
    "verify",
    "push",
    "Report",
    "KnEditError",
    "InputError",
    "SpecError",
    "ModelError",
]


def __getattr__(name):
    # the pipeline imports torch and transformers: only when it is asked for
    if name in ("load", "edit", "build", "verify", "Result", "Loaded"):
        from . import pipeline

        return getattr(pipeline, name)
    if name == "Report":
        from .output.report import Report

        return Report
    if name == "push":
        from .output.hub import push_folder

        return push_folder
    raise AttributeError(f"module 'kn_edit' has no attribute {name!r}")
