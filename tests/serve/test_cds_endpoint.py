"""CDS Hooks through the app: discovery, a patient-view call on the dose-aware IQL model (the same recommendation
as the API gives for the state the card shows), its audit row, and the token check."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest

from dosewise.serve.cds_hooks import SERVICE_ID, SUMMARY_LIMIT
from tests.serve.fhir_fixtures import PATIENT_ID, dose_aware_prefetch, hook_request
from tests.serve.fixtures import STATE

HOOK = f"/cds-services/{SERVICE_ID}"
STATE_ROW = re.compile(r"^\| (\w+) \| (-?[0-9.]+(?:e[+-]?[0-9]+)?) \| [^|]* \| [^|]* \| [^|]* \|$", re.MULTILINE)
POLICY = re.compile(r"policy ([+-]\d+\.\d\d) on the -1\.\.\+1 scale")


def state_shown(card: dict) -> dict[str, float]:
    """The state a card says it used, read back from its table (values are shown to 6 significant digits)."""
    return {name: float(value) for name, value in STATE_ROW.findall(card["detail"])}


def summary_of(text: str) -> str:
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


def hook_audit(client) -> list[dict]:
    response = client.get("/v1/audit", params={"endpoint": HOOK})
    assert response.status_code == 200
    return response.json()["rows"]


def test_discovery_is_open_and_lists_the_service_with_the_dose_aware_prefetch(client):
    response = client.get("/cds-services")
    assert response.status_code == 200
    (service,) = response.json()["services"]
    assert (service["id"], service["hook"]) == (SERVICE_ID, "patient-view")
    assert "iql" in service["description"]
    prefetch = service["prefetch"]
    assert list(prefetch) == ["observations", "medications", "patient", "conditions"]
    assert prefetch["patient"] == "Patient/{{context.patientId}}"
    assert prefetch["conditions"] == "Condition?patient={{context.patientId}}&clinical-status=active"
    assert "http://loinc.org|29463-7" in prefetch["observations"]


def test_full_prefetch_recommends_as_the_api_does_for_the_derived_state(client):
    (model,) = [m for m in client.get("/v1/models").json()["models"] if m["kind"] == "vancomycin"]
    assert model["training_data"]["features"] == list(STATE)  # the served model is dose-aware
    response = client.post(HOOK, json=hook_request(dose_aware_prefetch(STATE, datetime.now(UTC))))
    assert response.status_code == 200
    result = response.json()["cards"]
    card = result[0]
    assert card["indicator"] == "info" and card["source"] == {"label": "dosewise iql"}

    derived = state_shown(card)
    assert list(derived) == list(STATE)
    assert derived == pytest.approx(STATE | {"hours_since_dose": derived["hours_since_dose"]})
    assert derived["hours_since_dose"] == pytest.approx(STATE["hours_since_dose"], abs=0.02)  # the hook counts to its own now
    assert "no active dialysis condition in the record" in card["detail"]

    api = client.post("/v1/vancomycin/recommend", json={"state": derived})
    assert api.status_code == 200
    expected = api.json()
    assert float(POLICY.search(card["summary"]).group(1)) == round(expected["policy_action"], 2)
    assert f"**Suggested change:** {round(expected['policy_action'], 2):+.2f}" in card["detail"]
    assert [c["indicator"] for c in result] == ["info"] + ["warning"] * len(expected["warnings"])
    assert [c["summary"] for c in result[1:]] == [summary_of(f"Vancomycin: {w}") for w in expected["warnings"]]

    (row,) = hook_audit(client)
    assert (row["status"], row["method"], row["model_id"]) == (200, "POST", "iql")
    assert row["model_hash"] == model["model_hash"]
    assert row["response"] == response.json()
    assert row["request"]["context"]["patientId"] == PATIENT_ID
    assert response.headers["X-Audit-Id"] == str(row["id"])


def test_prefetch_without_creatinine_names_it_and_recommends_nothing(client):
    state = {name: value for name, value in STATE.items() if name != "creatinine"}
    response = client.post(HOOK, json=hook_request(dose_aware_prefetch(state, datetime.now(UTC))))
    assert response.status_code == 200
    (card,) = response.json()["cards"]
    assert card["indicator"] == "warning"
    assert card["summary"] == "Vancomycin recommendation not available: 1 value missing"
    assert "- creatinine (LOINC 2160-0): no Observation in the prefetch" in card["detail"]
    assert "Suggested change" not in card["detail"]
    (row,) = hook_audit(client)
    assert (row["status"], row["model_id"], row["response"]) == (200, "iql", response.json())


def test_unknown_service_is_404(client):
    response = client.post("/cds-services/another-service", json=hook_request(None))
    assert response.status_code == 404
    assert SERVICE_ID in response.json()["detail"]


def test_with_a_token_the_hook_needs_it_and_discovery_stays_open(client, store):
    token = store.create_token("ehr")
    body = hook_request(dose_aware_prefetch(STATE, datetime.now(UTC)))
    response = client.post(HOOK, json=body)
    assert response.status_code == 401
    assert response.headers["WWW-Authenticate"] == "Bearer"
    assert "cards" not in response.json()
    discovery = client.get("/cds-services")
    assert discovery.status_code == 200 and [s["id"] for s in discovery.json()["services"]] == [SERVICE_ID]
    allowed = client.post(HOOK, json=body, headers={"Authorization": f"Bearer {token}"})
    assert allowed.status_code == 200 and allowed.json()["cards"][0]["indicator"] == "info"
    rows = client.get("/v1/audit", params={"endpoint": HOOK}, headers={"Authorization": f"Bearer {token}"}).json()["rows"]
    assert [(row["status"], row["token_name"]) for row in rows] == [(200, "ehr"), (401, None)]
