"""The batched MCTS (`dosewise.planner.mcts`): hand-made models with a known best action (a bandit,
chains where the greedy first step is wrong) under pUCT and Gumbel MuZero, dose limits, max
depth, independence of batch rows, seeding, and equality with the one-sample reference."""

from __future__ import annotations

import math

import pytest
import torch

from dosewise.planner.mcts import (
    UNVISITED,
    MCTSConfig,
    RecurrentOutput,
    RootOutput,
    SearchNoise,
    considered_visit_sequence,
    draw_noise,
    level_mask,
    sample_iid_children,
    search,
)
from dosewise.planner.mcts_reference import reference_search_rows

F64 = torch.float64


# -- hand-made models ----------------------------------------------------------------------------


def bandit(targets: torch.Tensor, levels: int) -> tuple[RootOutput, callable]:
    """One step: reward 1 at the row's target pair, 0 elsewhere. The prior peaks one level above
    the target on both drugs, so the prior's favourite is wrong."""
    b = targets.shape[0]
    grid = torch.arange(levels, dtype=F64)
    prior = -0.5 * (grid - (targets.unsqueeze(-1) + 1).to(F64)) ** 2  # [B, 2, A]
    root = RootOutput(prior_logits=prior, value=torch.zeros(b, dtype=F64), state=targets.to(F64))

    def recurrent_fn(state, action):
        reward = (action.to(F64) == state).all(-1).to(F64)
        return RecurrentOutput(reward, torch.zeros_like(reward), torch.zeros(len(state), 2, levels, dtype=F64), state)

    return root, recurrent_fn


GOOD, GREEDY = 1, 5  # propofol levels of the chain's best and greedy first steps


def chain(b: int, levels: int, good_value: float) -> tuple[RootOutput, callable]:
    """State (depth, good). First step: propofol level GREEDY pays 1 now and leads to a bad state
    (0 forever), level GOOD pays 0 and leads to a good state (1 per later step), others pay 0.3
    and lead to the bad state. The root prior favours GREEDY (remifentanil: level 0, so that
    every propofol level is among the sampled pairs). Value: good_value in good states, else 0."""
    prior = torch.zeros(b, 2, levels, dtype=F64)
    prior[:, 0, GREEDY], prior[:, 0, GOOD], prior[:, 1, 0] = 1.0, 0.5, 6.0
    root = RootOutput(prior_logits=prior, value=torch.zeros(b, dtype=F64), state=torch.zeros(b, 2, dtype=F64))

    def recurrent_fn(state, action):
        first = state[:, 0] == 0
        level = action[:, 0]
        reward_first = torch.where(level == GREEDY, 1.0, torch.where(level == GOOD, 0.0, 0.3)).to(F64)
        good = torch.where(first, (level == GOOD).to(F64), state[:, 1])
        reward = torch.where(first, reward_first, state[:, 1])
        value = good_value * good
        uniform = torch.zeros(len(state), 2, levels, dtype=F64)
        return RecurrentOutput(reward, value, uniform, torch.stack([state[:, 0] + 1, good], dim=1))

    return root, recurrent_fn


class RandomModel:
    """A tiny random MLP in float64: state h [B, H], h' = tanh(h W + E_ppf[a0] + E_rftn[a1]),
    linear reward, value and policy heads."""

    def __init__(self, levels: int, hidden: int = 8, seed: int = 0) -> None:
        g = torch.Generator().manual_seed(seed)
        self.levels, self.hidden = levels, hidden
        self.w = torch.randn(hidden, hidden, generator=g, dtype=F64) / math.sqrt(hidden)
        self.embed = torch.randn(2, levels, hidden, generator=g, dtype=F64)
        self.w_policy = torch.randn(hidden, 2 * levels, generator=g, dtype=F64)
        self.w_reward = torch.randn(hidden, generator=g, dtype=F64)
        self.w_value = torch.randn(hidden, generator=g, dtype=F64)

    def root(self, b: int, seed: int) -> RootOutput:
        h = torch.randn(b, self.hidden, generator=torch.Generator().manual_seed(seed), dtype=F64)
        return RootOutput((h @ self.w_policy).view(b, 2, self.levels), h @ self.w_value, h)

    def __call__(self, state, action) -> RecurrentOutput:
        h = torch.tanh(state @ self.w + self.embed[0][action[:, 0]] + self.embed[1][action[:, 1]])
        return RecurrentOutput(h @ self.w_reward, h @ self.w_value, (h @ self.w_policy).view(-1, 2, self.levels), h)


def random_mask(b: int, levels: int, seed: int) -> torch.Tensor:
    """[B, 2, A] invalid levels: ~30 % random; row 0 keeps a single valid propofol level and
    two remifentanil levels (fewer valid pairs than sampled children)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(b, 2, levels, generator=g) < 0.3
    mask[:, :, 0] = False
    mask[0] = True
    mask[0, 0, 3], mask[0, 1, 2], mask[0, 1, 7] = False, False, False
    return mask


def noise(b: int, config: MCTSConfig, seed: int) -> SearchNoise:
    return draw_noise(b, config, torch.Generator().manual_seed(seed), dtype=F64)


def same(a, b) -> None:
    """Exact equality of decisions, closeness of values."""
    for name in ("action", "chosen", "children_actions", "valid", "visit_counts"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    for name in ("q_values", "root_value", "policy"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-9, atol=1e-9)


# -- tests -----------------------------------------------------------------------------------------


def test_sequential_halving_schedule():
    """Danihelka et al. 2022: 8 children and 24 simulations = 8 × log2(8)."""
    assert considered_visit_sequence(8, 24) == (0,) * 8 + (1,) * 4 + (2,) * 4 + (3, 3, 4, 4, 5, 5, 6, 6)
    assert considered_visit_sequence(7, 24) == (0,) * 7 + (1, 1, 1, 2, 2, 2) + (3, 3, 4, 4, 5, 5, 6, 6, 7, 7, 8)
    assert considered_visit_sequence(8, 13) == (0,) * 8 + (1,) * 4 + (2,)
    assert considered_visit_sequence(1, 5) == considered_visit_sequence(0, 5) == (0, 1, 2, 3, 4)


def test_config_is_frozen_and_strict():
    config = MCTSConfig()
    assert (config.num_simulations, config.num_sampled_actions, config.max_depth) == (50, 16, 5)
    with pytest.raises(ValueError):
        MCTSConfig(unknown=1)
    with pytest.raises(ValueError):
        MCTSConfig(candidate_levels=3, num_sampled_actions=10)
    with pytest.raises(ValueError):
        config.c_puct = 2.0


@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
def test_bandit_finds_the_best_joint_action(root_selection):
    levels = 11
    targets = torch.tensor([[2, 7], [5, 5], [8, 1], [0, 9]])
    root, fn = bandit(targets, levels)
    config = MCTSConfig(candidate_levels=5, max_depth=1, root_selection=root_selection)
    result = search(root, fn, config, noise=noise(len(targets), config, 0))
    assert (result.children_actions == targets.unsqueeze(1)).all(-1).any(-1).all()  # the best was sampled
    assert torch.equal(result.action, targets)
    assert torch.allclose(result.action_q, torch.ones(len(targets), dtype=F64))
    assert torch.equal(result.visit_counts.sum(-1), torch.full((len(targets),), 50))


@pytest.mark.parametrize(("root_selection", "sims"), [("puct", 50), ("gumbel", 16)])
def test_chain_where_the_greedy_step_is_wrong(root_selection, sims):
    """The value of the good state (0.6) alone still favours the greedy step (Q 1 > 0.99 · 0.6):
    only looking further ahead shows the good state's rewards; a depth-1 search takes the greedy
    step. Gumbel MuZero gets there with fewer simulations."""
    root, fn = chain(4, levels=7, good_value=0.6)
    config = MCTSConfig(num_simulations=sims, num_sampled_actions=8, candidate_levels=7, max_depth=3, root_selection=root_selection)
    result = search(root, fn, config, noise=noise(4, config, 1))
    assert (result.children_actions[..., 0] == GREEDY).any(-1).all()  # the greedy step was an option
    assert (result.action[:, 0] == GOOD).all()
    assert (result.action_q > 1.5).all()
    shallow = config.model_copy(update={"max_depth": 1})
    assert (search(root, fn, shallow, noise=noise(4, shallow, 1)).action[:, 0] == GREEDY).all()


def test_interior_children_are_iid_draws_from_the_prior():
    """Inverse transform sampling draws each drug's level with its prior probability (20000
    draws, within 4 standard errors), never an invalid level, even for u just below 1; copies
    of a joint action merge into its first draw with prior count / k."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 2, 9, generator=g, dtype=F64)
    invalid = torch.zeros(1, 2, 9, dtype=torch.bool)
    invalid[0, 0, [2, 8]] = invalid[0, 1, 0] = True
    draws = 20000
    actions, _, _ = sample_iid_children(logits, level_mask(invalid, F64), torch.rand(1, 2, draws, generator=g, dtype=F64))
    prob = logits.masked_fill(invalid, -math.inf).softmax(-1)[0]
    for drug in range(2):
        frequency = torch.bincount(actions[0, :, drug], minlength=9).to(F64) / draws
        assert (frequency[invalid[0, drug]] == 0).all()
        assert ((frequency - prob[drug]).abs() <= 4 * (prob[drug] * (1 - prob[drug]) / draws).sqrt() + 1e-12).all()
    top = torch.full((1, 2, 3), 1 - 2**-53, dtype=F64)  # rounds u · total up to total
    assert torch.equal(sample_iid_children(logits, level_mask(invalid, F64), top)[0][0], torch.tensor([[7, 8]] * 3))

    uniform = torch.tensor([[[0.1, 0.1, 0.9, 0.1], [0.1, 0.1, 0.1, 0.1]]], dtype=F64)
    actions, child_logits, priors = sample_iid_children(logits, level_mask(invalid, F64), uniform)
    assert torch.equal(actions[0, 0], actions[0, 1]) and torch.equal(actions[0, 0], actions[0, 3])
    assert torch.equal(priors[0], torch.tensor([0.75, 0.0, 0.25, 0.0], dtype=F64))
    torch.testing.assert_close(child_logits.softmax(-1), priors)


def test_child_sampling_ignores_invalid_logits_and_merges_copies_like_a_count():
    """An invalid level's logit, however large or small, changes nothing (no overflow, no NaN; a
    draw of u = 0 skips an invalid first level); the sort-based merge of copies equals counting
    equal draws pairwise."""
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(64, 2, 7, generator=g)
    invalid = torch.rand(64, 2, 7, generator=g) < 0.4
    invalid[:, :, 3] = False
    invalid[:, :, 0] = True
    uniform = torch.rand(64, 2, 16, generator=g)
    uniform[:, :, 0] = 0.0
    mask = level_mask(invalid)
    expected = sample_iid_children(logits, mask, uniform)
    for wild in (1e4, -1e4, 0.0):
        got = sample_iid_children(logits.masked_fill(invalid, wild), mask, uniform)
        for a, b in zip(got, expected):
            assert torch.equal(a, b)
    actions, child_logits, priors = expected
    assert not invalid.gather(2, actions.transpose(1, 2)).any()
    joint = actions[..., 0] * 7 + actions[..., 1]
    same = joint.unsqueeze(2) == joint.unsqueeze(1)
    copy = same.tril(-1).any(-1)
    assert copy.any() and torch.equal(child_logits == -math.inf, copy)
    assert torch.equal(priors, torch.where(copy, 0.0, same.sum(-1) / 16.0))


@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
def test_invalid_levels_are_never_chosen(root_selection):
    levels = 11
    targets = torch.tensor([[2, 7], [5, 5], [8, 1]])
    root, fn = bandit(targets, levels)
    invalid = torch.zeros(3, 2, levels, dtype=torch.bool)
    invalid[0, 0, 3:5] = True  # the prior's favourite propofol level and the next one
    invalid[1, 1, 6:] = True  # remifentanil above 5, the prior's favourite included
    invalid[2, 0, :8] = invalid[2, 0, 9:] = True  # propofol 8 only
    config = MCTSConfig(candidate_levels=5, max_depth=1, root_selection=root_selection)
    result = search(root, fn, config, invalid, noise=noise(3, config, 3))
    assert torch.equal(result.action, targets)

    model = RandomModel(levels=13)
    mask = random_mask(5, 13, seed=4)
    config = MCTSConfig(num_simulations=40, num_sampled_actions=8, candidate_levels=6, max_depth=3, root_selection=root_selection)
    result = search(model.root(5, 5), model, config, mask, noise=noise(5, config, 6))
    tree = result.tree
    valid = tree.children_logits > -math.inf  # [B, N, k]
    levels_invalid = torch.stack(
        [mask[:, d].gather(1, tree.children_actions[..., d].flatten(1)).view_as(valid) for d in range(2)], dim=-1
    ).any(-1)
    assert not (valid & levels_invalid).any()
    assert not (tree.children_index != UNVISITED)[~valid].any()
    assert not mask[torch.arange(5).unsqueeze(1), torch.arange(2), result.action].any()
    assert (result.valid.sum(-1)[0] == 2) and (result.visit_counts[0][~result.valid[0]] == 0).all()


def test_max_depth_nodes_are_leaves():
    model = RandomModel(levels=13)
    config = MCTSConfig(num_simulations=60, num_sampled_actions=2, candidate_levels=4, max_depth=2)
    tree = search(model.root(3, 0), model, config, noise=noise(3, config, 0)).tree
    used = tree.parents != UNVISITED
    assert (tree.depths[used] <= 2).all() and (tree.depths[used] == 2).any()
    assert (tree.children_logits[tree.depths == 2] == -math.inf).all()
    assert (~used[:, 1:]).any()  # some simulations ended at a max-depth node and created nothing
    assert (tree.node_visits[:, 0] == 61).all()


@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
def test_search_needs_no_host_synchronisation(root_selection):
    """Tensors on the meta device have shapes but no data: a search that runs on them reads no
    value on the host (no .item(), no `if tensor`, no data-dependent Python control flow)."""
    model = RandomModel(levels=13)
    root = model.root(4, 0)
    for name in ("w", "embed", "w_policy", "w_reward", "w_value"):
        setattr(model, name, getattr(model, name).to("meta"))
    root = RootOutput(*(x.to("meta") for x in (root.prior_logits, root.value, root.state)))
    config = MCTSConfig(num_simulations=10, num_sampled_actions=8, candidate_levels=6, max_depth=3, root_selection=root_selection)
    result = search(root, model, config, torch.zeros(4, 2, 13, dtype=torch.bool, device="meta"))
    assert result.action.is_meta and result.action.shape == (4, 2) and result.visit_counts.shape == (4, 8)


@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
def test_batch_rows_never_influence_each_other(root_selection):
    model = RandomModel(levels=13)
    config = MCTSConfig(num_simulations=30, num_sampled_actions=8, candidate_levels=6, max_depth=3, root_selection=root_selection)
    root, mask, rand = model.root(5, 7), random_mask(5, 13, 8), noise(5, config, 9)
    before = search(root, model, config, mask, rand)
    changed_root = RootOutput(root.prior_logits.clone(), root.value.clone(), root.state.clone())
    changed_root.prior_logits[0] = torch.randn(2, 13, dtype=F64)
    changed_root.value[0] += 5.0
    changed_root.state[0] = torch.randn(8, dtype=F64)
    changed_mask, changed_gumbel, changed_uniform = mask.clone(), rand.gumbel.clone(), rand.uniform.clone()
    changed_mask[0] = False
    changed_gumbel[0] = torch.randn_like(changed_gumbel[0])
    changed_uniform[0] = torch.rand_like(changed_uniform[0])
    after = search(changed_root, model, config, changed_mask, SearchNoise(changed_gumbel, changed_uniform))
    assert not torch.equal(after.visit_counts[0], before.visit_counts[0])
    for name in ("action", "children_actions", "visit_counts", "q_values", "root_value", "policy"):
        assert torch.equal(getattr(after, name)[1:], getattr(before, name)[1:]), name


def test_same_seed_same_result():
    model = RandomModel(levels=13)
    config = MCTSConfig(num_simulations=20, num_sampled_actions=8, candidate_levels=6, max_depth=3)
    runs = [search(model.root(4, 0), model, config, generator=torch.Generator().manual_seed(s)) for s in (3, 3, 4)]
    same(runs[0], runs[1])
    assert not torch.equal(runs[0].children_actions, runs[2].children_actions)
    with pytest.raises(ValueError, match="noise"):  # noise drawn for another configuration
        search(model.root(4, 0), model, config, noise=noise(4, config.model_copy(update={"num_simulations": 5}), 0))


@pytest.mark.parametrize("unvisited_q", ["parent", "zero"])
@pytest.mark.parametrize("root_selection", ["puct", "gumbel"])
@pytest.mark.parametrize(("sims", "k", "m", "depth", "scale"), [(40, 8, 6, 3, 1.0), (25, 4, 3, 2, 0.5), (12, 6, 13, 5, 0.0)])
def test_batched_equals_reference(root_selection, unvisited_q, sims, k, m, depth, scale):
    b, levels = 6, 13
    model = RandomModel(levels, seed=sims)
    config = MCTSConfig(
        num_simulations=sims,
        num_sampled_actions=k,
        candidate_levels=m,
        max_depth=depth,
        root_selection=root_selection,
        gumbel_scale=scale,
        unvisited_q=unvisited_q,
    )
    root, mask, rand = model.root(b, sims + 1), random_mask(b, levels, sims + 2), noise(b, config, sims + 3)
    batched = search(root, model, config, mask, rand)
    reference = reference_search_rows(lambda row: (root.row(row), model), b, config, mask, rand)
    same(batched, reference)
