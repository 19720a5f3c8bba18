"""IQL gradient steps per second: ours vs d3rlpy 2.8.1, same data, same hyperparameters, one thread.

    python bench/iql_vs_d3rlpy.py [--quick] [--json bench/results/iql_vs_d3rlpy.json]

Data: 150 simulated vancomycin patients (`simulate_dataset(150, 0)` -> `load_transitions`), states
normalised the way `train_iql` does. Configs: hidden [32, 32] with batch 64, and [256, 256] with
batch 256; the conservative defaults' lr 3e-5, gamma 0.9, beta 0.5, tau 0.7, Polyak 0.005 for both libraries.

Every measurement is its own subprocess (so peak memory is per run, and one library's imports
or allocator state never slow the other), all of them with glibc keeping freed memory
(`dosewise.allocator.ENVIRONMENT`, what the `dosewise` CLI sets for itself; it speeds up our
64-member ensembles 1.26-1.36x and leaves d3rlpy as it is: `bench/allocator.py`), torch runs on one thread in all of them, the runs
alternate between the libraries, and the median of the repeats is reported. Two things are
measured, in the same run:

**Update loop** (``ours_steps_per_s``, ``d3rlpy_steps_per_s``, ``ratio``; the keys the speed targets are stated in). A
run builds everything, takes a few warm-up steps, then times ``--steps`` gradient steps of each
library's bare loop body: minibatch sampling plus one update, i.e. d3rlpy's
``sample_transition_batch`` + ``update`` and ours the `train_iql` loop body (`sample` + `update`,
metrics read back every 50 steps), with no files, logging or progress bar. Peak memory is the
process's maximum resident set size (imports included: that is what a training process costs).
Ours runs twice, eager (the default) and with ``--compile`` (torch.compile; its compile time is
reported apart, as ``compile_s``).

**Training loop as users run it** (``ours_fit_steps_per_s``, ``d3rlpy_fit_steps_per_s``,
``fit_ratio``): the same number of steps through each library's own training entry point with
its defaults, timed as one wall-clock interval around the whole call (building the networks,
every step, logging, checkpoints, the final save: nothing subtracted). The call's output goes to
a pseudo-terminal, so both progress bars render as they do in a user's terminal.

* d3rlpy: ``algo.fit(dataset, n_steps=S, n_steps_per_epoch=min(S, 1000),
  experiment_name="IQL", with_timestamp=False,
  logger_adapter=FileAdapterFactory(root_dir=<temp dir>))``. Only these are set:
  ``n_steps_per_epoch`` because fit's default (10000) exceeds S and fit would then take no step
  at all (1000 is what d3rlpy's own IQL reproduction script uses); the logger is d3rlpy's default
  adapter (CSV metrics + ``params.json``) pointed into a temp dir instead of ``./d3rlpy_logs``,
  and ``with_timestamp=False`` only names that directory. Everything else is fit's default:
  ``show_progress=True`` (tqdm), ``logging_strategy=EPOCH`` (every step's metrics buffered, CSVs
  written per epoch), ``save_interval=1`` (the model saved at every epoch's end), per-step timers.
  ``d3rlpy_fit_setup_s`` (before the call: the MDPDataset and ``IQLConfig(...).create()``) is
  reported apart.
* ours: `dosewise.algos.training.train_iql` (the function behind ``dosewise train iql``) with
  ``IQLRunConfig``'s defaults besides the hyperparameters and S: TensorBoard every
  ``log_every=50`` steps, a resumable checkpoint every ``checkpoint_every=500``, the rich progress
  bar, ``config.yaml``, ``losses.json`` and ``model.pt``, into a temp dir.
  ``ours_fit_setup_s`` (before the call: loading the CSV into transitions) is reported apart.

``*_fit_build_s`` is the part of the call spent building the networks and optimisers (d3rlpy's
``create_impl``, our ``IQL(...)``; timed by wrapping that one call, nothing per step). It is large
for d3rlpy (~1 s): its first ``torch.optim.Adam`` imports ``torch._dynamo``, a one-off cost per
process that weighs more the fewer steps a run takes. ``*_fit_steps_per_s_excl_build`` and
``fit_ratio_excl_build`` take it out; ``*_fit_steps_per_s`` and ``fit_ratio`` keep everything.

Imports (``import d3rlpy``; ``torch.utils.tensorboard``, which `train_iql` imports lazily) happen
before the clock starts for both. The d3rlpy dataset holds the normalised states (as in the update
loop), so both libraries do the same network work per step.

The ensemble lines train K seeds in one process (``IQL(..., seeds=range(K))``; for the training
loop ``train_iql(..., seeds=range(K))``, i.e. ``dosewise train iql --seeds K``) and report
seed-steps/s (K x steps/s): ``ratio_vs_d3rlpy`` against d3rlpy's update loop at [32, 32] / 64,
``fit_ratio_vs_d3rlpy`` against d3rlpy's ``fit`` there. ``ensemble`` repeats the first of them.

``--quick`` is a smoke test, not a measurement: fewer steps, one repeat, and no torch.compile runs
(their keys are null).

d3rlpy is a `bench` extra only (``pip install -e ".[bench]"``); the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from dosewise.allocator import ENVIRONMENT as ALLOCATOR_ENVIRONMENT

CONFIGS = (((32, 32), 64), ((256, 256), 256))
HYPER = {"lr": 3e-5, "gamma": 0.90, "beta": 0.5, "tau": 0.7, "polyak": 0.005, "max_weight": 100.0}
WARMUP = 20
LOG_EVERY = 50  # train.log_every's default: our loop waits for the device only then
STEPS_PER_EPOCH = 1000  # d3rlpy fit's n_steps_per_epoch (at most S), as in d3rlpy's IQL reproduction script
RESULT_ENV = "IQL_BENCH_RESULT"  # a worker on a pseudo-terminal writes its JSON result to this file


def _data(path: str):
    from dosewise.data import DataConfig, load_transitions
    from dosewise.data.transitions import Normalizer

    transitions, _ = load_transitions(path, DataConfig())
    return transitions, Normalizer.fit(transitions.observations)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def _iql_config(hidden: tuple[int, ...], batch: int):
    from dosewise.algos.iql import IQLConfig

    return IQLConfig(
        hidden=hidden,
        batch_size=batch,
        lr=HYPER["lr"],
        gamma=HYPER["gamma"],
        beta=HYPER["beta"],
        tau=HYPER["tau"],
        polyak=HYPER["polyak"],
        max_weight=HYPER["max_weight"],
    )


def run_ours(path: str, hidden: tuple[int, ...], batch: int, steps: int, members: int = 1, compile: bool = False) -> dict:
    import torch

    from dosewise.algos.iql import IQL
    from dosewise.algos.training import data_tensors, log_values, sample

    torch.set_num_threads(1)
    transitions, normalizer = _data(path)
    data = data_tensors(transitions, normalizer)
    seeds = list(range(members))
    learner = IQL(data.obs.shape[1], 1, _iql_config(hidden, batch), seeds=seeds, compile=compile)
    samplers = [torch.Generator().manual_seed(s) for s in seeds]

    def train(first: int, last: int) -> None:  # the body of train_iql's loop, without its files
        for step in range(first, last + 1):
            metrics = learner.update(sample(data, samplers, batch))
            if step % LOG_EVERY == 0:
                log_values(metrics, seeds)

    start = time.perf_counter()
    train(1, WARMUP)  # compiles, when asked to
    warmup_s = time.perf_counter() - start
    start = time.perf_counter()
    train(WARMUP + 1, WARMUP + steps)
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "peak_mb": _peak_mb(), "warmup_s": warmup_s}


def _d3rlpy_setup(path: str, hidden: tuple[int, ...], batch: int):
    """The MDPDataset (normalised states, as ours trains on) and an unbuilt d3rlpy IQL."""
    import d3rlpy

    transitions, normalizer = _data(path)
    dataset = d3rlpy.dataset.MDPDataset(
        observations=normalizer.normalize(transitions.observations).astype(np.float32),
        actions=transitions.actions.astype(np.float32),
        rewards=transitions.rewards.astype(np.float32),
        terminals=transitions.dones.astype(np.float32),
        action_space=d3rlpy.ActionSpace.CONTINUOUS,
    )
    encoder = d3rlpy.models.VectorEncoderFactory(hidden_units=list(hidden))
    algo = d3rlpy.algos.IQLConfig(
        actor_learning_rate=HYPER["lr"],
        critic_learning_rate=HYPER["lr"],
        batch_size=batch,
        gamma=HYPER["gamma"],
        tau=HYPER["polyak"],
        expectile=HYPER["tau"],
        weight_temp=HYPER["beta"],
        max_weight=HYPER["max_weight"],
        actor_encoder_factory=encoder,
        critic_encoder_factory=encoder,
        value_encoder_factory=encoder,
    ).create(device=False)
    return dataset, algo


def run_d3rlpy(path: str, hidden: tuple[int, ...], batch: int, steps: int) -> dict:
    import torch

    torch.set_num_threads(1)
    dataset, algo = _d3rlpy_setup(path, hidden, batch)
    algo.build_with_dataset(dataset)
    for _ in range(WARMUP):
        algo.update(dataset.sample_transition_batch(batch))
    start = time.perf_counter()
    for _ in range(steps):  # the body of d3rlpy's fit loop
        algo.update(dataset.sample_transition_batch(batch))
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "peak_mb": _peak_mb()}


def _time_calls(owner, name: str) -> list[float]:
    """Wraps ``owner.name`` (called once per run, never per step) so each call's seconds are appended to the returned list."""
    inner, seconds = getattr(owner, name), []

    def timed(*args, **kwargs):
        start = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            seconds.append(time.perf_counter() - start)

    setattr(owner, name, timed)
    return seconds


def run_ours_fit(path: str, hidden: tuple[int, ...], batch: int, steps: int, members: int = 1) -> dict:
    """`train_iql` (what `dosewise train iql [--seeds K]` runs) with the repo's defaults, into a temp dir."""
    import torch
    import torch.utils.tensorboard  # train_iql imports it lazily; imports are off the clock for both

    from dosewise.algos import training
    from dosewise.algos.config import IQLRunConfig, TrainConfig
    from dosewise.algos.training import train_iql
    from dosewise.data import DataConfig, load_transitions

    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        transitions, _ = load_transitions(path, DataConfig())
        run = IQLRunConfig(iql=_iql_config(hidden, batch), train=TrainConfig(steps=steps), data_path=path)
        setup_s = time.perf_counter() - start
        assert (run.train.threads, run.train.log_every, run.train.checkpoint_every) == (1, 50, 500)
        build_s = _time_calls(training, "IQL")  # the learner's construction inside train_iql
        start = time.perf_counter()
        train_iql(run, transitions, Path(tmp) / "run", seeds=list(range(members)))  # show_progress: its default, on
        seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "fit_s": seconds, "build_s": sum(build_s), "setup_s": setup_s, "peak_mb": _peak_mb()}


def run_d3rlpy_fit(path: str, hidden: tuple[int, ...], batch: int, steps: int) -> dict:
    """d3rlpy's ``fit`` with its defaults, its file logger pointed into a temp dir."""
    import d3rlpy
    import torch

    torch.set_num_threads(1)
    per_epoch = min(steps, STEPS_PER_EPOCH)
    if steps % per_epoch:
        raise ValueError(f"fit would take {steps // per_epoch * per_epoch} steps, not {steps}: use a multiple of {per_epoch}")
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        dataset, algo = _d3rlpy_setup(path, hidden, batch)
        setup_s = time.perf_counter() - start
        build_s = _time_calls(algo, "create_impl")  # networks and optimisers, built inside fit
        start = time.perf_counter()
        algo.fit(
            dataset,
            n_steps=steps,
            n_steps_per_epoch=per_epoch,
            experiment_name="IQL",
            with_timestamp=False,
            logger_adapter=d3rlpy.logging.FileAdapterFactory(root_dir=tmp),
        )
        seconds = time.perf_counter() - start
        assert algo.grad_step == steps, algo.grad_step
    return {"steps_per_s": steps / seconds, "fit_s": seconds, "build_s": sum(build_s), "setup_s": setup_s, "peak_mb": _peak_mb()}


def _subprocess(args: list[str]) -> dict:
    env = {**os.environ, **ALLOCATOR_ENVIRONMENT}
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def _subprocess_tty(args: list[str]) -> dict:
    """A worker whose stdout and stderr are a pseudo-terminal (120 x 40), so progress bars render as
    in a user's terminal; the parent drains it (discarding it) and reads the result from a file."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        env = {**os.environ, **ALLOCATOR_ENVIRONMENT, RESULT_ENV: str(result), "TERM": os.environ.get("TERM", "xterm-256color")}
        env.pop("COLUMNS", None)
        proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", *args], stdin=subprocess.DEVNULL, stdout=slave, stderr=slave, env=env
        )
        os.close(slave)
        tail = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the worker closed its end
                break
            if not chunk:
                break
            tail = (tail + chunk)[-3000:]
        os.close(master)
        if proc.wait() != 0 or not result.exists():
            raise RuntimeError(f"worker {args} failed:\n{tail.decode(errors='replace')}")
        return json.loads(result.read_text())


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def _median(runs: list[dict], key: str = "steps_per_s") -> float:
    return statistics.median(r[key] for r in runs)


def bench(quick: bool, members: list[int]) -> dict:
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    repeats = 1 if quick else 3
    compiled = not quick  # torch.compile takes seconds per process: --quick leaves it out (its keys are null)
    steps = {(32, 32): 300 if quick else 2000, (256, 256): 100 if quick else 500}
    result: dict = {"threads": 1, "repeats": repeats, "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "vancomycin.csv")
        simulate_dataset(150, 0).to_csv(path, index=False)
        for hidden, batch in CONFIGS:
            n = steps[hidden]
            common = [path, ",".join(map(str, hidden)), str(batch), str(n)]
            runs: dict[str, list[dict]] = {"ours": [], "compiled": [], "d3rlpy": [], "ours_fit": [], "d3rlpy_fit": []}
            for _ in range(repeats):  # alternate, so drifts of the machine hit all alike
                runs["ours"].append(_subprocess(["ours", *common, "1", "0"]))
                runs["d3rlpy"].append(_subprocess(["d3rlpy", *common]))
                if compiled:
                    runs["compiled"].append(_subprocess(["ours", *common, "1", "1"]))
                runs["ours_fit"].append(_subprocess_tty(["ours_fit", *common, "1"]))
                runs["d3rlpy_fit"].append(_subprocess_tty(["d3rlpy_fit", *common]))
            med = {k: _median(v) if v else None for k, v in runs.items()}
            peak = {k: max(r["peak_mb"] for r in v) if v else None for k, v in runs.items()}
            excl = {k: n / (_median(runs[k], "fit_s") - _median(runs[k], "build_s")) for k in ("ours_fit", "d3rlpy_fit")}
            row = {
                "hidden": list(hidden),
                "batch": batch,
                "steps": n,
                "ours_steps_per_s": round(med["ours"], 1),
                "d3rlpy_steps_per_s": round(med["d3rlpy"], 1),
                "ratio": round(med["ours"] / med["d3rlpy"], 2),
                "ours_peak_mb": round(peak["ours"], 1),
                "d3rlpy_peak_mb": round(peak["d3rlpy"], 1),
                "ours_compiled_steps_per_s": _round(med["compiled"], 1),
                "compiled_ratio": _round(med["compiled"] and med["compiled"] / med["d3rlpy"], 2),
                "compile_s": _round(_median(runs["compiled"], "warmup_s") if compiled else None, 1),
                "ours_compiled_peak_mb": _round(peak["compiled"], 1),
                "fit_steps": n,
                "d3rlpy_fit_steps_per_epoch": min(n, STEPS_PER_EPOCH),
                "ours_fit_steps_per_s": round(med["ours_fit"], 1),
                "d3rlpy_fit_steps_per_s": round(med["d3rlpy_fit"], 1),
                "fit_ratio": round(med["ours_fit"] / med["d3rlpy_fit"], 2),
                "ours_fit_s": round(_median(runs["ours_fit"], "fit_s"), 2),
                "d3rlpy_fit_s": round(_median(runs["d3rlpy_fit"], "fit_s"), 2),
                "ours_fit_build_s": round(_median(runs["ours_fit"], "build_s"), 3),
                "d3rlpy_fit_build_s": round(_median(runs["d3rlpy_fit"], "build_s"), 3),
                "ours_fit_steps_per_s_excl_build": round(excl["ours_fit"], 1),
                "d3rlpy_fit_steps_per_s_excl_build": round(excl["d3rlpy_fit"], 1),
                "fit_ratio_excl_build": round(excl["ours_fit"] / excl["d3rlpy_fit"], 2),
                "ours_fit_setup_s": round(_median(runs["ours_fit"], "setup_s"), 3),
                "d3rlpy_fit_setup_s": round(_median(runs["d3rlpy_fit"], "setup_s"), 3),
                "ours_fit_peak_mb": round(peak["ours_fit"], 1),
                "d3rlpy_fit_peak_mb": round(peak["d3rlpy_fit"], 1),
            }
            result["configs"].append(row)
            print(json.dumps(row), flush=True)
        d3 = result["configs"][0]["d3rlpy_steps_per_s"]
        d3_fit = result["configs"][0]["d3rlpy_fit_steps_per_s"]
        result["ensembles"] = []
        for k in members:  # K seeds at [32, 32] / 64 in one process, against d3rlpy's single run above
            n = steps[(32, 32)] // (8 if quick else 2)
            runs = {"eager": [], "compiled": [], "fit": []}
            for _ in range(repeats):
                runs["eager"].append(_subprocess(["ours", path, "32,32", "64", str(n), str(k), "0"]))
                if compiled:
                    runs["compiled"].append(_subprocess(["ours", path, "32,32", "64", str(n), str(k), "1"]))
                runs["fit"].append(_subprocess_tty(["ours_fit", path, "32,32", "64", str(n), str(k)]))
            per_seed = {name: k * _median(rs) if rs else None for name, rs in runs.items()}
            row = {
                "members": k,
                "hidden": [32, 32],
                "batch": 64,
                "steps": n,
                "seed_steps_per_s": round(per_seed["eager"], 1),
                "ratio_vs_d3rlpy": round(per_seed["eager"] / d3, 2),
                "compiled_seed_steps_per_s": _round(per_seed["compiled"], 1),
                "compiled_ratio_vs_d3rlpy": _round(per_seed["compiled"] and per_seed["compiled"] / d3, 2),
                "peak_mb": round(max(r["peak_mb"] for r in runs["eager"]), 1),
                "fit_seed_steps_per_s": round(per_seed["fit"], 1),
                "fit_ratio_vs_d3rlpy": round(per_seed["fit"] / d3_fit, 2),
                "fit_s": round(_median(runs["fit"], "fit_s"), 2),
                "fit_peak_mb": round(max(r["peak_mb"] for r in runs["fit"]), 1),
            }
            result["ensembles"].append(row)
            print(json.dumps(row), flush=True)
        if result["ensembles"]:
            result["ensemble"] = result["ensembles"][0]
    return result


def table(result: dict) -> str:
    """Both comparisons side by side: the bare update loop, and the training loop as users run it."""
    update, users = "update loop (sample + update)", "training loop as users run it (fit / train_iql)"
    lines = [
        f"IQL gradient steps/s, one torch thread, median of {result['repeats']}",
        f"{'config':<18} {'measured':<56} {'ours':>9} {'d3rlpy':>8} {'ratio':>8}",
    ]

    def line(name: str, what: str, ours: float | None, d3: float, ratio: float | None) -> None:
        if ours is None:
            lines.append(f"{name:<18} {what:<56} {'-':>9} {d3:>8.1f} {'-':>8}")
        else:
            lines.append(f"{name:<18} {what:<56} {ours:>9.1f} {d3:>8.1f} {ratio:>7.2f}x")

    for row in result["configs"]:
        line(f"{row['hidden']} / {row['batch']}", update, row["ours_steps_per_s"], row["d3rlpy_steps_per_s"], row["ratio"])
        line("", "  ... ours compiled", row["ours_compiled_steps_per_s"], row["d3rlpy_steps_per_s"], row["compiled_ratio"])
        line("", users, row["ours_fit_steps_per_s"], row["d3rlpy_fit_steps_per_s"], row["fit_ratio"])
        build = f"  ... minus the build in the call ({row['ours_fit_build_s']:.2f} s / {row['d3rlpy_fit_build_s']:.2f} s)"
        line("", build, row["ours_fit_steps_per_s_excl_build"], row["d3rlpy_fit_steps_per_s_excl_build"], row["fit_ratio_excl_build"])
    if result.get("ensembles"):
        first = result["configs"][0]
        lines.append("ensembles: ours seed-steps/s (members x steps/s) vs d3rlpy's single run at [32, 32] / 64")
        for row in result["ensembles"]:
            name = f"{row['members']} members"
            line(name, update, row["seed_steps_per_s"], first["d3rlpy_steps_per_s"], row["ratio_vs_d3rlpy"])
            line("", "  ... ours compiled", row["compiled_seed_steps_per_s"], first["d3rlpy_steps_per_s"], row["compiled_ratio_vs_d3rlpy"])
            line("", users, row["fit_seed_steps_per_s"], first["d3rlpy_fit_steps_per_s"], row["fit_ratio_vs_d3rlpy"])
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        which, path, hidden, batch, steps, *rest = argv[1:]
        shape = tuple(int(h) for h in hidden.split(","))
        if which == "ours":
            out = run_ours(path, shape, int(batch), int(steps), int(rest[0]), bool(int(rest[1])))
        elif which == "d3rlpy":
            out = run_d3rlpy(path, shape, int(batch), int(steps))
        elif which == "ours_fit":
            out = run_ours_fit(path, shape, int(batch), int(steps), int(rest[0]))
        else:
            out = run_d3rlpy_fit(path, shape, int(batch), int(steps))
        if os.environ.get(RESULT_ENV):
            Path(os.environ[RESULT_ENV]).write_text(json.dumps(out))
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer steps, one repeat (a smoke test, not a measurement).")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--members", type=int, nargs="*", default=[16, 64], help="Ensemble sizes to measure (none: skip).")
    args = parser.parse_args(argv)
    result = bench(args.quick, args.members)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
