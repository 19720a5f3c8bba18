"""The planner as the search's model (`dosewise.planner.search_model`): its root and recurrent
inference equal the model's direct unroll, and the batched search over it equals the reference."""

from __future__ import annotations

import pytest
import torch

from dosewise.planner.config import PlannerModelConfig
from dosewise.planner.mcts import MCTSConfig, search
from dosewise.planner.mcts_reference import reference_search_rows
from dosewise.planner.model import RATE_LEVELS, PlannerModel, PlannerStats, causal_mask
from dosewise.planner.search_model import planner_search_fns
from tests.planner.conftest import tiny_run
from tests.planner.test_planner_mcts import noise, same


def _planner(tiny_windows) -> PlannerModel:
    run = tiny_run()
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len)
    model.set_stats(PlannerStats.from_windows(tiny_windows["train"]))
    return model.double().eval()


def test_planner_adapter_matches_direct_unroll(tiny_windows, tiny_batch):
    model = _planner(tiny_windows)
    inputs = [x[:8] for x in tiny_batch.inputs]
    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    root, recurrent_fn = planner_search_fns(model, *inputs)
    actions = tiny_batch.actions[:8]  # [8, K, 2]
    with torch.no_grad():
        memory, padding = model.represent(*inputs)
        torch.testing.assert_close(root.prior_logits, model.policy_logits(memory[:, -1]))
        torch.testing.assert_close(root.value, model.value_in_units(model.value(memory[:, -1])))
        direct = model.unroll(memory, padding, actions)  # [8, K, d]
    state = root.state
    for step in range(model.pre_len):
        out = recurrent_fn(state, actions[:, step])
        latent = direct[:, step]
        torch.testing.assert_close(out.reward, model.reward_in_units(model.reward_head(latent).squeeze(-1)))
        torch.testing.assert_close(out.value, model.value_in_units(model.value(latent)))
        torch.testing.assert_close(out.prior_logits, model.policy_logits(latent))
        state = out.state
        assert state[:, -1].eq(step + 1).all()


def test_planner_adapter_matches_direct_unroll_default_model_float32():
    """The default model (two encoder and two decoder layers, d 64) in float32 on 128 windows,
    where the adapter's products run on oneDNN (`dosewise.onednn`) and the module's on MKL."""
    torch.manual_seed(0)
    b, length, pre_len = 128, 64, 5
    model = PlannerModel(PlannerModelConfig(), max_len=length, pre_len=pre_len).eval()
    history = torch.cat([torch.randn(b, length, 5), torch.randint(0, 80, (b, length, 2)).float(), torch.zeros(b, length, 1)], dim=-1)
    mask = torch.arange(length) >= torch.randint(0, length - 5, (b, 1))  # left padding
    static = torch.randn(b, 5)
    actions = torch.randint(0, RATE_LEVELS, (b, pre_len, 2))
    root, recurrent_fn = planner_search_fns(model, history, mask, static)
    with torch.no_grad():
        tokens, padding = model.tokens(history, mask, static)
        memory = model.encoder(tokens, mask=causal_mask(tokens.shape[1]), src_key_padding_mask=padding)  # the module
        torch.testing.assert_close(
            root.prior_logits, model.policy_head(memory[:, -1]).unflatten(-1, (2, RATE_LEVELS)), rtol=1e-4, atol=1e-4
        )
        direct = model.unroll(memory, padding, actions)
    state = root.state
    for step in range(pre_len):
        out = recurrent_fn(state, actions[:, step])
        latent = direct[:, step]
        torch.testing.assert_close(out.prior_logits, model.policy_head(latent).unflatten(-1, (2, RATE_LEVELS)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.value, model.value_in_units(model.value_head(latent).squeeze(-1)), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(out.reward, model.reward_in_units(model.reward_head(latent).squeeze(-1)), rtol=1e-4, atol=1e-4)
        state = out.state


@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
def test_planner_search_equals_reference(tiny_windows, tiny_batch, root_selection):
    model = _planner(tiny_windows)
    b = 4
    inputs = [x[:b] for x in tiny_batch.inputs]
    inputs = [x.double() if x.is_floating_point() else x for x in inputs]
    config = MCTSConfig(
        num_simulations=30, num_sampled_actions=3, candidate_levels=4, max_depth=model.pre_len, root_selection=root_selection
    )
    invalid = torch.zeros(b, 2, RATE_LEVELS, dtype=torch.bool)
    invalid[:, :, 150:] = True  # dose limits
    rand = noise(b, config, 10)
    batched = search(*planner_search_fns(model, *inputs), config, invalid, rand)
    assert (batched.tree.depths == model.pre_len).any()  # reached the end of the dynamics
    reference = reference_search_rows(lambda row: planner_search_fns(model, *(x[row : row + 1] for x in inputs)), b, config, invalid, rand)
    same(batched, reference)
    assert (batched.action < 150).all()
