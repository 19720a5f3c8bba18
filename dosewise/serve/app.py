"""The service as an ASGI app: the HTTP API, the page and CDS Hooks over one `Service` and one
audit `Store`.

Every call that can produce a recommendation goes through `AuditedRoute`, which writes one
append-only audit row per request, whatever its outcome (200, 401, 422, 500): the request, the
response, the model and its hash, the token's name and the time. Inference runs in FastAPI's
thread pool (the endpoints are plain functions), the audit write too, so the event loop only
routes. Answers never carry a stack trace or a path on the server.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Coroutine
from datetime import datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, HTTPException, Path, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from dosewise.serve.cds_hooks import SERVICE_ID, HookRequest, cards, discovery, read_prefetch
from dosewise.serve.registry import LoadedModel
from dosewise.serve.schemas import (
    AnesthesiaRecommendation,
    AnesthesiaRequest,
    Audit,
    Failure,
    Health,
    Models,
    ValidationFailure,
    VancomycinRecommendation,
    VancomycinRequest,
)
from dosewise.serve.service import Service, ServiceError
from dosewise.serve.store import Store

log = logging.getLogger("dosewise.serve")

TOKEN_COOKIE = "dosewise_token"
MAX_BODY_BYTES = 32 * 1024 * 1024
UNAUTHORIZED = (
    "a valid bearer token is required: send 'Authorization: Bearer <token>' "
    "(an administrator creates one with `dosewise serve token create NAME`)"
)
ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": Failure, "description": "No valid bearer token (once any token exists)."},
    404: {"model": ValidationFailure, "description": "No model of that kind is loaded."},
    422: {"model": ValidationFailure, "description": "The request names a field that is missing, unknown or out of range."},
}


def presented_token(request: Request) -> str | None:
    """The bearer token of the Authorization header, else of the page's cookie."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() == "bearer" and token.strip():
        return token.strip()
    return request.cookies.get(TOKEN_COOKIE) or None


def authenticate(request: Request) -> str | None:
    """The token's name; None when auth is off (no token exists). 401 otherwise."""
    if getattr(request.state, "authenticated", False):  # checked already, before the body was read (ApiRoute)
        return request.state.token_name
    store: Store = request.app.state.store
    name = None
    if store.has_tokens():
        token = presented_token(request)
        name = store.token_name(token) if token else None
        if name is None:
            raise HTTPException(401, UNAUTHORIZED, headers={"WWW-Authenticate": "Bearer"})
    request.state.authenticated, request.state.token_name = True, name
    return name


Authenticated = Annotated[str | None, Depends(authenticate)]


class AuditedRoute(APIRoute):
    """A route whose every request lands in the audit log (module docstring). A handler that
    answers writes its row itself (`record`), so its answer can carry the row's id; for every other
    outcome the route writes it. A handler may set `request.state.audit_request` (the page: its
    form instead of a JSON body)."""

    # Check the token before the body is parsed, so a caller without one learns that first (the
    # API); the page checks it itself, to answer with its sign-in form.
    authenticate_first = False

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def audited(request: Request) -> Response:
            request.state.audit_started = time.perf_counter()
            request.state.audit_body = await request.body()
            try:
                if self.authenticate_first:
                    await run_in_threadpool(authenticate, request)
                response = await handler(request)
            except RequestValidationError as err:
                response = JSONResponse({"detail": validation_detail(err)}, 422)
            except StarletteHTTPException as err:  # FastAPI's own too: a body that is not UTF-8 JSON is a 400 from Starlette
                response = JSONResponse({"detail": err.detail}, err.status_code, headers=err.headers)
            except Exception:
                log.exception("internal error on %s %s", request.method, request.url.path)
                response = JSONResponse({"detail": "internal error: the request was recorded in the audit log"}, 500)
            if not hasattr(request.state, "audit_id"):
                payload = _json_or_none(getattr(response, "body", b"")) if response.media_type == "application/json" else None
                await run_in_threadpool(record, request, response.status_code, payload)
            response.headers["X-Audit-Id"] = str(request.state.audit_id)
            return response

        return audited


class ApiRoute(AuditedRoute):
    authenticate_first = True


def record(request: Request, status: int, response: Any, model: LoadedModel | None = None) -> int:
    """Append the request's audit row; its id is kept on the request (`X-Audit-Id`)."""
    store: Store = request.app.state.store
    state = request.state
    audit_id = store.append_audit(
        endpoint=request.url.path,
        method=request.method,
        status=status,
        model_id=model.id if model is not None else None,
        model_hash=model.model_hash if model is not None else None,
        token_name=getattr(state, "token_name", None),
        client=request.client.host if request.client else None,
        request=state.audit_request if hasattr(state, "audit_request") else _json_or_none(getattr(state, "audit_body", b"")),
        response=response,
        duration_ms=(time.perf_counter() - getattr(state, "audit_started", time.perf_counter())) * 1000.0,
    )
    state.audit_id = audit_id
    return audit_id


def _json_or_none(data: bytes) -> Any:
    if not data:
        return None
    try:
        return json.loads(data)
    except ValueError:
        return {"unparsed_bytes": len(data)}


def validation_detail(err: RequestValidationError) -> list[dict[str, Any]]:
    """FastAPI's 422 items without the echoed input: loc, msg, type."""
    return [{"loc": list(item.get("loc", ())), "msg": str(item.get("msg", "")), "type": str(item.get("type", ""))} for item in err.errors()]


def create_app(service: Service, store: Store) -> FastAPI:
    app = FastAPI(
        title="dosewise decision support",
        version="1",
        summary="Dose recommendations from trained dosewise runs, every request audited.",
        docs_url="/docs",
        redoc_url=None,
    )
    app.state.service = service
    app.state.store = store

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > MAX_BODY_BYTES):
            return JSONResponse({"detail": f"request body too large: at most {MAX_BODY_BYTES // 2**20} MiB"}, 413)
        return await call_next(request)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        return JSONResponse({"detail": validation_detail(err)}, 422)

    @app.exception_handler(ServiceError)
    async def _refused(request: Request, err: ServiceError) -> JSONResponse:
        return JSONResponse({"detail": err.detail()}, err.status)

    @app.get("/health", response_model=Health, tags=["service"])
    def health() -> dict[str, Any]:
        return {"status": "ok", "models": len(service.models), "auth": "on" if store.has_tokens() else "off"}

    api = APIRouter(prefix="/v1", route_class=ApiRoute, responses=ERRORS)

    @api.get("/models", response_model=Models, tags=["models"])
    def models(token: Authenticated) -> dict[str, Any]:
        """The loaded runs: kind, config, training data summary, weight hashes."""
        return {"models": [model.public() for model in service.models.values()]}

    @api.post("/vancomycin/recommend", response_model=VancomycinRecommendation, tags=["recommend"])
    def vancomycin(body: VancomycinRequest, request: Request, token: Authenticated) -> dict[str, Any]:
        """The dose recommendation for one patient state, as `dosewise recommend --state` gives it."""
        try:
            model, answer = service.recommend_vancomycin(body.model, body.state, body.allow_out_of_range, body.history, body.patient)
        except ServiceError as err:
            raise HTTPException(err.status, err.detail()) from None
        return served(model, answer, request)

    @api.post("/anesthesia/recommend", response_model=AnesthesiaRecommendation, tags=["recommend"])
    def anesthesia(body: AnesthesiaRequest, request: Request, token: Authenticated) -> dict[str, Any]:
        """The next propofol and remifentanil rates for the case so far, as `dosewise recommend --history` gives them."""
        try:
            model, answer = service.recommend_anesthesia(
                body.model, body.rows, body.case_id, body.mode, body.max_propofol, body.max_remifentanil, body.data_preset
            )
        except ServiceError as err:
            raise HTTPException(err.status, err.detail()) from None
        return served(model, answer, request)

    @api.get("/audit", response_model=Audit, tags=["audit"])
    def audit(
        request: Request,
        token: Authenticated,
        model: Annotated[str | None, Query(max_length=64, description="Model id.")] = None,
        user: Annotated[str | None, Query(max_length=64, description="Token name.")] = None,
        since: Annotated[datetime | None, Query(description="ISO 8601 time, inclusive.")] = None,
        until: Annotated[datetime | None, Query(description="ISO 8601 time, exclusive.")] = None,
        endpoint: Annotated[str | None, Query(max_length=200, description="Request path, e.g. /v1/vancomycin/recommend.")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
        offset: Annotated[int, Query(ge=0, le=10**9)] = 0,
    ) -> dict[str, Any]:
        """The audit log, newest first, filtered by model, token name (user), time and endpoint."""
        filters = dict(model_id=model, token_name=user, since=since, until=until, endpoint=endpoint)
        rows = store.audit(**filters, limit=limit, offset=offset)
        total = store.count_audit(**filters)
        record(request, 200, {"total": total, "returned": len(rows)})  # not the rows again: the log would nest itself
        return {"total": total, "rows": [row.to_dict() for row in rows]}

    app.include_router(api)

    @app.get("/cds-services", tags=["cds-hooks"])
    def cds_discovery() -> dict[str, Any]:
        """CDS Hooks discovery: the patient-view service for vancomycin (open, as the specification asks)."""
        return discovery([model.id for model in service.of_kind("vancomycin")])

    not_found = {404: {"model": Failure, "description": "No CDS service of that id."}}
    hooks = APIRouter(prefix="/cds-services", route_class=ApiRoute, responses={**ERRORS, **not_found}, tags=["cds-hooks"])

    @hooks.post("/{service_id}")
    def cds_hook(
        service_id: Annotated[str, Path(max_length=64)], body: HookRequest, request: Request, token: Authenticated
    ) -> dict[str, Any]:
        """A patient-view hook: the vancomycin recommendation from the prefetched FHIR Observations,
        MedicationAdministrations, Patient and Conditions, as CDS cards; a missing or mismatched value is named, never guessed."""
        if service_id != SERVICE_ID:
            raise HTTPException(404, f"no CDS service '{service_id}'; this server offers '{SERVICE_ID}' (GET /cds-services)")
        try:
            model = service.pick("vancomycin", None)
        except ServiceError as err:
            raise HTTPException(err.status, err.detail()) from None
        found = read_prefetch(body.prefetch, model.features, body.context.patientId)
        answer, error = None, None
        if found.complete:
            try:
                _, answer = service.recommend_vancomycin(model.id, found.state)
            except ServiceError as err:
                error = err.msg
        result = cards(found, answer, model.id, error)
        record(request, 200, result, model)
        return result

    app.include_router(hooks)

    from fastapi.staticfiles import StaticFiles

    from dosewise.serve.page import STATIC_DIR, page_router  # here: the page imports this module's route and auth

    app.include_router(page_router())
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")
    return app


def served(model: LoadedModel, answer: dict[str, Any], request: Request) -> dict[str, Any]:
    """The recommendation with the model that made it and its audit row, written now."""
    answer = {"model": model.id, "model_hash": model.model_hash, **answer}  # to_dict() gives JSON types already
    return {**answer, "audit_id": record(request, 200, answer, model)}
