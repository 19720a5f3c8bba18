"""The page clinicians use: pick a model, enter a patient's state or paste a case history, read the
recommendation in plain words with its plot and caveats, and see the latest audit rows.

Server-rendered with Jinja2 (no build step). A recommendation asked through the page is answered
by the same `Service` and audited by the same `AuditedRoute` as one asked through the API, so
both doors give the same answer and leave the same kind of row. Once any token exists, the page
asks for one and keeps it in an HTTP-only, SameSite=Strict cookie; forms sent from another site
are refused, so the cookie cannot be used by a page the clinician happens to have open elsewhere.
"""

from __future__ import annotations

import hashlib
import io
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Annotated, Any, Literal

import jinja2
import pandas as pd
from fastapi import APIRouter, Depends, File, Form, Request, UploadFile
from fastapi.encoders import jsonable_encoder
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates

from dosewise.algos.recommend import describe_override
from dosewise.data.anesthesia import COVARIATES, RATE_MAX, TRACKS
from dosewise.data.schema import FEATURE_UNITS, PHYSIOLOGICAL_BOUNDS
from dosewise.planner.recommend import PLANNING_MODES, propofol_mg_kg_h, remifentanil_ug_kg_min
from dosewise.serve.app import MAX_BODY_BYTES, TOKEN_COOKIE, AuditedRoute, presented_token, record
from dosewise.serve.plots import anesthesia_svg, prediction_minutes, q_curve_svg
from dosewise.serve.registry import Kind, LoadedModel
from dosewise.serve.schemas import MAX_HISTORY_ROWS
from dosewise.serve.service import Service, ServiceError
from dosewise.serve.store import AuditEntry, Store

PACKAGE_DIR = Path(__file__).parent
STATIC_DIR = PACKAGE_DIR / "static"
TEMPLATES_DIR = PACKAGE_DIR / "templates"
STYLESHEET = "page.css"

PRODUCT = "dosewise"
MAX_HISTORY_BYTES = 16 * 2**20  # a pasted or uploaded case history; the whole request may hold 32 MiB
AUDIT_ROWS_SHOWN = 20
KEEP_BELOW = 0.1  # |policy action| under this reads "keep the dose"
COOKIE_MAX_AGE_S = 12 * 3600  # one shift; a revoked token stops working at once whatever the cookie's age
SUMMARY_CHARS = 140

FEATURE_LABELS: Mapping[str, str] = {
    "vanco_level": "Vancomycin trough level",
    "creatinine": "Serum creatinine",
    "wbc": "White blood cell count",
    "bun": "Blood urea nitrogen",
    "temperature": "Body temperature",
    "sbp": "Systolic blood pressure",
    "heart_rate": "Heart rate",
}
MODE_LABELS: Mapping[str, str] = {
    "argmax": "argmax: the policy's most likely rates",
    "beam": "beam search over the learned model",
    "mcts": "Monte Carlo tree search",
    "mpc": "model predictive control",
}
NOT_SIGNED_IN = "Sign in to ask for a recommendation: this server accepts requests only with a valid token."
WRONG_TOKEN = (
    "That token is not valid. Check it for typing errors; if it is right, it may have been revoked: "
    "ask an administrator for a new one (dosewise serve token create NAME)."
)
CROSS_SITE = "This form was sent from another web site, so it was refused. Open the dosewise page itself and submit the form there."

templates = Jinja2Templates(
    env=jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES_DIR), autoescape=True, undefined=jinja2.StrictUndefined)
)


def page_router() -> APIRouter:
    """The page's routes; the recommendation routes are audited like the API's. Left out of the
    OpenAPI schema: they answer HTML forms, not JSON clients."""
    router = APIRouter(include_in_schema=False)
    router.add_api_route("/", show_page, methods=["GET"], response_class=HTMLResponse, name="page")
    router.add_api_route("/signin", sign_in, methods=["POST"], name="sign_in")
    router.add_api_route("/signout", sign_out, methods=["POST"], name="sign_out")
    router.add_api_route(
        "/recommend/vancomycin", recommend_vancomycin, methods=["POST"], name="recommend_vancomycin", route_class_override=AuditedRoute
    )
    router.add_api_route(
        "/recommend/anesthesia",
        recommend_anesthesia,
        methods=["POST"],
        name="recommend_anesthesia",
        route_class_override=AuditedRoute,
        # A pasted history is one text field; let it reach MAX_HISTORY_BYTES so its size earns a clear message.
        form_limits={"max_part_size": MAX_BODY_BYTES},
    )
    return router


# --- who is asking


@dataclass(frozen=True)
class Auth:
    on: bool  # some token exists: every action needs one
    name: str | None  # the presented token's name, when valid

    @property
    def allowed(self) -> bool:
        return not self.on or self.name is not None


def auth_state(request: Request) -> Auth:
    """Whether auth is on and who the request's token (bearer header or cookie) names; the name is
    kept on the request for its audit row."""
    store: Store = request.app.state.store
    if not store.has_tokens():
        return Auth(on=False, name=None)
    token = presented_token(request)
    name = store.token_name(token) if token else None
    if name is not None:
        request.state.token_name = name
    return Auth(on=True, name=name)


def sent_from_another_site(request: Request) -> bool:
    """A browser's own account of where a form came from (Fetch Metadata). Without auth there is no
    cookie for SameSite to withhold, so this is what keeps other sites from posting to a loopback server."""
    return request.headers.get("sec-fetch-site", "").lower() in {"cross-site", "same-site"}


def refusal(request: Request, auth: Auth) -> Response | None:
    """The page to answer instead of acting: a form from another site (403), no valid token (401)."""
    if sent_from_another_site(request):
        return render_message(request, "Refused", CROSS_SITE, 403)
    if not auth.allowed:
        return render_sign_in(request, NOT_SIGNED_IN, 401)
    return None


# --- routes


def show_page(request: Request, model: str | None = None, audit: str | None = None) -> Response:
    """The page for one model (`?model=ID`, default the first); `?audit=model` lists only its audit rows."""
    auth = auth_state(request)
    if not auth.allowed:
        return render_sign_in(request, None, 200)
    service: Service = request.app.state.service
    selected = service.models.get(model) if model else None
    notice, status = None, 200
    if model and selected is None:
        notice, status = f"No model named '{model}' is loaded; showing another. Loaded models: {', '.join(service.models) or 'none'}.", 404
    return render_page(request, auth, selected or next(iter(service.models.values()), None), notice=notice, status=status, audit=audit)


def sign_in(request: Request, token: Annotated[str, Form(max_length=1024)] = "") -> Response:
    if sent_from_another_site(request):
        return render_message(request, "Refused", CROSS_SITE, 403)
    store: Store = request.app.state.store
    if not store.has_tokens():
        return RedirectResponse(str(request.url_for("page")), 303)
    token = token.strip()
    if not token or store.token_name(token) is None:
        return render_sign_in(request, WRONG_TOKEN if token else "Enter your token to sign in.", 401)
    response = RedirectResponse(str(request.url_for("page")), 303)
    response.set_cookie(
        TOKEN_COOKIE,
        token,
        max_age=COOKIE_MAX_AGE_S,
        path="/",
        secure=request.url.scheme == "https",
        httponly=True,
        samesite="strict",
    )
    return response


def sign_out(request: Request) -> Response:
    if sent_from_another_site(request):
        return render_message(request, "Refused", CROSS_SITE, 403)
    response = RedirectResponse(str(request.url_for("page")), 303)
    response.delete_cookie(TOKEN_COOKIE, path="/", secure=request.url.scheme == "https", httponly=True, samesite="strict")
    return response


async def submitted_fields(request: Request) -> dict[str, str]:
    """Every text field of the submitted form: a vancomycin model's features are its own, so they
    cannot be declared one by one."""
    form = await request.form()
    return {key: value for key, value in form.items() if isinstance(value, str)}


def recommend_vancomycin(
    request: Request,
    fields: Annotated[dict[str, str], Depends(submitted_fields)],
    model: Annotated[str, Form(max_length=64)] = "",
    allow_out_of_range: Annotated[str, Form(max_length=8)] = "",
) -> Response:
    """The vancomycin form: one value per feature, as typed, checked by the service."""
    request.state.audit_request = fields
    auth = auth_state(request)
    refused = refusal(request, auth)
    if refused is not None:
        return refused
    service: Service = request.app.state.service
    shown = shown_model(service, model, "vancomycin")
    allow = bool(allow_out_of_range)
    features = shown.features if shown is not None else []
    state = {name: fields[name] for name in features if name in fields}
    form = VancomycinForm(values=state, allow_out_of_range=allow)
    try:
        used, answer = service.recommend_vancomycin(model or None, state, allow)
    except ServiceError as err:
        record(request, err.status, {"detail": err.detail()})
        return render_page(request, auth, shown, vancomycin=form, error=err, status=err.status)
    served = jsonable_encoder({"model": used.id, "model_hash": used.model_hash, **answer})
    audit_id = record(request, 200, served, used)
    return render_page(request, auth, used, vancomycin=form, result=vancomycin_result(answer, audit_id))


def recommend_anesthesia(
    request: Request,
    model: Annotated[str, Form(max_length=64)] = "",
    history: Annotated[str, Form()] = "",
    upload: Annotated[UploadFile | None, File()] = None,
    case_id: Annotated[str, Form(max_length=200)] = "",
    mode: Annotated[str, Form(max_length=16)] = "",
    max_propofol: Annotated[str, Form(max_length=16)] = "",
    max_remifentanil: Annotated[str, Form(max_length=16)] = "",
) -> Response:
    """The anesthesia form: the case so far, pasted as CSV or uploaded as .csv or .parquet."""
    form = AnesthesiaForm(history=history, case_id=case_id, mode=mode, max_propofol=max_propofol, max_remifentanil=max_remifentanil)
    chosen = upload if upload is not None and upload.filename else None
    fields = {"model": model, "case_id": case_id, "mode": mode, "max_propofol": max_propofol, "max_remifentanil": max_remifentanil}
    request.state.audit_request = {**fields, "history": HistoryInput.announced(history, chosen)}
    auth = auth_state(request)
    refused = refusal(request, auth)
    if refused is not None:
        return refused
    service: Service = request.app.state.service
    shown = shown_model(service, model, "anesthesia")
    try:
        given = HistoryInput.read(history, chosen)
        request.state.audit_request = {**fields, "history": given.describe()}
        frame = given.frame()
        request.state.audit_request = {**fields, "history": given.describe(rows=len(frame))}
        limits = (rate_limit("max_propofol", max_propofol), rate_limit("max_remifentanil", max_remifentanil))
        used, answer = service.recommend_anesthesia(model or None, frame, case_id.strip() or None, mode or None, *limits)
    except ServiceError as err:
        record(request, err.status, {"detail": err.detail()})
        return render_page(request, auth, shown, anesthesia=form, error=err, status=err.status)
    served = jsonable_encoder({"model": used.id, "model_hash": used.model_hash, **answer})
    audit_id = record(request, 200, served, used)
    return render_page(request, auth, used, anesthesia=form, result=anesthesia_result(answer, audit_id))


def shown_model(service: Service, model_id: str, kind: Kind) -> LoadedModel | None:
    """The model whose form to show again: the one named if it is of `kind`, else the first of `kind`."""
    named = service.models.get(model_id)
    if named is not None and named.kind == kind:
        return named
    return next(iter(service.of_kind(kind)), None)


def rate_limit(field: str, text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not re.fullmatch(r"[0-9]{1,3}", text) or int(text) > RATE_MAX:
        raise ServiceError(
            f"{field}: {text!r} is not a rate the pumps take; expected a whole number of mL/h from 0 to {RATE_MAX}", ("body", field)
        )
    return int(text)


# --- the case history of the anesthesia form


@dataclass(frozen=True)
class HistoryInput:
    """A case history as given: pasted text or an uploaded file, its bytes and where they came from."""

    source: Literal["pasted", "upload"]
    data: bytes
    file_name: str | None = None

    @staticmethod
    def announced(history: str, upload: UploadFile | None) -> dict[str, Any]:
        """What the audit row says of a history before it is read (the request was refused first)."""
        if upload is not None:
            return {"source": "upload", "file_name": upload.filename, "bytes": upload.size}
        return {"source": "pasted", "bytes": len(history.encode("utf-8"))}

    @classmethod
    def read(cls, history: str, upload: UploadFile | None) -> HistoryInput:
        pasted = history.strip()
        if upload is not None and pasted:
            raise ServiceError(
                "Both a file and pasted text were given; the history must come from one of them. Clear the text box or the file.",
                ("body", "history"),
            )
        if upload is not None:
            data = upload.file.read(MAX_HISTORY_BYTES + 1)
            if len(data) > MAX_HISTORY_BYTES:
                raise ServiceError(
                    f"The file {upload.filename!r} is larger than {MAX_HISTORY_BYTES // 2**20} MiB; send only the case so far, "
                    "or ask through the API for longer histories.",
                    ("body", "upload"),
                    status=413,
                    type="too_large",
                )
            return cls("upload", data, upload.filename)
        if not pasted:
            raise ServiceError(
                "No case history was given: paste the case so far as CSV (with its header line), or choose a .csv or .parquet file.",
                ("body", "history"),
            )
        data = pasted.encode("utf-8")
        if len(data) > MAX_HISTORY_BYTES:
            raise ServiceError(
                f"The pasted history is larger than {MAX_HISTORY_BYTES // 2**20} MiB; upload it as a file or send only the case so far.",
                ("body", "history"),
                status=413,
                type="too_large",
            )
        return cls("pasted", data)

    def describe(self, rows: int | None = None) -> dict[str, Any]:
        """The audit's account of the history: never its bytes, but enough to tell which file it was."""
        described = {
            "source": self.source,
            "file_name": self.file_name,
            "bytes": len(self.data),
            "sha256": hashlib.sha256(self.data).hexdigest(),
        }
        if self.file_name is None:
            del described["file_name"]
        return described if rows is None else {**described, "rows": rows}

    def frame(self) -> pd.DataFrame:
        """The rows as text cells (CSV) or typed columns (Parquet), for the service's loader to check."""
        suffix = PurePath(self.file_name).suffix.lower() if self.file_name else ".csv"
        if suffix == ".parquet":
            frame = self._parquet()
        elif suffix in (".csv", ".tsv", ".txt"):
            try:
                text = self.data.decode("utf-8-sig")
            except UnicodeDecodeError:
                raise ServiceError(f"The file {self.file_name!r} is not UTF-8 text; save it as CSV (UTF-8).", ("body", "upload")) from None
            frame = csv_frame(text, "the pasted history" if self.file_name is None else f"the file {self.file_name!r}")
        else:
            raise ServiceError(
                f"The file {self.file_name!r} is not a .csv or .parquet file; export the case as CSV (from a spreadsheet: Save as CSV).",
                ("body", "upload"),
            )
        if len(frame) > MAX_HISTORY_ROWS:
            raise ServiceError(
                f"The history has {len(frame)} rows; at most {MAX_HISTORY_ROWS} are taken (about 28 h at one row per second).",
                ("body", "history"),
            )
        return frame

    def _parquet(self) -> pd.DataFrame:
        try:
            frame = pd.read_parquet(io.BytesIO(self.data), dtype_backend="numpy_nullable")
        except (OSError, ValueError) as err:
            raise ServiceError(f"The file {self.file_name!r} cannot be read as Parquet: {err}", ("body", "upload")) from None
        named_index = any(name is not None for name in frame.index.names)  # columns saved as the index, as the loader reads them
        return frame.reset_index(drop=not named_index)


def csv_frame(text: str, what: str) -> pd.DataFrame:
    """CSV text as a frame of text cells (the loader tells a blank from a typo). Text copied from a
    spreadsheet is tab-separated; that is taken too."""
    header = text.lstrip().split("\n", 1)[0]
    separator = "\t" if "\t" in header and "," not in header else ","
    try:
        return pd.read_csv(io.StringIO(text), dtype=str, sep=separator, skip_blank_lines=True)
    except pd.errors.EmptyDataError:
        raise ServiceError(
            f"{what} is empty; expected a header line with the column names, then one row per sample", ("body", "history")
        ) from None
    except pd.errors.ParserError as err:
        raise ServiceError(f"{what} cannot be read as CSV: {err}", ("body", "history")) from None


# --- what the templates show


@dataclass(frozen=True)
class VancomycinForm:
    values: Mapping[str, str]
    allow_out_of_range: bool = False


@dataclass(frozen=True)
class AnesthesiaForm:
    history: str = ""
    case_id: str = ""
    mode: str = ""
    max_propofol: str = ""
    max_remifentanil: str = ""


def dose_verdict(action: float) -> str:
    if abs(action) < KEEP_BELOW:
        return "Keep the dose"
    return "Raise the dose" if action > 0 else "Lower the dose"


def names_field(message: str, name: str) -> bool:
    """Whether an error message is about feature `name` (quoted, or as `name = value`)."""
    return f"'{name}'" in message or re.search(rf"(?<![\w.]){re.escape(name)} = ", message) is not None


def vancomycin_fields(model: LoadedModel, form: VancomycinForm, error: ServiceError | None) -> list[dict[str, Any]]:
    ranges = model.training_data.get("feature_ranges") or {}
    fields = []
    for name in model.features:
        low, high = PHYSIOLOGICAL_BOUNDS.get(name, (None, None))
        trained = ranges.get(name)
        fields.append(
            {
                "name": name,
                "label": FEATURE_LABELS.get(name, name.replace("_", " ").capitalize()),
                "unit": FEATURE_UNITS.get(name, ""),
                "min": None if low is None else f"{low:g}",
                "max": None if high is None else f"{high:g}",
                "trained": None if not trained else f"{trained[0]:.3g}–{trained[1]:.3g}",
                "value": form.values.get(name, ""),
                "invalid": error is not None and names_field(error.msg, name),
            }
        )
    return fields


def anesthesia_form_view(model: LoadedModel, form: AnesthesiaForm) -> dict[str, Any]:
    config = model.config
    data, loop = config.get("data") or {}, config.get("closed_loop") or {}
    tracks, covariates = data.get("tracks") or {}, data.get("covariates") or {}
    columns = [
        data.get("case_id", "case_id"),
        data.get("time", "time"),
        *(tracks.get(n, n) for n in TRACKS),
        *(covariates.get(n, n) for n in COVARIATES),
    ]
    default_mode = loop.get("default_mode", "argmax")
    max_rate = loop.get("max_rate") or [RATE_MAX, RATE_MAX]
    return {
        "history": form.history,
        "case_id": form.case_id,
        "mode": form.mode or default_mode,
        "modes": [
            {"value": mode, "label": MODE_LABELS[mode] + (" (this run's default)" if mode == default_mode else "")}
            for mode in PLANNING_MODES
        ],
        "max_propofol": form.max_propofol,
        "max_remifentanil": form.max_remifentanil,
        "default_max": {"propofol": int(max_rate[0]), "remifentanil": int(max_rate[1])},
        "rate_max": RATE_MAX,
        "columns": ",".join(columns),
        "step_s": float(model.training_data.get("step_s") or data.get("step_s") or 60.0),
        "max_mib": MAX_HISTORY_BYTES // 2**20,
    }


def vancomycin_result(answer: Mapping[str, Any], audit_id: int) -> dict[str, Any]:
    action = float(answer["policy_action"])
    members = int(answer.get("members", 1))
    return {
        "kind": "vancomycin",
        "verdict": dose_verdict(action),
        "direction": "keep" if abs(action) < KEEP_BELOW else ("raise" if action > 0 else "lower"),
        "policy_action": action,
        "policy_action_sd": float(answer.get("policy_action_sd", 0.0)),
        # Where the action sits on a -1..+1 bar, in % of its width; the middle band reads "keep".
        "gauge": {
            "mark": round(min(max((action + 1.0) * 50.0, 0.0), 100.0), 1),
            "keep_left": (1.0 - KEEP_BELOW) * 50.0,
            "keep_width": KEEP_BELOW * 100.0,
        },
        "members": members,
        "dose": dose_view(answer),
        "greedy_action": float(answer["greedy_action"]),
        "q_value": float(answer["q_value"]),
        "greedy_q_value": float(answer["greedy_q_value"]),
        "state": [
            {"label": FEATURE_LABELS.get(name, name), "name": name, "value": f"{value:g}", "unit": FEATURE_UNITS.get(name, "")}
            for name, value in answer["state"].items()
        ],
        "warnings": list(answer.get("warnings", [])),
        "overrides": [describe_override(item) for item in answer.get("overrides", [])],
        "plot": q_curve_svg(answer),
        "curve": [{"action": f"{float(a):+.2f}", "q": f"{float(q):.4f}"} for a, q in answer["q_curve"]],
        "audit_id": audit_id,
    }


def dose_view(answer: Mapping[str, Any]) -> dict[str, Any]:
    """The action in mg ("1,250 mg every 12 h", change in %) and the predicted exposure, when known."""
    dose, current, interval = answer.get("dose_mg"), answer.get("current_dose_mg"), answer.get("interval_h")
    auc, trough = answer.get("predicted_auc24"), answer.get("predicted_trough")
    return {
        "text": None if dose is None else f"{dose:,.0f} mg" + ("" if interval is None else f" every {interval:g} h"),
        "change": None if dose is None or not current else f"{100.0 * (dose / current - 1.0):+.0f} %",
        "current": None if current is None else f"{current:,.0f} mg",
        "auc24": None if auc is None else f"{auc:.0f}",
        "trough": None if trough is None else f"{trough:.1f}",
        "levels_used": answer.get("levels_used"),
        "notes": list(answer.get("notes", [])),
    }


def anesthesia_result(answer: Mapping[str, Any], audit_id: int) -> dict[str, Any]:
    weight = float(answer["weight_kg"])
    current = answer["current_rate_ml_h"]
    predicted = answer["predicted"]
    plan, keep = predicted["plan"], predicted["keep_current"]
    drugs = [
        (
            "Propofol",
            "20 mg/mL",
            "propofol",
            answer["propofol_rate_ml_h"],
            f"{answer['propofol_mg_kg_h']:.2f} mg/kg/h",
            propofol_mg_kg_h,
            "mg/kg/h",
        ),
        (
            "Remifentanil",
            "20 µg/mL",
            "remifentanil",
            answer["remifentanil_rate_ml_h"],
            f"{answer['remifentanil_ug_kg_min']:.3f} µg/kg/min",
            remifentanil_ug_kg_min,
            "µg/kg/min",
        ),
    ]
    rates = []
    for drug, concentration, key, rate, dose, per_kg, unit in drugs:
        now = int(current[key])
        rates.append(
            {
                "drug": drug,
                "concentration": concentration,
                "rate": int(rate),
                "dose": dose,
                "current": now,
                "current_dose": f"{per_kg(now, weight):.{2 if unit == 'mg/kg/h' else 3}f} {unit}",
                "change": "raise" if rate > now else ("lower" if rate < now else "keep"),
                "max": int(answer["max_rate_ml_h"][key]),
            }
        )
    minutes = prediction_minutes(predicted["steps"], float(answer["step_s"]))
    return {
        "kind": "anesthesia",
        "rates": rates,
        "case_id": answer["case_id"],
        "at_minutes": float(answer["time_s"]) / 60.0,
        "time_s": float(answer["time_s"]),
        "history_steps": int(answer["history_steps"]),
        "window_steps": int(answer["window_steps"]),
        "step_s": float(answer["step_s"]),
        "mode": answer["mode"],
        "mode_label": MODE_LABELS.get(answer["mode"], answer["mode"]),
        "weight_kg": weight,
        "plan_source": predicted["plan_source"],
        "value_plan": float(answer["value"]["plan"]),
        "value_keep": float(answer["value"]["keep_current"]),
        "warnings": list(answer.get("warnings", [])),
        "notes": list(answer.get("notes", [])),
        "plot": anesthesia_svg(answer),
        "table": [
            {"minutes": f"{m:g}", "bis_plan": f"{bp:.0f}", "bis_keep": f"{bk:.0f}", "map_plan": f"{mp:.0f}", "map_keep": f"{mk:.0f}"}
            for m, bp, bk, mp, mk in zip(minutes, plan["bis"], keep["bis"], plan["map"], keep["map"])
        ],
        "audit_id": audit_id,
    }


def audit_summary(entry: AuditEntry) -> str:
    """One short line of what a request got back, whichever door it came through."""
    response = entry.response
    try:
        if isinstance(response, dict):
            if "policy_action" in response:
                action = float(response["policy_action"])
                dose = response.get("dose_mg")
                in_mg = f": {float(dose):,.0f} mg" if dose is not None else ""
                return f"{dose_verdict(action)}{in_mg} (policy action {action:+.2f})"
            if "propofol_rate_ml_h" in response:
                return f"propofol {int(response['propofol_rate_ml_h'])} mL/h, remifentanil {int(response['remifentanil_rate_ml_h'])} mL/h"
            if "cards" in response:
                return f"{len(response['cards'])} CDS card(s)"
            if "total" in response and "returned" in response:
                return f"audit query: {int(response['returned'])} of {int(response['total'])} rows"
            detail = response.get("detail")
            if isinstance(detail, list) and detail and isinstance(detail[0], dict):
                return shortened(str(detail[0].get("msg", "")))
            if isinstance(detail, str):
                return shortened(detail)
    except (TypeError, ValueError, KeyError):
        pass
    return {401: "not signed in", 403: "refused: sent from another site"}.get(entry.status, "")


def shortened(text: str) -> str:
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1].rstrip() + "…"


def audit_view(store: Store, model: LoadedModel | None, audit: str | None) -> dict[str, Any]:
    only = model.id if audit == "model" and model is not None else None
    entries = store.audit(model_id=only, limit=AUDIT_ROWS_SHOWN)
    return {
        "only_model": only,
        "total": store.count_audit(model_id=only),
        "rows": [
            {
                "id": entry.id,
                "time": f"{entry.time:%Y-%m-%d %H:%M:%S}",
                "endpoint": entry.endpoint,
                "method": entry.method,
                "model": entry.model_id,
                "user": entry.token_name,
                "status": entry.status,
                "ok": entry.status < 400,
                "summary": audit_summary(entry),
            }
            for entry in entries
        ],
    }


def model_label(model: LoadedModel) -> str:
    return f"{model.id} — {model.kind} ({'IQL' if model.algorithm == 'iql' else 'planner'})"


# --- rendering


def base_context(request: Request, auth: Auth | None) -> dict[str, Any]:
    return {
        "product": PRODUCT,
        "stylesheet": str(request.url_for("static", path=STYLESHEET)),
        "auth": auth,
    }


def render_page(
    request: Request,
    auth: Auth,
    model: LoadedModel | None,
    *,
    vancomycin: VancomycinForm | None = None,
    anesthesia: AnesthesiaForm | None = None,
    result: dict[str, Any] | None = None,
    error: ServiceError | None = None,
    notice: str | None = None,
    status: int = 200,
    audit: str | None = None,
) -> Response:
    service: Service = request.app.state.service
    store: Store = request.app.state.store
    context = {
        **base_context(request, auth),
        "models": [{"id": m.id, "label": model_label(m), "kind": m.kind} for m in service.models.values()],
        "model": model,
        "model_label": model_label(model) if model is not None else None,
        "vancomycin": None,
        "anesthesia": None,
        "allow_out_of_range": False,
        "result": result,
        "error": error,
        "notice": notice,
        "audit": audit_view(store, model, audit),
    }
    if model is not None and model.kind == "vancomycin":
        form = vancomycin or VancomycinForm(values={})
        context["vancomycin"] = vancomycin_fields(model, form, error)
        context["allow_out_of_range"] = form.allow_out_of_range
    elif model is not None:
        context["anesthesia"] = anesthesia_form_view(model, anesthesia or AnesthesiaForm())
    return templates.TemplateResponse(request, "page.html", context, status_code=status)


def render_sign_in(request: Request, error: str | None, status: int) -> Response:
    return templates.TemplateResponse(request, "signin.html", {**base_context(request, None), "error": error}, status_code=status)


def render_message(request: Request, title: str, message: str, status: int) -> Response:
    context = {**base_context(request, None), "title": title, "message": message}
    return templates.TemplateResponse(request, "message.html", context, status_code=status)
