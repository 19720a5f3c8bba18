"""IQL as the paper writes it, one member at a time: autograd, torch.optim.Adam per network,
``nn.utils.clip_grad_norm_`` per network, the learner's update order (V and the policy on the
pre-step V, then Q on the new V, then the Polyak step). The fast learner (`iql.IQL`, hand-written
gradients on stacked weights) is held equal to it by `tests/algos/test_iql_reference.py`, as the
batched search is to `planner/mcts_reference.py`. Not for training: for reading and for checking.
"""

from __future__ import annotations

import torch
from torch import nn

from dosewise.algos.iql import (
    IQL,
    Batch,
    awr_weights,
    expectile_loss,
    gaussian_log_prob,
    mlp_layers,
    stacked_mlp,
)


class ReferenceIQL:
    """Member `member` of a learner, copied at construction, then stepped by autograd."""

    def __init__(self, learner: IQL, member: int = 0):
        nets = learner.nets
        self.cfg, self.nets = learner.config, nets
        self.q = nets.q[member].detach().clone().requires_grad_()  # [2, Pq]
        self.q_target = nets.q_target[member].detach().clone()
        self.v = nets.v[member : member + 1].detach().clone().requires_grad_()  # [1, Pv]
        self.pi = nets.pi[member : member + 1].detach().clone().requires_grad_()
        self.opts = {name: torch.optim.Adam([getattr(self, name)], lr=self.cfg.lr) for name in ("q", "v", "pi")}

    def _q(self, flat: torch.Tensor, obs: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        x = torch.cat([obs, action], -1).expand(2, *obs.shape[:-1], obs.shape[-1] + action.shape[-1])
        return stacked_mlp(mlp_layers(flat, self.nets.q_shapes), x).squeeze(-1)  # [2, B]

    def _step(self, loss: torch.Tensor, name: str) -> None:
        opt = self.opts[name]
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_([getattr(self, name)], self.cfg.grad_clip)
        opt.step()

    def update(self, b: Batch) -> dict[str, float]:
        cfg = self.cfg
        with torch.no_grad():
            q_target = self._q(self.q_target, b.obs, b.action).min(0).values
        v = stacked_mlp(mlp_layers(self.v, self.nets.v_shapes), b.obs[None])[0, :, 0]
        loss_v = expectile_loss(q_target - v, cfg.tau)
        self._step(loss_v, "v")
        with torch.no_grad():
            td = b.reward + cfg.gamma * (1 - b.done) * stacked_mlp(mlp_layers(self.v, self.nets.v_shapes), b.next_obs[None])[0, :, 0]
        q1, q2 = self._q(self.q, b.obs, b.action)
        loss_q = (q1 - td).square().mean() + (q2 - td).square().mean()
        self._step(loss_q, "q")
        weight = awr_weights(q_target - v.detach(), cfg.beta, cfg.max_weight)
        mu, log_std = stacked_mlp(mlp_layers(self.pi, self.nets.pi_shapes), b.obs[None])[0].chunk(2, -1)
        log_prob = gaussian_log_prob(b.action, torch.tanh(mu), log_std.clamp(cfg.log_std_min, cfg.log_std_max))
        loss_pi = -(weight * log_prob).mean()
        self._step(loss_pi, "pi")
        with torch.no_grad():
            self.q_target.lerp_(self.q, cfg.polyak)
        return {"loss/q": loss_q.item(), "loss/v": loss_v.item(), "loss/pi": loss_pi.item()}
