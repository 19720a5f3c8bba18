"""Beam search over the learned model: with no pruning it finds the best sequence an exhaustive
search over the same candidates finds, depth 1 / top 1 is the masked argmax, dose limits hold."""

from __future__ import annotations

import pytest
import torch

from dosewise.planner.beam_search import (
    BeamConfig,
    beam_search,
    dose_mask,
    masked_log_policy,
    top_joint_actions,
)


def inputs(batch, rows: int = 4):
    return batch.history[:rows], batch.history_mask[:rows], batch.static[:rows]


def test_top_joint_actions_are_the_most_probable_pairs():
    log_policy = torch.randn(3, 2, 201).log_softmax(-1)
    actions, score = top_joint_actions(log_policy, 5)
    joint = log_policy[:, 0, :, None] + log_policy[:, 1, None, :]  # [3, 201, 201]
    best, flat = joint.flatten(1).topk(5, dim=1)
    torch.testing.assert_close(score, best)
    assert torch.equal(actions, torch.stack([flat // 201, flat % 201], dim=-1))


@torch.no_grad()
def exhaustive_best(model, history, mask, static, config, allowed):
    """Every sequence of each state's top-k joint actions, scored one at a time."""
    memory, padding = model.represent(history, mask, static)
    best_scores, best_plans = [], []
    for row in range(history.shape[0]):
        mem, pad = memory[row : row + 1], padding[row : row + 1]
        frontier = [([], 0.0, mem[:, -1])]
        for depth in range(config.depth):
            grown = []
            for plan, score, state in frontier:
                actions, _ = top_joint_actions(masked_log_policy(model, state, allowed[row : row + 1]), config.top_k)
                for action in actions[0]:
                    prefix = torch.tensor([[*plan, action.tolist()]])
                    reached = model.unroll(mem, pad, prefix)[:, -1]
                    gain = model.reward_in_units(model.reward_head(reached).squeeze(-1)) + model.value_in_units(model.value(reached))
                    grown.append(([*plan, action.tolist()], score + config.gamma**depth * float(gain), reached))
            frontier = grown
        plan, score, _ = max(frontier, key=lambda item: item[1])
        best_plans.append(plan)
        best_scores.append(score)
    return torch.tensor(best_plans), torch.tensor(best_scores)


def test_unpruned_beam_equals_exhaustive_search(tiny_model, tiny_batch):
    config = BeamConfig(beam_width=9, top_k=3, depth=2, gamma=0.8)  # 3^2 = 9 sequences: nothing pruned
    allowed = dose_mask(4, max_rate=(120, 40))
    result = beam_search(tiny_model, *inputs(tiny_batch), config, allowed)
    plans, scores = exhaustive_best(tiny_model, *inputs(tiny_batch), config, allowed)
    assert torch.equal(result.plan, plans)
    torch.testing.assert_close(result.score, scores.float(), rtol=1e-4, atol=1e-4)
    assert torch.equal(result.action, plans[:, 0])


def test_depth_one_top_one_is_the_masked_argmax(tiny_model, tiny_batch):
    allowed = dose_mask(4, max_rate=(30, 10), min_rate=(5, 0))
    result = beam_search(tiny_model, *inputs(tiny_batch), BeamConfig(beam_width=1, top_k=1, depth=1), allowed)
    memory, _ = tiny_model.represent(*inputs(tiny_batch))
    assert torch.equal(result.action, masked_log_policy(tiny_model, memory[:, -1], allowed).argmax(-1))


@pytest.mark.parametrize("limits", [((10, 5), (0, 0)), ((200, 200), (150, 100)), ((7, 7), (7, 7))])
def test_dose_limits_hold_at_every_depth(tiny_model, tiny_batch, limits):
    (max_rate, min_rate) = limits
    allowed = dose_mask(4, max_rate=max_rate, min_rate=min_rate)
    plan = beam_search(tiny_model, *inputs(tiny_batch), BeamConfig(beam_width=3, top_k=4, depth=3), allowed).plan
    for drug in range(2):
        assert (plan[..., drug] <= max_rate[drug]).all() and (plan[..., drug] >= min_rate[drug]).all()


def test_bad_limits_and_depth_are_refused(tiny_model, tiny_batch):
    with pytest.raises(ValueError, match="min <= max"):
        dose_mask(1, max_rate=(10, 200), min_rate=(20, 0))
    with pytest.raises(ValueError, match="pre_len"):
        beam_search(tiny_model, *inputs(tiny_batch), BeamConfig(depth=tiny_model.pre_len + 1))
