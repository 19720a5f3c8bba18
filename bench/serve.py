"""What the decision-support API costs per request: POST /v1/vancomycin/recommend against a bare
FastAPI endpoint on the same server, under concurrent load, and whether every request kept its audit row.

    python bench/serve.py [--run runs/demo/iql] [--requests 2000] [--concurrency 16] [--quick] [--json OUT]

The server is the real app (`build_app` over the run, a SQLite audit log in a temp folder, auth off
on loopback) under uvicorn in its own process, plus one extra route, GET /bench/bare -> {"ok": true},
with no auth and no audit: FastAPI's own floor. Both are sync endpoints, so both pay the same hop to
the thread pool. The load comes from this process: `--concurrency` clients (one httpx.AsyncClient
with that many connections) send `--requests` requests to each endpoint after a warm-up; latency is
the client's, from sending to the whole answer read. Afterwards the audit log must hold one row per
recommend request (warm-up included) and every answer's X-Audit-Id must be distinct. Prints a table
and writes JSON (default bench/results/serve.json; a --quick smoke run writes none unless --json).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from importlib.metadata import version
from pathlib import Path

import numpy as np

from dosewise.data.schema import EXAMPLE_STATE

DEFAULT_RUN = Path("runs/demo/iql")
DEFAULT_JSON = Path(__file__).parent / "results" / "serve.json"
RECOMMEND = "/v1/vancomycin/recommend"
BARE = "/bench/bare"
STATE = dict(EXAMPLE_STATE)  # a state inside every physiological range, 13 features
QUICK_REQUESTS = 200
SERVER_START_TIMEOUT_S = 120  # loading the run and migrating the audit database


# -- the server (its own process) -----------------------------------------------------------------


def serve_worker(run: str, db: str, torch_threads: int | None) -> None:
    """The real app plus the bare route, on a loopback port this process binds and prints first."""
    import torch
    import uvicorn

    from dosewise.serve.server import build_app

    if torch_threads is not None:
        torch.set_num_threads(torch_threads)

    app = build_app([run], db, host="127.0.0.1")

    @app.get(BARE, include_in_schema=False)
    def bare() -> dict[str, bool]:
        return {"ok": True}

    # proto IPPROTO_TCP, not 0: asyncio sets TCP_NODELAY only on such sockets, as uvicorn's own binding gets them;
    # without it Nagle holds each answer's body back ~40 ms behind its headers.
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    print(f"PORT {listener.getsockname()[1]} TORCH_THREADS {torch.get_num_threads()}", flush=True)
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False)
    try:
        uvicorn.Server(config).run(sockets=[listener])
    finally:
        app.state.store.close()


@contextlib.contextmanager
def running_server(run: Path, db: str, torch_threads: int | None):
    """The server process for `run`; yields it (its pid, URL and torch threads), stops it on exit."""
    threads = [] if torch_threads is None else ["--torch-threads", str(torch_threads)]
    server = subprocess.Popen(
        [sys.executable, __file__, "--serve-worker", "--run", str(run), "--db", db, *threads], stdout=subprocess.PIPE, text=True
    )
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        line = server.stdout.readline() if server.stdout else ""
        if not line.startswith("PORT "):
            raise RuntimeError(f"the server did not start (exit code {server.poll()}); its errors are above")
        words = line.split()
        url = f"http://127.0.0.1:{int(words[1])}"
        wait_until_healthy(url, deadline, server)
        yield Server(pid=server.pid, url=url, torch_threads=int(words[3]))
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()


def wait_until_healthy(url: str, deadline: float, server: subprocess.Popen) -> None:
    import httpx

    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode} while starting")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {SERVER_START_TIMEOUT_S} s")


@dataclass(frozen=True)
class Server:
    pid: int
    url: str
    torch_threads: int


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of process `pid`, all its threads (Linux /proc); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime: fields 14 and 15 of stat(5)


# -- the load -------------------------------------------------------------------------------------


@dataclass
class Load:
    """One endpoint's timed requests."""

    latencies_s: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)  # "status N" or the exception's type, per failed request
    audit_ids: list[int] = field(default_factory=list)
    wall_s: float = 0.0
    server_cpu_s: float | None = None  # the server process's CPU time over the phase

    def summary(self) -> dict[str, float | int | None]:
        ms = np.asarray(self.latencies_s) * 1000.0
        cpu_ms = None if self.server_cpu_s is None else round(self.server_cpu_s * 1000.0 / len(self.latencies_s), 3)
        return {
            "rps": round(len(self.latencies_s) / self.wall_s, 1),
            "p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "mean_ms": round(float(ms.mean()), 2),
            "max_ms": round(float(ms.max()), 2),
            "errors": len(self.errors),
            "server_cpu_ms_per_request": cpu_ms,  # what a request costs the server, whatever else shares the machine
        }


def timed(server: Server, method: str, path: str, body: dict | None, requests: int, concurrency: int) -> Load:
    cpu_before = cpu_seconds(server.pid)
    load = asyncio.run(send_all(server.url, method, path, body, requests, concurrency))
    cpu_after = cpu_seconds(server.pid)
    if cpu_before is not None and cpu_after is not None:
        load.server_cpu_s = cpu_after - cpu_before
    return load


async def send_all(url: str, method: str, path: str, body: dict | None, requests: int, concurrency: int) -> Load:
    """`requests` requests from `concurrency` clients, each sending its next one when its last is answered."""
    import httpx

    load = Load()
    remaining = iter(range(requests))
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as client:

        async def one_client() -> None:
            for _ in remaining:  # the iterator is shared: together the clients send exactly `requests`
                started = time.perf_counter()
                try:
                    response = await client.request(method, path, json=body)
                except httpx.HTTPError as error:
                    load.errors.append(type(error).__name__)
                    continue
                load.latencies_s.append(time.perf_counter() - started)
                if response.status_code != 200:
                    load.errors.append(f"status {response.status_code}")
                if "x-audit-id" in response.headers:
                    load.audit_ids.append(int(response.headers["x-audit-id"]))

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        load.wall_s = time.perf_counter() - started
    return load


# -- the report -----------------------------------------------------------------------------------


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError, StopIteration):
        cpu = next(
            line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")
        )
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        **{name: version(name) for name in ("torch", "fastapi", "uvicorn", "httpx", "sqlalchemy")},
        "load_avg_at_start": [round(value, 2) for value in os.getloadavg()],
    }


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    title = f"{result['requests']} requests per endpoint, {result['concurrency']} concurrent clients, server torch threads {result['server_torch_threads']}"
    table = Table(title=title, caption=f"recommend: POST {RECOMMEND}; bare: GET {BARE} (no auth, no audit)")
    for column in ("endpoint", "req/s", "p50 ms", "p99 ms", "server CPU ms/req", "errors"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")

    def cpu(value: float | None, digits: int) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for name in ("recommend", "bare"):
        row = result[name]
        table.add_row(
            name,
            f"{row['rps']:.1f}",
            f"{row['p50_ms']:.2f}",
            f"{row['p99_ms']:.2f}",
            cpu(row["server_cpu_ms_per_request"], 2),
            str(row["errors"]),
        )
    ratio = result["ratio"]
    table.add_row(
        "recommend / bare", f"{ratio['rps']:.3f}", f"{ratio['p50_ms']:.1f}", f"{ratio['p99_ms']:.1f}", cpu(ratio["server_cpu"], 1), ""
    )
    console = Console(width=max(100, Console().width))
    console.print(table)
    console.print(
        f"audit rows for {RECOMMEND}: {result['audit_rows']} (expected {result['expected_audit_rows']}, "
        f"lost {result['lost_audit_rows']}); distinct X-Audit-Id: {result['distinct_audit_ids']}"
    )


def ratio_or_none(numerator: float | None, denominator: float | None) -> float | None:
    return None if numerator is None or not denominator else round(numerator / denominator, 2)


def bench(run: Path, requests: int, concurrency: int, warmup: int, torch_threads: int | None = 1) -> dict:
    from dosewise.algos.trained import TrainedIQL
    from dosewise.serve.store import Store

    with tempfile.TemporaryDirectory(prefix="dosewise-bench-serve-") as folder:
        db = f"sqlite:///{Path(folder) / 'audit.db'}"
        machine_info = machine()  # before the load, so its load average is the machine's own
        with running_server(run, db, torch_threads) as server:
            body = {"state": {name: STATE[name] for name in TrainedIQL.load(run).feature_names}}
            for method, path, payload in (("POST", RECOMMEND, body), ("GET", BARE, None)):
                warm = timed(server, method, path, payload, warmup, concurrency)
                if warm.errors:
                    raise RuntimeError(f"warm-up of {path} failed: {warm.errors[:5]}")
            recommend = timed(server, "POST", RECOMMEND, body, requests, concurrency)
            bare = timed(server, "GET", BARE, None, requests, concurrency)
        with Store(db) as store:  # the server has exited: every row it wrote is committed
            audit_rows = store.count_audit(endpoint=RECOMMEND)
            other_rows = store.count_audit() - audit_rows
    expected = warmup + requests
    summary = {"recommend": recommend.summary(), "bare": bare.summary()}
    return {
        "requests": requests,
        "concurrency": concurrency,
        "warmup": warmup,
        "run": run.name,
        "server_torch_threads": server.torch_threads,
        **summary,
        "ratio": {
            "rps": round(summary["recommend"]["rps"] / summary["bare"]["rps"], 4),
            "p50_ms": round(summary["recommend"]["p50_ms"] / summary["bare"]["p50_ms"], 2),
            "p99_ms": round(summary["recommend"]["p99_ms"] / summary["bare"]["p99_ms"], 2),
            "server_cpu": ratio_or_none(summary["recommend"]["server_cpu_ms_per_request"], summary["bare"]["server_cpu_ms_per_request"]),
        },
        "audit_rows": audit_rows,
        "expected_audit_rows": expected,
        "lost_audit_rows": expected - audit_rows,
        "other_audit_rows": other_rows,
        "distinct_audit_ids": len(set(recommend.audit_ids)),
        "machine": machine_info,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=DEFAULT_RUN, help="Trained IQL run directory (default runs/demo/iql).")
    parser.add_argument("--requests", type=int, default=2000, help="Timed requests per endpoint.")
    parser.add_argument("--concurrency", type=int, default=16, help="Concurrent clients.")
    parser.add_argument(
        "--warmup", type=int, default=None, help="Untimed requests per endpoint first (default: 10%% of --requests, at least 20)."
    )
    parser.add_argument("--quick", action="store_true", help=f"A smoke run: {QUICK_REQUESTS} requests per endpoint.")
    parser.add_argument("--json", type=Path, default=None, help=f"Where to write the result (default {DEFAULT_JSON}; --quick writes none).")
    parser.add_argument(
        "--torch-threads", type=int, default=1, help="torch threads of the server (default 1: the `dosewise` command sets one)."
    )
    parser.add_argument("--serve-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--db", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_worker:
        serve_worker(str(args.run), args.db, args.torch_threads)
        return 0
    if not (args.run / "model.pt").is_file():
        print(
            f"error: {args.run} is not a trained run (no model.pt). Make one with `dosewise demo` (writes runs/demo/iql), or pass --run RUN."
        )
        return 2
    requests = QUICK_REQUESTS if args.quick else args.requests
    if requests < 1 or args.concurrency < 1:
        parser.error("--requests and --concurrency must be at least 1")
    warmup = args.warmup if args.warmup is not None else max(20, requests // 10)
    result = {**bench(args.run, requests, args.concurrency, warmup, args.torch_threads), "quick": args.quick}
    print_table(result)
    out = args.json if args.json is not None else None if args.quick else DEFAULT_JSON
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    failures = []
    if result["lost_audit_rows"] != 0:
        failures.append(f"{result['lost_audit_rows']} recommend requests have no audit row")
    if result["distinct_audit_ids"] != requests:
        failures.append(f"{requests} recommend answers carried {result['distinct_audit_ids']} distinct X-Audit-Id")
    if result["recommend"]["errors"] or result["bare"]["errors"]:
        failures.append(f"errors: recommend {result['recommend']['errors']}, bare {result['bare']['errors']}")
    for failure in failures:
        print(f"FAILED: {failure}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
