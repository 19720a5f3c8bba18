"""The HTTP API as a client sees it: the same recommendations as the library, 422s that name the
field, one audit row per request on SQLite and PostgreSQL, and bearer tokens once any exists."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
from fastapi.testclient import TestClient
from typer.testing import CliRunner

from dosewise import api
from dosewise.cli import app as cli
from dosewise.config import ConfigError
from dosewise.data.schema import BINARY_FEATURES, FEATURE_UNITS, PHYSIOLOGICAL_BOUNDS
from dosewise.serve import app as app_module
from dosewise.serve.app import create_app
from dosewise.serve.server import build_app, is_loopback
from dosewise.serve.service import Service
from dosewise.serve.store import Store
from tests.serve.fixtures import STATE

VANCOMYCIN = "/v1/vancomycin/recommend"
ANESTHESIA = "/v1/anesthesia/recommend"
SERVED_FIELDS = {"model", "model_hash", "audit_id"}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def as_json(value: Any) -> Any:
    """What `value` becomes on the wire (tuples as lists, NaN refused)."""
    return json.loads(json.dumps(value, allow_nan=False))


def server_paths(*runs: Path) -> list[str]:
    """Folders of the server a body must never name: each run, its parent and pytest's temp root."""
    return sorted({str(folder) for run in runs for folder in (run, run.parent, run.parent.parent)})


def assert_clean(response, *runs: Path) -> None:
    """No stack trace and no path of the server in the body."""
    assert "Traceback" not in response.text
    for folder in server_paths(*runs):
        assert folder not in response.text, f"{response.request.url.path} answered with the server path {folder}"


def audit_rows(store: Store, **filters) -> list[dict[str, Any]]:
    return [entry.to_dict() for entry in store.audit(**filters, limit=1000)]


def newest_row(store: Store) -> dict[str, Any]:
    return store.audit(limit=1)[0].to_dict()


# --- stores on both backends


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A fresh audit database: a SQLite file, or a new database on the session's PostgreSQL server."""
    if request.param == "postgres":
        return request.getfixturevalue("postgres_db_url")
    return f"sqlite:///{tmp_path / 'audit.db'}"


@pytest.fixture
def backend_store(db_url):
    store = Store(db_url)
    yield store
    store.close()


@pytest.fixture
def backend_client(loaded_models, backend_store):
    """Both runs over `backend_store`, auth off until a test creates a token."""
    with TestClient(create_app(Service(loaded_models), backend_store)) as client:
        yield client


# --- health and models


def test_health_counts_the_models_and_says_auth_is_off(client):
    response = client.get("/health")
    assert response.status_code == 200
    assert response.json() == {"status": "ok", "models": 2, "auth": "off"}
    assert "x-audit-id" not in response.headers  # outside /v1: not a decision request


def test_models_lists_both_runs_with_config_data_and_weight_hashes_but_no_path(client, iql_run, planner_run):
    response = client.get("/v1/models")
    assert response.status_code == 200
    models = {model["id"]: model for model in response.json()["models"]}
    assert set(models) == {"iql", "planner"}

    iql, planner = models["iql"], models["planner"]
    assert (iql["kind"], iql["algorithm"]) == ("vancomycin", "iql")
    assert (planner["kind"], planner["algorithm"]) == ("anesthesia", "planner")
    for model, run in ((iql, iql_run), (planner, planner_run)):
        assert model["weights"] == {"model.pt": sha256_of(run / "model.pt"), "config.yaml": sha256_of(run / "config.yaml")}
        assert model["model_hash"] == sha256_of(run / "model.pt")
        assert "data_path" not in model["config"]
        assert model["config"]["algo"] == model["algorithm"]

    assert iql["training_data"]["file"] == "vanco.parquet"
    assert iql["training_data"]["features"] == list(STATE)
    assert iql["training_data"]["steps"] == 120
    for name, (low, high) in iql["training_data"]["feature_ranges"].items():
        assert name in STATE and low <= high
    assert iql["training_data"]["action_bounds"] == [-1.0, 1.0]
    assert planner["training_data"]["step_s"] > 0
    assert planner["training_data"]["window_steps"] > planner["training_data"]["horizon_steps"] > 0
    assert set(planner["training_data"]["statistics"]) == {"vital_mean", "vital_std", "static_mean", "static_std"}
    assert_clean(response, iql_run, planner_run)


# --- vancomycin


def test_vancomycin_recommendation_is_the_librarys_field_by_field(client, iql_run):
    expected = as_json(api.recommend_iql(iql_run, STATE).to_dict())
    response = client.post(VANCOMYCIN, json={"state": STATE})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == set(expected) | SERVED_FIELDS
    for name, value in expected.items():
        assert body[name] == value, f"field {name} differs from dosewise.api.recommend_iql"
    assert body["model"] == "iql"
    assert body["model_hash"] == sha256_of(iql_run / "model.pt")
    assert -1.0 <= body["policy_action"] <= 1.0
    assert body["overrides"] == []


def patient_history(iql_run: Path) -> tuple[pd.DataFrame, list[dict]]:
    """The first simulated patient of the run's training file, as a frame and as the JSON rows a client sends."""
    frame = pd.read_parquet(iql_run.parent / "vanco.parquet")
    rows = frame[frame["patient_id"] == frame["patient_id"].iloc[0]].reset_index(drop=True)
    return rows, json.loads(rows.to_json(orient="records"))


def test_vancomycin_history_rows_give_the_dose_in_mg_and_the_librarys_predicted_exposure(client, iql_run):
    rows, records = patient_history(iql_run)
    expected = as_json(api.recommend_iql(iql_run, history=rows).to_dict())
    response = client.post(VANCOMYCIN, json={"history": records})
    assert response.status_code == 200, response.text
    body = response.json()
    assert expected["dose_mg"] is not None and expected["predicted_auc24"] is not None and expected["predicted_trough"] is not None
    for name in ("dose_mg", "interval_h", "current_dose_mg", "predicted_auc24", "predicted_trough", "levels_used", "policy_action"):
        assert body[name] == pytest.approx(expected[name], rel=1e-9), f"field {name} differs from dosewise.api.recommend_iql"
    assert body["levels_used"] >= 1 and body["notes"] == []
    assert body["state"]["dose_mg"] == pytest.approx(float(rows["dose_mg"].iloc[-1]))


def test_vancomycin_body_without_state_or_history_is_422_naming_state(client):
    response = client.post(VANCOMYCIN, json={})
    assert response.status_code == 422
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "state"]
    assert "'state'" in item["msg"] and "'history'" in item["msg"]


def test_vancomycin_model_may_be_named_and_is_optional_with_one_model_of_the_kind(client):
    unnamed = client.post(VANCOMYCIN, json={"state": STATE}).json()
    named = client.post(VANCOMYCIN, json={"state": STATE, "model": "iql"}).json()
    assert named["model"] == unnamed["model"] == "iql"
    assert named["audit_id"] == unnamed["audit_id"] + 1
    assert {k: v for k, v in named.items() if k != "audit_id"} == {k: v for k, v in unnamed.items() if k != "audit_id"}


@pytest.mark.parametrize("model", ["nope", "planner"])
def test_vancomycin_unknown_model_is_422_naming_model(client, model):
    response = client.post(VANCOMYCIN, json={"state": STATE, "model": model})
    assert response.status_code == 422
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "model"]
    assert f"'{model}'" in item["msg"] and "iql" in item["msg"]


def test_model_must_be_named_when_several_of_the_kind_are_loaded(loaded_models, store):
    twin = dataclasses.replace(loaded_models["iql"], id="iql-twin")
    with TestClient(create_app(Service({"iql": loaded_models["iql"], "iql-twin": twin}), store)) as client:
        response = client.post(VANCOMYCIN, json={"state": STATE})
        assert response.status_code == 422
        [item] = response.json()["detail"]
        assert item["loc"] == ["body", "model"]
        assert "iql, iql-twin" in item["msg"]
        assert client.post(VANCOMYCIN, json={"state": STATE, "model": "iql-twin"}).json()["model"] == "iql-twin"


def test_a_kind_with_no_model_loaded_is_404_naming_model(loaded_models, store):
    with TestClient(create_app(Service({"iql": loaded_models["iql"]}), store)) as client:
        response = client.post(ANESTHESIA, json={"rows": [{"BIS": 50.0}]})
        assert response.status_code == 404
        [item] = response.json()["detail"]
        assert item["loc"] == ["body", "model"]
        assert "no anesthesia model is loaded" in item["msg"]


@pytest.mark.parametrize("feature", list(STATE))
def test_vancomycin_missing_feature_is_422_naming_it(client, feature):
    response = client.post(VANCOMYCIN, json={"state": {k: v for k, v in STATE.items() if k != feature}})
    assert response.status_code == 422
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "state"]
    assert f"missing feature(s) '{feature}'" in item["msg"]


def test_vancomycin_unknown_feature_is_422_naming_it(client):
    response = client.post(VANCOMYCIN, json={"state": {**STATE, "lactate": 2.0}})
    assert response.status_code == 422
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "state"]
    assert "unknown feature(s) 'lactate'" in item["msg"]


@pytest.mark.parametrize("feature", [name for name in STATE if name not in BINARY_FEATURES])  # 0/1 only: its own message
@pytest.mark.parametrize("side", ["min", "max"])
def test_vancomycin_out_of_range_value_is_422_naming_the_feature_and_its_range(client, feature, side):
    low, high = PHYSIOLOGICAL_BOUNDS[feature]
    value = low - 1.0 if side == "min" else high + 1.0
    response = client.post(VANCOMYCIN, json={"state": {**STATE, feature: value}})
    assert response.status_code == 422
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "state"]
    assert item["msg"].startswith(f"{feature} = {value:g} is {'below the minimum' if side == 'min' else 'above the maximum'}")
    assert "allow_out_of_range" in item["msg"]


def test_vancomycin_dialysis_other_than_0_or_1_is_422(client):
    response = client.post(VANCOMYCIN, json={"state": {**STATE, "dialysis": 2.0}, "allow_out_of_range": True})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "feature 'dialysis': 2 is not 0 or 1; expected 0 (no) or 1 (yes)"


def test_vancomycin_allow_out_of_range_answers_with_the_overrides(client, iql_run):
    state = {**STATE, "sbp": 900.0, "wbc": -1.0}
    response = client.post(VANCOMYCIN, json={"state": state, "allow_out_of_range": True})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["overrides"] == [
        {"feature": "wbc", "value": -1.0, "unit": FEATURE_UNITS["wbc"], "bound": "min", "limit": 0.0},
        {"feature": "sbp", "value": 900.0, "unit": "mmHg", "bound": "max", "limit": 300.0},
    ]
    expected = as_json(api.recommend_iql(iql_run, state, allow_out_of_range=True).to_dict())
    assert {name: body[name] for name in expected} == expected


@pytest.mark.parametrize(
    ("raw_value", "error_type"),
    [
        ("NaN", "finite_number"),
        ("Infinity", "finite_number"),
        ("-Infinity", "finite_number"),
        ("1e999", "finite_number"),
        ('"25"', "float_type"),
        ('"abc"', "float_type"),
        ("true", "float_type"),
        ("false", "float_type"),
        ("null", "float_type"),
        ("[25]", "float_type"),
        ('{"value": 25}', "float_type"),
    ],
)
def test_vancomycin_non_numbers_are_422_at_the_features_loc(client, raw_value, error_type):
    state = ", ".join(f'"{name}": {raw_value if name == "creatinine" else value}' for name, value in STATE.items())
    response = client.post(VANCOMYCIN, content=f'{{"state": {{{state}}}}}', headers={"content-type": "application/json"})
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "state", "creatinine"]
    assert item["type"] == error_type


@pytest.mark.parametrize(
    ("body", "loc"),
    [
        ({}, ["body", "state"]),
        ({"state": STATE, "dose": 1000}, ["body", "dose"]),
        ({"state": STATE, "allow_out_of_range": "yes"}, ["body", "allow_out_of_range"]),
        ({"state": STATE, "model": "../etc/passwd"}, ["body", "model"]),
        ({"state": [25.0]}, ["body", "state"]),
    ],
)
def test_vancomycin_malformed_bodies_are_422_at_the_field(client, body, loc):
    response = client.post(VANCOMYCIN, json=body)
    assert response.status_code == 422
    assert loc in [item["loc"] for item in response.json()["detail"]]


def test_vancomycin_body_that_is_not_utf8_is_400_and_audited(client, store):
    response = client.post(VANCOMYCIN, content=b"\xff", headers={"content-type": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"detail": "There was an error parsing the body"}
    row = newest_row(store)
    assert (row["id"], row["status"], row["request"]) == (int(response.headers["x-audit-id"]), 400, {"unparsed_bytes": 1})


def test_vancomycin_body_that_is_not_json_is_422(client):
    response = client.post(VANCOMYCIN, content=b"{not json", headers={"content-type": "application/json"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["loc"][0] == "body"


# --- anesthesia


def test_anesthesia_recommendation_is_the_librarys(client, planner_run, history_rows):
    expected = as_json(api.recommend_planner(planner_run, pd.DataFrame(history_rows)).to_dict())
    response = client.post(ANESTHESIA, json={"rows": history_rows})
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == set(expected) | SERVED_FIELDS
    for name, value in expected.items():
        assert body[name] == value, f"field {name} differs from dosewise.api.recommend_planner"
    assert body["model"] == "planner"
    assert body["model_hash"] == sha256_of(planner_run / "model.pt")
    assert body["history_steps"] >= 1
    assert 0 <= body["propofol_rate_ml_h"] <= body["max_rate_ml_h"]["propofol"]


def test_anesthesia_options_reach_the_planner(client, planner_run, history_rows):
    options = {"mode": "mpc", "max_propofol": 40, "max_remifentanil": 30}
    expected = as_json(api.recommend_planner(planner_run, pd.DataFrame(history_rows), **options).to_dict())
    body = client.post(ANESTHESIA, json={"rows": history_rows, **options}).json()
    assert body["mode"] == "mpc"
    assert body["max_rate_ml_h"] == {"propofol": 40, "remifentanil": 30}
    assert {name: body[name] for name in expected} == expected


@pytest.mark.parametrize("row", [0, 4])
def test_anesthesia_bad_cell_is_422_naming_row_and_column(client, history_rows, row):
    rows = [dict(r) for r in history_rows]
    rows[row]["BIS"] = "abc"
    response = client.post(ANESTHESIA, json={"rows": rows})
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "rows"]
    assert item["msg"].startswith(f"history row {row + 1} (case '1'): column 'BIS' has value 'abc'; expected a finite number")


@pytest.mark.parametrize(
    ("change", "loc"),
    [
        ({"mode": "greedy"}, ["body", "mode"]),
        ({"data_preset": "mimic"}, ["body", "data_preset"]),
        ({"max_propofol": -1}, ["body", "max_propofol"]),
        ({"max_propofol": 10_000}, ["body", "max_propofol"]),
        ({"max_remifentanil": 2.5}, ["body", "max_remifentanil"]),
        ({"rows": []}, ["body", "rows"]),
        ({"extra": 1}, ["body", "extra"]),
    ],
)
def test_anesthesia_bad_options_are_422_at_the_field(client, history_rows, change, loc):
    response = client.post(ANESTHESIA, json={"rows": history_rows, **change})
    assert response.status_code == 422
    assert loc in [item["loc"] for item in response.json()["detail"]]


def test_anesthesia_rows_of_an_unknown_case_are_422(client, history_rows):
    response = client.post(ANESTHESIA, json={"rows": history_rows, "case_id": "no-such-case"})
    assert response.status_code == 422
    assert response.json()["detail"][0]["msg"] == "history: no case 'no-such-case' in the history; its cases: 1"


def test_anesthesia_columns_that_differ_only_by_spaces_are_422_not_500(client, history_rows):
    """Column names are trimmed when read, so 'BIS' and ' BIS' would be one column twice."""
    response = client.post(ANESTHESIA, json={"rows": [dict(history_rows[0], **{" BIS": 40.0})]})
    assert response.status_code == 422, response.text
    [item] = response.json()["detail"]
    assert item["loc"] == ["body", "rows"]
    assert "'BIS'" in item["msg"]


def test_anesthesia_integer_case_ids_stay_integers(client, history_rows):
    """A client's case id 1 is case '1' (as in a cases file), not '1.0'."""
    assert isinstance(history_rows[0]["case_id"], int)
    response = client.post(ANESTHESIA, json={"rows": history_rows, "case_id": "1"})
    assert response.status_code == 200, response.text
    assert response.json()["case_id"] == "1"


def test_too_large_body_is_413_before_it_is_read(client, store):
    before = store.count_audit()
    response = client.post(ANESTHESIA, content=b" " * (app_module.MAX_BODY_BYTES + 1), headers={"content-type": "application/json"})
    assert response.status_code == 413
    assert "too large" in response.json()["detail"]
    assert store.count_audit() == before  # refused by the server before any route (and its audit) sees it


# --- audit


def test_every_v1_request_adds_one_audit_row_with_its_outcome(backend_client, backend_store, iql_run, planner_run, history_rows):
    iql_hash, planner_hash = sha256_of(iql_run / "model.pt"), sha256_of(planner_run / "model.pt")
    bad_state = {k: v for k, v in STATE.items() if k != "bun"}
    requests = [
        ("GET", "/v1/models", None, 200, None, None),
        ("POST", VANCOMYCIN, {"state": STATE}, 200, "iql", iql_hash),
        ("POST", VANCOMYCIN, {"state": bad_state}, 422, None, None),
        ("POST", VANCOMYCIN, {"state": {**STATE, "sbp": "high"}}, 422, None, None),
        ("POST", VANCOMYCIN, {"state": STATE, "model": "nope"}, 422, None, None),
        ("POST", ANESTHESIA, {"rows": history_rows}, 200, "planner", planner_hash),
        ("POST", ANESTHESIA, {"rows": history_rows, "mode": "greedy"}, 422, None, None),
        ("GET", "/v1/audit?limit=1", None, 200, None, None),
    ]
    for method, path, body, status, model_id, model_hash in requests:
        before = backend_store.count_audit()
        response = backend_client.request(method, path, json=body)
        assert response.status_code == status, response.text
        assert backend_store.count_audit() == before + 1, f"{method} {path} did not add exactly one audit row"
        row = newest_row(backend_store)
        assert int(response.headers["x-audit-id"]) == row["id"]
        assert row["endpoint"] == path.partition("?")[0]
        assert row["method"] == method
        assert row["status"] == status
        assert (row["model_id"], row["model_hash"]) == (model_id, model_hash)
        assert row["token_name"] is None
        assert row["request"] == body
        assert row["duration_ms"] >= 0
        answer = response.json()
        if status == 200 and model_id is not None:
            assert answer["audit_id"] == row["id"]
            assert row["response"] == {k: v for k, v in answer.items() if k != "audit_id"}
        elif path.startswith("/v1/audit"):
            assert row["response"] == {"total": answer["total"], "returned": len(answer["rows"])}
        else:
            assert row["response"] == answer
    assert backend_client.get("/health").status_code == 200
    assert backend_store.count_audit() == len(requests)  # /health is not audited


def test_an_internal_error_is_500_without_detail_and_still_audited(loaded_models, store, iql_run, planner_run, monkeypatch):
    service = Service(loaded_models)

    def broken(*args, **kwargs):
        raise RuntimeError(f"cannot read {iql_run / 'model.pt'}")

    monkeypatch.setattr(service, "recommend_vancomycin", broken)
    with TestClient(create_app(service, store), raise_server_exceptions=False) as client:
        response = client.post(VANCOMYCIN, json={"state": STATE})
    assert response.status_code == 500
    assert response.json() == {"detail": "internal error: the request was recorded in the audit log"}
    assert_clean(response, iql_run, planner_run)
    row = newest_row(store)
    assert (row["id"], row["status"], row["request"]) == (int(response.headers["x-audit-id"]), 500, {"state": STATE})


def test_audit_filters_by_model_user_time_and_endpoint_newest_first(backend_client, backend_store, history_rows):
    alice, bob = backend_store.create_token("alice"), backend_store.create_token("bob")

    def call(token: str, method: str, path: str, body: Any = None) -> int:
        response = backend_client.request(method, path, json=body, headers={"Authorization": f"Bearer {token}"})
        assert response.status_code == 200, response.text
        time.sleep(0.002)  # distinct timestamps, so since/until split the log where the test says
        return int(response.headers["x-audit-id"])

    ids = [
        call(alice, "POST", VANCOMYCIN, {"state": STATE}),
        call(bob, "POST", VANCOMYCIN, {"state": STATE}),
        call(alice, "POST", ANESTHESIA, {"rows": history_rows}),
        call(bob, "GET", "/v1/models"),
        call(alice, "POST", VANCOMYCIN, {"state": STATE}),
    ]
    assert ids == sorted(ids)

    def audit(**params) -> dict[str, Any]:
        response = backend_client.get("/v1/audit", params=params, headers={"Authorization": f"Bearer {alice}"})
        assert response.status_code == 200, response.text
        body = response.json()
        assert [row["id"] for row in body["rows"]] == sorted((row["id"] for row in body["rows"]), reverse=True)  # newest first
        return body

    everything = audit()
    assert everything["total"] == 5
    assert [row["id"] for row in everything["rows"]] == ids[::-1]
    assert [row["id"] for row in audit(model="iql")["rows"]] == [ids[4], ids[1], ids[0]]
    assert [row["id"] for row in audit(model="planner")["rows"]] == [ids[2]]
    assert [row["id"] for row in audit(user="bob")["rows"]] == [ids[3], ids[1]]
    by_alice = audit(user="alice")  # the audit calls themselves are alice's now
    assert [row["id"] for row in by_alice["rows"] if row["endpoint"] != "/v1/audit"] == [ids[4], ids[2], ids[0]]
    assert [row["id"] for row in audit(endpoint="/v1/models")["rows"]] == [ids[3]]
    assert [row["id"] for row in audit(endpoint=ANESTHESIA, user="alice")["rows"]] == [ids[2]]
    assert audit(model="nope") == {"total": 0, "rows": []}

    times = {row["id"]: row["time"] for row in everything["rows"]}
    in_window = audit(since=times[ids[1]], until=times[ids[3]])
    assert [row["id"] for row in in_window["rows"]] == [ids[2], ids[1]]  # since inclusive, until exclusive
    assert datetime.fromisoformat(times[ids[1]]).utcoffset().total_seconds() == 0
    assert [row["id"] for row in audit(until=times[ids[0]])["rows"]] == []

    page = audit(endpoint=VANCOMYCIN, limit=2)
    assert (page["total"], [row["id"] for row in page["rows"]]) == (3, [ids[4], ids[1]])
    page = audit(endpoint=VANCOMYCIN, limit=2, offset=2)
    assert (page["total"], [row["id"] for row in page["rows"]]) == (3, [ids[0]])
    assert audit(endpoint=VANCOMYCIN, offset=3)["rows"] == []

    rows = {row["id"]: row for row in audit(limit=1000)["rows"]}
    assert rows[ids[0]]["token_name"] == "alice" and rows[ids[1]]["token_name"] == "bob"
    assert rows[ids[0]]["request"] == {"state": STATE}


@pytest.mark.parametrize(
    ("params", "loc"),
    [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"offset": -1}, "offset"), ({"since": "yesterday"}, "since")],
)
def test_audit_bad_query_is_422_at_the_parameter(client, params, loc):
    response = client.get("/v1/audit", params=params)
    assert response.status_code == 422
    assert ["query", loc] in [item["loc"] for item in response.json()["detail"]]


# --- auth


def test_with_a_token_every_v1_request_needs_it(backend_client, backend_store):
    token = backend_store.create_token("ward-7")
    before = backend_store.count_audit()

    for headers in ({}, {"Authorization": "Bearer dw_wrong"}, {"Authorization": f"Basic {token}"}, {"Authorization": "Bearer"}):
        for method, path, body in (("GET", "/v1/models", None), ("POST", VANCOMYCIN, {"state": STATE}), ("GET", "/v1/audit", None)):
            response = backend_client.request(method, path, json=body, headers=headers)
            assert response.status_code == 401, (headers, path)
            assert response.headers["www-authenticate"] == "Bearer"
            assert "bearer token is required" in response.json()["detail"]
            row = newest_row(backend_store)
            assert (row["id"], row["endpoint"], row["status"], row["token_name"]) == (int(response.headers["x-audit-id"]), path, 401, None)
            assert row["request"] == body and row["model_id"] is None
    assert backend_store.count_audit() == before + 12

    response = backend_client.post(VANCOMYCIN, json={"state": STATE}, headers={"Authorization": f"Bearer {token}"})
    assert response.status_code == 200
    row = newest_row(backend_store)
    assert (row["id"], row["status"], row["token_name"], row["model_id"]) == (response.json()["audit_id"], 200, "ward-7", "iql")
    assert backend_client.get("/v1/models", headers={"Authorization": f"bearer {token}"}).status_code == 200  # the scheme is case-blind
    assert newest_row(backend_store)["token_name"] == "ward-7"


def test_with_a_token_a_bad_body_is_refused_for_the_token_first_and_audited_with_its_name(backend_client, backend_store):
    """Without a token a caller learns only that it needs one; with one, a bad body is a 4xx whose row names the token."""
    token = backend_store.create_token("ward-8")
    for body in (b"\xff", b"{not json", b'{"state": {"vanco_level": "high"}}'):
        refused = backend_client.post(VANCOMYCIN, content=body, headers={"content-type": "application/json"})
        assert refused.status_code == 401 and newest_row(backend_store)["status"] == 401
        answered = backend_client.post(
            VANCOMYCIN, content=body, headers={"content-type": "application/json", "Authorization": f"Bearer {token}"}
        )
        assert answered.status_code in (400, 422)
        row = newest_row(backend_store)
        assert (row["id"], row["status"], row["token_name"]) == (int(answered.headers["x-audit-id"]), answered.status_code, "ward-8")


def test_with_a_token_health_docs_and_schema_stay_open(backend_client, backend_store):
    backend_store.create_token("ward-7")
    before = backend_store.count_audit()
    assert backend_client.get("/health").json() == {"status": "ok", "models": 2, "auth": "on"}
    assert backend_client.get("/docs").status_code == 200
    schema = backend_client.get("/openapi.json")
    assert schema.status_code == 200
    assert {VANCOMYCIN, ANESTHESIA, "/v1/models", "/v1/audit"} <= set(schema.json()["paths"])
    assert backend_store.count_audit() == before


def test_a_revoked_token_is_refused_and_the_others_still_work(backend_client, backend_store):
    first, second = backend_store.create_token("first"), backend_store.create_token("second")
    assert backend_client.get("/v1/models", headers={"Authorization": f"Bearer {first}"}).status_code == 200
    assert backend_store.revoke_token("first")
    response = backend_client.get("/v1/models", headers={"Authorization": f"Bearer {first}"})
    assert response.status_code == 401
    assert newest_row(backend_store)["token_name"] is None
    assert backend_client.get("/v1/models", headers={"Authorization": f"Bearer {second}"}).status_code == 200
    assert newest_row(backend_store)["token_name"] == "second"
    assert backend_store.revoke_token("second")
    # No active token left: auth is off again, as on a server that never had one.
    assert backend_client.get("/health").json()["auth"] == "off"
    assert backend_client.get("/v1/models").status_code == 200


def test_the_pages_cookie_carries_the_token_too(client, store):
    token = store.create_token("browser")
    client.cookies.set(app_module.TOKEN_COOKIE, token)
    assert client.get("/v1/models").status_code == 200
    assert newest_row(store)["token_name"] == "browser"
    client.cookies.set(app_module.TOKEN_COOKIE, "dw_forged")
    assert client.get("/v1/models").status_code == 401


# --- starting the server


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.0.0.2", True),
        ("::1", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.1.2.3", False),
        ("example.org", False),
    ],
)
def test_is_loopback(host, loopback):
    assert is_loopback(host) is loopback


def test_build_app_refuses_a_network_host_without_a_token_and_accepts_it_with_one(iql_run, db_url):
    with pytest.raises(ConfigError, match=r"refusing to serve on 0\.0\.0\.0 with no token") as refused:
        build_app([iql_run], db_url, host="0.0.0.0")
    assert "dosewise serve token create NAME" in str(refused.value)

    loopback = build_app([iql_run], db_url, host="127.0.0.1")  # loopback may run open
    loopback.state.store.close()

    with Store(db_url) as store:
        token = store.create_token("clinic")
    app = build_app([iql_run], db_url, host="0.0.0.0")
    try:
        assert app.state.host == "0.0.0.0"
        with TestClient(app) as client:
            assert client.get("/v1/models").status_code == 401
            assert client.get("/v1/models", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    finally:
        app.state.store.close()


def test_no_answer_carries_a_traceback_or_a_server_path(client, iql_run, planner_run, history_rows):
    bad_rows = [dict(row) for row in history_rows]
    bad_rows[0]["BIS"] = "abc"
    requests = [
        ("GET", "/v1/models", None),
        ("POST", VANCOMYCIN, {"state": STATE}),
        ("POST", VANCOMYCIN, {"state": {**STATE, "sbp": math.pi * 1000}}),
        ("POST", VANCOMYCIN, {"state": {"x" * 64: 1.0}}),
        ("POST", VANCOMYCIN, {"state": STATE, "model": "planner"}),
        ("POST", ANESTHESIA, {"rows": history_rows}),
        ("POST", ANESTHESIA, {"rows": bad_rows}),
        ("POST", ANESTHESIA, {"rows": [{"nothing": None}]}),
        ("POST", ANESTHESIA, {"rows": history_rows, "data_preset": "vitaldb"}),
        ("POST", ANESTHESIA, {"rows": history_rows, "model": "iql"}),
        ("GET", "/v1/audit", None),
        ("GET", "/v1/nowhere", None),
    ]
    for method, path, body in requests:
        response = client.request(method, path, json=body)
        assert response.status_code < 500, (path, body, response.text)
        assert_clean(response, iql_run, planner_run)


# --- the command line


def test_cli_token_create_prints_the_token_once_and_it_opens_the_api(iql_run, db_url, monkeypatch):
    runner = CliRunner()
    created = runner.invoke(cli, ["serve", "token", "create", "pharmacy-bot", "--db", db_url])
    assert created.exit_code == 0, created.output
    [token] = created.stdout.split()  # stdout is the token alone, so a script can capture it
    assert token.startswith("dw_") and len(token) > 40
    assert "shown only now" in created.stderr and token not in created.stderr

    app = build_app([iql_run], db_url, host="0.0.0.0")
    try:
        with TestClient(app) as client:
            assert client.get("/v1/models").status_code == 401
            response = client.post(VANCOMYCIN, json={"state": STATE}, headers={"Authorization": f"Bearer {token}"})
            assert response.status_code == 200
            assert app.state.store.audit(limit=1)[0].token_name == "pharmacy-bot"

            listed = runner.invoke(cli, ["serve", "token", "list", "--db", db_url])
            assert listed.exit_code == 0, listed.output
            assert "pharmacy-bot" in listed.stdout and token[:6] in listed.stdout and token not in listed.stdout

            again = runner.invoke(cli, ["serve", "token", "create", "pharmacy-bot", "--db", db_url])
            assert again.exit_code == 2
            assert "exists already" in again.stderr and "Traceback" not in again.output

            kept = runner.invoke(cli, ["serve", "token", "create", "ward-3", "--db", db_url]).stdout.strip()
            revoked = runner.invoke(cli, ["serve", "token", "revoke", "pharmacy-bot", "--db", db_url])
            assert revoked.exit_code == 0, revoked.output
            assert "revoked" in revoked.stdout
            assert client.post(VANCOMYCIN, json={"state": STATE}, headers={"Authorization": f"Bearer {token}"}).status_code == 401
            assert client.post(VANCOMYCIN, json={"state": STATE}, headers={"Authorization": f"Bearer {kept}"}).status_code == 200

            unknown = runner.invoke(cli, ["serve", "token", "revoke", "pharmacy-bot", "--db", db_url])
            assert unknown.exit_code == 2
            assert "no active token named 'pharmacy-bot'" in unknown.stderr
    finally:
        app.state.store.close()


def test_cli_serve_refuses_a_network_host_without_a_token_before_listening(iql_run, tmp_path, monkeypatch):
    import uvicorn

    started: list[dict[str, Any]] = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **options: started.append({"app": app, **options}))
    db = f"sqlite:///{tmp_path / 'cli.db'}"
    runner = CliRunner()

    refused = runner.invoke(cli, ["serve", "--run", str(iql_run), "--host", "0.0.0.0", "--db", db])
    assert refused.exit_code == 2
    assert "refusing to serve on 0.0.0.0 with no token" in refused.stderr
    assert started == []

    assert runner.invoke(cli, ["serve", "token", "create", "clinic", "--db", db]).exit_code == 0
    served = runner.invoke(cli, ["serve", "--run", f"vanco={iql_run}", "--host", "0.0.0.0", "--port", "8123", "--db", db])
    assert served.exit_code == 0, served.output
    [options] = started
    assert (options["host"], options["port"]) == ("0.0.0.0", 8123)
    assert list(options["app"].state.service.models) == ["vanco"]
