"""Which kind of dosing file a path holds, from its header: a vancomycin table or anesthesia
series, and for anesthesia which column layout (canonical or VitalDB track names)."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from dosewise.data.anesthesia import CANONICAL, DATA_PRESETS, VITALDB, AnesthesiaDataConfig
from dosewise.data.loading import DataError, read_table
from dosewise.data.schema import DataConfig

DATA_KINDS = ("vancomycin", "anesthesia")
__all__ = ["DATA_KINDS", "DATA_PRESETS", "anesthesia_preset", "detect_kind", "file_columns"]


def file_columns(path: str | Path) -> list[str]:
    """The column names of a data file (its header), with the loader's errors for a missing or unreadable file."""
    path = Path(path)
    if path.suffix.lower() == ".csv" and path.is_file():
        try:
            return [str(name).strip() for name in pd.read_csv(path, nrows=0, encoding="utf-8-sig").columns]
        except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError):
            pass  # the full read below names the problem
    return list(map(str, read_table(path).frame.columns))


def detect_kind(path: str | Path, columns: list[str]) -> str:
    """ "vancomycin" for a `patient_id` column, "anesthesia" for `case_id` or VitalDB's `caseid`;
    a DataError naming the columns when it is neither or both."""
    patient_id = DataConfig().patient_id
    vancomycin = patient_id in columns
    anesthesia = CANONICAL.case_id in columns or VITALDB.case_id in columns
    if vancomycin != anesthesia:
        return "vancomycin" if vancomycin else "anesthesia"
    found = ", ".join(columns) or "none"
    raise DataError(
        f"{path}: cannot tell the kind of data from its columns: expected a '{patient_id}' column "
        f"(vancomycin) or a '{CANONICAL.case_id}' / '{VITALDB.case_id}' column (anesthesia), "
        f"{'found both' if vancomycin else 'found neither'} (columns: {found}); choose the kind explicitly (vancomycin or anesthesia)"
    )


def anesthesia_preset(columns: list[str]) -> AnesthesiaDataConfig:
    """VitalDB's layout when any of its track names is a column, else the canonical one."""
    vitaldb_names = {VITALDB.case_id, VITALDB.time, *VITALDB.tracks.values()}
    return VITALDB if vitaldb_names & set(columns) else CANONICAL
