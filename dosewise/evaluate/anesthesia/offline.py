"""Offline metrics of a trained planner on held-out windows: how well the learned model predicts
BIS, MAP, reward and value along the clinician's actions, and how far its policy head's argmax is
from the clinician's rate. The numbers are the training's validation metrics
(`ValidationAccumulator`), computed once more on windows the run never trained on."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import torch

from dosewise.data.anesthesia import CASE_ID, load_cases
from dosewise.data.loading import DataError
from dosewise.data.windows import Windows, build_windows, split_by_case
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.data import batch_loader, subsample, window_tensors
from dosewise.planner.model import PlannerModel
from dosewise.planner.training import ValidationAccumulator, planner_losses

# Where the offline metrics come from: the run's test cases, its validation cases (the run has no
# test share), or, without the data file, the last validation epoch that training recorded.
SOURCES = ("test", "val", "summary")


@torch.no_grad()
def window_metrics(model: PlannerModel, run: PlannerRunConfig, windows: Windows) -> dict[str, float]:
    """The validation metrics of training (val_*_mae, rollout/*_mae_h{k}, val_loss/*) on `windows`."""
    accumulator = ValidationAccumulator(run.windows.pre_len)
    model.eval()
    for batch in batch_loader(window_tensors(windows, run.windows.gamma), run.train.batch_size, shuffle=False):
        losses, out = planner_losses(model, batch, run.strategy)
        accumulator.add(model, out, batch, losses)
    return accumulator.metrics()


def offline_record(metrics: dict[str, float], pre_len: int, source: str, **where: Any) -> dict[str, Any]:
    """The evaluation's offline section from training-style metrics: MAE per horizon step k = 1..pre_len
    of BIS (points), MAP (mmHg) and reward, the overall reward and value MAE, and the action error
    (mL/h, one level of the policy head is 1 mL/h) of the policy head's argmax vs the clinician."""

    def value(name: str) -> float | None:
        x = metrics.get(name)
        return float(x) if x is not None and math.isfinite(x) else None

    steps = range(1, pre_len + 1)
    return {
        "source": source,
        **where,
        "bis_mae_per_step": [value(f"rollout/bis_mae_h{k}") for k in steps],
        "map_mae_per_step": [value(f"rollout/map_mae_h{k}") for k in steps],
        "reward_mae_per_step": [value(f"rollout/reward_mae_h{k}") for k in steps],
        "bis_mae": value("val_bis_mae"),
        "map_mae": value("val_map_mae"),
        "reward_mae": value("val_reward_mae"),
        "value_mae": value("val_value_mae"),
        "action_mae_ml_h": {"propofol": value("val_action_mae_ppf"), "remifentanil": value("val_action_mae_rftn")},
    }


def planner_offline(
    model: PlannerModel,
    run: PlannerRunConfig,
    data: str | Path | None = None,
    summary: dict[str, Any] | None = None,
    max_windows: int | None = None,
) -> dict[str, Any]:
    """Offline metrics on the run's held-out windows: the test cases of `data` (default: the run's
    data_path) split as training split them, or its validation cases when the run keeps no test
    share. An explicit `data` must load (DataError otherwise); a recorded data_path that no longer
    exists falls back to the last validation epoch in `summary` (summary.json), source "summary".
    At most `max_windows` windows (default: train.max_val_windows; 0: all), drawn seeded."""
    path = Path(data) if data is not None else Path(run.data_path) if run.data_path else None
    if path is None or (data is None and not path.is_file()):
        final = (summary or {}).get("final") or {}
        note = f"{path} not found" if path is not None else "the run records no data file"
        return offline_record(final, run.windows.pre_len, "summary", note=f"{note}: the last validation epoch of training")
    frame, _ = load_cases(path, run.data)
    parts = split_by_case(frame, run.windows)
    source = "test" if len(parts["test"]) else "val"
    held_out = build_windows(parts[source], run.windows)
    if not len(held_out):
        raise DataError(
            f"{path}: the run's {source} cases ({len(set(parts[source][CASE_ID]))}) give no windows; expected cases of 2 steps or more"
        )
    total = len(held_out)
    limit = run.train.max_val_windows if max_windows is None else max_windows
    held_out = subsample(held_out, limit, run.train.seed + 2)
    cases = len(set(held_out.case_ids.tolist()))
    return offline_record(
        window_metrics(model, run, held_out),
        run.windows.pre_len,
        source,
        data=str(path),
        cases=cases,
        windows=len(held_out),
        windows_total=total,
    )
