"""Implicit Q-Learning for continuous dose adjustments, readable top to bottom.

Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022.
IQL never queries Q on actions outside the data: V(s) is an upper expectile of Q(s, a) over the
clinicians' actions, Q regresses onto r + gamma * V(s'), and the policy imitates the data
weighted by exp(beta * advantage). Seed 004 trained without target networks and its policy loss
oscillated; here the critics are twin Q networks with a Polyak-averaged target, as in the paper.

Update order per step (the paper's): V on the target critics, Q on the new V(s'), the policy on
the target critics and new V, then the Polyak step. One step is one ``update(batch)`` call that
returns tensors only, so a training loop never waits on the host between logging points.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn

# -- config -----------------------------------------------------------------------------------


class IQLConfig(BaseModel):
    """Hyperparameters. Defaults are seed 004's tuned "conservative" set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Adam step size of all networks. Seed 004: 3e-4 made Q diverge; lower it if loss/q grows.
    lr: float = Field(3e-5, gt=0)
    # Discount per 4 h step. Higher looks further ahead (0.9 ~ 40 h horizon) but learns slower.
    gamma: float = Field(0.90, ge=0, lt=1)
    # Hidden layer sizes of every network. Larger fits more and overfits small cohorts sooner.
    hidden: tuple[int, ...] = (32, 32)
    # AWR inverse temperature: 0 is behaviour cloning; higher trusts the advantage more.
    beta: float = Field(0.5, ge=0)
    # Expectile of V: 0.5 is the mean of Q over data actions; towards 1 approaches their max.
    tau: float = Field(0.7, gt=0, lt=1)
    # Transitions per gradient step.
    batch_size: int = Field(64, ge=1)
    # Clamp of exp(beta * advantage), keeps one lucky transition from dominating the policy.
    max_weight: float = Field(100.0, gt=0)
    # Global gradient-norm clip per network.
    grad_clip: float = Field(10.0, gt=0)
    # Polyak rate of the target critics: larger follows Q faster, smaller is steadier.
    polyak: float = Field(0.005, gt=0, le=1)
    # Bounds of the policy's log standard deviation.
    log_std_min: float = -5.0
    log_std_max: float = 2.0

    @model_validator(mode="after")
    def _check_log_std_bounds(self) -> "IQLConfig":
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"log_std_min ({self.log_std_min}) must be below log_std_max ({self.log_std_max})")
        return self


# -- losses -------------------------------------------------------------------------------------


def expectile_loss(diff: Tensor, tau: float) -> Tensor:
    """Asymmetric L2: |tau - 1(diff < 0)| * diff^2, mean over the batch."""
    weight = torch.where(diff > 0, tau, 1.0 - tau)
    return (weight * diff.square()).mean()


def awr_weights(advantage: Tensor, beta: float, max_weight: float) -> Tensor:
    return torch.exp(beta * advantage).clamp(max=max_weight)


def gaussian_log_prob(action: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(action; mean, exp(log_std)^2), summed over action dimensions. Shapes [B, A] -> [B]."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


# -- networks -----------------------------------------------------------------------------------


def mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width in hidden:
        layers += [nn.Linear(in_dim, width), nn.ReLU()]
        in_dim = width
    layers.append(nn.Linear(in_dim, out_dim))
    return nn.Sequential(*layers)


class TwinQ(nn.Module):
    """Two independent critics Q(s, a); IQL uses their minimum against overestimation."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.q1 = mlp(obs_dim + action_dim, hidden, 1)
        self.q2 = mlp(obs_dim + action_dim, hidden, 1)

    def both(self, obs: Tensor, action: Tensor) -> tuple[Tensor, Tensor]:
        """[B, D], [B, A] -> two [B]."""
        x = torch.cat([obs, action], dim=-1)
        return self.q1(x).squeeze(-1), self.q2(x).squeeze(-1)

    def forward(self, obs: Tensor, action: Tensor) -> Tensor:
        return torch.minimum(*self.both(obs, action))


class ValueNet(nn.Module):
    def __init__(self, obs_dim: int, hidden: tuple[int, ...]):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 1)

    def forward(self, obs: Tensor) -> Tensor:
        """[B, D] -> [B]."""
        return self.net(obs).squeeze(-1)


class GaussianPolicy(nn.Module):
    """pi(a | s) = N(tanh(mu(s)), sigma(s)); the tanh keeps the mean inside the action bounds [-1, 1]."""

    def __init__(self, obs_dim: int, action_dim: int, hidden: tuple[int, ...], log_std_min: float, log_std_max: float):
        super().__init__()
        self.net = mlp(obs_dim, hidden, 2 * action_dim)
        self.log_std_min, self.log_std_max = log_std_min, log_std_max

    def forward(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """[B, D] -> mean [B, A], log_std [B, A]."""
        mu, log_std = self.net(obs).chunk(2, dim=-1)
        return torch.tanh(mu), log_std.clamp(self.log_std_min, self.log_std_max)


class Networks(nn.Module):
    """Everything that is saved in a model file."""

    def __init__(self, obs_dim: int, action_dim: int, config: IQLConfig):
        super().__init__()
        self.q = TwinQ(obs_dim, action_dim, config.hidden)
        self.q_target = TwinQ(obs_dim, action_dim, config.hidden)
        self.q_target.load_state_dict(self.q.state_dict())
        self.q_target.requires_grad_(False)
        self.v = ValueNet(obs_dim, config.hidden)
        self.pi = GaussianPolicy(obs_dim, action_dim, config.hidden, config.log_std_min, config.log_std_max)


# -- learner ------------------------------------------------------------------------------------


class Batch(NamedTuple):
    obs: Tensor  # [B, D] normalised
    action: Tensor  # [B, A]
    reward: Tensor  # [B]
    next_obs: Tensor  # [B, D] normalised
    done: Tensor  # [B] 1.0 at a patient's last row


class IQL:
    """The learner: networks, three Adam optimisers, ``update(batch) -> metrics``, ``state_dict``."""

    def __init__(self, obs_dim: int, action_dim: int, config: IQLConfig, seed: int = 0):
        self.config = config
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            self.nets = Networks(obs_dim, action_dim, config)
        adam = lambda module: torch.optim.Adam(module.parameters(), lr=config.lr, foreach=True)  # noqa: E731
        self.q_opt, self.v_opt, self.pi_opt = adam(self.nets.q), adam(self.nets.v), adam(self.nets.pi)

    def _step(self, loss: Tensor, module: nn.Module, opt: torch.optim.Optimizer) -> None:
        opt.zero_grad(set_to_none=True)
        loss.backward()
        nn.utils.clip_grad_norm_(module.parameters(), self.config.grad_clip, foreach=True)
        opt.step()

    def update(self, batch: Batch) -> dict[str, Tensor]:
        cfg, nets = self.config, self.nets
        with torch.no_grad():
            q_target = nets.q_target(batch.obs, batch.action)

        v = nets.v(batch.obs)
        loss_v = expectile_loss(q_target - v, cfg.tau)
        self._step(loss_v, nets.v, self.v_opt)

        with torch.no_grad():
            td_target = batch.reward + cfg.gamma * (1.0 - batch.done) * nets.v(batch.next_obs)
        q1, q2 = nets.q.both(batch.obs, batch.action)
        loss_q = (q1 - td_target).square().mean() + (q2 - td_target).square().mean()
        self._step(loss_q, nets.q, self.q_opt)

        with torch.no_grad():
            advantage = q_target - v.detach()
            weight = awr_weights(advantage, cfg.beta, cfg.max_weight)
        mean, log_std = nets.pi(batch.obs)
        loss_pi = -(weight * gaussian_log_prob(batch.action, mean, log_std)).mean()
        self._step(loss_pi, nets.pi, self.pi_opt)

        with torch.no_grad():
            torch._foreach_lerp_(list(nets.q_target.parameters()), list(nets.q.parameters()), cfg.polyak)

        return {
            "loss/q": loss_q.detach(),
            "loss/v": loss_v.detach(),
            "loss/pi": loss_pi.detach(),
            "values/q_mean": q_target.mean(),
            "values/v_mean": v.detach().mean(),
            "values/advantage_mean": advantage.mean(),
            "values/awr_weight_mean": weight.mean(),
        }

    def state_dict(self) -> dict:
        return {
            "nets": self.nets.state_dict(),
            "q_opt": self.q_opt.state_dict(),
            "v_opt": self.v_opt.state_dict(),
            "pi_opt": self.pi_opt.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        self.q_opt.load_state_dict(state["q_opt"])
        self.v_opt.load_state_dict(state["v_opt"])
        self.pi_opt.load_state_dict(state["pi_opt"])
