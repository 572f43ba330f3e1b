"""Run options (as opposed to the spec, which says what to edit): typed models that the Python API
takes and that `click_options` turns into command-line options, one definition each."""

from __future__ import annotations

from pathlib import Path
from typing import Literal, get_args

import click
from pydantic import BaseModel, ConfigDict, Field, field_validator

_DTYPE_ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
Dtype = Literal["float32", "bfloat16", "float16"]


class _Options(BaseModel):
    model_config = ConfigDict(extra="forbid")


class RunOptions(_Options):
    device: str = Field("auto", description="auto (the accelerator torch reports, else the CPU), cpu, cuda, cuda:N, mps, xpu")
    dtype: Dtype = Field(
        "float32",
        description="compute dtype of attribution (autocast): float32, bfloat16 (bf16), float16 (fp16); "
        "edits and saved weights keep the model's own dtype",
    )
    cache: Path | None = Field(
        None, description="neuron cache folder  [default: $KN_EDIT_CACHE/neurons or ~/.cache/kn_edit/neurons]"
    )
    no_cache: bool = Field(False, description="locate every fact afresh and store nothing")
    pararel: Path | None = Field(
        None,
        description="PARAREL directory for source: pararel edits and solve.pararel_facts (overrides the spec's and $KN_EDIT_PARAREL)",
    )

    @field_validator("dtype", mode="before")
    @classmethod
    def _alias(cls, v):
        return _DTYPE_ALIASES.get(v, v)

    def cache_dir(self) -> Path | None:
        from .locate.cache import default_dir

        return None if self.no_cache else (self.cache or default_dir())


SaveDtype = Literal["auto", "float32", "bfloat16", "float16"]


class BuildOptions(RunOptions):
    force: bool = Field(False, description="replace OUT if it exists (only once the new checkpoint is complete)")
    seed: int | None = Field(None, description="overrides the spec's seed")
    save_dtype: SaveDtype = Field(
        "auto",
        description="dtype of the saved weights: auto (the base checkpoint's own), float32, bfloat16 (bf16), float16 (fp16)",
    )

    @field_validator("save_dtype", mode="before")
    @classmethod
    def _save_alias(cls, v):
        return _DTYPE_ALIASES.get(v, v)


class HubOptions(_Options):
    repo: str | None = Field(None, description="push the checkpoint to this Hub repository (overrides the spec's hub.repo)")
    private: bool = Field(False, description="create the repository private")
    revision: str | None = Field(None, description="branch to push to (created if needed)")
    create_pr: bool = Field(False, description="open a pull request instead of committing to the branch")
    force: bool = Field(False, description="push even if verification did not pass (recorded loudly in the model card)")


def click_options(model: type[BaseModel], *, names: dict[str, str] | None = None, skip=()):
    """A decorator adding one click option per field of `model` (help from the field's description);
    `names` renames options (field -> option name), booleans become flags."""
    names = names or {}

    def deco(f):
        for name, field in reversed(list(model.model_fields.items())):
            if name in skip:
                continue
            dest = names.get(name, name)
            flag = "--" + dest.replace("_", "-")
            kw = {"help": field.description, "default": field.default}
            ann = field.annotation
            if ann is bool:
                kw["is_flag"] = True
            elif ann in (Dtype, SaveDtype):
                kw.update(type=click.Choice([*get_args(ann), *_DTYPE_ALIASES]), show_default=True)
            elif ann in (Path | None, Path):
                kw.update(type=click.Path(file_okay=False, path_type=Path))
            elif ann in (int | None, int):
                kw.update(type=int)
            elif field.default is not None:
                kw["show_default"] = True
            f = click.option(flag, dest, **kw)(f)
        return f

    return deco
