"""The trained planner as a closed-loop case policy: turns a `CaseHistory` into the model's input
window (the same layout as `build_windows`) and returns rates chosen by one of the planning
modes — the argmax of the policy heads, beam search, the batched MCTS or MPC — within optional
dose limits."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from dosewise.planner.beam_search import (
    BeamConfig,
    beam_search,
    dose_mask,
    masked_log_policy,
)
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import PlannerModel
from dosewise.planner.mpc import MPCConfig, mpc_plan
from dosewise.sim.anesthesia import Covariates
from dosewise.sim.anesthesia.cases import CaseHistory, pump_concentrations

PlanningMode = Literal["argmax", "beam", "mcts", "mpc"]
# How the policy head's 201 levels become one rate in the argmax mode: the most probable level,
# the expected level (rounded), or the median level.
Decoding = Literal["argmax", "mean", "median"]


def history_window(
    history: CaseHistory, max_len: int, induction_s: float = 600.0, step_s: int = 60, concentrations: bool = False
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's input at decision step t, as `build_windows` makes it from a charted case.

    Returns history [N, max_len, F] float32 (vitals rounded to 0.1 as the charted dataset is,
    the rates set one step before, 0 before the case, and the option flag: 1 while the step is
    within the first `induction_s` seconds; F = 8, or 12 with `concentrations`: the pump's
    concentrations from every rate since the case start, `pump_concentrations`), history_mask
    [N, max_len] bool (real steps
    right-aligned) and static [N, 5] float32 (age, sex, height, weight, asa, rounded like
    `simulate_cases`).
    """
    n, t = history.vitals.shape[0], history.t
    previous = np.zeros((n, t + 1, 2), dtype=np.float64)
    previous[:, 1:] = history.rates[:, :t]
    option = np.broadcast_to((np.arange(t + 1) * step_s < induction_s)[None, :, None], (n, t + 1, 1))
    cov = history.cohort.covariates
    static = np.stack([np.round(cov.age), cov.sex, np.round(cov.height, 1), np.round(cov.weight, 1), history.cohort.asa], axis=1).astype(
        np.float32
    )
    parts = [np.round(history.vitals, 1), previous, option]
    if concentrations:  # from the charted (rounded) covariates, as build_windows computes them
        charted = Covariates.from_arrays(static[:, 0], static[:, 2], static[:, 3], static[:, 1])
        parts.append(pump_concentrations(charted, history.rates, step_s))
    steps = np.concatenate(parts, axis=2)[:, -max_len:]  # [N, <=L, F]
    real = steps.shape[1]
    window = np.zeros((n, max_len, steps.shape[2]), dtype=np.float32)
    window[:, max_len - real :] = steps
    mask = np.zeros((n, max_len), dtype=bool)
    mask[:, max_len - real :] = True
    return window, mask, static


class PlannerPolicy:
    """`policy(history) -> (ppf [N], rftn [N])`: rates in mL/h chosen by `mode`.

    - argmax: the most probable level of each drug's policy head (no search);
    - beam: RL-DITR's beam search over the learned model (`BeamConfig`);
    - mcts: the batched MCTS (`dosewise.planner.mcts`, its `MCTSConfig`);
    - mpc: short-horizon MPC with the explicit reward over the BIS and MAP heads (`MPCConfig`).
    `decoding` turns the policy head into a rate in the argmax mode (`decode_levels`).
    `max_rate` / `min_rate` (mL/h, propofol and remifentanil) restrict every mode.
    """

    def __init__(
        self,
        model: PlannerModel,
        mode: PlanningMode = "argmax",
        *,
        beam: BeamConfig | None = None,
        mcts=None,
        mpc: MPCConfig | None = None,
        decoding: Decoding = "argmax",
        max_rate: tuple[int, int] = (200, 200),
        min_rate: tuple[int, int] = (0, 0),
        induction_s: float = 600.0,
        step_s: int = 60,
        seed: int = 0,
    ) -> None:
        self.model = model.eval()
        self.mode, self.beam, self.mcts, self.mpc = mode, beam or BeamConfig(), mcts, mpc
        self.decoding = decoding
        self.max_rate, self.min_rate = max_rate, min_rate
        self.induction_s, self.step_s = induction_s, step_s
        self.generator = torch.Generator().manual_seed(seed)
        dose_mask(1, max_rate, min_rate)  # fail now on impossible limits, not at the first decision

    @torch.no_grad()
    def __call__(self, history: CaseHistory) -> tuple[np.ndarray, np.ndarray]:
        window, mask, static = history_window(history, self.model.max_len, self.induction_s, self.step_s, self.model.concentrations)
        levels = self.decide(torch.from_numpy(window), torch.from_numpy(mask), torch.from_numpy(static)).action.numpy()
        return levels[:, 0].astype(np.int64), levels[:, 1].astype(np.int64)

    @torch.no_grad()
    def decide(self, history: Tensor, history_mask: Tensor, static: Tensor) -> Decision:
        """The rates for every row of model inputs (`PlannerModel.represent`'s), and the sequence
        the mode planned to reach them where it plans one."""
        inputs = history, history_mask, static
        allowed = dose_mask(history.shape[0], self.max_rate, self.min_rate)
        plan = None
        if self.mode == "argmax":
            memory, _ = self.model.represent(*inputs)
            levels = decode_levels(masked_log_policy(self.model, memory[:, -1], allowed), self.decoding)
        elif self.mode == "beam":
            result = beam_search(self.model, *inputs, self.beam, allowed)
            levels, plan = result.action, result.plan
        elif self.mode == "mcts":
            from dosewise.planner.mcts import MCTSConfig, search
            from dosewise.planner.search_model import planner_search_fns

            config = self.mcts or MCTSConfig(max_depth=self.model.pre_len)
            root, recurrent = planner_search_fns(self.model, *inputs, max_depth=config.max_depth)
            levels = search(root, recurrent, config, invalid_actions=~allowed, generator=self.generator).action
        elif self.mode == "mpc":
            config = self.mpc or MPCConfig(horizon=self.model.pre_len)
            levels = mpc_plan(self.model, *inputs, config, allowed).action
            plan = levels[:, None, :].expand(-1, config.horizon, -1)  # every candidate holds its rates
        else:
            raise ValueError(f"unknown planning mode {self.mode!r}; expected argmax, beam, mcts or mpc")
        return Decision(action=levels, plan=plan)


@dataclass(frozen=True)
class Decision:
    """What `PlannerPolicy.decide` chose."""

    action: Tensor  # [N, 2] int64 rate levels (mL/h) to set now
    # [N, k, 2] int64 the sequence the mode scored, action first: beam search's best sequence
    # (k = depth), MPC's candidate held for its horizon; None for argmax and MCTS, which plan no sequence.
    plan: Tensor | None = None


def decode_levels(log_policy: Tensor, decoding: Decoding = "argmax") -> Tensor:
    """One level per drug from log-probabilities [..., 2, A] (masked levels at -inf): the most
    probable level, the expected level rounded, or the median (the first level whose cumulative
    probability reaches 1/2)."""
    if decoding == "argmax":
        return log_policy.argmax(-1)
    probs = log_policy.exp()
    if decoding == "mean":
        levels = torch.arange(probs.shape[-1], dtype=probs.dtype)
        return (probs @ levels).round().long()
    if decoding == "median":
        return (probs.cumsum(-1) < 0.5).sum(-1).clamp_max(probs.shape[-1] - 1)
    raise ValueError(f"unknown decoding {decoding!r}; expected argmax, mean or median")


def planning_modes(run: PlannerRunConfig) -> dict[str, Callable[[PlannerModel], PlannerPolicy]]:
    """Policy factories `planner_<mode>` for the modes and dose limits of `run.closed_loop`
    (a `PlannerRunConfig`); searches discount with the run's γ and plan at most pre_len steps."""
    return {f"planner_{mode}": (lambda model, mode=mode: planner_policy(run, model, mode)) for mode in run.closed_loop.modes}


def planner_policy(
    run: PlannerRunConfig, model: PlannerModel, mode: PlanningMode, max_rate: tuple[int, int] | None = None
) -> PlannerPolicy:
    """The policy of one planning mode with the settings of `run` (`planning_modes`), for any of
    the four modes; `max_rate` (mL/h) replaces the run's closed_loop.max_rate."""
    from dosewise.planner.mcts import MCTSConfig

    loop, gamma, pre_len = run.closed_loop, run.windows.gamma, run.windows.pre_len
    settings = {
        "argmax": {},
        "beam": {"beam": BeamConfig(gamma=gamma, depth=min(BeamConfig().depth, pre_len))},
        "mcts": {"mcts": MCTSConfig(gamma=gamma, max_depth=pre_len)},
        "mpc": {"mpc": loop.mpc.model_copy(update={"horizon": min(loop.mpc.horizon, pre_len)})},
    }
    if mode not in settings:
        raise ValueError(f"unknown planning mode {mode!r}; expected argmax, beam, mcts or mpc")
    limits = loop.max_rate if max_rate is None else max_rate
    return PlannerPolicy(model, mode, **settings[mode], max_rate=limits, induction_s=run.windows.induction_s)
