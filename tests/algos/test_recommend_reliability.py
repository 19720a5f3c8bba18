"""Recommendation refuses what it cannot trust: loosely written numbers, states outside the physiological
ranges (unless overridden, and then recorded), and models whose weights or outputs are not finite."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from dosewise import api
from dosewise.algos.recommend import StateError, parse_state, recommend, validate_state
from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import CheckpointError
from dosewise.cli import app
from dosewise.data.schema import DOSE_FEATURES, FEATURES, PHYSIOLOGICAL_BOUNDS

STATE = {"vanco_level": 25.0, "creatinine": 1.1, "wbc": 12.0, "bun": 18.0, "temperature": 38.2, "sbp": 118.0, "heart_rate": 96.0}
TWO = ("vanco_level", "creatinine")

runner = CliRunner()
# The corrupted copies are loose model files without a run manifest; that caveat is not under test here.
pytestmark = pytest.mark.filterwarnings("ignore:.*no manifest.json:UserWarning")


def _cli(run: Path, state: dict, *flags: str):
    pairs = [x for name, value in state.items() for x in ("--state", f"{name}={value}")]
    return runner.invoke(app, ["recommend", "--run", str(run), *pairs, *flags])


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model on the 7 charted features of a small simulated cohort: a few seconds, enough to exercise every check."""
    root = tmp_path_factory.mktemp("reliable")
    api.simulate_vancomycin(root / "vanco.csv", patients=12, seed=4)
    config = api.resolve_iql_run("iql_conservative", root / "vanco.csv", steps=20, seed=0)
    config = config.model_copy(
        update={"iql": config.iql.model_copy(update={"hidden": (16, 16)}), "data": config.data.with_features(FEATURES)}
    )
    api.train_iql_from_file(root / "vanco.csv", root / "run", config, echo=lambda _: None)
    return root / "run"


@pytest.fixture(scope="module")
def model(run_dir: Path) -> TrainedIQL:
    return TrainedIQL.load(run_dir)


def _corrupt(run_dir: Path, tmp_path: Path, change) -> Path:
    """A copy of the run's model.pt with `change(bundle)` applied, saved the way training saves it."""
    bundle = torch.load(run_dir / "model.pt", weights_only=True)
    change(bundle)
    path = tmp_path / "model.pt"
    torch.save(bundle, path)
    return path


# -- strict numbers -------------------------------------------------------------------------------


def test_parse_state_takes_plain_decimal_numbers_only() -> None:
    """float() would read 1_2 as 12 and accept nan, inf and other scripts' digits; a typed lab value may not."""
    for text in ["1_2", "nan", "NaN", "inf", "-inf", "Infinity", "\u0661\u0662", "0x10", "1 2", "1e", "+", ".", "1,5", "e5", "--1"]:
        with pytest.raises(StateError) as err:
            parse_state([f"vanco_level={text}", "creatinine=1"], TWO)
        assert "'vanco_level'" in str(err.value) and "not a number" in str(err.value), text
    for text, value in [(" 12 ", 12.0), ("1.", 1.0), (".5", 0.5), ("+1e1", 10.0), ("1E2", 100.0), ("007", 7.0)]:
        assert parse_state([f"vanco_level={text}", "creatinine=1"], TWO)["vanco_level"] == value


def test_api_state_values_must_be_finite_numbers() -> None:
    """Mapping values: numbers (not bools) or the same plain number strings the CLI takes."""
    refused = [(True, "not a number"), (np.bool_(False), "not a number"), ("1_2", "not a number"), (" 1 2 ", "not a number"),
               ("nan", "not a number"), (b"12", "not a number"), (1 + 2j, "not a number"), (10**400, "not a finite number"),
               (float("nan"), "not a finite number"), (float("-inf"), "not a finite number"), ("1e400", "not a finite number"),
               (1e39, "too large; the model computes in 32-bit floats"), ("-1e39", "too large")]  # fmt: skip
    for value, words in refused:
        with pytest.raises(StateError) as err:
            validate_state({"vanco_level": value, "creatinine": 1.0}, TWO)
        assert "'vanco_level'" in str(err.value) and words in str(err.value), value
    state = validate_state({"vanco_level": np.float32(12.5), "creatinine": " 2e-1 "}, TWO)
    assert state == {"vanco_level": 12.5, "creatinine": 0.2} and all(type(v) is float for v in state.values())
    assert validate_state({"vanco_level": 12, "creatinine": np.int64(1)}, TWO) == {"vanco_level": 12.0, "creatinine": 1.0}


@settings(max_examples=300, deadline=None, derandomize=True)
@given(st.one_of(st.text(max_size=12), st.text(alphabet="0123456789+-.eE_ xXnaif", max_size=10)))
def test_any_typed_text_is_a_number_or_a_state_error(text: str) -> None:
    """Whatever is typed, the answer is a finite float (the one float() gives) or a StateError, nothing else."""
    try:
        value = parse_state([f"vanco_level={text}", "creatinine=1"], TWO, allow_out_of_range=True)["vanco_level"]
    except StateError:
        return
    assert math.isfinite(value) and value == float(text) and "_" not in text


@settings(max_examples=200, deadline=None, derandomize=True)
@given(st.floats(allow_nan=False, allow_infinity=False, width=32))
def test_every_decimal_string_parses_to_what_float_gives(number: float) -> None:
    for text in (repr(number), f"{number:e}", f"{number:.3f}"):
        assert parse_state([f"vanco_level={text}", "creatinine=1"], TWO, allow_out_of_range=True)["vanco_level"] == float(text)


@settings(max_examples=200, deadline=None, derandomize=True)
@given(
    st.one_of(
        st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8), st.binary(max_size=4), st.lists(st.floats(), max_size=2)
    )
)
def test_any_api_value_is_a_number_or_a_state_error(value: object) -> None:
    try:
        state = validate_state({"vanco_level": value, "creatinine": 1.0}, TWO, allow_out_of_range=True)
    except StateError:
        return
    assert math.isfinite(state["vanco_level"]) and not isinstance(value, bool)


# -- physiological bounds -------------------------------------------------------------------------


def test_every_vancomycin_feature_has_a_physiological_range() -> None:
    assert set(PHYSIOLOGICAL_BOUNDS) == set(FEATURES) | set(DOSE_FEATURES)
    assert PHYSIOLOGICAL_BOUNDS["temperature"] == (25.0, 45.0) and PHYSIOLOGICAL_BOUNDS["creatinine"] == (0.1, 20.0)
    with pytest.raises(TypeError):
        PHYSIOLOGICAL_BOUNDS["temperature"] = (0.0, 500.0)  # type: ignore[index]


@pytest.mark.parametrize(
    ("feature", "value", "words"),
    [
        ("temperature", 381.0, "above the maximum 45"),
        ("creatinine", -1.4, "below the minimum 0.1"),
        ("heart_rate", 0.0, "below the minimum 20"),
    ],
)
def test_a_value_outside_its_physiological_range_is_refused(feature: str, value: float, words: str) -> None:
    with pytest.raises(StateError) as err:
        validate_state({**STATE, feature: value}, FEATURES)
    message = str(err.value)
    assert message.startswith(f"{feature} = {value:g} is {words}") and "--allow-out-of-range" in message


def test_every_out_of_range_value_is_named_and_bounds_are_inclusive() -> None:
    with pytest.raises(StateError) as err:
        validate_state({**STATE, "temperature": 381.0, "creatinine": -1.4}, FEATURES)
    assert "creatinine = -1.4" in str(err.value) and "temperature = 381" in str(err.value)
    edges = {**STATE, "temperature": 45.0, "creatinine": 0.1, "vanco_level": 0.0, "sbp": 300.0}
    assert validate_state(edges, FEATURES) == edges


def test_the_override_is_recorded_next_to_the_training_range_warning(model: TrainedIQL) -> None:
    state = {**STATE, "temperature": 381.0}
    with pytest.raises(StateError, match="temperature = 381"):
        api.recommend_iql(model, state)
    rec = api.recommend_iql(model, state, allow_out_of_range=True)
    assert rec.overrides == [{"feature": "temperature", "value": 381.0, "unit": "°C", "bound": "max", "limit": 45.0}]
    assert [w for w in rec.warnings if w.startswith("temperature = 381 is outside the training range")]
    assert api.recommend_iql(model, STATE).overrides == []
    assert recommend(model, STATE).overrides == []


def test_cli_refuses_out_of_range_unless_allowed_and_shows_the_override(run_dir: Path) -> None:
    state = {**STATE, "temperature": 381, "creatinine": -1.4}
    refused = _cli(run_dir, state, "--json")
    assert refused.exit_code == 2 and "Traceback" not in refused.output
    assert "temperature = 381 is above the maximum 45" in refused.output and "creatinine = -1.4" in refused.output

    allowed = _cli(run_dir, state, "--json", "--allow-out-of-range")
    assert allowed.exit_code == 0, allowed.output
    body = json.loads(allowed.stdout)
    assert body["overrides"] == [
        {"feature": "creatinine", "value": -1.4, "unit": "mg/dL", "bound": "min", "limit": 0.1},
        {"feature": "temperature", "value": 381.0, "unit": "°C", "bound": "max", "limit": 45.0},
    ]
    table = _cli(run_dir, state, "--allow-out-of-range")
    assert table.exit_code == 0, table.output
    assert "override: temperature = 381 is above the maximum 45" in table.output and "override: creatinine = -1.4" in table.output


# -- non-finite models ----------------------------------------------------------------------------


def test_nan_weights_are_refused_at_load_naming_file_and_tensor(run_dir: Path, tmp_path: Path) -> None:
    def poison(bundle: dict) -> None:
        bundle["networks"]["pi"][0, :3] = float("nan")

    path = _corrupt(run_dir, tmp_path, poison)
    with pytest.raises(CheckpointError) as err:
        TrainedIQL.load(path)
    assert str(err.value) == f"{path}: tensor 'pi' has 3 non-finite values; the model cannot be used"
    result = _cli(path, STATE, "--json")
    assert result.exit_code == 2 and result.stdout == ""
    assert result.output.splitlines()[-1] == f"error: {path}: tensor 'pi' has 3 non-finite values; the model cannot be used"


@pytest.mark.parametrize(
    ("change", "label"),
    [
        (lambda b: b["networks"]["q_target"].view(-1)[5].fill_(float("inf")), "tensor 'q_target' has 1 non-finite value"),
        (lambda b: b["normalizer"]["std"].__setitem__(2, float("inf")), "normaliser 'std' has 1 non-finite value"),
        (lambda b: b["normalizer"]["mean"].__setitem__(0, float("nan")), "normaliser 'mean' has 1 non-finite value"),
        (lambda b: b["feature_ranges"].__setitem__("sbp", [float("nan"), 1.0]), "feature range of 'sbp' has 1 non-finite value"),
        (lambda b: b.__setitem__("action_bounds", [-1.0, float("inf")]), "action bounds has 1 non-finite value"),
    ],
)
def test_every_number_of_the_model_file_is_checked(run_dir: Path, tmp_path: Path, change, label: str) -> None:
    path = _corrupt(run_dir, tmp_path, change)
    with pytest.raises(CheckpointError, match=f"^{re.escape(str(path))}: {label}; the model cannot be used$"):
        TrainedIQL.load(path)


def test_a_nan_output_is_an_error_naming_the_output(model: TrainedIQL, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(model, "q_curve", lambda obs, grid=None: np.full((1, len(model.action_grid())), np.nan, np.float32))
    with pytest.raises(StateError, match="the model's Q-curve is not finite \\(101 of 101 values"):
        recommend(model, STATE)
    monkeypatch.undo()

    monkeypatch.setattr(model, "policy_members", lambda obs: np.full((1, 1), np.inf, np.float32))
    with pytest.raises(StateError, match="the model's policy action is not finite"):
        api.recommend_iql(model, STATE)
    monkeypatch.undo()

    monkeypatch.setattr(model, "q_value", lambda obs, action: np.full(1, np.nan, np.float32))
    with pytest.raises(StateError, match="the model's Q value of the policy action is not finite"):
        recommend(model, STATE)


def test_cli_never_prints_a_nan_recommendation(run_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A forward pass that returns NaN ends with exit 2 and nothing on stdout, with or without --json."""
    original = TrainedIQL.policy_members
    monkeypatch.setattr(TrainedIQL, "policy_members", lambda self, obs: original(self, obs) * np.nan)
    for flags in (("--json",), ()):
        result = _cli(run_dir, STATE, *flags)
        assert result.exit_code == 2 and result.stdout == ""
        assert "policy action is not finite" in result.output and "+nan" not in result.output


def test_a_binary_feature_takes_0_or_1_only() -> None:
    names = (*FEATURES, "dialysis")
    assert validate_state({**STATE, "dialysis": 1}, names)["dialysis"] == 1.0
    assert validate_state({**STATE, "dialysis": "0"}, names)["dialysis"] == 0.0
    for value in (0.5, 2, -1):
        with pytest.raises(StateError, match=r"^feature 'dialysis': .* is not 0 or 1; expected 0 \(no\) or 1 \(yes\)"):
            validate_state({**STATE, "dialysis": value}, names)
