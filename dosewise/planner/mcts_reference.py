"""The search of `mcts.py`, one sample at a time, in plain Python: the readable reference.

Nodes are Python objects, statistics Python floats, and the model is called with batch size one.
It makes the same decisions as the batched `mcts.search` given the same random numbers (the
row of `SearchNoise` for that sample): the tests hold the two equal, the benchmark times both.
See `mcts.py` for the algorithm; every step below is written the way its docstring says.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor

from dosewise.planner.mcts import (
    EPSILON,
    MCTSConfig,
    RecurrentFn,
    RootOutput,
    SearchNoise,
    SearchResult,
    considered_visit_sequence,
)


@dataclass
class Node:
    depth: int
    state: Tensor  # [1, *S]
    reward: float  # on the edge from the parent
    raw_value: float  # the model's value of the node
    visits: int = 0
    value_sum: float = 0.0
    actions: list[tuple[int, int]] = field(default_factory=list)  # sampled joint actions
    logits: list[float] = field(default_factory=list)  # their joint log-priors (-inf: invalid)
    priors: list[float] = field(default_factory=list)
    candidates: list[int] = field(default_factory=list)  # the root only: candidate indices i · m + j
    children: list[Node | None] = field(default_factory=list)

    def value(self) -> float:
        return self.value_sum / self.visits


def sample_distinct_children(prior_logits: Tensor, invalid: Tensor, gumbel: Tensor, config: MCTSConfig) -> dict:
    """The root's k joint actions: prior_logits [2, A], invalid [2, A] bool, gumbel [m²].
    Each drug's m most probable valid levels, then the k best candidate pairs (i, j) by joint
    log-prior + scaled Gumbel noise; priors are the softmax of the k joint log-priors."""
    m, k = config.candidate_levels, config.num_sampled_actions
    log_prior = prior_logits.masked_fill(invalid, -math.inf).log_softmax(-1)  # [2, A]
    top_log_prior, top_level = log_prior.topk(m)  # [2, m] each drug's m best levels
    joint = top_log_prior[0][:, None] + top_log_prior[1][None, :]  # [m, m] log π(i) + log π(j)
    chosen = (joint.flatten() + config.gumbel_scale * gumbel).topk(k).indices.tolist()  # candidate i · m + j
    logits = [joint[c // m, c % m].item() for c in chosen]
    best = max(logits)
    exps = [math.exp(x - best) for x in logits]
    return {
        "actions": [(top_level[0, c // m].item(), top_level[1, c % m].item()) for c in chosen],
        "logits": logits,
        "priors": [e / sum(exps) for e in exps],
        "candidates": chosen,
    }


def sample_iid_children(prior_logits: Tensor, invalid: Tensor, uniform: Tensor) -> dict:
    """k joint actions of a non-root node drawn i.i.d. from its prior: prior_logits [2, A],
    invalid [2, A] bool, uniform [2, k]. Draw i of drug d is the first level whose cumulative
    (unnormalised) prior exceeds uniform[d, i] · total (at most the last valid level); copies of
    a joint action count towards its first draw, whose prior is count / k."""
    masked = prior_logits.masked_fill(invalid, -math.inf)
    cdf = (masked - masked.amax(-1, keepdim=True)).exp().cumsum(-1)  # [2, A] unnormalised
    levels = torch.searchsorted(cdf, uniform * cdf[:, -1:], right=True).tolist()  # [2][k]
    last_valid = [int((~invalid[d]).nonzero().max()) for d in range(2)]
    counts: dict[tuple[int, int], int] = {}
    draws = []
    for i in range(uniform.shape[1]):
        draw = (min(levels[0][i], last_valid[0]), min(levels[1][i], last_valid[1]))
        draws.append(draw)
        counts[draw] = counts.get(draw, 0) + 1
    first = {}
    for i, draw in enumerate(draws):
        first.setdefault(draw, i)
    logits = [math.log(counts[draw]) if first[draw] == i else -math.inf for i, draw in enumerate(draws)]
    total = sum(counts.values())
    return {
        "actions": draws,
        "logits": logits,
        "priors": [counts[draw] / total if first[draw] == i else 0.0 for i, draw in enumerate(draws)],
    }


class ReferenceSearch:
    """One tree; `run()` returns a SearchResult of batch size one."""

    def __init__(self, root: RootOutput, recurrent_fn: RecurrentFn, config: MCTSConfig, invalid: Tensor, noise: SearchNoise) -> None:
        self.recurrent_fn, self.config, self.invalid = recurrent_fn, config, invalid
        gumbel = noise.gumbel[0].to(root.value.dtype)  # [m²]
        self.uniform = noise.uniform[0].to(root.value.dtype)  # [num_simulations, 2, k]
        value = float(root.value[0])
        self.root = Node(depth=0, state=root.state, reward=0.0, raw_value=value, visits=1, value_sum=value)
        self.set_children(self.root, sample_distinct_children(root.prior_logits[0], invalid, gumbel, config))
        self.min_q = self.max_q = value
        self.root_gumbel = [config.gumbel_scale * gumbel[c].item() for c in self.root.candidates]

    def set_children(self, node: Node, sampled: dict) -> None:
        if node.depth == self.config.max_depth:
            return  # a leaf for good: no children
        node.actions, node.logits, node.priors = sampled["actions"], sampled["logits"], sampled["priors"]
        node.candidates = sampled.get("candidates", [])
        node.children = [None] * len(node.actions)

    def q(self, child: Node) -> float:
        return child.reward + self.config.gamma * child.value()

    def puct_child(self, node: Node) -> int:
        c = self.config
        span = max(self.max_q - self.min_q, EPSILON)
        best, best_score = -1, -math.inf
        for i, child in enumerate(node.children):
            if node.logits[i] == -math.inf:
                continue
            visits = 0 if child is None else child.visits
            if child is not None:
                q_hat = (self.q(child) - self.min_q) / span
            else:  # unvisited: the parent's value, or MuZero's Q̂ = 0
                q_hat = (node.value() - self.min_q) / span if c.unvisited_q == "parent" else 0.0
            score = q_hat + c.c_puct * node.priors[i] * math.sqrt(node.visits) / (1 + visits)
            if score > best_score:
                best, best_score = i, score
        return best

    def root_scores(self) -> tuple[list[int], list[float], list[float], list[float]]:
        """Visits, completed Q (mixed value where unvisited), σ(Q̂) and g + logits + σ."""
        c, root = self.config, self.root
        visits = [0 if child is None else child.visits for child in root.children]
        qs = [0.0 if child is None else self.q(child) for child in root.children]
        total = sum(visits)
        prior_mass = sum(p for p, n in zip(root.priors, visits, strict=True) if n > 0)
        weighted = sum(p * q for p, q, n in zip(root.priors, qs, visits, strict=True) if n > 0)
        weighted = weighted / prior_mass if prior_mass > 0 else weighted
        mixed = (root.raw_value + total * weighted) / (total + 1)
        completed = [q if n > 0 else mixed for q, n in zip(qs, visits, strict=True)]
        valid = [x > -math.inf for x in root.logits]
        low = min(q for q, ok in zip(completed, valid, strict=True) if ok)
        high = max(q for q, ok in zip(completed, valid, strict=True) if ok)
        sigma = [(c.c_visit + max(visits)) * c.c_scale * ((q - low) / max(high - low, EPSILON)) for q in completed]
        score = [g + x + s if ok else -math.inf for g, x, s, ok in zip(self.root_gumbel, root.logits, sigma, valid, strict=True)]
        return visits, completed, sigma, score

    def gumbel_root_child(self, considered_visit: int) -> int:
        visits, _, _, score = self.root_scores()
        best, best_score = -1, -math.inf
        for i in range(len(score)):
            if visits[i] == considered_visit and score[i] > best_score:
                best, best_score = i, score[i]
        return best

    def simulate(self, sim: int) -> None:
        c = self.config
        node, path = self.root, [self.root]
        while node.depth < c.max_depth:
            if node is self.root and c.root_selection == "gumbel":
                valid = sum(x > -math.inf for x in node.logits)
                i = self.gumbel_root_child(considered_visit_sequence(valid, c.num_simulations)[sim])
            else:
                i = self.puct_child(node)
            if node.children[i] is None:  # expand: the node simulation `sim` creates is node sim + 1
                out = self.recurrent_fn(node.state, torch.tensor([node.actions[i]], device=node.state.device))
                child = Node(depth=node.depth + 1, state=out.state, reward=float(out.reward[0]), raw_value=float(out.value[0]))
                self.set_children(child, sample_iid_children(out.prior_logits[0], self.invalid, self.uniform[sim]))
                node.children[i] = child
                path.append(child)
                break
            node = node.children[i]
            path.append(node)
        ret = path[-1].raw_value
        for node in reversed(path):
            node.value_sum += ret
            node.visits += 1
            if node is not self.root:
                q = self.q(node)
                self.min_q, self.max_q = min(self.min_q, q), max(self.max_q, q)
            ret = node.reward + c.gamma * ret

    def run(self) -> SearchResult:
        for sim in range(self.config.num_simulations):
            self.simulate(sim)
        root = self.root
        visits, completed, sigma, score = self.root_scores()
        if self.config.root_selection == "puct":
            chosen = max(range(len(visits)), key=lambda i: (visits[i], -i))  # most visited, first
            policy = [n / sum(visits) for n in visits]
        else:
            most = max(visits)
            chosen = max((i for i in range(len(score)) if visits[i] == most), key=lambda i: (score[i], -i))
            improved = [x + s if x > -math.inf else -math.inf for x, s in zip(root.logits, sigma, strict=True)]
            top = max(improved)
            exps = [math.exp(x - top) for x in improved]
            policy = [e / sum(exps) for e in exps]
        dtype = torch.float64
        return SearchResult(
            action=torch.tensor([root.actions[chosen]]),
            chosen=torch.tensor([chosen]),
            children_actions=torch.tensor([root.actions]),
            valid=torch.tensor([[x > -math.inf for x in root.logits]]),
            visit_counts=torch.tensor([visits]),
            q_values=torch.tensor([completed], dtype=dtype),
            root_value=torch.tensor([root.value()], dtype=dtype),
            policy=torch.tensor([policy], dtype=dtype),
        )


@torch.no_grad()
def reference_search(
    root: RootOutput, recurrent_fn: RecurrentFn, config: MCTSConfig, invalid_actions: Tensor | None, noise: SearchNoise
) -> SearchResult:
    """The search on ONE sample: root and noise of batch size one, invalid_actions [1, 2, A]
    bool or None; recurrent_fn is called with batch size one."""
    if invalid_actions is None:
        invalid_actions = torch.zeros_like(root.prior_logits, dtype=torch.bool)
    invalid = invalid_actions[0]
    return ReferenceSearch(root, recurrent_fn, config, invalid, noise).run()


def reference_search_rows(
    fns_for_row: Callable[[int], tuple[RootOutput, RecurrentFn]],
    batch_size: int,
    config: MCTSConfig,
    invalid_actions: Tensor | None,
    noise: SearchNoise,
) -> SearchResult:
    """The reference on every row b < batch_size, one after the other: fns_for_row(b) gives the
    row's root output and recurrent_fn (batch size one); results are stacked along the batch."""
    results = []
    for b in range(batch_size):
        root, recurrent_fn = fns_for_row(b)
        invalid = None if invalid_actions is None else invalid_actions[b : b + 1]
        results.append(reference_search(root, recurrent_fn, config, invalid, noise.row(b)))
    return SearchResult(
        **{
            name: torch.cat([getattr(r, name) for r in results])
            for name in ("action", "chosen", "children_actions", "valid", "visit_counts", "q_values", "root_value", "policy")
        }
    )
