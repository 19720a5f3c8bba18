"""What the service does for a request, apart from HTTP: pick the model, recommend, and say in a
client's terms why a request cannot be answered.

The API, the page and the CDS Hooks service all answer through this object, so a recommendation
is the same whichever door it was asked through, and the same as `dosewise recommend` gives.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import pandas as pd

from dosewise.algos.recommend import PatientChoiceError, StateError
from dosewise.config import ConfigError
from dosewise.data.loading import DataError
from dosewise.serve.registry import Kind, LoadedModel


@dataclass
class ServiceError(ValueError):
    """A request the service cannot answer: `loc` is where in the request body (FastAPI's
    convention, e.g. ("body", "state")), `msg` what was expected."""

    msg: str
    loc: tuple[str | int, ...] = ("body",)
    status: int = 422
    type: str = "value_error"

    def __str__(self) -> str:
        return self.msg

    def detail(self) -> list[dict[str, Any]]:
        return [{"loc": list(self.loc), "msg": self.msg, "type": self.type}]


class Service:
    def __init__(self, models: Mapping[str, LoadedModel]):
        self.models = dict(models)

    def of_kind(self, kind: Kind) -> list[LoadedModel]:
        return [model for model in self.models.values() if model.kind == kind]

    def pick(self, kind: Kind, model_id: str | None) -> LoadedModel:
        """The model `model_id`, or the only model of `kind` when none is named."""
        choices = self.of_kind(kind)
        names = ", ".join(model.id for model in choices) or "none"
        if model_id is None:
            if len(choices) == 1:
                return choices[0]
            if not choices:
                raise ServiceError(f"no {kind} model is loaded (loaded: {', '.join(self.models) or 'none'})", ("body", "model"), 404)
            raise ServiceError(f"{len(choices)} {kind} models are loaded: name one in 'model' ({names})", ("body", "model"))
        model = self.models.get(model_id)
        if model is None or model.kind != kind:
            raise ServiceError(f"no {kind} model '{model_id}'; loaded {kind} models: {names}", ("body", "model"))
        return model

    def recommend_vancomycin(
        self,
        model_id: str | None,
        state: Mapping[str, object] | None,
        allow_out_of_range: bool = False,
        history: Sequence[Mapping[str, object]] | pd.DataFrame | None = None,
        patient: str | None = None,
    ) -> tuple[LoadedModel, dict[str, Any]]:
        """`dosewise recommend --run RUN --state ...` for one patient state, or `--history` for their rows so far."""
        from dosewise.api import recommend_iql

        if state is None and history is None:
            raise ServiceError("give the patient's 'state' or their rows so far in 'history'", ("body", "state"), type="missing")
        if patient is not None and history is None:
            raise ServiceError("'patient' picks a patient of 'history'; no history was given", ("body", "patient"))
        model = self.pick("vancomycin", model_id)
        assert model.iql is not None
        frame = None if history is None or isinstance(history, pd.DataFrame) else pd.DataFrame.from_records(list(history))
        try:
            recommendation = recommend_iql(
                model.iql, state, history=history if frame is None else frame, patient=patient, allow_out_of_range=allow_out_of_range
            )
        except StateError as err:
            raise ServiceError(str(err), ("body", "state"), type="state_error") from None
        except PatientChoiceError as err:
            raise ServiceError(str(err), ("body", "patient"), type="data_error") from None
        except DataError as err:
            raise ServiceError(str(err), ("body", "history"), type="data_error") from None
        return model, recommendation.to_dict()

    def recommend_anesthesia(
        self,
        model_id: str | None,
        rows: Sequence[Mapping[str, object]] | pd.DataFrame,
        case_id: str | None = None,
        mode: str | None = None,
        max_propofol: int | None = None,
        max_remifentanil: int | None = None,
        data_preset: str | None = None,
    ) -> tuple[LoadedModel, dict[str, Any]]:
        """`dosewise recommend --run RUN --history CASE` for the case so far, given as rows."""
        from dosewise.api import recommend_planner

        model = self.pick("anesthesia", model_id)
        assert model.planner is not None
        frame = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame.from_records(list(rows))
        if frame.empty:
            raise ServiceError("the case history has no rows; expected the case so far, one row per sample", ("body", "rows"))
        try:
            with model.lock:
                recommendation = recommend_planner(model.planner, frame, case_id, mode, max_propofol, max_remifentanil, data_preset)
        except DataError as err:
            raise ServiceError(str(err), ("body", "rows"), type="data_error") from None
        except ConfigError as err:
            raise ServiceError(str(err), ("body",), type="config_error") from None
        except StateError as err:
            raise ServiceError(str(err), ("body", "rows"), type="state_error") from None
        return model, recommendation.to_dict()
