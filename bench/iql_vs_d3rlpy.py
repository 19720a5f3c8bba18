"""IQL gradient steps per second: ours vs d3rlpy 2.8.1, same data, same hyperparameters, one thread.

    python bench/iql_vs_d3rlpy.py [--quick] [--json bench/results/iql_vs_d3rlpy.json]

Data: 150 simulated vancomycin patients (`simulate_dataset(150, 0)` -> `load_transitions`), states
normalised the way `train_iql` does. Configs: hidden [32, 32] with batch 64, and [256, 256] with
batch 256; seed 004's lr 3e-5, gamma 0.9, beta 0.5, tau 0.7, Polyak 0.005 for both libraries.

Every measurement is its own subprocess (so peak memory is per run, and one library's imports
or allocator state never slow the other), the two libraries alternate, and the median of the
repeats is reported. A run builds everything, takes a few warm-up steps, then times ``--steps``
gradient steps of each library's own training loop: minibatch sampling plus one update, i.e.
d3rlpy's ``sample_transition_batch`` + ``update`` (what ``fit`` does per step) and ours the
`train_iql` loop body (`sample` + `update`, metrics read back every 50 steps). Peak memory is the
process's maximum resident set size (imports included: that is what a training process costs).
Ours runs twice, eager (the default) and with ``--compile`` (torch.compile; its compile time is
reported apart, as ``compile_s``). The ensemble lines train K seeds in one process
(``IQL(..., seeds=range(K))``) and report seed-steps/s (K x steps/s) against d3rlpy's single-run
steps/s at [32, 32]; ``ensemble`` repeats the first of them.

d3rlpy is a `bench` extra only (``pip install -e ".[bench]"``); the package never imports it.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

CONFIGS = (((32, 32), 64), ((256, 256), 256))
HYPER = dict(lr=3e-5, gamma=0.90, beta=0.5, tau=0.7, polyak=0.005, max_weight=100.0)
WARMUP = 20
LOG_EVERY = 50  # train.log_every's default: our loop waits for the device only then


def _data(path: str):
    from dosewise.data import DataConfig, load_transitions
    from dosewise.data.transitions import Normalizer

    transitions, _ = load_transitions(path, DataConfig())
    return transitions, Normalizer.fit(transitions.observations)


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux: kilobytes


def run_ours(path: str, hidden: tuple[int, ...], batch: int, steps: int, members: int = 1, compile: bool = False) -> dict:
    import torch

    from dosewise.algos.iql import IQL, IQLConfig
    from dosewise.algos.training import data_tensors, log_values, sample

    torch.set_num_threads(1)
    transitions, normalizer = _data(path)
    data = data_tensors(transitions, normalizer)
    cfg = IQLConfig(hidden=hidden, batch_size=batch, lr=HYPER["lr"], gamma=HYPER["gamma"], beta=HYPER["beta"], tau=HYPER["tau"], polyak=HYPER["polyak"])
    seeds = list(range(members))
    learner = IQL(data.obs.shape[1], 1, cfg, seeds=seeds, compile=compile)
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


def run_d3rlpy(path: str, hidden: tuple[int, ...], batch: int, steps: int) -> dict:
    import d3rlpy
    import torch

    torch.set_num_threads(1)
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
    algo.build_with_dataset(dataset)
    for _ in range(WARMUP):
        algo.update(dataset.sample_transition_batch(batch))
    start = time.perf_counter()
    for _ in range(steps):  # the body of d3rlpy's fit loop
        algo.update(dataset.sample_transition_batch(batch))
    seconds = time.perf_counter() - start
    return {"steps_per_s": steps / seconds, "peak_mb": _peak_mb()}


def _subprocess(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", *args], capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"worker {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def bench(quick: bool, members: list[int]) -> dict:
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    repeats = 1 if quick else 3
    steps = {(32, 32): 300 if quick else 2000, (256, 256): 100 if quick else 500}
    result: dict = {"threads": 1, "repeats": repeats, "configs": []}
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "vancomycin.csv")
        simulate_dataset(150, 0).to_csv(path, index=False)
        for hidden, batch in CONFIGS:
            n = steps[hidden]
            common = [path, ",".join(map(str, hidden)), str(batch), str(n)]
            runs: dict[str, list[dict]] = {"ours": [], "compiled": [], "d3rlpy": []}
            for _ in range(repeats):  # alternate, so drifts of the machine hit all alike
                runs["ours"].append(_subprocess(["ours", *common, "1", "0"]))
                runs["compiled"].append(_subprocess(["ours", *common, "1", "1"]))
                runs["d3rlpy"].append(_subprocess(["d3rlpy", *common]))
            med = {k: statistics.median(r["steps_per_s"] for r in v) for k, v in runs.items()}
            peak = {k: max(r["peak_mb"] for r in v) for k, v in runs.items()}
            row = {
                "hidden": list(hidden),
                "batch": batch,
                "steps": n,
                "ours_steps_per_s": round(med["ours"], 1),
                "d3rlpy_steps_per_s": round(med["d3rlpy"], 1),
                "ratio": round(med["ours"] / med["d3rlpy"], 2),
                "ours_peak_mb": round(peak["ours"], 1),
                "d3rlpy_peak_mb": round(peak["d3rlpy"], 1),
                "ours_compiled_steps_per_s": round(med["compiled"], 1),
                "compiled_ratio": round(med["compiled"] / med["d3rlpy"], 2),
                "compile_s": round(statistics.median(r["warmup_s"] for r in runs["compiled"]), 1),
                "ours_compiled_peak_mb": round(peak["compiled"], 1),
            }
            result["configs"].append(row)
            print(json.dumps(row), flush=True)
        d3 = result["configs"][0]["d3rlpy_steps_per_s"]
        result["ensembles"] = []
        for k in members:  # K seeds at [32, 32] / 64 in one process, against d3rlpy's single run above
            n = steps[(32, 32)] // (8 if quick else 2)
            runs = {"eager": [], "compiled": []}
            for _ in range(repeats):
                runs["eager"].append(_subprocess(["ours", path, "32,32", "64", str(n), str(k), "0"]))
                runs["compiled"].append(_subprocess(["ours", path, "32,32", "64", str(n), str(k), "1"]))
            per_seed = {name: k * statistics.median(r["steps_per_s"] for r in rs) for name, rs in runs.items()}
            row = {
                "members": k,
                "hidden": [32, 32],
                "batch": 64,
                "steps": n,
                "seed_steps_per_s": round(per_seed["eager"], 1),
                "ratio_vs_d3rlpy": round(per_seed["eager"] / d3, 2),
                "compiled_seed_steps_per_s": round(per_seed["compiled"], 1),
                "compiled_ratio_vs_d3rlpy": round(per_seed["compiled"] / d3, 2),
                "peak_mb": round(max(r["peak_mb"] for r in runs["eager"]), 1),
            }
            result["ensembles"].append(row)
            print(json.dumps(row), flush=True)
        if result["ensembles"]:
            result["ensemble"] = result["ensembles"][0]
    return result


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "--worker":
        which, path, hidden, batch, steps, *rest = argv[1:]
        shape = tuple(int(h) for h in hidden.split(","))
        if which == "ours":
            out = run_ours(path, shape, int(batch), int(steps), int(rest[0]), bool(int(rest[1])))
        else:
            out = run_d3rlpy(path, shape, int(batch), int(steps))
        print(json.dumps(out))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="Fewer steps, one repeat (a smoke test, not a measurement).")
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--members", type=int, nargs="*", default=[16, 64], help="Ensemble sizes to measure (none: skip).")
    args = parser.parse_args(argv)
    result = bench(args.quick, args.members)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
