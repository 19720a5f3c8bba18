"""The CDS Hooks reading of FHIR prefetches and the cards built from it."""

from __future__ import annotations

import re
from datetime import UTC, datetime

import pytest
from pydantic import ValidationError

from dosewise.api import DoseRecommendation
from dosewise.data.schema import DOSE_FEATURES, FEATURES
from dosewise.serve.cds_hooks import LOINC, SERVICE_ID, SUMMARY_LIMIT, HookRequest, HookState, cards, discovery, read_prefetch
from tests.serve.fhir_fixtures import (
    DIALYSIS_SNOMED,
    PATIENT_ID,
    SNOMED_SYSTEM,
    STATE,
    bp_panel,
    bundle,
    condition,
    dose_aware_prefetch,
    feature_observation,
    full_prefetch,
    hook_request,
    med_admin,
    observation,
    patient,
)

EARLY = "2024-03-01T06:00:00+00:00"
LATE = "2024-03-01T09:30:00+00:00"
LATEST = "2024-03-01T12:00:00+00:00"


def without(feature: str, state: dict[str, float] = STATE) -> dict[str, float]:
    return {k: v for k, v in state.items() if k != feature}


def prefetch_with(*extra: dict, state: dict[str, float] = STATE, doses: tuple[dict, ...] = ()) -> dict:
    """The full prefetch of `state` with extra Observations appended to its bundle."""
    prefetch = full_prefetch(state, doses=doses)
    prefetch["observations"]["entry"] += bundle(extra)["entry"]
    return prefetch


RECOMMENDATION = {
    "policy_action": 0.42,
    "greedy_action": 0.61,
    "q_value": 1.2345,
    "warnings": [],
    "overrides": [],
    "members": 1,
    "policy_action_sd": 0.0,
}


# --- reading the prefetch ------------------------------------------------------------------------


def test_full_prefetch_gives_exactly_the_state():
    hook = read_prefetch(full_prefetch(STATE), FEATURES)
    assert hook.state == STATE
    assert list(hook.state) == list(FEATURES)
    assert hook.observed_at == dict.fromkeys(FEATURES, "2024-03-01T08:00:00+00:00")
    assert (hook.missing, hook.unit_mismatch, hook.skipped, hook.doses) == ([], [], [], [])
    assert hook.complete


def test_only_the_model_features_are_read():
    hook = read_prefetch(full_prefetch(STATE), ["vanco_level", "creatinine"])
    assert hook.state == {"vanco_level": 18.5, "creatinine": 1.1}
    assert hook.complete
    assert any("8867-4 is not a feature of this model" in line for line in hook.skipped)


def test_latest_observation_wins_in_any_order():
    older = feature_observation("creatinine", 0.8, time=EARLY)
    newer = feature_observation("creatinine", 2.3, time=LATE)
    for extra in [(older, newer), (newer, older)]:
        hook = read_prefetch(prefetch_with(*extra, state=without("creatinine")), FEATURES)
        assert hook.state["creatinine"] == 2.3
        assert hook.observed_at["creatinine"] == LATE


def test_a_later_issued_time_orders_observations_without_effective_time():
    first = observation("2160-0", 0.9, "mg/dL", "mg/dL", time=None, id="cr-a") | {"issued": "2024-03-01T07:00:00+00:00"}
    second = observation("2160-0", 1.4, "mg/dL", "mg/dL", time=None, id="cr-b") | {"issued": "2024-03-01T07:30:00.000+00:00"}
    hook = read_prefetch(prefetch_with(second, first, state=without("creatinine")), FEATURES)
    assert hook.state["creatinine"] == 1.4
    assert hook.observed_at["creatinine"] == "2024-03-01T07:30:00+00:00"


def test_observation_without_any_time_is_skipped():
    timeless = observation("2160-0", 0.9, "mg/dL", "mg/dL", time=None, id="cr-x")
    hook = read_prefetch(prefetch_with(timeless, state=without("creatinine")), FEATURES)
    assert "creatinine" not in hook.state
    assert hook.skipped == ["Observation/cr-x (LOINC 2160-0): no effective or issued time, so it cannot be ordered"]
    assert hook.missing == ["creatinine (LOINC 2160-0): no usable Observation in the prefetch (1 ignored, see the ignored resources)"]


def test_sbp_from_blood_pressure_panel_component():
    hook = read_prefetch(prefetch_with(bp_panel(131.0, 79.0, time=LATE, id="bp1"), state=without("sbp")), FEATURES)
    assert hook.state["sbp"] == 131.0
    assert hook.observed_at["sbp"] == LATE
    assert hook.complete


def test_newer_panel_beats_older_standalone_systolic():
    panel = bp_panel(140.0, 85.0, time=LATE, id="bp1")
    hook = read_prefetch(prefetch_with(panel), FEATURES)  # the full prefetch has sbp 122 at 08:00
    assert hook.state["sbp"] == 140.0


def test_panel_without_systolic_component_is_skipped():
    panel = bp_panel(131.0, 79.0, id="bp1")
    panel["component"] = panel["component"][1:]
    hook = read_prefetch(prefetch_with(panel, state=without("sbp")), FEATURES)
    assert "sbp" not in hook.state
    assert "Observation/bp1 (LOINC 85354-9): the panel has no LOINC 8480-6 component" in hook.skipped
    assert hook.missing == [
        "sbp (LOINC 8480-6, or panel 85354-9): no usable Observation in the prefetch (1 ignored, see the ignored resources)"
    ]


def test_trough_code_is_a_vancomycin_level():
    trough = observation("4092-3", 14.2, "mg/L", "mg/L", id="trough1")
    hook = read_prefetch(prefetch_with(trough, state=without("vanco_level")), FEATURES)
    assert hook.state["vanco_level"] == 14.2


@pytest.mark.parametrize(("unit", "code_unit"), [("µg/mL", "ug/mL"), ("µg/mL", None), ("μg/mL", None), ("ug/mL", "ug/mL")])
def test_microgram_per_millilitre_is_read_as_mg_per_l(unit, code_unit):
    level = observation("20578-1", 21.0, unit, code_unit, id="lvl1")
    hook = read_prefetch(prefetch_with(level, state=without("vanco_level")), FEATURES)
    assert hook.state["vanco_level"] == 21.0
    assert hook.unit_mismatch == []


@pytest.mark.parametrize("code_unit", ["10*3/uL", "10^3/uL", "K/uL", "10*9/L"])
def test_every_accepted_wbc_unit_is_read_unchanged(code_unit):
    wbc = observation("6690-2", 12.5, code_unit, code_unit, id="wbc1")
    hook = read_prefetch(prefetch_with(wbc, state=without("wbc")), FEATURES)
    assert hook.state["wbc"] == 12.5


def test_fahrenheit_temperature_is_a_unit_mismatch_not_converted():
    fever = observation("8310-5", 101.3, "degF", "[degF]", id="abc")
    hook = read_prefetch(prefetch_with(fever, state=without("temperature")), FEATURES)
    assert "temperature" not in hook.state
    assert hook.unit_mismatch == ["temperature (LOINC 8310-5) Observation/abc: unit [degF] where Cel is expected"]
    assert hook.missing == []
    assert not hook.complete


def test_newer_result_in_a_wrong_unit_is_not_replaced_by_an_older_one():
    older = feature_observation("creatinine", 1.0, time=EARLY)
    newer = observation("2160-0", 97.0, "umol/L", "umol/L", time=LATE, id="cr-si")
    hook = read_prefetch(prefetch_with(older, newer, state=without("creatinine")), FEATURES)
    assert "creatinine" not in hook.state
    assert hook.unit_mismatch == ["creatinine (LOINC 2160-0) Observation/cr-si: unit umol/L where mg/dL is expected"]


def test_unit_text_is_used_when_the_code_is_absent_and_no_unit_is_a_mismatch():
    by_text = observation("8867-4", 95.0, "beats/min", None, id="hr1")
    assert read_prefetch(prefetch_with(by_text, state=without("heart_rate")), FEATURES).state["heart_rate"] == 95.0
    unitless = observation("8867-4", 95.0, None, None, id="hr2")
    hook = read_prefetch(prefetch_with(unitless, state=without("heart_rate")), FEATURES)
    assert hook.unit_mismatch == ["heart_rate (LOINC 8867-4) Observation/hr2: no unit where /min is expected"]


def test_missing_creatinine_is_named():
    hook = read_prefetch(full_prefetch(without("creatinine")), FEATURES)
    assert "creatinine" not in hook.state
    assert hook.missing == ["creatinine (LOINC 2160-0): no Observation in the prefetch"]
    assert not hook.complete


def test_empty_or_absent_prefetch_names_every_feature():
    for prefetch in (None, {}, {"observations": None, "medications": None}):
        hook = read_prefetch(prefetch, FEATURES)
        assert hook.state == {}
        assert [line.split(" ")[0] for line in hook.missing] == list(FEATURES)
        assert hook.missing[0] == "vanco_level (LOINC 20578-1 or 4092-3): no Observation in the prefetch"


def test_feature_without_a_fhir_source_is_missing():
    hook = read_prefetch(full_prefetch(STATE), [*FEATURES, "lactate"])
    assert hook.missing == ["lactate: this service reads no FHIR resource for it"]
    assert not hook.complete


@pytest.mark.parametrize("status", ["entered-in-error", "cancelled", "registered"])
def test_observation_that_is_not_a_result_is_skipped(status):
    wrong = feature_observation("creatinine", 9.9, time=LATE, id="cr-err", status=status)
    hook = read_prefetch(prefetch_with(wrong), FEATURES)
    assert hook.state["creatinine"] == 1.1  # the 08:00 value, not the withdrawn 09:30 one
    assert hook.skipped == [f"Observation/cr-err (LOINC 2160-0): status {status} is not a result"]


@pytest.mark.parametrize("status", ["preliminary", "amended", "corrected"])
def test_preliminary_and_corrected_results_count(status):
    newer = feature_observation("creatinine", 1.9, time=LATE, status=status)
    assert read_prefetch(prefetch_with(newer), FEATURES).state["creatinine"] == 1.9


def test_invalid_resource_is_skipped_with_the_reason():
    broken = observation("2160-0", "one point two", "mg/dL", "mg/dL", id="bad1")
    hook = read_prefetch(prefetch_with(broken, state=without("creatinine")), FEATURES)
    assert "creatinine" not in hook.state
    assert len(hook.skipped) == 1
    assert hook.skipped[0].startswith("Observation/bad1: not a valid FHIR R4 Observation: valueQuantity.value: ")
    assert hook.missing == ["creatinine (LOINC 2160-0): no usable Observation in the prefetch (1 ignored, see the ignored resources)"]


def test_resources_that_are_not_json_objects_or_not_read_are_skipped():
    prefetch = full_prefetch(STATE)
    prefetch["observations"]["entry"].append({"fullUrl": "x"})
    prefetch["procedure"] = {"resourceType": "Procedure", "id": "proc-1"}
    prefetch["junk"] = ["not", "a", "resource"]
    hook = read_prefetch(prefetch, FEATURES)
    assert hook.state == STATE
    assert hook.skipped == [
        "prefetch['observations'] entry 7: no resource with a resourceType",
        "prefetch['junk']: not a FHIR resource (a JSON object with a resourceType was expected)",
        "Procedure/proc-1: a Procedure is not read by this service (only Observation, MedicationAdministration, Patient and Condition)",
    ]


def test_patient_and_conditions_are_passed_over_by_a_model_without_age_or_dialysis():
    prefetch = full_prefetch(STATE) | {"patient": patient("1960-05-04"), "conditions": bundle([condition()])}
    hook = read_prefetch(prefetch, FEATURES)
    assert hook.state == STATE
    assert hook.skipped == [] and hook.missing == []


def test_single_resource_prefetch_value_is_read():
    prefetch = {"level": feature_observation("vanco_level", 30.0), "rest": full_prefetch(without("vanco_level"))["observations"]}
    assert read_prefetch(prefetch, FEATURES).state == STATE | {"vanco_level": 30.0}


def test_value_without_number_is_skipped_never_guessed():
    absent = feature_observation("bun", None, time=LATE, id="bun-x") | {"dataAbsentReason": {"text": "specimen haemolysed"}}
    text = feature_observation("bun", None, time=LATE, id="bun-y") | {"valueString": "see comment"}
    hook = read_prefetch(prefetch_with(absent, text), FEATURES)
    assert hook.state["bun"] == 18.0
    assert hook.skipped == [
        "Observation/bun-x (LOINC 3094-0): no value (data absent reason: specimen haemolysed)",
        "Observation/bun-y (LOINC 3094-0): its value is a String, not a Quantity",
    ]


def test_censored_value_is_missing_not_used():
    below = observation("20578-1", 2.0, "mg/L", "mg/L", time=LATE, id="lvl-low")
    below["valueQuantity"]["comparator"] = "<"
    hook = read_prefetch(prefetch_with(below), FEATURES)
    assert "vanco_level" not in hook.state
    assert hook.missing == [
        f"vanco_level (LOINC 20578-1 or 4092-3): the newest, Observation/lvl-low at {LATE}, is <2 mg/L, not an exact value"
    ]


def test_disagreeing_observations_at_the_same_time_are_missing():
    twin = feature_observation("heart_rate", 120.0, id="hr-twin")
    hook = read_prefetch(prefetch_with(twin), FEATURES)
    assert "heart_rate" not in hook.state
    assert hook.missing == [
        "heart_rate (LOINC 8867-4): Observations at the same time 2024-03-01T08:00:00+00:00 disagree "
        "(Observation/heart-rate-2024-03-01T08-00-00-00-00 88 /min vs Observation/hr-twin 120 /min)"
    ]


def test_same_resource_in_two_prefetch_values_counts_once():
    prefetch = full_prefetch(STATE)
    prefetch["again"] = prefetch["observations"]
    hook = read_prefetch(prefetch, FEATURES)
    assert hook.state == STATE
    assert hook.missing == [] and hook.skipped == []


def test_another_patients_resource_is_skipped():
    other = observation("2160-0", 4.0, "mg/dL", "mg/dL", time=LATE, id="cr-other", patient="someone-else")
    device = observation("8867-4", 60.0, "/min", "/min", time=LATE, id="hr-dev") | {"subject": {"reference": "Device/monitor-3"}}
    hook = read_prefetch(prefetch_with(other, device), FEATURES, patient_id=PATIENT_ID)
    assert hook.state == STATE
    assert hook.skipped == [
        "Observation/cr-other (LOINC 2160-0): its subject Patient/someone-else is not Patient/pat-1",
        "Observation/hr-dev (LOINC 8867-4): its subject is a Device, not a patient",
    ]


def test_doses_newest_first_with_grams_in_mg():
    doses = (
        med_admin(1000.0, time="2024-02-29T20:00:00+00:00", id="d1"),
        med_admin((1.25, "g"), time="2024-03-01T08:00:00+00:00", id="d2", status="in-progress"),
        med_admin(None, time="2024-02-29T08:00:00+00:00", id="d0"),
    )
    hook = read_prefetch(full_prefetch(STATE, doses=doses), FEATURES)
    assert hook.doses == [
        {"time": "2024-03-01T08:00:00+00:00", "dose_mg": 1250.0, "status": "in-progress"},
        {"time": "2024-02-29T20:00:00+00:00", "dose_mg": 1000.0, "status": "completed"},
        {"time": "2024-02-29T08:00:00+00:00", "dose_mg": None, "status": "completed"},
    ]
    assert hook.unit_mismatch == [] and hook.skipped == []


def test_dose_in_other_unit_is_a_mismatch_and_other_drugs_or_withdrawn_doses_are_skipped():
    doses = (
        med_admin((15.0, "mg/kg"), id="d-kg"),
        med_admin(4500.0, id="d-pip", medication="piperacillin/tazobactam"),
        med_admin(1000.0, id="d-err", status="entered-in-error"),
        med_admin(1000.0, id="d-not", status="not-done"),
    )
    hook = read_prefetch(full_prefetch(STATE, doses=doses), FEATURES)
    assert hook.doses == [{"time": "2024-03-01T08:00:00+00:00", "dose_mg": None, "status": "completed"}]
    assert hook.unit_mismatch == ["vancomycin dose MedicationAdministration/d-kg: unit mg/kg where mg is expected"]
    assert hook.skipped == [
        "MedicationAdministration/d-pip: not a vancomycin administration",
        "MedicationAdministration/d-err: status entered-in-error, so the dose was not given",
        "MedicationAdministration/d-not: status not-done, so the dose was not given",
    ]
    assert hook.complete  # a dose unit does not block the model's state


def test_vancomycin_named_by_rxnorm_or_a_contained_medication():
    coded = med_admin(750.0, id="d-rx", time=EARLY)
    coded["medicationCodeableConcept"] = {"coding": [{"system": "http://www.nlm.nih.gov/research/umls/rxnorm", "code": "11124"}]}
    contained = med_admin(500.0, id="d-ref", time=LATE)
    del contained["medicationCodeableConcept"]
    contained["contained"] = [{"resourceType": "Medication", "id": "m1", "code": {"text": "Vancomycin HCl"}}]
    contained["medicationReference"] = {"reference": "#m1"}
    included = med_admin(250.0, id="d-inc", time=LATEST)
    del included["medicationCodeableConcept"]
    included["medicationReference"] = {"reference": "Medication/vanc"}
    prefetch = full_prefetch(STATE, doses=(coded, contained, included))
    prefetch["medications"]["entry"] += bundle([{"resourceType": "Medication", "id": "vanc", "code": {"text": "vancomycin"}}])["entry"]
    hook = read_prefetch(prefetch, FEATURES)
    assert [d["dose_mg"] for d in hook.doses] == [250.0, 500.0, 750.0]
    assert hook.skipped == []


def test_date_only_and_partial_times_order_with_date_times():
    day = observation("3094-0", 25.0, "mg/dL", "mg/dL", time="2024-03-02", id="bun-day")
    month = observation("3094-0", 30.0, "mg/dL", "mg/dL", time="2024-02", id="bun-month")
    hook = read_prefetch(prefetch_with(month, day), FEATURES)
    assert hook.state["bun"] == 25.0
    assert hook.observed_at["bun"] == "2024-03-02"


# --- the dose-aware features -----------------------------------------------------------------------

NOW = datetime(2024, 3, 1, 12, 0, tzinfo=UTC)
REFERENCE = "2024-03-01T12:00:00+00:00"
DOSE_AWARE = (*FEATURES, *DOSE_FEATURES)
NEWEST_DOSE = "2024-03-01T08:00:00+00:00"
PREVIOUS_DOSE = "2024-02-29T20:00:00+00:00"
TWO_DOSES = (med_admin(1000.0, time=PREVIOUS_DOSE, id="d1"), med_admin(1250.0, time=NEWEST_DOSE, id="d2"))
DOSE_STATE = {"dose_mg": 1250.0, "interval_h": 12.0, "hours_since_dose": 4.0, "weight_kg": 80.0, "age": 63.0, "dialysis": 0.0}
REGIMEN_WHAT = {
    "dose_mg": "dose_mg (dose of the newest vancomycin MedicationAdministration)",
    "hours_since_dose": "hours_since_dose (start of the newest vancomycin MedicationAdministration)",
    "interval_h": "interval_h (starts of the newest two vancomycin MedicationAdministrations)",
}
DIALYSIS_WHAT = "dialysis (an active Condition coded SNOMED 105502003 or ICD-10-CM Z99.2)"


def dose_aware_record(
    doses: tuple[dict, ...] = TWO_DOSES,
    weight: tuple[float, str, str] | None = (80.0, "kg", "kg"),
    birth_date: str | None = "1960-05-04",
    conditions: tuple[dict, ...] = (),
) -> dict:
    """The full prefetch of STATE with vancomycin doses, a body weight, the Patient and the (complete) conditions query."""
    prefetch = full_prefetch(STATE, doses=doses)
    if weight is not None:
        prefetch["observations"]["entry"] += bundle([observation("29463-7", *weight, id="wt1")])["entry"]
    prefetch["patient"] = patient(birth_date)
    prefetch["conditions"] = bundle(conditions)
    return prefetch


def read_dose_aware(prefetch: dict, now: datetime = NOW) -> HookState:
    return read_prefetch(prefetch, DOSE_AWARE, PATIENT_ID, now=now)


def test_dose_aware_record_gives_the_whole_state_with_sources():
    hook = read_dose_aware(dose_aware_record())
    assert hook.state == STATE | DOSE_STATE
    assert list(hook.state) == list(DOSE_AWARE)
    assert (hook.missing, hook.unit_mismatch, hook.skipped) == ([], [], [])
    assert hook.complete
    assert hook.reference_time == REFERENCE
    assert {name: hook.observed_at[name] for name in DOSE_FEATURES} == {
        "dose_mg": NEWEST_DOSE,
        "interval_h": NEWEST_DOSE,
        "hours_since_dose": NEWEST_DOSE,
        "weight_kg": "2024-03-01T08:00:00+00:00",
        "age": REFERENCE,
        "dialysis": REFERENCE,
    }
    assert {name: hook.sources[name] for name in DOSE_FEATURES} == {
        "dose_mg": "MedicationAdministration/d2 (completed)",
        "interval_h": (
            f"starts of MedicationAdministration/d1 at {PREVIOUS_DOSE} and MedicationAdministration/d2 at {NEWEST_DOSE} (12.00 h apart)"
        ),
        "hours_since_dose": f"start of MedicationAdministration/d2, to {REFERENCE}",
        "weight_kg": "Observation/wt1 (LOINC 29463-7)",
        "age": "Patient/pat-1 birthDate 1960-05-04",
        "dialysis": "no active dialysis condition in the record (prefetch 'conditions')",
    }
    assert hook.sources["creatinine"] == "Observation/creatinine-2024-03-01T08-00-00-00-00 (LOINC 2160-0)"


def test_card_lists_every_feature_used_with_its_source_and_time():
    (card,) = cards(read_dose_aware(dose_aware_record()), RECOMMENDATION, "iql")["cards"]
    detail = card["detail"]
    assert "| Feature | Value | Unit | Time | Source |" in detail
    assert f"hours\\_since\\_dose and age counted to {REFERENCE}." not in detail  # feature names are shown as they are
    assert f"hours_since_dose and age counted to {REFERENCE}." in detail
    for row in (
        "| creatinine | 1.1 | mg/dL | 2024-03-01T08:00:00+00:00 | Observation/creatinine-2024-03-01T08-00-00-00-00 (LOINC 2160-0) |",
        f"| dose_mg | 1250 | mg | {NEWEST_DOSE} | MedicationAdministration/d2 (completed) |",
        f"| interval_h | 12 | h | {NEWEST_DOSE} | starts of MedicationAdministration/d1 at {PREVIOUS_DOSE} and MedicationAdministration/d2",
        f"| hours_since_dose | 4 | h | {NEWEST_DOSE} | start of MedicationAdministration/d2, to {REFERENCE} |",
        "| weight_kg | 80 | kg | 2024-03-01T08:00:00+00:00 | Observation/wt1 (LOINC 29463-7) |",
        f"| age | 63 | y | {REFERENCE} | Patient/pat-1 birthDate 1960-05-04 |",
        f"| dialysis | 0 | 0/1 | {REFERENCE} | no active dialysis condition in the record (prefetch 'conditions') |",
    ):
        assert row in detail


def test_one_dose_gives_no_interval_and_says_why():
    hook = read_dose_aware(dose_aware_record(doses=(med_admin(1250.0, time=NEWEST_DOSE, id="d2"),)))
    assert hook.state["dose_mg"] == 1250.0 and hook.state["hours_since_dose"] == 4.0
    assert "interval_h" not in hook.state
    assert hook.missing == [
        f"{REGIMEN_WHAT['interval_h']}: only one vancomycin administration in the prefetch (MedicationAdministration/d2 at {NEWEST_DOSE}), "
        "so no interval"
    ]
    assert not hook.complete
    (card,) = cards(hook, None, "iql")["cards"]
    assert card["summary"] == "Vancomycin recommendation not available: 1 value missing"
    assert "only one vancomycin administration in the prefetch" in card["detail"]


@pytest.mark.parametrize(("dose", "mg"), [((1.25, "g"), 1250.0), ((0.75, "g"), 750.0), (1500.0, 1500.0)])
def test_dose_in_grams_is_read_in_mg(dose, mg):
    doses = (med_admin(1000.0, time=PREVIOUS_DOSE, id="d1"), med_admin(dose, time=NEWEST_DOSE, id="d2"))
    assert read_dose_aware(dose_aware_record(doses=doses)).state["dose_mg"] == mg


@pytest.mark.parametrize(("previous", "interval"), [("2024-02-29T20:20:00+00:00", 12.0), ("2024-02-29T20:31:00+00:00", 11.0)])
def test_interval_is_rounded_to_the_nearest_hour_and_a_period_start_counts(previous, interval):
    newest = med_admin(1250.0, time=NEWEST_DOSE, id="d2")
    del newest["effectiveDateTime"]
    newest["effectivePeriod"] = {"start": NEWEST_DOSE, "end": "2024-03-01T09:30:00+00:00"}
    hook = read_dose_aware(dose_aware_record(doses=(med_admin(1000.0, time=previous, id="d1"), newest)))
    assert hook.state["interval_h"] == interval
    assert hook.state["hours_since_dose"] == 4.0  # from the start of the infusion, not its end


def test_no_dose_leaves_the_regimen_missing():
    hook = read_dose_aware(dose_aware_record(doses=()))
    assert [name for name in DOSE_FEATURES if name not in hook.state] == ["dose_mg", "interval_h", "hours_since_dose"]
    assert hook.missing == [
        f"{REGIMEN_WHAT[name]}: no vancomycin administration in the prefetch" for name in ("dose_mg", "interval_h", "hours_since_dose")
    ]


@pytest.mark.parametrize(
    ("change", "why"),
    [
        (
            {"status": "stopped"},
            f"MedicationAdministration/d2 at {NEWEST_DOSE}, has status stopped (only completed or in-progress doses are read as given)",
        ),
        (
            {"status": "on-hold"},
            f"MedicationAdministration/d2 at {NEWEST_DOSE}, has status on-hold (only completed or in-progress doses are read as given)",
        ),
        ({"effectiveDateTime": "2024-03-01"}, "MedicationAdministration/d2, is recorded at 2024-03-01 without a time of day"),
        (
            {"effectiveDateTime": "2024-03-01T13:00:00+00:00"},
            f"MedicationAdministration/d2, starts at 2024-03-01T13:00:00+00:00, after the reference time {REFERENCE}",
        ),
    ],
)
def test_newest_dose_not_known_as_given_is_not_replaced_by_an_older_one(change, why):
    doses = (med_admin(1000.0, time=PREVIOUS_DOSE, id="d1"), med_admin(1250.0, time=NEWEST_DOSE, id="d2") | change)
    hook = read_dose_aware(dose_aware_record(doses=doses))
    assert not any(name in hook.state for name in ("dose_mg", "interval_h", "hours_since_dose"))
    assert hook.missing == [f"{REGIMEN_WHAT[name]}: the newest, {why}" for name in ("dose_mg", "interval_h", "hours_since_dose")]


def test_in_progress_dose_counts_and_one_before_it_not_given_leaves_the_interval_missing():
    doses = (
        med_admin(1000.0, time=PREVIOUS_DOSE, id="d1", status="unknown"),
        med_admin(1250.0, time=NEWEST_DOSE, id="d2", status="in-progress"),
    )
    hook = read_dose_aware(dose_aware_record(doses=doses))
    assert hook.state["dose_mg"] == 1250.0 and hook.state["hours_since_dose"] == 4.0
    assert hook.missing == [
        f"{REGIMEN_WHAT['interval_h']}: the one before the newest, MedicationAdministration/d1 at {PREVIOUS_DOSE}, has status unknown "
        "(only completed or in-progress doses are read as given)"
    ]


def test_newest_dose_in_another_unit_is_a_mismatch_and_without_amount_is_missing():
    doses = (med_admin(1000.0, time=PREVIOUS_DOSE, id="d1"), med_admin((15.0, "mg/kg"), time=NEWEST_DOSE, id="d2"))
    hook = read_dose_aware(dose_aware_record(doses=doses))
    assert "dose_mg" not in hook.state and hook.state["interval_h"] == 12.0
    assert hook.unit_mismatch == ["vancomycin dose MedicationAdministration/d2: unit mg/kg where mg is expected"]
    assert hook.missing == []
    (card,) = cards(hook, None, "iql")["cards"]
    assert card["summary"] == "Vancomycin recommendation not available: 1 in an unexpected unit"

    doses = (med_admin(1000.0, time=PREVIOUS_DOSE, id="d1"), med_admin(None, time=NEWEST_DOSE, id="d2"))
    hook = read_dose_aware(dose_aware_record(doses=doses))
    assert hook.missing == [f"{REGIMEN_WHAT['dose_mg']}: the newest, MedicationAdministration/d2 at {NEWEST_DOSE}, records no dose"]


def test_two_doses_starting_together_are_not_read_as_one():
    doses = (med_admin(1000.0, time=NEWEST_DOSE, id="d1"), med_admin(1250.0, time=NEWEST_DOSE, id="d2"))
    hook = read_dose_aware(dose_aware_record(doses=doses))
    assert hook.state["hours_since_dose"] == 4.0
    assert hook.missing == [
        f"{REGIMEN_WHAT['dose_mg']}: MedicationAdministration/d1 and MedicationAdministration/d2 start at the same time {NEWEST_DOSE}, "
        "so the dose then is not one record",
        f"{REGIMEN_WHAT['interval_h']}: the newest two, MedicationAdministration/d2 at {NEWEST_DOSE} and MedicationAdministration/d1 "
        f"at {NEWEST_DOSE}, start 0 h apart, under an hour",
    ]


@pytest.mark.parametrize("code", ["29463-7", "3141-9"])
def test_weight_in_kg_from_either_body_weight_code(code):
    prefetch = dose_aware_record(weight=None)
    prefetch["observations"]["entry"] += bundle([observation(code, 72.5, "kg", "kg", id="wt2")])["entry"]
    hook = read_dose_aware(prefetch)
    assert hook.state["weight_kg"] == 72.5
    assert hook.sources["weight_kg"] == f"Observation/wt2 (LOINC {code})"


def test_weight_in_pounds_is_a_unit_mismatch_not_converted():
    hook = read_dose_aware(dose_aware_record(weight=(176.4, "lb", "[lb_av]")))
    assert "weight_kg" not in hook.state
    assert hook.unit_mismatch == ["weight_kg (LOINC 29463-7) Observation/wt1: unit [lb_av] where kg is expected"]
    assert hook.missing == []
    assert not hook.complete


def test_no_weight_is_missing():
    hook = read_dose_aware(dose_aware_record(weight=None))
    assert hook.missing == ["weight_kg (LOINC 29463-7 or 3141-9): no Observation in the prefetch"]


@pytest.mark.parametrize(
    ("birth_date", "now", "age"),
    [
        ("1960-05-04", NOW, 63.0),
        ("1960-05-04", datetime(2024, 5, 4, 0, 30, tzinfo=UTC), 64.0),  # the birthday itself
        ("1960-05-04", datetime(2024, 5, 3, 23, 59, tzinfo=UTC), 63.0),
        ("1960-01", NOW, 64.0),  # every day of January 1960 gives 64
        ("2023-11-20", NOW, 0.0),
    ],
)
def test_age_is_whole_years_from_the_birth_date(birth_date, now, age):
    hook = read_dose_aware(dose_aware_record(birth_date=birth_date), now=now)
    assert hook.state["age"] == age
    assert hook.observed_at["age"] == now.isoformat(timespec="seconds")


@pytest.mark.parametrize(
    ("birth_date", "why"),
    [
        ("1959", f"Patient/pat-1 birthDate 1959 gives an age of 64 or 65 at {REFERENCE}, not one"),
        ("2024-04", f"Patient/pat-1 birthDate 2024-04 is after the reference time {REFERENCE}"),
        ("2024-03", f"Patient/pat-1 birthDate 2024-03 may be after the reference time {REFERENCE}"),
        (None, "Patient/pat-1 has no birthDate"),
    ],
)
def test_age_that_the_birth_date_does_not_fix_is_missing(birth_date, why):
    hook = read_dose_aware(dose_aware_record(birth_date=birth_date))
    assert "age" not in hook.state
    assert hook.missing == [f"age (Patient birthDate): {why}"]


def test_age_needs_the_open_patients_resource():
    prefetch = dose_aware_record()
    del prefetch["patient"]
    assert read_dose_aware(prefetch).missing == ["age (Patient birthDate): no Patient resource of the patient in the prefetch"]
    prefetch["patient"] = patient("1960-05-04", id="pat-2")
    hook = read_dose_aware(prefetch)
    assert hook.skipped == ["Patient/pat-2: not Patient/pat-1, whose chart is open"]
    assert hook.missing == ["age (Patient birthDate): no Patient resource of the patient in the prefetch"]


@pytest.mark.parametrize(
    ("dialysis", "source", "time"),
    [
        (condition(id="c1"), "Condition/c1 (ICD-10-CM Z99.2, active)", "2023-11-02"),
        (condition(DIALYSIS_SNOMED, SNOMED_SYSTEM, id="c2"), "Condition/c2 (SNOMED 105502003, active)", "2023-11-02"),
        (condition(id="c3", verification=None, clinical_status="relapse"), "Condition/c3 (ICD-10-CM Z99.2, relapse)", "2023-11-02"),
    ],
)
def test_active_dialysis_condition_gives_dialysis_1(dialysis, source, time):
    hypertension = condition("I10", id="c-htn")
    hook = read_dose_aware(dose_aware_record(conditions=(hypertension, dialysis)))
    assert hook.state["dialysis"] == 1.0
    assert (hook.sources["dialysis"], hook.observed_at["dialysis"]) == (source, time)
    assert hook.skipped == []


def test_empty_conditions_query_gives_dialysis_0_said_in_the_card():
    hook = read_dose_aware(dose_aware_record(conditions=(condition("I10", id="c-htn"),)))
    assert hook.state["dialysis"] == 0.0 and hook.skipped == []
    hook = read_dose_aware(dose_aware_record(conditions=()))
    assert hook.state["dialysis"] == 0.0
    (card,) = cards(hook, RECOMMENDATION, "iql")["cards"]
    assert "no active dialysis condition in the record" in card["detail"]


@pytest.mark.parametrize(
    ("dialysis", "skipped"),
    [
        (condition(id="c1", clinical_status="inactive"), "clinical status inactive, so not an active dialysis condition"),
        (condition(id="c1", clinical_status="resolved"), "clinical status resolved, so not an active dialysis condition"),
        (condition(id="c1", verification="refuted"), "verification status refuted, so not a condition of the patient"),
        (condition(id="c1", patient="pat-2"), "its subject Patient/pat-2 is not Patient/pat-1"),
    ],
)
def test_inactive_or_withdrawn_dialysis_condition_gives_dialysis_0(dialysis, skipped):
    hook = read_dose_aware(dose_aware_record(conditions=(dialysis,)))
    assert hook.state["dialysis"] == 0.0
    assert hook.skipped == [f"Condition/c1 (ICD-10-CM Z99.2): {skipped}"]


def test_without_the_conditions_query_dialysis_is_missing():
    prefetch = dose_aware_record()
    del prefetch["conditions"]
    hook = read_dose_aware(prefetch)
    assert "dialysis" not in hook.state
    assert hook.missing == [f"{DIALYSIS_WHAT}: no 'conditions' prefetch, so the record's Conditions were not queried"]
    prefetch["conditions"] = None
    assert read_dose_aware(prefetch).missing == [f"{DIALYSIS_WHAT}: the client could not run the 'conditions' prefetch query"]
    prefetch["conditions"] = bundle([condition(id="c1", clinical_status="inactive")]) | {
        "link": [{"relation": "next", "url": "https://fhir.example.org/Condition?page=2"}]
    }
    assert read_dose_aware(prefetch).missing == [
        f"{DIALYSIS_WHAT}: prefetch['conditions'] is the first page of a longer result (it has a next link), "
        "so other Conditions may not be shown"
    ]
    prefetch["conditions"] = bundle(
        [{"resourceType": "OperationOutcome", "id": "oo1", "issue": [{"severity": "error", "code": "timeout"}]}]
    )
    assert read_dose_aware(prefetch).missing == [f"{DIALYSIS_WHAT}: the FHIR server reported an error for the 'conditions' query: timeout"]


def test_dialysis_condition_outside_the_conditions_query_still_counts():
    prefetch = dose_aware_record()
    del prefetch["conditions"]
    prefetch["problems"] = condition(id="c1")
    assert read_dose_aware(prefetch).state["dialysis"] == 1.0


@pytest.mark.parametrize(
    ("dialysis", "why"),
    [
        (condition(id="c1", verification="provisional"), "Condition/c1 (ICD-10-CM Z99.2) is active but provisional"),
        (condition(id="c1", clinical_status=None), "Condition/c1 (ICD-10-CM Z99.2) has no clinical status, so it may or may not be active"),
    ],
)
def test_uncertain_dialysis_condition_leaves_dialysis_missing(dialysis, why):
    hook = read_dose_aware(dose_aware_record(conditions=(dialysis,)))
    assert "dialysis" not in hook.state
    assert hook.missing == [f"{DIALYSIS_WHAT}: {why}"]


def test_reference_time_defaults_to_now_and_must_be_timezone_aware():
    state = STATE | {"dose_mg": 1000.0, "interval_h": 8.0, "hours_since_dose": 6.5, "weight_kg": 70.0, "age": 58.0, "dialysis": 1.0}
    prefetch = dose_aware_prefetch(state, datetime.now(UTC), conditions=[condition(id="c1")])
    hook = read_prefetch(prefetch, DOSE_AWARE, PATIENT_ID)
    assert hook.complete and hook.missing == [] and hook.skipped == []
    assert hook.state == pytest.approx(state | {"hours_since_dose": hook.state["hours_since_dose"]})
    assert hook.state["hours_since_dose"] == pytest.approx(6.5, abs=0.02)
    with pytest.raises(ValueError, match="timezone-aware"):
        read_prefetch(prefetch, DOSE_AWARE, now=datetime(2024, 3, 1, 12))


# --- discovery and the request body -----------------------------------------------------------------


def test_discovery_document_shape():
    document = discovery(["iql"])
    assert list(document) == ["services"]
    (service,) = document["services"]
    assert service["hook"] == "patient-view"
    assert service["id"] == SERVICE_ID
    assert service["title"] and "iql" in service["description"]
    assert service["prefetch"]["medications"] == "MedicationAdministration?patient={{context.patientId}}"
    observations = service["prefetch"]["observations"]
    assert observations.startswith("Observation?patient={{context.patientId}}&code=http://loinc.org|20578-1,")
    assert observations.endswith("&_sort=-date")
    for codes in LOINC.values():
        for code in codes:
            assert f"http://loinc.org|{code}" in observations
    assert "http://loinc.org|85354-9" in observations
    assert "http://loinc.org|29463-7" in observations and "http://loinc.org|3141-9" in observations  # body weight
    assert service["prefetch"]["patient"] == "Patient/{{context.patientId}}"
    assert service["prefetch"]["conditions"] == "Condition?patient={{context.patientId}}&clinical-status=active"
    assert list(service["prefetch"]) == ["observations", "medications", "patient", "conditions"]
    requirements = service["usageRequirements"]
    for needed in ("Patient", "Conditions", "birthDate", "Z99.2", "105502003", "body weight kg", "mg or g"):
        assert needed in requirements
    assert "dialysis" in service["description"] and "body weight" in service["description"]
    assert discovery([]) == {"services": []}


def test_hook_request_accepts_the_spec_body_and_rejects_other_hooks():
    request = HookRequest.model_validate(hook_request(full_prefetch(STATE)) | {"extension": {"x": 1}})
    assert request.context.patientId == PATIENT_ID
    assert request.context.userId == "Practitioner/dr-1"
    assert read_prefetch(request.prefetch, FEATURES).state == STATE
    assert HookRequest.model_validate(hook_request(None)).prefetch is None
    with pytest.raises(ValidationError, match="hook"):
        HookRequest.model_validate(hook_request(None) | {"hook": "order-select"})
    with pytest.raises(ValidationError, match="patientId"):
        HookRequest.model_validate(hook_request(None) | {"context": {}})


# --- cards ---------------------------------------------------------------------------------------


def full_state(doses: tuple[dict, ...] = ()) -> HookState:
    return read_prefetch(full_prefetch(STATE, doses=doses), FEATURES)


@pytest.mark.parametrize(
    ("action", "summary"),
    [
        (0.42, "Vancomycin: raise the dose (policy +0.42 on the -1..+1 scale)"),
        (0.05, "Vancomycin: keep the dose (policy +0.05 on the -1..+1 scale)"),
        (0.094, "Vancomycin: keep the dose (policy +0.09 on the -1..+1 scale)"),
        (-0.099, "Vancomycin: lower the dose (policy -0.10 on the -1..+1 scale)"),  # as shown, not as stored
        (-0.6, "Vancomycin: lower the dose (policy -0.60 on the -1..+1 scale)"),
    ],
)
def test_recommendation_card_summary(action, summary):
    (card,) = cards(full_state(), RECOMMENDATION | {"policy_action": action}, "iql")["cards"]
    assert card["summary"] == summary
    assert card["indicator"] == "info"
    assert card["source"] == {"label": "dosewise iql"}


def test_recommendation_card_detail_shows_state_doses_and_actions():
    hook = full_state(doses=(med_admin(1000.0, time=EARLY, id="d1"), med_admin((1.5, "g"), time=LATE, id="d2")))
    recommendation = RECOMMENDATION | {"members": 5, "policy_action_sd": 0.083}
    (card,) = cards(hook, recommendation, "iql")["cards"]
    detail = card["detail"]
    assert "| vanco_level | 18.5 | mg/L | 2024-03-01T08:00:00+00:00 |" in detail
    assert "| temperature | 37.4 | °C | 2024-03-01T08:00:00+00:00 |" in detail
    assert "| wbc | 9.8 | K/µL |" in detail
    assert f"- {LATE}: 1500 mg (completed)\n- {EARLY}: 1000 mg (completed)" in detail
    assert "**Suggested change:** +0.42" in detail
    assert "**Greedy action** (the critic's best estimate): +0.61; Q value of the suggested change: 1.234." in detail
    assert "**Ensemble:** 5 members; spread (SD) of their suggested changes 0.08." in detail


def test_single_model_card_has_no_ensemble_line():
    (card,) = cards(full_state(), RECOMMENDATION, "iql")["cards"]
    assert "Ensemble" not in card["detail"]
    assert "none in the record" in card["detail"]


def test_one_warning_card_per_warning_with_short_summaries():
    long_warning = "greedy action +0.95 is far from the policy action +0.42; " * 5
    recommendation = RECOMMENDATION | {
        "warnings": ["creatinine = 9.5 is outside the training range [0.4, 6]: the model extrapolates", long_warning]
    }
    result = cards(full_state(), recommendation, "iql")["cards"]
    assert [c["indicator"] for c in result] == ["info", "warning", "warning"]
    assert result[1]["summary"] == "Vancomycin: creatinine = 9.5 is outside the training range [0.4, 6]: the model extrapolates"
    assert len(result[2]["summary"]) == SUMMARY_LIMIT and result[2]["summary"].endswith("…")
    assert result[2]["detail"] == long_warning
    assert all(len(c["summary"]) <= SUMMARY_LIMIT for c in result)
    assert all(c["source"] == {"label": "dosewise iql"} for c in result)
    assert len({c["uuid"] for c in result}) == 3


def test_long_model_id_still_gives_short_summaries():
    recommendation = RECOMMENDATION | {"policy_action": -0.123456}
    result = cards(full_state(), recommendation, "m" * 64)["cards"]
    assert result[0]["summary"] == "Vancomycin: lower the dose (policy -0.12 on the -1..+1 scale)"
    assert result[0]["source"]["label"] == "dosewise " + "m" * 64


def test_missing_features_give_one_warning_card_naming_them():
    fever = observation("8310-5", 101.3, "degF", "[degF]", id="abc")
    hook = read_prefetch(prefetch_with(fever, state=without("temperature", without("creatinine"))), FEATURES)
    (card,) = cards(hook, RECOMMENDATION, "iql")["cards"]  # a recommendation passed by mistake is not shown
    assert card["indicator"] == "warning"
    assert card["summary"] == "Vancomycin recommendation not available: 1 value missing, 1 in an unexpected unit"
    assert "- creatinine (LOINC 2160-0): no Observation in the prefetch" in card["detail"]
    assert "- temperature (LOINC 8310-5) Observation/abc: unit \\[degF\\] where Cel is expected" in card["detail"]
    assert "Suggested change" not in card["detail"]


def test_two_missing_observations_summary():
    hook = read_prefetch(full_prefetch(without("creatinine", without("bun"))), FEATURES)
    (card,) = cards(hook, None, "iql")["cards"]
    assert card["summary"] == "Vancomycin recommendation not available: 2 values missing"
    assert "bun (LOINC 3094-0)" in card["detail"] and "creatinine (LOINC 2160-0)" in card["detail"]
    assert "| heart_rate | 88 | bpm |" in card["detail"]  # what was found is still shown


def test_error_gives_a_warning_card_with_the_message():
    message = "temperature = 381 is above the maximum 45 (physiological range [25, 45] °C). Check the value and its unit"
    result = cards(full_state(), None, "iql", error=message)["cards"]
    (card,) = result
    assert card["indicator"] == "warning"
    assert card["summary"] == f"Vancomycin recommendation not available: {message}"[: SUMMARY_LIMIT - 1] + "…"
    assert message.replace("[", "\\[").replace("]", "\\]") in card["detail"]


def test_dose_unit_problem_with_a_complete_state_is_a_separate_warning():
    hook = full_state(doses=(med_admin((10.0, "mL"), id="d-ml"),))
    result = cards(hook, RECOMMENDATION, "iql")["cards"]
    assert [c["indicator"] for c in result] == ["info", "warning"]
    assert result[1]["summary"] == "Vancomycin: 1 dose record with an unreadable unit not shown"
    assert "MedicationAdministration/d-ml: unit mL where mg is expected" in result[1]["detail"]


def test_complete_state_without_recommendation_or_error_is_a_caller_error():
    with pytest.raises(ValueError, match="neither a recommendation nor the error"):
        cards(full_state(), None, "iql")


def test_record_text_cannot_inject_markdown():
    hook = HookState(
        state=STATE,
        observed_at=dict.fromkeys(STATE, "<img src=x>"),
        missing=[],
        unit_mismatch=[],
        doses=[],
        skipped=["Observation/x: [click](http://evil)"],
        feature_names=FEATURES,
    )
    (card,) = cards(hook, RECOMMENDATION, "iql")["cards"]
    assert re.search(r"(?<!\\)<img", card["detail"]) is None and "\\<img src=x\\>" in card["detail"]
    assert "\\[click\\](http://evil)" in card["detail"]


def test_cards_read_a_real_recommendation_record_with_overrides():
    record = DoseRecommendation(
        state=STATE | {"temperature": 46.0},
        policy_action=-0.3,
        greedy_action=-0.5,
        q_value=0.7,
        greedy_q_value=0.8,
        q_curve=[(-1.0, 0.1), (1.0, 0.2)],
        warnings=["temperature = 46 is outside the training range [35, 41]: the model extrapolates"],
        overrides=[{"feature": "temperature", "value": 46.0, "unit": "°C", "bound": "max", "limit": 45.0}],
        members=3,
        policy_action_sd=0.12,
        member_actions=[-0.2, -0.3, -0.4],
    )
    result = cards(full_state(), record.to_dict(), "iql")["cards"]
    assert [c["summary"] for c in result] == [
        "Vancomycin: lower the dose (policy -0.30 on the -1..+1 scale)",
        "Vancomycin: temperature = 46 is outside the training range [35, 41]: the model extrapolates",
    ]
    assert "- temperature = 46 °C beyond the max 45" in result[0]["detail"]
    assert "**Ensemble:** 3 members; spread (SD) of their suggested changes 0.12." in result[0]["detail"]
