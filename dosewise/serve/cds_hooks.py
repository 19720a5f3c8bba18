"""CDS Hooks ``patient-view`` service: the vancomycin state read from the FHIR prefetch, and its cards.

A feature enters the state only from its newest Observation, and only when that one carries an exact
value in an accepted unit. A newer result in another unit is never converted and an older one never
stands in for it: the card names what is missing or unusable instead, so no recommendation is ever made
on a value the record does not contain.

The dose-aware features follow the same rule. The regimen comes from the newest two vancomycin
administrations, weight from the newest body-weight Observation, age from the Patient's birthDate and
dialysis from the active Conditions. A dialysis status of 0 is only read from a conditions query that
was answered in full and holds no active dialysis condition; without that query it is missing.
"""

from __future__ import annotations

import contextlib
import math
import re
import uuid
from collections import Counter
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal

from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.condition import Condition
from fhir.resources.R4B.medication import Medication
from fhir.resources.R4B.medicationadministration import MedicationAdministration
from fhir.resources.R4B.observation import Observation
from fhir.resources.R4B.patient import Patient
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from dosewise.data.schema import FEATURE_UNITS

SERVICE_ID = "dosewise-vancomycin"
LOINC_SYSTEM = "http://loinc.org"
RXNORM_SYSTEM = "http://www.nlm.nih.gov/research/umls/rxnorm"
VANCOMYCIN_RXNORM = "11124"  # the ingredient; product codes are recognised by their display text

# LOINC codes of each state feature, the first being the usual one.
LOINC: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "vanco_level": ("20578-1", "4092-3"),
        "creatinine": ("2160-0",),
        "wbc": ("6690-2",),
        "bun": ("3094-0",),
        "temperature": ("8310-5",),
        "sbp": ("8480-6",),
        "heart_rate": ("8867-4",),
        "weight_kg": ("29463-7", "3141-9"),  # body weight, and body weight measured
    }
)
BP_PANEL = "85354-9"  # blood pressure panel: systolic pressure is its 8480-6 component
PANEL_FEATURES: Mapping[str, str] = MappingProxyType({"sbp": BP_PANEL})

# UCUM codes accepted per feature, the first being the one asked for. All of a feature's codes are
# numerically equal in the model's unit, so a value is never converted; any other unit is a mismatch.
UNITS: Mapping[str, tuple[str, ...]] = MappingProxyType(
    {
        "vanco_level": ("mg/L", "ug/mL"),
        "creatinine": ("mg/dL",),
        "wbc": ("10*3/uL", "10^3/uL", "K/uL", "10*9/L"),
        "bun": ("mg/dL",),
        "temperature": ("Cel", "°C"),
        "sbp": ("mm[Hg]", "mmHg"),
        "heart_rate": ("/min", "{beats}/min", "beats/min"),
        "weight_kg": ("kg",),  # a weight in [lb_av] is a mismatch like any other unit
    }
)
DOSE_UNITS: Mapping[str, float] = MappingProxyType({"mg": 1.0, "g": 1000.0})  # exact factors to mg
# The regimen features, read from the vancomycin administrations rather than from one resource.
REGIMEN_FEATURES = ("dose_mg", "interval_h", "hours_since_dose")
# Only these administrations are known to have been given; the regimen is read from them alone.
GIVEN_STATUSES = frozenset({"completed", "in-progress"})

SNOMED_SYSTEM = "http://snomed.info/sct"
ICD10CM_SYSTEM = "http://hl7.org/fhir/sid/icd-10-cm"
ICD10_SYSTEM = "http://hl7.org/fhir/sid/icd-10"
CODE_SYSTEM_NAMES: Mapping[str, str] = MappingProxyType({SNOMED_SYSTEM: "SNOMED", ICD10CM_SYSTEM: "ICD-10-CM", ICD10_SYSTEM: "ICD-10"})
# Dependence on renal dialysis: the SNOMED concept and its ICD-10(-CM) code.
DIALYSIS_CODES = frozenset({(SNOMED_SYSTEM, "105502003"), (ICD10CM_SYSTEM, "Z99.2"), (ICD10_SYSTEM, "Z99.2")})
DIALYSIS_CODES_TEXT = "SNOMED 105502003 or ICD-10-CM Z99.2"
CONDITION_CLINICAL_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-clinical"
CONDITION_VERIFICATION_SYSTEM = "http://terminology.hl7.org/CodeSystem/condition-ver-status"
ACTIVE_CLINICAL_STATUSES = frozenset({"active", "recurrence", "relapse"})
# A Condition with this verification status is not in the patient's record at all.
NOT_A_CONDITION = frozenset({"refuted", "entered-in-error"})
# ...and with this one it may or may not be: it neither shows dialysis nor its absence.
UNCONFIRMED = frozenset({"unconfirmed", "provisional", "differential"})
# The prefetch key whose Conditions are the patient's whole active list (see `discovery`).
CONDITIONS_KEY = "conditions"

# Only these Observation statuses are results; registered, cancelled, entered-in-error and unknown are not.
RESULT_STATUSES = frozenset({"final", "amended", "corrected", "preliminary"})
# MedicationAdministrations with these statuses were never given.
NOT_GIVEN_STATUSES = frozenset({"entered-in-error", "not-done"})

KEEP_BAND = 0.1  # |policy action| below this reads as "keep the dose"
SUMMARY_LIMIT = 140  # CDS Hooks: a card summary is under 140 characters
DOSES_SHOWN = 5
SKIPPED_SHOWN = 10
# Observation value types other than Quantity: a result of this kind has no number to read.
OTHER_VALUE_TYPES = ("CodeableConcept", "String", "Boolean", "Integer", "Range", "Ratio", "SampledData", "Time", "DateTime", "Period")
MICRO = re.compile("[\u00b5\u03bc]")  # micro sign and Greek mu, both written "u" in UCUM
MARKDOWN_SPECIAL = re.compile(r"([\\`*_\[\]<>|])")


class HookContext(BaseModel):
    model_config = ConfigDict(extra="allow")

    # FHIR id of the patient whose chart is open.
    patientId: str = Field(min_length=1)
    # FHIR id of the user (Practitioner/123) viewing the chart.
    userId: str | None = None
    # FHIR id of the current encounter, when the chart is opened within one.
    encounterId: str | None = None


class HookRequest(BaseModel):
    """The body of POST /cds-services/{id}; fields the CDS Hooks spec adds later are kept."""

    model_config = ConfigDict(extra="allow")

    hook: Literal["patient-view"]
    # Unique id of this hook call, for the client's logs and feedback.
    hookInstance: str = Field(min_length=1)
    context: HookContext
    # Prefetch key -> FHIR Bundle or resource (or null when the client could not fetch it).
    prefetch: dict[str, Any] | None = None
    # Base URL of the client's FHIR server.
    fhirServer: str | None = None
    # OAuth 2.0 token for fhirServer (access_token, token_type, expires_in, scope, subject).
    fhirAuthorization: dict[str, Any] | None = None


@dataclass(frozen=True)
class HookState:
    """What the prefetch says about the patient, and everything that could not be used."""

    state: dict[str, float]  # feature -> value in the model's unit, from the newest usable record
    observed_at: dict[str, str]  # feature -> ISO time of that record (for age and a dialysis of 0: the reference time)
    missing: list[str]  # features with no usable Observation, each with the reason
    unit_mismatch: list[str]  # newest Observations (and doses) in a unit that is not accepted
    doses: list[dict]  # vancomycin administrations {"time", "dose_mg" (None when not readable), "status"}, newest first
    skipped: list[str]  # resources ignored and why
    feature_names: tuple[str, ...] = field(default=())  # the model's features, which `state` must cover
    sources: dict[str, str] = field(default_factory=dict)  # feature -> the records it was read from
    reference_time: str | None = None  # ISO time that hours_since_dose and age are counted to

    @property
    def complete(self) -> bool:
        """Every feature of the model has a value (without feature names: nothing was reported missing)."""
        if self.feature_names:
            return all(name in self.state for name in self.feature_names)
        return not self.missing and not self.unit_mismatch


@dataclass(frozen=True)
class _Reading:
    """One candidate value of a feature: an Observation's value or a panel's component."""

    feature: str
    label: str  # "Observation/abc"
    source: str  # "LOINC 2160-0", or "LOINC 8480-6 in panel 85354-9"
    instant: datetime  # for ordering
    time: str  # ISO time as recorded
    value: float
    unit: str | None  # UCUM code, or the unit text when no code is given
    comparator: str | None  # "<", "<=", ">=", ">" for a censored value


@dataclass(frozen=True)
class _Administration:
    """A vancomycin administration that was not withdrawn, as the regimen features read it."""

    label: str
    instant: datetime  # its start
    timed: bool  # the start has a time of day, not only a date
    unit_mismatch: bool  # a dose in a unit that is not read (reported in `unit_mismatch`)
    record: dict  # {"time", "dose_mg", "status"}, as HookState.doses lists it


@dataclass(frozen=True)
class _Derived:
    """A feature read from the record, or why not: `why` None without a value means it was reported as a unit mismatch."""

    value: float | None = None
    time: str = ""
    source: str = ""
    why: str | None = None


@dataclass(frozen=True)
class _DialysisCondition:
    """A Condition coded as dependence on renal dialysis."""

    label: str
    codes: str  # "ICD-10-CM Z99.2"
    clinical: str | None  # clinical status code, None when not given
    verification: str | None  # verification status code, None when not given
    time: str  # when it was recorded (or began), "" when neither is given


def discovery(model_ids: Sequence[str]) -> dict:
    """The CDS Hooks discovery document; no service is offered while no model is loaded."""
    if not model_ids:
        return {"services": []}
    codes = [code for feature in LOINC for code in LOINC[feature]] + [BP_PANEL]
    code_param = ",".join(f"{LOINC_SYSTEM}|{code}" for code in codes)
    models = ", ".join(model_ids)
    return {
        "services": [
            {
                "hook": "patient-view",
                "id": SERVICE_ID,
                "title": "dosewise vancomycin dosing",
                "description": (
                    "Suggests whether to raise, keep or lower the vancomycin dose from the patient's latest vancomycin level, "
                    "creatinine, WBC, BUN, temperature, systolic pressure and heart rate and, for models that use them, the "
                    "current regimen (last dose, dosing interval, hours since the dose), body weight, age and dialysis status "
                    f"(model: {models})."
                ),
                "prefetch": {
                    "observations": f"Observation?patient={{{{context.patientId}}}}&code={code_param}&_sort=-date",
                    "medications": "MedicationAdministration?patient={{context.patientId}}",
                    "patient": "Patient/{{context.patientId}}",
                    CONDITIONS_KEY: "Condition?patient={{context.patientId}}&clinical-status=active",
                },
                "usageRequirements": (
                    "Needs read access to the patient's Observations, MedicationAdministrations, Patient resource and Conditions. "
                    "Results must be coded in LOINC with UCUM units: vancomycin level mg/L, creatinine and BUN mg/dL, WBC 10*3/uL, "
                    "temperature Cel, blood pressure mm[Hg], heart rate /min, body weight kg; a result in another unit is reported, "
                    "never converted. Vancomycin doses are read in mg or g with their start time (effectiveDateTime or "
                    "effectivePeriod.start), age from the Patient's birthDate, and dialysis from an active Condition coded "
                    f"{DIALYSIS_CODES_TEXT}; a dialysis status of 0 needs the complete '{CONDITIONS_KEY}' prefetch."
                ),
            }
        ]
    }


def read_prefetch(
    prefetch: Mapping[str, Any] | None,
    feature_names: Sequence[str],
    patient_id: str | None = None,
    now: datetime | None = None,
) -> HookState:
    """The model's state from the prefetch's Bundles or resources, with what is missing, in the wrong unit or
    ignored; with `patient_id`, a resource whose subject is another patient is ignored too. Hours since the dose
    and age are counted to `now` (default: the current time)."""
    now = datetime.now(UTC) if now is None else now
    if now.tzinfo is None:
        raise ValueError("read_prefetch(): `now` must be timezone-aware, e.g. datetime.now(UTC)")
    reference = now.isoformat(timespec="seconds")
    prefetch = prefetch or {}
    skipped: list[str] = []
    resources = list(_resources(prefetch, skipped))
    medications = {f"Medication/{raw['id']}": raw for _, raw in resources if raw.get("resourceType") == "Medication" and raw.get("id")}
    readings: dict[str, list[_Reading]] = {name: [] for name in feature_names}
    ignored: Counter[str] = Counter()  # feature -> its Observations that were ignored
    administrations: list[_Administration] = []
    dose_mismatch: list[str] = []
    patients: list[tuple[str, dict]] = []
    dialysis_conditions: list[_DialysisCondition] = []
    for label, raw in resources:
        kind = raw.get("resourceType")
        if kind == "Observation":
            for reading in _observation_readings(label, raw, feature_names, patient_id, skipped, ignored):
                readings[reading.feature].append(reading)
        elif kind == "MedicationAdministration":
            administration = _administration(label, raw, medications, patient_id, skipped, dose_mismatch)
            if administration is not None:
                administrations.append(administration)
        elif kind == "Medication":
            continue  # read through the administrations that refer to it
        elif kind == "Patient":
            if "age" in feature_names:  # otherwise prefetched for other models only
                patients.append((label, raw))
        elif kind == "Condition":
            if "dialysis" in feature_names:
                found_condition = _dialysis_condition(label, raw, patient_id, skipped)
                if found_condition is not None:
                    dialysis_conditions.append(found_condition)
        elif kind == "OperationOutcome":
            skipped.append(f"{label}: the FHIR server reported: {_outcome_text(raw)}")
        else:
            skipped.append(
                f"{label}: a {kind} is not read by this service (only Observation, MedicationAdministration, Patient and Condition)"
            )

    derived: dict[str, _Derived] = {}
    regimen = [name for name in REGIMEN_FEATURES if name in feature_names]
    if regimen:
        derived |= _regimen(administrations, regimen, now, reference)
    if "age" in feature_names:
        derived["age"] = _age(patients, patient_id, now, reference, skipped)
    if "dialysis" in feature_names:
        derived["dialysis"] = _dialysis(dialysis_conditions, _conditions_query_gap(prefetch), reference)

    state: dict[str, float] = {}
    observed_at: dict[str, str] = {}
    sources: dict[str, str] = {}
    missing: list[str] = []
    unit_mismatch: list[str] = []
    for name in feature_names:
        if name in derived:
            item = derived[name]
            if item.value is not None:
                state[name], observed_at[name], sources[name] = item.value, item.time, item.source
            elif item.why is not None:
                missing.append(item.why)
            continue
        if name not in LOINC:
            missing.append(f"{name}: this service reads no FHIR resource for it")
            continue
        found = sorted(readings[name], key=lambda r: r.instant, reverse=True)
        if not found:
            count = ignored[name]
            why = (
                f"no usable Observation in the prefetch ({count} ignored, see the ignored resources)"
                if count
                else "no Observation in the prefetch"
            )
            missing.append(f"{_feature_text(name)}: {why}")
            continue
        newest = found[0]
        rivals = [r for r in found[1:] if r.instant == newest.instant and _reported(r) != _reported(newest)]
        accepted = UNITS[name]
        if rivals:
            values = " vs ".join(f"{r.label} {_reported(r)}" for r in [newest, *rivals])
            missing.append(f"{_feature_text(name)}: Observations at the same time {newest.time} disagree ({values})")
        elif newest.unit is None or _unit_key(newest.unit) not in {_unit_key(u) for u in accepted}:
            found_unit = f"unit {newest.unit}" if newest.unit is not None else "no unit"
            unit_mismatch.append(f"{name} ({newest.source}) {newest.label}: {found_unit} where {accepted[0]} is expected")
        elif newest.comparator is not None:
            missing.append(
                f"{_feature_text(name)}: the newest, {newest.label} at {newest.time}, is {_reported(newest)}, not an exact value"
            )
        else:
            state[name] = newest.value
            observed_at[name] = newest.time
            sources[name] = f"{newest.label} ({newest.source})"

    administrations.sort(key=lambda a: a.instant, reverse=True)
    return HookState(
        state=state,
        observed_at=observed_at,
        missing=missing,
        unit_mismatch=unit_mismatch + dose_mismatch,
        doses=[a.record for a in administrations],
        skipped=skipped,
        feature_names=tuple(feature_names),
        sources=sources,
        reference_time=reference,
    )


def cards(hook_state: HookState, recommendation: dict | None, model_id: str, error: str | None = None) -> dict:
    """The CDS Hooks response: the recommendation with one card per warning, or one warning card saying why
    there is none (features missing or in the wrong unit, or `error`, e.g. a value outside its physiological range)."""
    source = {"label": f"dosewise {model_id}"}
    if not hook_state.complete:
        return {"cards": [_unavailable_card(hook_state, source)]}
    if error is not None:
        detail = [f"No recommendation was made: {_md(error)}", "", *_state_section(hook_state), *_doses_section(hook_state)]
        return {"cards": [_card(f"Vancomycin recommendation not available: {error}", "warning", detail, source)]}
    if recommendation is None:
        raise ValueError("cards(): the state is complete but neither a recommendation nor the error that prevented one was given")

    policy = round(float(recommendation["policy_action"]), 2)  # the verb agrees with the number shown
    verb = "keep" if abs(policy) < KEEP_BAND else "raise" if policy > 0 else "lower"
    summary = f"Vancomycin: {verb} the dose (policy {policy:+.2f} on the -1..+1 scale)"
    detail = [
        f"**Suggested change:** {policy:+.2f} on the -1..+1 scale (-1 the largest reduction, +1 the largest increase, "
        f"a change under ±{KEEP_BAND:g} reads as keep), from the learned policy.",
        "",
        f"**Greedy action** (the critic's best estimate): {float(recommendation['greedy_action']):+.2f}; "
        f"Q value of the suggested change: {float(recommendation['q_value']):.3f}.",
    ]
    members = int(recommendation.get("members", 1))
    if members > 1:
        detail += [
            "",
            f"**Ensemble:** {members} members; spread (SD) of their suggested changes {float(recommendation['policy_action_sd']):.2f}.",
        ]
    detail += ["", *_state_section(hook_state), *_doses_section(hook_state), *_overrides_section(recommendation.get("overrides") or [])]
    detail += _skipped_section(hook_state)
    result = [_card(summary, "info", detail, source)]
    for warning in recommendation.get("warnings") or []:
        result.append(_card(f"Vancomycin: {warning}", "warning", [_md(warning)], source))
    if hook_state.unit_mismatch:  # with a complete state these are doses, left out of the list above
        count = len(hook_state.unit_mismatch)
        lines = [
            "These records are in a unit that is not read (mg or g expected):",
            "",
            *(f"- {_md(line)}" for line in hook_state.unit_mismatch),
        ]
        result.append(
            _card(f"Vancomycin: {count} dose record{'s' if count != 1 else ''} with an unreadable unit not shown", "warning", lines, source)
        )
    return {"cards": result}


def _resources(prefetch: Mapping[str, Any], skipped: list[str]) -> Iterator[tuple[str, dict]]:
    """(label, raw resource) for every resource of every prefetch value, each resource once."""
    seen: set[str] = set()
    for key, value in prefetch.items():
        if value is None:  # the client could not run this prefetch query
            continue
        where = f"prefetch['{key}']"
        if not isinstance(value, Mapping) or not isinstance(value.get("resourceType"), str):
            skipped.append(f"{where}: not a FHIR resource (a JSON object with a resourceType was expected)")
            continue
        if value["resourceType"] != "Bundle":
            entries = [(where, value)]
        else:
            shell = {k: v for k, v in value.items() if k != "entry"}
            try:
                Bundle.model_validate(shell)
            except ValidationError as exc:
                skipped.append(f"{where}: not a valid FHIR R4 Bundle: {_first_error(exc)}")
                continue
            entries = []
            for index, entry in enumerate(value.get("entry") or []):
                resource = entry.get("resource") if isinstance(entry, Mapping) else None
                if not isinstance(resource, Mapping) or not isinstance(resource.get("resourceType"), str):
                    skipped.append(f"{where} entry {index}: no resource with a resourceType")
                    continue
                entries.append((f"{where} entry {index}", resource))
        for where_entry, resource in entries:
            label = (
                f"{resource['resourceType']}/{resource['id']}"
                if isinstance(resource.get("id"), str)
                else f"{resource['resourceType']} at {where_entry}"
            )
            if label in seen:
                continue
            seen.add(label)
            yield label, dict(resource)


def _observation_readings(
    label: str, raw: dict, feature_names: Sequence[str], patient_id: str | None, skipped: list[str], ignored: Counter[str]
) -> list[_Reading]:
    """The feature values an Observation carries (none when it is ignored, with the reason in `skipped` and
    a count per feature in `ignored`)."""
    try:
        obs = Observation.model_validate(raw)
    except ValidationError as exc:
        skipped.append(f"{label}: not a valid FHIR R4 Observation: {_first_error(exc)}")
        ignored.update(_raw_features(raw, feature_names))
        return []
    codes = [c.code for c in (obs.code.coding or []) if c.system == LOINC_SYSTEM and c.code]
    features = [name for name in feature_names if name in LOINC and set(codes) & set(LOINC[name])]
    panels = [name for name in feature_names if PANEL_FEATURES.get(name) in codes]
    if not features and not panels:
        shown = ", ".join(codes) if codes else "no LOINC code"
        skipped.append(f"{label}: {shown} is not a feature of this model")
        return []
    what = f"{label} ({', '.join(f'LOINC {code}' for code in codes)})"
    timing = _observation_time(obs)
    if obs.status not in RESULT_STATUSES:
        why = f"status {obs.status} is not a result"
    else:
        why = _foreign_subject(obs.subject, patient_id) or (
            "no effective or issued time, so it cannot be ordered" if timing is None else None
        )
    if why is not None or timing is None:
        skipped.append(f"{what}: {why}")
        ignored.update(features + panels)
        return []
    instant, time = timing
    found: list[_Reading] = []
    for name in features:
        code = next(code for code in codes if code in LOINC[name])
        reading = _reading(name, label, f"LOINC {code}", instant, time, obs, what, skipped)
        if reading is not None:
            found.append(reading)
        else:
            ignored[name] += 1
    for name in panels:
        panel, part = PANEL_FEATURES[name], LOINC[name][0]
        component = next(
            (c for c in obs.component or [] if any(k.system == LOINC_SYSTEM and k.code in LOINC[name] for k in c.code.coding or [])), None
        )
        reading = None
        if component is None:
            skipped.append(f"{what}: the panel has no LOINC {part} component")
        else:
            reading = _reading(name, label, f"LOINC {part} in panel {panel}", instant, time, component, f"{what} component {part}", skipped)
        if reading is not None:
            found.append(reading)
        else:
            ignored[name] += 1
    return found


def _reading(
    name: str, label: str, source: str, instant: datetime, time: str, holder: Any, what: str, skipped: list[str]
) -> _Reading | None:
    """The value of an Observation or component; one without a numeric value is ignored, never guessed."""
    quantity = holder.valueQuantity
    if quantity is None or quantity.value is None:
        absent = holder.dataAbsentReason
        if absent is not None:
            reason = absent.text or ", ".join(c.code for c in absent.coding or [] if c.code) or "given"
            skipped.append(f"{what}: no value (data absent reason: {reason})")
            return None
        kind = next((kind for kind in OTHER_VALUE_TYPES if getattr(holder, f"value{kind}", None) is not None), None)
        skipped.append(f"{what}: its value is a {kind}, not a Quantity" if kind else f"{what}: no value")
        return None
    unit = quantity.code or quantity.unit
    return _Reading(name, label, source, instant, time, float(quantity.value), unit, quantity.comparator)


def _administration(
    label: str, raw: dict, medications: Mapping[str, dict], patient_id: str | None, skipped: list[str], mismatch: list[str]
) -> _Administration | None:
    """A vancomycin administration; None for another drug or one never given."""
    try:
        admin = MedicationAdministration.model_validate(raw)
    except ValidationError as exc:
        skipped.append(f"{label}: not a valid FHIR R4 MedicationAdministration: {_first_error(exc)}")
        return None
    if not _is_vancomycin(admin, medications):
        skipped.append(f"{label}: not a vancomycin administration")
        return None
    if admin.status in NOT_GIVEN_STATUSES:
        skipped.append(f"{label}: status {admin.status}, so the dose was not given")
        return None
    foreign = _foreign_subject(admin.subject, patient_id)
    if foreign:
        skipped.append(f"{label}: {foreign}")
        return None
    when = admin.effectiveDateTime or (admin.effectivePeriod.start if admin.effectivePeriod else None)
    if when is None:
        skipped.append(f"{label}: no administration time")
        return None
    dose_mg = None
    wrong_unit = False
    quantity = admin.dosage.dose if admin.dosage else None
    if quantity is not None and quantity.value is not None:
        unit = quantity.code or quantity.unit
        if unit in DOSE_UNITS:
            dose_mg = float(quantity.value) * DOSE_UNITS[unit]
        else:
            wrong_unit = True
            found_unit = f"unit {unit}" if unit else "no unit"
            mismatch.append(f"vancomycin dose {label}: {found_unit} where mg is expected")
    record = {"time": _iso(when), "dose_mg": dose_mg, "status": admin.status}
    return _Administration(label, _instant(when), isinstance(when, datetime), wrong_unit, record)


def _regimen(administrations: Sequence[_Administration], wanted: Sequence[str], now: datetime, reference: str) -> dict[str, _Derived]:
    """dose_mg, hours_since_dose and interval_h (those `wanted`) from the newest two administrations. Each is
    missing rather than read from an older dose when the newest one cannot be read as given at a known time."""
    what = {
        "dose_mg": "dose_mg (dose of the newest vancomycin MedicationAdministration)",
        "hours_since_dose": "hours_since_dose (start of the newest vancomycin MedicationAdministration)",
        "interval_h": "interval_h (starts of the newest two vancomycin MedicationAdministrations)",
    }
    missing = lambda name, why: _Derived(why=f"{what[name]}: {why}")
    ordered = sorted(administrations, key=lambda a: a.instant, reverse=True)
    if not ordered:
        return {name: missing(name, "no vancomycin administration in the prefetch") for name in wanted}
    newest = ordered[0]
    problem = _unusable_start(newest, now, reference)
    if problem is not None:
        return {name: missing(name, f"the newest, {problem}") for name in wanted}
    result: dict[str, _Derived] = {}
    if "dose_mg" in wanted:
        tied = [a.label for a in ordered[1:] if a.instant == newest.instant]
        dose_mg = newest.record["dose_mg"]
        if tied:
            labels = " and ".join([newest.label, *tied])
            result["dose_mg"] = missing(
                "dose_mg", f"{labels} start at the same time {newest.record['time']}, so the dose then is not one record"
            )
        elif newest.unit_mismatch:
            result["dose_mg"] = _Derived()  # its unit is listed with the mismatches
        elif dose_mg is None:
            result["dose_mg"] = missing("dose_mg", f"the newest, {newest.label} at {newest.record['time']}, records no dose")
        else:
            result["dose_mg"] = _Derived(dose_mg, newest.record["time"], f"{newest.label} ({newest.record['status']})")
    if "hours_since_dose" in wanted:
        hours = round((now - newest.instant) / timedelta(hours=1), 2)
        result["hours_since_dose"] = _Derived(hours, newest.record["time"], f"start of {newest.label}, to {reference}")
    if "interval_h" in wanted:
        if len(ordered) < 2:
            why = f"only one vancomycin administration in the prefetch ({newest.label} at {newest.record['time']}), so no interval"
            result["interval_h"] = missing("interval_h", why)
        else:
            previous = ordered[1]
            gap = (newest.instant - previous.instant) / timedelta(hours=1)
            interval = math.floor(gap + 0.5)  # to the nearest hour, halves up
            problem = _unusable_start(previous, now, reference)
            between = f"{previous.label} at {previous.record['time']} and {newest.label} at {newest.record['time']}"
            if problem is not None:
                result["interval_h"] = missing("interval_h", f"the one before the newest, {problem}")
            elif interval < 1:
                result["interval_h"] = missing("interval_h", f"the newest two, {between}, start {gap:.2g} h apart, under an hour")
            else:
                result["interval_h"] = _Derived(float(interval), newest.record["time"], f"starts of {between} ({gap:.2f} h apart)")
    return result


def _unusable_start(administration: _Administration, now: datetime, reference: str) -> str | None:
    """Why the administration's start cannot be counted from: not known as given, only a date, or after `now`."""
    label, time, status = administration.label, administration.record["time"], administration.record["status"]
    if status not in GIVEN_STATUSES:
        return f"{label} at {time}, has status {status} (only completed or in-progress doses are read as given)"
    if not administration.timed:
        return f"{label}, is recorded at {time} without a time of day"
    if administration.instant > now:
        return f"{label}, starts at {time}, after the reference time {reference}"
    return None


def _age(patients: Sequence[tuple[str, dict]], patient_id: str | None, now: datetime, reference: str, skipped: list[str]) -> _Derived:
    """Whole years from the Patient's birthDate to `now`; a partial birthDate is read only when every day it allows gives one age."""
    what = "age (Patient birthDate)"
    births: dict[str, tuple[str, Any]] = {}  # label -> (birthDate as written, parsed)
    for label, raw in patients:
        try:
            patient = Patient.model_validate(raw)
        except ValidationError as exc:
            skipped.append(f"{label}: not a valid FHIR R4 Patient: {_first_error(exc)}")
            continue
        if patient_id is not None and patient.id != patient_id:
            skipped.append(f"{label}: not Patient/{patient_id}, whose chart is open")
            continue
        births[label] = (_iso(patient.birthDate) if patient.birthDate is not None else "", patient.birthDate)
    if not births:
        return _Derived(why=f"{what}: no Patient resource of the patient in the prefetch")
    if len({text for text, _ in births.values()}) > 1:
        shown = ", ".join(f"{label} {text or 'none'}" for label, (text, _) in births.items())
        return _Derived(why=f"{what}: the Patient resources disagree ({shown})")
    label, (text, birth) = next(iter(births.items()))
    if birth is None:
        return _Derived(why=f"{what}: {label} has no birthDate")
    earliest, latest = _date_range(birth)
    today = now.astimezone(UTC).date()
    if earliest > today:
        return _Derived(why=f"{what}: {label} birthDate {text} is after the reference time {reference}")
    if latest > today:
        return _Derived(why=f"{what}: {label} birthDate {text} may be after the reference time {reference}")
    oldest, youngest = _whole_years(earliest, today), _whole_years(latest, today)
    if oldest != youngest:
        return _Derived(why=f"{what}: {label} birthDate {text} gives an age of {youngest} or {oldest} at {reference}, not one")
    return _Derived(float(oldest), reference, f"{label} birthDate {text}")


def _date_range(when: date | str) -> tuple[date, date]:
    """The first and last day a FHIR date ("1960", "1960-05" or a full date) may stand for."""
    if isinstance(when, date):
        return when, when
    year, _, month = str(when).partition("-")
    if month:
        first = date(int(year), int(month), 1)
        following = date(first.year + first.month // 12, first.month % 12 + 1, 1)
        return first, following - timedelta(days=1)
    return date(int(year), 1, 1), date(int(year), 12, 31)


def _whole_years(birth: date, today: date) -> int:
    return today.year - birth.year - ((today.month, today.day) < (birth.month, birth.day))


def _dialysis_condition(label: str, raw: dict, patient_id: str | None, skipped: list[str]) -> _DialysisCondition | None:
    """The Condition when it is coded as dependence on renal dialysis; any other Condition is passed over silently."""
    try:
        condition = Condition.model_validate(raw)
    except ValidationError as exc:
        skipped.append(f"{label}: not a valid FHIR R4 Condition: {_first_error(exc)}")
        return None
    codings = (condition.code.coding or []) if condition.code is not None else []
    codes = [f"{CODE_SYSTEM_NAMES[c.system]} {c.code}" for c in codings if (c.system, c.code) in DIALYSIS_CODES]
    if not codes:
        return None
    what = f"{label} ({', '.join(codes)})"
    foreign = _foreign_subject(condition.subject, patient_id)
    if foreign:
        skipped.append(f"{what}: {foreign}")
        return None
    clinical = _status_code(condition.clinicalStatus, CONDITION_CLINICAL_SYSTEM)
    verification = _status_code(condition.verificationStatus, CONDITION_VERIFICATION_SYSTEM)
    if verification in NOT_A_CONDITION:
        skipped.append(f"{what}: verification status {verification}, so not a condition of the patient")
        return None
    if clinical is not None and clinical not in ACTIVE_CLINICAL_STATUSES:
        skipped.append(f"{what}: clinical status {clinical}, so not an active dialysis condition")
        return None
    when = condition.recordedDate or condition.onsetDateTime
    return _DialysisCondition(label, ", ".join(codes), clinical, verification, _iso(when) if when is not None else "")


def _status_code(concept: Any, system: str) -> str | None:
    """The code of a status CodeableConcept in its HL7 code system (or with no system given)."""
    if concept is None:
        return None
    return next((c.code for c in concept.coding or [] if c.code and c.system in (system, None)), None)


def _dialysis(conditions: Sequence[_DialysisCondition], query_gap: str | None, reference: str) -> _Derived:
    """1 for an active, not unconfirmed dialysis Condition; 0 only when the complete conditions query holds none."""
    what = f"dialysis (an active Condition coded {DIALYSIS_CODES_TEXT})"
    for condition in conditions:
        if condition.clinical is not None and condition.verification not in UNCONFIRMED:
            return _Derived(1.0, condition.time, f"{condition.label} ({condition.codes}, {condition.clinical})")
    if conditions:  # each one lacks a clinical status or is unconfirmed
        first = conditions[0]
        if first.clinical is None:
            return _Derived(why=f"{what}: {first.label} ({first.codes}) has no clinical status, so it may or may not be active")
        return _Derived(why=f"{what}: {first.label} ({first.codes}) is active but {first.verification}")
    if query_gap is not None:
        return _Derived(why=f"{what}: {query_gap}")
    return _Derived(0.0, reference, f"no active dialysis condition in the record (prefetch '{CONDITIONS_KEY}')")


def _conditions_query_gap(prefetch: Mapping[str, Any]) -> str | None:
    """Why the conditions prefetch cannot show that the record holds no active dialysis condition; None when it can."""
    where = f"prefetch['{CONDITIONS_KEY}']"
    if CONDITIONS_KEY not in prefetch:
        return f"no '{CONDITIONS_KEY}' prefetch, so the record's Conditions were not queried"
    value = prefetch[CONDITIONS_KEY]
    if value is None:
        return f"the client could not run the '{CONDITIONS_KEY}' prefetch query"
    if not isinstance(value, Mapping) or value.get("resourceType") != "Bundle":
        return f"{where} is not the Bundle of a Condition search"
    try:
        Bundle.model_validate({k: v for k, v in value.items() if k != "entry"})
    except ValidationError:
        return f"{where} is not a valid FHIR R4 Bundle (see the ignored resources)"
    links = value.get("link") if isinstance(value.get("link"), list) else []
    if any(isinstance(link, Mapping) and link.get("relation") == "next" for link in links):
        return f"{where} is the first page of a longer result (it has a next link), so other Conditions may not be shown"
    for entry in value.get("entry") or []:
        resource = entry.get("resource") if isinstance(entry, Mapping) else None
        if isinstance(resource, Mapping) and resource.get("resourceType") == "OperationOutcome":
            issues = resource.get("issue") if isinstance(resource.get("issue"), list) else []
            if any(isinstance(i, Mapping) and i.get("severity") in ("error", "fatal") for i in issues):
                return f"the FHIR server reported an error for the '{CONDITIONS_KEY}' query: {_outcome_text(resource)}"
    return None


def _is_vancomycin(admin: MedicationAdministration, medications: Mapping[str, dict]) -> bool:
    """Coded as the RxNorm ingredient, or named so in the code, the reference or the Medication it points to."""
    concepts = [admin.medicationCodeableConcept]
    ref = admin.medicationReference
    if ref is not None:
        if ref.display and "vancomycin" in ref.display.lower():
            return True
        target = ref.reference or ""
        for contained in admin.contained or []:
            if target == f"#{contained.id}" and isinstance(contained, Medication):
                concepts.append(contained.code)
        if target in medications:
            with contextlib.suppress(ValidationError):  # an unreadable Medication names no drug
                concepts.append(Medication.model_validate(medications[target]).code)
    for concept in concepts:
        if concept is None:
            continue
        names = [concept.text or ""] + [c.display or "" for c in concept.coding or []]
        if any("vancomycin" in name.lower() for name in names):
            return True
        if any(c.system == RXNORM_SYSTEM and c.code == VANCOMYCIN_RXNORM for c in concept.coding or []):
            return True
    return False


def _raw_features(raw: Mapping[str, Any], feature_names: Sequence[str]) -> list[str]:
    """The features an Observation that failed validation was meant to carry, read from its raw LOINC codes."""
    code = raw.get("code") if isinstance(raw.get("code"), Mapping) else {}
    codings = code.get("coding") if isinstance(code.get("coding"), list) else []
    codes = {c.get("code") for c in codings if isinstance(c, Mapping) and c.get("system") == LOINC_SYSTEM}
    return [name for name in feature_names if codes & set(LOINC.get(name, ())) or PANEL_FEATURES.get(name) in codes]


def _foreign_subject(subject: Any, patient_id: str | None) -> str | None:
    """Why the resource is not this patient's, or None when it is (or cannot be told apart)."""
    if subject is None:
        return f"no subject, so it cannot be shown to be Patient/{patient_id}'s" if patient_id else None
    parts = (subject.reference or "").split("/_history/")[0].rstrip("/").split("/")
    kind = subject.type or (parts[-2] if len(parts) >= 2 else None)
    if kind is not None and kind != "Patient":
        return f"its subject is a {kind}, not a patient"
    if patient_id is not None and (len(parts) < 2 or parts[-2:] != ["Patient", patient_id]):
        return f"its subject {subject.reference or '(no reference)'} is not Patient/{patient_id}"
    return None


def _observation_time(obs: Observation) -> tuple[datetime, str] | None:
    """When the value was true: the effective time (a period's end), else when it was issued."""
    period = obs.effectivePeriod
    for when in (obs.effectiveDateTime, obs.effectiveInstant, period.end if period else None, period.start if period else None, obs.issued):
        if when is not None:
            return _instant(when), _iso(when)
    return None


def _instant(when: datetime | date | str) -> datetime:
    """A FHIR dateTime as an aware datetime; a partial date ("2024", "2024-03") is its first instant."""
    if isinstance(when, datetime):
        return when if when.tzinfo is not None else when.replace(tzinfo=UTC)
    if isinstance(when, date):
        return datetime(when.year, when.month, when.day, tzinfo=UTC)
    year, _, month = str(when).partition("-")
    return datetime(int(year), int(month or 1), 1, tzinfo=UTC)


def _iso(when: datetime | date | str) -> str:
    return when.isoformat() if isinstance(when, (datetime, date)) else str(when)


def _unit_key(unit: str) -> str:
    return MICRO.sub("u", unit)


def _reported(reading: _Reading) -> str:
    return f"{reading.comparator or ''}{reading.value:g} {reading.unit or '(no unit)'}"


def _feature_text(name: str) -> str:
    panel = f", or panel {PANEL_FEATURES[name]}" if name in PANEL_FEATURES else ""
    return f"{name} ({_codes_text(name)}{panel})"


def _codes_text(name: str) -> str:
    return "LOINC " + " or ".join(LOINC[name])


def _first_error(exc: ValidationError) -> str:
    """The first validation error as 'field: message', and how many more there are."""
    errors = exc.errors()
    first = errors[0]
    where = ".".join(str(part) for part in first["loc"]) or "resource"
    more = f" (and {len(errors) - 1} more)" if len(errors) > 1 else ""
    return f"{where}: {first['msg'].splitlines()[0]}{more}"


def _outcome_text(raw: Mapping[str, Any]) -> str:
    issues = raw.get("issue") if isinstance(raw.get("issue"), list) else []
    texts = [str(i.get("diagnostics") or (i.get("details") or {}).get("text") or i.get("code")) for i in issues if isinstance(i, Mapping)]
    return "; ".join(texts) or "an OperationOutcome without issues"


def _md(text: str) -> str:
    """Text from the record or the model, shown literally in the card's markdown."""
    return MARKDOWN_SPECIAL.sub(r"\\\1", str(text))


def _summary(text: str) -> str:
    return text if len(text) <= SUMMARY_LIMIT else text[: SUMMARY_LIMIT - 1] + "…"


def _card(summary: str, indicator: str, detail: list[str], source: dict) -> dict:
    return {
        "uuid": str(uuid.uuid4()),
        "summary": _summary(summary),
        "indicator": indicator,
        "detail": "\n".join(detail),
        "source": dict(source),
    }


def _unavailable_card(hook_state: HookState, source: dict) -> dict:
    missing = len(hook_state.missing)
    wrong_unit = len([name for name in hook_state.feature_names if name not in hook_state.state]) - missing
    if not hook_state.feature_names:
        wrong_unit = len(hook_state.unit_mismatch)
    parts = []
    if missing:
        parts.append(f"{missing} value{'s' if missing != 1 else ''} missing")
    if wrong_unit > 0:
        parts.append(f"{wrong_unit} in an unexpected unit")
    summary = f"Vancomycin recommendation not available: {', '.join(parts) or 'the state is incomplete'}"
    detail = ["No recommendation is made without every value the model needs; no value is guessed or converted.", ""]
    if hook_state.missing:
        detail += ["**Missing or unusable values:**", *(f"- {_md(line)}" for line in hook_state.missing), ""]
    if hook_state.unit_mismatch:
        detail += ["**In an unexpected unit (not converted):**", *(f"- {_md(line)}" for line in hook_state.unit_mismatch), ""]
    detail += _state_section(hook_state) + _doses_section(hook_state) + _skipped_section(hook_state)
    return _card(summary, "warning", detail, source)


def _state_section(hook_state: HookState) -> list[str]:
    if not hook_state.state:
        return []
    rows = [
        f"| {name} | {value:g} | {_md(FEATURE_UNITS.get(name, ''))} | {_md(hook_state.observed_at.get(name, ''))} "
        f"| {_md(hook_state.sources.get(name, ''))} |"
        for name, value in hook_state.state.items()
    ]
    counted = [name for name in ("hours_since_dose", "age") if name in hook_state.state]
    intro = ["**State used** (newest record of each):", ""]
    if counted and hook_state.reference_time:
        intro += [f"{' and '.join(counted)} counted to {_md(hook_state.reference_time)}.", ""]
    return [*intro, "| Feature | Value | Unit | Time | Source |", "|---|---|---|---|---|", *rows, ""]


def _doses_section(hook_state: HookState) -> list[str]:
    if not hook_state.doses:
        return ["**Recent vancomycin doses:** none in the record.", ""]
    lines = []
    for dose in hook_state.doses[:DOSES_SHOWN]:
        amount = f"{dose['dose_mg']:g} mg" if dose["dose_mg"] is not None else "dose not recorded in mg"
        lines.append(f"- {_md(dose['time'])}: {amount} ({_md(dose['status'])})")
    more = len(hook_state.doses) - DOSES_SHOWN
    if more > 0:
        lines.append(f"- and {more} earlier")
    return ["**Recent vancomycin doses:**", *lines, ""]


def _overrides_section(overrides: list[dict]) -> list[str]:
    if not overrides:
        return []
    lines = [
        f"- {_md(item['feature'])} = {item['value']:g} {_md(item.get('unit', ''))} beyond the {item['bound']} {item['limit']:g}"
        for item in overrides
    ]
    return ["**Kept although outside the physiological range:**", *lines, ""]


def _skipped_section(hook_state: HookState) -> list[str]:
    if not hook_state.skipped:
        return []
    lines = [f"- {_md(line)}" for line in hook_state.skipped[:SKIPPED_SHOWN]]
    more = len(hook_state.skipped) - SKIPPED_SHOWN
    if more > 0:
        lines.append(f"- and {more} more")
    return ["**Ignored resources:**", *lines, ""]
