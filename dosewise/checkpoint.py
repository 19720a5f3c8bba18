"""Files that survive a crash, a full disk and a flipped bit, and are loaded safely.

Every file the training and evaluation paths write goes through one writer: the bytes go to a
temporary file in the same folder, are fsynced and renamed into place (``os.replace``), and the
temporary file is removed on any error. A run killed mid-write leaves the previous file, never
half of a new one (at most a hidden ``.NAME.XXXX.tmp``, which the next training in that run
directory removes); a full disk or a read-only folder is a `WriteError` naming the file, and
leaves nothing behind. JSON is written strictly (no NaN or Infinity), so any JSON reader takes it.

Each run directory holds ``manifest.json``: the SHA-256 of its weight files (``model.pt`` and
``checkpoints/*.pt``) and of ``config.yaml``. An entry is written before its file, so a file that
verifies is exactly what training wrote. Loading verifies it (`verify_manifest`): a changed or
damaged file is a `CheckpointError` naming it, where torch alone would load a flipped bit in a
tensor silently. A run directory without ``manifest.json`` (trained before runs had one) still
loads, with an `IntegrityWarning`: reading stays safe (``weights_only``), a truncated or garbled
file still fails to load, and refusing would strand every earlier run over a check it never had.

Reads use ``weights_only=True``: a model file is untrusted input and must not be able to run code
when unpickled; a file that would need more is refused, never loaded another way.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import os
import pickle
import re
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any

import torch

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "dosewise.manifest/1"
# The files a load checks in a run directory: the weights and the config they were trained with.
RUN_FILES = ("model.pt", "config.yaml")
# A temporary file of `write_bytes_atomic`: mkstemp's ".NAME." + 8 random characters + ".tmp".
_TEMP = re.compile(r"^\..+\.[a-z0-9_]{8}\.tmp$")


class CheckpointError(ValueError):
    """A model or checkpoint file that is missing, unreadable, damaged or not of the expected format."""


class WriteError(OSError):
    """A file could not be written (full disk, read-only or missing folder, no permission); names the file."""

    def __str__(self) -> str:
        return f"cannot write {self.filename}: {self.strerror}"


class IntegrityWarning(UserWarning):
    """Something was loaded that could not be verified, or a damaged checkpoint was skipped."""


# -- writing --------------------------------------------------------------------------------------


def _write(handle, data: bytes, path: Path) -> None:
    """The one place bytes reach the disk (tests inject a full disk here, per target file)."""
    handle.write(data)


def make_dir(path: str | Path) -> Path:
    """``mkdir -p`` whose failure (a file in the way, a read-only parent) is a `WriteError` naming the folder."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise WriteError(err.errno, err.strerror or str(err), str(path)) from None
    return path


def write_bytes_atomic(path: str | Path, data: bytes, run_dir: str | Path | None = None) -> Path:
    """Write ``data`` to ``path`` atomically; with ``run_dir``, first record its SHA-256 in the run's manifest."""
    path = Path(path)
    make_dir(path.parent)
    if run_dir is not None:
        record(run_dir, path, data)
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "wb") as handle:
            _write(handle, data, path)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException as err:
        if tmp is not None:
            Path(tmp).unlink(missing_ok=True)
        if isinstance(err, OSError) and not isinstance(err, WriteError):
            raise WriteError(err.errno, err.strerror or str(err), str(path)) from None
        raise
    return path


def write_figure_atomic(fig, path: str | Path, dpi: int = 110) -> Path:
    """A matplotlib figure as PNG, rendered in memory and written atomically."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=dpi)
    return write_bytes_atomic(path, buffer.getvalue())


def write_text_atomic(path: str | Path, text: str, run_dir: str | Path | None = None) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"), run_dir)


def json_safe(obj: Any) -> Any:
    """`obj` as strict-JSON values: NaN and infinities (a metric no case reached, a diverged loss)
    become None (null), numpy scalars and arrays Python numbers and lists, tuples lists."""
    if isinstance(obj, dict):
        return {str(key): json_safe(value) for key, value in obj.items()}
    if isinstance(obj, list | tuple):
        return [json_safe(value) for value in obj]
    if hasattr(obj, "tolist") and not isinstance(obj, str | bytes):  # numpy arrays and scalars
        return json_safe(obj.tolist())
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    return obj


def write_json_atomic(obj: Any, path: str | Path, run_dir: str | Path | None = None, indent: int | None = 2, default=None) -> Path:
    """Strict JSON (`json_safe`: NaN and infinity as null, never the non-standard NaN token), written atomically."""
    text = json.dumps(json_safe(obj), indent=indent, allow_nan=False, default=default)
    return write_text_atomic(path, text + "\n", run_dir)


def torch_bytes(obj: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def save_atomic(obj: dict, path: str | Path, run_dir: str | Path | None = None) -> None:
    """``torch.save`` atomically. The file is recorded in ``run_dir``'s manifest, or, without
    ``run_dir``, in the manifest of its own folder when that folder has one, so the manifest
    always describes the weights dosewise wrote there."""
    path = Path(path)
    if run_dir is None and (path.parent / MANIFEST).is_file():
        run_dir = path.parent
    write_bytes_atomic(path, torch_bytes(obj), run_dir)


def remove_stale_temp_files(*folders: str | Path) -> list[Path]:
    """Delete the hidden temporary files a killed writer left directly in ``folders`` (a run
    directory and its checkpoints/, which one training owns; never their other subfolders)."""
    removed = []
    for folder in map(Path, folders):
        if folder.is_dir():
            for path in folder.iterdir():
                if path.is_file() and _TEMP.match(path.name):
                    path.unlink(missing_ok=True)
                    removed.append(path)
    return removed


# -- manifest -------------------------------------------------------------------------------------


def sha256_hex(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _key(run_dir: Path, path: Path) -> str:
    return Path(os.path.relpath(path, run_dir)).as_posix()


def read_manifest(run_dir: str | Path) -> dict | None:
    """The run's manifest, None when it has none; a damaged one is a CheckpointError."""
    path = Path(run_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as err:
        raise CheckpointError(f"{path}: damaged, not readable JSON ({err})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(f"{path}: not a dosewise manifest (expected format {MANIFEST_FORMAT!r} and a 'files' table)")
    return manifest


def new_manifest(run_dir: str | Path) -> None:
    """Start an empty manifest: a fresh run describes only the files it writes itself."""
    write_json_atomic({"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": {}}, Path(run_dir) / MANIFEST)


def record(run_dir: str | Path, path: str | Path, data: bytes) -> None:
    """Set ``path``'s entry (SHA-256 and size of ``data``) in ``run_dir``'s manifest, creating it if needed."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir) or {"format": MANIFEST_FORMAT, "algorithm": "sha256", "files": {}}
    manifest["files"][_key(run_dir, Path(path))] = {"sha256": sha256_hex(data), "bytes": len(data)}
    write_json_atomic(manifest, run_dir / MANIFEST)


def manifest_problem(manifest: dict, run_dir: str | Path, path: str | Path) -> str | None:
    """Why ``path`` does not match the manifest (not listed, SHA-256 differs), or None when it does."""
    run_dir, path = Path(run_dir), Path(path)
    entry = manifest["files"].get(_key(run_dir, path))
    if not isinstance(entry, dict) or "sha256" not in entry:
        return f"not listed in {MANIFEST} (not written by this run's training)"
    try:
        data = path.read_bytes()
    except OSError as err:
        return f"cannot be read ({err.strerror})"
    if len(data) != entry.get("bytes", len(data)) or sha256_hex(data) != entry["sha256"]:
        return f"SHA-256 does not match {MANIFEST} (the file changed after training or is damaged)"
    return None


def run_dir_of(path: str | Path) -> Path:
    """The run directory of a file: its folder, or the folder above (``checkpoints/``) when only that one has a manifest."""
    path = Path(path)
    if not (path.parent / MANIFEST).is_file() and (path.parent.parent / MANIFEST).is_file():
        return path.parent.parent
    return path.parent


def verify_manifest(run_or_file: str | Path, names: tuple[str, ...] = RUN_FILES) -> None:
    """Check a run directory's ``names`` (or one file of a run) against its manifest.json.

    A mismatch is a CheckpointError naming the file; a run without a manifest loads with an
    IntegrityWarning. Missing files are left to the loader, which says what is missing."""
    path = Path(run_or_file)
    if path.is_dir():
        run_dir, files = path, [path / name for name in names]
    else:
        run_dir, files = run_dir_of(path), [path]
    files = [f for f in files if f.is_file()]
    if not files:
        return
    manifest = read_manifest(run_dir)
    if manifest is None:
        listed = ", ".join(f.name for f in files)
        warnings.warn(
            f"{run_dir}: no {MANIFEST} to check {listed} against (runs trained by earlier dosewise versions have none); loaded unverified",
            IntegrityWarning,
            stacklevel=2,
        )
        return
    for f in files:
        problem = manifest_problem(manifest, run_dir, f)
        if problem is not None:
            raise CheckpointError(f"{f}: {problem}")


# -- reading --------------------------------------------------------------------------------------


def _reason(data: bytes, err: Exception) -> str:
    """One line on why torch could not read ``data``; never torch's advice to load unsafely."""
    if not zipfile.is_zipfile(io.BytesIO(data)):
        return "not a PyTorch zip archive: truncated, damaged, or another kind of file"
    if isinstance(err, pickle.UnpicklingError):
        return "it holds Python objects other than tensors and plain data, which are never loaded"
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    first = first.split(". ")[0]
    if "weights_only" in first or not first:
        first = type(err).__name__
    return f"damaged archive: {first[:160]}"


def load_safe(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        data = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"{path}: cannot be read ({err.strerror})") from None
    try:
        obj = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling or zip error means the file is not ours or is damaged
        raise CheckpointError(f"{path}: not a readable dosewise file ({_reason(data, err)})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected format {expected_format!r}, found {found!r}")
    return obj
