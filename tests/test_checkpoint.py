"""The file layer on its own: atomic writes that leave nothing behind on a full or read-only disk,
strict JSON, the SHA-256 manifest that catches a flipped bit torch would load silently, and load
errors that are one line naming the file and never advise loading unsafely."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

import dosewise.checkpoint as ckpt
from dosewise.checkpoint import (
    MANIFEST,
    CheckpointError,
    IntegrityWarning,
    WriteError,
    load_safe,
    make_dir,
    new_manifest,
    read_manifest,
    remove_stale_temp_files,
    save_atomic,
    verify_manifest,
    write_bytes_atomic,
    write_json_atomic,
    write_text_atomic,
)


def _all_files(folder: Path) -> list[str]:
    """Every file, dot-files included (temporary files are hidden)."""
    return sorted(str(Path(root, n).relative_to(folder)) for root, _, names in os.walk(folder) for n in names)


def _strict_json(path: Path):
    """Parse refusing NaN / Infinity, which Python's json accepts by default but JSON does not."""

    def refuse(token):
        raise AssertionError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _flip_bit(path: Path, offset: int | None = None) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2 if offset is None else offset] ^= 0x01
    path.write_bytes(bytes(data))


# -- atomic writes --------------------------------------------------------------------------------


@pytest.fixture()
def full_disk(monkeypatch):
    """A disk that takes half of a file's bytes, then fails with the given errno (for one file name)."""

    def install(code: int, name: str | None = None):
        real = ckpt._write

        def failing(handle, data, path):
            if name is None or path.name == name:
                handle.write(data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
            real(handle, data, path)

        monkeypatch.setattr(ckpt, "_write", failing)

    return install


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EACCES, errno.EROFS])
def test_failed_write_names_the_file_keeps_the_old_one_and_leaves_no_temp_file(tmp_path, full_disk, code):
    path = tmp_path / "summary.json"
    write_json_atomic({"a": 1}, path)
    full_disk(code)
    with pytest.raises(WriteError) as err:
        write_json_atomic({"a": 2}, path)
    assert str(err.value) == f"cannot write {path}: {os.strerror(code)}"
    assert err.value.errno == code and isinstance(err.value, OSError)
    assert _strict_json(path) == {"a": 1}
    assert _all_files(tmp_path) == ["summary.json"]


def test_failed_first_write_leaves_no_file_at_all(tmp_path, full_disk):
    full_disk(errno.ENOSPC)
    with pytest.raises(WriteError, match="No space left on device"):
        save_atomic({"format": "f/1", "x": torch.ones(1000)}, tmp_path / "model.pt")
    assert _all_files(tmp_path) == []


@pytest.mark.parametrize(
    ("target", "code"),
    [("tempfile.mkstemp", errno.EACCES), ("tempfile.mkstemp", errno.EROFS), ("os.replace", errno.EACCES), ("os.fsync", errno.EIO)],
)
def test_a_refusing_folder_is_a_write_error_and_no_temp_file_stays(tmp_path, monkeypatch, target, code):
    """A read-only folder or a permission error (faked: tests may run as root, which chmod does not stop)."""

    def refuse(*args, **kwargs):
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(target, refuse)
    with pytest.raises(WriteError) as err:
        write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert str(err.value) == f"cannot write {tmp_path / 'config.yaml'}: {os.strerror(code)}"
    monkeypatch.undo()
    assert _all_files(tmp_path) == []


def test_an_output_folder_that_cannot_exist_is_a_write_error(tmp_path):
    blocker = tmp_path / "file.txt"
    blocker.write_text("x")
    with pytest.raises(WriteError, match=r"cannot write .*file.txt/run: Not a directory"):
        make_dir(blocker / "run")
    with pytest.raises(WriteError, match="cannot write"):
        write_json_atomic({}, blocker / "run" / "summary.json")


def test_non_atomic_bugs_still_clean_up_but_keep_their_type(tmp_path):
    with pytest.raises(TypeError):
        write_json_atomic({"x": object()}, tmp_path / "a.json")
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails; the exact type is torch's business)
        save_atomic({"format": "f/1", "bad": lambda: 0}, tmp_path / "a.pt")
    assert _all_files(tmp_path) == []


def test_json_is_strict_with_nan_and_infinity_as_null(tmp_path):
    path = tmp_path / "evaluation.json"
    write_json_atomic({"ok": [1.5, None, "x"], "nested": {"t": (1, 2)}, "np": np.float32(0.5), "arr": np.arange(2)}, path)
    assert _strict_json(path) == {"ok": [1.5, None, "x"], "nested": {"t": [1, 2]}, "np": 0.5, "arr": [0, 1]}
    write_json_atomic({"ope": {"ess": [1.0, float("nan"), float("-inf"), np.float64("inf")]}}, path)
    assert _strict_json(path) == {"ope": {"ess": [1.0, None, None, None]}}  # no NaN token: never reached / diverged
    assert _all_files(tmp_path) == ["evaluation.json"]


def test_stale_temp_files_are_removed_only_where_asked_and_only_ours(tmp_path):
    names = (".model.pt.ab12_xyz.tmp", "checkpoints/.step_000020.pt.zz9abcde.tmp", "model.pt", "notes.tmp", ".x.short.tmp")
    for name in (*names, "tb/.events.abcdefgh.tmp", "other/.data.csv.abcdefgh.tmp"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text("x")
    removed = remove_stale_temp_files(tmp_path, tmp_path / "checkpoints", tmp_path / "missing")
    assert sorted(p.name for p in removed) == [".model.pt.ab12_xyz.tmp", ".step_000020.pt.zz9abcde.tmp"]
    assert _all_files(tmp_path) == [".x.short.tmp", "model.pt", "notes.tmp", "other/.data.csv.abcdefgh.tmp", "tb/.events.abcdefgh.tmp"]


# -- manifest -------------------------------------------------------------------------------------


def _run_dir(tmp_path: Path) -> Path:
    run = tmp_path / "runs" / "x"
    new_manifest(run)
    write_text_atomic(run / "config.yaml", "train:\n  steps: 10\n", run_dir=run)
    save_atomic({"format": "f/1", "w": torch.arange(4096, dtype=torch.float32)}, run / "model.pt", run_dir=run)
    save_atomic({"format": "c/1", "w": torch.zeros(16)}, run / "checkpoints" / "step_000010.pt", run_dir=run)
    return run


def test_manifest_lists_the_sha256_of_every_file_written_with_it(tmp_path):
    run = _run_dir(tmp_path)
    manifest = _strict_json(run / MANIFEST)
    assert manifest["format"] == "dosewise.manifest/1"
    assert sorted(manifest["files"]) == ["checkpoints/step_000010.pt", "config.yaml", "model.pt"]
    for name, entry in manifest["files"].items():
        data = (run / name).read_bytes()
        assert entry == {"sha256": hashlib.sha256(data).hexdigest(), "bytes": len(data)}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a verified run loads without a warning
        verify_manifest(run)
        verify_manifest(run / "model.pt")
        verify_manifest(run / "checkpoints" / "step_000010.pt")


def test_a_flipped_bit_torch_loads_silently_is_caught_naming_the_file(tmp_path):
    run = _run_dir(tmp_path)
    _flip_bit(run / "model.pt", offset=(run / "model.pt").stat().st_size - 2000)  # inside the tensor data
    assert load_safe(run / "model.pt", "f/1")["w"].shape == (4096,)  # torch alone does not notice
    message = f"{run / 'model.pt'}: SHA-256 does not match manifest.json (the file changed after training or is damaged)"
    for target in (run, run / "model.pt"):
        with pytest.raises(CheckpointError) as err:
            verify_manifest(target)
        assert str(err.value) == message


def test_changed_config_truncated_checkpoint_and_unlisted_file_are_caught(tmp_path):
    run = _run_dir(tmp_path)
    (run / "config.yaml").write_text("train:\n  steps: 11\n")
    with pytest.raises(CheckpointError, match=r"x/config.yaml: SHA-256 does not match manifest.json"):
        verify_manifest(run)
    step = run / "checkpoints" / "step_000010.pt"
    step.write_bytes(step.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"step_000010.pt: SHA-256 does not match"):
        verify_manifest(step)
    torch.save({"format": "c/1"}, run / "checkpoints" / "step_000020.pt")  # not written by dosewise
    with pytest.raises(CheckpointError, match=r"step_000020.pt: not listed in manifest.json"):
        verify_manifest(run / "checkpoints" / "step_000020.pt")


def test_save_atomic_keeps_the_manifest_of_its_folder_current(tmp_path):
    run = _run_dir(tmp_path)
    save_atomic({"format": "f/1", "w": torch.ones(3)}, run / "model.pt")  # no run_dir: the folder's manifest
    verify_manifest(run)
    assert torch.equal(load_safe(run / "model.pt", "f/1")["w"], torch.ones(3))


def test_a_run_without_manifest_loads_with_one_warning(tmp_path):
    run = _run_dir(tmp_path)
    (run / MANIFEST).unlink()
    with pytest.warns(IntegrityWarning, match=r"x: no manifest.json to check model.pt, config.yaml against") as record:
        verify_manifest(run)
    assert len(record) == 1 and "\n" not in str(record[0].message)
    verify_manifest(tmp_path / "nothing-here")  # nothing to check, nothing to warn about


def test_a_damaged_manifest_is_an_error_naming_it(tmp_path):
    run = _run_dir(tmp_path)
    (run / MANIFEST).write_text('{"format": "dosewise.manifest/1", "files": {')
    with pytest.raises(CheckpointError, match=r"x/manifest.json: damaged, not readable JSON"):
        verify_manifest(run)
    (run / MANIFEST).write_text("[]")
    with pytest.raises(CheckpointError, match="not a dosewise manifest"):
        read_manifest(run)


# -- loading --------------------------------------------------------------------------------------


class _Payload:
    def __reduce__(self):
        return (print, ("unpickled",))


@pytest.mark.parametrize(
    ("make", "reason"),
    [
        (lambda p: torch.save({"format": "f/1", "x": _Payload()}, p), "it holds Python objects other than tensors and plain data"),
        (lambda p: p.write_bytes(b"not a torch file at all"), "not a PyTorch zip archive: truncated, damaged"),
        (lambda p: p.write_bytes(b""), "not a PyTorch zip archive"),
    ],
)
def test_unloadable_files_are_one_line_that_never_suggests_loading_unsafely(tmp_path, make, reason):
    path = tmp_path / "model.pt"
    make(path)
    with pytest.raises(CheckpointError) as err:
        load_safe(path, "f/1")
    text = str(err.value)
    assert text.startswith(f"{path}: not a readable dosewise file (") and reason in text
    assert "\n" not in text and "weights_only" not in text and "trust" not in text


def test_truncated_model_is_one_line(tmp_path):
    path = tmp_path / "model.pt"
    save_atomic({"format": "f/1", "x": torch.ones(1000)}, path)
    write_bytes_atomic(path, path.read_bytes()[:-300])
    with pytest.raises(CheckpointError) as err:
        load_safe(path, "f/1")
    assert str(err.value).startswith(f"{path}: not a readable dosewise file (") and "\n" not in str(err.value)
