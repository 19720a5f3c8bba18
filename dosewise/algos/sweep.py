"""Hyperparameter sweeps: a grid over lr, gamma, beta, tau and hidden sizes, trained in one process.

A sweep file (YAML) lists the values to try; fields it does not name come from the run config::

    grid:
      lr: [3.0e-5, 1.0e-4, 3.0e-4]
      gamma: [0.90, 0.95]
      beta: [0.5, 3.0]
      tau: [0.7]
      hidden: [[32, 32], [64, 64]]

Every combination, once per seed, is a point. Points that share a network shape are stacked into
one learner (`train_iql` with one config per member; lr, gamma, beta and tau become per-member
tensors), trained in ``OUT/groups/h32x32/`` with the usual checkpoints and TensorBoard. Each
point then gets its own run directory ``OUT/<point>/`` holding an ordinary one-member
``model.pt``, which `dosewise evaluate` and `recommend` read like any run, and ``OUT/sweep.json``
lists every point's final losses and their mean and sd over seeds.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Sequence
from pathlib import Path

import yaml
from pydantic import ValidationError

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.iql import SWEEPABLE, IQLConfig
from dosewise.algos.training import MODEL_FORMAT, TrainingError, train_iql
from dosewise.checkpoint import load_safe, make_dir, new_manifest, save_atomic, write_json_atomic
from dosewise.config import ConfigError, save_config
from dosewise.data.transitions import Transitions

GRID_FIELDS = (*SWEEPABLE, "hidden")


class SweepError(ConfigError):
    """A sweep file that is missing, not YAML, names an unknown field or gives an invalid value."""


def load_grid(path: str | Path, base: IQLConfig) -> list[IQLConfig]:
    """The grid's configs, in file order (the last field varies fastest); every one validated."""
    path = Path(path)
    if not path.is_file():
        raise SweepError(f"{path}: sweep file not found")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise SweepError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict) or set(raw) != {"grid"} or not isinstance(raw["grid"], dict) or not raw["grid"]:
        raise SweepError(f"{path}: expected one top-level key 'grid:' mapping fields ({', '.join(GRID_FIELDS)}) to lists of values")
    grid = raw["grid"]
    unknown = [k for k in grid if k not in GRID_FIELDS]
    if unknown:
        raise SweepError(f"{path}: grid field(s) {', '.join(map(repr, unknown))} cannot be swept; use {', '.join(GRID_FIELDS)}")
    for field, values in grid.items():
        if not isinstance(values, list) or not values:
            raise SweepError(f"{path}: grid.{field}: expected a non-empty list of values, got {values!r}")
    configs = []
    for combo in itertools.product(*grid.values()):
        point = dict(zip(grid, combo))
        try:
            configs.append(IQLConfig.model_validate({**base.model_dump(), **point}))
        except ValidationError as err:
            problems = "; ".join(f"grid.{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
            raise SweepError(f"{path}: point {point}: {problems}") from None
    return configs


def point_name(config: IQLConfig, seed: int) -> str:
    """A deterministic directory name, e.g. ``lr3e-05_gamma0.9_beta0.5_tau0.7_h32x32_s0``."""
    hidden = "x".join(str(h) for h in config.hidden)
    return f"lr{config.lr:g}_gamma{config.gamma:g}_beta{config.beta:g}_tau{config.tau:g}_h{hidden}_s{seed}"


def _mean_sd(values: list[float]) -> dict[str, float]:
    mean = sum(values) / len(values)
    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (len(values) - 1)) if len(values) > 1 else 0.0
    return {"mean": mean, "sd": sd}


def train_sweep(
    run: IQLRunConfig,
    transitions: Transitions,
    out_dir: str | Path,
    configs: Sequence[IQLConfig],
    seeds: Sequence[int],
    resume: bool = False,
    show_progress: bool = True,
    compile: bool = False,
) -> dict:
    """Train every (config, seed) point; returns (and writes) ``sweep.json``'s content."""
    out_dir = Path(out_dir)
    if (out_dir / "sweep.json").exists() and not resume:
        raise TrainingError(f"{out_dir} already holds a sweep; pass --resume to continue it or choose another --out")
    points = [(config, seed) for config in configs for seed in seeds]
    names = [point_name(c, s) for c, s in points]
    if len(set(names)) != len(names):
        raise TrainingError("the sweep lists the same point twice; remove the repeated values")
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (config, _) in enumerate(points):
        groups.setdefault(config.hidden, []).append(i)

    results = []
    for hidden, members in groups.items():
        group_dir = out_dir / "groups" / f"h{'x'.join(map(str, hidden))}"
        base = run.model_copy(update={"iql": points[members[0]][0]})
        learner = train_iql(
            base,
            transitions,
            group_dir,
            resume=resume and (group_dir / "checkpoints").exists(),
            show_progress=show_progress,
            seeds=[points[i][1] for i in members],
            compile=compile,
            member_configs=[points[i][0] for i in members],
            labels=[names[i] for i in members],
        )
        bundle = load_safe(group_dir / "model.pt", MODEL_FORMAT)
        losses = json.loads((group_dir / "losses.json").read_text())["per_member"]
        for k, i in enumerate(members):  # one ordinary single-model run per point
            config, seed = points[i]
            point_run = run.model_copy(update={"iql": config, "train": TrainConfig(**{**run.train.model_dump(), "seed": seed})})
            point_dir = make_dir(out_dir / names[i])
            new_manifest(point_dir)  # rewritten whole: the point's files are this sweep's
            save_config(point_run, point_dir / "config.yaml", run_dir=point_dir)
            save_atomic(
                {
                    **bundle,
                    "run_config": point_run.model_dump(mode="json"),
                    "seeds": [seed],
                    "member_configs": [config.model_dump(mode="json")],
                    "networks": {key: value[k : k + 1].clone() for key, value in learner.nets.state_dict().items()},
                },
                point_dir / "model.pt",
                run_dir=point_dir,
            )
            results.append(
                {
                    "name": names[i],
                    "run": str(point_dir),
                    "seed": seed,
                    "config": {f: getattr(config, f) for f in GRID_FIELDS},
                    "losses": losses[names[i]],
                }
            )

    summary = []
    for config in configs:  # mean and sd over seeds, per grid point
        rows = [r for r in results if r["config"] == {f: getattr(config, f) for f in GRID_FIELDS}]
        summary.append(
            {
                "config": rows[0]["config"],
                "seeds": [r["seed"] for r in rows],
                "losses": {k: _mean_sd([r["losses"][k] for r in rows]) for k in rows[0]["losses"]},
            }
        )
    report = {"points": results, "summary": summary}
    write_json_atomic(report, out_dir / "sweep.json", default=list)
    return report


__all__ = ["GRID_FIELDS", "SweepError", "load_grid", "point_name", "train_sweep"]
