"""Run configuration: one YAML file says everything a training run did, and is saved next to it."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dosewise.algos.iql import IQLConfig
from dosewise.data.schema import DataConfig

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that is missing, not YAML, or has a field of the wrong kind; the message names it."""


class TrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Gradient steps in total.
    steps: int = Field(5000, ge=1)
    # Write a resumable checkpoint every this many steps (0: only the final model).
    checkpoint_every: int = Field(500, ge=0)
    # Log losses to TensorBoard every this many steps; each log waits for the device once.
    log_every: int = Field(50, ge=1)
    # Seed of network initialisation and minibatch sampling.
    seed: int = 0
    # CPU threads torch may use. Small MLPs run fastest on one; more only pays for wide networks.
    threads: int = Field(1, ge=1)


class IQLRunConfig(BaseModel):
    """Everything `dosewise train iql` needs besides the data file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algo: str = "iql"
    data: DataConfig = DataConfig()
    iql: IQLConfig = IQLConfig()
    train: TrainConfig = TrainConfig()
    # The training file, filled in by `dosewise train`; `dosewise evaluate` reads it back.
    data_path: str | None = None


# Where a config named without a path is looked up: inside the package, then the project's configs/.
CONFIG_DIRS: tuple[Path, ...] = (Path(__file__).parent / "configs", Path(__file__).resolve().parents[1] / "configs")


def config_path(name_or_path: str | Path) -> Path:
    """A config file's path: an existing file as given, else a bare name (`planner`,
    `iql_conservative`) looked up as NAME.yaml in `CONFIG_DIRS`."""
    path = Path(name_or_path)
    if path.is_file() or path.suffix or path.parent != Path("."):
        return path
    for folder in CONFIG_DIRS:
        if (folder / f"{path.name}.yaml").is_file():
            return folder / f"{path.name}.yaml"
    known = sorted({found.stem for folder in CONFIG_DIRS if folder.is_dir() for found in folder.glob("*.yaml")})
    raise ConfigError(f"{name_or_path}: no config of that name; named configs: {', '.join(known) or 'none'}")


def load_config(path: str | Path, model: type[Model]) -> Model:
    """A config from a YAML file, or from a named config (`config_path`)."""
    path = config_path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    try:
        return model.model_validate(raw)
    except ValidationError as err:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in err.errors())
        raise ConfigError(f"{path}: {problems}") from None


def save_config(config: BaseModel, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False))
