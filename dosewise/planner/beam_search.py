"""Beam search over the learned model, as RL-DITR's released code plans:
keep the `beam_width` best action sequences; extend each by its `top_k` most probable joint
actions (both drugs) under the policy head; score a sequence by Σ_i γ^i (r_i + v_i), the
predicted reward of step i plus the value of the state it reaches; act with the first action
of the best sequence. Batched over patients and beams: one model call per depth.

Dose limits enter as a mask of allowed rate levels per drug (`dose_mask`); masked levels are
never proposed, so the plan respects them at every depth.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from dosewise.planner.model import N_DRUGS, RATE_LEVELS, PlannerModel


class BeamConfig(BaseModel):
    """Size of the beam search; the defaults plan 3 steps (3 min) ahead with 4 × 4 candidates."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Action sequences kept after each depth.
    beam_width: int = Field(4, ge=1)
    # Joint actions (one level per drug) each sequence is extended with, most probable first.
    top_k: int = Field(4, ge=1)
    # Steps planned ahead; at most the model's pre_len (the dynamics is trained that far).
    depth: int = Field(3, ge=1)
    # Discount of the score Σ_i γ^i (r_i + v_i).
    gamma: float = Field(0.9, ge=0.0, le=1.0)


@dataclass(frozen=True)
class BeamResult:
    action: Tensor  # [B, 2] int64 first joint action of the best sequence
    plan: Tensor  # [B, depth, 2] int64 the best sequence
    score: Tensor  # [B] its score Σ_i γ^i (r_i + v_i), in reward units


def dose_mask(
    n: int,
    max_rate: tuple[int, int] = (RATE_LEVELS - 1, RATE_LEVELS - 1),
    min_rate: tuple[int, int] = (0, 0),
) -> Tensor:
    """Allowed rate levels [n, 2, A] bool: level l of drug j is allowed when
    min_rate[j] <= l <= max_rate[j] (mL/h; order propofol, remifentanil)."""
    for j in range(N_DRUGS):
        if not 0 <= min_rate[j] <= max_rate[j] <= RATE_LEVELS - 1:
            raise ValueError(
                f"dose limits of drug {j} must satisfy 0 <= min <= max <= {RATE_LEVELS - 1}, got min {min_rate[j]}, max {max_rate[j]}"
            )
    levels = torch.arange(RATE_LEVELS)
    low, high = torch.tensor(min_rate)[:, None], torch.tensor(max_rate)[:, None]
    return ((levels >= low) & (levels <= high)).expand(n, N_DRUGS, RATE_LEVELS).clone()


def masked_log_policy(model: PlannerModel, states: Tensor, allowed: Tensor | None) -> Tensor:
    """Per-drug log-probabilities [..., 2, A] of the policy head at `states` [..., d]; levels not
    `allowed` ([B, 2, A] bool, broadcast over the middle axes) get -inf."""
    logits = model.policy_logits(states)
    if allowed is not None:
        shape = (allowed.shape[0],) + (1,) * (logits.dim() - 3) + allowed.shape[1:]
        logits = logits.masked_fill(~allowed.view(shape), float("-inf"))
    return logits.log_softmax(-1)


def top_joint_actions(log_policy: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The k most probable joint actions under independent drug policies.

    log_policy [..., 2, A] -> (actions [..., k, 2] int64, log-probabilities [..., k]). The best
    k joint actions lie within each drug's k best levels, so only those k × k pairs are scored.
    """
    k = min(k, RATE_LEVELS)
    best, levels = log_policy.topk(k, dim=-1)  # [..., 2, k]
    joint = best[..., 0, :, None] + best[..., 1, None, :]  # [..., k, k]
    score, flat = joint.flatten(-2).topk(k, dim=-1)  # [..., k]
    ppf = levels[..., 0, :].gather(-1, flat // k)
    rftn = levels[..., 1, :].gather(-1, flat % k)
    return torch.stack([ppf, rftn], dim=-1), score


@torch.no_grad()
def beam_search(
    model: PlannerModel,
    history: Tensor,
    history_mask: Tensor,
    static: Tensor,
    config: BeamConfig | None = None,
    allowed: Tensor | None = None,
) -> BeamResult:
    """Plan `config.depth` steps for every row of the batch (inputs as `PlannerModel.represent`);
    `allowed` [B, 2, A] bool limits the rates (`dose_mask`); config None: `BeamConfig()`."""
    config = config or BeamConfig()
    if config.depth > model.pre_len:
        raise ValueError(f"beam depth {config.depth} exceeds the model's pre_len {model.pre_len}")
    memory, padding = model.represent(history, history_mask, static)  # [B, L+1, d]
    b = memory.shape[0]
    plans = torch.zeros(b, 1, 0, N_DRUGS, dtype=torch.long)  # [B, W, i, 2]
    scores = torch.zeros(b, 1)  # [B, W]
    states = memory[:, -1:]  # [B, W, d] the state each sequence has reached
    for depth in range(config.depth):
        width = plans.shape[1]
        actions, log_prob = top_joint_actions(masked_log_policy(model, states, allowed), config.top_k)  # [B, W, k, 2]
        k = actions.shape[2]
        extended = torch.cat([plans.unsqueeze(2).expand(-1, -1, k, -1, -1), actions.unsqueeze(3)], dim=3)
        extended = extended.flatten(1, 2)  # [B, W·k, i+1, 2]
        reached = model.unroll_candidates(memory, padding, extended)[:, :, -1]  # [B, W·k, d]
        gain = model.reward_in_units(model.reward(reached)) + model.value_in_units(model.value(reached))
        candidate = scores.repeat_interleave(k, dim=1) + config.gamma**depth * gain  # [B, W·k]
        candidate = candidate.masked_fill(~torch.isfinite(log_prob.flatten(1)), float("-inf"))  # masked levels
        scores, keep = candidate.topk(min(config.beam_width, width * k), dim=1)
        plans = extended.gather(1, keep[:, :, None, None].expand(-1, -1, depth + 1, N_DRUGS))
        states = reached.gather(1, keep[:, :, None].expand(-1, -1, reached.shape[-1]))
    return BeamResult(action=plans[:, 0, 0], plan=plans[:, 0], score=scores[:, 0])
