"""Starting the service: load the runs, open the audit database, refuse an open door, run uvicorn."""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Sequence
from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from dosewise.config import ConfigError
from dosewise.serve.app import create_app
from dosewise.serve.registry import load_models
from dosewise.serve.service import Service
from dosewise.serve.store import Store

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "::1", "[::1]")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def build_app(runs: Sequence[str | Path], db: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The app for `runs` with the audit log and tokens at `db` (default $DOSEWISE_HOME/serve.db).

    Without any token, auth is off, which only loopback may serve: a ConfigError otherwise."""
    models = load_models(list(runs))
    store = Store(db)
    if not is_loopback(host) and not store.has_tokens():
        store.close()
        raise ConfigError(
            f"refusing to serve on {host} with no token: anyone on the network could ask for recommendations. "
            "Create one with `dosewise serve token create NAME` (same --db), or serve on 127.0.0.1"
        )
    app = create_app(Service(models), store)
    if is_loopback(host):
        # A page on another site that resolves its own name to 127.0.0.1 (DNS rebinding) would
        # reach a loopback server, auth off or not: only requests addressed to loopback are served.
        app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(LOOPBACK_NAMES))
    app.state.host = host
    return app


def serve(
    runs: Sequence[str | Path],
    host: str = "127.0.0.1",
    port: int = 8000,
    db: str | None = None,
    log_level: str = "info",
    echo: Callable[[str], object] = print,
) -> None:
    """Serve until interrupted; `echo` says where, once the runs and the database are open."""
    import uvicorn

    app = build_app(runs, db, host)
    auth = "on" if app.state.store.has_tokens() else "off (no token; loopback only)"
    echo(
        f"serving {', '.join(app.state.service.models)} on http://{host}:{port}: page /, API /v1, docs /docs; auth {auth}; audit log {app.state.store.url}"
    )
    try:
        uvicorn.run(app, host=host, port=port, log_level=log_level, server_header=False)
    finally:
        app.state.store.close()
