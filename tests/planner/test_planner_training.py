"""Training the planner: the detach strategy keeps Stage 2 out of the environment model, a tiny
run lowers every loss, a saved model reloads to identical predictions, every strategy runs,
the value targets and the rebound alarm do what they say."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
import torch

from dosewise.config import load_config
from dosewise.planner.config import STRATEGIES, MonitorConfig, PlannerRunConfig
from dosewise.planner.data import batch_loader, value_targets, window_tensors
from dosewise.planner.model import PlannerModel, PlannerStats
from dosewise.planner.training import (
    PlannerLosses,
    ReboundMonitor,
    load_planner,
    planner_losses,
    policy_pass_loss,
    train_planner,
)
from tests.planner.conftest import tiny_run


def model_for(run, windows) -> PlannerModel:
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    model.set_stats(PlannerStats.from_windows(windows))
    return model


@pytest.mark.parametrize("rollout", ["teacher", "policy"])
def test_detach_policy_loss_leaves_environment_gradients_zero(tiny_windows, tiny_batch, rollout):
    run = tiny_run("detach", stage2_rollout=rollout)
    model = model_for(run, tiny_windows["train"])
    losses, _ = planner_losses(model, tiny_batch, run.strategy)
    losses.policy.backward()
    groups = model.parameter_groups()
    for param in groups["env"]:
        assert param.grad is None or torch.count_nonzero(param.grad) == 0
    assert any(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in groups["policy"])

    # Contrast: under joint the policy loss does move the representation and the dynamics.
    joint = tiny_run("joint", stage2_rollout=rollout)
    model.zero_grad(set_to_none=True)
    planner_losses(model, tiny_batch, joint.strategy)[0].policy.backward()
    assert torch.count_nonzero(model.encoder.layers[0].linear1.weight.grad) > 0
    if rollout == "teacher":
        assert torch.count_nonzero(model.dynamics.layers[0].linear1.weight.grad) > 0


def train_set_losses(model: PlannerModel, tensors, strategy) -> dict[str, float]:
    totals: dict[str, float] = {}
    batches = 0
    with torch.no_grad():
        for batch in batch_loader(tensors, 256, shuffle=False):
            for name, value in planner_losses(model.eval(), batch, strategy)[0].as_floats().items():
                totals[name] = totals.get(name, 0.0) + value
            batches += 1
    return {name: total / batches for name, total in totals.items()}


def test_tiny_run_lowers_all_losses_and_reloads_identically(tiny_windows, tmp_path):
    run = tiny_run("joint", epochs=6)
    tensors = window_tensors(tiny_windows["train"], run.windows.gamma)
    torch.manual_seed(run.train.seed)
    untrained = model_for(run, tiny_windows["train"])
    before = train_set_losses(untrained, tensors, run.strategy)

    result = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path)
    after = train_set_losses(result.model, tensors, run.strategy)
    for name in ("bis", "map", "reward", "value", "policy"):
        assert after[name] < before[name], (name, before[name], after[name])

    reloaded, config = load_planner(tmp_path)
    assert config == run.model_copy()
    batch = window_tensors(tiny_windows["val"], run.windows.gamma)
    args = (batch.history, batch.history_mask, batch.static, batch.actions)
    with torch.no_grad():
        original, again = result.model.eval()(*args), reloaded(*args)
    for name in ("policy_logits", "value", "reward", "bis_logits", "map_logits", "states"):
        assert torch.equal(getattr(original, name), getattr(again, name)), name

    # The Lightning checkpoints also load without unpickling code.
    for path in (tmp_path / "checkpoints").glob("*.ckpt"):
        state = torch.load(path, map_location="cpu", weights_only=True)["state_dict"]
        assert set(state) == {f"model.{k}" for k in result.model.state_dict()}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["epochs"] == 6 and summary["final"]["val_bis_mae"] > 0
    assert (tmp_path / "csv" / "metrics.csv").is_file() and any((tmp_path / "tb").iterdir())


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_each_strategy_runs_one_epoch(tiny_windows, tmp_path, strategy):
    run = tiny_run(strategy, epochs=1)
    result = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path)
    final = result.summary["final"]
    for name in (
        "val_bis_mae",
        "val_map_mae",
        "val_reward_mae",
        "val_value_mae",
        "val_action_mae_ppf",
        "val_action_mae_rftn",
        "rollout/bis_mae_h1",
        "rollout/map_mae_h3",
    ):
        assert np.isfinite(final[name]), name
    assert result.summary["strategy"] == strategy
    assert result.summary["warmup_epochs"] == (10 if strategy == "warmup" else 0)
    assert result.summary["env_weight"] == (2.0 if strategy == "weighted" else 1.0)


def test_alternating_steps_policy_with_its_own_optimiser_only(tiny_windows, tmp_path):
    """After one epoch of alternating, the policy network moved; with the policy loss alone
    (warm-up) it does not."""
    run = tiny_run("alternating", epochs=1)
    torch.manual_seed(0)
    start = model_for(run, tiny_windows["train"]).policy_head[0].weight.detach().clone()
    moved = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path / "a").model
    assert not torch.equal(moved.policy_head[0].weight, start)
    frozen = train_planner(
        tiny_run("alternating", epochs=1, warmup_epochs=1), tiny_windows["train"], tiny_windows["val"], tmp_path / "b"
    ).model
    assert torch.equal(frozen.policy_head[0].weight, start)


def test_alternating_policy_pass_reaches_the_policy_network_only(tiny_windows, tiny_batch):
    run = tiny_run("alternating")
    model = model_for(run, tiny_windows["train"])
    policy_pass_loss(model, tiny_batch, run.strategy).backward()
    groups = model.parameter_groups()
    assert all(p.grad is None for p in groups["env"])
    assert all(p.grad is not None and torch.count_nonzero(p.grad) > 0 for p in groups["policy"])


def test_alternating_epoch_serves_the_same_minibatches_twice(tiny_windows):
    tensors = window_tensors(tiny_windows["train"], 0.9)
    once = [b.actions for b in batch_loader(tensors, 16, shuffle=True, seed=3)]
    twice = [b.actions for b in batch_loader(tensors, 16, shuffle=True, seed=3, passes=2)]
    assert len(twice) == 2 * len(once)
    for first, second, single in zip(twice[: len(once)], twice[len(once) :], once):
        assert torch.equal(first, second) and torch.equal(first, single)


def test_windows_per_epoch_draws_a_fresh_subset_each_epoch(tiny_windows):
    tensors = window_tensors(tiny_windows["train"], 0.9)
    rows = torch.arange(len(tensors), dtype=torch.float32)[:, None].expand_as(tensors.values)
    loader = batch_loader(replace(tensors, values=rows), 8, shuffle=True, seed=1, per_epoch=20)  # each window's row number
    epochs = [torch.cat([b.values[:, 0].long() for b in loader]) for _ in range(2)]
    for rows in epochs:
        assert len(rows) == 20 and len(set(rows.tolist())) == 20  # without replacement
    assert not torch.equal(epochs[0], epochs[1])


def test_shipped_configs_load_with_their_strategy():
    for strategy in STRATEGIES:
        run = load_config(f"planner_{strategy}", PlannerRunConfig)
        assert run.strategy.name == strategy
    search = load_config("planner_warmup_mcts", PlannerRunConfig)
    assert search.strategy.name == "warmup" and search.search.preset == "balanced"
    assert search.closed_loop.modes == ("argmax", "beam", "mcts")


def test_value_targets_equal_the_returns_of_later_windows(tiny_windows):
    """G_{t+k} from the recurrence equals the return of the window at step t+k of the same case."""
    windows = tiny_windows["train"]
    values, mask = value_targets(windows, 0.99)
    position = {(case, time): i for i, (case, time) in enumerate(zip(windows.case_ids, windows.times))}
    checked = 0
    for i in range(len(windows)):
        for k in range(1, values.shape[1]):
            later = position.get((windows.case_ids[i], windows.times[i] + 60.0 * k))
            if mask[i, k] and later is not None:
                assert values[i, k] == pytest.approx(windows.returns[later], abs=1e-3)
                checked += 1
    assert checked > 50


def test_rebound_alarm_after_warmup_only():
    monitor = ReboundMonitor(MonitorConfig(margin=0.1, patience=2, grace_epochs=0), start_epoch=3, metrics=("val_bis_mae",))
    sequence = [5.0, 4.0, 6.0, 6.0, 3.9, 4.5, 4.4, 4.5, 3.0]  # epochs 2-3 are worse but before start
    raised = [monitor.update(epoch, {"val_bis_mae": v}) for epoch, v in enumerate(sequence)]
    assert [len(r) for r in raised] == [0, 0, 0, 0, 0, 0, 1, 0, 0]
    alarm = raised[6][0]
    assert alarm["epoch"] == 6 and alarm["since_epoch"] == 5 and alarm["best"] == 3.9 and alarm["best_epoch"] == 4
    assert monitor.best["val_bis_mae"] == (3.0, 8)


def test_losses_record_is_frozen_and_sums_env():
    losses = PlannerLosses(*(torch.tensor(float(v)) for v in (1, 2, 3, 4, 5)))
    assert losses.as_floats()["env"] == 10.0 and float(losses.env) == 10.0
    with pytest.raises(AttributeError):
        losses.bis = torch.tensor(0.0)  # type: ignore[misc]


@pytest.mark.parametrize("strategy", ["detach", "alternating"])
def test_cosine_schedule_decays_the_learning_rate_to_its_floor(tiny_windows, tmp_path, strategy):
    from dosewise.planner.config import OptimConfig

    base = tiny_run(strategy, epochs=3)
    run = base.model_copy(update={"optim": OptimConfig(lr=2e-3, schedule="cosine", final_lr_factor=0.1)})
    trained = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path / strategy)
    optimisers = trained.module.optimizers()
    optimisers = optimisers if isinstance(optimisers, list) else [optimisers]
    for optimiser in optimisers:
        # After 3 of 3 epochs the cosine is at its end: lr · final_lr_factor.
        assert optimiser.param_groups[0]["lr"] == pytest.approx(2e-4)
