"""The runs a service serves, loaded once at start and checked against their manifests.

A model is named by its run directory (``runs/demo/iql`` → ``iql``), or by ``ID=PATH`` on the
command line. What a client may learn about it (`public`) leaves out every path on the server:
the run directory, the training file's folder.
"""

from __future__ import annotations

import hashlib
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import CheckpointError, read_manifest
from dosewise.config import ConfigError
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import PlannerModel

Kind = Literal["vancomycin", "anesthesia"]
MODEL_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass
class LoadedModel:
    id: str
    kind: Kind
    algorithm: Literal["iql", "planner"]
    run: Path
    model_hash: str  # SHA-256 of model.pt: what every audit row of this model records
    weights: dict[str, str]  # file of the run -> SHA-256, from its manifest
    config: dict[str, Any]
    training_data: dict[str, Any]
    iql: TrainedIQL | None = None
    planner: tuple[PlannerModel, PlannerRunConfig] | None = None
    # The planner's search keeps caches on the model: one decision at a time per planner.
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def features(self) -> list[str]:
        return list(self.iql.feature_names) if self.iql is not None else []

    def public(self) -> dict[str, Any]:
        """What GET /v1/models says about the model."""
        return {
            "id": self.id,
            "kind": self.kind,
            "algorithm": self.algorithm,
            "model_hash": self.model_hash,
            "weights": self.weights,
            "config": self.config,
            "training_data": self.training_data,
        }


def load_models(runs: list[str | Path]) -> dict[str, LoadedModel]:
    """Every run, keyed by its id; an unreadable run, a repeated id or a bad ``ID=PATH`` is a
    ConfigError or CheckpointError naming it, before the server starts."""
    if not runs:
        raise ConfigError("no run to serve: give at least one --run RUN (e.g. --run runs/demo/iql from `dosewise demo`)")
    models: dict[str, LoadedModel] = {}
    for spec in runs:
        model_id, path = _parse_spec(spec)
        if model_id in models:
            raise ConfigError(f"two runs are named '{model_id}'; name them with --run ID=PATH")
        models[model_id] = load_model(model_id, path)
    return models


def load_model(model_id: str, run: Path) -> LoadedModel:
    from dosewise.api import run_kind  # the run's algorithm, read from its config

    if not run.is_dir():
        raise ConfigError(f"{run}: not a run directory (expected the folder `dosewise train iql|planner --out` wrote)")
    algorithm = run_kind(run)
    weights = _weights(run)
    if algorithm == "iql":
        model = TrainedIQL.load(run)
        return LoadedModel(
            id=model_id,
            kind="vancomycin",
            algorithm="iql",
            run=run,
            model_hash=weights["model.pt"],
            weights=weights,
            config=_without_paths(model.run_config.model_dump(mode="json")),
            training_data={
                "file": Path(model.run_config.data_path).name if model.run_config.data_path else None,
                "features": list(model.feature_names),
                "feature_ranges": {name: list(bounds) for name, bounds in model.feature_ranges.items()},
                "action_bounds": [model.action_low, model.action_high],
                "steps": model.step,
                "members": model.members,
                "seeds": model.seeds,
            },
            iql=model,
        )
    from dosewise.planner.training import load_planner

    planner, config = load_planner(run)
    summary = _read_json(run / "summary.json")
    stats = {name: getattr(planner, name).detach().double().tolist() for name in ("vital_mean", "vital_std", "static_mean", "static_std")}
    return LoadedModel(
        id=model_id,
        kind="anesthesia",
        algorithm="planner",
        run=run,
        model_hash=weights["model.pt"],
        weights=weights,
        config=_without_paths(config.model_dump(mode="json")),
        training_data={
            "file": Path(config.data_path).name if config.data_path else None,
            "step_s": config.data.step_s,
            "window_steps": config.windows.max_len,
            "horizon_steps": config.windows.pre_len,
            "train_windows": summary.get("train_windows"),
            "val_windows": summary.get("val_windows"),
            "epochs": summary.get("epochs"),
            "statistics": stats,
        },
        planner=(planner, config),
    )


def _parse_spec(spec: str | Path) -> tuple[str, Path]:
    text = str(spec)
    name, sep, rest = text.partition("=")
    if sep and MODEL_ID.fullmatch(name):
        return name, Path(rest)
    path = Path(text)
    model_id = re.sub(r"[^A-Za-z0-9_.-]", "-", path.resolve().name)[:64] or "model"
    if not MODEL_ID.fullmatch(model_id):
        raise ConfigError(f"--run {text}: cannot name a model after this folder; give it a name with --run ID=PATH")
    return model_id, path


def _weights(run: Path) -> dict[str, str]:
    """SHA-256 of model.pt and config.yaml: from the manifest (which the load verified), else computed."""
    manifest = read_manifest(run) or {"files": {}}
    found = {}
    for name in ("model.pt", "config.yaml"):
        entry = manifest["files"].get(name)
        if entry is not None:
            found[name] = entry["sha256"]
        elif (run / name).is_file():
            found[name] = hashlib.sha256((run / name).read_bytes()).hexdigest()
        else:
            raise CheckpointError(f"{run}: no {name}")
    return found


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        loaded = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return loaded if isinstance(loaded, dict) else {}


def _without_paths(config: dict[str, Any]) -> dict[str, Any]:
    """The run config without the training file's location on the server (its name stays in training_data)."""
    return {key: value for key, value in config.items() if key != "data_path"}
