"""Fixtures of the service's tests. `postgres_url` starts one PostgreSQL server for the session;
`postgres_db_url` gives each test a database of its own on it."""

from __future__ import annotations

import itertools
import os

import pytest

from tests.serve.fixtures import *  # noqa: F403

from .postgres_server import PostgresServer, PostgresUnavailable, create_database

REQUIRE_SYSTEM_TESTS_ENV = "DOSEWISE_REQUIRE_SYSTEM_TESTS"

_database_numbers = itertools.count()


def skip_or_fail(reason: str) -> None:
    """Skip a test whose system binaries are missing, or fail it where they are required (CI)."""
    if os.environ.get(REQUIRE_SYSTEM_TESTS_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_SYSTEM_TESTS_ENV}=1 requires it)")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def postgres_url():
    """URL of the session's PostgreSQL server, database `dosewise_test` (trust auth, loopback only)."""
    try:
        server = PostgresServer()
    except PostgresUnavailable as error:
        skip_or_fail(str(error))
    server.start()
    try:
        yield create_database(server.url("postgres"), "dosewise_test")
    finally:
        server.stop()


@pytest.fixture
def postgres_db_url(postgres_url) -> str:
    """URL of a new, empty database on the session's server, so tests never see each other's rows."""
    return create_database(postgres_url, f"dosewise_test_{next(_database_numbers)}")
