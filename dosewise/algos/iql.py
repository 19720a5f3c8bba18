"""Implicit Q-Learning for continuous dose adjustments, readable top to bottom.

Kostrikov, Nair & Levine, "Offline Reinforcement Learning with Implicit Q-Learning", ICLR 2022.
IQL never queries Q on actions outside the data: V(s) is an upper expectile of Q(s, a) over the
clinicians' actions, Q regresses onto r + gamma * V(s'), and the policy imitates the data
weighted by exp(beta * advantage). Without target networks the policy loss oscillates; here the
critics are twin Q networks with a Polyak-averaged target, as in the paper.

Update order per step: V on the target critics and the policy on the target critics and that
same (pre-step) V, as one Adam step; then Q on the new V(s'); then the Polyak step. One step is
one ``update(batch)`` call that returns tensors only, so a training loop never waits on the host
between logging points.

Built for CPU speed (`bench/iql_vs_d3rlpy.py`): every network lives in one flat tensor
with a leading member axis, so K seeds or K sweep points train as one learner on batched matmuls;
gradients are written out by hand (`*_and_grad` below; `iql_reference.py` takes the same step by
autograd, and a test holds the two equal), every network's
gradient is clipped per member, and one fused Adam kernel steps the networks. ``compile=True``
adds torch.compile, with Adam written out (`adam_`) so the whole step is one compiled graph.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor, nn
from torch.optim.adam import adam as functional_adam

# -- config -----------------------------------------------------------------------------------


class IQLConfig(BaseModel):
    """Hyperparameters. Defaults are the tuned "conservative" set."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Adam step size of all networks. In hand-tuning 3e-4 made Q diverge; lower it if loss/q grows.
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
    def _check_log_std_bounds(self) -> IQLConfig:
        if self.log_std_min >= self.log_std_max:
            raise ValueError(f"log_std_min ({self.log_std_min}) must be below log_std_max ({self.log_std_max})")
        return self


# -- losses -------------------------------------------------------------------------------------
# Every loss reduces over the batch (the last axis) only, so a leading ensemble axis [K, B] gives
# one loss per member.


def expectile_loss(diff: Tensor, tau: float) -> Tensor:
    """Asymmetric L2: |tau - 1(diff < 0)| * diff^2, mean over the batch (last axis)."""
    weight = torch.where(diff > 0, tau, 1.0 - tau)
    return (weight * diff.square()).mean(-1)


def awr_weights(advantage: Tensor, beta: float, max_weight: float) -> Tensor:
    return torch.exp(beta * advantage).clamp(max=max_weight)


def gaussian_log_prob(action: Tensor, mean: Tensor, log_std: Tensor) -> Tensor:
    """log N(action; mean, exp(log_std)^2), summed over action dimensions. Shapes [..., A] -> [...]."""
    z = (action - mean) * torch.exp(-log_std)
    return (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)


# -- the same losses with their gradients, written out ------------------------------------------
# What the learner computes: each loss above and its gradient with respect to the network
# outputs, which `mlp_backward` then carries to the weights. `iql_reference.ReferenceIQL` takes
# the same steps by autograd (tested equal).


def expectile_loss_and_grad(q: Tensor, v: Tensor, tau: float | Tensor) -> tuple[Tensor, Tensor]:
    """L_V = mean_b w_b (q_b - v_b)^2 with w_b = tau if q_b > v_b else 1 - tau (`expectile_loss`
    of q - v), and dL_V/dv_b = -2 w_b (q_b - v_b) / B. q, v [..., B] -> loss [...], grad [..., B]."""
    diff = q - v
    weight = torch.where(diff > 0, tau, 1.0 - tau)
    return (weight * diff.square()).mean(-1), (-2.0 / diff.shape[-1]) * weight * diff


def awr_loss_and_grads(
    action: Tensor, mu: Tensor, log_std_raw: Tensor, weight: Tensor, log_std_min: float, log_std_max: float
) -> tuple[Tensor, Tensor, Tensor]:
    """Advantage-weighted regression of the tanh-Gaussian policy and its gradients.

    mean = tanh(mu), log_std = clamp(log_std_raw, min, max), z = (a - mean) / std;
    L_pi = -mean_b w_b log N(a_b; mean_b, std_b^2) (`gaussian_log_prob`), so with g = -w / B:
    dL/dmu = g z / std (1 - mean^2) (through the tanh) and dL/dlog_std_raw = g (z^2 - 1) where the
    clamp passes (zero outside its bounds). action, mu, log_std_raw [..., B, A], weight [..., B]
    -> loss [...], grad_mu [..., B, A], grad_log_std [..., B, A].
    """
    mean, log_std = torch.tanh(mu), log_std_raw.clamp(log_std_min, log_std_max)
    inv_std = torch.exp(-log_std)
    z = (action - mean) * inv_std
    log_prob = (-0.5 * z.square() - log_std - 0.5 * math.log(2 * math.pi)).sum(-1)
    loss = -(weight * log_prob).mean(-1)
    g = (-weight / weight.shape[-1]).unsqueeze(-1)  # dL/dlog_prob
    in_bounds = (log_std_raw >= log_std_min) & (log_std_raw <= log_std_max)
    return loss, g * z * inv_std * (1.0 - mean.square()), g * (z.square() - 1.0) * in_bounds


def td_loss_and_grad(q: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    """Twin critics' L_Q = sum_i mean_b (q_ib - y_b)^2 and dL_Q/dq_ib = 2 (q_ib - y_b) / B.
    q [..., 2, B], target y [..., B] -> loss [...], grad [..., 2, B]."""
    error = q - target.unsqueeze(-2)
    return error.square().mean(-1).sum(-1), (2.0 / error.shape[-1]) * error


# -- stacked networks ---------------------------------------------------------------------------
# A network is E independent MLPs in one flat tensor [E, P]: layer l's weight [E, in, out] and
# bias [E, 1, out] are views into it, and one layer of all E copies is one batched matmul. E is
# the number of ensemble members K (2K for the twin critics). Training writes the gradients out by
# hand (`mlp_backward`): on a CPU, with layers this small, the autograd engine's bookkeeping per
# node costs more than the arithmetic. `iql_reference.py` is the same step by autograd.


def layer_shapes(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> list[tuple[int, int]]:
    dims = [in_dim, *hidden, out_dim]
    return list(itertools.pairwise(dims))


def init_mlp(in_dim: int, hidden: tuple[int, ...], out_dim: int) -> Tensor:
    """One MLP's flat parameters [P] with nn.Linear's default initialisation, from the global RNG."""
    chunks = []
    for fan_in, fan_out in layer_shapes(in_dim, hidden, out_dim):
        bound = 1.0 / math.sqrt(fan_in)
        chunks += [torch.empty(fan_in * fan_out).uniform_(-bound, bound), torch.empty(fan_out).uniform_(-bound, bound)]
    return torch.cat(chunks)


Layers = list[tuple[Tensor, Tensor]]  # per layer: weight [E, in, out], bias [E, 1, out]


def mlp_layers(flat: Tensor, shapes: list[tuple[int, int]]) -> Layers:
    """Views (weight [E, in, out], bias [E, 1, out]) into flat [E, P]."""
    e = flat.shape[0]
    views = flat.split([n for i, o in shapes for n in (i * o, o)], dim=-1)
    return [(views[2 * j].view(e, i, o), views[2 * j + 1].view(e, 1, o)) for j, (i, o) in enumerate(shapes)]


def stacked_mlp(layers: Layers, x: Tensor, inputs: list[Tensor] | None = None) -> Tensor:
    """E MLPs at once: x [E, B, in] -> [E, B, out], ReLU between layers.

    ``inputs``, when given, collects every layer's input for `mlp_backward`."""
    for j, (weight, bias) in enumerate(layers):
        if inputs is not None:
            inputs.append(x)
        x = torch.baddbmm(bias, x, weight)
        if j < len(layers) - 1:
            x = torch.relu(x)
    return x


def mlp_backward(layers: Layers, inputs: list[Tensor], grad_out: Tensor) -> Tensor:
    """Gradient of sum(grad_out * stacked_mlp(layers, x)) with respect to the flat tensor: [E, P]."""
    grads: list[Tensor] = []
    g = grad_out
    for j in range(len(layers) - 1, -1, -1):
        x, (weight, _) = inputs[j], layers[j]
        grads += [g.sum(1), torch.bmm(x.transpose(1, 2), g).flatten(1)]  # bias, weight (reversed below)
        if j:
            # x is the previous layer's ReLU output: the gradient passes where it is positive
            g = torch.ops.aten.threshold_backward(torch.bmm(g, weight.transpose(1, 2)), x, 0.0)
    return torch.cat(grads[::-1], dim=1)


class Networks(nn.Module):
    """Everything that is saved in a model file: K members' twin Q, its Polyak target, V and policy.

    Parameters ``q`` [K, 2, Pq] (the twin critics), ``v`` [K, Pv], ``pi`` [K, Ppi]; buffer
    ``q_target`` [K, 2, Pq]. Member k is initialised from ``seeds[k]`` alone, in the same order as
    a one-member run, so it starts exactly where a run with only that seed starts.
    """

    def __init__(self, obs_dim: int, action_dim: int, config: IQLConfig, seeds: list[int] | tuple[int, ...] = (0,)):
        super().__init__()
        self.log_std_min, self.log_std_max = config.log_std_min, config.log_std_max
        self.q_shapes = layer_shapes(obs_dim + action_dim, config.hidden, 1)
        self.v_shapes = layer_shapes(obs_dim, config.hidden, 1)
        self.pi_shapes = layer_shapes(obs_dim, config.hidden, 2 * action_dim)
        q, v, pi = [], [], []
        for seed in seeds:
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(seed)
                q.append(torch.stack([init_mlp(obs_dim + action_dim, config.hidden, 1) for _ in range(2)]))
                v.append(init_mlp(obs_dim, config.hidden, 1))
                pi.append(init_mlp(obs_dim, config.hidden, 2 * action_dim))
        self.q = nn.Parameter(torch.stack(q), requires_grad=False)  # gradients are written by hand
        self.v = nn.Parameter(torch.stack(v), requires_grad=False)
        self.pi = nn.Parameter(torch.stack(pi), requires_grad=False)
        self.register_buffer("q_target", self.q.detach().clone())
        self._shapes = {"q": self.q_shapes, "q_target": self.q_shapes, "v": self.v_shapes, "pi": self.pi_shapes}
        self._views: dict[str, tuple[int, Layers]] = {}

    @property
    def members(self) -> int:
        return self.q.shape[0]

    def layers(self, name: str) -> Layers:
        """Layer views into network ``name`` ("q" and "q_target" as [2K, P]), made once: training
        updates every tensor in place, so the views stay valid (remade if the storage moves)."""
        flat = getattr(self, name)
        if torch.compiler.is_compiling():  # traced once; torch.compile folds the views away itself
            return mlp_layers(flat.view(-1, flat.shape[-1]), self._shapes[name])
        cached = self._views.get(name)
        if cached is None or cached[0] != flat.data_ptr():
            cached = (flat.data_ptr(), mlp_layers(flat.view(-1, flat.shape[-1]), self._shapes[name]))
            self._views[name] = cached
        return cached[1]

    def q_both(self, obs: Tensor, action: Tensor, target: bool = False, inputs: list[Tensor] | None = None) -> Tensor:
        """obs [K, B, D], action [K, B, A] -> both critics [K, 2, B]."""
        k, b = obs.shape[0], obs.shape[1]
        x = torch.cat([obs, action], dim=-1).repeat_interleave(2, dim=0)  # [2K, B, D + A]
        return stacked_mlp(self.layers("q_target" if target else "q"), x, inputs).view(k, 2, b)

    def q_min(self, obs: Tensor, action: Tensor, target: bool = False) -> Tensor:
        """The smaller critic, against overestimation: [K, B]."""
        return self.q_both(obs, action, target).amin(dim=1)

    def value(self, obs: Tensor, inputs: list[Tensor] | None = None) -> Tensor:
        """obs [K, B, D] -> V(s) [K, B]."""
        return stacked_mlp(self.layers("v"), obs, inputs).squeeze(-1)

    def policy_raw(self, obs: Tensor, inputs: list[Tensor] | None = None) -> tuple[Tensor, Tensor]:
        """The policy head before squashing: mu, log_std [K, B, A]."""
        mu, log_std = stacked_mlp(self.layers("pi"), obs, inputs).chunk(2, dim=-1)
        return mu, log_std

    def policy(self, obs: Tensor) -> tuple[Tensor, Tensor]:
        """pi(a | s) = N(tanh(mu(s)), exp(log_std(s))): obs [K, B, D] -> mean, log_std [K, B, A].

        The tanh keeps the mean inside the action bounds [-1, 1]."""
        mu, log_std = self.policy_raw(obs)
        return torch.tanh(mu), log_std.clamp(self.log_std_min, self.log_std_max)


# -- learner ------------------------------------------------------------------------------------

# Config fields that may differ between the members of one learner (a sweep).
SWEEPABLE = ("lr", "gamma", "beta", "tau")


class Batch(NamedTuple):
    """One minibatch. Single run: [B, ...]; an ensemble stacks one minibatch per member: [K, B, ...]."""

    obs: Tensor  # [B, D] normalised
    action: Tensor  # [B, A]
    reward: Tensor  # [B]
    next_obs: Tensor  # [B, D] normalised
    done: Tensor  # [B] 1.0 at a patient's last row


def clip_per_member_(grad: Tensor, max_norm: float) -> Tensor:
    """Global gradient-norm clipping of each member's network on its own: grad [K, ...], in place.

    The rule of ``nn.utils.clip_grad_norm_``: scale by max_norm / (norm + 1e-6) when that is below 1."""
    flat = grad.view(grad.shape[0], -1)
    flat.mul_((max_norm / (torch.linalg.vector_norm(flat, dim=1, keepdim=True) + 1e-6)).clamp_(max=1.0))
    return grad


def adam_(param: Tensor, grad: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor, step: Tensor, lr: float | Tensor) -> None:
    """Adam (betas 0.9, 0.999, eps 1e-8) in plain tensor ops, in place: the fused kernel's arithmetic
    in a form torch.compile traces, so a compiled update stays one graph with its optimiser steps."""
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    step.add_(1)
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    denom = exp_avg_sq.sqrt() / (1 - beta2**step).sqrt() + eps
    param.sub_(lr / (1 - beta1**step) * exp_avg / denom)


class IQL:
    """The learner: K members on stacked weights, fused Adam, ``update(batch) -> metrics``.

    ``seeds`` gives one member per seed (default: one member, ``seed``). Each member has its own
    initialisation and, in training, its own minibatch stream; members never interact, so each
    equals (within float tolerance) the same config trained alone with its seed.

    ``member_configs`` (a sweep) gives every member its own config; they may differ in
    ``SWEEPABLE`` fields only, which become [K, 1] tensors (network shapes must match to stack).
    """

    def __init__(
        self,
        obs_dim: int,
        action_dim: int,
        config: IQLConfig,
        seed: int = 0,
        seeds: list[int] | None = None,
        compile: bool = False,
        member_configs: list[IQLConfig] | None = None,
    ):
        self.config = config
        self.seeds = list(seeds) if seeds is not None else [seed]
        if not self.seeds:
            raise ValueError("an IQL learner needs at least one seed")
        self.member_configs = list(member_configs) if member_configs is not None else [config] * len(self.seeds)
        if len(self.member_configs) != len(self.seeds):
            raise ValueError(f"{len(self.member_configs)} member configs for {len(self.seeds)} seeds")
        fixed = config.model_dump(exclude=set(SWEEPABLE))
        for member in self.member_configs:
            if member.model_dump(exclude=set(SWEEPABLE)) != fixed:
                raise ValueError(f"members of one learner may differ in {', '.join(SWEEPABLE)} only")
        # Per-member values [K, 1] where members differ, plain floats where they agree.
        self.hyper = {
            name: values[0] if len(set(values)) == 1 else torch.tensor(values).unsqueeze(1)
            for name in SWEEPABLE
            for values in [[getattr(m, name) for m in self.member_configs]]
        }
        self.nets = Networks(obs_dim, action_dim, config, self.seeds)
        params = (self.nets.q, self.nets.v, self.nets.pi)
        # Adam's state per network: first and second moments, and the step count.
        self.adam = {
            name: {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p), "step": torch.zeros(())}
            for name, p in zip(("q", "v", "pi"), params)
        }
        # torch.compile fuses a step's elementwise work and Adam (`adam_`) into one graph of C++
        # kernels: about 2.3x eager at [32, 32] on one thread, ~1.4x for 16 members, 1.1x at
        # [256, 256] (matmuls dominate there; docs/iql_speed.md). fullgraph: graph breaks (the
        # fused Adam kernel made four) cost ~1.6x at [32, 32]. Compiling takes ~30 s on 2 cores
        # with a cold cache, longer than a whole default 5000-step run (~2.5 s), hence opt-in.
        self._update = torch.compile(self._update_step, dynamic=False, fullgraph=True) if compile else self._update_step

    @property
    def members(self) -> int:
        return len(self.seeds)

    def _adam_step(self, grads: dict[str, Tensor]) -> None:
        """Clip every member's gradient per network, then one fused Adam kernel over these networks.

        Members with different learning rates (a sweep) run Adam with lr 1 into a zeroed scratch
        copy, then add lr_k times that step: Adam's moments do not depend on the learning rate."""
        names = list(grads)
        lr = self.hyper["lr"]
        per_member = isinstance(lr, Tensor)
        params = [getattr(self.nets, n) for n in names]
        if torch.compiler.is_compiling():  # the fused kernel would split the compiled graph in five
            for name, param in zip(names, params):
                state = self.adam[name]
                rate = lr.view(-1, *[1] * (param.dim() - 1)) if per_member else lr
                adam_(
                    param, clip_per_member_(grads[name], self.config.grad_clip), state["exp_avg"], state["exp_avg_sq"], state["step"], rate
                )
            return
        targets = [torch.zeros_like(p) for p in params] if per_member else params
        functional_adam(
            targets,
            [clip_per_member_(grads[n], self.config.grad_clip) for n in names],
            [self.adam[n]["exp_avg"] for n in names],
            [self.adam[n]["exp_avg_sq"] for n in names],
            [],
            [self.adam[n]["step"] for n in names],
            fused=True,
            amsgrad=False,
            beta1=0.9,
            beta2=0.999,
            lr=1.0 if per_member else lr,
            weight_decay=0.0,
            eps=1e-8,
            maximize=False,
        )
        if per_member:
            for p, step in zip(params, targets):
                p.add_(step * lr.view(-1, *[1] * (p.dim() - 1)))

    def update(self, batch: Batch) -> dict[str, Tensor]:
        """One gradient step of every member. Metrics are tensors: scalars for a [B] batch, [K] for [K, B]."""
        return self._update(batch)

    @torch.no_grad()
    def _update_step(self, batch: Batch) -> dict[str, Tensor]:
        single = batch.obs.dim() == 2
        if single:
            batch = Batch(*(field.unsqueeze(0) for field in batch))
        cfg, nets, hyper = self.config, self.nets, self.hyper
        n = batch.obs.shape[1]

        # V by expectile regression on the target critics, and the policy by AWR with the same
        # (pre-update) V; both step together, as their losses touch disjoint parameters.
        q_target = nets.q_min(batch.obs, batch.action, target=True)
        v_inputs: list[Tensor] = []
        v = nets.value(batch.obs, v_inputs)
        loss_v, grad_v = expectile_loss_and_grad(q_target, v, hyper["tau"])
        advantage = q_target - v
        weight = awr_weights(advantage, hyper["beta"], cfg.max_weight)
        pi_inputs: list[Tensor] = []
        mu, log_std_raw = nets.policy_raw(batch.obs, pi_inputs)
        loss_pi, grad_mu, grad_log_std = awr_loss_and_grads(batch.action, mu, log_std_raw, weight, cfg.log_std_min, cfg.log_std_max)
        self._adam_step(
            {
                "v": mlp_backward(nets.layers("v"), v_inputs, grad_v.unsqueeze(-1)),
                "pi": mlp_backward(nets.layers("pi"), pi_inputs, torch.cat([grad_mu, grad_log_std], dim=-1)),
            }
        )

        # Q regresses onto r + gamma * V(s') with the V just updated; each twin has its own loss.
        td_target = batch.reward + hyper["gamma"] * (1.0 - batch.done) * nets.value(batch.next_obs)
        q_inputs: list[Tensor] = []
        loss_q, grad_out = td_loss_and_grad(nets.q_both(batch.obs, batch.action, inputs=q_inputs), td_target)  # [K], [K, 2, B]
        k = grad_out.shape[0]
        grad_q = mlp_backward(nets.layers("q"), q_inputs, grad_out.view(2 * k, n, 1))
        self._adam_step({"q": grad_q.view_as(nets.q)})

        nets.q_target.lerp_(nets.q, cfg.polyak)

        metrics = {
            "loss/q": loss_q,
            "loss/v": loss_v,
            "loss/pi": loss_pi,
            "values/q_mean": q_target.mean(-1),
            "values/v_mean": v.mean(-1),
            "values/advantage_mean": advantage.mean(-1),
            "values/awr_weight_mean": weight.mean(-1),
        }
        return {key: m.squeeze(0) for key, m in metrics.items()} if single else metrics

    def state_dict(self) -> dict:
        return {"nets": self.nets.state_dict(), "adam": self.adam}

    def load_state_dict(self, state: dict) -> None:
        self.nets.load_state_dict(state["nets"])
        for name, moments in state["adam"].items():
            for key, value in moments.items():
                self.adam[name][key].copy_(value)
