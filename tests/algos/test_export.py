"""Exports of a trained IQL run, read back the way a serving team would (onnxruntime, torch.jit.load)
and held equal to TrainedIQL; the sidecar; and that a failed export leaves nothing behind."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import sys
import warnings
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch

import dosewise.algos.export as export
from dosewise.algos.export import EXPORT_FORMATS, ExportedPolicy, ExportError, ExportResult, export_iql, probe_batch
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import train_iql

FEATURES = ("vanco_level", "creatinine", "heart_rate_x")  # two with known units, one without
KINDS = {"single": [0], "ensemble": [4, 0]}
BATCH_SIZES = (1, 7, 37, 200)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, make_run, small_data, _one_torch_thread) -> dict[str, Path]:
    """A one-member and a two-member run, 50 steps each."""
    data = dataclasses.replace(small_data, feature_names=FEATURES)
    out = {}
    for kind, seeds in KINDS.items():
        out[kind] = tmp_path_factory.mktemp(kind)
        train_iql(make_run(FEATURES, train=dict(steps=50, checkpoint_every=0)), data, out[kind], show_progress=False, seeds=seeds)
    return out


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory, runs: dict[str, Path]) -> dict[tuple[str, str], ExportResult]:
    """Every run in every format, exported once; the files sit in a folder that does not exist yet."""
    folder = tmp_path_factory.mktemp("exports") / "not" / "there"
    suffix = {"onnx": "onnx", "torchscript": "ts.pt"}
    return {(kind, fmt): export_iql(run, folder / f"{kind}.{suffix[fmt]}", fmt) for kind, run in runs.items() for fmt in EXPORT_FORMATS}


def _fresh_states(model: TrainedIQL, n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Random states reaching a fifth of the range beyond the training data on both sides, and random actions."""
    rng = np.random.default_rng(seed)
    lo, hi = (np.array([model.feature_ranges[f][i] for f in model.feature_names]) for i in (0, 1))
    width = hi - lo
    states = rng.uniform(lo - 0.2 * width, hi + 0.2 * width, size=(n, len(lo))).astype(np.float32)
    return states, rng.uniform(-1, 1, size=(n, 1)).astype(np.float32)


def _run_file(fmt: str, path: Path):
    """The exported file, loaded with its own runtime only: (state, action) -> three numpy arrays."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        return lambda s, a: session.run(["policy_action", "q_value", "value"], {"state": s, "action": a})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch 2.13 deprecates torch.jit; serving teams still load it
        loaded = torch.jit.load(str(path))
    return lambda s, a: [t.numpy() for t in loaded(torch.from_numpy(s), torch.from_numpy(a))]


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_exported_file_answers_like_the_trained_model_at_any_batch_size(runs, exports, kind: str, fmt: str) -> None:
    model = TrainedIQL.load(runs[kind])
    result = exports[kind, fmt]
    run = _run_file(fmt, result.path)
    for seed, n in enumerate(BATCH_SIZES):
        states, actions = _fresh_states(model, n, seed)
        policy_action, q_value, value = run(states, actions)
        assert policy_action.shape == q_value.shape == value.shape == (n,)
        np.testing.assert_allclose(policy_action, model.policy_action(states), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(q_value, model.q_value(states, actions), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(value, model.value(states), rtol=1e-5, atol=1e-5)
    assert np.all(policy_action >= model.action_low) and np.all(policy_action <= model.action_high)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
@pytest.mark.parametrize("kind", KINDS)
def test_export_result_reports_the_model_and_a_passed_check(exports, kind: str, fmt: str) -> None:
    result = exports[kind, fmt]
    assert result.format == fmt
    assert result.path.is_file()
    assert result.feature_names == FEATURES
    assert result.members == len(KINDS[kind])
    assert result.sidecar == result.path.with_name(result.path.name + ".json")
    assert set(result.max_abs_diff) == {"policy_action", "q_value", "value"}
    assert all(0.0 <= diff <= 1e-4 for diff in result.max_abs_diff.values())


def test_exported_policy_module_bakes_in_normaliser_member_mean_and_clip(runs) -> None:
    model = TrainedIQL.load(runs["ensemble"])
    module = ExportedPolicy(model).eval()
    states, actions = _fresh_states(model, 50, seed=11)
    with torch.no_grad():
        policy_action, q_value, value = module(torch.from_numpy(states), torch.from_numpy(actions))
    np.testing.assert_allclose(policy_action.numpy(), model.policy_action(states), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(q_value.numpy(), model.q_value(states, actions), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(value.numpy(), model.value(states), rtol=1e-6, atol=1e-6)
    # The members really differ, so a module that used one member would fail above.
    assert np.ptp(model.policy_members(states), axis=0).max() > 1e-3


def _strict_json(path: Path) -> dict:
    def refuse(token: str):
        raise AssertionError(f"{path} holds the non-standard JSON token {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.parametrize("fmt", EXPORT_FORMATS)
def test_sidecar_describes_the_file_its_inputs_and_outputs(runs, exports, fmt: str) -> None:
    result = exports["ensemble", fmt]
    side = _strict_json(result.sidecar)
    assert side["format"] == fmt
    assert side["file"] == result.path.name
    assert side["sha256"] == hashlib.sha256(result.path.read_bytes()).hexdigest()
    assert side["feature_names"] == list(FEATURES)
    assert side["units"] == {"vanco_level": "mg/L", "creatinine": "mg/dL", "heart_rate_x": None}
    assert side["action"] == {"low": -1.0, "high": 1.0, "meaning": "normalised dose change, -1 lower .. +1 raise"}
    assert side["members"] == 2 and side["seeds"] == [4, 0]
    assert side["source"] == {"run": str(runs["ensemble"]), "step": 50}
    assert [(i["name"], i["shape"]) for i in side["inputs"]] == [("state", ["N", 3]), ("action", ["N", 1])]
    assert [(o["name"], o["shape"]) for o in side["outputs"]] == [("policy_action", ["N"]), ("q_value", ["N"]), ("value", ["N"])]
    assert side["max_abs_diff"] == pytest.approx(result.max_abs_diff)
    assert side["opset"] == (18 if fmt == "onnx" else None)


def test_onnx_graph_has_the_named_inputs_and_outputs_with_a_free_batch_dimension(exports) -> None:
    session = onnxruntime.InferenceSession(str(exports["single", "onnx"].path), providers=["CPUExecutionProvider"])
    inputs = [(i.name, i.shape, i.type) for i in session.get_inputs()]
    outputs = [(o.name, o.shape) for o in session.get_outputs()]
    assert inputs == [("state", ["N", 3], "tensor(float)"), ("action", ["N", 1], "tensor(float)")]
    assert outputs == [("policy_action", ["N"]), ("q_value", ["N"]), ("value", ["N"])]


def test_probe_batch_spans_the_training_range_and_the_action_bounds(runs) -> None:
    model = TrainedIQL.load(runs["single"])
    states, actions = probe_batch(model)
    assert states.shape == (64, 3) and actions.shape == (64, 1)
    lo, hi = (np.array([model.feature_ranges[f][i] for f in FEATURES], dtype=np.float32) for i in (0, 1))
    np.testing.assert_array_equal(states.min(0), lo)
    np.testing.assert_array_equal(states.max(0), hi)
    assert actions.min() == -1.0 and actions.max() == 1.0


def test_unknown_format_is_refused_with_the_formats_listed(runs, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"unknown export format 'tflite'; expected one of onnx, torchscript"):
        export_iql(runs["single"], tmp_path / "policy.tflite", "tflite")
    assert list(tmp_path.iterdir()) == []


def test_out_path_that_is_a_directory_is_refused(runs, tmp_path: Path) -> None:
    with pytest.raises(ExportError, match=r"is a directory; give the file to write"):
        export_iql(runs["single"], tmp_path, "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_missing_onnx_extra_names_the_install_command(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxscript", None)  # import onnxscript now raises ImportError
    with pytest.raises(ExportError, match=r"ONNX export needs the export extra .*: pip install 'dosewise\[export\]'"):
        export_iql(runs["single"], tmp_path / "policy.onnx", "onnx")
    assert list(tmp_path.iterdir()) == []


def test_a_failing_check_removes_the_file_and_any_earlier_sidecar(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "policy.pt"
    export_iql(runs["single"], out, "torchscript")
    assert out.is_file() and (tmp_path / "policy.pt.json").is_file()

    model = TrainedIQL.load(runs["single"])
    true_value = model.value
    monkeypatch.setattr(model, "value", lambda obs: true_value(obs) + 1e-3)  # the reference now disagrees with the file
    with pytest.raises(ExportError, match=r"does not reproduce the model .*value 0\.001.*the file was removed"):
        export_iql(model, out, "torchscript")
    assert list(tmp_path.iterdir()) == []  # neither file, sidecar nor a temporary file


def test_a_check_that_cannot_load_the_file_removes_it(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unreadable(path: Path):
        raise RuntimeError(f"{path}: cannot be loaded")

    monkeypatch.setitem(export._LOADERS, "torchscript", unreadable)
    with pytest.raises(RuntimeError, match="cannot be loaded"):
        export_iql(runs["single"], tmp_path / "policy.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_without_check_the_file_is_written_and_the_sidecar_says_unchecked(runs, tmp_path: Path) -> None:
    model = TrainedIQL.load(runs["single"] / "model.pt")
    result = export_iql(model, tmp_path / "policy.pt", "torchscript", check=False)
    assert result.max_abs_diff == {}
    side = _strict_json(result.sidecar)
    assert side["max_abs_diff"] is None
    assert side["source"] == {"run": None, "step": 50}  # an in-memory model has no path to name
    states, actions = _fresh_states(model, 9, seed=3)
    np.testing.assert_allclose(_run_file("torchscript", result.path)(states, actions)[0], model.policy_action(states), rtol=1e-5, atol=1e-5)


def test_an_exporter_failure_is_an_export_error_and_writes_nothing(runs, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def unsupported(module):
        raise RuntimeError("Unsupported op aten::baddbmm\nlong trace")

    monkeypatch.setattr(export, "_torchscript_bytes", unsupported)
    with pytest.raises(
        ExportError, match=r"the torchscript exporter failed \(RuntimeError: Unsupported op aten::baddbmm\); nothing was written"
    ):
        export_iql(runs["single"], tmp_path / "policy.pt", "torchscript")
    assert list(tmp_path.iterdir()) == []


def test_export_command_writes_a_checked_file_and_names_bad_input(runs, tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from dosewise.cli import app

    runner = CliRunner()
    out = tmp_path / "policy.pt"
    result = runner.invoke(app, ["export", "--run", str(runs["single"]), "--out", str(out), "--format", "torchscript"])
    assert result.exit_code == 0, result.output
    assert out.is_file() and (tmp_path / "policy.pt.json").is_file() and "max |difference| from PyTorch" in result.output
    loaded = torch.jit.load(str(out))
    model = TrainedIQL.load(runs["single"])
    states, actions = _fresh_states(model, 5, seed=3)
    policy, _, _ = loaded(torch.from_numpy(states), torch.from_numpy(actions))
    np.testing.assert_allclose(policy.numpy(), model.policy_action(states), rtol=1e-5, atol=1e-5)

    bad = runner.invoke(app, ["export", "--run", str(runs["single"]), "--out", str(tmp_path / "p.tf"), "--format", "tf"])
    assert bad.exit_code == 2 and "unknown export format 'tf'" in bad.output and "Traceback" not in bad.output
