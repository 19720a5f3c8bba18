"""A throwaway PostgreSQL server for the tests: Debian's binaries, a data folder in a temp dir,
trust auth for one user, listening on a free loopback port only.

initdb and pg_ctl refuse to run as root, so as root the server runs as the `postgres` system user
(which Debian's package creates); none is created here.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import psycopg

POSTGRES_BIN_GLOB = "/usr/lib/postgresql/*/bin"
SERVER_USER = "postgres"  # the system user that runs the server when the tests run as root
DB_USER = "dosewise"
START_TIMEOUT_S = 60


class PostgresUnavailable(RuntimeError):
    """This machine can't run a test server (no binaries, or root without a `postgres` user)."""


def postgres_bin_dir() -> Path | None:
    """The newest /usr/lib/postgresql/<version>/bin holding initdb and pg_ctl."""

    def version(folder: Path) -> tuple[int, ...]:
        return tuple(int(part) for part in re.findall(r"\d+", folder.parent.name)) or (0,)

    folders = [Path(folder) for folder in Path("/").glob(POSTGRES_BIN_GLOB.lstrip("/"))]
    folders = [folder for folder in folders if (folder / "initdb").is_file() and (folder / "pg_ctl").is_file()]
    return max(folders, key=version) if folders else None


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


class PostgresServer:
    """`start()` initialises and starts a server; `stop()` stops it and removes its files."""

    def __init__(self) -> None:
        bin_dir = postgres_bin_dir()
        if bin_dir is None:
            raise PostgresUnavailable(f"PostgreSQL's initdb and pg_ctl not found in {POSTGRES_BIN_GLOB} (apt-get install postgresql)")
        self.bin_dir = bin_dir
        self.run_as: str | None = None
        if os.geteuid() == 0:
            try:
                pwd.getpwnam(SERVER_USER)
            except KeyError:
                raise PostgresUnavailable(f"running as root and no {SERVER_USER!r} system user to run PostgreSQL as") from None
            self.run_as = SERVER_USER
        self.root: Path | None = None
        self.port: int | None = None

    @property
    def data_dir(self) -> Path:
        assert self.root is not None, "server not started"
        return self.root / "data"

    def _run(self, *args: str) -> subprocess.CompletedProcess:
        command = [str(self.bin_dir / args[0]), *args[1:]]
        as_user = {}
        if self.run_as is not None:  # the user's own group and no others, not root's
            as_user = dict(user=self.run_as, group=pwd.getpwnam(self.run_as).pw_gid, extra_groups=[])
        result = subprocess.run(
            command, cwd=self.root, capture_output=True, text=True, timeout=START_TIMEOUT_S, env={**os.environ, "LC_ALL": "C"}, **as_user
        )
        if result.returncode != 0:
            log = self.root / "server.log" if self.root else None
            log_text = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise RuntimeError(f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}{result.stderr}{log_text}")
        return result

    def start(self) -> None:
        # As root, straight in /tmp: the server's user must reach it, and pytest's temp folders
        # (or a TMPDIR) may be private to root. Short, too: the unix socket's path is limited to 107 bytes.
        self.root = Path(tempfile.mkdtemp(prefix="dosewise-pg-", dir="/tmp" if self.run_as else None))
        if self.run_as is not None:
            os.chown(self.root, pwd.getpwnam(self.run_as).pw_uid, pwd.getpwnam(self.run_as).pw_gid)
        try:
            self._run("initdb", "-D", str(self.data_dir), "-U", DB_USER, "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync")
            for attempt in range(3):  # a free port may be taken by someone else before the server binds it
                self.port = free_port()
                options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root} -c fsync=off -c full_page_writes=off"
                try:
                    self._run("pg_ctl", "-D", str(self.data_dir), "-l", str(self.root / "server.log"), "-o", options, "-w", "start")
                    break
                except RuntimeError:
                    if attempt == 2:
                        raise
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        if self.root is None:
            return
        try:
            if (self.data_dir / "postmaster.pid").exists():
                self._run("pg_ctl", "-D", str(self.data_dir), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def url(self, database: str) -> str:
        return f"postgresql://{DB_USER}@127.0.0.1:{self.port}/{database}"


def create_database(server_url: str, name: str) -> str:
    """Create database `name` on the server of `server_url`; returns its URL."""
    if re.fullmatch(r"[a-z_][a-z0-9_]{0,62}", name) is None:
        raise ValueError(f"database name {name!r} is not a plain lowercase identifier")
    base, _, _ = server_url.rpartition("/")
    with psycopg.connect(f"{base}/postgres", autocommit=True) as connection:
        connection.execute(f"CREATE DATABASE {name}")
    return f"{base}/{name}"
