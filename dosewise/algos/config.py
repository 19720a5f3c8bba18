"""The configuration of an IQL run: what `dosewise train iql` needs besides the data file, saved
as config.yaml next to every run (loaded with `dosewise.config.load_config`)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field

from dosewise.algos.iql import IQLConfig
from dosewise.data.schema import DataConfig


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
