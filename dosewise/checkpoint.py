"""Files that survive a crash and can be loaded safely.

Writes go to a temporary file in the same folder and are renamed into place, so a run killed
mid-write leaves the previous file, never half of a new one. Reads use ``weights_only=True``:
a model file is untrusted input and must not be able to run code when unpickled.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch


class CheckpointError(ValueError):
    """A model or checkpoint file that is missing, unreadable or not of the expected format."""


def save_atomic(obj: dict, path: str | Path) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as handle:
            torch.save(obj, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def load_safe(path: str | Path, expected_format: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: file not found")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # any unpickling or zip error means the file is not ours or is damaged
        raise CheckpointError(f"{path}: not a readable dosewise file ({type(err).__name__}: {err})") from None
    if not isinstance(obj, dict) or obj.get("format") != expected_format:
        found = obj.get("format") if isinstance(obj, dict) else type(obj).__name__
        raise CheckpointError(f"{path}: expected format {expected_format!r}, found {found!r}")
    return obj
