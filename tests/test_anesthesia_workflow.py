"""The README's anesthesia workflow from the command line, on the packaged default recipe (one
epoch): simulate -> train planner -> recommend from the first 30 minutes of an unseen case ->
evaluate -> report."""

from __future__ import annotations

import json

import pandas as pd
import pytest
from typer.testing import CliRunner

from dosewise.cli import app


def invoke(*args):
    result = CliRunner().invoke(app, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


@pytest.mark.slow
def test_simulate_train_recommend_evaluate_report(tmp_path):
    cases, run = tmp_path / "cases.parquet", tmp_path / "planner"
    invoke("simulate", "anesthesia", "--out", cases, "--cases", 40, "--seed", 0)
    invoke("train", "planner", "--data", cases, "--out", run, "--epochs", 1, "--quiet")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["strategy"] == "detach" and set(summary["closed_loop"]["policies"]) >= {"planner_mpc", "simulated_anesthesiologist"}
    assert (run / "manifest.json").is_file() and (run / "data_report.json").is_file()

    invoke("simulate", "anesthesia", "--out", tmp_path / "held_out.parquet", "--cases", 1, "--seed", 1000)
    case = pd.read_parquet(tmp_path / "held_out.parquet")
    case[case.time < case.time.min() + 1800].to_csv(tmp_path / "case_so_far.csv", index=False)
    rec = json.loads(invoke("recommend", "--run", run, "--history", tmp_path / "case_so_far.csv", "--json").stdout)
    assert 0 <= rec["propofol_rate_ml_h"] <= 200 and 0 <= rec["remifentanil_rate_ml_h"] <= 200
    weight = float(case["weight"].iloc[0])
    assert rec["propofol_mg_kg_h"] == pytest.approx(rec["propofol_rate_ml_h"] * 20.0 / weight, rel=1e-3)
    for plan in ("plan", "keep_current"):
        assert len(rec["predicted"][plan]["bis"]) == 5 and all(0 <= b <= 100 for b in rec["predicted"][plan]["bis"])

    invoke("evaluate", "--run", run, "--cases", 3)
    evaluation = json.loads((run / "evaluation.json").read_text())
    rows = evaluation["closed_loop"]["policies"]
    assert {"clinician", "pid", "planner_mpc"} <= set(rows)
    for row in rows.values():
        low, high = row["pct_bis_40_60"]["ci95"]
        assert 0 <= low <= row["pct_bis_40_60"]["mean"] <= high <= 100

    invoke("report", "--run", run, "--cases", 2)
    page = (run / "report" / "index.html").read_text()
    pngs = sorted((run / "report").glob("*.png"))
    assert len(pngs) == 4 and all(p.name in page and p.stat().st_size > 5000 for p in pngs)
