"""Stage 2 with the search: the margin gates the MCTS target, the loss is
λ_bc·BC + λ_mcts·mean(w·CE), presets resolve to their documented numbers, the activation rate is
recorded with its alarm, and detach still keeps Stage 2 out of the environment model."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from dosewise.planner.config import SearchTrainingConfig
from dosewise.planner.training import (
    SearchTargets,
    behaviour_cloning_loss,
    planner_losses,
    search_targets,
    stage2_loss,
    train_planner,
)
from tests.planner.conftest import tiny_run


def test_presets_are_the_issues_numbers():
    expected = {
        "conservative": (0.8, 0.2, 0.15, 30, True),
        "balanced": (0.7, 0.3, 0.10, 50, True),
        "aggressive": (0.5, 0.5, 0.05, 80, False),
    }
    for preset, numbers in expected.items():
        config = SearchTrainingConfig(preset=preset)
        fields = ("bc_weight", "mcts_weight", "margin", "num_simulations", "teacher_forcing")
        assert tuple(config.resolved(name) for name in fields) == numbers
    assert SearchTrainingConfig(preset="balanced", margin=0.3).resolved("margin") == 0.3
    assert not SearchTrainingConfig().enabled


def test_margin_gates_the_search_target(tiny_model, tiny_batch):
    generator = torch.Generator().manual_seed(0)
    loose = search_targets(tiny_model, tiny_batch, SearchTrainingConfig(preset="balanced", num_simulations=6, margin=-1e9), 0.9, generator)
    strict = search_targets(tiny_model, tiny_batch, SearchTrainingConfig(preset="balanced", num_simulations=6, margin=1e9), 0.9, generator)
    assert torch.all(loose.weight == 1) and torch.all(strict.weight == 0)
    # The Q values are r + γV one model step after each action, in return standard deviations:
    # the search's recurrent calls agree with the module's unroll.
    with torch.no_grad():
        memory, padding = tiny_model.represent(tiny_batch.history, tiny_batch.history_mask, tiny_batch.static)
        for action, q in ((loose.action, loose.q_mcts), (tiny_batch.actions[:, 0], loose.q_expert)):
            reached = tiny_model.unroll(memory, padding, action.unsqueeze(1))[:, 0]
            reward = tiny_model.reward_in_units(tiny_model.reward(reached))
            expected = (reward + 0.9 * tiny_model.value_in_units(tiny_model.value(reached))) / tiny_model.return_std
            torch.testing.assert_close(q, expected, rtol=1e-5, atol=1e-5)
    balanced = search_targets(tiny_model, tiny_batch, SearchTrainingConfig(preset="balanced", num_simulations=6), 0.9, generator)
    torch.testing.assert_close(balanced.weight, (balanced.q_mcts > balanced.q_expert + 0.1).float())


def test_stage2_loss_adds_the_weighted_cross_entropy(tiny_batch):
    torch.manual_seed(1)
    b, k = tiny_batch.actions.shape[:2]
    logits = torch.randn(b, k, 2, 201)
    action = torch.randint(0, 201, (b, 2))
    weight = (torch.arange(b) % 3 == 0).float()
    targets = SearchTargets(action=action, weight=weight, q_mcts=torch.zeros(b), q_expert=torch.zeros(b))
    config = SearchTrainingConfig(preset="conservative")
    bc = behaviour_cloning_loss(logits, tiny_batch)
    ce = torch.stack([F.cross_entropy(logits[i, 0], action[i], reduction="sum") for i in range(b)])
    expected = 0.8 * bc + 0.2 * (weight * ce).sum() / b
    torch.testing.assert_close(stage2_loss(logits, tiny_batch, config, targets), expected)
    off = SearchTargets(action=action, weight=torch.zeros(b), q_mcts=torch.zeros(b), q_expert=torch.zeros(b))
    torch.testing.assert_close(stage2_loss(logits, tiny_batch, config, off), 0.8 * bc)
    torch.testing.assert_close(stage2_loss(logits, tiny_batch, SearchTrainingConfig(), targets), bc)


def test_detach_keeps_the_search_term_out_of_the_environment_model(tiny_model, tiny_batch):
    run = tiny_run("detach")
    search = SearchTrainingConfig(preset="aggressive", num_simulations=4, margin=-1e9)
    step = lambda batch, out: search_targets(
        tiny_model, batch, search, 0.9, torch.Generator().manual_seed(0), out.memory, out.memory_padding
    )
    losses, _ = planner_losses(tiny_model, tiny_batch, run.strategy, search, step)
    losses.policy.backward()
    for param in tiny_model.parameter_groups()["env"]:
        assert param.grad is None or torch.count_nonzero(param.grad) == 0


def test_alternating_searches_in_its_policy_pass(tiny_windows, tmp_path):
    search = SearchTrainingConfig(preset="conservative", num_simulations=4, margin=-1e9)
    run = tiny_run("alternating", epochs=1).model_copy(update={"search": search})
    summary = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path).summary
    assert [entry["rate"] for entry in summary["search"]["activation"]] == [1.0]


def test_activation_rate_is_recorded_and_alarms(tiny_windows, tmp_path):
    always = SearchTrainingConfig(preset="aggressive", num_simulations=4, margin=-1e9)
    run = tiny_run("joint", epochs=2).model_copy(update={"search": always})
    summary = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path).summary
    assert [entry["rate"] for entry in summary["search"]["activation"]] == [1.0, 1.0]
    assert [alarm["epoch"] for alarm in summary["search"]["activation_alarms"]] == [0, 1]
    assert summary["stage2_rollout"] == "policy"  # aggressive: no teacher forcing


def test_calibrated_margin_activates_the_target_share_of_the_calibration_windows(tiny_windows, tmp_path):
    """With target_activation the margin is set once, at the first searching epoch, to the quantile
    of Q_mcts - Q_expert over the calibration windows; searched again with the same draws, those
    windows are active at the target share, and training uses that margin from then on."""
    n = len(tiny_windows["train"])
    search = SearchTrainingConfig(preset="balanced", num_simulations=4, target_activation=0.25, calibration_windows=n, calibrate="once")
    run = tiny_run("warmup", epochs=3, warmup_epochs=1).model_copy(update={"search": search})
    trained = train_planner(run, tiny_windows["train"], tiny_windows["val"], tmp_path)
    [calibration] = trained.summary["search"]["margin_calibration"]
    assert calibration["epoch"] == 1 and calibration["windows"] == n  # the first epoch after the warm-up
    assert trained.summary["search"]["margin_used"] == calibration["margin"]
    assert [entry["epoch"] for entry in trained.summary["search"]["activation"]] == [1, 2]
    every = train_planner(
        run.model_copy(update={"search": search.model_copy(update={"calibrate": "every_epoch"})}),
        tiny_windows["train"],
        tiny_windows["val"],
        tmp_path / "every",
    ).summary["search"]
    assert [entry["epoch"] for entry in every["margin_calibration"]] == [1, 2]
    assert every["margin_calibration"][0]["margin"] == calibration["margin"]  # same model, same draws at epoch 1
    assert every["margin_used"] == every["margin_calibration"][-1]["margin"]

    module = trained.module  # calibrating again on the trained model gives its own quantile, same rule
    module.calibrate_margin()
    generator = torch.Generator().manual_seed(run.train.seed + 104729)
    batch = module.calibration
    targets = search_targets(module.model.eval(), batch, search, run.windows.gamma, generator, margin=module.margin)
    assert abs(float(targets.weight.mean()) - 0.25) <= 1.5 / n + 1e-9
    with pytest.raises(ValueError, match="target_activation"):
        SearchTrainingConfig(preset="balanced", target_activation=1.5)
