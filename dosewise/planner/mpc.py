"""Short-horizon model-predictive control over the learned model, with an explicit reward.

At every decision each row (patient) scores a fixed menu of candidate plans: hold a propofol and
a remifentanil rate for `horizon` steps, the rates being the current ones moved by the menu's
steps (and the two ends of the pump, off and full). The dynamics unrolls every candidate
(`PlannerModel.unroll_candidates`); the BIS and MAP heads give a distribution of the charted
values at each step; the score is Σ_k γ^k E[r(BIS_k, MAP_k)] with r the `AnesthesiaReward` the
training data's rewards come from (its BIS window replaced by `MPCConfig.bis_window`), less a small
cost per mL/h of change. The first step of the best plan is applied, and the plan is made again at
the next step.

Why not the learned value or reward heads: they regress noisy returns of one behaviour policy
and overfit (`summary.json` compares them with a constant predictor); the BIS and MAP heads are
the part of the model trained on the most signal per window, and the reward is known.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from dosewise.data.anesthesia import AnesthesiaReward
from dosewise.data.windows import BIS_MAX, DEFAULT_REWARD, MAP_MAX
from dosewise.planner.config import MPCConfig
from dosewise.planner.model import PREVIOUS_RATES, RATE_LEVELS, PlannerModel


@dataclass(frozen=True)
class MPCResult:
    action: Tensor  # [B, 2] int64 the chosen rates (levels, mL/h)
    score: Tensor  # [B] the chosen plan's score
    bis: Tensor  # [B, horizon] predicted mean charted BIS under the chosen plan
    map: Tensor  # [B, horizon] predicted mean charted MAP under the chosen plan


def reward_tables(reward: AnesthesiaReward, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """The reward split into a BIS part over the BIS classes [BIS_MAX + 1] and a MAP part over the
    MAP classes [MAP_MAX + 1], r(b, m) = bis_part[b] + map_part[m] (tested), so that the expected
    reward under the model's two categorical predictions is two dot products."""
    bis, mean_pressure = np.arange(BIS_MAX + 1, dtype=np.float64), np.arange(MAP_MAX + 1, dtype=np.float64)
    no_hypotension = max(float(MAP_MAX), reward.map_low)
    in_band = 0.5 * (reward.bis_low + reward.bis_high)
    bis_part = reward.reward(bis, no_hypotension)
    map_part = reward.reward(in_band, mean_pressure) - reward.reward(in_band, no_hypotension)
    return torch.as_tensor(bis_part, dtype=dtype), torch.as_tensor(map_part, dtype=dtype)


def candidate_rates(current: Tensor, config: MPCConfig, allowed: Tensor | None = None) -> Tensor:
    """Joint candidates [B, C, 2] int64 around the current rates [B, 2]: propofol current + each
    step and 0 and the top rate, times remifentanil current + each step, clipped to the pump
    (and to `allowed` [B, 2, A] bool: a candidate level outside it moves to the nearest allowed level)."""
    top = RATE_LEVELS - 1
    ppf_steps = torch.tensor(config.propofol_steps)
    ppf = torch.cat([current[:, :1] + ppf_steps, torch.zeros_like(current[:, :1]), torch.full_like(current[:, :1], top)], dim=1)
    rftn = current[:, 1:] + torch.tensor(config.remifentanil_steps)
    ppf, rftn = ppf.clamp(0, top), rftn.clamp(0, top)
    if allowed is not None:
        ppf, rftn = _nearest_allowed(ppf, allowed[:, 0]), _nearest_allowed(rftn, allowed[:, 1])
    joint = torch.stack(torch.broadcast_tensors(ppf[:, :, None], rftn[:, None, :]), dim=-1)
    return joint.flatten(1, 2)


def _nearest_allowed(levels: Tensor, allowed: Tensor) -> Tensor:
    """levels [B, n] -> the nearest level with allowed [B, A] True (ties to the lower)."""
    grid = torch.arange(allowed.shape[-1])
    distance = (levels[..., None] - grid).abs().float() + torch.where(allowed, 0.0, float("inf"))[:, None, :]
    return distance.argmin(-1)


@torch.no_grad()
def mpc_plan(
    model: PlannerModel,
    history: Tensor,
    history_mask: Tensor,
    static: Tensor,
    config: MPCConfig | None = None,
    allowed: Tensor | None = None,
    reward: AnesthesiaReward = DEFAULT_REWARD,
) -> MPCResult:
    """Choose the next rates for every row (inputs as `PlannerModel.represent`; `allowed`
    [B, 2, A] bool from `dose_mask` limits the rates): score the candidate menu around the rates in
    force (`current_rates`) and return the first step of the best plan."""
    config = config or MPCConfig()
    if config.horizon > model.pre_len:
        raise ValueError(f"mpc horizon {config.horizon} exceeds the model's pre_len {model.pre_len}")
    memory, padding = model.represent(history, history_mask, static)
    current = current_rates(history)
    candidates = candidate_rates(current, config, allowed)  # [B, C, 2]
    b, c, _ = candidates.shape
    plans = candidates[:, :, None, :].expand(b, c, config.horizon, 2)
    states = model.unroll_candidates(memory, padding, plans)  # [B, C, H, d]
    bis_p = model.bis_head(states).softmax(-1)  # [B, C, H, 101]
    map_p = model.map_head(states).softmax(-1)  # [B, C, H, 201]
    low, high = config.bis_window
    bis_part, map_part = reward_tables(dataclasses.replace(reward, bis_low=low, bis_high=high), bis_p.dtype)
    expected = bis_p @ bis_part + map_p @ map_part  # [B, C, H]
    discount = config.gamma ** torch.arange(config.horizon, dtype=expected.dtype)
    change = (candidates - current[:, None, :]).abs().sum(-1).to(expected.dtype)  # [B, C]
    score = (expected * discount).sum(-1) - config.change_cost * change * discount.sum()
    best = score.argmax(-1)  # [B]
    rows = torch.arange(b)
    bis_levels = torch.arange(BIS_MAX + 1, dtype=bis_p.dtype)
    map_levels = torch.arange(MAP_MAX + 1, dtype=map_p.dtype)
    return MPCResult(
        action=candidates[rows, best],
        score=score[rows, best],
        bis=bis_p[rows, best] @ bis_levels,
        map=map_p[rows, best] @ map_levels,
    )


def current_rates(history: Tensor) -> Tensor:
    """The rates in force before this decision [B, 2] int64: the previous-rate features of the
    last history step (the window layout of `build_windows`: step t carries the rates set at t-1)."""
    return history[:, -1, PREVIOUS_RATES].round().long().clamp(0, RATE_LEVELS - 1)
