"""`dosewise serve` as a user starts it: a real process on a loopback port, the SQLite audit log
in $DOSEWISE_HOME, the page and the API answering, and an open door refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import httpx
import pytest
from typer.testing import CliRunner

from dosewise.cli import app
from dosewise.serve.store import Store
from tests.serve.fixtures import STATE


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_serve_command_serves_the_page_and_the_api_with_the_sqlite_default(iql_run, tmp_path):
    home, port = tmp_path / "home", free_port()
    env = {**os.environ, "DOSEWISE_HOME": str(home)}
    command = [sys.executable, "-m", "dosewise.cli", "serve", "--run", str(iql_run), "--port", str(port)]
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stdout.read()
            assert time.monotonic() < deadline, "the server did not answer /health within 90 s"
            time.sleep(0.3)
        page = httpx.get(f"{base}/", timeout=10)
        assert page.status_code == 200 and "Authentication is off" in page.text and "vanco_level" in page.text
        answer = httpx.post(f"{base}/v1/vancomycin/recommend", json={"state": STATE}, timeout=30)
        assert answer.status_code == 200 and answer.json()["model"] == "iql"
        assert httpx.get(f"{base}/docs", timeout=10).status_code == 200
        assert httpx.get(f"{base}/health", headers={"Host": "rebinding.example"}, timeout=10).status_code == 400
    finally:
        server.send_signal(signal.SIGINT)
        output, _ = server.communicate(timeout=30)
    assert server.returncode == 0, output
    assert f"serving iql on http://127.0.0.1:{port}" in output
    with Store(f"sqlite:///{home / 'serve.db'}") as store:  # the default database, where the request was audited
        rows = store.audit(endpoint="/v1/vancomycin/recommend")
        assert [row.status for row in rows] == [200] and rows[0].id == answer.json()["audit_id"]


def test_serve_refuses_a_network_address_without_a_token(iql_run, tmp_path):
    db = f"sqlite:///{tmp_path / 'serve.db'}"
    runner = CliRunner()
    refused = runner.invoke(app, ["serve", "--run", str(iql_run), "--host", "0.0.0.0", "--db", db])
    assert refused.exit_code == 2 and "refusing to serve on 0.0.0.0 with no token" in refused.output
    created = runner.invoke(app, ["serve", "token", "create", "ward-3", "--db", db])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[-1]
    with Store(db) as store:
        assert store.token_name(token) == "ward-3"
    listed = runner.invoke(app, ["serve", "token", "list", "--db", db])
    assert "ward-3" in listed.output and token not in listed.output
    again = runner.invoke(app, ["serve", "token", "create", "ward-3", "--db", db])
    assert again.exit_code == 2 and "exists already" in again.output
    revoked = runner.invoke(app, ["serve", "token", "revoke", "ward-3", "--db", db])
    assert revoked.exit_code == 0 and Store(db).token_name(token) is None


def test_serve_names_a_run_that_is_not_there(tmp_path):
    result = CliRunner().invoke(app, ["serve", "--run", str(tmp_path / "nope"), "--db", f"sqlite:///{tmp_path / 'serve.db'}"])
    assert result.exit_code == 2 and "nope: not a run directory" in result.output and "Traceback" not in result.output
