"""The bodies the HTTP API takes and gives, validated before any request reaches a model; they
are the service's OpenAPI schema (/docs)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from dosewise.data.anesthesia import RATE_MAX

# A JSON number that is finite (JSON has no NaN, but Python's parser takes the literal NaN).
Number = Annotated[float, Field(strict=True, allow_inf_nan=False)]
# One cell of a case history: a number, a text (a case id, a sex code) or missing.
# Integers stay integers (a case id 1 is case '1', not '1.0'); beyond 2**53 they are numbers like any other.
Cell = Annotated[int, Field(strict=True, ge=-(2**53), le=2**53)] | Number | Annotated[str, Field(max_length=200)] | None
MAX_HISTORY_ROWS = 100_000  # about 28 h at one row per second
ModelId = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")]


class Closed(BaseModel):
    model_config = ConfigDict(extra="forbid")


class VancomycinRequest(Closed):
    model: ModelId | None = Field(None, description="Model id from GET /v1/models; optional when one vancomycin model is loaded.")
    state: dict[Annotated[str, Field(max_length=64)], Number] | None = Field(
        None,
        max_length=64,
        description="Every feature the model uses, in raw clinical units (GET /v1/models: training_data.features). "
        "Optional with a history, whose last row it must then equal.",
        examples=[
            {"vanco_level": 25.0, "creatinine": 1.1, "wbc": 12.0, "bun": 18.0, "temperature": 38.2, "sbp": 118.0, "heart_rate": 96.0}
        ],
    )
    history: list[dict[Annotated[str, Field(max_length=64)], Cell]] | None = Field(
        None,
        min_length=1,
        max_length=MAX_HISTORY_ROWS,
        description="The patient's rows so far, one object per charting time, with the columns of the training file "
        "(patient_id, time in h, the features, action, sex 1 male / 0 female, optionally loading_dose_mg): the state is "
        "the last row, and the patient's levels give the predicted AUC24 and trough.",
    )
    patient: Annotated[str, Field(max_length=200)] | None = Field(None, description="The patient, when the history holds several.")
    allow_out_of_range: bool = Field(
        False, strict=True, description="Recommend even for values outside their physiological range (listed in overrides)."
    )


class AnesthesiaRequest(Closed):
    model: ModelId | None = Field(None, description="Model id from GET /v1/models; optional when one anesthesia model is loaded.")
    rows: list[dict[Annotated[str, Field(max_length=64)], Cell]] = Field(
        min_length=1,
        max_length=MAX_HISTORY_ROWS,
        description="The case so far from its start, one object per sample, with the columns of a cases file "
        "(case_id, time in s, BIS, MAP, SBP, DBP, HR, PPF20_RATE, RFTN20_RATE, age, sex, height, weight, asa).",
    )
    case_id: Annotated[str, Field(max_length=200)] | None = Field(None, description="The case, when the rows hold several.")
    mode: Literal["argmax", "beam", "mcts", "mpc"] | None = Field(None, description="Planning mode (default: the run's).")
    max_propofol: Annotated[int, Field(ge=0, le=RATE_MAX, strict=True)] | None = Field(
        None, description="Highest propofol rate, mL/h of 20 mg/mL."
    )
    max_remifentanil: Annotated[int, Field(ge=0, le=RATE_MAX, strict=True)] | None = Field(
        None, description="Highest remifentanil rate, mL/h of 20 µg/mL."
    )
    data_preset: Literal["canonical", "vitaldb"] | None = Field(None, description="Column names of the rows (default: the run's).")


class Override(BaseModel):
    feature: str
    value: float
    unit: str
    bound: Literal["min", "max"]
    limit: float


class Served(BaseModel):
    """Every recommendation names the model that made it and its audit row."""

    model: str
    model_hash: str
    audit_id: int = Field(description="Row of the audit log that records this request and this answer.")


class VancomycinRecommendation(Served):
    state: dict[str, float]
    policy_action: float = Field(description="The recommendation: normalised dose change, -1 lower .. +1 raise.")
    greedy_action: float
    q_value: float
    greedy_q_value: float
    q_curve: list[tuple[float, float]]
    warnings: list[str]
    overrides: list[Override]
    members: int
    policy_action_sd: float
    member_actions: list[float]
    dose_mg: float | None = Field(description="The next dose per administration, mg; null when the model's state has no dose_mg.")
    interval_h: float | None = Field(description="Dosing interval, h (unchanged by the recommendation).")
    current_dose_mg: float | None
    predicted_auc24: float | None = Field(description="mg*h/L over the 24 h from the next administration; needs a history.")
    predicted_trough: float | None = Field(description="mg/L at the end of those 24 h; needs a history.")
    levels_used: int | None = Field(description="Levels of the history the patient's PK was fitted to.")
    prediction_from_h: float | None = Field(description="When the next administration is due, in the history's hours.")
    notes: list[str] = Field(description="Why a field above is null.")


class Prediction(BaseModel):
    propofol_rate_ml_h: list[int]
    remifentanil_rate_ml_h: list[int]
    bis: list[float]
    map: list[float]
    band: dict[str, list[float]] | None


class Predicted(BaseModel):
    steps: int
    plan_source: str
    plan: Prediction
    keep_current: Prediction


class AnesthesiaRecommendation(Served):
    case_id: str
    time_s: float
    history_steps: int
    window_steps: int
    step_s: float
    mode: str
    max_rate_ml_h: dict[str, int]
    weight_kg: float
    propofol_rate_ml_h: int
    remifentanil_rate_ml_h: int
    propofol_mg_kg_h: float
    remifentanil_ug_kg_min: float
    current_rate_ml_h: dict[str, int]
    predicted: Predicted
    value: dict[str, float]
    members: int
    warnings: list[str]
    notes: list[str]


class ModelInfo(BaseModel):
    id: str
    kind: Literal["vancomycin", "anesthesia"]
    algorithm: Literal["iql", "planner"]
    model_hash: str
    weights: dict[str, str] = Field(description="SHA-256 of the run's model.pt and config.yaml.")
    config: dict[str, Any]
    training_data: dict[str, Any]


class Models(BaseModel):
    models: list[ModelInfo]


class AuditRow(BaseModel):
    id: int
    time: datetime
    endpoint: str
    method: str
    status: int
    model_id: str | None
    model_hash: str | None
    token_name: str | None
    client: str | None
    request: Any
    response: Any
    duration_ms: float


class Audit(BaseModel):
    total: int = Field(description="Rows matching the filters.")
    rows: list[AuditRow]


class Health(BaseModel):
    status: Literal["ok"]
    models: int
    auth: Literal["on", "off"]


class ErrorItem(BaseModel):
    loc: list[str | int]
    msg: str
    type: str


class ValidationFailure(BaseModel):
    detail: list[ErrorItem]


class Failure(BaseModel):
    detail: str
