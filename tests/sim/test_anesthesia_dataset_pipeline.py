"""The simulated anesthesia dataset goes through the same loader and windows a VitalDB export does."""

import numpy as np
from typer.testing import CliRunner

from dosewise.cli import app
from dosewise.data.anesthesia import CANONICAL, VITALDB, load_cases
from dosewise.data.windows import WindowConfig, build_windows


def test_simulated_cases_load_and_window_like_a_vitaldb_export(tmp_path):
    out = tmp_path / "cases.csv"
    result = CliRunner().invoke(app, ["simulate", "anesthesia", "--cases", "4", "--seed", "1", "--out", str(out)])
    assert result.exit_code == 0, result.output
    frame, report = load_cases(out, CANONICAL)
    assert report.cases == 4 and not report.cases_dropped and report.rows_total == len(frame)

    renamed = tmp_path / "vitaldb.parquet"
    columns = {
        **dict(zip(CANONICAL.tracks.values(), VITALDB.tracks.values(), strict=True)),
        CANONICAL.case_id: VITALDB.case_id,
        CANONICAL.time: VITALDB.time,
    }
    import pandas as pd

    pd.read_csv(out).rename(columns=columns).to_parquet(renamed, index=False)
    again, _ = load_cases(renamed, VITALDB)
    pd.testing.assert_frame_equal(frame.reset_index(drop=True), again.reset_index(drop=True), check_dtype=False)

    windows = build_windows(frame, WindowConfig())
    assert len(windows) == len(frame) - 4  # a case of T steps gives T - 1 windows
    assert windows.actions.max() <= 200 and windows.target_bis.max() <= 100
    assert np.all(windows.history_mask.sum(axis=1) >= 1)
