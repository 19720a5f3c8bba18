"""Ensembles through the real training path: members equal solo runs, files, TrainedIQL's mean and spread."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import (
    CHECKPOINT_FORMAT,
    MODEL_FORMAT,
    TrainingError,
    checkpoint_path,
    train_iql,
)
from dosewise.checkpoint import load_safe

SEEDS = [4, 0, 9]
FEATURES = ("level", "creat", "hr")


@pytest.fixture(scope="module")
def ensemble_run(tmp_path_factory: pytest.TempPathFactory, make_run, small_data, _one_torch_thread) -> Path:
    out = tmp_path_factory.mktemp("ensemble")
    train_iql(make_run(FEATURES), small_data, out, show_progress=False, seeds=SEEDS)
    return out


@pytest.mark.parametrize("k", range(len(SEEDS)))
def test_every_member_equals_the_run_with_its_seed_alone(tmp_path: Path, ensemble_run: Path, make_run, small_data, k: int) -> None:
    solo = make_run(FEATURES, train=dict(seed=SEEDS[k]))
    train_iql(solo, small_data, tmp_path, show_progress=False)
    mine = load_safe(ensemble_run / "model.pt", MODEL_FORMAT)["networks"]
    alone = load_safe(tmp_path / "model.pt", MODEL_FORMAT)["networks"]
    for key in alone:
        torch.testing.assert_close(mine[key][k], alone[key][0], rtol=1e-4, atol=1e-5, msg=key)
    losses = json.loads((ensemble_run / "losses.json").read_text())
    solo_losses = json.loads((tmp_path / "losses.json").read_text())
    for key, value in solo_losses["per_member"][str(SEEDS[k])].items():
        assert losses["per_member"][str(SEEDS[k])][key] == pytest.approx(value, rel=1e-3, abs=1e-5), key


def test_losses_json_summarises_the_members(ensemble_run: Path) -> None:
    losses = json.loads((ensemble_run / "losses.json").read_text())
    assert losses["seeds"] == SEEDS
    for key in ("loss/q", "loss/v", "loss/pi"):
        row = [losses["per_member"][str(s)][key] for s in SEEDS]
        assert losses["summary"][key]["mean"] == pytest.approx(np.mean(row))
        assert losses["summary"][key]["sd"] == pytest.approx(np.std(row, ddof=1))


def test_tensorboard_has_mean_sd_and_every_member(ensemble_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(ensemble_run / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"loss/q", "loss/q/sd", *(f"loss/q/seed_{s}" for s in SEEDS)} <= tags


def test_trained_ensemble_is_the_mean_of_its_members_with_their_spread(ensemble_run: Path, small_data) -> None:
    model = TrainedIQL.load(ensemble_run)
    assert model.members == 3 and model.seeds == SEEDS
    obs = small_data.observations[:11]
    members = model.policy_members(obs)
    assert members.shape == (3, 11)
    np.testing.assert_allclose(model.policy_action(obs), members.mean(0), rtol=1e-6)
    np.testing.assert_allclose(model.policy_spread(obs), members.std(0, ddof=1), rtol=1e-5)
    assert (model.policy_spread(obs) > 0).all()
    assert model.q_curve(obs).shape == (11, 101) and model.value(obs).shape == (11,)
    np.testing.assert_allclose(model.q_curve(obs)[:, 50], model.q_value(obs, np.zeros(11)), rtol=1e-5, atol=1e-6)


def test_single_model_has_zero_spread(tmp_path: Path, make_run, small_data) -> None:
    train_iql(make_run(FEATURES, train=dict(steps=5, checkpoint_every=0)), small_data, tmp_path, show_progress=False)
    model = TrainedIQL.load(tmp_path)
    assert model.members == 1
    np.testing.assert_array_equal(model.policy_spread(small_data.observations[:4]), np.zeros(4))


def test_ensemble_resume_is_bitwise_and_needs_the_same_seeds(tmp_path: Path, ensemble_run: Path, make_run, small_data) -> None:
    split = tmp_path / "split"
    train_iql(make_run(FEATURES, train=dict(steps=20)), small_data, split, show_progress=False, seeds=SEEDS)
    with pytest.raises(TrainingError, match="same --seeds"):
        train_iql(make_run(FEATURES), small_data, split, resume=True, show_progress=False, seeds=[4, 0])
    train_iql(make_run(FEATURES), small_data, split, resume=True, show_progress=False, seeds=SEEDS)
    a = load_safe(checkpoint_path(ensemble_run, 60), CHECKPOINT_FORMAT)
    b = load_safe(checkpoint_path(split, 60), CHECKPOINT_FORMAT)
    for key, value in a["learner"]["nets"].items():
        assert torch.equal(value, b["learner"]["nets"][key]), key
    assert torch.equal(a["sampler"], b["sampler"])


def test_duplicate_seeds_are_refused(tmp_path: Path, make_run, small_data) -> None:
    with pytest.raises(TrainingError, match="distinct"):
        train_iql(make_run(FEATURES), small_data, tmp_path, show_progress=False, seeds=[1, 1])


# -- the command line -----------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_trains_evaluates_and_recommends_an_ensemble(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dosewise.cli import app

    def invoke(*args):
        result = CliRunner().invoke(app, [str(a) for a in args])
        assert result.exit_code == 0, result.output
        return result

    data, run = tmp_path / "vanco.csv", tmp_path / "run"
    invoke("simulate", "vancomycin", "--patients", 30, "--seed", 3, "--out", data)
    trained = invoke("train", "iql", "--data", data, "--out", run, "--steps", 40, "--seeds", 3, "--seed", 5, "--quiet")
    assert "mean +- sd" in trained.output and "3 members" in trained.output
    assert json.loads((run / "losses.json").read_text())["seeds"] == [5, 6, 7]

    invoke("evaluate", "--run", run, "--patients", 20, "--out", run / "evaluation.json")
    result = json.loads((run / "evaluation.json").read_text())
    assert result["ensemble"]["seeds"] == [5, 6, 7]
    assert set(result["ensemble"]["per_member"]) == {"5", "6", "7"}
    assert set(result["ensemble"]["summary"]["aki_rate"]) == {"mean", "sd"}

    state = ["vanco_level=25", "creatinine=1.4", "wbc=12", "bun=22", "temperature=38.1", "sbp=115", "heart_rate=98"]
    state += ["dose_mg=1250", "interval_h=12", "hours_since_dose=4", "weight_kg=80", "age=60", "dialysis=0"]  # simulated data is dose-aware
    rec = json.loads(invoke("recommend", "--run", run, *[x for s in state for x in ("--state", s)], "--json").output)
    assert rec["members"] == 3 and len(rec["member_actions"]) == 3
    assert rec["policy_action"] == pytest.approx(np.mean(rec["member_actions"]), abs=1e-6)
    assert rec["policy_action_sd"] == pytest.approx(np.std(rec["member_actions"], ddof=1), rel=1e-4)
    text = invoke("recommend", "--run", run, *[x for s in state for x in ("--state", s)]).output
    assert "sd over 3 members" in text
