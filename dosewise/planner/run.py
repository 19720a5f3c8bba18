"""Planner training as a Python function: config + cases file -> trained run directory with
summary.json (final metrics, alarms). `dosewise.api.train_planner` adds the closed loop."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from dosewise.checkpoint import write_json_atomic
from dosewise.config import load_config
from dosewise.data.anesthesia import load_cases
from dosewise.data.windows import build_windows, split_by_case
from dosewise.planner.config import PlannerRunConfig, PlannerTrainConfig
from dosewise.planner.data import subsample
from dosewise.planner.training import PlannerRun, train_planner

# The recipe `dosewise train planner` uses without --config (dosewise/configs/planner.yaml).
DEFAULT_CONFIG = "planner"
# The load report of the training file, in the run directory (CaseReport.to_dict, strict JSON).
DATA_REPORT = "data_report.json"


def resolve_run(config: str | Path | None, data: str | Path, epochs: int | None = None) -> PlannerRunConfig:
    """The run config from a YAML file or a named config (default: `planner`, the recipe), with the
    data path recorded and `epochs` overriding train.epochs."""
    run = load_config(config or DEFAULT_CONFIG, PlannerRunConfig)
    train = run.train.model_dump()
    if epochs is not None:
        train["epochs"] = epochs
    return run.model_copy(update={"train": PlannerTrainConfig(**train), "data_path": str(Path(data).resolve())})


def train_from_file(
    run: PlannerRunConfig,
    data: str | Path,
    out: str | Path,
    show_progress: bool = False,
    echo: Callable[[str], Any] = print,
) -> PlannerRun:
    """Load cases, split by case (train/val; test is kept for later), build windows and train;
    writes everything into `out`, with the load report (what was read, repaired and dropped) as
    data_report.json."""
    if run.data_path is None:
        run = run.model_copy(update={"data_path": str(Path(data).resolve())})
    frame, report = load_cases(data, run.data)
    if report.cases_dropped:
        echo(f"dropped {len(report.cases_dropped)} of {report.cases + len(report.cases_dropped)} cases: {report.cases_dropped}")
    masked = {name: count for name, count in report.artefacts_masked.items() if count}
    if masked:
        echo(f"masked {sum(masked.values())} vital values outside their physiological bounds as missing: {masked}")
    parts = split_by_case(frame, run.windows)
    train = subsample(build_windows(parts["train"], run.windows), run.train.max_train_windows, run.train.seed)
    val = subsample(build_windows(parts["val"], run.windows), run.train.max_val_windows, run.train.seed + 1)
    echo(
        f"{report.cases} cases -> {len(train)} training / {len(val)} validation windows; "
        f"strategy {run.strategy.name}, {run.train.epochs} epochs -> {out}"
    )
    result = train_planner(run, train, val, out, show_progress=show_progress)
    write_json_atomic(report.to_dict(), Path(out) / DATA_REPORT, run_dir=out)
    return result
