"""fp32 linear layers: MKL (torch's default CPU `addmm`) against oneDNN (`dosewise.onednn`, given the
plain weight; also with a pre-packed one), on the shapes the planner runs, one thread.

Rows · in → out: the encoder's products over 128 windows of 65 tokens (8,320 rows), the search's
recurrent call over 128 trees, the one-at-a-time reference's (1 and 65 rows), one member of an
IQL [256, 256] network at batch 256 (the largest config of the IQL speed targets; forward products only), and a
1024² product for the machine's peak. Packing a weight ahead (`packed_us`, plus the cost of the
packing itself, `pack_us`) gains only a few per cent over the plain weight, so `dosewise.onednn`
does not pack. Both sides alternate run by run; medians. Also records whether
`onednn.linear` takes oneDNN for the shape (`MIN_MULTIPLY_ADDS`) and the largest difference from
MKL's result. Prints a table and writes JSON.

    python bench/onednn_linear.py [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from dosewise import onednn

SHAPES = [  # rows, in, out
    (1, 64, 64),
    (1, 64, 402),
    (65, 64, 192),
    (65, 64, 402),
    (128, 64, 64),
    (128, 64, 128),
    (128, 128, 64),
    (128, 64, 192),
    (128, 64, 402),
    (8320, 64, 64),
    (8320, 64, 128),
    (8320, 128, 64),
    (8320, 64, 192),
    (256, 8, 256),
    (256, 256, 256),
    (1024, 1024, 1024),  # an IQL [256, 256] member's layers, batch 256
]


def median_us(function, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return 1e6 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", type=Path, default=Path("bench/results/onednn_linear.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if not onednn.available():
        raise SystemExit("this torch has no oneDNN")
    generator = torch.Generator().manual_seed(0)
    rows_out = []
    with torch.inference_mode():
        for rows, d_in, d_out in SHAPES:
            x = torch.randn(rows, d_in, generator=generator)
            weight, bias = torch.randn(d_out, d_in, generator=generator), torch.randn(d_out, generator=generator)
            packed = torch.ops.mkldnn._reorder_linear_weight(weight, rows)

            def mkl(x=x, weight=weight, bias=bias):
                return F.linear(x, weight, bias)

            def dnn(x=x, weight=weight, bias=bias):  # what dosewise.onednn.linear runs
                return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")

            def dnn_packed(x=x, packed=packed, bias=bias):
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")

            repeats = max(20, min(2000, int(2e8 / (rows * d_in * d_out))))
            sides = {"mkl": mkl, "onednn": dnn, "onednn_packed": dnn_packed}
            for f in (*sides.values(), *sides.values()):
                f()
            times = {name: [] for name in sides}
            for _ in range(5):  # alternate in blocks
                for name, f in sides.items():
                    times[name].append(median_us(f, repeats))
            mkl_t, dnn_t, packed_t = (statistics.median(times[name]) for name in sides)
            pack_us = median_us(lambda w=weight, r=rows: torch.ops.mkldnn._reorder_linear_weight(w, r), 50)
            flops = 2 * rows * d_in * d_out
            rows_out.append(
                {
                    "rows": rows,
                    "in": d_in,
                    "out": d_out,
                    "mkl_us": mkl_t,
                    "onednn_us": dnn_t,
                    "onednn_packed_us": packed_t,
                    "pack_us": pack_us,
                    "mkl_gflops": flops / mkl_t / 1e3,
                    "onednn_gflops": flops / dnn_t / 1e3,
                    "speedup": mkl_t / dnn_t,
                    "linear_takes_onednn": rows * d_in * d_out >= onednn.MIN_MULTIPLY_ADDS,
                    "max_abs_difference": float((mkl() - dnn()).abs().max()),
                }
            )
    print("fp32 linear, one thread: MKL (F.linear) vs oneDNN (plain weight, as dosewise.onednn; packed); median us")
    print(
        f"{'rows x in -> out':<22} {'MKL us':>9} {'oneDNN us':>10} {'speedup':>8} {'GFLOP/s MKL / oneDNN':>22} "
        f"{'packed us':>10} {'taken':>6}"
    )
    for r in rows_out:
        shape = f"{r['rows']} x {r['in']} -> {r['out']}"
        print(
            f"{shape:<22} {r['mkl_us']:>9.1f} {r['onednn_us']:>10.1f} {r['speedup']:>7.2f}x "
            f"{r['mkl_gflops']:>10.0f} / {r['onednn_gflops']:<9.0f} {r['onednn_packed_us']:>10.1f} "
            f"{'yes' if r['linear_takes_onednn'] else 'no':>6}"
        )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"min_multiply_adds": onednn.MIN_MULTIPLY_ADDS, "shapes": rows_out}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
