"""The IQL training loop: sampling by index from tensors, TensorBoard, checkpoints, resume.

A run directory holds ``config.yaml`` (the resolved config), ``tb/`` (TensorBoard),
``checkpoints/step_XXXXXX.pt`` (resumable: networks, optimisers, sampler state) and
``model.pt`` (the inference bundle: networks, normalisation, feature ranges) and
``manifest.json`` (the SHA-256 of config.yaml, every checkpoint and model.pt; see
`dosewise.checkpoint`). Resume takes the newest checkpoint that matches the manifest and loads,
skipping (with a warning) any newer one a crash or the disk damaged. A resumed run
replays the same minibatches from the saved sampler state, so it ends with exactly the weights
of an uninterrupted run.

``seeds=[s1, ..., sK]`` trains an ensemble: K members on stacked weights in one process, each
with its own initialisation and minibatch stream, so member k is the run with seed ``sK`` alone
(within float tolerance). TensorBoard gets the members' mean (``loss/q``), their sd
(``loss/q/sd``) and every member (``loss/q/seed_3``); ``losses.json`` has the final values.
"""

from __future__ import annotations

import math
import re
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

from dosewise.algos.config import IQLRunConfig
from dosewise.algos.iql import IQL, Batch, IQLConfig
from dosewise.checkpoint import (
    CheckpointError,
    IntegrityWarning,
    load_safe,
    make_dir,
    manifest_problem,
    new_manifest,
    read_manifest,
    remove_stale_temp_files,
    save_atomic,
    write_json_atomic,
)
from dosewise.config import save_config
from dosewise.data.schema import DataConfig
from dosewise.data.transitions import Normalizer, Transitions

# /2: stacked networks (one flat tensor per network, a leading member axis) and an ensemble's seeds.
CHECKPOINT_FORMAT = "dosewise.iql.checkpoint/2"
MODEL_FORMAT = "dosewise.iql.model/2"


class TrainingError(RuntimeError):
    """Training cannot start or continue (a clashing run directory, diverged losses); the message says why."""


def checkpoint_path(out_dir: Path, step: int) -> Path:
    return out_dir / "checkpoints" / f"step_{step:06d}.pt"


def checkpoints(out_dir: Path) -> list[Path]:
    """The run's checkpoint files, oldest step first."""
    found = [(int(m[1]), p) for p in (Path(out_dir) / "checkpoints").glob("step_*.pt") if (m := re.fullmatch(r"step_(\d+)\.pt", p.name))]
    return [p for _, p in sorted(found)]


def latest_checkpoint(out_dir: Path) -> Path | None:
    found = checkpoints(out_dir)
    return found[-1] if found else None


def intact_checkpoint(out_dir: Path) -> tuple[Path, dict] | None:
    """The newest checkpoint that matches manifest.json and loads, and its contents; None when there
    is no checkpoint. Every newer, damaged one (truncated, bit-flipped, not a zip, not in the
    manifest) is skipped with an IntegrityWarning naming it and the one used instead."""
    found = checkpoints(out_dir)
    if not found:
        return None
    manifest = read_manifest(out_dir)
    if manifest is None:
        warnings.warn(
            f"{out_dir}: no manifest.json to check the checkpoints against (runs trained by earlier dosewise versions have none); "
            "resuming from the newest one that loads",
            IntegrityWarning,
            stacklevel=3,
        )
    damaged: list[str] = []
    for ckpt in reversed(found):
        problem = None if manifest is None else manifest_problem(manifest, out_dir, ckpt)
        if problem is not None:
            damaged.append(f"{ckpt}: {problem}")
            continue
        try:
            saved = load_safe(ckpt, CHECKPOINT_FORMAT)
        except CheckpointError as err:
            damaged.append(str(err))
            continue
        for reason in damaged:
            warnings.warn(
                f"skipped damaged checkpoint {reason}; resuming from {ckpt} (step {saved['step']})", IntegrityWarning, stacklevel=3
            )
        return ckpt, saved
    raise TrainingError(f"{out_dir}: no intact checkpoint to resume from; " + "; ".join(damaged))


def data_tensors(transitions: Transitions, normalizer: Normalizer) -> Batch:
    """The whole dataset as one Batch of tensors [N, ...], states normalised."""
    as_t = lambda x: torch.tensor(np.asarray(x), dtype=torch.float32)
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
        "seeds": list(learner.seeds),
        "member_configs": [c.model_dump(mode="json") for c in learner.member_configs],
        "networks": learner.nets.state_dict(),
    }


def sample(data: Batch, samplers: Sequence[torch.Generator], batch_size: int) -> Batch:
    """One minibatch per member, each drawn from its own stream: fields [K, B, ...]."""
    n = data.obs.shape[0]
    idx = torch.stack([torch.randint(n, (batch_size,), generator=g) for g in samplers])
    return Batch(*(field[idx] for field in data))


def log_values(metrics: dict[str, torch.Tensor], labels: Sequence[str]) -> dict[str, float]:
    """Per-member metrics [K] -> scalars: one member as is; an ensemble as mean, sd and every member."""
    table = torch.stack(list(metrics.values())).tolist()  # the one wait for the device per log
    values: dict[str, float] = {}
    for key, row in zip(metrics, table):
        if len(labels) == 1:
            values[key] = row[0]
            continue
        values[key] = sum(row) / len(row)
        values[f"{key}/sd"] = math.sqrt(sum((x - values[key]) ** 2 for x in row) / (len(row) - 1))
        values.update({f"{key}/{label}": x for label, x in zip(labels, row)})
    return values


def summarize_members(metrics: dict[str, torch.Tensor], seeds: Sequence[int], labels: Sequence[str] | None = None) -> dict:
    """The final metrics per member and as mean and sd over members (``losses.json``)."""
    table = {key: value.reshape(-1).tolist() for key, value in metrics.items()}
    summary = {}
    for key, row in table.items():
        mean = sum(row) / len(row)
        sd = math.sqrt(sum((x - mean) ** 2 for x in row) / (len(row) - 1)) if len(row) > 1 else 0.0
        summary[key] = {"mean": mean, "sd": sd}
    labels = [str(s) for s in seeds] if labels is None else list(labels)
    return {
        "seeds": list(seeds),
        "per_member": {name: {k: row[i] for k, row in table.items()} for i, name in enumerate(labels)},
        "summary": summary,
    }


def record_found_features(run: IQLRunConfig, feature_names: Sequence[str]) -> IQLRunConfig:
    """The run as it is saved: optional state columns the data had (`DataConfig.optional_features`)
    become part of `data.features`, so the saved config, like the model, asks for exactly the columns
    it was trained on. A run whose data had none of them is returned unchanged."""
    names = tuple(feature_names)
    if names == run.data.features or names != run.data.state_features(names):
        return run
    return run.model_copy(update={"data": run.data.with_features(names)})


def _resume_state(out_dir: Path, run: IQLRunConfig, resume: bool, seeds: list[int], labels: list[str]) -> tuple[Path, dict] | None:
    """The newest intact checkpoint of `out_dir` and its contents (loaded once) when resuming a run
    of the same config, data, seeds and members; None for a fresh run into an empty directory."""
    if not resume:
        if latest_checkpoint(out_dir) is not None or (out_dir / "model.pt").exists():
            raise TrainingError(f"{out_dir} already holds a training run; pass --resume to continue it or choose another --out")
        return None
    found = intact_checkpoint(out_dir)
    if found is None:
        raise TrainingError(f"{out_dir}: no checkpoint to resume from (looked in {out_dir / 'checkpoints'})")
    ckpt, saved = found
    config, mine = saved["run_config"], run.model_dump(mode="json")
    # Runs saved before DataConfig had optional_features read as its default.
    config = {**config, "data": DataConfig.model_validate(config["data"]).model_dump(mode="json")}
    for key in ("data", "iql", "data_path"):
        if config[key] != mine[key]:
            raise TrainingError(f"{ckpt}: saved run used a different {key!r} config; resume with the same config and data")
    if config["train"]["seed"] != mine["train"]["seed"]:
        raise TrainingError(f"{ckpt}: saved run used seed {config['train']['seed']}, not {mine['train']['seed']}")
    if saved["seeds"] != seeds:
        raise TrainingError(f"{ckpt}: saved run trained seeds {saved['seeds']}, not {seeds}; resume with the same --seeds")
    if saved["members"] != labels:
        raise TrainingError(f"{ckpt}: saved run trained members {saved['members']}, not {labels}; resume with the same sweep")
    return ckpt, saved


def train_iql(
    run: IQLRunConfig,
    transitions: Transitions,
    out_dir: str | Path,
    resume: bool = False,
    show_progress: bool = True,
    seeds: Sequence[int] | None = None,
    compile: bool = False,
    member_configs: Sequence[IQLConfig] | None = None,
    labels: Sequence[str] | None = None,
) -> IQL:
    """Train IQL on ``transitions`` into ``out_dir``; returns the learner after ``run.train.steps`` steps.

    ``seeds`` (default ``[run.train.seed]``) trains one ensemble member per seed; ``compile`` runs
    the update through torch.compile (faster steps, up to ~30 s to compile; see `IQL`).
    ``member_configs`` and ``labels`` are a sweep's (`dosewise.algos.sweep`): a config and a
    name per member; seeds may then repeat."""
    out_dir = make_dir(out_dir)
    seeds = [run.train.seed] if seeds is None else [int(s) for s in seeds]
    if not seeds or (member_configs is None and len(set(seeds)) != len(seeds)):
        raise TrainingError(f"ensemble seeds must be distinct and at least one, got {seeds}")
    labels = [f"seed_{s}" for s in seeds] if labels is None else list(labels)
    run = record_found_features(run, transitions.feature_names)
    resumed = _resume_state(out_dir, run, resume, seeds, labels)
    tc = run.train

    normalizer = Normalizer.fit(transitions.observations)
    data = data_tensors(transitions, normalizer)
    obs_dim, action_dim = transitions.observations.shape[1], transitions.actions.shape[1]
    learner = IQL(obs_dim, action_dim, run.iql, seeds=seeds, compile=compile, member_configs=member_configs)
    samplers = [torch.Generator().manual_seed(s) for s in seeds]
    start = 0
    if resumed is not None:
        ckpt, state = resumed
        learner.load_state_dict(state["learner"])
        for sampler, saved in zip(samplers, state["sampler"]):
            sampler.set_state(saved.clone())  # a row of the stacked states, as its own tensor
        start = int(state["step"])
        if start > tc.steps:
            raise TrainingError(f"{ckpt} is at step {start}, past the requested {tc.steps} steps")
    # Only once the run is sure to start: what a killed writer left is removed, a fresh run starts
    # its own manifest, and config.yaml is the first file in it.
    remove_stale_temp_files(out_dir, out_dir / "checkpoints")
    if resumed is None:
        new_manifest(out_dir)
    save_config(run, out_dir / "config.yaml", run_dir=out_dir)

    from torch.utils.tensorboard import (
        SummaryWriter,  # imported late: it is slow to import
    )

    writer = SummaryWriter(str(out_dir / "tb"), purge_step=start + 1 if start else None)
    threads_before = torch.get_num_threads()
    torch.set_num_threads(tc.threads)
    batch_size = run.iql.batch_size
    metrics: dict[str, torch.Tensor] = {}
    columns = [
        TextColumn("[bold]IQL"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn("{task.fields[losses]}"),
    ]
    try:
        with Progress(*columns, disable=not show_progress, transient=False) as progress:
            task = progress.add_task("train", total=tc.steps, completed=start, losses="")
            for step in range(start + 1, tc.steps + 1):
                metrics = learner.update(sample(data, samplers, batch_size))
                checkpoint_now = bool(tc.checkpoint_every) and step % tc.checkpoint_every == 0
                # Losses are checked before every checkpoint too, so no checkpoint ever holds NaN weights.
                if step % tc.log_every == 0 or step == tc.steps or checkpoint_now:
                    values = log_values(metrics, labels)
                    for key, value in values.items():
                        writer.add_scalar(key, value, step)
                    if not all(math.isfinite(v) for v in values.values()):
                        bad = [name for i, name in enumerate(labels) if not all(math.isfinite(float(m[i])) for m in metrics.values())]
                        raise TrainingError(
                            f"training diverged at step {step}"
                            + (f" ({', '.join(bad)})" if len(seeds) > 1 else "")
                            + ": "
                            + ", ".join(f"{k}={v:.3g}" for k, v in values.items() if k.count("/") == 1 and k.startswith("loss/"))
                            + "; lower iql.lr, or check the data for extreme rewards"
                        )
                    progress.update(task, losses=f"q {values['loss/q']:.3f}  v {values['loss/v']:.3f}  pi {values['loss/pi']:.3f}")
                if checkpoint_now:
                    save_atomic(
                        {
                            "format": CHECKPOINT_FORMAT,
                            "step": step,
                            "run_config": run.model_dump(mode="json"),
                            "seeds": seeds,
                            "members": labels,
                            "learner": learner.state_dict(),
                            "sampler": torch.stack([g.get_state() for g in samplers]),
                        },
                        checkpoint_path(out_dir, step),
                        run_dir=out_dir,
                    )
                progress.advance(task)
    finally:
        writer.close()
        torch.set_num_threads(threads_before)
    if metrics:  # a run resumed at its last step takes no step and keeps its losses.json
        member_labels = None if member_configs is None else labels
        write_json_atomic(summarize_members(metrics, seeds, member_labels), out_dir / "losses.json")
    save_atomic(model_bundle(learner, run, transitions, normalizer, tc.steps), out_dir / "model.pt", run_dir=out_dir)
    return learner


__all__ = [
    "CHECKPOINT_FORMAT",
    "MODEL_FORMAT",
    "CheckpointError",
    "TrainingError",
    "checkpoints",
    "data_tensors",
    "intact_checkpoint",
    "latest_checkpoint",
    "record_found_features",
    "sample",
    "train_iql",
]
