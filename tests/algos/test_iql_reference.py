"""The hand-written gradients and the stacked ensemble against the plain autograd reference
(`dosewise.algos.iql_reference`): the fast learner must take the same steps."""

from __future__ import annotations

import copy

import pytest
import torch

from dosewise.algos.iql import IQL, Batch, IQLConfig, adam_
from dosewise.algos.iql_reference import ReferenceIQL


def _batch(n: int = 32, d: int = 3, seed: int = 0, scale: float = 1.0) -> Batch:
    g = torch.Generator().manual_seed(seed)
    return Batch(
        obs=torch.randn(n, d, generator=g) * scale,
        action=torch.rand(n, 1, generator=g) * 2 - 1,
        reward=torch.randn(n, generator=g) * scale,
        next_obs=torch.randn(n, d, generator=g) * scale,
        done=(torch.rand(n, generator=g) < 0.2).float(),
    )


@pytest.mark.parametrize(
    "config",
    [
        IQLConfig(lr=1e-3, hidden=(16, 16)),
        IQLConfig(lr=1e-2, hidden=(8,), beta=3.0, tau=0.9, gamma=0.5, grad_clip=0.1),  # clipping active
        IQLConfig(lr=3e-3, hidden=(8, 8, 8), log_std_min=-0.1, log_std_max=0.1),  # log_std clamped
    ],
)
def test_update_matches_the_autograd_reference(config: IQLConfig) -> None:
    fast = IQL(3, 1, config, seed=3)
    ref = ReferenceIQL(fast)
    for step in range(25):
        batch = _batch(seed=step, scale=3.0)
        mine, theirs = fast.update(batch), ref.update(batch)
        for key, value in theirs.items():
            assert mine[key].item() == pytest.approx(value, rel=1e-4, abs=1e-5), (step, key)
    torch.testing.assert_close(fast.nets.q[0], ref.q.detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.nets.v[0], ref.v[0].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.nets.pi[0], ref.pi[0].detach(), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(fast.nets.q_target[0], ref.q_target, rtol=1e-4, atol=1e-5)


def test_each_ensemble_member_equals_a_run_with_its_seed_alone() -> None:
    config = IQLConfig(lr=3e-3, hidden=(16, 16))
    seeds = [5, 0, 11]
    ensemble = IQL(3, 1, config, seeds=seeds)
    alone = [IQL(3, 1, config, seed=s) for s in seeds]
    for k, member in enumerate(alone):  # same initialisation
        assert torch.equal(ensemble.nets.pi[k], member.nets.pi[0])
        assert torch.equal(ensemble.nets.q_target[k], member.nets.q_target[0])
    for step in range(20):
        batches = [_batch(seed=100 * step + k) for k in range(len(seeds))]  # every member its own minibatch
        metrics = ensemble.update(Batch(*(torch.stack(f) for f in zip(*batches))))
        for k, member in enumerate(alone):
            single = member.update(batches[k])
            for key, value in single.items():
                torch.testing.assert_close(metrics[key][k], value, rtol=1e-5, atol=1e-6)
    for k, member in enumerate(alone):
        for name in ("q", "q_target", "v", "pi"):
            torch.testing.assert_close(getattr(ensemble.nets, name)[k], getattr(member.nets, name)[0], rtol=1e-5, atol=1e-6)


def test_state_dict_round_trip_of_an_ensemble() -> None:
    a = IQL(3, 1, IQLConfig(hidden=(8,)), seeds=[1, 2])
    stacked = lambda s: Batch(*(torch.stack([f, f]) for f in _batch(seed=s)))
    a.update(stacked(0))
    b = IQL(3, 1, IQLConfig(hidden=(8,)), seeds=[7, 8])
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    ma, mb = a.update(stacked(1)), b.update(stacked(1))
    for key in ma:
        assert torch.equal(ma[key], mb[key]), key


@pytest.mark.slow
def test_compiled_update_matches_eager() -> None:
    """torch.compile (opt-in) reorders float arithmetic, so equal within tolerance, not bitwise."""
    config = IQLConfig(lr=1e-3, hidden=(8, 8))
    eager, compiled = IQL(3, 1, config, seeds=[0, 1]), IQL(3, 1, config, seeds=[0, 1], compile=True)
    for step in range(5):
        batch = Batch(*(torch.stack([f, f]) for f in _batch(seed=step)))
        mine, theirs = compiled.update(batch), eager.update(batch)
        for key in theirs:
            torch.testing.assert_close(mine[key], theirs[key], rtol=1e-4, atol=1e-5)
    for name in ("q", "q_target", "v", "pi"):
        torch.testing.assert_close(getattr(compiled.nets, name), getattr(eager.nets, name), rtol=1e-4, atol=1e-5)


def test_each_sweep_member_equals_its_config_trained_alone() -> None:
    base = IQLConfig(lr=3e-3, hidden=(16, 16))
    configs = [
        base,
        base.model_copy(update=dict(lr=1e-2, gamma=0.5)),
        base.model_copy(update=dict(beta=3.0, tau=0.9)),
        base.model_copy(update=dict(lr=1e-4, gamma=0.99, beta=0.0, tau=0.5)),
    ]
    seeds = [0, 0, 1, 2]
    sweep = IQL(3, 1, base, seeds=seeds, member_configs=configs)
    alone = [IQL(3, 1, c, seed=s) for c, s in zip(configs, seeds)]
    for step in range(15):
        batches = [_batch(seed=10 * step + k, scale=2.0) for k in range(len(seeds))]
        metrics = sweep.update(Batch(*(torch.stack(f) for f in zip(*batches))))
        for k, member in enumerate(alone):
            for key, value in member.update(batches[k]).items():
                torch.testing.assert_close(metrics[key][k], value, rtol=1e-4, atol=1e-5)
    for k, member in enumerate(alone):
        for name in ("q", "q_target", "v", "pi"):
            torch.testing.assert_close(getattr(sweep.nets, name)[k], getattr(member.nets, name)[0], rtol=1e-4, atol=1e-5)


def test_sweep_members_must_share_their_network_shapes() -> None:
    with pytest.raises(ValueError, match="differ in lr, gamma, beta, tau only"):
        IQL(3, 1, IQLConfig(), seeds=[0, 1], member_configs=[IQLConfig(), IQLConfig(hidden=(8,))])


def test_traceable_adam_matches_torch_adam() -> None:
    """`adam_` (what a compiled update runs) takes torch.optim.Adam's steps, per-member lr included."""
    g = torch.Generator().manual_seed(0)
    lr = torch.tensor([[1e-3], [3e-2]])
    mine = torch.randn(2, 50, generator=g)
    theirs = [mine[k].clone().requires_grad_() for k in range(2)]
    opts = [torch.optim.Adam([p], lr=float(lr[k])) for k, p in enumerate(theirs)]
    exp_avg, exp_avg_sq, step = torch.zeros_like(mine), torch.zeros_like(mine), torch.zeros(())
    for _ in range(10):
        grad = torch.randn(2, 50, generator=g)
        adam_(mine, grad, exp_avg, exp_avg_sq, step, lr)
        for k, (p, opt) in enumerate(zip(theirs, opts)):
            p.grad = grad[k].clone()
            opt.step()
    torch.testing.assert_close(mine, torch.stack([p.detach() for p in theirs]), rtol=1e-4, atol=1e-5)
