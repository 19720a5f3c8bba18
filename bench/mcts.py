"""Batched MCTS (`dosewise.planner.mcts.search`) vs the one-sample reference (`mcts_reference`).

Batch of 128 windows, 50 simulations, the default planner model (PlannerModel(PlannerModelConfig(),
max_len=64, pre_len=5), random init, plausible normalisation statistics) on random realistic
inputs with dose limits, CPU, one thread. The default search is timed again with every core to
both sides; `speedup_vs_reference_best_threads` takes each side at its faster thread count (the
batched search's products and sampling spread over the cores; the reference's batch-of-one
operations are too small to). Four variants: pUCT or Gumbel root selection, each timed with root
inference (`planner_search_fns`: encoding the history included) and from the
encoded history (`planner_search_fns_from_memory`). The reference builds the root and runs the
search one window at a time, calling the model with batch size one; both run the same callables.
Runs alternate (each variant batched, then a slice of its reference, ...) so that load from other
jobs hits both; the batched time is the median over repeats, the reference's the sum over all 128
windows (--quick: the first 16, extrapolated to 128). `speedup_vs_reference` is the default
search (pUCT, with root inference). Prints a table and writes JSON.

    python bench/mcts.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from dosewise.allocator import keep_freed_memory
from dosewise.planner.config import PlannerModelConfig
from dosewise.planner.mcts import (
    UNVISITED,
    MCTSConfig,
    draw_noise,
    search,
)
from dosewise.planner.mcts_reference import reference_search
from dosewise.planner.model import RATE_LEVELS, PlannerModel, PlannerStats
from dosewise.planner.search_model import planner_search_fns, planner_search_fns_from_memory

BATCH = 128
MAX_LEN, PRE_LEN = 64, 5


def planner_model(seed: int = 0) -> PlannerModel:
    """The default planner model, random weights, statistics of plausible anaesthesia windows."""
    torch.manual_seed(seed)
    model = PlannerModel(PlannerModelConfig(), max_len=MAX_LEN, pre_len=PRE_LEN)
    model.set_stats(
        PlannerStats(
            vital_mean=np.array([45.0, 80.0, 115.0, 65.0, 70.0]),
            vital_std=np.array([8.0, 12.0, 15.0, 10.0, 10.0]),
            static_mean=np.array([55.0, 0.5, 168.0, 70.0, 2.0]),
            static_std=np.array([15.0, 0.5, 9.0, 14.0, 0.7]),
            reward_mean=-0.3,
            reward_std=0.4,
            return_mean=-6.0,
            return_std=4.0,
        )
    )
    return model.eval()


def windows(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random windows shaped like `window_tensors`: history [n, 64, 8] (BIS, MAP, SBP, DBP, HR,
    previous propofol and remifentanil rates, option), left-padded masks (10..64 real steps),
    covariates [n, 5] (age, sex, height, weight, ASA), and dose limits [n, 2, 201] (rates above
    a per-window maximum of 120..200 mL/h invalid)."""
    g = torch.Generator().manual_seed(seed)
    vitals = torch.tensor([45.0, 80.0, 115.0, 65.0, 70.0]) + torch.randn(n, MAX_LEN, 5, generator=g) * torch.tensor(
        [8.0, 12.0, 15.0, 10.0, 10.0]
    )
    rates = torch.stack([torch.randint(0, 60, (n, MAX_LEN), generator=g), torch.randint(0, 40, (n, MAX_LEN), generator=g)], -1)
    option = torch.zeros(n, MAX_LEN, 1)
    history = torch.cat([vitals, rates.float(), option], dim=-1)
    real = torch.randint(10, MAX_LEN + 1, (n,), generator=g)
    mask = torch.arange(MAX_LEN) >= (MAX_LEN - real).unsqueeze(1)
    history = history * mask.unsqueeze(-1)
    static = torch.stack(
        [
            torch.randint(20, 85, (n,), generator=g).float(),
            torch.randint(0, 2, (n,), generator=g).float(),
            150 + 40 * torch.rand(n, generator=g),
            50 + 50 * torch.rand(n, generator=g),
            torch.randint(1, 4, (n,), generator=g).float(),
        ],
        dim=1,
    )
    limit = torch.randint(120, RATE_LEVELS, (n, 2, 1), generator=g)
    invalid = torch.arange(RATE_LEVELS) > limit
    return history, mask, static, invalid


# A variant: root selection, and whether the timed search includes encoding the history
# (`planner_search_fns`) or starts from the encoded history (`planner_search_fns_from_memory`, as a
# training step that has run the representation anyway would).
VARIANTS: tuple[tuple[str, bool], ...] = (("puct", True), ("puct", False), ("gumbel", True), ("gumbel", False))


def variant_name(root_selection: str, with_representation: bool) -> str:
    return f"{root_selection}_{'with_representation' if with_representation else 'given_memory'}"


def search_fns(model, inputs, rows: slice, with_representation: bool):
    history, mask, static, memory, padding = inputs
    if with_representation:
        return planner_search_fns(model, history[rows], mask[rows], static[rows])
    return planner_search_fns_from_memory(model, memory[rows], padding[rows])


def run_batched(model, inputs, invalid, config, noise, with_representation):
    """Seconds of one batched search over all windows, and its result."""
    start = time.perf_counter()
    with torch.inference_mode():
        result = search(*search_fns(model, inputs, slice(None), with_representation), config, invalid, noise)
    return time.perf_counter() - start, result


def run_reference(model, inputs, invalid, config, noise, with_representation, rows):
    """Seconds per window and chosen actions of the reference on `rows`, one window at a time."""
    seconds, actions = [], []
    for b in rows:
        start = time.perf_counter()
        with torch.inference_mode():
            root, fn = search_fns(model, inputs, slice(b, b + 1), with_representation)
            result = reference_search(root, fn, config, invalid[b : b + 1], noise.row(b))
        seconds.append(time.perf_counter() - start)
        actions.append(result.action[0])
    return seconds, actions


def benchmark(quick: bool) -> dict:
    model = planner_model()
    history, mask, static, invalid = windows(BATCH)
    with torch.inference_mode():
        memory, padding = model.represent(history, mask, static)
    inputs = (history, mask, static, memory, padding)
    base = MCTSConfig()
    noise = draw_noise(BATCH, base, torch.Generator().manual_seed(1))
    n_reference = 16 if quick else BATCH
    chunks = np.array_split(np.arange(n_reference), 4 if quick else 8)
    configs = {name: base.model_copy(update={"root_selection": name}) for name in ("puct", "gumbel")}
    torch.set_num_threads(1)
    variants = time_variants(model, inputs, invalid, configs, noise, VARIANTS, chunks, n_reference)
    cores = os.cpu_count() or 1
    torch.set_num_threads(cores)
    all_cores = time_variants(model, inputs, invalid, configs, noise, VARIANTS[:1], chunks, n_reference)
    torch.set_num_threads(1)
    one, every = variants["puct_with_representation"], all_cores["puct_with_representation"]
    return {
        "quick": quick,
        "batch": BATCH,
        "threads": 1,
        "reference_windows_timed": n_reference,
        "reference_extrapolated": n_reference < BATCH,
        "config": base.model_dump(),
        "model": {"config": PlannerModelConfig().model_dump(), "max_len": MAX_LEN, "pre_len": PRE_LEN},
        "variants": variants,
        # The default search (pUCT) as `planner_search_fns` runs it, history encoding included.
        "speedup_vs_reference": variants["puct_with_representation"]["speedup"],
        "all_cores": {"threads": cores, "variants": all_cores},
        # The default search with each side at the thread count (one or all cores) it ran faster with.
        "speedup_vs_reference_best_threads": min(one["reference_s_for_batch"], every["reference_s_for_batch"])
        / min(one["batched_median_s"], every["batched_median_s"]),
    }


def time_variants(model, inputs, invalid, configs, noise, variants, chunks, n_reference) -> dict:
    """Batched and reference seconds of each variant at the current thread count."""
    for root_selection, with_representation in variants:  # warm-up (allocations, caches)
        run_batched(model, inputs, invalid, configs[root_selection], noise, with_representation)
        run_reference(model, inputs, invalid, configs[root_selection], noise, with_representation, [0])

    runs = {variant_name(*v): {"batched_s": [], "reference_s": [], "reference_actions": []} for v in variants}
    for chunk in chunks:  # alternate: each variant batched, then a slice of its reference, ...
        for root_selection, with_representation in variants:
            run = runs[variant_name(root_selection, with_representation)]
            config = configs[root_selection]
            seconds, run["result"] = run_batched(model, inputs, invalid, config, noise, with_representation)
            run["batched_s"].append(seconds)
            seconds, actions = run_reference(model, inputs, invalid, config, noise, with_representation, chunk.tolist())
            run["reference_s"] += seconds
            run["reference_actions"] += actions

    timed = {}
    for name, run in runs.items():
        batched = statistics.median(run["batched_s"])
        reference = sum(run["reference_s"]) * BATCH / n_reference
        tree = run["result"].tree
        timed[name] = {
            "batched_median_s": batched,
            "batched_runs_s": run["batched_s"],
            "reference_s_for_batch": reference,
            "reference_median_per_window_ms": 1e3 * statistics.median(run["reference_s"]),
            "speedup": reference / batched,
            # float32: the batched model call and the reference's batch-of-one calls round
            # differently, so near-ties may break differently (the tests check float64 equality).
            "same_action_share": (torch.stack(run["reference_actions"]) == run["result"].action[:n_reference])
            .all(-1)
            .float()
            .mean()
            .item(),
            "nodes_per_tree": ((tree.parents != UNVISITED).sum(1) + 1).float().mean().item(),
        }
    return timed


def training_epoch_overhead(quick: bool) -> dict:
    """A training epoch (Lightning, the default planner model, batches of 128 simulated windows,
    the whole batch searched from every window's state_0) with the search off and under each
    preset, alternating, median over repeats; ratio = epoch time with the search / without."""
    import tempfile
    import warnings

    from dosewise.data.anesthesia import CANONICAL, load_cases
    from dosewise.data.windows import WindowConfig, build_windows
    from dosewise.planner.config import (
        ClosedLoopConfig,
        PlannerRunConfig,
        PlannerTrainConfig,
        SearchTrainingConfig,
    )
    from dosewise.planner.training import train_planner
    from dosewise.sim.anesthesia.clinician import simulate_cases

    logging_off()
    batches, repeats = (4, 1) if quick else (20, 3)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "cases.parquet"
        simulate_cases(12 if quick else 40, seed=0).to_parquet(path, index=False)
        frame, _ = load_cases(path, CANONICAL)
        windows = build_windows(frame, WindowConfig())
        train = PlannerTrainConfig(epochs=1, batch_size=BATCH, windows_per_epoch=batches * BATCH, max_val_windows=BATCH)
        # "off_policy_rollout": no search, Stage 2 rolled out with the policy's own actions as
        # aggressive does (no teacher forcing), to tell that preset's search from its rollout.
        searched = ("conservative", "balanced", "aggressive")
        presets = ("off", *searched, "off_policy_rollout")
        times: dict[str, list[float]] = {name: [] for name in presets}
        for repeat in range(repeats):
            for name in presets:
                run = PlannerRunConfig(train=train, closed_loop=ClosedLoopConfig(cases=0))
                if name == "off_policy_rollout":
                    run = run.model_copy(update={"strategy": run.strategy.model_copy(update={"stage2_rollout": "policy"})})
                else:
                    run = run.model_copy(update={"search": SearchTrainingConfig(preset=name)})
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    summary = train_planner(run, windows, windows.select(np.arange(BATCH)), Path(tmp) / f"{name}{repeat}").summary
                times[name].append(summary["epoch_time_s"])
    off = statistics.median(times["off"])
    result = {"batches_per_epoch": batches, "batch": BATCH, "repeats": repeats, "epoch_s_off": off, "presets": {}}
    for name in searched:
        on = statistics.median(times[name])
        preset = SearchTrainingConfig(preset=name)
        result["presets"][name] = {
            "num_simulations": preset.resolved("num_simulations"),
            "epoch_s": on,
            "ratio_vs_off": on / off,
            "runs_s": times[name],
        }
    result["runs_s_off"] = times["off"]
    rollout = statistics.median(times["off_policy_rollout"])
    result["off_policy_rollout"] = {"epoch_s": rollout, "ratio_vs_off": rollout / off, "runs_s": times["off_policy_rollout"]}
    result["presets"]["aggressive"]["ratio_vs_off_policy_rollout"] = result["presets"]["aggressive"]["epoch_s"] / rollout
    result["target_max_ratio"] = 2.0
    return result


def logging_off() -> None:
    import logging

    for name in ("pytorch_lightning", "lightning", "lightning.pytorch", "dosewise.planner"):
        logging.getLogger(name).setLevel(logging.ERROR)


def profile(repeats: int = 3) -> dict:
    """Where one batched search (pUCT, from the encoded history) spends its time: wall ms per
    phase of `dosewise.planner.mcts`, the last of `repeats` runs, and the ATen operations each
    phase dispatches per simulation (counted in one more, untimed run). Phases nest: `_store`
    holds the child sampling; an operation counts for the innermost phase."""
    import collections

    from torch.utils._python_dispatch import TorchDispatchMode

    import dosewise.planner.mcts as mcts_module

    model = planner_model()
    history, mask, static, invalid = windows(BATCH)
    with torch.inference_mode():
        memory, padding = model.represent(history, mask, static)
    config = MCTSConfig()
    noise = draw_noise(BATCH, config, torch.Generator().manual_seed(0))
    spent: dict[str, float] = collections.defaultdict(float)
    ops: collections.Counter = collections.Counter()
    inside = ["search"]  # the phase now running, innermost last
    phases = ("_puct_scores", "_select", "_model_inputs", "_store", "sample_iid_children", "_backup", "sample_distinct_children", "_result")
    originals = {name: getattr(mcts_module, name) for name in phases}

    def timed(name, function):
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            inside.append(name)
            try:
                return function(*args, **kwargs)
            finally:
                inside.pop()
                spent[name] += time.perf_counter() - start

        return wrapper

    class CountOps(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            ops[inside[-1]] += 1
            return func(*args, **(kwargs or {}))

    def run(recurrent):
        with torch.inference_mode():
            search(root, timed("model", recurrent), config, invalid, noise)

    root, recurrent = planner_search_fns_from_memory(model, memory, padding)
    try:
        for name in phases:
            setattr(mcts_module, name, timed(name, originals[name]))
        for _ in range(repeats):
            spent.clear()
            start = time.perf_counter()
            run(recurrent)
            total = time.perf_counter() - start
        timings = dict(spent)
        root, recurrent = planner_search_fns_from_memory(model, memory, padding)
        with CountOps():
            run(recurrent)
    finally:
        for name, function in originals.items():
            setattr(mcts_module, name, function)
    per_simulation = {name: count / config.num_simulations for name, count in ops.items()}
    return {
        "total_ms": 1e3 * total,
        "phases_ms": {name: 1e3 * value for name, value in timings.items()},
        "ops_per_simulation": per_simulation,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="time the reference on 16 windows and extrapolate")
    parser.add_argument("--json", type=Path, default=Path("bench/results/mcts.json"))
    parser.add_argument("--profile", action="store_true", help="only print where one batched search spends its time")
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()  # as the dosewise CLI does; for the batched search and the reference alike
    if args.profile:
        split = profile()
        ops = split["ops_per_simulation"]
        print(
            f"one batched search, batch {BATCH}, 50 simulations: {split['total_ms']:.0f} ms, "
            f"{sum(ops.values()):.0f} ATen operations per simulation"
        )
        print(f"  {'phase (nested)':<26} {'ms':>7} {'share':>7} {'ops/sim':>8} (own, not nested)")
        for name, ms in sorted(split["phases_ms"].items(), key=lambda item: -item[1]):
            print(f"  {name:<26} {ms:7.1f} {100 * ms / split['total_ms']:6.1f}% {ops.get(name, 0):8.1f}")
        print(f"  {'search (the rest)':<26} {'':>7} {'':>7} {ops.get('search', 0):8.1f}")
        return
    r = benchmark(args.quick)
    overhead = training_epoch_overhead(args.quick)
    if overhead:
        r["training_epoch_overhead"] = overhead
    timed = f"{r['reference_windows_timed']} windows timed, x{BATCH // r['reference_windows_timed']}"
    print(
        f"MCTS, batch {BATCH}, {r['config']['num_simulations']} simulations, default planner model, CPU, 1 thread; "
        f"reference: {timed if r['reference_extrapolated'] else 'all windows timed'}"
    )
    header = ("variant", "batched s", "reference s", "speedup", "same action", "nodes/tree")
    print(" | ".join(f"{h:<30}" if i == 0 else f"{h:>11}" for i, h in enumerate(header)))
    for name, v in r["variants"].items():
        print(
            f"{name:<30} | {v['batched_median_s']:>11.3f} | {v['reference_s_for_batch']:>11.3f} | "
            f"{v['speedup']:>10.1f}x | {v['same_action_share']:>11.0%} | {v['nodes_per_tree']:>11.1f}"
        )
    every = r["all_cores"]["variants"]["puct_with_representation"]
    print(
        f"with {r['all_cores']['threads']} threads: batched {every['batched_median_s']:.3f} s, reference "
        f"{every['reference_s_for_batch']:.3f} s"
    )
    print(
        f"speedup vs reference (pUCT, with representation): {r['speedup_vs_reference']:.1f}x on one thread, "
        f"{r['speedup_vs_reference_best_threads']:.1f}x with each side at its faster thread count (target >= 20x)"
    )
    if overhead:
        print(
            f"training epoch ({overhead['batches_per_epoch']} batches of {BATCH}, whole batch searched): "
            f"search off {overhead['epoch_s_off']:.1f} s"
        )
        for name, p in overhead["presets"].items():
            print(f"  {name:<13} {p['num_simulations']:>3} simulations: {p['epoch_s']:.1f} s = {p['ratio_vs_off']:.2f}x (target <= 2x)")
        rollout = overhead["off_policy_rollout"]
        print(
            f"  no search, policy rollout (aggressive's Stage 2 without the search): {rollout['epoch_s']:.1f} s = "
            f"{rollout['ratio_vs_off']:.2f}x; aggressive over it: {overhead['presets']['aggressive']['ratio_vs_off_policy_rollout']:.2f}x"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
