"""How many IQL (seed-)steps/s the matmuls alone allow on this CPU: an upper bound for the speed targets.

    python bench/iql_roofline.py [--json bench/results/iql_roofline.json] [--d3rlpy-json bench/results/iql_vs_d3rlpy.json]

The speed targets are >= 60x (16 members) and >= 100x (64 members) d3rlpy's [32, 32] / 64 steps/s in
seed-steps/s, and >= 2.5x d3rlpy at [256, 256] / 256. Whatever else a step does, it must run its
matmuls, so, per target:

1. FLOPs per member-step: one eager ``IQL.update`` of that config runs under a
   TorchDispatchMode that records every ``bmm`` / ``baddbmm`` with its shapes; each counts
   2 * E * M * K * N (E the batch of matrices; baddbmm's bias add, E * M * N, is left out). The
   sum over the step divided by the members is the count for one member.
2. Best throughput on exactly those calls: each recorded call is replayed on fresh inputs of its
   shapes and strides, one torch thread, outputs preallocated (``out=``, so no allocation is
   timed), best of several repeats; the sum of the per-call times is the matmul time of one step.
3. Bound: members / (matmul time of a step) seed-steps/s, against the target x d3rlpy's
   measured steps/s (read from the d3rlpy benchmark's JSON on this machine), and the GFLOP/s
   the target needs: target x d3rlpy steps/s x FLOPs per member-step.

For scale the script also times one large square sgemm (1024^2: what torch's fp32 matmul reaches
when shapes are not the problem) and gives the bound at that rate too ("at sgemm rate").
Element-wise work, sampling and Python are not in either bound: both are generous.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

OBS_DIM, ACTION_DIM = 7, 1  # the benchmark's vancomycin states: 7 features
# (hidden, batch, members) -> the speed target, as a multiple of d3rlpy's steps/s at that config
# ([32, 32] / 64 for the ensembles, which the targets compare with d3rlpy's single run there)
TARGETS = {((32, 32), 64, 16): 60.0, ((32, 32), 64, 64): 100.0, ((256, 256), 256, 1): 2.5}
D3RLPY_JSON = Path(__file__).parent / "results" / "iql_vs_d3rlpy.json"


class RecordMatmuls(TorchDispatchMode):
    """Records (op, [shape, stride] of each tensor argument) for every bmm and baddbmm dispatched."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[tuple[str, list[tuple[tuple[int, ...], tuple[int, ...]]]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.bmm, torch.ops.aten.baddbmm):
            name = func.overloadpacket.__name__
            self.calls.append((name, [(tuple(a.shape), tuple(a.stride())) for a in args if isinstance(a, torch.Tensor)]))
        return func(*args, **(kwargs or {}))


def matmul_calls(hidden: tuple[int, ...], batch_size: int, members: int) -> list:
    """The bmm / baddbmm calls of one update of ``members`` members."""
    from dosewise.algos.iql import IQL, Batch, IQLConfig

    learner = IQL(OBS_DIM, ACTION_DIM, IQLConfig(hidden=hidden, batch_size=batch_size), seeds=list(range(members)))
    g = torch.Generator().manual_seed(0)
    k, b = members, batch_size
    batch = Batch(
        torch.randn(k, b, OBS_DIM, generator=g),
        torch.rand(k, b, ACTION_DIM, generator=g) * 2 - 1,
        torch.randn(k, b, generator=g),
        torch.randn(k, b, OBS_DIM, generator=g),
        torch.zeros(k, b),
    )
    learner.update(batch)  # builds the cached layer views
    with RecordMatmuls() as rec:
        learner.update(batch)
    return rec.calls


def flops(call) -> int:
    _, tensors = call
    (e, m, k), (_, _, n) = tensors[-2][0], tensors[-1][0]
    return 2 * e * m * k * n


def best_seconds(call, repeats: int = 7, inner: int = 200) -> float:
    """Best per-call time of ``call`` replayed on inputs of its shapes and strides, output preallocated."""
    name, tensors = call
    args = [torch.empty_strided(shape, stride).normal_() for shape, stride in tensors]
    a, b = args[-2], args[-1]
    out = torch.empty(a.shape[0], a.shape[1], b.shape[2])
    run = (lambda: torch.bmm(a, b, out=out)) if name == "bmm" else (lambda: torch.baddbmm(args[0], a, b, out=out))
    for _ in range(20):
        run()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            run()
        best = min(best, (time.perf_counter() - start) / inner)
    return best


def square_sgemm_gflops(n: int = 1024) -> float:
    a, b, out = torch.randn(n, n), torch.randn(n, n), torch.empty(n, n)
    for _ in range(3):
        torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(5))
    return 2 * n**3 / best / 1e9


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def roofline(d3rlpy_steps_per_s: dict[tuple[tuple[int, ...], int], float]) -> dict:
    """One row per target in TARGETS; ``d3rlpy_steps_per_s`` by (hidden, batch)."""
    torch.set_num_threads(1)
    sgemm = square_sgemm_gflops()
    result: dict = {"obs_dim": OBS_DIM, "threads": 1, "square_sgemm_gflops": round(sgemm, 1), "rows": []}
    for (hidden, batch, k), target in TARGETS.items():
        calls = matmul_calls(hidden, batch, k)
        total_flops = sum(flops(c) for c in calls)
        seconds = sum(best_seconds(c, inner=200 if hidden == (32, 32) else 10) for c in calls)
        d3 = d3rlpy_steps_per_s[(hidden, 64 if k > 1 else batch)]
        per_seed = k / seconds
        result["rows"].append(
            {
                "hidden": list(hidden),
                "batch": batch,
                "members": k,
                "d3rlpy_steps_per_s": d3,
                "matmul_calls_per_step": len(calls),
                "flops_per_member_step": total_flops // k,
                "matmul_seconds_per_step": seconds,
                "matmul_gflops": round(total_flops / seconds / 1e9, 1),
                "bound_seed_steps_per_s": round(per_seed, 1),
                "bound_ratio_vs_d3rlpy": round(per_seed / d3, 2),
                "bound_at_square_sgemm_rate_ratio_vs_d3rlpy": round(sgemm * 1e9 * k / total_flops / d3, 2),
                "target_ratio": target,
                "target_seed_steps_per_s": round(target * d3, 1),
                "target_needs_gflops": round(target * d3 * total_flops / k / 1e9, 1),
            }
        )
    return result


def table(result: dict) -> str:
    lines = [
        f"IQL matmul roofline, one thread; a 1024^2 fp32 matmul reaches {result['square_sgemm_gflops']:.0f} GFLOP/s",
        (
            f"{'config':<22} {'MFLOP/member-step':>17} {'matmul GFLOP/s':>14} {'bound x d3rlpy':>14} {'at sgemm rate':>13}"
            f" {'target':>7} {'target needs GFLOP/s':>20}"
        ),
    ]
    for row in result["rows"]:
        name = f"{row['hidden']}/{row['batch']} x{row['members']}"
        lines.append(
            f"{name:<22} {row['flops_per_member_step'] / 1e6:>17.2f} {row['matmul_gflops']:>14.1f}"
            f" {row['bound_ratio_vs_d3rlpy']:>13.1f}x {row['bound_at_square_sgemm_rate_ratio_vs_d3rlpy']:>12.1f}x"
            f" {row['target_ratio']:>6.1f}x {row['target_needs_gflops']:>20.1f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=None, help="Write the results here.")
    parser.add_argument("--d3rlpy-json", type=Path, default=D3RLPY_JSON, help="d3rlpy's measured steps/s come from this file.")
    args = parser.parse_args(argv)
    configs = json.loads(args.d3rlpy_json.read_text())["configs"]
    result = roofline({(tuple(c["hidden"]), c["batch"]): c["d3rlpy_steps_per_s"] for c in configs})
    result["d3rlpy_source"] = str(args.d3rlpy_json)
    print(table(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
