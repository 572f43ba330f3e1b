"""What kn-edit promises (docs/security.md): it never overwrites the base model or a good checkpoint,
leaves no half-written one, notices a checkpoint changed after its build, publishes only the files
the checkpoint is made of, and says what is wrong with bad input in one line (exit 2)."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from click.testing import CliRunner
from conftest import update_edit
from safetensors.torch import load_file, save_file

from kn_edit.cli import main
from kn_edit.errors import KnEditError
from kn_edit.output import checkpoint, hub


def run_cli(*args):
    return CliRunner().invoke(main, ["-q", *(str(a) for a in args)])


def one_line(r, code):
    assert r.exit_code == code, r.output
    assert "Traceback" not in r.output and len(r.output.strip().splitlines()) == 1, r.output
    return r.output


def tiny_spec(model, world, **extra):
    return {
        "model": str(model),
        "method": {"steps": 4, "norm_cap": None},
        "edits": [update_edit(world, "capital", 0)],
        "verify": {"neighbours": 1, "control_draws": 0, "safety": False},
        **extra,
    }


@pytest.fixture
def model_copy(bert_dir, tmp_path):
    return Path(shutil.copytree(bert_dir, tmp_path / "base"))


@pytest.fixture(scope="module")
def built(bert_dir, world, tmp_path_factory):
    folder = tmp_path_factory.mktemp("safety")
    spec = folder / "spec.yaml"
    spec.write_text(yaml.safe_dump(tiny_spec(bert_dir, world)))
    r = run_cli("build", spec, folder / "ckpt", "--device", "cpu", "--no-cache")
    assert r.exit_code == 0, r.output
    return folder / "ckpt"


@pytest.fixture
def ckpt(built, tmp_path):
    return Path(shutil.copytree(built, tmp_path / "ckpt", symlinks=True))


# ---- OUT: never the base model, the caches, or a folder that cannot be written ---------------


@pytest.mark.parametrize("where", ["base", "inside", "around", "cache"])
def test_out_never_overlaps_the_base_model_or_the_cache(model_copy, world, write_spec, where):
    before = {p.name: p.read_bytes() for p in model_copy.iterdir()}
    out = {
        "base": model_copy,
        "inside": model_copy / "edited",
        "around": model_copy.parent,
        "cache": Path(os.environ["KN_EDIT_CACHE"]),
    }[where]
    spec = write_spec(tiny_spec(model_copy, world))
    out_text = one_line(run_cli("build", spec, out, "--force", "--device", "cpu"), 2)
    assert f"error: {out}: refusing to write a checkpoint here: it is, holds or lies inside" in out_text
    assert {p.name: p.read_bytes() for p in model_copy.iterdir()} == before


def test_out_in_a_read_only_folder_fails_before_the_build(bert_dir, world, write_spec, tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.access(ro, os.W_OK):  # root writes anywhere: take a folder of a read-only file system
        ro = Path("/sys")
        if os.access(ro, os.W_OK) and not os.path.ismount(ro):
            pytest.skip("no read-only folder here")
    spec = write_spec(tiny_spec(bert_dir, world))
    text = one_line(run_cli("build", spec, ro / "out", "--device", "cpu"), 2)
    assert f"error: {ro / 'out'}: cannot write in {ro}:" in text


def test_full_disk_is_one_line_and_leaves_nothing(built, monkeypatch, tmp_path, world, bert_dir, write_spec):
    def full(model, tok, dtype, folder):
        (folder / "model.safetensors").write_bytes(b"partial")
        raise OSError(28, "No space left on device")  # what the kernel says; a full disk cannot be made here

    monkeypatch.setattr(checkpoint, "save_model", full)
    shutil.copytree(built, tmp_path / "out")
    good = (tmp_path / "out" / "model.safetensors").read_bytes()
    spec = write_spec(tiny_spec(bert_dir, world))
    text = one_line(run_cli("build", spec, tmp_path / "out", "--force", "--device", "cpu", "--no-cache"), 1)
    assert f"error: writing {tmp_path / 'out'} failed: No space left on device" in text
    assert (tmp_path / "out" / "model.safetensors").read_bytes() == good
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


def test_checkpoint_has_umask_modes(built):
    umask = os.umask(0)
    os.umask(umask)
    assert built.stat().st_mode & 0o777 == 0o777 & ~umask
    assert {p.stat().st_mode & 0o777 for p in built.iterdir()} == {0o666 & ~umask}


def test_stale_staging_of_a_dead_build_is_cleaned_and_the_old_checkpoint_put_back(built, tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    (tmp_path / f".out.tmp-{pid}-abc").mkdir()
    shutil.copytree(built, tmp_path / f".out.old-{pid}-def" / "x")
    mine = tmp_path / f".out.tmp-{os.getpid()}-ghi"  # a live build's: left alone
    mine.mkdir()
    checkpoint.check_out(out, force=True)
    assert (out / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")) == [mine.name]


def test_a_build_killed_between_the_two_renames_is_recovered(built, tmp_path):
    """The process dies right after moving the old checkpoint aside: the next build puts it back."""
    out = Path(shutil.copytree(built, tmp_path / "out"))
    code = f"""
import os, pathlib
from kn_edit.output import checkpoint
real = pathlib.Path.rename
def rename(self, target):
    real(self, target)
    if self.name == "out":
        os._exit(9)
pathlib.Path.rename = rename
with checkpoint.staged(pathlib.Path({str(out)!r}), True) as tmp:
    (tmp / "new").write_text("new")
"""
    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert r.returncode == 9 and not out.exists()
    checkpoint.check_out(out, force=True)
    assert (out / "model.safetensors").read_bytes() == (built / "model.safetensors").read_bytes()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".out.")] == []


# ---- the base model: what is not loaded, said in one line ----------------------------------


def test_corrupt_weights_are_one_line(model_copy, world, write_spec, tmp_path):
    w = model_copy / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size // 2])
    text = one_line(run_cli("build", write_spec(tiny_spec(model_copy, world)), tmp_path / "out", "--device", "cpu"), 2)
    assert f"error: cannot load the weights of '{model_copy}'" in text and not (tmp_path / "out").exists()


def test_pickle_weights_only_are_refused_and_said(model_copy, world, write_spec, tmp_path):
    torch.save(load_file(model_copy / "model.safetensors"), model_copy / "pytorch_model.bin")
    (model_copy / "model.safetensors").unlink()
    text = one_line(run_cli("build", write_spec(tiny_spec(model_copy, world)), tmp_path / "out", "--device", "cpu"), 2)
    assert "it has only pytorch_model.bin, which kn-edit does not load" in text


def test_relative_path_that_does_not_exist_is_no_such_folder(world, write_spec):
    text = one_line(run_cli("validate", write_spec(tiny_spec("models/no/such", world))), 2)
    assert "no such folder" in text


# ---- verify: a changed checkpoint is a failure naming the file or tensor ------------------------


def _rewrite(path: Path, change) -> None:
    state = load_file(path)
    change(state)
    save_file(state, path, metadata={"format": "pt"})


def _reseal(ckpt: Path) -> None:
    """Rewrite the manifest to match the files: what someone who wants to hide a change would do."""
    (ckpt / checkpoint.MANIFEST).unlink()
    checkpoint.write_manifest(ckpt)


def test_verify_notices_a_changed_edited_tensor(ckpt):
    changed = json.loads((ckpt / "kn_edit_report.json").read_text())["changed_tensors"][0]
    _rewrite(ckpt / "model.safetensors", lambda s: s[changed].mul_(1.01))
    text = one_line(run_cli("verify", ckpt, "--device", "cpu"), 1)
    assert f"{ckpt / 'model.safetensors'}: changed since the build" in text


def test_verify_notices_an_untouched_tensor_that_differs_from_the_base(ckpt):
    name = "bert.embeddings.word_embeddings.weight"
    _rewrite(ckpt / "model.safetensors", lambda s: s[name][3].add_(0.5))
    _reseal(ckpt)
    text = one_line(run_cli("verify", ckpt, "--device", "cpu"), 1)
    assert f"tensor {name} differs from the base model, but no edit changed it" in text


@pytest.mark.parametrize("how", ["extra file", "no manifest"])
def test_verify_notices_added_files_and_a_missing_manifest(ckpt, how):
    if how == "extra file":
        (ckpt / "modeling_evil.py").write_text("import os\n")
    else:
        (ckpt / checkpoint.MANIFEST).unlink()
    text = one_line(run_cli("verify", ckpt, "--device", "cpu"), 1)
    assert ("modeling_evil.py: not written by the build" if how == "extra file" else "manifest.json is missing") in text


def test_verify_of_an_unreadable_report_is_one_line(ckpt):
    (ckpt / "kn_edit_report.json").write_text('{"schema_version": ' * 5000)
    _reseal(ckpt)
    text = one_line(run_cli("verify", ckpt, "--device", "cpu"), 2)
    assert f"{ckpt / 'kn_edit_report.json'}: cannot read it as a kn-edit Report" in text


# ---- push: only the checkpoint's own files, never a link's target ----------------------------------


def test_push_publishes_only_the_checkpoint_files(ckpt, tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("do not publish")
    (ckpt / "notes.txt").write_text("mine")
    (ckpt / "link.txt").symlink_to(secret)
    p = hub.plan(ckpt, "me/edited", force=True)
    names = [n for n, _ in p.files]
    assert names == sorted(json.loads((ckpt / checkpoint.MANIFEST).read_text()).keys() | {checkpoint.MANIFEST})
    assert "notes.txt" not in names and "link.txt" not in names
    assert "not published (not part of the checkpoint): link.txt" in p.notes


def test_push_refuses_a_checkpoint_file_replaced_by_a_link(ckpt, tmp_path):
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    (ckpt / "config.json").unlink()
    (ckpt / "config.json").symlink_to(secret)
    with pytest.raises(KnEditError, match="config.json: part of the checkpoint but not a plain file"):
        hub.plan(ckpt, "me/edited", force=True)


# ---- edits the spec should not hold ----------------------------------------------------------


@pytest.mark.parametrize("case", ["duplicate", "conflict", "erase twice"])
def test_repeated_or_conflicting_edits_are_input_errors(bert_dir, world, write_spec, case):
    spec = tiny_spec(bert_dir, world)
    e = spec["edits"][0]
    other = json.loads(json.dumps(e))
    if case == "conflict":
        other["update"]["new_target"] = next(
            x for x in world.objects("capital") if x not in (e["update"]["new_target"], e["update"]["target"])
        )
    if case == "erase twice":
        facts = [{"subject": s, "target": o} for s, o in world.facts["maker"][:3]]
        e = other = {"erase": {"relation": "maker", "templates": list(world.templates("maker")), "facts": facts}}
    spec["edits"] = [e, update_edit(world, "capital", 5), other]
    path = write_spec(spec)
    text = run_cli("validate", path).output
    want = "edits[2] repeats edits[0]" if case != "conflict" else "edits[0] and edits[2] edit the same fact in different ways"
    assert f"{path}: edits: {want}" in text, text


def test_a_target_the_model_does_not_predict_is_a_warning_in_the_report(bert_dir, world, write_spec, tmp_path):
    spec = tiny_spec(bert_dir, world)
    u = spec["edits"][0]["update"]
    u["target"] = next(x for x in world.objects("capital") if x not in (u["target"], u["new_target"]))
    r = run_cli("build", write_spec(spec), tmp_path / "out", "--device", "cpu", "--no-cache")
    assert r.exit_code in (0, 1), r.output
    warnings = json.loads((tmp_path / "out" / "kn_edit_report.json").read_text())["warnings"]
    assert any(w.startswith(f"edits[0].update.target: the base model answers {u['target']!r} on only 0 of") for w in warnings)


@pytest.mark.parametrize("endless", [False, True])
def test_a_spec_too_large_is_refused_at_once(tmp_path, endless):
    path = Path("/dev/zero") if endless else tmp_path / "big.yaml"
    if not endless:
        path.write_text("model: x\n" + "# padding\n" * 2_000_000)
    text = one_line(run_cli("validate", path), 2)
    assert f"{path}: larger than the 1048576 bytes a spec may have" in text


# ---- the GGUF conversion cache: two processes converting the same file ------------------------


def test_gguf_conversion_race_the_loser_uses_the_winners_folder(tmp_path):
    from kn_edit.model import load as loading

    folder = tmp_path / "gguf" / "0123456789abcdef"
    copies = []
    for who in ("winner", "loser"):
        tmp = tmp_path / "gguf" / f".tmp-{who}"
        tmp.mkdir(parents=True)
        (tmp / "config.json").write_text(who)
        (tmp / loading.CONVERTED).write_text("{}")
        copies.append(tmp)
    loading.publish(copies[0], folder)
    loading.publish(copies[1], folder)  # the rename onto a full folder fails: ENOTEMPTY
    assert (folder / "config.json").read_text() == "winner" and not copies[1].exists()

    half = tmp_path / "gguf" / ".tmp-half"  # a folder in place but not complete is not taken for one
    half.mkdir()
    (half / "config.json").write_text("half")
    (folder / loading.CONVERTED).unlink()
    with pytest.raises(OSError):
        loading.publish(half, folder)


# ---- nothing from a model folder or a spec is executed -----------------------------------------


def test_remote_code_in_a_model_folder_is_never_run(model_copy, world, write_spec, tmp_path):
    marker = tmp_path / "ran"
    config = json.loads((model_copy / "config.json").read_text())
    config["auto_map"] = {"AutoConfig": "configuration_evil.EvilConfig", "AutoModelForMaskedLM": "modeling_evil.Evil"}
    config["model_type"] = "evil-bert"
    (model_copy / "config.json").write_text(json.dumps(config))
    for name in ("configuration_evil.py", "modeling_evil.py"):
        (model_copy / name).write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    spec = write_spec(tiny_spec(model_copy, world))
    for args in (("validate", spec), ("build", spec, tmp_path / "out", "--device", "cpu")):
        r = run_cli(*args)  # transformers may log a warning of its own first
        assert r.exit_code == 2 and "Traceback" not in r.output, r.output
        assert r.output.splitlines()[-1].startswith(f"error: cannot load the config of '{model_copy}': "), r.output
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_a_spec_that_is_not_utf8_is_one_line(tmp_path):
    path = tmp_path / "latin1.yaml"
    path.write_bytes("model: café\nedits: []\n".encode("latin-1"))
    text = one_line(run_cli("validate", path), 2)
    assert f"{path}: not UTF-8 text (byte 10: b'\\xe9')" in text


def test_verify_output_that_cannot_be_written_is_one_line(ckpt, tmp_path):
    (tmp_path / "file").write_text("")
    text = one_line(run_cli("verify", ckpt, "--device", "cpu", "-o", tmp_path / "file" / "r.json"), 1)
    assert f"error: cannot write {tmp_path / 'file' / 'r.json'}: Not a directory" in text
