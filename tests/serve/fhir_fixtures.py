"""Builders of FHIR R4 test resources and CDS Hooks requests, shared by the service's tests."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

LOINC_SYSTEM = "http://loinc.org"
UCUM_SYSTEM = "http://unitsofmeasure.org"
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
