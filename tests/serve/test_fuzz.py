"""The API against requests generated from its own OpenAPI schema: valid bodies and deliberately
invalid ones, for every operation, with auth off and on. No request may get a 5xx, every answer
must match the schema it documents, and every audited request must leave its row. Seeded
(derandomised), so a failure reproduces."""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import schemathesis
from fastapi import FastAPI
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import response_schema_conformance

from dosewise.serve.app import create_app
from dosewise.serve.service import Service
from dosewise.serve.store import Store

EXAMPLES_PER_OPERATION = 60  # per operation and generation mode; both tests together stay well under a minute
MODES = (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE)
OPERATIONS = {"GET /health", "GET /v1/models", "POST /v1/vancomycin/recommend", "POST /v1/anesthesia/recommend", "GET /v1/audit"}
# Distinct requests each (operation, mode) must reach when the operation takes input: the search
# must not collapse to a handful of cases. An operation without input has exactly one request.
MIN_REQUESTS_PER_RUN = 40
MIN_REQUESTS_PER_TEST = 350


@dataclass
class Fuzzed:
    sent: Counter[str] = field(default_factory=Counter)  # "METHOD /path mode" -> requests
    without_input: set[str] = field(default_factory=set)  # labels of operations with nothing to vary
    audit_ids: list[int] = field(default_factory=list)  # X-Audit-Id of every answer that has one

    @property
    def total(self) -> int:
        return sum(self.sent.values())

    def record(self, label: str, response: schemathesis.Response) -> None:
        self.sent[label] += 1
        [audit_id] = response.headers.get("x-audit-id", [None])  # lowercase names, lists of values
        if label.split()[1].startswith("/v1/"):
            assert audit_id is not None, f"{label}: answer {response.status_code} without its audit row"
        if audit_id is not None:
            self.audit_ids.append(int(audit_id))


def fuzz(app: FastAPI, headers: dict[str, str]) -> Fuzzed:
    """Send every operation's generated cases, valid and invalid. A failed check raises with the case
    that broke it (schemathesis adds a curl line to replay it)."""
    schema = schemathesis.openapi.from_asgi("/openapi.json", app)
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {operation.label for operation in operations} >= OPERATIONS
    fuzzed = Fuzzed()
    for operation in operations:
        takes_input = bool(operation.body) or any(True for _ in operation.iter_parameters())
        for mode in MODES if takes_input else MODES[:1]:  # nothing to make invalid in a request without input
            label = f"{operation.label} {mode.value}"
            if not takes_input:
                fuzzed.without_input.add(label)
            run_cases(operation.as_strategy(generation_mode=mode), headers, checks_for(mode), functools.partial(fuzzed.record, label))
    return fuzzed


def checks_for(mode: schemathesis.GenerationMode) -> list[Callable]:
    """No 5xx and documented answers, for valid and invalid requests alike. (Schemathesis's
    negative_data_rejection is left out: the API takes a Unix timestamp for since/until, as pydantic
    does, where the schema says date-time.)"""
    return [not_a_server_error, response_schema_conformance]


def run_cases(strategy, headers: dict[str, str], checks: list[Callable], record: Callable[[schemathesis.Response], None]) -> None:
    @settings(
        max_examples=EXAMPLES_PER_OPERATION,
        derandomize=True,
        deadline=None,
        database=None,
        phases=(Phase.explicit, Phase.generate, Phase.shrink),
        suppress_health_check=list(HealthCheck),
        print_blob=False,
    )
    @given(case=strategy)
    def send(case: schemathesis.Case) -> None:
        response = case.call(headers=headers)
        record(response)
        assert "Traceback" not in response.text
        case.validate_response(response, checks=checks, headers=headers)

    send()


def report(fuzzed: Fuzzed, auth: str) -> None:
    print(f"\nfuzz ({auth}): {fuzzed.total} generated requests over {len(fuzzed.sent)} (operation, mode) runs")
    for label, count in sorted(fuzzed.sent.items()):
        print(f"  {count:4d}  {label}")
    thin = {label: n for label, n in fuzzed.sent.items() if n < (1 if label in fuzzed.without_input else MIN_REQUESTS_PER_RUN)}
    assert not thin, f"too few distinct requests generated: {thin}"
    assert fuzzed.total >= MIN_REQUESTS_PER_TEST


def is_unparsed(request: object) -> bool:
    return isinstance(request, dict) and set(request) == {"unparsed_bytes"}


def assert_audited(fuzzed: Fuzzed, store: Store, token_name: str | None) -> None:
    """Each answer's X-Audit-Id is its own row, and the log holds no row that no answer named."""
    assert len(set(fuzzed.audit_ids)) == len(fuzzed.audit_ids)
    rows = store.audit(limit=len(fuzzed.audit_ids) + 10)
    assert sorted(row.id for row in rows) == sorted(fuzzed.audit_ids)
    # A body that isn't JSON at all is refused (400/422) before the token is looked at, so its row names no token.
    named = [row for row in rows if row.token_name == token_name or (row.status in (400, 422) and is_unparsed(row.request))]
    assert len(named) == len(rows), f"requests with the right token recorded without it: {[row for row in rows if row not in named][:3]}"
    print(f"  {len(rows)} audit rows, one per audited request")


def test_fuzz_without_auth_no_5xx_and_answers_match_the_schema(loaded_models, store):
    app = create_app(Service(loaded_models), store)
    with TestClient(app):
        fuzzed = fuzz(app, headers={})
    report(fuzzed, "auth off")
    assert_audited(fuzzed, store, None)


def test_fuzz_with_a_token_no_5xx_and_answers_match_the_schema(loaded_models, store):
    token = store.create_token("fuzzer")
    app = create_app(Service(loaded_models), store)
    with TestClient(app):
        fuzzed = fuzz(app, headers={"Authorization": f"Bearer {token}"})
    report(fuzzed, "auth on")
    assert_audited(fuzzed, store, "fuzzer")
