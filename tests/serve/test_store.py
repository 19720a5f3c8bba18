"""The service's database on SQLite and on a real PostgreSQL server: migrations, the append-only
audit log and its queries, bearer tokens, concurrent writers, and errors that name the URL."""

from __future__ import annotations

import hashlib
import math
import re
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic import command

from dosewise.serve.store import (
    DOSEWISE_HOME_ENV,
    AuditEntry,
    DuplicateTokenError,
    Store,
    StoreError,
    TokenInfo,
    alembic_config,
    default_db_url,
    dosewise_home,
    head_revision,
)

from .postgres_server import free_port

T0 = datetime(2025, 3, 1, 12, 0, tzinfo=UTC)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def db_url(request, tmp_path) -> str:
    """A URL of a new, empty database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'serve.db'}"
    return request.getfixturevalue("postgres_db_url")


@pytest.fixture
def store(db_url):
    with Store(db_url) as opened:
        yield opened


def append(store: Store, minute: int, **fields) -> int:
    """One entry at T0 + `minute`, with plain defaults for what a test doesn't care about."""
    values = dict(
        endpoint="/v1/recommend",
        method="POST",
        status=200,
        model_id="iql-a",
        model_hash="ab12",
        token_name="alice",
        client="127.0.0.1",
        request={"minute": minute},
        response={"ok": True},
        duration_ms=2.5,
        time=T0 + timedelta(minutes=minute),
    )
    return store.append_audit(**{**values, **fields})


def table_text(store: Store, table: str) -> str:
    """Every value of every row of `table`, as one string."""
    with store.engine.connect() as connection:
        rows = connection.execute(sa.text(f"SELECT * FROM {table}")).all()
    return "\n".join(" ".join(str(value) for value in row) for row in rows)


def test_a_fresh_database_is_migrated_to_head(store):
    assert head_revision() == "0001"
    assert store.revision() == "0001"
    inspector = sa.inspect(store.engine)
    assert {"audit_log", "tokens", "alembic_version"} <= set(inspector.get_table_names())
    indexed = {tuple(index["column_names"]) for index in inspector.get_indexes("audit_log")}
    assert {("time",), ("model_id",), ("token_name",)} <= indexed
    token_columns = {column["name"]: column for column in inspector.get_columns("tokens")}
    assert set(token_columns) == {"id", "name", "sha256", "prefix", "created", "revoked"}
    assert token_columns["revoked"]["nullable"] is True
    unique = {tuple(constraint["column_names"]) for constraint in inspector.get_unique_constraints("tokens")}
    assert {("name",), ("sha256",)} <= unique
    assert store.count_audit() == 0 and store.audit() == [] and store.tokens() == []


def test_append_returns_the_id_and_reads_back_every_field(store):
    entry_id = store.append_audit(
        endpoint="/v1/recommend",
        method="post",
        status=422,
        model_id="iql-a",
        model_hash="ab12",
        token_name="alice",
        client="10.1.2.3",
        request={"x": 1},
        response={"detail": "bad"},
        duration_ms=12.25,
        time=T0,
    )
    (entry,) = store.audit()
    assert entry == AuditEntry(
        id=entry_id,
        time=T0,
        endpoint="/v1/recommend",
        method="POST",
        status=422,
        model_id="iql-a",
        model_hash="ab12",
        token_name="alice",
        client="10.1.2.3",
        request={"x": 1},
        response={"detail": "bad"},
        duration_ms=12.25,
    )
    assert entry.time.tzinfo is not None and entry.time.utcoffset() == timedelta(0)
    assert entry.to_dict() == {
        "id": entry_id,
        "time": "2025-03-01T12:00:00+00:00",
        "endpoint": "/v1/recommend",
        "method": "POST",
        "status": 422,
        "model_id": "iql-a",
        "model_hash": "ab12",
        "token_name": "alice",
        "client": "10.1.2.3",
        "request": {"x": 1},
        "response": {"detail": "bad"},
        "duration_ms": 12.25,
    }


def test_audit_filters_order_and_paging(store):
    ids = {}
    ids[0] = append(store, 0, model_id="iql-a", token_name="alice", endpoint="/v1/recommend")
    ids[1] = append(store, 1, model_id="iql-b", token_name="bob", endpoint="/v1/recommend")
    ids[2] = append(store, 2, model_id="iql-a", token_name="bob", endpoint="/cds-services/dose")
    ids[3] = append(store, 3, model_id=None, token_name=None, endpoint="/v1/models")
    ids[4] = append(store, 4, model_id="iql-a", token_name="alice", endpoint="/v1/recommend")

    def minutes(entries: list[AuditEntry]) -> list[int]:
        return [entry.request["minute"] for entry in entries]

    assert minutes(store.audit()) == [4, 3, 2, 1, 0]  # newest first
    assert [entry.id for entry in store.audit()] == [ids[4], ids[3], ids[2], ids[1], ids[0]]
    assert minutes(store.audit(model_id="iql-a")) == [4, 2, 0]
    assert minutes(store.audit(token_name="bob")) == [2, 1]
    assert minutes(store.audit(endpoint="/v1/recommend")) == [4, 1, 0]
    assert minutes(store.audit(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3))) == [2, 1]  # since <= t < until
    assert minutes(store.audit(since=T0 + timedelta(minutes=3))) == [4, 3]
    assert minutes(store.audit(until=T0 + timedelta(minutes=1))) == [0]
    assert minutes(store.audit(model_id="iql-a", token_name="alice", since=T0 + timedelta(seconds=30))) == [4]
    assert minutes(store.audit(limit=2)) == [4, 3]
    assert minutes(store.audit(limit=2, offset=2)) == [2, 1]
    assert minutes(store.audit(limit=2, offset=4)) == [0]
    assert store.audit(limit=0) == []
    assert store.audit(model_id="nobody") == []

    assert store.count_audit() == 5
    assert store.count_audit(model_id="iql-a") == 3
    assert store.count_audit(token_name="bob") == 2
    assert store.count_audit(endpoint="/v1/recommend") == 3
    assert store.count_audit(since=T0 + timedelta(minutes=1), until=T0 + timedelta(minutes=3)) == 2
    assert store.count_audit(model_id="iql-a", endpoint="/cds-services/dose") == 1

    with pytest.raises(ValueError, match="limit must be an int >= 0"):
        store.audit(limit=-1)
    with pytest.raises(ValueError, match="offset must be an int >= 0"):
        store.audit(offset=-3)


def test_times_are_stored_in_utc_whatever_offset_they_come_with(store):
    plus_two = timezone(timedelta(hours=2))
    append(store, 0, time=datetime(2025, 3, 1, 14, 0, tzinfo=plus_two), request="offset")  # 12:00 UTC
    append(store, 0, time=datetime(2025, 3, 1, 12, 30), request="naive")  # naive: taken as UTC
    entries = store.audit()
    assert [(entry.request, entry.time) for entry in entries] == [("naive", T0 + timedelta(minutes=30)), ("offset", T0)]
    assert all(entry.time.tzinfo == UTC for entry in entries)
    assert [entry.request for entry in store.audit(since=datetime(2025, 3, 1, 14, 15, tzinfo=plus_two))] == ["naive"]
    assert store.count_audit(until=datetime(2025, 3, 1, 12, 15)) == 1

    before = datetime.now(UTC)
    append(store, 0, time=None, request="now")
    (newest,) = store.audit(limit=1)
    assert newest.request == "now" and before - timedelta(seconds=1) <= newest.time <= datetime.now(UTC) + timedelta(seconds=1)


def test_request_and_response_round_trip_as_strict_json(store):
    request = {"patient": {"weight_kg": 70.5, "history": [{"t": 0, "bis": 95.0}, {"t": 60, "bis": float("nan")}]}, "flags": [True, None]}
    response = {"rates": [1.5, float("inf"), -float("inf")], "note": "Propofol µg/kg/min", "nested": {"a": {"b": {"c": []}}}}
    append(store, 0, request=request, response=response)
    append(store, 1, request=None, response=None)
    newest, oldest = store.audit()
    assert newest.request is None and newest.response is None
    assert oldest.request == {
        "patient": {"weight_kg": 70.5, "history": [{"t": 0, "bis": 95.0}, {"t": 60, "bis": None}]},
        "flags": [True, None],
    }
    assert oldest.response == {"rates": [1.5, None, None], "note": "Propofol µg/kg/min", "nested": {"a": {"b": {"c": []}}}}
    stored = table_text(store, "audit_log")
    assert "NaN" not in stored and "Infinity" not in stored

    with pytest.raises(ValueError, match="audit request is not JSON-serialisable"):
        append(store, 2, request={"when": datetime(2025, 1, 1)})
    with pytest.raises(ValueError, match="duration_ms must be a finite number"):
        append(store, 2, duration_ms=math.nan)
    assert store.count_audit() == 2  # the refused entries left nothing behind


def test_tokens_keep_only_a_hash_and_check_in_constant_time(store, db_url):
    assert store.has_tokens() is False
    token = store.create_token("ward-3.icu@example")
    assert token.startswith("dw_") and len(token) > 40
    assert store.has_tokens() is True
    assert store.token_name(token) == "ward-3.icu@example"

    (info,) = store.tokens()
    assert isinstance(info, TokenInfo)
    assert info.name == "ward-3.icu@example" and info.prefix == token[:6] and info.revoked is None
    assert info.created.tzinfo == UTC and abs(datetime.now(UTC) - info.created) < timedelta(minutes=1)

    stored = table_text(store, "tokens")
    assert token not in stored and token[6:] not in stored
    assert hashlib.sha256(token.encode()).hexdigest() in stored
    if db_url.startswith("sqlite"):  # not in the file either, nor its write-ahead log
        database = Path(db_url.removeprefix("sqlite:///"))
        for path in (database, database.with_name(database.name + "-wal")):
            if path.exists():
                assert token.encode() not in path.read_bytes()

    assert store.token_name(token[:6] + "x" * (len(token) - 6)) is None  # same prefix, wrong secret
    assert store.token_name(token + "x") is None
    assert store.token_name("") is None
    assert store.token_name("dw_" + "a" * 10_000) is None
    assert store.token_name(None) is None

    other = store.create_token("bob")
    assert other != token and store.token_name(other) == "bob"
    assert [info.name for info in store.tokens()] == ["ward-3.icu@example", "bob"]

    assert store.revoke_token("ward-3.icu@example") is True
    assert store.revoke_token("ward-3.icu@example") is False  # already revoked
    assert store.revoke_token("nobody") is False
    assert store.token_name(token) is None
    assert store.token_name(other) == "bob"
    assert [info.name for info in store.tokens()] == ["bob"]
    revoked = {info.name: info.revoked for info in store.tokens(include_revoked=True)}
    assert revoked["bob"] is None and revoked["ward-3.icu@example"].tzinfo == UTC
    assert store.has_tokens() is True
    assert store.revoke_token("bob") is True
    assert store.has_tokens() is False
    assert len(store.tokens(include_revoked=True)) == 2  # revoking keeps the row


def test_token_names_are_checked_and_unique(store):
    store.create_token("alice")
    with pytest.raises(DuplicateTokenError, match="a token named 'alice' exists already"):
        store.create_token("alice")
    store.revoke_token("alice")
    with pytest.raises(DuplicateTokenError, match="revoked tokens keep their name"):
        store.create_token("alice")
    for bad in ["", "a" * 65, "has space", "slash/name", "semi;colon", "ünïcode"]:
        with pytest.raises(ValueError, match="is not 1-64 characters of letters, digits and _ . @ -"):
            store.create_token(bad)
    assert store.create_token("a" * 64).startswith("dw_")
    assert [info.name for info in store.tokens(include_revoked=True)] == ["alice", "a" * 64]


def test_triggers_refuse_update_delete_behind_the_api(store):
    entry_id = append(store, 0, status=200)
    for statement in ["UPDATE audit_log SET status = 500", f"DELETE FROM audit_log WHERE id = {entry_id}", "DELETE FROM audit_log"]:
        with pytest.raises(sa.exc.DatabaseError, match="audit log is append-only"), store.engine.begin() as connection:
            connection.execute(sa.text(statement))
    if store.engine.dialect.name == "postgresql":
        with pytest.raises(sa.exc.DatabaseError, match="audit log is append-only"), store.engine.begin() as connection:
            connection.execute(sa.text("TRUNCATE audit_log"))
    (entry,) = store.audit()
    assert (entry.id, entry.status) == (entry_id, 200)
    assert not any(name.startswith(("update", "delete")) for name in dir(Store))


def test_concurrent_appends_from_16_threads_all_land(store):
    def append_50(thread: int) -> list[int]:
        return [append(store, index, request={"thread": thread, "index": index}, token_name=f"t{thread}") for index in range(50)]

    with ThreadPoolExecutor(max_workers=16) as pool:
        ids = [entry_id for chunk in pool.map(append_50, range(16)) for entry_id in chunk]
    assert len(ids) == 800 and len(set(ids)) == 800
    assert store.count_audit() == 800
    assert store.count_audit(token_name="t7") == 50
    entries = store.audit(limit=1000)
    assert {entry.id for entry in entries} == set(ids)
    assert {(entry.request["thread"], entry.request["index"]) for entry in entries} == {(t, i) for t in range(16) for i in range(50)}


def test_concurrent_openings_of_a_fresh_database_migrate_once(db_url):
    def open_and_append(index: int) -> str | None:
        with Store(db_url) as opened:
            append(opened, index)
            return opened.revision()

    with ThreadPoolExecutor(max_workers=4) as pool:
        revisions = list(pool.map(open_and_append, range(4)))
    assert revisions == ["0001"] * 4
    with Store(db_url) as reopened:
        assert reopened.count_audit() == 4


def test_reopening_keeps_rows_and_the_schema(db_url):
    with Store(db_url) as first:
        entry_id = append(first, 0)
        token = first.create_token("alice")
    with Store(db_url) as second:
        assert second.revision() == "0001"
        assert [entry.id for entry in second.audit()] == [entry_id]
        assert second.token_name(token) == "alice"
        append(second, 1)
    with Store(db_url) as third:
        assert third.count_audit() == 2


def test_a_database_at_base_is_brought_to_head(db_url):
    with Store(db_url) as opened, opened.engine.begin() as connection:
        command.downgrade(alembic_config(connection), "base")
    with Store(db_url) as reopened:
        assert reopened.revision() == "0001"
        append(reopened, 0)
        with pytest.raises(sa.exc.DatabaseError, match="audit log is append-only"), reopened.engine.begin() as connection:
            connection.execute(sa.text("DELETE FROM audit_log"))


def test_in_memory_sqlite_is_one_database_for_all_threads():
    with Store("sqlite://") as memory:
        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(lambda index: append(memory, index), range(40)))
        assert memory.count_audit() == 40


def test_unreachable_postgres_is_a_store_error_with_the_password_masked():
    port = free_port()  # nothing listens there
    with pytest.raises(StoreError) as raised:
        Store(f"postgresql://dosewise:s3cret-pw@127.0.0.1:{port}/dosewise?connect_timeout=5")
    message = str(raised.value)
    assert f"postgresql+psycopg://dosewise:***@127.0.0.1:{port}/dosewise" in message
    assert "s3cret-pw" not in message
    assert raised.value.__cause__ is None and raised.value.__suppress_context__  # no SQLAlchemy traceback shown


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("not a url", "not a database URL: 'not a url'"),
        ("mysql://root:hunter2@db/dosewise", "unsupported database mysql://root:***@db/dosewise"),
        ("sqlite:////no/such/folder/serve.db", "the folder /no/such/folder does not exist"),
    ],
)
def test_bad_urls_are_store_errors_naming_them(url, expected):
    with pytest.raises(StoreError, match=re.escape(expected)) as raised:
        Store(url)
    assert "hunter2" not in str(raised.value)


@pytest.mark.postgres
def test_store_shows_its_url_without_the_password(postgres_db_url):
    with_password = postgres_db_url.replace("postgresql://dosewise@", "postgresql://dosewise:s3cret-pw@")  # trust auth ignores it
    with Store(with_password) as opened:
        assert opened.url == with_password.replace("postgresql://dosewise:s3cret-pw@", "postgresql+psycopg://dosewise:***@")
        assert repr(opened) == f"Store({opened.url!r})"
        assert "s3cret-pw" not in repr(opened) + str(opened)
        assert opened.engine.dialect.driver == "psycopg"


def test_default_db_url_honours_dosewise_home(tmp_path, monkeypatch):
    home = tmp_path / "custom-home"
    monkeypatch.setenv(DOSEWISE_HOME_ENV, str(home))
    assert dosewise_home() == home
    assert default_db_url() == f"sqlite:///{home / 'serve.db'}"
    assert home.is_dir()
    with Store() as default:
        assert default.url == f"sqlite:///{home / 'serve.db'}"
        append(default, 0)
    assert (home / "serve.db").is_file()

    monkeypatch.delenv(DOSEWISE_HOME_ENV)
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert dosewise_home() == tmp_path / "user" / ".dosewise"
