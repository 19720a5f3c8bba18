"""Training of the planner on PyTorch Lightning.

Reads top to bottom: losses of Stage 1 and Stage 2 → how each strategy combines them →
validation metrics and the rebound alarm → the LightningModule → `train_planner`.

- Stage 1 unrolls the dynamics with the TRUE actions for pre_len steps: cross-entropy of the
  categorical BIS and MAP heads, MSE of reward and value (normalised units).
- Stage 2 unrolls from state_0 and trains the policy by behaviour cloning: cross-entropy of
  both drugs' categorical policies against the clinician's action at every unrolled step.
  Teacher forcing (the default) rolls out with the clinician's actions, each sample its own,
  so the Stage 2 states are Stage 1's; `stage2_rollout: policy` rolls out with the model's own
  argmax actions instead. With a search preset (`SearchTrainingConfig`) the batched MCTS
  searches from every window's state_0 and adds the margin-gated MCTS term.
- Strategies (`StrategyConfig`): joint, warmup, weighted, detach, alternating.
"""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from torch import Tensor

from dosewise.checkpoint import load_safe, make_dir, new_manifest, save_atomic, verify_manifest, write_json_atomic
from dosewise.config import save_config
from dosewise.data.windows import Windows
from dosewise.planner.config import (
    ENV_METRICS,
    MonitorConfig,
    PlannerRunConfig,
    SearchTrainingConfig,
    StrategyConfig,
)
from dosewise.planner.data import WindowBatch, batch_loader, window_tensors
from dosewise.planner.model import (
    PlannerModel,
    PlannerOutput,
    PlannerStats,
    expected_class,
)

log = logging.getLogger("dosewise.planner")

MODEL_FORMAT = "dosewise-planner-v1"


# -- losses -------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of values where mask (same shape) is True; 0 when nothing is."""
    mask = mask.to(values.dtype)
    return (values * mask).sum() / mask.sum().clamp_min(1.0)


def categorical_loss(logits: Tensor, target: Tensor, mask: Tensor) -> Tensor:
    """Masked mean cross-entropy: logits [..., C], target [...] int, mask [...] bool."""
    ce = F.cross_entropy(logits.flatten(0, -2), target.flatten(), reduction="none").view(target.shape)
    return masked_mean(ce, mask)


@dataclass(frozen=True)
class PlannerLosses:
    """Scalar losses of one batch; `env` is Stage 1, `policy` Stage 2."""

    bis: Tensor
    map: Tensor
    reward: Tensor
    value: Tensor
    policy: Tensor

    @property
    def env(self) -> Tensor:
        return self.bis + self.map + self.reward + self.value

    def as_floats(self) -> dict[str, float]:
        values = {name: float(getattr(self, name).detach()) for name in ("bis", "map", "reward", "value", "policy")}
        return {**values, "env": values["bis"] + values["map"] + values["reward"] + values["value"]}


def stage1_losses(model: PlannerModel, out: PlannerOutput, batch: WindowBatch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """BIS, MAP, reward and value losses of the true-action unroll."""
    future = batch.future_mask
    reward_target = (batch.rewards - model.reward_mean) / model.reward_std
    value_target = (batch.values - model.return_mean) / model.return_std
    return (
        categorical_loss(out.bis_logits, batch.target_bis, future),
        categorical_loss(out.map_logits, batch.target_map, future),
        masked_mean((out.reward - reward_target) ** 2, future),
        masked_mean((out.value - value_target) ** 2, batch.value_mask),
    )


def stage2_states(model: PlannerModel, out: PlannerOutput, batch: WindowBatch, strategy: StrategyConfig) -> Tensor:
    """Latent states s_0..s_{K-1} [B, K, d] the policy is trained on. Detached under the detach
    and alternating strategies: the policy loss then reaches the policy network only."""
    detach = strategy.detach_policy
    if strategy.stage2_rollout == "teacher":
        states = out.states[:, :-1]  # teacher forcing: the unroll with the clinician's actions
        return states.detach() if detach else states
    # The forward pass's encoded history: the same function of the parameters as encoding it again.
    states, _ = model.rollout_policy(out.memory, out.memory_padding, batch.actions.shape[1], detach_dynamics=detach)
    return states.detach() if detach else states


@dataclass(frozen=True)
class SearchTargets:
    """The MCTS term's targets for one batch (Stage 2 with the search)."""

    action: Tensor  # [B, 2] int64 the search's joint action at s_0
    weight: Tensor  # [B] float 1 where Q_mcts > Q_expert + margin, else 0
    q_mcts: Tensor  # [B] r + γV of the search's action, in return standard deviations
    q_expert: Tensor  # [B] r + γV of the clinician's action, same units


@torch.no_grad()
def search_targets(
    model: PlannerModel,
    batch: WindowBatch,
    search: SearchTrainingConfig,
    gamma: float,
    generator: torch.Generator,
    memory: Tensor | None = None,
    padding: Tensor | None = None,
    margin: float | None = None,
) -> SearchTargets:
    """Search from every window's state_0 (one batched MCTS over the whole batch), then gate the
    search's action by the margin over the clinician's (`margin`, default the config's). memory/padding: the encoded history
    when the caller has it (a training step's forward pass), else it is encoded here."""
    from dosewise.planner.mcts import MCTSConfig, one_step_q
    from dosewise.planner.mcts import search as mcts_search
    from dosewise.planner.search_model import planner_search_fns_from_memory

    if memory is None or padding is None:
        memory, padding = model.represent(batch.history, batch.history_mask, batch.static)
    memory = memory.detach()
    config = MCTSConfig(
        num_simulations=int(search.resolved("num_simulations")),
        num_sampled_actions=search.num_sampled_actions,
        root_selection=search.root_selection,
        gamma=gamma,
        max_depth=model.pre_len,
    )
    # Inference mode skips autograd's bookkeeping on every op of the search (1.09x, bench/mcts_ab.py);
    # the targets leave it as normal tensors (clones), as training targets must be.
    with torch.inference_mode():
        root, recurrent = planner_search_fns_from_memory(model, memory, padding)
        action = mcts_search(root, recurrent, config, generator=generator).action
        # Q = r + γ·V(s_1) of both actions: one more recurrent call each, from the root, with the
        # history's keys and values the search has projected already.
        q_mcts, q_expert = (one_step_q(recurrent, root.state, chosen, gamma) / model.return_std for chosen in (action, batch.actions[:, 0]))
    action, q_mcts, q_expert = action.clone(), q_mcts.clone(), q_expert.clone()
    margin = float(search.resolved("margin")) if margin is None else margin
    weight = (q_mcts > q_expert + margin).to(q_mcts.dtype)
    return SearchTargets(action=action, weight=weight, q_mcts=q_mcts, q_expert=q_expert)


# Called with the batch and the forward pass's output; returns the MCTS targets.
SearchStep = Callable[[WindowBatch, PlannerOutput], SearchTargets]


def planner_losses(
    model: PlannerModel,
    batch: WindowBatch,
    strategy: StrategyConfig,
    search: SearchTrainingConfig | None = None,
    search_step: SearchStep | None = None,
) -> tuple[PlannerLosses, PlannerOutput]:
    """Stage 1 and Stage 2 losses of one batch (one forward pass with the true actions); with a
    `search_step`, the policy loss is bc_weight · BC + mcts_weight · mean(w · CE) on its targets."""
    out = model(batch.history, batch.history_mask, batch.static, batch.actions)
    bis, map_, reward, value = stage1_losses(model, out, batch)
    targets = search_step(batch, out) if search_step is not None else None
    logits = model.policy_logits(stage2_states(model, out, batch, strategy))
    policy = stage2_loss(logits, batch, search, targets)
    return PlannerLosses(bis=bis, map=map_, reward=reward, value=value, policy=policy), out


def stage2_loss(logits: Tensor, batch: WindowBatch, search: SearchTrainingConfig | None, targets: SearchTargets | None) -> Tensor:
    """BC alone, or λ_bc · BC + λ_mcts · mean over the batch of w · CE(policy at s_0,
    MCTS action) (summed over the two drugs)."""
    bc = behaviour_cloning_loss(logits, batch)
    if targets is None or search is None or not search.enabled:
        return bc
    ce = F.cross_entropy(logits[:, 0].flatten(0, 1), targets.action.flatten(), reduction="none").view(-1, 2).sum(-1)
    return float(search.resolved("bc_weight")) * bc + float(search.resolved("mcts_weight")) * (targets.weight * ce).mean()


def behaviour_cloning_loss(logits: Tensor, batch: WindowBatch) -> Tensor:
    """Cross-entropy of both drugs' policies [B, K, 2, A] against the clinician's actions at every
    real unrolled step, summed over the two drugs."""
    mask = batch.future_mask.unsqueeze(-1).expand_as(batch.actions)
    return 2.0 * categorical_loss(logits, batch.actions, mask)


def policy_pass_loss(
    model: PlannerModel,
    batch: WindowBatch,
    strategy: StrategyConfig,
    search: SearchTrainingConfig | None = None,
    search_step: SearchStep | None = None,
) -> Tensor:
    """Stage 2 alone, on states of the env model as it stands (no gradient reaches it)."""
    with torch.no_grad():
        out = model(batch.history, batch.history_mask, batch.static, batch.actions)
        states = stage2_states(model, out, batch, strategy)
        targets = search_step(batch, out) if search_step is not None else None
    return stage2_loss(model.policy_logits(states), batch, search, targets)


def combined_loss(losses: PlannerLosses, strategy: StrategyConfig, epoch: int) -> Tensor:
    """The single loss of joint / warmup / weighted / detach: env_weight · env, plus the policy
    loss once the warm-up is over. (Detach differs in the states, not in the sum.)"""
    env = strategy.resolved_env_weight * losses.env
    return env + losses.policy if policy_active(strategy, epoch) else env


def policy_active(strategy: StrategyConfig, epoch: int) -> bool:
    return epoch >= strategy.resolved_warmup_epochs


# -- validation metrics and the rebound alarm ---------------------------------------------------


class ValidationAccumulator:
    """Sums of absolute errors over validation batches, per unrolled step.

    BIS and MAP predictions are the expected value of the categorical heads (softmax-weighted
    mean of the classes), in BIS points and mmHg; reward and value in their own units; the action
    error is |argmax policy at s_0 − clinician's rate| in mL/h at the decision step (k = 0).
    """

    def __init__(self, pre_len: int) -> None:
        self.sums = {name: torch.zeros(pre_len, dtype=torch.float64) for name in ("bis", "map", "reward", "value")}
        self.counts = {name: torch.zeros(pre_len, dtype=torch.float64) for name in ("bis", "map", "reward", "value")}
        self.action_sum = torch.zeros(2, dtype=torch.float64)
        self.action_count = 0
        self.loss_sums: dict[str, float] = {}
        self.batches = 0

    @torch.no_grad()
    def add(self, model: PlannerModel, out: PlannerOutput, batch: WindowBatch, losses: PlannerLosses) -> None:
        future, value_mask = batch.future_mask, batch.value_mask
        errors = {
            "bis": ((expected_class(out.bis_logits) - batch.target_bis).abs(), future),
            "map": ((expected_class(out.map_logits) - batch.target_map).abs(), future),
            "reward": ((model.reward_in_units(out.reward) - batch.rewards).abs(), future),
            "value": ((model.value_in_units(out.value) - batch.values).abs(), value_mask),
        }
        for name, (error, mask) in errors.items():
            self.sums[name] += (error * mask).sum(0).double()
            self.counts[name] += mask.sum(0).double()
        chosen = out.policy_logits[:, 0].argmax(-1)  # [B, 2]
        self.action_sum += (chosen - batch.actions[:, 0]).abs().sum(0).double()
        self.action_count += chosen.shape[0]
        for name, value in losses.as_floats().items():
            self.loss_sums[name] = self.loss_sums.get(name, 0.0) + value
        self.batches += 1

    def metrics(self) -> dict[str, float]:
        """val_{bis,map,reward,value}_mae (all unrolled steps), val_action_mae_{ppf,rftn},
        rollout/{bis,map,reward}_mae_h{1..K} (true-action rollout, per horizon step) and
        val_loss/* (mean over batches)."""
        result: dict[str, float] = {}
        for name in ("bis", "map", "reward", "value"):
            result[f"val_{name}_mae"] = float(self.sums[name].sum() / self.counts[name].sum().clamp_min(1.0))
        result["val_action_mae_ppf"] = float(self.action_sum[0] / max(self.action_count, 1))
        result["val_action_mae_rftn"] = float(self.action_sum[1] / max(self.action_count, 1))
        for name in ("bis", "map", "reward"):
            per_step = self.sums[name] / self.counts[name].clamp_min(1.0)
            for k, value in enumerate(per_step.tolist()):
                result[f"rollout/{name}_mae_h{k + 1}"] = value
        for name, total in self.loss_sums.items():
            result[f"val_loss/{name}"] = total / max(self.batches, 1)
        return result


@dataclass
class ReboundMonitor:
    """Raises an alarm when an env metric stays worse than its best so far by `margin`
    (relative) for `patience` consecutive epochs, from epoch `start_epoch` on. The best is
    tracked from epoch 0 (warm-up included). One alarm per excursion; it re-arms on recovery."""

    config: MonitorConfig
    start_epoch: int
    metrics: tuple[str, ...] = ENV_METRICS
    best: dict[str, tuple[float, int]] = field(default_factory=dict)
    streak: dict[str, int] = field(default_factory=dict)
    alarms: list[dict[str, Any]] = field(default_factory=list)

    def update(self, epoch: int, values: dict[str, float]) -> list[dict[str, Any]]:
        """Feed one epoch's metrics; returns the alarms raised at this epoch."""
        raised = []
        for name in self.metrics:
            if name not in values or not math.isfinite(values[name]):
                continue
            value = values[name]
            best, best_epoch = self.best.get(name, (math.inf, -1))
            worse = value > best * (1.0 + self.config.margin)  # the metrics are errors, >= 0
            if epoch >= self.start_epoch and worse:
                self.streak[name] = self.streak.get(name, 0) + 1
                if self.streak[name] == self.config.patience:
                    alarm = {
                        "metric": name,
                        "epoch": epoch,
                        "since_epoch": epoch - self.config.patience + 1,
                        "value": value,
                        "best": best,
                        "best_epoch": best_epoch,
                    }
                    self.alarms.append(alarm)
                    raised.append(alarm)
            else:
                self.streak[name] = 0
            if value < best:
                self.best[name] = (value, epoch)
        return raised


# -- the LightningModule ------------------------------------------------------------------------


class PlannerModule(pl.LightningModule):
    """Stage 1 + Stage 2 under one of the five strategies. `history` holds every validation
    epoch's metrics; `monitor` the rebound alarms."""

    def __init__(self, run: PlannerRunConfig, stats: PlannerStats | None = None) -> None:
        super().__init__()
        self.run = run
        self.search = run.search
        self.strategy = run.strategy
        if run.search.enabled:  # a search preset decides whether Stage 2 uses teacher forcing
            rollout = "teacher" if run.search.resolved("teacher_forcing") else "policy"
            self.strategy = run.strategy.model_copy(update={"stage2_rollout": rollout})
        self.search_generator = torch.Generator().manual_seed(run.train.seed + 7919)
        # The gate's margin: the preset's, or None until `calibrate_margin` sets it (target_activation).
        self.margin: float | None = None
        if run.search.enabled and run.search.target_activation is None:
            self.margin = float(run.search.resolved("margin"))
        # Training windows the margin is calibrated on (`train_planner` sets them), and the result.
        self.calibration: WindowBatch | None = None
        self.calibrated: list[dict[str, float]] = []  # per calibration: epoch, margin, windows
        self.activation: list[dict[str, float]] = []  # per epoch: share of windows with weight 1
        self.search_alarms: list[dict[str, Any]] = []
        self._weights: list[Tensor] = []
        self.model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len, concentrations=run.windows.concentrations)
        if stats is not None:
            self.model.set_stats(stats)
        self.automatic_optimization = run.strategy.name != "alternating"
        self.monitor = ReboundMonitor(run.monitor, start_epoch=run.strategy.resolved_warmup_epochs + run.monitor.grace_epochs)
        self.history: list[dict[str, float]] = []
        self.epoch_times: list[float] = []
        self._val: ValidationAccumulator | None = None
        # Minibatches in one pass over the training windows (the alternating strategy's loader
        # serves two passes per epoch: env, then policy); set by `train_planner`.
        self.batches_per_pass = 0
        self._epoch_start = 0.0

    def configure_optimizers(self):
        optim = self.run.optim
        groups = self.model.parameter_groups()
        if self.automatic_optimization:
            optimisers = [torch.optim.AdamW(self.model.parameters(), lr=optim.lr, weight_decay=optim.weight_decay)]
        else:
            optimisers = [
                torch.optim.AdamW(groups["env"], lr=optim.lr, weight_decay=optim.weight_decay),
                torch.optim.AdamW(groups["policy"], lr=optim.policy_lr or optim.lr, weight_decay=optim.weight_decay),
            ]
        if optim.schedule == "constant":
            return optimisers if len(optimisers) > 1 else optimisers[0]
        # Cosine decay over the run, stepped once per epoch (by Lightning, or by hand under manual optimisation).
        epochs = self.run.train.epochs
        schedulers = [
            torch.optim.lr_scheduler.CosineAnnealingLR(o, T_max=epochs, eta_min=optim.lr * optim.final_lr_factor) for o in optimisers
        ]
        return optimisers, [{"scheduler": s, "interval": "epoch"} for s in schedulers]

    def training_step(self, batch: WindowBatch, batch_idx: int):
        epoch = self.current_epoch
        size = batch.history.shape[0]
        if not self.automatic_optimization:
            if batch_idx < self.batches_per_pass:
                return self._alternating_env_step(batch, size)
            return self._alternating_policy_step(batch, epoch, size)
        searching = self.search.enabled and policy_active(self.strategy, epoch)
        losses, _ = planner_losses(self.model, batch, self.strategy, self.search, self._search if searching else None)
        for name, value in losses.as_floats().items():
            self.log(f"loss/{name}", value, on_step=False, on_epoch=True, batch_size=size)
        loss = combined_loss(losses, self.strategy, epoch)
        self.log("loss/total", loss.detach(), on_step=False, on_epoch=True, batch_size=size)
        return loss

    def _alternating_env_step(self, batch: WindowBatch, size: int) -> None:
        """Alternating, env pass: each epoch first passes over all
        minibatches stepping the env model on the env loss (Stage 1 only) with its own optimiser ..."""
        out = self.model(batch.history, batch.history_mask, batch.static, batch.actions)
        stage1 = dict(zip(("bis", "map", "reward", "value"), stage1_losses(self.model, out, batch)))
        env = sum(stage1.values())
        for name, value in {**stage1, "env": env}.items():
            self.log(f"loss/{name}", value.detach(), on_step=False, on_epoch=True, batch_size=size)
        env_opt, _ = self.optimizers()
        env_opt.zero_grad()
        self.manual_backward(self.strategy.resolved_env_weight * env)
        self._clip(env_opt)
        env_opt.step()

    def _alternating_policy_step(self, batch: WindowBatch, epoch: int, size: int) -> None:
        """... then over the same minibatches stepping the policy network on the policy loss,
        with states of the env model as it stands (no gradient reaches it)."""
        if not policy_active(self.strategy, epoch):
            return
        _, policy_opt = self.optimizers()
        loss = policy_pass_loss(self.model, batch, self.strategy, self.search, self._search if self.search.enabled else None)
        self.log("loss/policy", loss.detach(), on_step=False, on_epoch=True, batch_size=size)
        policy_opt.zero_grad()
        self.manual_backward(loss)
        self._clip(policy_opt)
        policy_opt.step()
        return

    def _search(self, batch: WindowBatch, out: PlannerOutput) -> SearchTargets:
        """MCTS targets for the batch from the forward pass's encoded history (weights kept for
        the epoch's activation rate)."""
        targets = search_targets(
            self.model,
            batch,
            self.search,
            self.run.windows.gamma,
            self.search_generator,
            out.memory,
            out.memory_padding,
            margin=self.margin,
        )
        self._weights.append(targets.weight)
        return targets

    def calibrate_margin(self) -> None:
        """Set the margin to the (1 - target_activation) quantile of Q_mcts - Q_expert over the
        calibration windows, searched as training will search them (own generator: training's
        search draws are unchanged by the calibration)."""
        if self.calibration is None:
            raise RuntimeError("search.target_activation needs calibration windows; train with train_planner")
        was_training = self.model.training
        self.model.eval()
        generator = torch.Generator().manual_seed(self.run.train.seed + 104729)
        gaps = []
        for start in range(0, len(self.calibration), self.run.train.batch_size):
            batch = self.calibration.rows(slice(start, start + self.run.train.batch_size))
            targets = search_targets(self.model, batch, self.search, self.run.windows.gamma, generator, margin=0.0)
            gaps.append(targets.q_mcts - targets.q_expert)
        self.model.train(was_training)
        self.margin = float(torch.quantile(torch.cat(gaps).double(), 1.0 - float(self.search.target_activation)))
        self.calibrated.append({"epoch": self.current_epoch, "margin": self.margin, "windows": int(sum(len(g) for g in gaps))})
        log.info("MCTS margin calibrated to %.4f return SDs at epoch %d", self.margin, self.current_epoch)

    def _record_activation(self) -> None:
        """The epoch's MCTS activation rate (share of windows whose target is the search's action),
        to the logs and the summary; an alarm outside `search.activation_alarm`."""
        if not self._weights:
            return
        rate = float(torch.cat(self._weights).mean())
        self._weights = []
        self.activation.append({"epoch": self.current_epoch, "rate": rate})
        self.log("mcts/activation_rate", rate)
        self.log("mcts/margin", float(self.margin))
        low, high = self.search.activation_alarm
        if not low <= rate <= high:
            alarm = {"epoch": self.current_epoch, "rate": rate, "low": low, "high": high}
            self.search_alarms.append(alarm)
            log.warning(
                "MCTS activation alarm: %.1f %% of windows took the search's action at epoch %d (healthy %.0f-%.0f %%)",
                100 * rate,
                self.current_epoch,
                100 * low,
                100 * high,
            )

    def _clip(self, optimizer) -> None:
        if self.run.optim.grad_clip:
            self.clip_gradients(optimizer, gradient_clip_val=self.run.optim.grad_clip, gradient_clip_algorithm="norm")

    def on_train_epoch_start(self) -> None:
        self._epoch_start = time.perf_counter()
        search = self.search
        calibrating = search.enabled and search.target_activation is not None and policy_active(self.strategy, self.current_epoch)
        if calibrating and (self.margin is None or search.calibrate == "every_epoch"):
            self.calibrate_margin()

    def on_train_epoch_end(self) -> None:
        if not self.automatic_optimization and self.run.optim.schedule != "constant":
            for scheduler in self.lr_schedulers():
                scheduler.step()
        elapsed = time.perf_counter() - self._epoch_start
        self.epoch_times.append(elapsed)
        self._record_activation()
        self.log("time/epoch_s", elapsed)
        self.log("charts/policy_active", float(policy_active(self.strategy, self.current_epoch)))

    def on_validation_epoch_start(self) -> None:
        self._val = ValidationAccumulator(self.run.windows.pre_len)

    def validation_step(self, batch: WindowBatch, batch_idx: int) -> None:
        losses, out = planner_losses(self.model, batch, self.strategy)
        self._val.add(self.model, out, batch, losses)

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking:
            return
        metrics = self._val.metrics()
        for name, value in metrics.items():
            self.log(name, value)
        raised = self.monitor.update(self.current_epoch, metrics)
        for alarm in raised:
            log.warning(
                "rebound alarm: %s = %.4g at epoch %d, worse than its best %.4g (epoch %d) by more than %.0f %% for %d epochs",
                alarm["metric"],
                alarm["value"],
                alarm["epoch"],
                alarm["best"],
                alarm["best_epoch"],
                100 * self.run.monitor.margin,
                self.run.monitor.patience,
            )
        self.log("alarm/rebounds", float(len(self.monitor.alarms)))
        self.history.append({"epoch": self.current_epoch, **metrics})

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
        self._clip(optimizer)


# -- entry point ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannerRun:
    """What `train_planner` returns: the trained module and the summary written to summary.json."""

    module: PlannerModule
    summary: dict[str, Any]

    @property
    def model(self) -> PlannerModel:
        return self.module.model


def save_planner(model: PlannerModel, run: PlannerRunConfig, path: str | Path, run_dir: str | Path | None = None) -> None:
    """model.pt: the resolved config and the state dict (statistics included), tensors and
    plain data only, so `torch.load(weights_only=True)` reads it; recorded in the manifest of
    ``run_dir`` (default: of its folder, when that has one)."""
    save_atomic({"format": MODEL_FORMAT, "config": run.model_dump(mode="json"), "state_dict": model.state_dict()}, path, run_dir)


def load_planner(path: str | Path) -> tuple[PlannerModel, PlannerRunConfig]:
    """Model (eval mode) and config from a model.pt or a run directory holding one, checked
    against the run's manifest.json."""
    path = Path(path)
    verify_manifest(path)
    if path.is_dir():
        path = path / "model.pt"
    saved = load_safe(path, MODEL_FORMAT)
    run = PlannerRunConfig.model_validate(saved["config"])
    model = PlannerModel(run.model, run.windows.max_len, run.windows.pre_len, concentrations=run.windows.concentrations)
    model.load_state_dict(saved["state_dict"])
    return model.eval(), run


def train_planner(
    run: PlannerRunConfig,
    train: Windows,
    val: Windows,
    out: str | Path,
    show_progress: bool = False,
) -> PlannerRun:
    """Train on `train` windows, validate on `val` every epoch; writes into `out`:
    config.yaml, tb/ (TensorBoard), csv/metrics.csv, checkpoints/ (Lightning: last.ckpt and the
    best val_bis_mae), model.pt, summary.json and manifest.json (SHA-256 of config.yaml and
    model.pt; dosewise never loads Lightning's checkpoints). Seeded: the same inputs give the same weights."""
    out = make_dir(out)
    new_manifest(out)
    save_config(run, out / "config.yaml", run_dir=out)
    torch.set_num_threads(run.train.threads)
    pl.seed_everything(run.train.seed, workers=True, verbose=False)
    gamma = run.windows.gamma
    train_tensors, val_tensors = window_tensors(train, gamma), window_tensors(val, gamma)
    stats = PlannerStats.from_windows(train)
    module = PlannerModule(run, stats)
    if run.search.enabled and run.search.target_activation is not None:
        rows = torch.randperm(len(train), generator=torch.Generator().manual_seed(run.train.seed + 15485863))
        rows = rows[: run.search.calibration_windows]
        module.calibration = train_tensors.rows(rows)
    passes = 2 if run.strategy.name == "alternating" else 1
    train_loader = batch_loader(
        train_tensors,
        run.train.batch_size,
        shuffle=True,
        seed=run.train.seed,
        passes=passes,
        per_epoch=run.train.windows_per_epoch,
    )
    module.batches_per_pass = len(train_loader) // passes
    trainer = pl.Trainer(
        max_epochs=run.train.epochs,
        accelerator="cpu",
        devices=1,
        logger=[TensorBoardLogger(out, name="tb", version=""), CSVLogger(out, name="csv", version="")],
        callbacks=[
            ModelCheckpoint(
                dirpath=out / "checkpoints",
                filename="best-{epoch}",
                monitor="val_bis_mae",
                mode="min",
                save_top_k=1,
                save_last=True,
            )
        ],
        deterministic=True,
        num_sanity_val_steps=0,
        enable_progress_bar=show_progress,
        enable_model_summary=False,
        log_every_n_steps=1,
        gradient_clip_val=None,
    )
    started = time.perf_counter()
    with warnings.catch_warnings():
        # pytorch-lightning 2.6 calls a torch pytree API that torch 2.13 deprecates; harmless.
        warnings.filterwarnings("ignore", message=".*LeafSpec.*")
        trainer.fit(
            module,
            train_dataloaders=train_loader,
            val_dataloaders=batch_loader(val_tensors, run.train.batch_size, shuffle=False),
        )
    wall = time.perf_counter() - started
    module.model.eval()
    save_planner(module.model, run, out / "model.pt", run_dir=out)
    summary = build_summary(module, run, len(train), len(val), wall)
    summary["constant_baseline"] = constant_baselines(stats, val_tensors)
    write_json_atomic(summary, out / "summary.json")
    return PlannerRun(module=module, summary=summary)


def constant_baselines(stats: PlannerStats, val: WindowBatch) -> dict[str, float]:
    """Validation MAE of predicting the training mean reward and return everywhere: a value or
    reward head that does no better than these has learned nothing about the state."""
    future, value_mask = val.future_mask, val.value_mask
    reward = (val.rewards - stats.reward_mean).abs()
    value = (val.values - stats.return_mean).abs()
    return {
        "val_reward_mae": float(masked_mean(reward.double(), future)),
        "val_value_mae": float(masked_mean(value.double(), value_mask)),
    }


def build_summary(module: PlannerModule, run: PlannerRunConfig, n_train: int, n_val: int, wall_s: float) -> dict[str, Any]:
    history = module.history
    final = {k: v for k, v in history[-1].items() if k != "epoch"} if history else {}
    best = {
        name: {"value": min(h[name] for h in history), "epoch": int(min(history, key=lambda h: h[name])["epoch"])}
        for name in (*ENV_METRICS, "val_action_mae_ppf", "val_action_mae_rftn")
        if history
    }
    return {
        "strategy": run.strategy.name,
        "warmup_epochs": run.strategy.resolved_warmup_epochs,
        "env_weight": run.strategy.resolved_env_weight,
        "stage2_rollout": module.strategy.stage2_rollout,
        "epochs": len(history),
        "train_windows": n_train,
        "val_windows": n_val,
        "parameters": sum(p.numel() for p in module.model.parameters()),
        "epoch_time_s": float(np.mean(module.epoch_times)) if module.epoch_times else None,
        "wall_time_s": wall_s,
        "prediction": "BIS and MAP MAE from the expected value of the categorical heads",
        "final": final,
        "best": best,
        "alarms": list(module.monitor.alarms),
        "search": {
            **run.search.model_dump(mode="json"),
            "margin_used": module.margin,
            "margin_calibration": module.calibrated,
            "activation": module.activation,
            "activation_alarms": module.search_alarms,
        },
        "monitor": run.monitor.model_dump(),
        "history": history,
    }
