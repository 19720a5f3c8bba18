"""A trained IQL model loaded from disk, with a numpy interface in raw clinical units.

Evaluation, recommendation and the service all go through this one object, so they all apply
the normalisation that was stored with the model and read the file the same safe way.

An ensemble run (``train iql --seeds K``) loads the same way: every method answers with the mean
over members, ``policy_members`` gives each member's action and ``policy_spread`` their standard
deviation, the ensemble's uncertainty about its recommendation. One member is the plain model.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from dosewise.algos.config import IQLRunConfig
from dosewise.algos.iql import IQLConfig, Networks
from dosewise.algos.training import MODEL_FORMAT
from dosewise.checkpoint import CheckpointError, load_safe, verify_manifest
from dosewise.data.schema import DataConfig
from dosewise.data.transitions import Normalizer

ACTION_GRID_SIZE = 101  # greedy actions are chosen on this many evenly spaced points of [low, high]


class TrainedIQL:
    def __init__(self, bundle: dict, source: str = "<memory>"):
        try:
            self.run_config = IQLRunConfig.model_validate(bundle["run_config"])
            self.feature_names: tuple[str, ...] = tuple(bundle["feature_names"])
            self.normalizer = Normalizer.from_dict(bundle["normalizer"])
            self.feature_ranges = {k: (float(lo), float(hi)) for k, (lo, hi) in bundle["feature_ranges"].items()}
            self.action_low, self.action_high = (float(x) for x in bundle["action_bounds"])
            self.step = int(bundle["step"])
            self.seeds = [int(s) for s in bundle["seeds"]]
            if any(IQLConfig.model_validate(c) != self.config for c in bundle.get("member_configs", [])):
                raise ValueError("its members have different configs (a sweep group): load one point's run directory instead")
            self.nets = Networks(len(self.feature_names), 1, self.config, self.seeds)
            self.nets.load_state_dict(bundle["networks"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise CheckpointError(f"{source}: model file is incomplete or does not match its config ({err})") from None
        _require_finite(bundle, source)
        self.nets.eval()

    @classmethod
    def load(cls, run_or_model: str | Path) -> TrainedIQL:
        """Load ``DIR/model.pt`` (given a run directory) or a model file."""
        path = Path(run_or_model)
        verify_manifest(path)  # model.pt and config.yaml against the run's manifest.json
        if path.is_dir():
            path = path / "model.pt"
            if not path.exists():
                raise CheckpointError(f"{path.parent}: no model.pt; has `dosewise train iql --out {path.parent}` finished?")
        return cls(load_safe(path, MODEL_FORMAT), str(path))

    @property
    def config(self) -> IQLConfig:
        return self.run_config.iql

    @property
    def data_config(self) -> DataConfig:
        """The run's data config reading exactly the model's features: a 7-feature model reads 7
        columns even from a file that has the optional dose-aware ones."""
        return self.run_config.data.with_features(self.feature_names)

    @property
    def members(self) -> int:
        return len(self.seeds)

    # -- numpy interface, raw clinical units in, [N] or [N, K] out -----------------------------
    def _obs(self, obs: np.ndarray) -> torch.Tensor:
        """Raw states [N, D] -> normalised, once per member: [members, N, D]."""
        obs = np.atleast_2d(np.asarray(obs, dtype=np.float32))
        if obs.shape[1] != len(self.feature_names):
            raise ValueError(f"expected {len(self.feature_names)} features {self.feature_names}, got {obs.shape[1]}")
        s = torch.as_tensor(self.normalizer.normalize(obs), dtype=torch.float32)
        return s.expand(self.members, *s.shape)

    @torch.no_grad()
    def policy_members(self, obs: np.ndarray) -> np.ndarray:
        """Every member's policy mean, clipped to the action bounds: [members, N]."""
        mean, _ = self.nets.policy(self._obs(obs))
        return mean[..., 0].clamp(self.action_low, self.action_high).numpy()

    def policy_action(self, obs: np.ndarray) -> np.ndarray:
        """Mean of the Gaussian policy, clipped to the action bounds (an ensemble: the members' mean)."""
        return self.policy_members(obs).mean(axis=0)

    def policy_spread(self, obs: np.ndarray) -> np.ndarray:
        """Standard deviation of the members' actions [N] (0 for a single model): the uncertainty."""
        members = self.policy_members(obs)
        return members.std(axis=0, ddof=1) if self.members > 1 else np.zeros(members.shape[1], dtype=np.float32)

    @torch.no_grad()
    def q_value(self, obs: np.ndarray, action: np.ndarray) -> np.ndarray:
        s = self._obs(obs)
        a = torch.tensor(np.asarray(action, dtype=np.float32).reshape(1, -1, 1)).expand(self.members, -1, 1)
        return self.nets.q_min(s, a).mean(0).numpy()

    @torch.no_grad()
    def value(self, obs: np.ndarray) -> np.ndarray:
        return self.nets.value(self._obs(obs)).mean(0).numpy()

    def action_grid(self, size: int = ACTION_GRID_SIZE) -> np.ndarray:
        return np.linspace(self.action_low, self.action_high, size, dtype=np.float32)

    @torch.no_grad()
    def q_curve(self, obs: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
        """Q(s, a) for every state and every action of ``grid``: [N, K]."""
        grid = self.action_grid() if grid is None else np.asarray(grid, dtype=np.float32)
        s = self._obs(obs)
        n, k = s.shape[1], grid.shape[0]
        s_rep = s.repeat_interleave(k, dim=1)
        a_rep = torch.tensor(grid).repeat(n).reshape(1, -1, 1).expand(self.members, -1, 1)
        return self.nets.q_min(s_rep, a_rep).mean(0).reshape(n, k).numpy()

    def greedy_action(self, obs: np.ndarray, grid: np.ndarray | None = None) -> np.ndarray:
        grid = self.action_grid() if grid is None else np.asarray(grid, dtype=np.float32)
        return grid[self.q_curve(obs, grid).argmax(axis=1)]


def _require_finite(bundle: dict, source: str) -> None:
    """A NaN or inf anywhere in the weights, normaliser or ranges poisons every answer, so such a model is refused."""
    numbers: list[tuple[str, object]] = [(f"tensor '{name}'", value) for name, value in _tensors(bundle["networks"])]
    numbers += [(f"normaliser '{key}'", bundle["normalizer"][key]) for key in ("mean", "std")]
    numbers += [(f"feature range of '{name}'", bounds) for name, bounds in bundle["feature_ranges"].items()]
    numbers.append(("action bounds", bundle["action_bounds"]))
    for label, value in numbers:
        if isinstance(value, torch.Tensor):
            bad = int((~torch.isfinite(value)).sum()) if value.is_floating_point() else 0
        else:
            bad = int((~np.isfinite(np.asarray(value, dtype=np.float64))).sum())
        if bad:
            noun = "value" if bad == 1 else "values"
            raise CheckpointError(f"{source}: {label} has {bad} non-finite {noun}; the model cannot be used")


def _tensors(state: dict, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted name, value) of every entry of a possibly nested state dict."""
    found: list[tuple[str, object]] = []
    for name, value in state.items():
        if isinstance(value, dict):
            found += _tensors(value, f"{prefix}{name}.")
        else:
            found.append((f"{prefix}{name}", value))
    return found
