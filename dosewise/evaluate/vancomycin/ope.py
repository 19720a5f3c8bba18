"""Off-policy evaluation of a dosing policy (deterministic or stochastic) from logged courses: FQE, PDWIS, WDR.

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
  pi(s); a stochastic target (a `StochasticPolicy`, which has ``log_prob``) is used as it is,
  rho = pi(a | s) / mu(a | s), and FQE averages Q over actions sampled from it. Courses of different lengths are padded with an absorbing state (ratio 1, reward 0,
  Q = V = 0), so a course that ended keeps its weight in every later step's normaliser.
- The effective sample size (sum w)^2 / sum w^2 of the final cumulative weights: when it is a
  handful of courses, PDWIS and WDR rest on those few patients whatever their intervals say.
  ``overlap`` is the share of logged states where pi(s) is an action the behaviour model finds
  at least as likely as its 5 % least likely logged actions: where it is low, FQE extrapolates.

Each estimate says when it cannot be trusted: it is returned as "not estimable", with the reason,
when the ESS is below `OPEConfig.min_ess` / `min_ess_fraction` of the courses (PDWIS, WDR), when the
overlap is below `min_overlap` (FQE), or when the policy reads the whole dosing history
(``needs_record``) or writes doses in mg (``returns_dose_mg``), which a per-state estimator cannot
replay. The result holds no NaN (``json.dumps(result, allow_nan=False)`` works).

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
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from torch import nn

from dosewise.data.transitions import Normalizer, Transitions
from dosewise.evaluate.stats import CI_LEVEL, bootstrap_ci, bootstrap_indices

# A deterministic target policy: raw observations [N, D] -> actions [N] in [action_low, action_high].
Policy = Callable[[np.ndarray], np.ndarray]


@runtime_checkable
class StochasticPolicy(Protocol):
    """A target policy that samples: ``policy(obs [N, D] raw) -> actions [N]`` drawn with its own seeded
    generator, and ``log_prob(obs, actions) -> [N]`` the log density of the action before any clipping.
    It may also carry ``feature_names`` (the simulator columns `rollout` feeds it).
    Recognised by a callable ``log_prob`` attribute (`is_stochastic`)."""

    def __call__(self, obs: np.ndarray) -> np.ndarray: ...

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray: ...


def is_stochastic(policy: object) -> bool:
    """Whether ``policy`` is evaluated as a `StochasticPolicy` (it has a callable ``log_prob``)."""
    return callable(getattr(policy, "log_prob", None))


def _declares(policy: object, flag: str) -> bool:
    """Whether a policy (or, for a bound method, its object) sets the opt-in attribute ``flag`` to True (as `rollout` reads it)."""
    return any(getattr(owner, flag, False) is True for owner in (policy, getattr(policy, "__self__", None)))


N_BOOTSTRAP = 1000  # course resamples for the PDWIS / WDR / ESS intervals


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
    # -- stochastic targets ------------------------------------------------------------------
    # Actions drawn from the target at each state to average Q over (FQE targets at s', values at s).
    # 16 keeps the Monte-Carlo error of V(s) near 1/4 of Q's spread over the policy's actions, at 16x
    # the cost of the target network's forward pass only.
    fqe_action_samples: int = 16
    # -- when an estimate is "not estimable" -------------------------------------------------
    # PDWIS / WDR need an ESS of the final cumulative weights of at least max(min_ess, min_ess_fraction
    # x courses). Below ~10 effective courses the weighted mean is a handful of patients and a
    # percentile bootstrap over them understates its error; with many courses, an ESS under 5 % means
    # the weights threw away 95 % of the data (a 20x variance inflation), a mismatch too large to trust.
    min_ess: float = 10.0
    min_ess_fraction: float = 0.05
    # FQE needs the target's action supported by the behaviour model at this share of logged states:
    # below half, most of its value comes from Q where no clinician acted, which nothing constrains.
    min_overlap: float = 0.5
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

    @torch.no_grad()
    def mixture(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The mixture at each state as float64 arrays [N, K]: component weights, means, stds."""
        logits, means, log_stds = self._params(torch.as_tensor(self.normalizer.normalize(np.asarray(obs, dtype=np.float32))))
        return torch.softmax(logits.double(), -1).numpy(), means.double().numpy(), log_stds.double().exp().numpy()

    def perturbed(self, shift: float, extra_sd: float, seed: int, feature_names: Sequence[str] | None = None) -> PerturbedBehaviour:
        """A stochastic target near the clinicians: their fitted mixture moved by ``shift`` and widened by
        N(0, extra_sd^2) noise, whose density is known exactly (a target whose ratios to mu are known)."""
        return PerturbedBehaviour(self, shift, extra_sd, seed, feature_names)


def _mixture_log_density(weights: np.ndarray, means: np.ndarray, stds: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """log sum_k w_k N(a; mean_k, std_k^2) in float64: params [N, K], actions [N] -> [N]."""
    z = (np.asarray(actions, dtype=np.float64).reshape(-1, 1) - means) / stds
    with np.errstate(divide="ignore"):  # a component of weight 0 contributes log 0 = -inf, which logsumexp absorbs
        terms = np.log(weights) - 0.5 * z**2 - np.log(stds) - 0.5 * math.log(2 * math.pi)
    top = terms.max(axis=1, keepdims=True)
    return (top + np.log(np.exp(terms - top).sum(axis=1, keepdims=True)))[:, 0]


class PerturbedBehaviour:
    """`StochasticPolicy`: a ~ mu(. | s) + shift + N(0, extra_sd^2), sampled with its own generator.

    Its density is the behaviour mixture with every component's mean moved by ``shift`` and its
    variance grown by ``extra_sd^2`` (a Gaussian mixture convolved with a Gaussian). Actions are
    returned unclipped; `evaluate_ope` and `rollout` clip them to the action range.
    """

    def __init__(self, model: BehaviourModel, shift: float, extra_sd: float, seed: int, feature_names: Sequence[str] | None = None):
        if not (math.isfinite(shift) and math.isfinite(extra_sd) and extra_sd >= 0):
            raise ValueError(
                f"PerturbedBehaviour: shift must be finite and extra_sd finite and >= 0; got shift={shift}, extra_sd={extra_sd}"
            )
        self.model, self.shift, self.extra_sd, self.seed = model, float(shift), float(extra_sd), seed
        self.feature_names = None if feature_names is None else tuple(feature_names)
        self._rng = np.random.default_rng(seed)

    def __call__(self, obs: np.ndarray) -> np.ndarray:
        weights, means, stds = self.model.mixture(obs)
        n = weights.shape[0]
        u = self._rng.random(n)
        component = np.minimum((np.cumsum(weights, axis=1) < u[:, None]).sum(axis=1), weights.shape[1] - 1)
        rows = np.arange(n)
        z = self._rng.standard_normal((2, n))
        return means[rows, component] + stds[rows, component] * z[0] + self.shift + self.extra_sd * z[1]

    def log_prob(self, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
        weights, means, stds = self.model.mixture(obs)
        return _mixture_log_density(weights, means + self.shift, np.sqrt(stds**2 + self.extra_sd**2), actions)


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
    """FQE of the policy whose actions at the data's states / next states are ``pi_obs`` / ``pi_next``:
    [n] for a deterministic policy, or [n, K] samples of a stochastic one (V(s) = mean_k Q(s, a_k))."""
    episodes = Episodes.from_transitions(transitions) if episodes is None else episodes
    members = 1 + config.fqe_bootstrap
    gen = torch.Generator().manual_seed(seed)
    normalizer = Normalizer.fit(transitions.observations)
    as_t = lambda x: torch.tensor(np.asarray(x, dtype=np.float32))
    s = as_t(normalizer.normalize(transitions.observations))
    s_next = as_t(normalizer.normalize(transitions.next_observations))
    x_data = torch.cat([s, as_t(transitions.actions).reshape(-1, 1)], 1)  # [n, D+1]
    x_pi, x_next = _state_action_samples(s, pi_obs), _state_action_samples(s_next, pi_next)  # [n, K, D+1]
    samples = x_next.shape[1]
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
                v_next = target(x_next[rows].reshape(members, -1, x_next.shape[-1])).reshape(members, -1, samples).mean(-1)
                y = reward[rows] + gamma * not_done[rows] * v_next
            loss = ((q(x_data[rows]) - y) ** 2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if (step + 1) % config.fqe_target_every == 0:
                target.load_state_dict(q.state_dict())

    with torch.no_grad():
        q_data = q(x_data.expand(members, -1, -1)).double().numpy()  # [M, n]
        v_data = q(x_pi.reshape(1, -1, x_pi.shape[-1]).expand(members, -1, -1)).reshape(members, n, samples).mean(-1).double().numpy()
    starts = episodes.rows[:, 0]
    member_values = (counts * v_data[:, starts]).sum(1) / counts.sum(1)
    return FQEResult(q_data=q_data[0], v_data=v_data[0], member_values=member_values, final_loss=float(loss.detach()))


def _state_action_samples(states: torch.Tensor, actions: np.ndarray) -> torch.Tensor:
    """States [n, D] and actions [n] or [n, K] -> network inputs [n, K, D+1]."""
    a = torch.tensor(np.asarray(actions, dtype=np.float32))
    a = a.reshape(-1, 1) if a.ndim == 1 else a
    if a.shape[0] != states.shape[0]:
        raise ValueError(f"FQE needs one row of target actions per transition: got {a.shape[0]} rows for {states.shape[0]} transitions")
    return torch.cat([states[:, None, :].expand(-1, a.shape[1], -1), a[:, :, None]], dim=2)


# -- the entry point ------------------------------------------------------------------------------


def evaluate_ope(
    policy: Policy | StochasticPolicy,
    transitions: Transitions,
    gamma: float,
    seed: int = 0,
    config: OPEConfig = OPEConfig(),
    behaviour: tuple[BehaviourModel, dict] | None = None,
) -> dict:
    """FQE, PDWIS ("wis") and WDR estimates of ``policy``'s discounted value from a course's start, each
    with a 95 % interval over resampled courses, or "not estimable" with the reason; plus the ESS of the
    importance weights, the overlap and the behaviour fit. A `StochasticPolicy` is sampled (its
    generator advances) and its ``log_prob`` gives the ratios exactly.

    ``behaviour``: a fitted (model, stats) pair to reuse across policies evaluated on the same data.
    """
    if not 0.0 <= gamma < 1.0:
        raise ValueError(f"gamma must be in [0, 1), got {gamma}")
    episodes = Episodes.from_transitions(transitions)
    settings = {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(config).items()}
    stochastic = is_stochastic(policy)
    common = {"gamma": gamma, "episodes": episodes.n, "target": "stochastic" if stochastic else "deterministic", "config": settings}

    unreplayable = _unreplayable_reason(policy)
    if unreplayable is not None:
        entry = _entry(None, None, unreplayable)
        return {
            **common,
            "fqe": {
                **entry,
                "overlap": None,
                "min_overlap": config.min_overlap,
                "final_loss": None,
                "bootstrap_refits": config.fqe_bootstrap,
            },
            "wis": {**entry, "ess": None, "min_ess": None},
            "wdr": {**entry, "ess": None, "min_ess": None},
            "ess": None,
            "overlap": None,
            "bandwidth": None,
            "behaviour_model": None if behaviour is None else behaviour[1],
        }

    obs = transitions.observations
    actions = transitions.actions.reshape(-1).astype(np.float64)
    model, fit_stats = behaviour if behaviour is not None else BehaviourModel.fit(obs, actions, config, seed)
    log_mu = model.log_prob(obs, actions)
    if stochastic:
        samples = config.fqe_action_samples
        if samples < 1:
            raise ValueError(f"OPEConfig.fqe_action_samples must be >= 1 for a stochastic target, got {samples}")
        pi_obs = _sampled_actions(policy, obs, samples, config)  # [n, K]
        pi_next = _sampled_actions(policy, transitions.next_observations, samples, config)
        h = None
        log_rho = _policy_log_prob(policy, obs, actions) - log_mu
    else:
        pi_obs = policy_actions(policy, obs, config.action_low, config.action_high)[:, None]  # [n, 1]
        pi_next = policy_actions(policy, transitions.next_observations, config.action_low, config.action_high)[:, None]
        h = config.bandwidth if config.bandwidth is not None else silverman_bandwidth(actions, config.min_bandwidth)
        log_rho = kernel_log_density(actions, pi_obs[:, 0], h) - log_mu
    # Support: share of (state, target action) pairs whose action mu finds at least as likely as its 5 % least likely logged actions.
    k = pi_obs.shape[1]
    log_mu_pi = model.log_prob(np.repeat(obs, k, axis=0), pi_obs.reshape(-1))
    overlap = float(np.mean(log_mu_pi >= np.quantile(log_mu, 0.05)))
    log_w = cumulative_log_weights(episodes.pad(log_rho), episodes.mask, config.max_ratio)  # [E, T]

    fqe = fit_fqe(transitions, pi_obs, pi_next, gamma, config, seed, episodes)
    rewards, q, v = episodes.pad(transitions.rewards), episodes.pad(fqe.q_data), episodes.pad(fqe.v_data)

    idx = bootstrap_indices(episodes.n, config.n_bootstrap, seed + 1)
    identity = np.arange(episodes.n)[None, :]
    wis_stat = lambda i: pdwis(rewards[i], log_w[i], gamma)
    wdr_stat = lambda i: wdr(rewards[i], log_w[i], q[i], v[i], gamma)
    ess_stat = lambda i: effective_sample_size(log_w[i][..., -1])

    ess_point = float(ess_stat(identity)[0])
    min_ess = max(config.min_ess, config.min_ess_fraction * episodes.n)
    ess_reason = None
    if not ess_point >= min_ess:  # also catches a NaN ESS
        ess_reason = (
            f"effective sample size {ess_point:.1f} of {episodes.n} courses (< {min_ess:g}): the weights rest on a handful of patients"
        )
    overlap_reason = None
    if not overlap >= config.min_overlap:
        overlap_reason = (
            f"the target's action is supported by the clinicians' actions at only {100 * overlap:.0f} % of logged states "
            f"(< {100 * config.min_overlap:g} %): FQE would extrapolate where no clinician acted"
        )
    with np.errstate(invalid="ignore", divide="ignore"):  # all-zero weights give NaN replicates, which _entry reports
        wis_entry = _entry(wis_stat(identity)[0], wis_stat(idx), ess_reason)
        wdr_entry = _entry(wdr_stat(identity)[0], wdr_stat(idx), ess_reason)
        ess_values = ess_stat(idx)
    members = fqe.member_values[1:] if len(fqe.member_values) > 1 else None  # the refitted members are the bootstrap replicates
    fqe_entry = _entry(fqe.member_values[0], members, overlap_reason)
    ess_ci = _percentile_ci(np.nan_to_num(ess_values, nan=0.0))
    return {
        **common,
        "fqe": {
            **fqe_entry,
            "overlap": overlap,
            "min_overlap": config.min_overlap,
            "final_loss": fqe.final_loss if math.isfinite(fqe.final_loss) else None,
            "bootstrap_refits": config.fqe_bootstrap,
        },
        "wis": {**wis_entry, "ess": _finite_or_none(ess_point), "min_ess": min_ess},
        "wdr": {**wdr_entry, "ess": _finite_or_none(ess_point), "min_ess": min_ess},
        "ess": {
            "estimate": _finite_or_none(ess_point),
            "ci95": ess_ci,
            "fraction": _finite_or_none(ess_point / episodes.n),
            "min_ess": min_ess,
        },
        "overlap": overlap,
        "bandwidth": h,
        "behaviour_model": fit_stats,
    }


def _unreplayable_reason(policy: object) -> str | None:
    """Why per-state estimators cannot evaluate ``policy`` without calling it, or None."""
    if _declares(policy, "needs_record"):
        return (
            "the policy reads the whole dosing history (needs_record), which the logged per-state observations do not hold: "
            "per-state off-policy estimators cannot replay it"
        )
    if _declares(policy, "returns_dose_mg"):
        return "the policy writes doses in mg (returns_dose_mg) rather than dose changes: its actions are not in the logged action space"
    return None


def _finite_or_none(x: float | None) -> float | None:
    return float(x) if x is not None and math.isfinite(x) else None


def _percentile_ci(values: np.ndarray | None) -> list[float] | None:
    """95 % percentile interval of bootstrap replicates; None without replicates or when over 5 % of them are not finite."""
    if values is None or len(values) == 0:
        return None
    values = np.asarray(values, dtype=np.float64)
    finite = values[np.isfinite(values)]
    if len(finite) < 0.95 * len(values):
        return None
    alpha = (1.0 - CI_LEVEL) / 2.0
    low, high = np.quantile(finite, [alpha, 1.0 - alpha])
    return [float(low), float(high)]


def _entry(point: float | None, replicates: np.ndarray | None, reason: str | None) -> dict:
    """One estimator's result: estimate and interval, or None for both with ``not_estimable`` saying why.
    ``raw_estimate`` keeps the number computed whatever the checks said (for accuracy studies, not for decisions)."""
    raw = _finite_or_none(None if point is None else float(point))
    if reason is None and raw is None:
        reason = "the estimate is not a finite number (every importance weight is zero or a fit diverged)"
    if reason is not None:
        return {"estimate": None, "ci95": None, "not_estimable": reason, "raw_estimate": raw}
    return {"estimate": raw, "ci95": _percentile_ci(replicates), "not_estimable": None, "raw_estimate": raw}


def _sampled_actions(policy: StochasticPolicy, obs: np.ndarray, samples: int, config: OPEConfig) -> np.ndarray:
    """``samples`` draws of the policy at each state, in one call on the tiled states, clipped: [n, K]."""
    n = obs.shape[0]
    drawn = policy_actions(policy, np.tile(obs, (samples, 1)), config.action_low, config.action_high)
    return drawn.reshape(samples, n).T


def _policy_log_prob(policy: StochasticPolicy, obs: np.ndarray, actions: np.ndarray) -> np.ndarray:
    """``policy.log_prob`` checked: [N] float64, no NaN or +inf (-inf: an action the policy never takes)."""
    out = np.asarray(policy.log_prob(np.asarray(obs, dtype=np.float32), actions), dtype=np.float64)
    if out.shape not in ((obs.shape[0],), (obs.shape[0], 1)):
        raise ValueError(f"policy.log_prob must return one log density per state, shape ({obs.shape[0]},); got shape {out.shape}")
    out = out.reshape(-1)
    bad = np.isnan(out) | (out == np.inf)
    if bad.any():
        raise ValueError(f"policy.log_prob returned {int(bad.sum())} NaN or +inf log densities (first at row {int(np.argmax(bad))})")
    return out


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
