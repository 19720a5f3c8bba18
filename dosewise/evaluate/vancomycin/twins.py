"""Model-based off-policy evaluation on digital twins of the logged patients (vancomycin).

Importance sampling cannot value a deterministic dosing policy from a few hundred courses of 8-20
decisions (the weights collapse onto one course), and FQE extrapolates flat where the clinicians never
went. What is known instead is the structure of the problem: the population PK model (the prior of
Bayesian dosing), how exposure harms the kidney, how the chart is drawn. So each logged patient becomes
a twin: their covariates and regimen from the table, their clearance and volumes drawn from their own
MAP-Bayesian posterior (Laplace approximation, ``draws`` per patient), their infection severity and vital
baselines read off their first row. The target policy then treats every twin in the simulator, and the
estimate is the mean discounted return over patients, with a 95 % bootstrap interval over patients.
All policies meet the same twins and the same random draws, so their differences are sharper than their
values.

Two checks say when the number should not be trusted:

- **model check**: the clinicians' logged decisions replayed on the twins must give back the logged
  return (paired over patients). When they do not, the patient model is wrong for these data, and every
  estimate is "not estimable".
- **exposure support**: the twins' AUC24 under the target against the AUC24 the twins had under the logged
  decisions. Where the target drives exposure outside what the data ever showed, the exposure-harm model
  is an extrapolation: more than ``max_outside_support`` of twin-steps outside -> "not estimable".
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from dosewise.algos.bayesian_dosing import map_estimate
from dosewise.algos.dosing_history import dosing_records, require_history_columns
from dosewise.data.schema import DataConfig
from dosewise.evaluate.stats import bootstrap_ci, bootstrap_indices
from dosewise.sim.vancomycin import Cohort, Trajectories, VancomycinConfig, policy_features, rollout

Policy = Callable[..., np.ndarray]


@dataclass(frozen=True)
class TwinConfig:
    # Posterior draws of (CL, Vc, Vp) per logged patient: enough that the twins spread like the patients
    # (a MAP point estimate alone is shrunk towards the population and narrows the exposure distribution).
    draws: int = 10
    n_bootstrap: int = 1000
    # Exposure support: the central range of the twins' AUC24 under the logged decisions ...
    support_quantiles: tuple[float, float] = (0.005, 0.995)
    # ... and the largest share of a target's twin-steps outside it before its value is an extrapolation.
    max_outside_support: float = 0.2
    # Model check: the replayed logged decisions may miss the logged return by this much per course (on
    # top of the paired interval) before the patient model is declared wrong for the data.
    max_replay_gap: float = 0.5


@dataclass(frozen=True)
class PatientTwins:
    """``draws`` twins per logged patient, as one simulator cohort, and what the checks compare with."""

    cohort: Cohort  # [n * draws] twins, patient-major
    patient_of: np.ndarray  # [n * draws] index of the logged patient behind each twin
    patients: tuple[str, ...]
    logged_actions: np.ndarray  # [T, n] the clinicians' decisions, 0 past a course's end
    logged_rewards: np.ndarray  # [T, n] the rewards of the logged courses, 0 past a course's end
    config: TwinConfig
    sim_config: VancomycinConfig

    @property
    def n(self) -> int:
        return len(self.patients)

    @classmethod
    def fit(
        cls,
        frame: pd.DataFrame,
        data_config: DataConfig = DataConfig(),
        config: TwinConfig = TwinConfig(),
        seed: int = 0,
        sim_config: VancomycinConfig = VancomycinConfig(),
        source: str = "data",
    ) -> PatientTwins:
        """Twins of every patient of a loaded table (`dosewise.data.load_table`, with `sex` and the dose columns)."""
        require_history_columns(frame.columns, source)
        records = dosing_records(frame, data_config, source)
        patients = tuple(records)
        # The twin's random effects are relative to the population prediction at its admission creatinine,
        # as the simulator's are; the kidney model then moves clearance with the creatinine.
        at_baseline = [dataclasses.replace(r, creatinine=r.creatinine_baseline) for r in records.values()]
        estimate = map_estimate(at_baseline, sim_config.pk)
        rng = np.random.default_rng(seed)
        k = config.draws
        chol = np.linalg.cholesky(estimate.eta_covariance + 1e-12 * np.eye(3))
        eta = estimate.eta[:, None, :] + np.einsum("nij,nkj->nki", chol, rng.standard_normal((len(patients), k, 3)))

        groups = [rows for _, rows in frame.groupby(data_config.patient_id, sort=False)]
        first = pd.DataFrame([rows.iloc[0] for rows in groups])
        severity = _severity(first["wbc"].to_numpy(float), first["temperature"].to_numpy(float))
        dose = first["dose_mg"].to_numpy(float)
        loading = np.array([r.dose_mg[0] if r.dose_mg.size else d for r, d in zip(records.values(), dose)])
        dialysis = first["dialysis"].to_numpy(np.int64)
        steps = np.array([len(rows) for rows in groups], dtype=np.int64)
        per_patient = dict(
            age=first["age"].to_numpy(float),
            sex=first["sex"].to_numpy(np.int64),
            weight=first["weight_kg"].to_numpy(float),
            creatinine_base=np.array([r.creatinine_baseline for r in records.values()]),
            dialysis=dialysis,
            serious=(loading > dose) & (dialysis == 0),  # only a clinician policy reads it
            severity0=severity,
            sbp_base=first["sbp"].to_numpy(float) + 25.0 * severity,
            hr_base=first["heart_rate"].to_numpy(float) - 35.0 * severity,
            interval_h=first["interval_h"].to_numpy(np.int64),
            dose_mg=dose,
            loading_mg=loading,
            steps=steps,
        )
        index = np.repeat(np.arange(len(patients)), k)
        cohort = Cohort(
            **{name: values[index] for name, values in per_patient.items()},
            eta_cl=eta[:, :, 0].reshape(-1),
            eta_vc=eta[:, :, 1].reshape(-1),
            eta_vp=eta[:, :, 2].reshape(-1),
        )
        actions = np.zeros((int(steps.max()), len(patients)))
        rewards = np.zeros_like(actions)
        for i, rows in enumerate(groups):
            actions[: len(rows), i] = rows[data_config.action].to_numpy(float)
            rewards[: len(rows), i] = rows[data_config.reward].to_numpy(float)
        return cls(
            cohort=cohort,
            patient_of=index,
            patients=patients,
            logged_actions=actions,
            logged_rewards=rewards,
            config=config,
            sim_config=sim_config,
        )

    def logged_value(self, gamma: float) -> np.ndarray:
        """[n] discounted return of each logged course (the behaviour policy's own value, per patient)."""
        return (self.logged_rewards * gamma ** np.arange(self.logged_rewards.shape[0])[:, None]).sum(axis=0)

    def run(self, policy: Policy, seed: int, features: Sequence[str] | None = None) -> Trajectories:
        """``policy`` on every twin (it sees the simulator's columns ``features``, default its own)."""
        return rollout(self.cohort, policy, seed, self.sim_config, features=features)

    def patient_returns(self, traj: Trajectories, gamma: float) -> np.ndarray:
        """[n] mean over each patient's twins of the discounted return."""
        disc = gamma ** np.arange(traj.rewards.shape[0])[:, None]
        per_twin = (traj.rewards * traj.mask * disc).sum(axis=0)
        return per_twin.reshape(self.n, self.config.draws).mean(axis=1)

    def replay(self, seed: int) -> Trajectories:
        """The logged decisions, step by step, on each patient's twins (open loop)."""
        actions = np.repeat(self.logged_actions, self.config.draws, axis=1)  # [T, n * draws]
        step = {"t": 0}

        def logged(obs: np.ndarray) -> np.ndarray:
            out = actions[min(step["t"], actions.shape[0] - 1)]
            step["t"] += 1
            return out

        return self.run(logged, seed, features=("vanco_level",))


def _severity(wbc: np.ndarray, temperature: np.ndarray) -> np.ndarray:
    """Infection severity behind the first row's white count and temperature (inverse-variance mean of the two
    readings of the chart model: wbc = 6 + 14 s, sd 1; temperature = 36.8 + 1.8 s, sd 0.2)."""
    s_wbc, s_temp = (wbc - 6.0) / 14.0, (temperature - 36.8) / 1.8
    w_wbc, w_temp = (14.0 / 1.0) ** 2, (1.8 / 0.2) ** 2
    both = (w_wbc * s_wbc + w_temp * s_temp) / (w_wbc + w_temp)
    return np.clip(np.where(np.isfinite(both), both, np.where(np.isfinite(s_wbc), s_wbc, 0.7)), 0.0, 1.2)


@dataclass
class TwinEvaluator:
    """Values policies on one set of twins with common random numbers; the replay is run once."""

    twins: PatientTwins
    gamma: float
    seed: int = 0

    def __post_init__(self) -> None:
        cfg = self.twins.config
        idx = bootstrap_indices(self.twins.n, cfg.n_bootstrap, self.seed + 1)
        self._idx = idx
        identity = np.arange(self.twins.n)[None, :]
        logged = self.twins.logged_value(self.gamma)
        replay = self.twins.replay(self.seed)
        replayed = self.twins.patient_returns(replay, self.gamma)
        gap = bootstrap_ci(lambda i: (replayed[i] - logged[i]).mean(-1), idx, float((replayed - logged)[identity].mean()))
        self.behaviour = bootstrap_ci(lambda i: logged[i].mean(-1), idx, float(logged.mean()))
        self.model_check = {
            "logged": float(logged.mean()),
            "replayed": float(replayed.mean()),
            "gap": gap["mean"],
            "gap_ci95": gap["ci95"],
            "ok": bool(abs(gap["mean"]) <= cfg.max_replay_gap or gap["ci95"][0] <= 0.0 <= gap["ci95"][1]),
        }
        auc = replay.auc24[replay.mask]
        self.support = tuple(float(q) for q in np.quantile(auc, cfg.support_quantiles))

    def value(self, policy: Policy, features: Sequence[str] | None = None) -> dict:
        """The estimate of ``policy``'s discounted value with its interval, or "not estimable" and why."""
        cfg = self.twins.config
        traj = self.twins.run(policy, self.seed, features=features if features is not None else policy_features(policy))
        returns = self.twins.patient_returns(traj, self.gamma)
        auc = traj.auc24[traj.mask]
        lo, hi = self.support
        outside = float(np.mean((auc < lo) | (auc > hi)))
        summary = bootstrap_ci(lambda i: returns[i].mean(-1), self._idx, float(returns.mean()))
        reason = None
        if not self.model_check["ok"]:
            gap = self.model_check
            reason = (
                f"the patient model does not reproduce the logged courses: the logged decisions replayed on the twins "
                f"return {gap['replayed']:.2f} against {gap['logged']:.2f} logged (gap {gap['gap']:+.2f})"
            )
        elif outside > cfg.max_outside_support:
            high = float(np.mean(auc > hi))
            where = f"above {hi:.0f}" if high >= outside / 2 else f"below {lo:.0f}"
            reason = (
                f"the policy drives AUC24 outside the logged exposures ({lo:.0f}-{hi:.0f} mg*h/L) in {100 * outside:.0f} % "
                f"of twin-steps (mostly {where}): how exposure harms the kidney there is an extrapolation"
            )
        return {
            "estimate": None if reason else summary["mean"],
            "ci95": None if reason else summary["ci95"],
            "not_estimable": reason,
            "model_value": summary["mean"],  # what the model says even when it is not trusted, for the record
            "outside_support": outside,
            "auc_in_target": float(np.mean((auc >= 400.0) & (auc <= 600.0))),
        }
