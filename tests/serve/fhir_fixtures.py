"""Builders of FHIR R4 test resources and CDS Hooks requests, shared by the service's tests."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from datetime import date, datetime, timedelta
from typing import Any

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
SNOMED_SYSTEM = "http://snomed.info/sct"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
DIALYSIS_ICD10CM = "Z99.2"
DIALYSIS_SNOMED = "105502003"
PATIENT_ID = "pat-1"
TIME = "2024-03-01T08:00:00+00:00"

# A plausible patient on vancomycin, in the model's units.
STATE: dict[str, float] = {
    "vanco_level": 18.5,
    "creatinine": 1.1,
    "wbc": 9.8,
    "bun": 18.0,
    "temperature": 37.4,
    "sbp": 122.0,
    "heart_rate": 88.0,
}
# feature -> (LOINC code, unit text, UCUM code) as a lab system would send it
CODING: dict[str, tuple[str, str, str]] = {
    "vanco_level": ("20578-1", "mg/L", "mg/L"),
    "creatinine": ("2160-0", "mg/dL", "mg/dL"),
    "wbc": ("6690-2", "10*3/uL", "10*3/uL"),
    "bun": ("3094-0", "mg/dL", "mg/dL"),
    "temperature": ("8310-5", "°C", "Cel"),
    "sbp": ("8480-6", "mmHg", "mm[Hg]"),
    "heart_rate": ("8867-4", "beats/minute", "/min"),
    "weight_kg": ("29463-7", "kg", "kg"),
}


def resource_id(*parts: object) -> str:
    """A valid FHIR id ([A-Za-z0-9.-], at most 64) made from the parts."""
    return re.sub(r"[^A-Za-z0-9.-]+", "-", "-".join(str(p) for p in parts)).strip("-")[:64]


def quantity(value: Any, unit: str | None, code_unit: str | None) -> dict:
    """A valueQuantity; `code_unit` None leaves out the UCUM code (only the unit text remains)."""
    q: dict[str, Any] = {"value": value}
    if unit is not None:
        q["unit"] = unit
    if code_unit is not None:
        q["system"] = UCUM_SYSTEM
        q["code"] = code_unit
    return q


def observation(
    code: str,
    value: Any,
    unit: str | None,
    code_unit: str | None = None,
    time: str | None = TIME,
    id: str | None = None,
    status: str = "final",
    patient: str = PATIENT_ID,
) -> dict:
    """A laboratory or vital-sign Observation with one LOINC code and a valueQuantity; `value` None gives no value."""
    obs: dict[str, Any] = {
        "resourceType": "Observation",
        "id": id or resource_id("obs", code, time, value),
        "status": status,
        "code": {"coding": [{"system": LOINC_SYSTEM, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
    }
    if time is not None:
        obs["effectiveDateTime"] = time
    if value is not None:
        obs["valueQuantity"] = quantity(value, unit, code_unit)
    return obs


def feature_observation(feature: str, value: Any, time: str = TIME, id: str | None = None, status: str = "final") -> dict:
    """An Observation of a model feature, coded and in the unit a lab system would use."""
    code, unit, code_unit = CODING[feature]
    return observation(code, value, unit, code_unit, time=time, id=id or resource_id(feature, time), status=status)


def bp_panel(sbp: float, dbp: float, time: str = TIME, id: str | None = None, status: str = "final", patient: str = PATIENT_ID) -> dict:
    """A blood pressure panel (LOINC 85354-9) with systolic and diastolic components and no value of its own."""

    def component(code: str, value: float) -> dict:
        return {"code": {"coding": [{"system": LOINC_SYSTEM, "code": code}]}, "valueQuantity": quantity(value, "mmHg", "mm[Hg]")}

    return {
        "resourceType": "Observation",
        "id": id or resource_id("bp", time),
        "status": status,
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/observation-category", "code": "vital-signs"}]}],
        "code": {"coding": [{"system": LOINC_SYSTEM, "code": "85354-9"}]},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": time,
        "component": [component("8480-6", sbp), component("8462-4", dbp)],
    }


def med_admin(
    dose: float | tuple[float, str] | None,
    time: str = TIME,
    id: str | None = None,
    status: str = "completed",
    medication: str = "vancomycin 1000 MG Injection",
    patient: str = PATIENT_ID,
) -> dict:
    """A MedicationAdministration; `dose` in mg, or (value, UCUM unit), or None for one without a dose."""
    admin: dict[str, Any] = {
        "resourceType": "MedicationAdministration",
        "id": id or resource_id("ma", time),
        "status": status,
        "medicationCodeableConcept": {"text": medication},
        "subject": {"reference": f"Patient/{patient}"},
        "effectiveDateTime": time,
    }
    if dose is not None:
        value, unit = dose if isinstance(dose, tuple) else (dose, "mg")
        admin["dosage"] = {"route": {"text": "intravenous"}, "dose": quantity(value, unit, unit)}
    return admin


def bundle(resources: Iterable[Mapping[str, Any]]) -> dict:
    """A searchset Bundle of the resources, as a FHIR server answers a prefetch query."""
    entries = [
        {"fullUrl": f"https://fhir.example.org/{r['resourceType']}/{r['id']}", "resource": dict(r), "search": {"mode": "match"}}
        for r in resources
    ]
    return {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}


def full_prefetch(state: Mapping[str, float] = STATE, time: str = TIME, doses: Iterable[Mapping[str, Any]] = ()) -> dict:
    """A prefetch with one Observation per feature of `state`, all at `time`, and the given administrations."""
    return {
        "observations": bundle(feature_observation(feature, value, time=time) for feature, value in state.items()),
        "medications": bundle(doses),
    }


def hook_request(
    prefetch: Mapping[str, Any] | None, patient: str = PATIENT_ID, hook_instance: str = "d1577c69-dfbe-44ad-ba6d-3e05e953b2ea"
) -> dict:
    """The JSON body of a patient-view call."""
    body: dict[str, Any] = {
        "hook": "patient-view",
        "hookInstance": hook_instance,
        "fhirServer": "https://fhir.example.org",
        "context": {"patientId": patient, "userId": "Practitioner/dr-1"},
    }
    if prefetch is not None:
        body["prefetch"] = dict(prefetch)
    return body


def patient(birth_date: str | None, id: str = PATIENT_ID) -> dict:
    """A Patient resource, as the `patient` prefetch (Patient/{{context.patientId}}) returns it."""
    resource: dict[str, Any] = {"resourceType": "Patient", "id": id, "gender": "female"}
    if birth_date is not None:
        resource["birthDate"] = birth_date
    return resource


def condition(
    code: str = DIALYSIS_ICD10CM,
    system: str = ICD10CM_SYSTEM,
    clinical_status: str | None = "active",
    verification: str | None = "confirmed",
    id: str | None = None,
    patient: str = PATIENT_ID,
) -> dict:
    """A Condition with one coding; `clinical_status` or `verification` None leaves that status out."""
    resource: dict[str, Any] = {
        "resourceType": "Condition",
        "id": id or resource_id("cond", code, clinical_status),
        "code": {"coding": [{"system": system, "code": code}]},
        "subject": {"reference": f"Patient/{patient}"},
        "recordedDate": "2023-11-02",
    }
    if clinical_status is not None:
        status_system = "http://terminology.hl7.org/CodeSystem/condition-clinical"
        resource["clinicalStatus"] = {"coding": [{"system": status_system, "code": clinical_status}]}
    if verification is not None:
        status_system = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
        resource["verificationStatus"] = {"coding": [{"system": status_system, "code": verification}]}
    return resource


def birth_date_for(age: int, now: datetime) -> str:
    """A birthDate that makes the patient exactly `age` whole years old at `now`, half a year from any birthday."""
    today = now.date()
    return (date(today.year - age, today.month, 1) - timedelta(days=180)).isoformat()


def dose_aware_prefetch(state: Mapping[str, float], now: datetime, conditions: Iterable[Mapping[str, Any]] = ()) -> dict:
    """The prefetch a dose-aware state is read back from at `now`: the labs, vitals and weight as Observations an
    hour before `now`, the newest dose (`dose_mg`) `hours_since_dose` before `now` and one `interval_h` before that,
    the Patient whose age at `now` is `age`, and the active `conditions` (none for a state with dialysis 0)."""
    now = now.replace(microsecond=0)
    observed = (now - timedelta(hours=1)).isoformat()
    newest = now - timedelta(hours=state["hours_since_dose"])
    previous = newest - timedelta(hours=state["interval_h"])
    labs = {name: value for name, value in state.items() if name in CODING}
    return {
        "observations": bundle(feature_observation(name, value, time=observed) for name, value in labs.items()),
        "medications": bundle(
            med_admin(state["dose_mg"], time=when.isoformat(), id=resource_id("ma", index)) for index, when in enumerate([newest, previous])
        ),
        "patient": patient(birth_date_for(int(state["age"]), now)),
        "conditions": bundle(conditions),
    }
