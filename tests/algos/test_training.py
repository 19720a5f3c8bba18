"""The training loop's promises: exact resume, safe files, refusals with a reason, divergence stops,
TensorBoard scalars, and the TrainedIQL view of the saved model."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from dosewise.algos.config import IQLRunConfig
from dosewise.algos.trained import ACTION_GRID_SIZE, TrainedIQL
from dosewise.algos.training import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    TrainingError,
    checkpoint_path,
    latest_checkpoint,
    train_iql,
)
from dosewise.checkpoint import CheckpointError, load_safe, save_atomic
from dosewise.config import load_config
from dosewise.data.transitions import Normalizer

STEPS = 60
EVERY = 20


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _temp_files(folder: Path) -> list[str]:
    """Leftovers of save_atomic (".NAME.XXXX.tmp"), found by walking, so dot-files are not missed."""
    return [name for _, _, names in os.walk(folder) for name in names if name.endswith(".tmp")]


def _assert_same_tensors(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], dict):
            _assert_same_tensors(a[key], b[key])
        elif isinstance(a[key], torch.Tensor):
            assert torch.equal(a[key], b[key]), key
        else:
            assert a[key] == b[key], key


def _scalars(run_dir: Path, tag: str) -> list[tuple[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir / "tb"))
    acc.Reload()
    return [(e.step, e.value) for e in acc.Scalars(tag)]


@pytest.fixture(scope="module")
def run(make_run) -> IQLRunConfig:
    return make_run(("level", "creat", "hr"), train=dict(steps=STEPS, checkpoint_every=EVERY, log_every=10))


@pytest.fixture(scope="module")
def full_run(tmp_path_factory: pytest.TempPathFactory, run: IQLRunConfig, small_data, _one_torch_thread):
    """An uninterrupted run of STEPS steps; tests that modify it work on a copy."""
    out = tmp_path_factory.mktemp("full")
    learner = train_iql(run, small_data, out, show_progress=False)
    return out, learner


def _copy(full_run, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(full_run[0], dst)
    return dst


def _networks(run_dir: Path) -> dict:
    return load_safe(run_dir / "model.pt", MODEL_FORMAT)["networks"]


# -- resume ---------------------------------------------------------------------------------------


def test_resumed_run_ends_with_bitwise_the_same_weights(tmp_path: Path, full_run, run, make_run, small_data) -> None:
    split = tmp_path / "split"
    first = make_run(("level", "creat", "hr"), train=dict(steps=EVERY, checkpoint_every=EVERY, log_every=10))
    train_iql(first, small_data, split, show_progress=False)
    assert load_safe(split / "model.pt", MODEL_FORMAT)["step"] == EVERY
    train_iql(run, small_data, split, resume=True, show_progress=False)

    full = full_run[0]
    _assert_same_tensors(_networks(full), _networks(split))
    # the resumable state too: optimisers and sampler of the last checkpoint
    a = load_safe(checkpoint_path(full, STEPS), CHECKPOINT_FORMAT)
    b = load_safe(checkpoint_path(split, STEPS), CHECKPOINT_FORMAT)
    _assert_same_tensors(a["learner"], b["learner"])
    assert torch.equal(a["sampler"], b["sampler"])
    assert load_config(split / "config.yaml", IQLRunConfig) == run
    # and the same losses were logged, once per step (the first run's events up to step 20 are kept)
    assert _scalars(split, "loss/q") == _scalars(full, "loss/q")


def test_resume_from_an_earlier_checkpoint_after_a_crash(tmp_path: Path, full_run, run, small_data) -> None:
    crashed = _copy(full_run, tmp_path)
    (crashed / "model.pt").unlink()
    checkpoint_path(crashed, STEPS).unlink()
    assert latest_checkpoint(crashed) == checkpoint_path(crashed, 40)
    train_iql(run, small_data, crashed, resume=True, show_progress=False)
    _assert_same_tensors(_networks(full_run[0]), _networks(crashed))
    # TensorBoard events after step 40 from before the crash are purged, not duplicated
    assert [step for step, _ in _scalars(crashed, "loss/q")] == [10, 20, 30, 40, 50, 60]


def test_resume_from_the_final_checkpoint_only_rewrites_the_model(tmp_path: Path, full_run, run, small_data) -> None:
    done = _copy(full_run, tmp_path)
    (done / "model.pt").unlink()
    train_iql(run, small_data, done, resume=True, show_progress=False)
    _assert_same_tensors(_networks(full_run[0]), _networks(done))


def test_returned_learner_is_the_saved_model(full_run) -> None:
    out, learner = full_run
    _assert_same_tensors(learner.nets.state_dict(), _networks(out))


# -- files ----------------------------------------------------------------------------------------


def test_checkpoints_model_and_config_are_written(full_run, run, small_data) -> None:
    out = full_run[0]
    files = _files(out)
    assert [f for f in files if f.startswith("checkpoints")] == [
        "checkpoints/step_000020.pt",
        "checkpoints/step_000040.pt",
        "checkpoints/step_000060.pt",
    ]
    assert "model.pt" in files and "config.yaml" in files
    assert _temp_files(out) == []

    for step in (20, 40, 60):
        ckpt = load_safe(checkpoint_path(out, step), CHECKPOINT_FORMAT)
        assert ckpt["step"] == step
        assert ckpt["run_config"] == run.model_dump(mode="json")
        assert set(ckpt["learner"]) == {"nets", "adam"}
        assert isinstance(ckpt["sampler"], torch.Tensor)

    assert load_config(out / "config.yaml", IQLRunConfig) == run

    model = load_safe(out / "model.pt", MODEL_FORMAT)
    assert model["step"] == STEPS
    assert model["feature_names"] == ["level", "creat", "hr"]
    assert model["action_bounds"] == [-1.0, 1.0]
    obs = small_data.observations
    for j, name in enumerate(model["feature_names"]):
        assert model["feature_ranges"][name] == [float(obs[:, j].min()), float(obs[:, j].max())]
    fitted = Normalizer.fit(obs)
    np.testing.assert_array_equal(model["normalizer"]["mean"], fitted.mean)
    np.testing.assert_array_equal(model["normalizer"]["std"], fitted.std)


def test_checkpoint_and_model_formats_are_not_interchangeable(full_run) -> None:
    out = full_run[0]
    with pytest.raises(CheckpointError, match="expected format"):
        load_safe(checkpoint_path(out, 20), MODEL_FORMAT)
    with pytest.raises(CheckpointError, match="expected format"):
        TrainedIQL.load(checkpoint_path(out, 20))
    with pytest.raises(CheckpointError, match="expected format"):
        load_safe(out / "model.pt", CHECKPOINT_FORMAT)


def test_checkpoint_every_zero_writes_only_the_model(tmp_path: Path, make_run, small_data) -> None:
    cfg = make_run(("level", "creat", "hr"), train=dict(steps=15, checkpoint_every=0, log_every=10))
    train_iql(cfg, small_data, tmp_path, show_progress=False)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))
    assert load_safe(tmp_path / "model.pt", MODEL_FORMAT)["step"] == 15
    # the last step is always logged, even when it is not a multiple of log_every
    assert [step for step, _ in _scalars(tmp_path, "loss/q")] == [10, 15]


# -- refusals -------------------------------------------------------------------------------------


def test_training_into_an_existing_run_without_resume_is_refused(tmp_path: Path, full_run, run, small_data) -> None:
    out = _copy(full_run, tmp_path)
    before = (out / "model.pt").read_bytes()
    with pytest.raises(TrainingError, match="--resume"):
        train_iql(run, small_data, out, show_progress=False)
    assert (out / "model.pt").read_bytes() == before


def test_a_finished_run_without_checkpoints_is_also_protected(tmp_path: Path, make_run, small_data) -> None:
    cfg = make_run(("level", "creat", "hr"), train=dict(steps=5, checkpoint_every=0))
    train_iql(cfg, small_data, tmp_path, show_progress=False)
    with pytest.raises(TrainingError, match="--resume"):
        train_iql(cfg, small_data, tmp_path, show_progress=False)


def test_resume_without_a_checkpoint_is_refused(tmp_path: Path, run, small_data) -> None:
    with pytest.raises(TrainingError, match="no checkpoint"):
        train_iql(run, small_data, tmp_path, resume=True, show_progress=False)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    ("change", "mentions"),
    [
        (dict(iql=dict(lr=2e-3)), "'iql'"),
        (dict(iql=dict(hidden=(8, 8))), "'iql'"),
        (dict(train=dict(seed=1)), "seed"),
    ],
)
def test_resume_with_a_different_config_is_refused(tmp_path: Path, full_run, make_run, small_data, change, mentions) -> None:
    out = _copy(full_run, tmp_path)
    train = dict(steps=STEPS + 20, checkpoint_every=EVERY, log_every=10)
    train.update(change.get("train", {}))
    other = make_run(("level", "creat", "hr"), iql=change.get("iql"), train=train)
    with pytest.raises(TrainingError, match=mentions):
        train_iql(other, small_data, out, resume=True, show_progress=False)
    _assert_same_tensors(_networks(full_run[0]), _networks(out))


def test_resume_past_the_requested_steps_is_refused(tmp_path: Path, full_run, make_run, small_data) -> None:
    out = _copy(full_run, tmp_path)
    shorter = make_run(("level", "creat", "hr"), train=dict(steps=30, checkpoint_every=EVERY, log_every=10))
    with pytest.raises(TrainingError, match="past the requested 30 steps"):
        train_iql(shorter, small_data, out, resume=True, show_progress=False)
    _assert_same_tensors(_networks(full_run[0]), _networks(out))


def test_refused_resume_leaves_config_yaml_alone(tmp_path: Path, full_run, run, make_run, small_data) -> None:
    out = _copy(full_run, tmp_path)
    shorter = make_run(("level", "creat", "hr"), train=dict(steps=30, checkpoint_every=EVERY, log_every=10))
    with pytest.raises(TrainingError):
        train_iql(shorter, small_data, out, resume=True, show_progress=False)
    assert load_config(out / "config.yaml", IQLRunConfig) == run


# -- divergence -----------------------------------------------------------------------------------


@pytest.mark.parametrize("reward", [1e38, math.inf, -math.inf, math.nan])
def test_non_finite_losses_stop_training(tmp_path: Path, make_run, make_transitions, reward: float) -> None:
    rng = np.random.default_rng(0)
    n = 64
    data = make_transitions(rng.normal(size=(n, 2)), rng.uniform(-1, 1, n), np.full(n, reward))
    cfg = make_run(data.feature_names, train=dict(steps=40, checkpoint_every=0, log_every=5))
    with pytest.raises(TrainingError, match="diverged at step 5") as err:
        train_iql(cfg, data, tmp_path, show_progress=False)
    assert "loss/q=" in str(err.value)
    assert not (tmp_path / "model.pt").exists()
    assert _temp_files(tmp_path) == []


def test_no_checkpoint_holds_weights_of_a_diverged_run(tmp_path: Path, make_transitions, make_run) -> None:
    rng = np.random.default_rng(0)
    n = 64
    data = make_transitions(rng.normal(size=(n, 2)), rng.uniform(-1, 1, n), np.full(n, np.inf))
    cfg = make_run(data.feature_names, train=dict(steps=40, checkpoint_every=2, log_every=50))
    with pytest.raises(TrainingError, match="diverged at step 2"):
        train_iql(cfg, data, tmp_path, show_progress=False)
    assert not list((tmp_path / "checkpoints").glob("*.pt"))


# -- TensorBoard ----------------------------------------------------------------------------------


def test_tensorboard_has_the_loss_scalars(full_run) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = full_run[0]
    assert list((out / "tb").glob("events.out.tfevents.*"))
    acc = EventAccumulator(str(out / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/q", "loss/v", "loss/pi", "values/q_mean", "values/v_mean", "values/awr_weight_mean"} <= tags
    for tag in ("loss/q", "loss/v", "loss/pi"):
        events = acc.Scalars(tag)
        assert [e.step for e in events] == [10, 20, 30, 40, 50, 60]
        assert all(math.isfinite(e.value) for e in events)
    assert all(e.value >= 0 for e in acc.Scalars("loss/q"))


# -- checkpoint files -----------------------------------------------------------------------------


def test_save_atomic_round_trip_and_overwrite(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "file.pt"  # parent folders are created
    save_atomic({"format": "f/1", "x": torch.arange(3)}, path)
    save_atomic({"format": "f/1", "x": torch.arange(4)}, path)
    assert torch.equal(load_safe(path, "f/1")["x"], torch.arange(4))
    assert os.listdir(path.parent) == ["file.pt"]


def test_failed_save_keeps_the_previous_file_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = tmp_path / "model.pt"
    save_atomic({"format": "f/1", "x": torch.ones(2)}, path)
    before = path.read_bytes()
    with pytest.raises(Exception):  # noqa: B017  (pickling a lambda fails; the exact type is torch's business)
        save_atomic({"format": "f/1", "x": torch.zeros(2), "bad": lambda: 0}, path)
    assert path.read_bytes() == before
    assert torch.equal(load_safe(path, "f/1")["x"], torch.ones(2))
    assert os.listdir(tmp_path) == ["model.pt"]


class _Payload:
    """Unpickling this would run code: it must never happen in load_safe."""

    marker: Path | None = None

    def __reduce__(self):
        return (Path.touch, (self.marker,))


class _Plain:
    def __init__(self) -> None:
        self.format = "f/1"


def test_load_safe_refuses_pickled_code(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = marker
    path = tmp_path / "evil.pt"
    torch.save({"format": "f/1", "x": payload}, path)
    with pytest.raises(CheckpointError, match="not a readable dosewise file"):
        load_safe(path, "f/1")
    assert not marker.exists()


def test_load_safe_refuses_arbitrary_objects(tmp_path: Path) -> None:
    path = tmp_path / "obj.pt"
    torch.save(_Plain(), path)
    with pytest.raises(CheckpointError, match="not a readable dosewise file"):
        load_safe(path, "f/1")


def test_load_safe_refuses_wrong_format_non_dicts_garbage_and_missing_files(tmp_path: Path) -> None:
    path = tmp_path / "a.pt"
    torch.save({"format": "other/1"}, path)
    with pytest.raises(CheckpointError, match=r"expected format 'f/1', found 'other/1'"):
        load_safe(path, "f/1")
    torch.save({"no": "format"}, path)
    with pytest.raises(CheckpointError, match="found None"):
        load_safe(path, "f/1")
    torch.save(torch.zeros(2), path)
    with pytest.raises(CheckpointError, match="found 'Tensor'"):
        load_safe(path, "f/1")
    path.write_bytes(b"not a torch file at all")
    with pytest.raises(CheckpointError, match="not a readable dosewise file"):
        load_safe(path, "f/1")
    with pytest.raises(CheckpointError, match="file not found"):
        load_safe(tmp_path / "missing.pt", "f/1")
    with pytest.raises(CheckpointError, match="file not found"):
        load_safe(tmp_path, "f/1")  # a folder is not a file


# -- TrainedIQL -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(full_run) -> TrainedIQL:
    return TrainedIQL.load(full_run[0])


def test_trained_load_without_model_explains(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="no model.pt") as err:
        TrainedIQL.load(tmp_path)
    assert "dosewise train iql" in str(err.value)
    with pytest.raises(CheckpointError, match="file not found"):
        TrainedIQL.load(tmp_path / "model.pt")


def test_trained_load_accepts_the_folder_or_the_file(full_run, model: TrainedIQL, run: IQLRunConfig) -> None:
    direct = TrainedIQL.load(full_run[0] / "model.pt")
    assert direct.step == model.step == STEPS
    assert model.run_config == run
    assert model.config == run.iql
    assert model.feature_names == ("level", "creat", "hr")
    assert (model.action_low, model.action_high) == (-1.0, 1.0)


def test_trained_rejects_a_bundle_that_does_not_match_its_networks(full_run) -> None:
    bundle = load_safe(full_run[0] / "model.pt", MODEL_FORMAT)
    broken = dict(bundle, feature_names=["level", "creat"])  # networks expect 3 inputs
    with pytest.raises(CheckpointError, match="does not match"):
        TrainedIQL(broken, "x.pt")
    incomplete = {k: v for k, v in bundle.items() if k != "normalizer"}
    with pytest.raises(CheckpointError, match="incomplete"):
        TrainedIQL(incomplete, "x.pt")


def test_trained_numpy_api_shapes_and_bounds(model: TrainedIQL, small_data) -> None:
    obs = small_data.observations[:17]
    action = model.policy_action(obs)
    assert action.shape == (17,)
    assert np.all((action >= -1) & (action <= 1))
    curve = model.q_curve(obs)
    assert curve.shape == (17, ACTION_GRID_SIZE) == (17, 101)
    grid = model.action_grid()
    assert grid.shape == (101,) and grid[0] == -1 and grid[-1] == 1 and grid[50] == 0
    np.testing.assert_array_equal(model.greedy_action(obs), grid[curve.argmax(axis=1)])
    assert model.value(obs).shape == (17,)
    # one state as a flat vector is a batch of one
    assert model.policy_action(obs[0]).shape == (1,)
    # the curve agrees with pointwise Q
    np.testing.assert_allclose(curve[:, 30], model.q_value(obs, np.full(17, grid[30])), rtol=1e-5, atol=1e-6)
    # a custom grid
    small = np.array([-0.5, 0.0, 0.5], dtype=np.float32)
    assert model.q_curve(obs, small).shape == (17, 3)
    assert set(model.greedy_action(obs, small)) <= set(small)


def test_trained_applies_the_stored_normalisation(full_run, model: TrainedIQL, small_data) -> None:
    learner = full_run[1]
    obs = small_data.observations[:10]
    norm = torch.tensor(Normalizer.fit(small_data.observations).normalize(obs))
    with torch.no_grad():
        mean, _ = learner.nets.policy(norm[None])
        v = learner.nets.value(norm[None])
    np.testing.assert_allclose(model.policy_action(obs), mean[0, :, 0].numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(model.value(obs), v[0].numpy(), rtol=1e-6, atol=1e-6)


def test_trained_rejects_the_wrong_number_of_features(model: TrainedIQL) -> None:
    for bad in (np.zeros((4, 2)), np.zeros((4, 5)), np.zeros(2)):
        with pytest.raises(ValueError, match="expected 3 features"):
            model.policy_action(bad)
    with pytest.raises(ValueError, match="expected 3 features"):
        model.q_curve(np.zeros((1, 4)))
    with pytest.raises(ValueError, match="expected 3 features"):
        model.q_value(np.zeros((1, 4)), np.zeros(1))
