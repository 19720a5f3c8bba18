"""The MPC planning mode: candidates unrolled together equal each unrolled alone, the reward splits
into its BIS and MAP parts exactly, the menu respects dose limits, and on a model whose BIS head
is rigged to favour one rate the plan picks that rate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dosewise.data.anesthesia import AnesthesiaReward
from dosewise.planner.beam_search import dose_mask
from dosewise.planner.config import MPCConfig, PlannerModelConfig
from dosewise.planner.model import PREVIOUS_RATES, PlannerModel, PlannerStats
from dosewise.planner.mpc import candidate_rates, current_rates, mpc_plan, reward_tables
from dosewise.planner.policy import PlannerPolicy, decode_levels
from tests.planner.conftest import tiny_run


def inputs(batch):
    return batch.history, batch.history_mask, batch.static


@pytest.mark.parametrize("encoding", ["embedding", "continuous"])
def test_unroll_candidates_equals_unroll_of_each(tiny_windows, tiny_batch, encoding):
    run = tiny_run()
    config = PlannerModelConfig(**{**run.model.model_dump(), "dynamics_layers": 2, "action_encoding": encoding})
    model = PlannerModel(config, run.windows.max_len, run.windows.pre_len).double().eval()
    model.set_stats(PlannerStats.from_windows(tiny_windows["train"]))
    history, mask, static = inputs(tiny_batch)
    memory, padding = model.represent(history.double(), mask, static.double())
    actions = torch.randint(0, 201, (history.shape[0], 6, 3, 2), generator=torch.Generator().manual_seed(1))
    together = model.unroll_candidates(memory, padding, actions)
    alone = torch.stack([model.unroll(memory, padding, actions[:, c]) for c in range(6)], dim=1)
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-10)


def test_continuous_rates_are_smooth_in_the_level(tiny_windows):
    run = tiny_run()
    config = PlannerModelConfig(**{**run.model.model_dump(), "action_encoding": "continuous"})
    model = PlannerModel(config, run.windows.max_len, run.windows.pre_len).double()
    levels = torch.arange(201)
    tokens = model.rate_tokens(torch.stack([levels, torch.zeros_like(levels)], -1))  # [201, d]
    steps = (tokens[1:] - tokens[:-1]).norm(dim=-1)
    # Neighbouring levels differ by a small step; an embedding table has no such relation.
    assert steps.max() < 0.1 * (tokens[200] - tokens[0]).norm()


def test_reward_tables_split_the_reward_exactly():
    for reward in (AnesthesiaReward(), AnesthesiaReward(bis_low=45, bis_high=55, map_low=70, hypotension_penalty=3.0)):
        bis_part, map_part = reward_tables(reward, torch.float64)
        bis, mean_pressure = np.meshgrid(np.arange(101), np.arange(201), indexing="ij")
        np.testing.assert_allclose(bis_part.numpy()[:, None] + map_part.numpy()[None, :], reward.reward(bis, mean_pressure), atol=1e-12)


def test_candidate_menu_centres_on_current_rates_and_respects_limits():
    config = MPCConfig(propofol_steps=(-10, 0, 10), remifentanil_steps=(-5, 0, 5))
    current = torch.tensor([[30, 20], [5, 0]])
    menu = candidate_rates(current, config)
    assert menu.shape == (2, 5 * 3, 2)
    assert set(menu[0, :, 0].tolist()) == {20, 30, 40, 0, 200}
    assert set(menu[1, :, 0].tolist()) == {0, 5, 15, 200}  # 5 - 10 clips at the pump's 0
    assert set(menu[0, :, 1].tolist()) == {15, 20, 25}
    limited = candidate_rates(current, config, dose_mask(2, max_rate=(35, 200), min_rate=(10, 0)))
    assert limited[..., 0].min() >= 10 and limited[..., 0].max() <= 35
    assert set(limited[0, :, 0].tolist()) == {20, 30, 35, 10}


def test_current_rates_read_the_last_history_step(tiny_batch):
    history = tiny_batch.history.clone()
    history[:, -1, PREVIOUS_RATES] = torch.tensor([37.0, 12.0])
    assert current_rates(history).tolist() == [[37, 12]] * history.shape[0]


class RiggedBIS(torch.nn.Module):
    """A BIS head whose prediction is 50 exactly when the propofol input is `best`, else 80."""

    def __init__(self, model: PlannerModel, best: int) -> None:
        super().__init__()
        self.model, self.best = model, best

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        rates = states[..., 0].round()  # the rigged dynamics below writes the rate into feature 0
        target = torch.where(rates == self.best, 50, 80)
        return torch.nn.functional.one_hot(target, 101).to(states.dtype) * 50.0


class NormalMAP(torch.nn.Module):
    """A MAP head that always predicts 90 mmHg."""

    def forward(self, states: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.one_hot(torch.full(states.shape[:-1], 90), 201).to(states.dtype) * 50.0


def test_mpc_picks_the_rate_the_model_says_reaches_the_band(tiny_windows, tiny_batch):
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len).eval()
    model.set_stats(PlannerStats.from_windows(tiny_windows["train"]))
    history, mask, static = inputs(tiny_batch)
    history = history.clone()
    history[:, -1, PREVIOUS_RATES] = torch.tensor([30.0, 10.0])
    best = 50  # current 30 + step 20

    def unroll_candidates(memory, padding, actions):
        states = torch.zeros(*actions.shape[:3], model.config.d_model)
        states[..., 0] = actions[..., 0].float()
        return states

    model.unroll_candidates = unroll_candidates
    model.bis_head = RiggedBIS(model, best)
    model.map_head = NormalMAP()
    result = mpc_plan(model, history, mask, static, MPCConfig(horizon=3))
    assert result.action[:, 0].tolist() == [best] * history.shape[0]
    assert result.action[:, 1].tolist() == [10] * history.shape[0]  # no reason to move remifentanil
    torch.testing.assert_close(result.bis, torch.full((history.shape[0], 3), 50.0), atol=1e-3, rtol=0)
    # With the best rate outside the dose limit the plan stays within the limit.
    limited = mpc_plan(model, history, mask, static, MPCConfig(horizon=3), dose_mask(history.shape[0], max_rate=(40, 200)))
    assert limited.action[:, 0].max() <= 40


def test_mpc_horizon_beyond_the_model_is_an_error(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="exceeds the model's pre_len"):
        mpc_plan(tiny_model, *inputs(tiny_batch), MPCConfig(horizon=tiny_model.pre_len + 1))


def test_policy_mpc_mode_returns_rates_in_limits(tiny_model, tiny_batch):
    from dosewise.sim.anesthesia.cases import CaseSpec, run_cases, sample_cases

    cohort = sample_cases(3, np.random.default_rng(0), CaseSpec(duration_min=(12.0, 12.0)))
    policy = PlannerPolicy(tiny_model, "mpc", max_rate=(60, 30), mpc=MPCConfig(horizon=tiny_model.pre_len))
    traj = run_cases(cohort, policy, seed=1, spec=CaseSpec(duration_min=(12.0, 12.0)))
    assert traj.rates[..., 0].max() <= 60 and traj.rates[..., 1].max() <= 30


def test_decode_levels_argmax_mean_median():
    probs = torch.zeros(1, 2, 201)
    probs[0, 0, [10, 20, 90]] = torch.tensor([0.4, 0.35, 0.25])
    probs[0, 1, [0, 100]] = torch.tensor([0.6, 0.4])
    log_policy = probs.log()
    assert decode_levels(log_policy, "argmax").tolist() == [[10, 0]]
    assert decode_levels(log_polic := log_policy, "mean").tolist() == [[round(4 + 7 + 22.5), 40]]
    assert decode_levels(log_polic, "median").tolist() == [[20, 0]]
    with pytest.raises(ValueError, match="unknown decoding"):
        decode_levels(log_policy, "mode")


def test_mpc_config_refuses_a_menu_without_holding_and_an_empty_window():
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="must contain 0"):
        MPCConfig(propofol_steps=(-5, 5))
    with pytest.raises(ValidationError, match="bis_window"):
        MPCConfig(bis_window=(60.0, 50.0))
