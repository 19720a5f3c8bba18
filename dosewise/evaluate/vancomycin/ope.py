"""Off-policy evaluation of a deterministic dosing policy from logged courses: FQE, PDWIS, WDR.

Three estimates of the discounted value from the start of a course, E[sum_t gamma^t r_t | pi],
computed only from the recorded data:

- **FQE** (fitted Q evaluation): an MLP Q(s, a) regressed on r + gamma (1 - done) Q_target(s', pi(s'))
  with a periodically copied target; value = mean over courses of Q(s0, pi(s0)). An ensemble is
  trained in one batched network: member 0 on all courses (the estimate), members 1..B each on a
  bootstrap resample of courses (the interval), so the FQE interval includes the refit's variance.
- **PDWIS** (per-decision weighted importance sampling) and **WDR** (weighted doubly robust,
  Thomas & Brunskill 2016, with self-normalised per-decision weights) with importance ratios
  rho = pi_h(a | s) / mu(a | s): mu is a mixture-density network fitted to the clinicians'
  actions, pi_h the deterministic target smoothed by a Gaussian kernel of bandwidth h around
  pi(s). Courses of different lengths are padded with an absorbing state (ratio 1, reward 0,
  Q = V = 0), so a course that ended keeps its weight in every later step's normaliser.
- The effective sample size (sum w)^2 / sum w^2 of the final cumulative weights: when it is a
  handful of courses, PDWIS and WDR rest on those few patients whatever their intervals say.
  ``overlap`` is the share of logged states where pi(s) is an action the behaviour model finds
  at least as likely as its 5 % least likely logged actions: where it is low, FQE extrapolates.

Intervals are 95 % percentile bootstraps over courses (patients). PDWIS, WDR and ESS resample
courses with the behaviour model and FQE's Q held fixed (fit uncertainty of mu and Q is not in
them); FQE's interval comes from the B refitted members (few resamples: a rough interval).

All states enter the networks standardised with a `Normalizer` fitted on the data; policies see
raw clinical units, like `rollout` and `TrainedIQL.policy_action`.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from dosewise.data.transitions import Normalizer, Transitions
from dosewise.evaluate.stats import bootstrap_ci, bootstrap_indices

# A deterministic target policy: raw observations [N, D] -> actions [N] in [action_low, action_high].
Policy = Callable[[np.ndarray], np.ndarray]

N_BOOTSTRAP = 1000  # course resamples for the PDWIS / WDR / ESS intervals


# How estimates are listed for a reader (evaluate output, report): key in the result -> label.
OPE_ROWS = (("fqe", "FQE"), ("wis", "per-decision WIS"), ("wdr", "weighted doubly robust"), ("true_value", "true value (simulator)"))


@dataclass(frozen=True)
class OPEConfig:
    # -- FQE ---------------------------------------------------------------------------------
    # Gradient steps; with target copies every `fqe_target_every` steps this is steps/every
    # Bellman iterations (40 by default: gamma^40 < 0.015 at gamma <= 0.9).
    fqe_steps: int = 3000
    fqe_target_every: int = 75
    fqe_hidden: tuple[int, ...] = (64, 64)
    fqe_lr: float = 1e-3
    fqe_batch: int = 128
    # Bootstrap members refitted on resampled courses for the FQE interval (0: no interval).
    # Cost grows with members x batch; 10 keeps one evaluation at a few seconds on one core.
    fqe_bootstrap: int = 10
    # -- behaviour model mu(a | s): a mixture of Gaussians from an MLP ------------------------
    behaviour_components: int = 3
    behaviour_hidden: tuple[int, ...] = (64, 64)
    behaviour_steps: int = 1500  # full-batch Adam steps
    behaviour_lr: float = 3e-3
    behaviour_min_std: float = 0.02  # floor per component, so none collapses on a charted value
    # -- importance weights ------------------------------------------------------------------
    # Kernel bandwidth of pi_h around pi(s); None: Silverman's rule on the logged actions,
    # 0.9 * min(sd, IQR / 1.34) * n^(-1/5), floored at `min_bandwidth`. Larger: lower variance,
    # more bias towards a smoothed (stochastic) version of the target.
    bandwidth: float | None = None
    min_bandwidth: float = 0.05
    # Per-decision ratios are clipped at this value before the cumulative product (None: no clip).
    max_ratio: float | None = 100.0
    # -- actions -----------------------------------------------------------------------------
    action_low: float = -1.0
    action_high: float = 1.0
    n_bootstrap: int = N_BOOTSTRAP
    # CPU threads torch may use while fitting (restored afterwards); small MLPs run fastest on one.
    threads: int = 1


@contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


# -- policy and episode plumbing --------------------------------------------------------------


def policy_actions(policy: Policy, obs: np.ndarray, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    """``policy(obs)`` checked: one finite action per row ([N] or [N, 1]), clipped to [low, high]. Returns [N] float64."""
    obs = np.asarray(obs, dtype=np.float32)
    out = np.asarray(policy(obs), dtype=np.float64)
    n = obs.shape[0]
    if out.shape not in ((n,), (n, 1)):
        raise ValueError(f"policy must return one action per state, shape ({n},); got shape {out.shape} for {n} states")
    out = out.reshape(n)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"policy returned {int((~np.isfinite(out)).sum())} non-finite actions")
    return np.clip(out, low, high)


@dataclass(frozen=True)
class Episodes:
    """Courses as a padded [E, T] grid of row indices into the transitions; T = longest course."""

    rows: np.ndarray  # [E, T] int, row index; 0 on padding (masked)
    mask: np.ndarray  # [E, T] bool, True on real steps

    @classmethod
    def from_transitions(cls, transitions: Transitions) -> Episodes:
        slices = transitions.episode_slices()
        if not slices:
            raise ValueError("no episodes in the transitions")
        horizon = max(s.stop - s.start for s in slices)
        rows = np.zeros((len(slices), horizon), dtype=np.int64)
        mask = np.zeros((len(slices), horizon), dtype=bool)
        for i, s in enumerate(slices):
            rows[i, : s.stop - s.start] = np.arange(s.start, s.stop)
            mask[i, : s.stop - s.start] = True
        return cls(rows=rows, mask=mask)

    @property
    def n(self) -> int:
        return self.rows.shape[0]

    def pad(self, per_row: np.ndarray, fill: float = 0.0) -> np.ndarray:
        """[n_rows] values -> [E, T], ``fill`` on padding."""
        return np.where(self.mask, np.asarray(per_row, dtype=np.float64)[self.rows], fill)

    def of_rows(self) -> np.ndarray:
        """[n_rows] episode index of every transition row."""
        out = np.empty(int(self.mask.sum()), dtype=np.int64)
        out[self.rows[self.mask]] = np.nonzero(self.mask)[0]
        return out


# -- behaviour model --------------------------------------------------------------------------


def _mlp(sizes: list[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i in range(len(sizes) - 1):
        layers.append(nn.Linear(sizes[i], sizes[i + 1]))
        if i < len(sizes) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


def mixture_log_prob(logits: torch.Tensor, means: torch.Tensor, log_stds: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """log sum_k softmax(logits)_k N(action; mean_k, std_k). Params [N, K], action [N] -> [N]."""
    z = (action[:, None] - means) / log_stds.exp()
    log_normal = -0.5 * z**2 - log_stds - 0.5 * math.log(2 * math.pi)
    return torch.logsumexp(torch.log_softmax(logits, dim=-1) + log_normal, dim=-1)


class BehaviourModel:
    """mu(a | s): a K-component Gaussian mixture whose weights, means and stds an MLP reads from the state."""

    def __init__(self, normalizer: Normalizer, net: nn.Sequential, components: int, min_std: float):
        self.normalizer, self.net, self.components, self.min_std = normalizer, net, components, min_std

    @classmethod
    def fit(cls, obs: np.ndarray, actions: np.ndarray, config: OPEConfig = OPEConfig(), seed: int = 0) -> tuple[BehaviourModel, dict]:
        """Maximum likelihood, full batch. Returns the model and fit statistics (NLL per action, errors)."""
        obs = np.asarray(obs, dtype=np.float32)
        actions = np.asarray(actions, dtype=np.float32).reshape(-1)
        if obs.ndim != 2 or obs.shape[0] != actions.shape[0] or obs.shape[0] < 2:
            raise ValueError(f"behaviour model needs obs [N, D] and actions [N] with N >= 2; got {obs.shape} and {actions.shape}")
        torch.manual_seed(seed)
        normalizer = Normalizer.fit(obs)
        k = config.behaviour_components
        model = cls(normalizer, _mlp([obs.shape[1], *config.behaviour_hidden, 3 * k]), k, config.behaviour_min_std)
        s = torch.as_tensor(normalizer.normalize(obs))
        a = torch.tensor(actions)
        opt = torch.optim.Adam(model.net.parameters(), lr=config.behaviour_lr)
        with _torch_threads(config.threads):
            for _ in range(config.behaviour_steps):
                loss = -mixture_log_prob(*model._params(s), a).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.net.eval()
        mean = model.mean(obs)
        stats = {
            "kind": f"mixture of {k} Gaussians (MLP {list(config.behaviour_hidden)})",
            "nll": float(-model.log_prob(obs, actions).mean()),
            "mean_abs_error": float(np.abs(mean - actions).mean()),
            "action_std": float(actions.std()),
            "residual_std": float((actions - mean).std()),
            "steps": config.behaviour_steps,
        }
        return model, stats

    def _params(self, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        out = self.net(s)
        k = self.components
        logits, means, raw_std = out[:, :k], out[:, k : 2 * k], out[:, 2 * k :]
        log_stds = torch.log(self.min_std + nn.functional.softplus(raw_std))
        return logits, means, log_stds

    @torch.no_grad()
    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        """log mu(a | s): obs [N, D] raw, actions [N] -> [N] float64."""
        s = torch.as_tensor(self.normalizer.normalize(np.asarray(obs, dtype=np.float32)))
        a = torch.tensor(np.asarray(actions, dtype=np.float32).reshape(-1))
        return mixture_log_prob(*self._params(s), a).double().numpy()

    @torch.no_grad()
    def mean(self, obs: np.ndarray) -> np.ndarray:
        """E_mu[a | s]: [N]."""
        logits, means, _ = self._params(torch.as_tensor(self.normalizer.normalize(np.asarray(obs, dtype=np.float32))))
        return (torch.softmax(logits, -1) * means).sum(-1).double().numpy()

    @torch.no_grad()
    def std(self, obs: np.ndarray) -> np.ndarray:
        """Standard deviation of the mixture at each state: [N]."""
        logits, means, log_stds = self._params(torch.as_tensor(self.normalizer.normalize(np.asarray(obs, dtype=np.float32))))
        p = torch.softmax(logits, -1)
        m = (p * means).sum(-1, keepdim=True)
        return (p * (log_stds.exp() ** 2 + (means - m) ** 2)).sum(-1).sqrt().double().numpy()


def silverman_bandwidth(actions: np.ndarray, floor: float = 0.05) -> float:
    """0.9 * min(sd, IQR / 1.34) * n^(-1/5), at least ``floor``."""
    a = np.asarray(actions, dtype=np.float64).reshape(-1)
    q75, q25 = np.percentile(a, [75, 25])
    spread = min(a.std(), (q75 - q25) / 1.34) if q75 > q25 else a.std()
    return float(max(0.9 * spread * a.shape[0] ** -0.2, floor))


def kernel_log_density(actions: np.ndarray, centres: np.ndarray, bandwidth: float) -> np.ndarray:
    """log N(a; centre, h^2): the deterministic target smoothed into a density. [N] -> [N]."""
    z = (np.asarray(actions, np.float64) - np.asarray(centres, np.float64)) / bandwidth
    return -0.5 * z**2 - math.log(bandwidth) - 0.5 * math.log(2 * math.pi)


# -- estimators on padded [E, T] arrays, batched over course resamples ----------------------------


def cumulative_log_weights(log_ratios: np.ndarray, mask: np.ndarray, max_ratio: float | None = None) -> np.ndarray:
    """log prod_{k <= t} rho_k per course: [E, T]; padding steps have ratio 1."""
    lr = np.where(mask, log_ratios, 0.0)
    if max_ratio is not None:
        lr = np.minimum(lr, math.log(max_ratio))
    return np.cumsum(lr, axis=-1)


def _normalised(log_w: np.ndarray) -> np.ndarray:
    """Self-normalise over courses (axis -2) at every step: [..., E, T] -> same, columns sum to 1."""
    w = np.exp(log_w - log_w.max(axis=-2, keepdims=True))
    return w / w.sum(axis=-2, keepdims=True)


def pdwis(rewards: np.ndarray, log_w: np.ndarray, gamma: float) -> np.ndarray:
    """Per-decision WIS: sum_t gamma^t sum_i wbar_{i,t} r_{i,t}. [..., E, T] -> [...]."""
    disc = gamma ** np.arange(rewards.shape[-1])
    return (_normalised(log_w) * rewards * disc).sum(axis=(-2, -1))


def wdr(rewards: np.ndarray, log_w: np.ndarray, q: np.ndarray, v: np.ndarray, gamma: float) -> np.ndarray:
    """Weighted doubly robust (Thomas & Brunskill 2016):
    sum_t gamma^t sum_i [ wbar_{i,t} (r_{i,t} - Q(s_{i,t}, a_{i,t})) + wbar_{i,t-1} V(s_{i,t}) ], wbar_{i,-1} = 1/E.
    All [..., E, T] (r = Q = V = 0 on padding) -> [...]."""
    w = _normalised(log_w)
    w_prev = np.concatenate([np.full_like(w[..., :1], 1.0 / w.shape[-2]), w[..., :-1]], axis=-1)
    disc = gamma ** np.arange(rewards.shape[-1])
    return ((w * (rewards - q) + w_prev * v) * disc).sum(axis=(-2, -1))


def effective_sample_size(log_w: np.ndarray) -> np.ndarray:
    """(sum w)^2 / sum w^2 over courses (last axis), from log weights: [..., E] -> [...]; n for equal weights, 1 for one dominant."""
    w = np.exp(log_w - log_w.max(axis=-1, keepdims=True))
    return w.sum(-1) ** 2 / (w**2).sum(-1)


# -- FQE: a batched ensemble of MLPs, member 0 on all courses, the others on resamples -----------


class _Ensemble(nn.Module):
    """M independent MLPs evaluated at once: x [M, B, in] -> [M, B]."""

    def __init__(self, members: int, sizes: list[int], generator: torch.Generator):
        super().__init__()
        self.weights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for fan_in, fan_out in itertools.pairwise(sizes):
            bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default uniform init
            self.weights.append(nn.Parameter((torch.rand(members, fan_in, fan_out, generator=generator) * 2 - 1) * bound))
            self.biases.append(nn.Parameter((torch.rand(members, 1, fan_out, generator=generator) * 2 - 1) * bound))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for i, (w, b) in enumerate(zip(self.weights, self.biases)):
            x = torch.baddbmm(b, x, w)
            if i < len(self.weights) - 1:
                x = torch.relu(x)
        return x[..., 0]


@dataclass(frozen=True)
class FQEResult:
    q_data: np.ndarray  # [n] member 0's Q(s, a_data)
    v_data: np.ndarray  # [n] member 0's Q(s, pi(s))
    member_values: np.ndarray  # [M] each member's value estimate on its own courses (member 0: all)
    final_loss: float


def fit_fqe(
    transitions: Transitions,
    pi_obs: np.ndarray,
    pi_next: np.ndarray,
    gamma: float,
    config: OPEConfig = OPEConfig(),
    seed: int = 0,
    episodes: Episodes | None = None,
) -> FQEResult:
    """FQE of the policy whose actions at the data's states / next states are ``pi_obs`` / ``pi_next`` ([n])."""
    episodes = Episodes.from_transitions(transitions) if episodes is None else episodes
    members = 1 + config.fqe_bootstrap
    gen = torch.Generator().manual_seed(seed)
    normalizer = Normalizer.fit(transitions.observations)
    as_t = lambda x: torch.tensor(np.asarray(x, dtype=np.float32))
    s = as_t(normalizer.normalize(transitions.observations))
    s_next = as_t(normalizer.normalize(transitions.next_observations))
    x_data = torch.cat([s, as_t(transitions.actions).reshape(-1, 1)], 1)  # [n, D+1]
    x_pi = torch.cat([s, as_t(pi_obs).reshape(-1, 1)], 1)
    x_next = torch.cat([s_next, as_t(pi_next).reshape(-1, 1)], 1)
    reward, not_done = as_t(transitions.rewards), 1.0 - as_t(transitions.dones)

    # Course multiplicities per member (member 0: each course once) -> a sampling CDF over rows.
    counts = np.ones((members, episodes.n))
    if members > 1:
        idx = bootstrap_indices(episodes.n, members - 1, seed)
        counts[1:] = np.stack([np.bincount(r, minlength=episodes.n) for r in idx])
    row_weights = torch.as_tensor(counts[:, episodes.of_rows()], dtype=torch.float64)
    cdf = (row_weights.cumsum(1) / row_weights.sum(1, keepdim=True)).float().contiguous()  # [M, n]

    q = _Ensemble(members, [x_data.shape[1], *config.fqe_hidden, 1], gen)
    target = _Ensemble(members, [x_data.shape[1], *config.fqe_hidden, 1], gen)
    target.load_state_dict(q.state_dict())
    opt = torch.optim.Adam(q.parameters(), lr=config.fqe_lr)
    n = transitions.n
    loss = torch.tensor(float("nan"))
    with _torch_threads(config.threads):
        for step in range(config.fqe_steps):
            u = torch.rand(members, config.fqe_batch, generator=gen)
            rows = torch.searchsorted(cdf, u).clamp_(max=n - 1)  # [M, B]
            with torch.no_grad():
                y = reward[rows] + gamma * not_done[rows] * target(x_next[rows])
            loss = ((q(x_data[rows]) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % config.fqe_target_every == 0:
                target.load_state_dict(q.state_dict())

    with torch.no_grad():
        q_data = q(x_data.expand(members, -1, -1)).double().numpy()  # [M, n]
        v_data = q(x_pi.expand(members, -1, -1)).double().numpy()
    starts = episodes.rows[:, 0]
    member_values = (counts * v_data[:, starts]).sum(1) / counts.sum(1)
    return FQEResult(q_data=q_data[0], v_data=v_data[0], member_values=member_values, final_loss=float(loss.detach()))


# -- the entry point ------------------------------------------------------------------------------


def evaluate_ope(
    policy: Policy,
    transitions: Transitions,
    gamma: float,
    seed: int = 0,
    config: OPEConfig = OPEConfig(),
    behaviour: tuple[BehaviourModel, dict] | None = None,
) -> dict:
    """FQE, PDWIS ("wis") and WDR estimates of ``policy``'s discounted value from a course's start, each
    with a 95 % interval over resampled courses, the ESS of the importance weights and the behaviour fit.

    ``behaviour``: a fitted (model, stats) pair to reuse across policies evaluated on the same data.
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    episodes = Episodes.from_transitions(transitions)
    obs = transitions.observations
    actions = transitions.actions.reshape(-1).astype(np.float64)
    pi_obs = policy_actions(policy, obs, config.action_low, config.action_high)
    pi_next = policy_actions(policy, transitions.next_observations, config.action_low, config.action_high)

    model, fit_stats = behaviour if behaviour is not None else BehaviourModel.fit(obs, actions, config, seed)
    h = config.bandwidth if config.bandwidth is not None else silverman_bandwidth(actions, config.min_bandwidth)
    log_mu = model.log_prob(obs, actions)
    log_rho = kernel_log_density(actions, pi_obs, h) - log_mu
    # Support: share of states where pi(s) is at least as likely under mu as the 5 % least likely logged actions.
    overlap = float(np.mean(model.log_prob(obs, pi_obs) >= np.quantile(log_mu, 0.05)))
    log_w = cumulative_log_weights(episodes.pad(log_rho), episodes.mask, config.max_ratio)  # [E, T]

    fqe = fit_fqe(transitions, pi_obs, pi_next, gamma, config, seed, episodes)
    rewards, q, v = episodes.pad(transitions.rewards), episodes.pad(fqe.q_data), episodes.pad(fqe.v_data)

    idx = bootstrap_indices(episodes.n, config.n_bootstrap, seed + 1)
    identity = np.arange(episodes.n)[None, :]
    wis_stat = lambda i: pdwis(rewards[i], log_w[i], gamma)
    wdr_stat = lambda i: wdr(rewards[i], log_w[i], q[i], v[i], gamma)
    ess_stat = lambda i: effective_sample_size(log_w[i][..., -1])

    if len(fqe.member_values) > 1:
        # The refitted members already are the bootstrap replicates: the statistic ignores the indices.
        members = fqe.member_values[1:]
        fqe_summary = bootstrap_ci(lambda _: members, idx[: len(members)], fqe.member_values[0])
    else:
        fqe_summary = {"mean": float(fqe.member_values[0]), "ci95": [float("nan"), float("nan")]}
    ess = bootstrap_ci(ess_stat, idx, ess_stat(identity)[0])
    return {
        "gamma": gamma,
        "episodes": episodes.n,
        "fqe": {**fqe_summary, "final_loss": fqe.final_loss, "bootstrap_refits": config.fqe_bootstrap},
        "wis": bootstrap_ci(wis_stat, idx, wis_stat(identity)[0]),
        "wdr": bootstrap_ci(wdr_stat, idx, wdr_stat(identity)[0]),
        "ess": {**ess, "fraction": ess["mean"] / episodes.n},
        "overlap": overlap,
        "bandwidth": h,
        "behaviour_model": fit_stats,
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()},
    }


# -- ground truth on the simulator --------------------------------------------------------------


def vancomycin_true_value(
    policy: Policy, gamma: float, n_patients: int = 2000, seed: int = 1000, features: Sequence[str] | None = None
) -> dict:
    """The value OPE estimates, measured: mean discounted return from the start of the course of
    ``policy`` on ``n_patients`` fresh simulated patients (padding masked), with a 95 % interval.
    ``policy`` sees the simulator's columns ``features`` by name (default: as `rollout` chooses)."""
    from dosewise.sim.vancomycin import (  # the simulator is only needed here
        rollout,
        sample_cohort,
    )

    seeds = np.random.SeedSequence(seed).spawn(2)
    cohort = sample_cohort(n_patients, np.random.default_rng(seeds[0]))
    traj = rollout(cohort, policy, int(seeds[1].generate_state(1)[0]), features=features)
    disc = gamma ** np.arange(traj.rewards.shape[0])[:, None]
    returns = (traj.rewards * traj.mask * disc).sum(axis=0)  # [N]
    return bootstrap_ci(lambda i: returns[i].mean(-1), bootstrap_indices(n_patients, N_BOOTSTRAP, seed), returns.mean())
