"""A patient's dosing record rebuilt from the rows of a dosing table, for model-informed dosing.

A row says which regimen is in force (``dose_mg`` every ``interval_h``) and when the last administration
started (``hours_since_dose``), but a table of 4-hourly rows has no administration log, so it is rebuilt:
every row's last start, then one every interval until the next row's last start. An administration at time
``a`` gets the regimen decided at the latest row at or before ``a``; a row's ``dose_mg`` is the regimen before
its decision, so that is the dose of the first row after ``a``. The administration before the first row is the
course's first (a loading dose): ``loading_dose_mg`` when the table has it, else the first row's dose.
Administrations at or after the last row are not in the record: their amount is the decision being made.

Times are the table's hours (any origin); levels are taken as drawn at their row's time.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

from dosewise.algos.bayesian_dosing import DosingRecord, infusion_hours
from dosewise.data.loading import DataError
from dosewise.data.schema import DataConfig

# Columns a dosing record needs besides the patient, time, level and creatinine columns of the config.
REGIMEN_COLUMNS = ("dose_mg", "interval_h", "hours_since_dose")
COVARIATE_COLUMNS = ("weight_kg", "age", "dialysis", "sex")


def require_history_columns(columns: object, source: str) -> None:
    """A DataError naming what is missing when a table cannot give dosing records."""
    missing = [name for name in (*REGIMEN_COLUMNS, *COVARIATE_COLUMNS) if name not in set(columns)]
    if missing:
        raise DataError(
            f"{source}: rebuilding the dosing record needs the columns {', '.join(missing)} "
            f"(the regimen {', '.join(REGIMEN_COLUMNS)}, and the covariates {', '.join(COVARIATE_COLUMNS)}; "
            "sex: 1 male, 0 female)"
        )


def administrations(rows: pd.DataFrame, config: DataConfig = DataConfig(), max_rate_mg_h: float = 1000.0) -> np.ndarray:
    """``[k, 3]`` (start h, amount mg, infusion h) of one patient's rows (sorted by time), as the module says."""
    time = rows[config.time].to_numpy(np.float64)
    dose = rows["dose_mg"].to_numpy(np.float64)
    interval = rows["interval_h"].to_numpy(np.float64)
    last_start = time - rows["hours_since_dose"].to_numpy(np.float64)
    starts: list[float] = []
    for r in range(len(time)):
        start, stop = last_start[r], (last_start[r + 1] if r + 1 < len(time) else time[-1])
        while start < time[-1] - 1e-9:  # one given at or after the last row is the decision being made
            if not starts or start > starts[-1] + 1e-9:
                starts.append(float(start))
            start += interval[r]
            if start >= stop - 1e-9:
                break
    start_h = np.asarray(starts, dtype=np.float64)
    loading = rows["loading_dose_mg"].to_numpy(np.float64)[0] if "loading_dose_mg" in rows else np.nan
    first = loading if np.isfinite(loading) and loading > 0 else dose[0]
    # Dose of the first row strictly after each start: the regimen decided at the latest row at or before it.
    after = np.searchsorted(time, start_h, side="right")
    amount = np.where(start_h < time[0], first, dose[np.minimum(after, len(time) - 1)])
    return np.stack([start_h, amount, infusion_hours(amount, max_rate_mg_h)], axis=1).reshape(-1, 3)


def next_administration_h(rows: pd.DataFrame, config: DataConfig = DataConfig()) -> float:
    """When the next administration is due after the last row: its last start plus the interval, or now if overdue."""
    last = rows.iloc[-1]
    return float(max(last[config.time] - last["hours_since_dose"] + last["interval_h"], last[config.time]))


def dosing_record(
    rows: pd.DataFrame, config: DataConfig = DataConfig(), max_rate_mg_h: float = 1000.0, source: str = "rows"
) -> DosingRecord:
    """One patient's `DosingRecord` from their rows: the rebuilt administrations, every charted level, the
    covariates of the first row, the latest creatinine and the first one as the baseline."""
    require_history_columns(rows.columns, source)
    if len(rows) == 0:
        raise DataError(f"{source}: no rows to rebuild a dosing record from")
    rows = rows.sort_values(config.time, kind="stable")
    first = rows.iloc[0]
    for name in COVARIATE_COLUMNS:
        if pd.isna(first[name]):
            raise DataError(f"{source}: column '{name}' is missing on the first row; the dosing record needs it")
    given = administrations(rows, config, max_rate_mg_h)
    level = rows[config.level_feature].to_numpy(np.float64)
    creatinine = rows[config.creatinine_feature].to_numpy(np.float64)
    charted = np.isfinite(creatinine)
    if not charted.any():
        raise DataError(f"{source}: no creatinine charted; the dosing record needs one for the clearance estimate")
    measured = np.isfinite(level)
    return DosingRecord(
        dose_start_h=given[:, 0],
        dose_mg=given[:, 1],
        infusion_h=given[:, 2],
        sample_h=rows[config.time].to_numpy(np.float64)[measured],
        level_mg_l=level[measured],
        age=float(first["age"]),
        weight_kg=float(first["weight_kg"]),
        creatinine=float(creatinine[charted][-1]),
        male=bool(first["sex"] == 1),
        dialysis=bool(first["dialysis"] == 1),
        creatinine_baseline=float(creatinine[charted][0]),
    )


def dosing_records(frame: pd.DataFrame, config: DataConfig = DataConfig(), source: str = "data") -> dict[str, DosingRecord]:
    """Every patient's `DosingRecord`, in the frame's patient order (a loaded table: `dosewise.data.load_table`)."""
    require_history_columns(frame.columns, source)
    return {
        str(patient): dosing_record(rows, config, source=f"{source} (patient '{patient}')")
        for patient, rows in frame.groupby(config.patient_id, sort=False)
    }
