"""The IQL training loop: sampling by index from tensors, TensorBoard, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved config), ``tb/`` (TensorBoard),
``checkpoints/step_XXXXXX.pt`` (resumable: networks, optimisers, sampler state) and
``model.pt`` (the inference bundle: networks, normalisation, feature ranges). A resumed run
replays the same minibatches from the saved sampler state, so it ends with exactly the weights
of an uninterrupted run.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from dosewise.algos.iql import IQL, Batch
from dosewise.checkpoint import CheckpointError, load_safe, save_atomic
from dosewise.config import IQLRunConfig, save_config
from dosewise.data.transitions import Normalizer, Transitions

CHECKPOINT_FORMAT = "dosewise.iql.checkpoint/1"
MODEL_FORMAT = "dosewise.iql.model/1"


class TrainingError(RuntimeError):
    """Training cannot start or continue (a clashing run directory, diverged losses); the message says why."""


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:06d}.pt"


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = sorted((out_dir / "checkpoints").glob("step_*.pt"), key=lambda p: int(re.findall(r"\d+", p.stem)[0]))
    return found[-1] if found else None


def _tensors(transitions: Transitions, normalizer: Normalizer) -> Batch:
    as_t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)  # noqa: E731  (copies)
    return Batch(
        obs=as_t(normalizer.normalize(transitions.observations)),
        action=as_t(transitions.actions),
        reward=as_t(transitions.rewards),
        next_obs=as_t(normalizer.normalize(transitions.next_observations)),
        done=as_t(transitions.dones),
    )


def model_bundle(learner: IQL, run: IQLRunConfig, transitions: Transitions, normalizer: Normalizer, step: int) -> dict:
    """Everything inference needs, in plain types and tensors only (loadable with weights_only=True)."""
    obs = transitions.observations
    return {
        "format": MODEL_FORMAT,
        "step": step,
        "run_config": run.model_dump(mode="json"),
        "feature_names": list(transitions.feature_names),
        "normalizer": normalizer.to_dict(),
        "feature_ranges": {n: [float(obs[:, j].min()), float(obs[:, j].max())] for j, n in enumerate(transitions.feature_names)},
        "action_bounds": [run.data.action_low, run.data.action_high],
        "networks": learner.nets.state_dict(),
    }


def _check_run_dir(out_dir: Path, run: IQLRunConfig, resume: bool) -> Path | None:
    ckpt = latest_checkpoint(out_dir)
    if not resume:
        if ckpt is not None or (out_dir / "model.pt").exists():
            raise TrainingError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
        return None
    if ckpt is None:
        raise TrainingError(f"{out_dir}: no checkpoint to resume from (looked in {out_dir / 'checkpoints'})")
    saved = load_safe(ckpt, CHECKPOINT_FORMAT)["run_config"]
    mine = run.model_dump(mode="json")
    for key in ("data", "iql", "data_path"):
        if saved[key] != mine[key]:
            raise TrainingError(f"{ckpt}: saved run used a different {key!r} config; resume with the same config and data")
    if saved["train"]["seed"] != mine["train"]["seed"]:
        raise TrainingError(f"{ckpt}: saved run used seed {saved['train']['seed']}, not {mine['train']['seed']}")
    return ckpt


def train_iql(
    run: IQLRunConfig,
    transitions: Transitions,
    out_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
) -> IQL:
    """Train IQL on ``transitions`` into ``out_dir``; returns the learner after ``run.train.steps`` steps."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    ckpt = _check_run_dir(out_dir, run, resume)
    tc = run.train

    normalizer = Normalizer.fit(transitions.observations)
    data = _tensors(transitions, normalizer)
    learner = IQL(transitions.observations.shape[1], transitions.actions.shape[1], run.iql, seed=tc.seed)
    sampler = torch.Generator().manual_seed(tc.seed)
    start = 0
    if ckpt is not None:
        state = load_safe(ckpt, CHECKPOINT_FORMAT)
        learner.load_state_dict(state["learner"])
        sampler.set_state(state["sampler"])
        start = int(state["step"])
        if start > tc.steps:
            raise TrainingError(f"{ckpt} is at step {start}, past the requested {tc.steps} steps")
    save_config(run, out_dir / "config.yaml")  # only once the run is sure to start

    from torch.utils.tensorboard import SummaryWriter  # imported late: it is slow to import

    writer = SummaryWriter(str(out_dir / "tb"), purge_step=start + 1 if start else None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(tc.threads)
    n, batch_size = transitions.n, run.iql.batch_size
    columns = [TextColumn("[bold]IQL"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[losses]}")]
    try:
        with Progress(*columns, disable=not show_progress, transient=False) as progress:
            task = progress.add_task("train", total=tc.steps, completed=start, losses="")
            for step in range(start + 1, tc.steps + 1):
                idx = torch.randint(n, (batch_size,), generator=sampler)
                metrics = learner.update(Batch(*(field[idx] for field in data)))
                checkpoint_now = bool(tc.checkpoint_every) and step % tc.checkpoint_every == 0
                # Losses are checked before every checkpoint too, so no checkpoint ever holds NaN weights.
                if step % tc.log_every == 0 or step == tc.steps or checkpoint_now:
                    values = dict(zip(metrics, torch.stack(list(metrics.values())).tolist()))
                    for key, value in values.items():
                        writer.add_scalar(key, value, step)
                    if not all(math.isfinite(v) for v in values.values()):
                        raise TrainingError(
                            f"training diverged at step {step}: "
                            + ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k.startswith("loss/"))
                            + "; lower iql.lr, or check the data for extreme rewards"
                        )
                    progress.update(task, losses=f"q {values['loss/q']:.3f}  v {values['loss/v']:.3f}  pi {values['loss/pi']:.3f}")
                if checkpoint_now:
                    save_atomic(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "step": step,
                            "run_config": run.model_dump(mode="json"),
                            "learner": learner.state_dict(),
                            "sampler": sampler.get_state(),
                        },
                        checkpoint_path(out_dir, step),
                    )
                progress.advance(task)
    finally:
        writer.close()
        torch.set_num_threads(threads_before)
    save_atomic(model_bundle(learner, run, transitions, normalizer, tc.steps), out_dir / "model.pt")
    return learner


__all__ = ["train_iql", "TrainingError", "CheckpointError", "latest_checkpoint", "MODEL_FORMAT", "CHECKPOINT_FORMAT"]
