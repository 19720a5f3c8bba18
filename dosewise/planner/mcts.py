"""Batched Monte Carlo tree search over the planner's learned model.

One search runs B independent trees at once on tensors: every simulation selects a path in all
B trees, expands one leaf per tree with ONE call of the model's recurrent inference on the whole
batch, and backs the leaf's value up. There is no Python loop over samples and no host
synchronisation inside the search: Python loops run only over simulations and depths (fixed
ints), every data-dependent choice is a `torch.where` or an argmax. `mcts_reference.py` is the
same search written one sample at a time; the tests hold the two equal.

Reads top to bottom: constants → `MCTSConfig` → the model's interface (`RootOutput`,
`RecurrentOutput`, `RecurrentFn`) → random numbers (`SearchNoise`, `draw_noise`) → the tree and
the result → child sampling, selection, expansion, backup → `search`. The search knows its model
only through these functions; `search_model.py` makes them of the planner.

Shapes: B trees, N = num_simulations + 1 nodes per tree, k = num_sampled_actions children per
node, A levels per drug, 2 drugs, m = candidate_levels, S the shape of an embedded state.

- Actions are joint: one level per drug. A node does not expand all A² joint actions but k of
  them sampled from its policy prior (Sampled MuZero, Hubert et al. 2021), in one of two ways:
  - The root, where the decision is made, gets k DISTINCT joint actions: each drug is
    restricted to its m most probable valid levels, and k pairs of the m² candidates are drawn by
    Gumbel-top-k (without replacement) on the joint log-prior log π_ppf(i) + log π_rftn(j), the
    sample Gumbel MuZero's sequential halving needs. The root children's priors are the softmax
    of their joint log-priors, i.e. the prior renormalised over the sampled set. Approximation:
    pairs outside the m × m candidates are never sampled (their mass is small when m ≫ the
    policy's spread).
  - Every other node draws k joint actions i.i.d. from its prior, Sampled MuZero with β = π:
    each drug's level by inverse transform sampling (the policy factorises over the drugs, so
    this samples the joint prior exactly, with no candidate cut-off). Copies of a joint action
    are merged into its first draw, whose prior is the empirical β̂ = count / k (Sampled MuZero's
    β̂/β · π with β = π); later copies are no children (logit -inf). This needs no sort: two
    `topk` per expansion were a third of the search's time (`bench/mcts.py --profile`).
- Invalid levels ([B, 2, A] bool mask, True = invalid, e.g. dose limits) get zero prior at
  every node and are never expanded nor chosen. Each drug needs at least one valid level.
- Selection: pUCT, score = Q̂ + c_puct · P · √N(node) / (1 + N(child)), Q = r + γ·V(child),
  Q̂ = (Q − min) / (max − min) with MuZero's per-tree min-max statistics (started at the root's
  value, updated with every Q backed up). An unvisited child's Q is its parent's value by
  default (`unvisited_q: parent`, like mctx's default Q transform); with MuZero's pseudocode
  (`unvisited_q: zero`, Q̂ = 0) and few simulations the search stays on the prior's favourite
  path: a visited child with Q̂ near 1 beats an unvisited one until c_puct · P · √N exceeds
  about 1 (N ≈ 160 for P = 1/16).
- `root_selection: gumbel` (Gumbel MuZero, Danihelka et al. 2022) replaces pUCT at the root:
  the root's k children are the Gumbel-top-k sample itself, sequential halving spreads the
  simulations over them, and the final action is the argmax of g + logits + σ(Q̂) among the
  most visited children, with Q completed by the mixed value approximation for unvisited
  children, min-max normalised over the root's children, and σ(q) = (c_visit + max N)·c_scale·q.
  Interior nodes keep pUCT. The final pUCT action is the most visited root child.
- The learned dynamics unrolls only `pre_len` steps: a node at `max_depth` is a leaf evaluated
  by its value and never expanded; a simulation that reaches it again backs its value up again
  (in the batched search, such a row's share of that simulation's model call is discarded).
- Every random number is drawn before the search (`draw_noise`) with the batch as the leading
  axis, so the reference uses exactly the same numbers for its row: same seed, same result.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import Tensor

ROOT_INDEX = 0  # the root is node 0 of every tree
# Fields of `Tree.children_stats`: every child's statistics, kept in its parent's row so that a
# selection step reads one row per tree instead of gathering each child's node.
VISITS, VALUE_SUMS, REWARDS, PRIORS, BARRED = range(5)
CHILD_FIELDS = 5
UNVISITED = -1  # child index of a child that has no node yet; parent of the root / unused nodes
N_DRUGS = 2  # propofol, remifentanil
EPSILON = 1e-8  # smallest min-max range


class MCTSConfig(BaseModel):
    """Settings of the batched search (module docstring)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Simulations per search, each one model call on the whole batch; more = better, slower.
    num_simulations: int = Field(50, ge=1)
    # Joint actions expanded per node (sampled from the prior); more = wider, shallower trees.
    num_sampled_actions: int = Field(16, ge=1)
    # Levels per drug the root's distinct joint actions are sampled from (the m most probable
    # valid ones); candidate_levels² pairs are scored. Must not exceed the levels per drug.
    candidate_levels: int = Field(24, ge=1)
    # Exploration weight of the prior in pUCT; larger = follow the prior longer.
    c_puct: float = Field(1.25, gt=0.0)
    # Q of an unvisited child in pUCT: "parent" = the parent's value (as mctx's default
    # qtransform_by_parent_and_siblings), so the search tries the other sampled actions;
    # "zero" = Q̂ 0, MuZero's pseudocode, which with few simulations follows the prior's path.
    unvisited_q: Literal["parent", "zero"] = "parent"
    # Discount of rewards along a path (per unrolled step).
    gamma: float = Field(0.99, gt=0.0, le=1.0)
    # Deepest node (the dynamics unrolls at most pre_len steps); nodes there are leaves.
    max_depth: int = Field(5, ge=1)
    # How the root picks the child to simulate and the final action: pUCT (most visited child)
    # or Gumbel MuZero (sequential halving; suited to few simulations).
    root_selection: Literal["puct", "gumbel"] = "puct"
    # Scale of the Gumbel noise of the root's sampling; 0 = the root's k most probable pairs.
    gumbel_scale: float = Field(1.0, ge=0.0)
    # σ of Gumbel MuZero: weight (c_visit + max visits) · c_scale of the normalised Q against
    # the logits; larger = trust the search's Q more than the prior.
    c_visit: float = Field(50.0, ge=0.0)
    c_scale: float = Field(1.0, gt=0.0)

    @model_validator(mode="after")
    def _check_sampled(self) -> MCTSConfig:
        if self.num_sampled_actions > self.candidate_levels**2:
            raise ValueError(
                f"num_sampled_actions ({self.num_sampled_actions}) exceeds the candidate pairs "
                f"(candidate_levels² = {self.candidate_levels**2})"
            )
        return self


# -- the model's interface -------------------------------------------------------------------


@dataclass(frozen=True)
class RootOutput:
    """Root inference on B samples."""

    prior_logits: Tensor  # [B, 2, A] unnormalised, per drug
    value: Tensor  # [B] float
    state: Tensor  # [B, *S] embedded state (any dtype)

    def row(self, b: int) -> RootOutput:
        """Sample b alone (batch of one)."""
        return RootOutput(self.prior_logits[b : b + 1], self.value[b : b + 1], self.state[b : b + 1])


@dataclass(frozen=True)
class RecurrentOutput:
    """Recurrent inference: the outcome of one joint action in each of B states."""

    reward: Tensor  # [B] reward of the action (on the edge)
    value: Tensor  # [B] value of the next state
    prior_logits: Tensor  # [B, 2, A] policy in the next state
    state: Tensor  # [B, *S] the next embedded state


# recurrent_fn(state [B, *S], action [B, 2] long) -> RecurrentOutput; row b of the output may
# depend on row b of the inputs only.
RecurrentFn = Callable[[Tensor, Tensor], RecurrentOutput]


# -- random numbers ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SearchNoise:
    """Every random number of a search, drawn up front.

    gumbel[b] is the standard Gumbel noise of the root's candidate pairs in tree b; candidate
    pair (i, j) of the two drugs' top levels is entry i · m + j. Under Gumbel MuZero it is also
    the g of sequential halving. uniform[b, s, d] are the k uniform draws in [0, 1) of drug d's
    levels when the node simulation s creates (node s + 1) is expanded.
    """

    gumbel: Tensor  # [B, m²]
    uniform: Tensor  # [B, num_simulations, 2, k]

    def row(self, b: int) -> SearchNoise:
        return SearchNoise(self.gumbel[b : b + 1], self.uniform[b : b + 1])


def draw_noise(
    batch_size: int,
    config: MCTSConfig,
    generator: torch.Generator | None = None,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str | None = None,
) -> SearchNoise:
    """The random numbers of a search of `batch_size` trees (`SearchNoise`)."""
    root = torch.rand(batch_size, config.candidate_levels**2, generator=generator, dtype=dtype, device=device)
    root.clamp_(min=torch.finfo(dtype).tiny)
    shape = (batch_size, config.num_simulations, N_DRUGS, config.num_sampled_actions)
    uniform = torch.rand(shape, generator=generator, dtype=dtype, device=device)
    return SearchNoise(-torch.log(-torch.log(root)), uniform)


# -- the tree and the result --------------------------------------------------------------------


@dataclass(frozen=True)
class Tree:
    """B search trees as preallocated tensors; nodes are indices 0..N-1 (ROOT_INDEX = 0), node
    s + 1 is created by simulation s (or stays unused, parent UNVISITED, when that simulation
    ended at a node of max depth). The dataclass is frozen; the search fills the tensors in place.
    """

    node_visits: Tensor  # [B, N] float (whole numbers): backups through the node, its own evaluation included
    value_sums: Tensor  # [B, N] float: sum of the backed-up returns; value = sum / visits
    raw_values: Tensor  # [B, N] float: the model's value when the node was evaluated
    rewards: Tensor  # [B, N] float: reward on the edge from the parent (0 at the root)
    depths: Tensor  # [B, N] long: actions from the root
    parents: Tensor  # [B, N] long: parent node, UNVISITED for the root and unused nodes
    states: Tensor  # [B, N, *S]: embedded states
    children_index: Tensor  # [B, N, k] long: node of each sampled child, UNVISITED if none yet
    children_actions: Tensor  # [B, N, k, 2] long: joint action (levels) of each sampled child
    children_logits: Tensor  # [B, N, k] float: joint log-prior at the root, log draw count elsewhere;
    # -inf = invalid / a copy / no child
    children_stats: Tensor  # [B, N, 5, k] float, per child (fields VISITS ... BARRED): its node's
    # visits and value sum (both 0 until it has a node), the reward on its edge, its prior
    # (softmax of children_logits, 0 where -inf), and 0 / -inf where it may / may not be chosen
    min_q: Tensor  # [B] float: smallest Q seen in the tree (min-max normalisation)
    max_q: Tensor  # [B] float: largest Q seen in the tree
    row_offsets: Tensor  # [B] long: b · N, to index the tree's tensors flattened over (B, N)

    @property
    def values(self) -> Tensor:
        """[B, N] mean backed-up value of every node (0 for unused nodes)."""
        return self.value_sums / self.node_visits.clamp(min=1)

    @property
    def children_priors(self) -> Tensor:
        """[B, N, k] float: the children's priors (a view of children_stats)."""
        return self.children_stats[:, :, PRIORS]


@dataclass(frozen=True)
class SearchResult:
    """Outcome of a search over B trees (k = num_sampled_actions root children)."""

    action: Tensor  # [B, 2] long: the chosen joint action (levels)
    chosen: Tensor  # [B] long: its index among the root's children
    children_actions: Tensor  # [B, k, 2] long: the root's sampled joint actions
    valid: Tensor  # [B, k] bool: False for children of invalid levels (never chosen)
    visit_counts: Tensor  # [B, k] long: simulations through each root child
    q_values: Tensor  # [B, k] float: r + γV of visited children; the mixed value for unvisited
    root_value: Tensor  # [B] float: the root's search value (mean backed-up return)
    policy: Tensor  # [B, k] float: improved policy over the root's children; visit distribution
    # under pUCT, softmax(logits + σ(completed Q)) under Gumbel MuZero
    tree: Tree | None = None  # the whole tree (None from the reference)

    @property
    def action_q(self) -> Tensor:
        """[B] Q value (r + γV) of the chosen action."""
        return self.q_values.gather(1, self.chosen.unsqueeze(1)).squeeze(1)


def one_step_q(recurrent_fn: RecurrentFn, state: Tensor, action: Tensor, gamma: float) -> Tensor:
    """[B] Q = r + γ·V(s') of joint actions [B, 2] taken in embedded states [B, *S] (e.g. the
    roots' `RootOutput.state`): the model's one-step estimate, with no search below s'."""
    out = recurrent_fn(state, action)
    return out.reward + gamma * out.value


# -- pieces of the search ---------------------------------------------------------------------


@cache
def considered_visit_sequence(num_considered: int, num_simulations: int) -> tuple[int, ...]:
    """Sequential halving as a sequence of visit counts (Danihelka et al. 2022, Karnin et al. 2013):
    simulation s visits a child whose visit count equals entry s. Phases halve the considered
    children (never below 2); each phase spends about num_simulations / log2(num_considered)
    simulations, at least one visit per considered child."""
    if num_considered <= 1:
        return tuple(range(num_simulations))
    rounds = math.ceil(math.log2(num_considered))
    sequence: list[int] = []
    visits = 0  # visits of each still-considered child
    considered = num_considered
    while len(sequence) < num_simulations:
        for _ in range(max(1, num_simulations // (rounds * considered))):
            sequence += [visits] * considered
            visits += 1
        considered = max(2, considered // 2)
    return tuple(sequence[:num_simulations])


def considered_visit_table(num_sampled: int, num_simulations: int, device=None) -> Tensor:
    """[k + 1, num_simulations] long: row c is `considered_visit_sequence(c, num_simulations)`."""
    rows = [considered_visit_sequence(c, num_simulations) for c in range(num_sampled + 1)]
    return torch.tensor(rows, dtype=torch.long, device=device)  # (compared with float visit counts: exact)


def sample_distinct_children(prior_logits: Tensor, invalid: Tensor, gumbel: Tensor, config: MCTSConfig) -> tuple[Tensor, Tensor, Tensor]:
    """Sample the root's k distinct joint actions per row (module docstring).

    prior_logits [B, 2, A], invalid [B, 2, A] bool, gumbel [B, m²]. Both selections are
    `torch.topk`, which treats every row alike whatever the batch (ties between equal values are
    broken the same way in the reference). Returns actions [B, k, 2] long, their joint
    log-priors [B, k] (-inf where a level is invalid) and their candidate indices [B, k].
    """
    m, k = config.candidate_levels, config.num_sampled_actions
    log_prior = prior_logits.masked_fill(invalid, -math.inf).log_softmax(-1)  # [B, 2, A]
    top_log_prior, top_level = log_prior.topk(m, dim=-1)  # [B, 2, m]
    joint = (top_log_prior[:, 0, :, None] + top_log_prior[:, 1, None, :]).flatten(1)  # [B, m²]
    candidates = (joint + config.gumbel_scale * gumbel).topk(k, dim=-1).indices  # [B, k]
    first, second = _candidate_pairs(m, candidates.device)  # candidate c = i · m + j -> i, j
    rows = candidates.shape[0]
    actions = torch.stack(
        [
            top_level[:, 0].gather(1, first.expand(rows, -1).gather(1, candidates)),
            top_level[:, 1].gather(1, second.expand(rows, -1).gather(1, candidates)),
        ],
        dim=-1,
    )
    return actions, joint.gather(1, candidates), candidates


@dataclass(frozen=True)
class LevelMask:
    """The invalid-level mask in the forms child sampling reads, built once per search."""

    blocked: Tensor  # [B, 2, A] float: 0 where valid, -inf where invalid (added to logits)
    allowed: Tensor  # [B, 2, A] float: 1 where valid, 0 where invalid
    last_valid: Tensor  # [B, 2, 1] long: each drug's highest valid level


def level_mask(invalid: Tensor, dtype: torch.dtype = torch.float32) -> LevelMask:
    """`LevelMask` of invalid [B, 2, A] bool (True = never choose this level). Float masks because
    on CPU a bool masked_fill costs several float adds."""
    valid = ~invalid
    last_valid = (invalid.shape[-1] - 1 - valid.flip(-1).int().argmax(-1, keepdim=True)).long()
    blocked = torch.zeros(invalid.shape, dtype=dtype, device=invalid.device).masked_fill(invalid, -math.inf)
    return LevelMask(blocked=blocked, allowed=valid.to(dtype), last_valid=last_valid)


def sample_iid_children(prior_logits: Tensor, mask: LevelMask, uniform: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Draw k joint actions per row i.i.d. from the prior and merge copies (module docstring).

    prior_logits [B, 2, A], mask of its invalid levels, uniform [B, 2, k] in [0, 1). Returns
    actions [B, k, 2] long, their logits [B, k] (log of the draw count at a joint action's first
    draw, -inf at later copies) and priors [B, k]: β̂ = count / k, exactly (not a softmax, whose
    rounding would break pUCT's ties between equal counts differently from the reference).
    """
    top = (prior_logits + mask.blocked).amax(-1, keepdim=True)  # the largest valid logit
    # exp(logit - top) where valid, 0 where invalid: the prior up to its sum. The clamp touches
    # only invalid levels (valid ones are <= 0), and keeps exp off its slow path for the
    # out-of-range inputs that -inf would be.
    weights = (prior_logits - top).clamp_(max=0.0).exp_().mul_(mask.allowed)
    cdf = weights.cumsum(-1)
    # The first level whose cdf exceeds u · total has positive weight, so it is valid; u · total
    # may round up to total, hence the clamp to the last valid level.
    levels = torch.searchsorted(cdf, uniform * cdf[..., -1:], right=True)  # [B, 2, k]
    actions = torch.minimum(levels, mask.last_valid).transpose(1, 2)  # [B, k, 2]
    joint = actions[..., 0] * prior_logits.shape[-1] + actions[..., 1]  # [B, k]
    copy, count = _merge_copies(joint, prior_logits.dtype)
    logits = torch.where(copy, -math.inf, count.log())
    priors = torch.where(copy, 0.0, count / uniform.shape[-1])
    return actions, logits, priors


def _merge_copies(joint: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor]:
    """Of draws joint [B, k] long: copy [B, k] bool (an earlier draw is the same) and count [B, k]
    (draws equal to this one). A stable sort puts each joint action's draws in a run, its first
    draw first (cheaper than the [B, k, k] comparison's bool reductions)."""
    rows, k = joint.shape
    in_order, order = torch.sort(joint, dim=-1, stable=True)
    starts = torch.ones_like(in_order, dtype=torch.bool)
    starts[:, 1:] = in_order[:, 1:] != in_order[:, :-1]
    run = starts.cumsum(-1)  # [B, k] the run (1..k) of each sorted draw
    ones = torch.ones(rows, k, dtype=dtype, device=joint.device)
    run_length = torch.zeros(rows, k + 1, dtype=dtype, device=joint.device).scatter_add_(1, run, ones)
    copy = torch.empty_like(starts).scatter_(1, order, ~starts)
    count = torch.empty_like(ones).scatter_(1, order, run_length.gather(1, run))
    return copy, count


@cache
def _candidate_pairs(m: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """[1, m²] long each: i and j of candidate i · m + j (gathers are cheaper than integer division)."""
    pairs = torch.arange(m * m, device=device)
    return (pairs // m).unsqueeze(0), (pairs % m).unsqueeze(0)


def _masked_softmax(logits: Tensor) -> Tensor:
    """Softmax over the last axis, -inf = excluded; all zeros (not NaN) where all are -inf."""
    any_valid = (logits > -math.inf).any(-1, keepdim=True)
    return torch.where(any_valid, logits, 0.0).softmax(-1) * any_valid


def _take(values: Tensor, at: Tensor | None) -> Tensor:
    """values [B, N, ...] at one node per tree -> [B, ...]; `at` [B] is that node's flat index
    b · N + node (`_flat`; one index_select instead of an expanded gather), None the root."""
    if at is None:
        return values[:, ROOT_INDEX]
    return values.flatten(0, 1).index_select(0, at)


def _flat(tree: Tree, node: Tensor) -> Tensor:
    """[B] flat index b · N + node of node [B] in tensors [B, N, ...] (for `_take`)."""
    return tree.row_offsets + node


def _children_stats(tree: Tree, at: Tensor | None, gamma: float) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Of the children of one node per tree (`_take`'s `at`), each [B, k]: visited (bool),
    visits, Q = r + γV (meaningless where unvisited), prior, and 0 / -inf (may / may not be
    chosen)."""
    visits, value_sums, rewards, priors, barred = _take(tree.children_stats, at).unbind(1)
    q = rewards + gamma * (value_sums / visits.clamp(min=1))
    return visits > 0, visits, q, priors, barred


def _puct_scores(tree: Tree, at: Tensor | None, low: Tensor, span: Tensor, config: MCTSConfig) -> Tensor:
    """pUCT scores [B, k] of the children of one node per tree (`_take`'s `at`), -inf for invalid
    children. low, span [B, 1]: the tree's min Q and max - min."""
    visited, visits, q, priors, barred = _children_stats(tree, at, config.gamma)
    node_visits = _take(tree.node_visits, at)  # [B]
    if config.unvisited_q == "parent":
        parent_value = _take(tree.value_sums, at) / node_visits.clamp(min=1)  # [B]
        q_hat = (torch.where(visited, q, parent_value.unsqueeze(1)) - low) / span
    else:
        q_hat = torch.where(visited, (q - low) / span, 0.0)
    explore = config.c_puct * priors * node_visits.sqrt().unsqueeze(1) / (1 + visits)
    return q_hat + explore + barred


@dataclass(frozen=True)
class _RootScores:
    visits: Tensor  # [B, k] float
    completed_q: Tensor  # [B, k]: Q where visited, the mixed value elsewhere
    sigma: Tensor  # [B, k]: σ(normalised completed Q)
    score: Tensor  # [B, k]: g + logits + σ, -inf for invalid children


def _gumbel_root_scores(tree: Tree, root_gumbel: Tensor | float, config: MCTSConfig) -> _RootScores:
    """Gumbel MuZero's root quantities; root_gumbel [B, k] is the g of the root's children."""
    visited, visits, q, prior, _ = _children_stats(tree, None, config.gamma)
    logits = tree.children_logits[:, ROOT_INDEX]
    valid = logits > -math.inf
    # Mixed value: (v̂ + ΣN · Σ_visited π·q / Σ_visited π) / (ΣN + 1).
    total_visits = visits.sum(-1)
    visited_prior = torch.where(visited, prior, 0.0)
    prior_mass = visited_prior.sum(-1)
    weighted_q = (visited_prior * torch.where(visited, q, 0.0)).sum(-1) / torch.where(prior_mass > 0, prior_mass, 1.0)
    mixed = (tree.raw_values[:, ROOT_INDEX] + total_visits * weighted_q) / (total_visits + 1)
    completed = torch.where(visited, q, mixed.unsqueeze(1))
    low = torch.where(valid, completed, math.inf).amin(-1, keepdim=True)
    high = torch.where(valid, completed, -math.inf).amax(-1, keepdim=True)
    q_hat = (completed - low) / (high - low).clamp(min=EPSILON)
    sigma = (config.c_visit + visits.amax(-1, keepdim=True)) * config.c_scale * q_hat
    score = torch.where(valid, root_gumbel + logits + sigma, -math.inf)
    return _RootScores(visits, completed, sigma, score)


def _argmax_considered(scores: _RootScores, considered_visit: Tensor) -> Tensor:
    """Argmax [B] of the score among the children visited exactly `considered_visit` [B] times."""
    considered = scores.visits == considered_visit.unsqueeze(1)
    return torch.where(considered, scores.score, -math.inf).argmax(-1)


def _init_tree(root: RootOutput, config: MCTSConfig) -> Tree:
    b, n, k = root.value.shape[0], config.num_simulations + 1, config.num_sampled_actions
    value, device = root.value, root.value.device
    tree = Tree(
        node_visits=value.new_zeros(b, n),
        value_sums=value.new_zeros(b, n),
        raw_values=value.new_zeros(b, n),
        rewards=value.new_zeros(b, n),
        depths=torch.zeros(b, n, dtype=torch.long, device=device),
        parents=torch.full((b, n), UNVISITED, dtype=torch.long, device=device),
        states=root.state.new_empty((b, n, *root.state.shape[1:])),  # written before read
        children_index=torch.full((b, n, k), UNVISITED, dtype=torch.long, device=device),
        children_actions=torch.zeros(b, n, k, N_DRUGS, dtype=torch.long, device=device),
        children_logits=value.new_full((b, n, k), -math.inf),
        children_stats=value.new_zeros(b, n, CHILD_FIELDS, k),
        min_q=value.clone(),
        max_q=value.clone(),
        row_offsets=torch.arange(b, device=device) * n,
    )
    tree.node_visits[:, ROOT_INDEX] = 1
    tree.value_sums[:, ROOT_INDEX] = value
    tree.raw_values[:, ROOT_INDEX] = value
    tree.states[:, ROOT_INDEX] = root.state
    return tree


def _write_children(
    tree: Tree, node: int, actions: Tensor, logits: Tensor, priors: Tensor | None = None, keep: Tensor | None = None
) -> None:
    """Store the sampled children (actions [B, k, 2], logits [B, k], priors [B, k]; None: the
    softmax of the logits) of node `node` of every tree; rows where `keep` [B] is False get no
    valid child."""
    if priors is None:
        priors = _masked_softmax(logits)
    if keep is not None:
        logits = torch.where(keep.unsqueeze(1), logits, -math.inf)
        priors = torch.where(keep.unsqueeze(1), priors, 0.0)
    tree.children_actions[:, node] = actions
    tree.children_logits[:, node] = logits
    tree.children_stats[:, node, PRIORS] = priors
    tree.children_stats[:, node, BARRED] = torch.where(logits > -math.inf, 0.0, -math.inf)


# -- the search ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Selection:
    """Where one simulation's descent ended, in every tree."""

    path: Tensor  # [B, D+1] long: node at each depth from the root (meaningful up to the end)
    slots: Tensor  # [B, D] long: the child taken at each depth, path[d+1] = child slots[d] of path[d]
    node: Tensor  # [B] long: the last node reached (the parent of the expansion, if any)
    slot: Tensor  # [B] long: which child of `node` to expand (where expand)
    expand: Tensor  # [B] bool: ended at an unexpanded child; False: at a node of max depth


def _select(tree: Tree, config: MCTSConfig, root_child: Tensor, low: Tensor, span: Tensor) -> _Selection:
    """Descend from the root (its child root_child [B] first, then by pUCT; low, span [B, 1]: the
    tree's min Q and range) until an unexpanded child or a node of max depth.

    A row that reaches an unexpanded child stays at its node for the remaining depths: nothing
    changes during a descent, so pUCT there keeps choosing that child (a row stopped at the root
    keeps root_child, which under Gumbel selection is not pUCT's choice). The last depth's choice
    is thus every row's expansion, with no per-row bookkeeping.
    """
    k = tree.children_index.shape[-1]
    children = tree.children_index.view(-1)  # flat over (B, N, k)
    node, at, chosen = torch.zeros_like(root_child), tree.row_offsets, root_child  # at the root
    path, slots = [node], []
    for depth in range(config.max_depth):
        if depth > 0:
            chosen = _puct_scores(tree, at, low, span, config).argmax(-1)
            if config.root_selection == "gumbel":
                chosen = torch.where(node == ROOT_INDEX, root_child, chosen)
        child = children.index_select(0, at * k + chosen)
        unexpanded = child == UNVISITED
        node = torch.where(unexpanded, node, child)
        at = _flat(tree, node)
        slots.append(chosen)
        path.append(node)
    return _Selection(torch.stack(path, 1), torch.stack(slots, 1), node, chosen, unexpanded)


def _model_inputs(tree: Tree, selection: _Selection) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The recurrent call's inputs: the state [B, *S] and joint action [B, 2] of the selected
    child's parent (rows that ended at a max-depth node: the root's first child, any valid input,
    whose output is discarded), and that parent's flat edge index [B] (node · k + slot) and the
    child's depth [B]."""
    b, n_nodes, k = tree.children_index.shape
    expand = selection.expand
    source = torch.where(expand, selection.node, ROOT_INDEX)
    edge = source * k + torch.where(expand, selection.slot, 0)  # [B] flat (node, slot)
    action = tree.children_actions.view(b, n_nodes * k, N_DRUGS).gather(1, edge.view(b, 1, 1).expand(b, 1, N_DRUGS))
    state = tree.states.flatten(0, 1).index_select(0, _flat(tree, source))
    depth = tree.depths.gather(1, source.unsqueeze(1)).squeeze(1) + 1
    return state, action.squeeze(1), edge, depth


def _store(
    tree: Tree,
    selection: _Selection,
    new: int,
    out: RecurrentOutput,
    edge: Tensor,
    depth: Tensor,
    mask: LevelMask,
    uniform: Tensor,
    config: MCTSConfig,
) -> None:
    """Store the model's output for the selected children as node `new` and sample its children
    (uniform [B, 2, k]); rows that did not expand leave node `new` unused."""
    b, n_nodes, k = tree.children_index.shape
    expand = selection.expand
    tree.states[:, new] = out.state
    reward = torch.where(expand, out.reward.to(tree.rewards.dtype), 0.0)
    tree.rewards[:, new] = reward
    tree.raw_values[:, new] = torch.where(expand, out.value.to(tree.rewards.dtype), 0.0)
    tree.depths[:, new] = torch.where(expand, depth, 0)
    tree.parents[:, new] = torch.where(expand, selection.node, UNVISITED)
    actions, logits, priors = sample_iid_children(out.prior_logits, mask, uniform)
    _write_children(tree, new, actions, logits, priors, expand & (depth < config.max_depth))
    # Link the new node to its parent and put its reward on the edge; rows that did not expand
    # write UNVISITED and 0 into the unused new node's first slot.
    tree.children_index.view(b, n_nodes * k).scatter_(
        1, torch.where(expand, edge, new * k).unsqueeze(1), torch.where(expand, new, UNVISITED).unsqueeze(1)
    )
    row = CHILD_FIELDS * k  # one node's children_stats, flat
    cell = torch.where(expand, selection.node * row + selection.slot, new * row) + REWARDS * k
    tree.children_stats.view(b, -1).scatter_(1, cell.unsqueeze(1), reward.unsqueeze(1))


def _backup(tree: Tree, selection: _Selection, new: int, new_depth: Tensor, config: MCTSConfig) -> None:
    """Back the leaf's value up the path: every node on it gets one visit and the discounted
    return G (G ← r + γG from the leaf up); the tree's min-max statistics see every updated Q."""
    gamma, max_depth = config.gamma, config.max_depth
    leaf = torch.where(selection.expand, new, selection.node)
    leaf_depth = torch.where(selection.expand, new_depth, max_depth)
    path = selection.path.scatter(1, leaf_depth.unsqueeze(1), leaf.unsqueeze(1))  # [B, D+1]
    depth_range = torch.arange(max_depth + 1, device=path.device)
    on_path = depth_range <= leaf_depth.unsqueeze(1)  # [B, D+1]
    path_rewards = tree.rewards.gather(1, path)
    rewards_at, on_path_at = path_rewards.unbind(1), on_path.unbind(1)
    ret = tree.raw_values.gather(1, leaf.unsqueeze(1)).squeeze(1)
    backed_up = [ret]  # G backed up into each node of the path, from depth D down to 0
    for depth in range(max_depth, 0, -1):
        ret = torch.where(on_path_at[depth], rewards_at[depth] + gamma * ret, ret)
        backed_up.append(ret)
    returns = torch.stack(backed_up[::-1], dim=1)  # [B, D+1]
    tree.node_visits.scatter_add_(1, path, on_path.to(tree.node_visits.dtype))  # off the path: + 0
    tree.value_sums.scatter_add_(1, path, torch.where(on_path, returns, 0.0))
    # The same into the parents' rows: the edge into depth d + 1 is child slots[d] of path[d].
    k = tree.children_index.shape[-1]
    cells = path[:, :-1] * (CHILD_FIELDS * k) + selection.slots  # [B, D] field VISITS
    stats, entered = tree.children_stats.view(path.shape[0], -1), on_path[:, 1:]
    stats.scatter_add_(1, cells + VISITS * k, entered.to(stats.dtype))
    stats.scatter_add_(1, cells + VALUE_SUMS * k, torch.where(entered, returns[:, 1:], 0.0))
    q = path_rewards + gamma * (tree.value_sums.gather(1, path) / tree.node_visits.gather(1, path).clamp(min=1))
    on_edge = on_path & (depth_range >= 1)
    torch.minimum(tree.min_q, torch.where(on_edge, q, math.inf).amin(1), out=tree.min_q)
    torch.maximum(tree.max_q, torch.where(on_edge, q, -math.inf).amax(1), out=tree.max_q)


@torch.no_grad()
def search(
    root: RootOutput,
    recurrent_fn: RecurrentFn,
    config: MCTSConfig,
    invalid_actions: Tensor | None = None,
    noise: SearchNoise | None = None,
    generator: torch.Generator | None = None,
) -> SearchResult:
    """Run `config.num_simulations` simulations in B trees at once (module docstring).

    root: root inference on B samples; recurrent_fn: the model's recurrent inference, called
    once per simulation on all B trees (never on a state of max depth).
    invalid_actions [B, 2, A] bool, True = never choose this level (None: all valid).
    noise: the random numbers (`draw_noise`); None draws them from `generator` (None: torch's
    default generator) in the dtype of root.value.
    """
    b, n_drugs, levels = root.prior_logits.shape
    if n_drugs != N_DRUGS:
        raise ValueError(f"prior_logits must be [B, {N_DRUGS}, A], got {tuple(root.prior_logits.shape)}")
    if config.candidate_levels > levels:
        raise ValueError(f"candidate_levels ({config.candidate_levels}) exceeds the {levels} levels per drug")
    device = root.value.device
    if invalid_actions is None:
        invalid_actions = torch.zeros(b, N_DRUGS, levels, dtype=torch.bool, device=device)
    if noise is None:
        noise = draw_noise(b, config, generator, root.value.dtype, device)
    for name, expected in (
        ("gumbel", (b, config.candidate_levels**2)),
        ("uniform", (b, config.num_simulations, N_DRUGS, config.num_sampled_actions)),
    ):
        if tuple(getattr(noise, name).shape) != expected:
            raise ValueError(f"noise.{name} must be {list(expected)} (draw_noise with this config), got {list(getattr(noise, name).shape)}")
    gumbel, uniform = noise.gumbel.to(root.value.dtype), noise.uniform.to(root.value.dtype)

    mask = level_mask(invalid_actions, root.value.dtype)
    tree = _init_tree(root, config)
    actions, logits, root_candidates = sample_distinct_children(root.prior_logits, invalid_actions, gumbel, config)
    _write_children(tree, ROOT_INDEX, actions, logits)
    root_gumbel = None
    if config.root_selection == "gumbel":
        root_gumbel = config.gumbel_scale * gumbel.gather(1, root_candidates)  # [B, k]
        num_considered = (tree.children_logits[:, ROOT_INDEX] > -math.inf).sum(-1)  # [B]
        considered = considered_visit_table(config.num_sampled_actions, config.num_simulations, device)

    for sim in range(config.num_simulations):
        considered_visit = None if root_gumbel is None else considered[num_considered, sim]
        _simulate(tree, sim + 1, recurrent_fn, mask, uniform[:, sim], root_gumbel, considered_visit, config)

    return _result(tree, config, root_gumbel)


def _simulate(
    tree: Tree,
    new: int,
    recurrent_fn: RecurrentFn,
    mask: LevelMask,
    uniform: Tensor,
    root_gumbel: Tensor | None,
    considered_visit: Tensor | None,
    config: MCTSConfig,
) -> None:
    """One simulation in every tree: choose the root's child (pUCT, or under Gumbel MuZero the
    best child with `considered_visit` [B] visits), descend, evaluate the selected children with
    ONE call of recurrent_fn on all trees, store them as node `new` (the simulation's number + 1;
    unused where the descent ends at a max-depth node) and back up."""
    low, span = tree.min_q.unsqueeze(1), (tree.max_q - tree.min_q).clamp(min=EPSILON).unsqueeze(1)
    if root_gumbel is None:
        root_child = _puct_scores(tree, None, low, span, config).argmax(-1)
    else:  # sequential halving: the best child among those with the scheduled visit count
        root_child = _argmax_considered(_gumbel_root_scores(tree, root_gumbel, config), considered_visit)
    selection = _select(tree, config, root_child, low, span)
    state, action, edge, depth = _model_inputs(tree, selection)
    out = recurrent_fn(state, action)
    _store(tree, selection, new, out, edge, depth, mask, uniform, config)
    _backup(tree, selection, new, depth, config)


def _result(tree: Tree, config: MCTSConfig, root_gumbel: Tensor | None) -> SearchResult:
    scores = _gumbel_root_scores(tree, root_gumbel if root_gumbel is not None else 0.0, config)
    valid = tree.children_logits[:, ROOT_INDEX] > -math.inf
    visits = scores.visits
    if root_gumbel is None:  # pUCT: the most visited child, the visit distribution
        chosen = visits.argmax(-1)
        policy = visits / visits.sum(-1, keepdim=True).clamp(min=1)
    else:  # Gumbel MuZero: the best survivor of sequential halving, softmax(logits + σ)
        chosen = _argmax_considered(scores, visits.amax(-1))
        policy = _masked_softmax(torch.where(valid, tree.children_logits[:, ROOT_INDEX] + scores.sigma, -math.inf))
    children_actions = tree.children_actions[:, ROOT_INDEX]
    return SearchResult(
        action=children_actions.gather(1, chosen.view(-1, 1, 1).expand(-1, 1, N_DRUGS)).squeeze(1),
        chosen=chosen,
        children_actions=children_actions,
        valid=valid,
        visit_counts=visits.long(),
        q_values=scores.completed_q,
        root_value=tree.values[:, ROOT_INDEX],
        policy=policy,
        tree=tree,
    )
