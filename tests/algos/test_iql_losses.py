"""The IQL building blocks, checked against values worked out by hand or by torch.distributions."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from pydantic import ValidationError

from dosewise.algos.iql import (
    IQL,
    Batch,
    IQLConfig,
    Networks,
    awr_weights,
    expectile_loss,
    gaussian_log_prob,
)

# -- expectile loss -------------------------------------------------------------------------------


def test_expectile_loss_weights_positive_diffs_by_tau_and_negative_by_one_minus_tau() -> None:
    diff = torch.tensor([2.0, -1.0, 0.5, -3.0])
    # 0.7 * 4 + 0.3 * 1 + 0.7 * 0.25 + 0.3 * 9 = 2.8 + 0.3 + 0.175 + 2.7 = 5.975; mean over 4
    expected = 5.975 / 4
    assert expectile_loss(diff, 0.7).item() == pytest.approx(expected, rel=1e-6)


def test_expectile_loss_single_values() -> None:
    assert expectile_loss(torch.tensor([3.0]), 0.7).item() == pytest.approx(0.7 * 9)
    assert expectile_loss(torch.tensor([-3.0]), 0.7).item() == pytest.approx(0.3 * 9)
    assert expectile_loss(torch.tensor([0.0]), 0.7).item() == 0.0
    # tau 0.9 punishes undershooting (diff > 0) nine times as much as overshooting
    up = expectile_loss(torch.tensor([1.0]), 0.9).item()
    down = expectile_loss(torch.tensor([-1.0]), 0.9).item()
    assert up / down == pytest.approx(9.0)


def test_expectile_loss_at_tau_half_is_half_the_mse() -> None:
    diff = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    assert expectile_loss(diff, 0.5).item() == pytest.approx(0.5 * diff.square().mean().item(), rel=1e-6)


def test_expectile_loss_minimiser_is_the_expectile() -> None:
    """Minimising over a constant v recovers the tau-expectile: above the mean for tau > 0.5."""
    x = torch.tensor([0.0, 0.0, 0.0, 1.0])  # mean 0.25
    v = torch.zeros((), requires_grad=True)
    opt = torch.optim.SGD([v], lr=0.5)
    for _ in range(500):
        opt.zero_grad()
        expectile_loss(x - v, 0.7).backward()
        opt.step()
    # expectile e solves 0.7 * (1 - e) = 0.3 * 3 * e  ->  e = 0.7 / 1.6
    assert v.item() == pytest.approx(0.7 / 1.6, abs=1e-4)


# -- AWR weights ----------------------------------------------------------------------------------


def test_awr_weights_are_exp_beta_advantage() -> None:
    adv = torch.tensor([-2.0, 0.0, 0.5, 1.0])
    w = awr_weights(adv, beta=3.0, max_weight=100.0)
    expected = torch.tensor([math.exp(-6.0), 1.0, math.exp(1.5), math.exp(3.0)])
    torch.testing.assert_close(w, expected)


def test_awr_weights_are_clamped_at_max_weight() -> None:
    adv = torch.tensor([0.0, 1.0, 2.0, 50.0])
    w = awr_weights(adv, beta=3.0, max_weight=100.0)
    torch.testing.assert_close(w, torch.tensor([1.0, math.exp(3.0), 100.0, 100.0]))  # exp(6) ~ 403 > 100
    assert torch.isfinite(w).all()  # exp(150) overflows float32 to inf, the clamp takes it back to 100


def test_awr_weights_with_beta_zero_are_behaviour_cloning() -> None:
    adv = torch.tensor([-5.0, 0.0, 5.0])
    torch.testing.assert_close(awr_weights(adv, beta=0.0, max_weight=100.0), torch.ones(3))


# -- Gaussian log-probability and policy ------------------------------------------------------------


def test_gaussian_log_prob_matches_torch_distributions() -> None:
    g = torch.Generator().manual_seed(0)
    mean = torch.randn(16, 3, generator=g)
    log_std = torch.randn(16, 3, generator=g).clamp(-3, 1)
    action = torch.rand(16, 3, generator=g) * 2 - 1
    expected = torch.distributions.Normal(mean, log_std.exp()).log_prob(action).sum(-1)
    got = gaussian_log_prob(action, mean, log_std)
    assert got.shape == (16,)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


def test_gaussian_log_prob_standard_normal_at_zero() -> None:
    got = gaussian_log_prob(torch.zeros(1, 1), torch.zeros(1, 1), torch.zeros(1, 1))
    assert got.item() == pytest.approx(-0.5 * math.log(2 * math.pi))


def test_gaussian_policy_mean_is_bounded_for_extreme_inputs() -> None:
    nets = Networks(obs_dim=4, action_dim=2, config=IQLConfig(hidden=(8,), log_std_min=-5.0, log_std_max=2.0))
    obs = torch.randn(1, 64, 4) * 1e4
    mean, log_std = nets.policy(obs)
    assert mean.shape == log_std.shape == (1, 64, 2)
    assert ((mean >= -1) & (mean <= 1)).all()
    assert ((log_std >= -5.0) & (log_std <= 2.0)).all()


def test_gaussian_policy_log_std_is_clamped_to_its_bounds() -> None:
    nets = Networks(obs_dim=3, action_dim=2, config=IQLConfig(hidden=(4,), log_std_min=-5.0, log_std_max=2.0))
    with torch.no_grad():
        nets.pi.zero_()  # the last layer's bias [mu_1, mu_2, log_std_1, log_std_2] is the last 4 entries
        nets.pi[0, -4:] = torch.tensor([0.3, -0.2, 10.0, -10.0])
    mean, log_std = nets.policy(torch.randn(1, 5, 3))
    torch.testing.assert_close(mean[0], torch.tanh(torch.tensor([0.3, -0.2])).expand(5, 2))
    torch.testing.assert_close(log_std[0], torch.tensor([2.0, -5.0]).expand(5, 2))


def test_networks_match_nn_linear_layers() -> None:
    """The flat layout is nn.Sequential(Linear, ReLU, ..., Linear) with weight.T and bias per layer."""
    nets = Networks(obs_dim=3, action_dim=1, config=IQLConfig(hidden=(5, 4)))
    layers, offset = [], 0
    for fan_in, fan_out in nets.v_shapes:
        linear = torch.nn.Linear(fan_in, fan_out)
        with torch.no_grad():
            linear.weight.copy_(nets.v[0, offset : offset + fan_in * fan_out].view(fan_in, fan_out).T)
            linear.bias.copy_(nets.v[0, offset + fan_in * fan_out : offset + fan_in * fan_out + fan_out])
        offset += fan_in * fan_out + fan_out
        layers += [linear, torch.nn.ReLU()]
    assert offset == nets.v.shape[1]
    obs = torch.randn(7, 3)
    with torch.no_grad():
        torch.testing.assert_close(nets.value(obs[None])[0], torch.nn.Sequential(*layers[:-1])(obs)[:, 0])


# -- config validation ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad",
    [
        {"lr": 0.0},
        {"lr": -1e-3},
        {"tau": 0.0},
        {"tau": 1.0},
        {"tau": 1.5},
        {"gamma": 1.0},
        {"batch_size": 0},
        {"polyak": 0.0},
        {"max_weight": 0.0},
        {"learning_rate": 1e-3},  # unknown field
    ],
)
def test_iql_config_rejects_bad_values(bad: dict) -> None:
    with pytest.raises(ValidationError) as err:
        IQLConfig(**bad)
    assert next(iter(bad)) in str(err.value)


def test_iql_config_is_frozen_and_defaults_are_valid() -> None:
    cfg = IQLConfig()
    assert 0 < cfg.tau < 1 and cfg.lr > 0
    with pytest.raises(ValidationError):
        cfg.lr = 1.0  # type: ignore[misc]


# -- one learner step -----------------------------------------------------------------------------


def _batch(n: int = 32, d: int = 3, seed: int = 0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(n, d, generator=g),
        action=torch.rand(n, 1, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g),
        next_obs=torch.randn(n, d, generator=g),
        done=(torch.rand(n, generator=g) < 0.2).float(),
    )


def test_update_returns_finite_scalar_metrics_and_is_deterministic_per_seed() -> None:
    runs = []
    for _ in range(2):
        learner = IQL(3, 1, IQLConfig(lr=1e-3, hidden=(8,)), seed=7)
        metrics = [learner.update(_batch(seed=s)) for s in range(3)][-1]
        runs.append((metrics, learner.nets.state_dict()))
    (m1, s1), (m2, s2) = runs
    assert set(m1) == {"loss/q", "loss/v", "loss/pi", "values/q_mean", "values/v_mean", "values/advantage_mean", "values/awr_weight_mean"}
    for key, value in m1.items():
        assert value.shape == () and torch.isfinite(value), key
        assert torch.equal(value, m2[key]), key
    for key in s1:
        assert torch.equal(s1[key], s2[key]), key


def test_initial_target_critic_equals_critic_and_update_moves_it_by_polyak() -> None:
    learner = IQL(3, 1, IQLConfig(lr=1e-2, hidden=(8,), polyak=0.25), seed=0)
    q, q_target = learner.nets.q, learner.nets.q_target
    assert torch.equal(q, q_target)
    assert not q_target.requires_grad
    before = q_target.clone()
    learner.update(_batch())
    assert not torch.equal(q, before)  # the critic moved
    torch.testing.assert_close(q_target, before + 0.25 * (q - before))


def test_iql_state_dict_round_trip_restores_networks_and_optimisers() -> None:
    a = IQL(3, 1, IQLConfig(hidden=(8,)), seed=1)
    a.update(_batch())
    b = IQL(3, 1, IQLConfig(hidden=(8,)), seed=2)
    # a deep copy, as after a round trip through a file: Optimizer.load_state_dict keeps the given
    # tensors when dtype and device already match, so an in-memory state would be shared with `a`
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    batch = _batch(seed=5)
    ma, mb = a.update(batch), b.update(batch)
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key
    for (k, x), y in zip(a.nets.state_dict().items(), b.nets.state_dict().values()):
        assert torch.equal(x, y), k


def test_iql_config_rejects_inverted_log_std_bounds() -> None:
    with pytest.raises(ValidationError, match="log_std_min"):
        IQLConfig(log_std_min=3.0, log_std_max=-3.0)
