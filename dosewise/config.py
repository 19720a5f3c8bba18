"""Loading and saving run configs: one YAML file says everything a training run did, and is saved next to it.
Each config lives beside what it configures (`dosewise.algos.config`, `dosewise.planner.config`)."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import yaml
from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)


class ConfigError(ValueError):
    """A config file that is missing, not YAML, or has a field of the wrong kind; the message names it."""


# The configs that ship inside the package, addressable by name (`planner`, `iql_conservative`).
CONFIG_DIR = Path(__file__).parent / "configs"


def packaged_configs() -> list[str]:
    return sorted(found.stem for found in CONFIG_DIR.glob("*.yaml"))


def config_path(name_or_path: str | Path) -> Path:
    """A config file's path: a name without a path separator or .yaml/.yml suffix (`planner`,
    `iql_conservative`) is a config shipped in the package, anything else a file."""
    text = str(name_or_path)
    if "/" in text or "\\" in text or Path(text).suffix in (".yaml", ".yml"):
        return Path(text)
    path = CONFIG_DIR / f"{text}.yaml"
    if not path.is_file():
        raise ConfigError(f"{text}: no config of that name; packaged configs: {', '.join(packaged_configs())}")
    return path


def load_config(path: str | Path, model: type[Model]) -> Model:
    """A config from a YAML file, or a packaged config by name (`config_path`)."""
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


def save_config(config: BaseModel, path: str | Path, run_dir: str | Path | None = None) -> Path:
    """The config as YAML, written atomically (and recorded in `run_dir`'s manifest.json when given)."""
    from dosewise.checkpoint import write_text_atomic

    return write_text_atomic(path, yaml.safe_dump(config.model_dump(mode="json"), sort_keys=False), run_dir)
