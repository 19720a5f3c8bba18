"""The service's database: an append-only audit log of every decision request and the bearer tokens
that may make them, in SQLite (the default, one file under DOSEWISE_HOME) or PostgreSQL.

Every call takes its own connection and transaction from the engine's pool, so a server's worker
threads share one `Store`. Opening a `Store` migrates its database to the newest schema, so a new
file and one written by an older dosewise both come up ready. The audit log is append-only twice
over: this API has no way to change or remove a row, and database triggers refuse any UPDATE or
DELETE that reaches the table by another road.
"""

from __future__ import annotations

import dataclasses
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory
from alembic.util.exc import CommandError
from sqlalchemy.engine import URL, Engine, make_url
from sqlalchemy.pool import StaticPool

from dosewise.checkpoint import json_safe

DOSEWISE_HOME_ENV = "DOSEWISE_HOME"
MIGRATIONS_DIR = Path(__file__).with_name("migrations")

TOKEN_PREFIX = "dw_"  # marks a string as a dosewise token (in a leaked config, a secret scanner's rule)
TOKEN_PREFIX_LENGTH = 6  # characters kept in clear to tell tokens apart: the marker and 3 random ones
TOKEN_NAME_PATTERN = re.compile(r"[A-Za-z0-9_.@-]{1,64}")
MAX_TOKEN_LENGTH = 256  # far above a real token; longer strings are refused before hashing

SQLITE_BUSY_TIMEOUT_MS = 30_000  # a writer waits this long for another's lock before giving up
POSTGRES_CONNECT_TIMEOUT_S = 10  # an unreachable server fails opening quickly instead of hanging
POOL_SIZE, POOL_MAX_OVERFLOW = 5, 35  # up to 40 connections: one per worker of a default thread pool
MIGRATION_LOCK_KEY = 0x646F7365  # PostgreSQL advisory lock: two processes opening one database migrate in turn


MIGRATION_ATTEMPTS = 6


class StoreError(RuntimeError):
    """The database can't be used: a bad URL, an unreachable server, a failed migration or query.
    The message names the database URL with its password masked."""


class DuplicateTokenError(ValueError):
    """A token of that name exists already (revoked tokens keep their name)."""


def dosewise_home() -> Path:
    """$DOSEWISE_HOME, or ~/.dosewise."""
    configured = os.environ.get(DOSEWISE_HOME_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".dosewise"


def default_db_url() -> str:
    """SQLite in <dosewise_home()>/serve.db; creates the folder."""
    home = dosewise_home().absolute()
    home.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{home / 'serve.db'}"


def mask_url(url: str | URL) -> str:
    """`url` with its password as ***, also when it isn't a URL SQLAlchemy can parse."""
    try:
        return (url if isinstance(url, URL) else make_url(url)).render_as_string(hide_password=True)
    except Exception:  # any parse failure: mask by pattern instead
        return re.sub(r"(//[^/:@]*:)[^/@]*@", r"\1***@", str(url))


def head_revision() -> str:
    """The newest schema revision of the packaged migrations."""
    head = ScriptDirectory.from_config(alembic_config()).get_current_head()
    assert head is not None, f"no migrations in {MIGRATIONS_DIR}"
    return head


def alembic_config(connection: sa.Connection | None = None) -> Config:
    """Alembic's config for the packaged migrations, built in code (no alembic.ini); with
    `connection`, migrations run on it, inside its transaction."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("path_separator", "os")
    if connection is not None:
        config.attributes["connection"] = connection
    return config


@dataclass(frozen=True)
class AuditEntry:
    id: int
    time: datetime  # UTC, timezone-aware
    endpoint: str
    method: str
    status: int
    model_id: str | None
    model_hash: str | None
    token_name: str | None
    client: str | None
    request: Any  # parsed JSON, or None
    response: Any
    duration_ms: float

    def to_dict(self) -> dict:
        """Plain JSON values, the time as ISO 8601 with its UTC offset."""
        return {**{field.name: getattr(self, field.name) for field in dataclasses.fields(self)}, "time": self.time.isoformat()}


@dataclass(frozen=True)
class TokenInfo:
    name: str
    created: datetime  # UTC, timezone-aware
    prefix: str  # the token's first characters, to tell which one a client holds; never the hash
    revoked: datetime | None = None


def as_utc(value: datetime) -> datetime:
    """`value` in UTC; a naive datetime is taken as UTC already (as an ISO time without offset)."""
    if not isinstance(value, datetime):
        raise TypeError(f"expected a datetime, got {type(value).__name__} {value!r}")
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class UTCDateTime(sa.TypeDecorator):
    """Timestamps that go in and come out as UTC-aware datetimes on both backends. SQLite has no
    time zone type: it stores the UTC wall time, naive, which sorts and compares correctly."""

    impl = sa.DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        value = as_utc(value)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


# The tables as this module reads and writes them; the migrations own their definition in the database.
metadata = sa.MetaData()
audit_log = sa.Table(
    "audit_log",
    metadata,
    sa.Column("id", sa.BigInteger().with_variant(sa.Integer(), "sqlite"), primary_key=True, autoincrement=True),
    sa.Column("time", UTCDateTime(), nullable=False),
    sa.Column("endpoint", sa.Text(), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("status", sa.Integer(), nullable=False),
    sa.Column("model_id", sa.Text()),
    sa.Column("model_hash", sa.Text()),
    sa.Column("token_name", sa.String(64)),
    sa.Column("client", sa.Text()),
    sa.Column("request", sa.Text()),
    sa.Column("response", sa.Text()),
    sa.Column("duration_ms", sa.Float(), nullable=False),
)
tokens_table = sa.Table(
    "tokens",
    metadata,
    sa.Column("id", sa.Integer(), primary_key=True, autoincrement=True),
    sa.Column("name", sa.String(64), nullable=False, unique=True),
    sa.Column("sha256", sa.String(64), nullable=False, unique=True),
    sa.Column("prefix", sa.String(16), nullable=False),
    sa.Column("created", UTCDateTime(), nullable=False),
    sa.Column("revoked", UTCDateTime()),
)


def check_token_name(name: str) -> str:
    if not isinstance(name, str) or TOKEN_NAME_PATTERN.fullmatch(name) is None:
        raise ValueError(f"token name {name!r} is not 1-64 characters of letters, digits and _ . @ -")
    return name


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def _json_text(value: Any, field: str) -> str | None:
    """Strict JSON text of `value` (NaN and infinities as null); None stays SQL NULL."""
    if value is None:
        return None
    try:
        return json.dumps(json_safe(value), allow_nan=False, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError) as error:
        raise ValueError(f"audit {field} is not JSON-serialisable: {error}") from None


def _json_value(text: str | None) -> Any:
    return None if text is None else json.loads(text)


def _database_url(url: str) -> URL:
    """`url` parsed, with PostgreSQL on the psycopg driver; a StoreError for anything else."""
    try:
        parsed = make_url(url)
    except Exception:  # SQLAlchemy's ArgumentError, or a ValueError on a bad port
        raise StoreError(
            f"not a database URL: {mask_url(url)!r} (expected sqlite:///PATH or postgresql://USER@HOST:PORT/DATABASE)"
        ) from None
    if parsed.drivername in ("postgresql", "postgres"):
        parsed = parsed.set(drivername="postgresql+psycopg")
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        raise StoreError(f"unsupported database {mask_url(parsed)}: dosewise keeps its audit log in SQLite or PostgreSQL")
    return parsed


def _is_sqlite_memory(url: URL) -> bool:
    return url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:")


def _set_sqlite_pragmas(dbapi_connection, _connection_record) -> None:
    """Concurrent writers from a thread pool: wait for a lock instead of failing at once (busy
    timeout first, so even the journal mode switch waits), readers beside the writer (WAL), and
    an fsync per checkpoint instead of per commit (NORMAL is still durable against crashes of
    the process in WAL mode)."""
    cursor = dbapi_connection.cursor()
    cursor.execute(f"PRAGMA busy_timeout = {SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA journal_mode = WAL")
    cursor.execute("PRAGMA synchronous = NORMAL")
    cursor.close()


def _create_engine(url: URL) -> Engine:
    masked = mask_url(url)
    try:
        if url.get_backend_name() == "sqlite":
            if _is_sqlite_memory(url):
                # One connection shared by every thread (each would otherwise see its own empty
                # database); the Store serialises its calls on it.
                engine = sa.create_engine(url, connect_args={"check_same_thread": False}, poolclass=StaticPool)
            else:
                folder = Path(url.database).absolute().parent
                if not folder.is_dir():
                    raise StoreError(f"cannot open {masked}: the folder {folder} does not exist")
                engine = sa.create_engine(
                    url,
                    connect_args={"check_same_thread": False, "timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
                    pool_size=POOL_SIZE,
                    max_overflow=POOL_MAX_OVERFLOW,
                )
            sa.event.listen(engine, "connect", _set_sqlite_pragmas)
            return engine
        connect_args = {} if "connect_timeout" in url.query else {"connect_timeout": POSTGRES_CONNECT_TIMEOUT_S}
        return sa.create_engine(url, connect_args=connect_args, pool_size=POOL_SIZE, max_overflow=POOL_MAX_OVERFLOW, pool_pre_ping=True)
    except ImportError as error:
        raise StoreError(f"cannot open {masked}: its driver is not installed ({error}); pip install 'dosewise[postgres]'") from None
    except (sa.exc.ArgumentError, sa.exc.NoSuchModuleError) as error:
        raise StoreError(f"cannot open {masked}: {error}") from None


class Store:
    """The audit log and the bearer tokens of one database; safe to share between threads."""

    def __init__(self, url: str | None = None):
        self._url = _database_url(default_db_url() if url is None else url)
        self.url = mask_url(self._url)  # safe to print: the password is ***
        self._lock = threading.RLock() if _is_sqlite_memory(self._url) else None
        self.engine = _create_engine(self._url)
        try:
            self._migrate()
        except BaseException:
            self.engine.dispose()
            raise

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def __enter__(self) -> Store:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def close(self) -> None:
        self.engine.dispose()

    def _reason(self, error: Exception) -> str:
        """The driver's first line, without the password should a driver echo it."""
        cause = error.orig if isinstance(error, sa.exc.DBAPIError) and error.orig is not None else error
        lines = str(cause).strip().splitlines()
        reason = lines[0] if lines else type(cause).__name__
        password = self._url.password
        return reason.replace(str(password), "***") if password else reason

    @contextmanager
    def _database(self, action: str, on_conflict: Callable[[], Exception] | None = None) -> Iterator[sa.Connection]:
        """One connection in one transaction, committed on success; database errors as StoreError."""
        with self._lock or nullcontext():
            try:
                with self.engine.begin() as connection:
                    yield connection
            except sa.exc.IntegrityError as error:
                if on_conflict is not None:
                    raise on_conflict() from None
                raise StoreError(f"{action} failed on {self.url}: {self._reason(error)}") from None
            except sa.exc.SQLAlchemyError as error:
                raise StoreError(f"{action} failed on {self.url}: {self._reason(error)}") from None

    def _migrate(self) -> None:
        """`alembic upgrade head`, one process at a time: SQLite's write lock or PostgreSQL's
        advisory lock is taken before Alembic looks at the schema revision. SQLite can refuse a
        fresh file's first lock at once, busy timeout or not, while another connection sets it up
        (its journal mode switch): that is retried a few times."""
        for attempt in range(MIGRATION_ATTEMPTS):
            try:
                return self._migrate_once()
            except StoreError as error:
                if "database is locked" not in str(error) or attempt == MIGRATION_ATTEMPTS - 1:
                    raise
                time.sleep(0.05 * 2**attempt)

    def _migrate_once(self) -> None:
        with self._database("opening and migrating the database") as connection:
            if connection.dialect.name == "sqlite":
                connection.exec_driver_sql("BEGIN IMMEDIATE")
            else:
                connection.execute(sa.text("SELECT pg_advisory_xact_lock(:key)"), {"key": MIGRATION_LOCK_KEY})
            try:
                command.upgrade(alembic_config(connection), "head")
            except CommandError as error:  # e.g. a revision from a newer dosewise
                raise StoreError(f"migrating {self.url} to schema {head_revision()} failed: {error}") from None

    def revision(self) -> str | None:
        """The database's schema revision (`head_revision()` once opened)."""
        with self._database("reading the schema revision") as connection:
            return MigrationContext.configure(connection).get_current_revision()

    # --- the audit log

    def append_audit(
        self,
        *,
        endpoint: str,
        method: str,
        status: int,
        model_id: str | None = None,
        model_hash: str | None = None,
        token_name: str | None = None,
        client: str | None = None,
        request: Any = None,
        response: Any = None,
        duration_ms: float,
        time: datetime | None = None,
    ) -> int:
        """Record one request; returns its id. `request` and `response` are JSON values (NaN and
        infinities become null); `time` defaults to now, a naive one is taken as UTC."""
        if not isinstance(status, int) or isinstance(status, bool):
            raise ValueError(f"audit status must be an int HTTP status, got {status!r}")
        if not isinstance(duration_ms, int | float) or not math.isfinite(duration_ms) or duration_ms < 0:
            raise ValueError(f"audit duration_ms must be a finite number of milliseconds >= 0, got {duration_ms!r}")
        row = dict(
            time=datetime.now(UTC) if time is None else as_utc(time),
            endpoint=str(endpoint),
            method=str(method).upper(),
            status=status,
            model_id=model_id,
            model_hash=model_hash,
            token_name=token_name,
            client=client,
            request=_json_text(request, "request"),
            response=_json_text(response, "response"),
            duration_ms=float(duration_ms),
        )
        with self._database(f"appending to the audit log ({endpoint})") as connection:
            return int(connection.execute(audit_log.insert().values(**row)).inserted_primary_key[0])

    @staticmethod
    def _audit_filters(
        model_id: str | None, token_name: str | None, since: datetime | None, until: datetime | None, endpoint: str | None
    ) -> list:
        conditions = []
        if model_id is not None:
            conditions.append(audit_log.c.model_id == model_id)
        if token_name is not None:
            conditions.append(audit_log.c.token_name == token_name)
        if since is not None:
            conditions.append(audit_log.c.time >= as_utc(since))
        if until is not None:
            conditions.append(audit_log.c.time < as_utc(until))
        if endpoint is not None:
            conditions.append(audit_log.c.endpoint == endpoint)
        return conditions

    def audit(
        self,
        *,
        model_id: str | None = None,
        token_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        endpoint: str | None = None,
        limit: int = 100,
        offset: int = 0,
    ) -> list[AuditEntry]:
        """Entries newest first; every given filter must hold. The time range is half-open,
        since <= time < until, so consecutive ranges never count an entry twice."""
        if not isinstance(limit, int) or limit < 0:
            raise ValueError(f"audit limit must be an int >= 0, got {limit!r}")
        if not isinstance(offset, int) or offset < 0:
            raise ValueError(f"audit offset must be an int >= 0, got {offset!r}")
        query = (
            sa.select(audit_log)
            .where(*self._audit_filters(model_id, token_name, since, until, endpoint))
            .order_by(audit_log.c.time.desc(), audit_log.c.id.desc())
            .limit(limit)
            .offset(offset)
        )
        with self._database("reading the audit log") as connection:
            rows = connection.execute(query).all()
        return [
            AuditEntry(
                id=int(row.id),
                time=row.time,
                endpoint=row.endpoint,
                method=row.method,
                status=row.status,
                model_id=row.model_id,
                model_hash=row.model_hash,
                token_name=row.token_name,
                client=row.client,
                request=_json_value(row.request),
                response=_json_value(row.response),
                duration_ms=float(row.duration_ms),
            )
            for row in rows
        ]

    def count_audit(
        self,
        *,
        model_id: str | None = None,
        token_name: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        endpoint: str | None = None,
    ) -> int:
        """How many entries `audit` finds with the same filters, ignoring limit and offset."""
        query = sa.select(sa.func.count()).select_from(audit_log).where(*self._audit_filters(model_id, token_name, since, until, endpoint))
        with self._database("counting the audit log") as connection:
            return int(connection.execute(query).scalar_one())

    # --- bearer tokens

    def create_token(self, name: str) -> str:
        """A new token named `name`; the plaintext is returned this once, only its SHA-256 is kept."""
        check_token_name(name)
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        duplicate = lambda: DuplicateTokenError(
            f"a token named {name!r} exists already (revoked tokens keep their name); choose another name"
        )
        with self._database(f"creating token {name!r}", on_conflict=duplicate) as connection:
            if connection.execute(sa.select(tokens_table.c.id).where(tokens_table.c.name == name)).first() is not None:
                raise duplicate()
            connection.execute(
                tokens_table.insert().values(
                    name=name, sha256=token_sha256(token), prefix=token[:TOKEN_PREFIX_LENGTH], created=datetime.now(UTC)
                )
            )
        return token

    def token_name(self, token: str) -> str | None:
        """The name of the active token `token`, else None. The database is searched by the
        token's clear prefix only; hashes are compared in constant time."""
        if not isinstance(token, str) or not 0 < len(token) <= MAX_TOKEN_LENGTH:
            return None
        digest = token_sha256(token)
        query = sa.select(tokens_table.c.name, tokens_table.c.sha256).where(
            tokens_table.c.prefix == token[:TOKEN_PREFIX_LENGTH], tokens_table.c.revoked.is_(None)
        )
        with self._database("checking a token") as connection:
            candidates = connection.execute(query).all()
        name = None
        for candidate in candidates:  # every candidate compared, so the time doesn't tell which matched
            if hmac.compare_digest(candidate.sha256, digest):
                name = candidate.name
        return name

    def has_tokens(self) -> bool:
        """Whether any token is active (a server without one may run open, on loopback only)."""
        query = sa.select(tokens_table.c.id).where(tokens_table.c.revoked.is_(None)).limit(1)
        with self._database("checking for tokens") as connection:
            return connection.execute(query).first() is not None

    def tokens(self, include_revoked: bool = False) -> list[TokenInfo]:
        """Active tokens (and revoked ones with `include_revoked`), oldest first."""
        query = sa.select(tokens_table).order_by(tokens_table.c.created, tokens_table.c.id)
        if not include_revoked:
            query = query.where(tokens_table.c.revoked.is_(None))
        with self._database("listing tokens") as connection:
            rows = connection.execute(query).all()
        return [TokenInfo(name=row.name, created=row.created, prefix=row.prefix, revoked=row.revoked) for row in rows]

    def revoke_token(self, name: str) -> bool:
        """Mark the token revoked (it is kept, with its name); False if no active token has that name."""
        query = tokens_table.update().where(tokens_table.c.name == name, tokens_table.c.revoked.is_(None)).values(revoked=datetime.now(UTC))
        with self._database(f"revoking token {name!r}") as connection:
            return connection.execute(query).rowcount == 1
