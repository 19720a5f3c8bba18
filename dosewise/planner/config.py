"""Configuration of the anesthesia planner: model sizes, the training
strategy, the rebound alarm and the closed-loop check. One YAML file
(`dosewise/configs/planner_*.yaml`, read with `dosewise.config.load_config(path, PlannerRunConfig)`)
says everything a run did and is saved next to it."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from dosewise.data.anesthesia import CANONICAL, AnesthesiaDataConfig
from dosewise.data.windows import WindowConfig

# The five ways of combining Stage 1 (environment model) and Stage 2 (policy).
Strategy = Literal["joint", "warmup", "weighted", "detach", "alternating"]
STRATEGIES: tuple[str, ...] = ("joint", "warmup", "weighted", "detach", "alternating")
# Environment metrics the rebound alarm watches (validation, lower is better).
ENV_METRICS: tuple[str, ...] = ("val_bis_mae", "val_map_mae", "val_reward_mae", "val_value_mae")


class PlannerModelConfig(BaseModel):
    """Sizes of the representation / dynamics / prediction networks (RL-DITR, MuZero)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Width of every token and latent state; larger = more capacity, slower on CPU.
    d_model: int = Field(64, ge=4)
    # Attention heads per layer; must divide d_model.
    n_heads: int = Field(4, ge=1)
    # Causal transformer encoder layers over the history (representation).
    encoder_layers: int = Field(2, ge=1)
    # Transformer decoder layers of the dynamics (self-attention over the unrolled actions,
    # cross-attention to the encoded history).
    dynamics_layers: int = Field(2, ge=1)
    # Hidden width of the feed-forward blocks, as a multiple of d_model.
    ff_mult: int = Field(2, ge=1)
    # Dropout in the transformer blocks; 0 keeps training deterministic and fast on small data.
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    # How pump rates enter the model: one learned vector per level (201 per drug) or an MLP of the
    # rate as a number ("continuous"), which generalises across levels the data rarely holds.
    action_encoding: Literal["embedding", "continuous"] = "embedding"

    @model_validator(mode="after")
    def _check_heads(self) -> PlannerModelConfig:
        if self.d_model % self.n_heads:
            raise ValueError(f"n_heads ({self.n_heads}) must divide d_model ({self.d_model})")
        return self


class StrategyConfig(BaseModel):
    """How Stage 1 (BIS, MAP, reward, value losses) and Stage 2 (policy loss) are combined.

    - joint: one loss, env + policy, one optimiser (plain MuZero-style training, the baseline).
    - warmup: env losses only for `warmup_epochs`, then env + policy.
    - weighted: policy + env_weight · env.
    - detach: env + policy, but the policy loss sees detached latent states, so no gradient of
      Stage 2 reaches the representation or the dynamics (no model exploitation).
    - alternating: two optimisers (Lightning manual optimisation): each
      epoch first passes over all minibatches stepping the environment model (representation,
      dynamics, BIS/MAP/reward/value heads) on the env loss, then over the same minibatches
      stepping the policy network on the policy loss (detached states).
    `warmup_epochs` and `env_weight` default to the strategy's own values (10 for warmup, 2.0
    for weighted, 0 and 1.0 otherwise); set them to combine, e.g. warmup with env_weight 2.0
    (the recommended combination).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Which of the five strategies; see the class docstring.
    name: Strategy = "joint"
    # Epochs at the start with env losses only (None: 10 under warmup, else 0).
    warmup_epochs: int | None = Field(None, ge=0)
    # Weight of the env loss against a policy weight of 1 (None: 2.0 under weighted, else 1.0).
    env_weight: float | None = Field(None, gt=0.0)
    # Stage 2 rollout: "teacher" rolls the dynamics with the expert's actions (teacher forcing),
    # "policy" with the model's own argmax actions, each sample its own.
    stage2_rollout: Literal["teacher", "policy"] = "teacher"

    @property
    def resolved_warmup_epochs(self) -> int:
        if self.warmup_epochs is not None:
            return self.warmup_epochs
        return 10 if self.name == "warmup" else 0

    @property
    def resolved_env_weight(self) -> float:
        if self.env_weight is not None:
            return self.env_weight
        return 2.0 if self.name == "weighted" else 1.0

    @property
    def detach_policy(self) -> bool:
        """True when no gradient of the policy loss may reach representation or dynamics."""
        return self.name in ("detach", "alternating")


# Stage 2 presets: weights of BC and the MCTS term, the margin the search's action
# must beat the clinician's by, simulations per search, and whether Stage 2 uses teacher forcing.
SEARCH_PRESETS: dict[str, dict[str, float | int | bool]] = {
    "conservative": {"bc_weight": 0.8, "mcts_weight": 0.2, "margin": 0.15, "num_simulations": 30, "teacher_forcing": True},
    "balanced": {"bc_weight": 0.7, "mcts_weight": 0.3, "margin": 0.10, "num_simulations": 50, "teacher_forcing": True},
    "aggressive": {"bc_weight": 0.5, "mcts_weight": 0.5, "margin": 0.05, "num_simulations": 80, "teacher_forcing": False},
}


class SearchTrainingConfig(BaseModel):
    """Policy improvement by search in Stage 2: the batched MCTS searches from every
    window's state_0; Q = r + γ·V of its action and of the clinician's, one model step each,
    in units of the training return's standard deviation. Where Q_mcts > Q_expert + margin
    the MCTS action is a target with weight 1, elsewhere weight 0; the policy loss is
    bc_weight · BC + mcts_weight · mean(w · CE(policy at s_0, MCTS action)).
    `preset` fills every field left empty; "off" trains by BC alone."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    preset: Literal["off", "conservative", "balanced", "aggressive"] = "off"
    bc_weight: float | None = Field(None, ge=0.0)
    mcts_weight: float | None = Field(None, ge=0.0)
    # In return standard deviations (value and reward heads are trained in those units).
    margin: float | None = None
    # Calibrate the margin instead: set it to the quantile of Q_mcts - Q_expert over a fixed sample
    # of training windows that leaves this share of them active (the healthy activation is
    # 10-40 %). None: the preset's fixed margin.
    target_activation: float | None = Field(None, gt=0.0, lt=1.0)
    # When to calibrate: at every epoch the search trains the policy (activation then stays near the
    # target by construction, and the margin per epoch shows how optimistic the search grows), or
    # once at the first (the margin stays fixed and the activation shows the drift).
    calibrate: Literal["every_epoch", "once"] = "every_epoch"
    # Training windows the calibration searches from (seeded sample).
    calibration_windows: int = Field(1024, ge=16)
    num_simulations: int | None = Field(None, ge=1)
    # None: the preset's (aggressive rolls Stage 2 out with the policy's own actions).
    teacher_forcing: bool | None = None
    # Joint actions expanded per node, and the other settings of the search.
    num_sampled_actions: int = Field(16, ge=1)
    root_selection: Literal["puct", "gumbel"] = "puct"
    # Alarm when the share of windows with weight 1 in an epoch leaves [low, high].
    activation_alarm: tuple[float, float] = (0.01, 0.80)

    @property
    def enabled(self) -> bool:
        return self.preset != "off"

    def resolved(self, name: str) -> float | int | bool:
        value = getattr(self, name)
        if value is not None:
            return value
        if not self.enabled:
            raise ValueError(f"search.{name} is not set and the preset is off")
        return SEARCH_PRESETS[self.preset][name]


class OptimConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # AdamW learning rate of the whole model (of the env model under alternating).
    lr: float = Field(1e-3, gt=0.0)
    # Learning rate of the policy optimiser under alternating (None: lr).
    policy_lr: float | None = Field(None, gt=0.0)
    # AdamW weight decay.
    weight_decay: float = Field(1e-4, ge=0.0)
    # Gradient-norm clipping (0: off).
    grad_clip: float = Field(1.0, ge=0.0)
    # Learning rate over the run: constant, or cosine decay from lr to lr · final_lr_factor at the last epoch.
    schedule: Literal["constant", "cosine"] = "constant"
    final_lr_factor: float = Field(0.05, ge=0.0, le=1.0)


class PlannerTrainConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Passes over the training windows.
    epochs: int = Field(20, ge=1)
    # Windows per minibatch.
    batch_size: int = Field(128, ge=1)
    # Seed of initialisation and minibatch order (the case split has its own, windows.seed).
    seed: int = 0
    # CPU threads torch may use. One is fastest on a shared 2-core machine (measured: two
    # threads contending with other work ran a batch ~10x slower).
    threads: int = Field(1, ge=1)
    # Use at most this many training windows (random, seeded; 0: all); for quick runs.
    max_train_windows: int = Field(0, ge=0)
    # Windows drawn afresh at random (seeded) for each epoch (0: every training window once per
    # epoch). Shorter epochs see more of the data than a fixed subsample of the same size.
    windows_per_epoch: int = Field(0, ge=0)
    # Use at most this many validation windows (random, seeded; 0: all).
    max_val_windows: int = Field(0, ge=0)


class MonitorConfig(BaseModel):
    """Rebound alarm: an env metric that stays worse than its best so far by `margin`
    (relative) for `patience` consecutive epochs, counted only after the policy starts
    training (the warm-up) plus `grace_epochs`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Relative margin over the best value; 0.05 = 5 % worse than the best.
    margin: float = Field(0.05, ge=0.0)
    # Consecutive epochs above best · (1 + margin) that raise the alarm.
    patience: int = Field(3, ge=1)
    # Epochs after the warm-up before watching (early epochs are noisy).
    grace_epochs: int = Field(2, ge=0)


class MPCConfig(BaseModel):
    """The candidate menu and the score of the MPC planning mode."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Steps each candidate is held and scored; at most the model's pre_len.
    horizon: int = Field(5, ge=1)
    # Discount of the per-step expected rewards in the score.
    gamma: float = Field(0.9, ge=0.0, le=1.0)
    # Propofol candidates: the current rate plus each step (mL/h), and 0 and the top rate.
    propofol_steps: tuple[int, ...] = (-40, -20, -10, -5, -2, 0, 2, 5, 10, 20, 40)
    # Remifentanil candidates: the current rate plus each step (mL/h).
    remifentanil_steps: tuple[int, ...] = (-10, -5, 0, 5, 10)
    # Score cost per mL/h of change from the current rates (both drugs), in reward units per step:
    # breaks ties towards holding the pumps steady.
    change_cost: float = Field(0.002, ge=0.0)
    # The BIS window the plan aims for (the reward's in-target window). The evaluation band is
    # 40-60; aiming at its lighter half costs little time in band and spares propofol, whose
    # pressure cost builds over tens of minutes, beyond the horizon the model sees, and which the
    # model's MAP head does not predict reliably (docs/planner_vs_clinician.md).
    bis_window: tuple[float, float] = (50.0, 60.0)

    @model_validator(mode="after")
    def _check(self) -> MPCConfig:
        low, high = self.bis_window
        if not 0.0 <= low < high <= 100.0:
            raise ValueError(f"mpc.bis_window must be two BIS values 0 <= low < high <= 100, got {self.bis_window}")
        for name in ("propofol_steps", "remifentanil_steps"):
            if 0 not in getattr(self, name):
                raise ValueError(f"mpc.{name} must contain 0 (keep the current rate), got {getattr(self, name)}")
        return self


class ClosedLoopConfig(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    # Held-out simulated cases for the closed-loop check after training (0: skip it).
    cases: int = Field(50, ge=0)
    # Seed of the held-out cohort; keep it apart from the training data's.
    seed: int = 2000
    # Planning modes run closed loop: argmax of the policy heads, RL-DITR's beam search over the
    # learned model, the batched MCTS (50 simulations).
    modes: tuple[Literal["argmax", "beam", "mcts", "mpc"], ...] = ("argmax",)
    # The mode a user gets by default (`recommend`, the benches' "planner" row).
    default_mode: Literal["argmax", "beam", "mcts", "mpc"] = "argmax"
    # The MPC mode's candidate menu and score (horizon capped at windows.pre_len).
    mpc: MPCConfig = MPCConfig()
    # Dose limits of every mode, mL/h (propofol 20 mg/mL, remifentanil 20 µg/mL): the highest
    # rate each drug may be set to.
    max_rate: tuple[int, int] = (200, 200)

    @model_validator(mode="after")
    def _check(self) -> ClosedLoopConfig:
        if not self.modes:
            raise ValueError("closed_loop.modes must name at least one of argmax, beam, mcts, mpc")
        if not all(0 <= rate <= 200 for rate in self.max_rate):
            raise ValueError(f"closed_loop.max_rate must be two rates in 0..200 mL/h, got {self.max_rate}")
        return self


class PlannerRunConfig(BaseModel):
    """Everything `dosewise train planner` needs besides the data file."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    algo: Literal["planner"] = "planner"
    data: AnesthesiaDataConfig = CANONICAL
    windows: WindowConfig = WindowConfig()
    model: PlannerModelConfig = PlannerModelConfig()
    strategy: StrategyConfig = StrategyConfig()
    optim: OptimConfig = OptimConfig()
    train: PlannerTrainConfig = PlannerTrainConfig()
    monitor: MonitorConfig = MonitorConfig()
    closed_loop: ClosedLoopConfig = ClosedLoopConfig()
    search: SearchTrainingConfig = SearchTrainingConfig()
    # The training file, filled in by `dosewise train planner`.
    data_path: str | None = None
