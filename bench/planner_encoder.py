"""The planner's history encoder: `PlannerModel.encode` (written out, one mask, scaled dot-product
attention) against the `nn.TransformerEncoder` module it replaces, on the same parameters.

The inputs of `bench/mcts.py` (the default planner model, random windows of 10..64 real steps, one
thread). Three cases: inference on a batch of 128 (the batched search's root) and on one window
(the one-at-a-time reference's root), both in inference mode, where the module takes its fast
path; and a training step's forward and backward on 128 windows. The two sides alternate run by
run; medians of the repeats after warm-up. Prints a table and writes JSON.

    python bench/planner_encoder.py [--repeats 15] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

from dosewise.allocator import keep_freed_memory
from dosewise.planner.model import causal_mask

sys.path.insert(0, str(Path(__file__).parent))
from mcts import BATCH, planner_model, windows  # bench/mcts.py


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--json", type=Path, default=Path("bench/results/planner_encoder.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    model = planner_model()
    with torch.no_grad():
        tokens, padding = model.tokens(*windows(BATCH)[:3])
    n = tokens.shape[1]
    mask = causal_mask(n)

    def module(x, pad):
        return model.encoder(x, mask=mask, src_key_padding_mask=pad)

    def inference(encoder, rows):
        def run():
            with torch.inference_mode():
                encoder(tokens[rows], padding[rows])

        return run

    def training(encoder):
        def run():
            model.train()
            x = tokens.clone().requires_grad_()
            encoder(x, padding).square().mean().backward()
            model.zero_grad(set_to_none=True)
            model.eval()

        return run

    cases = {
        "inference, batch 128": (inference(module, slice(None)), inference(model.encode, slice(None))),
        "inference, batch 1": (inference(module, slice(0, 1)), inference(model.encode, slice(0, 1))),
        "training step, batch 128": (training(module), training(model.encode)),
    }
    with torch.inference_mode():
        torch.testing.assert_close(model.encode(tokens, padding), module(tokens, padding))
    results = {}
    for name, (old, new) in cases.items():
        repeats = args.repeats * (20 if "batch 1" in name else 1)
        for run in (old, new, old, new):  # warm-up
            run()
        times = {"module": [], "encode": []}
        for _ in range(repeats):
            for side, run in (("module", old), ("encode", new)):
                start = time.perf_counter()
                run()
                times[side].append(time.perf_counter() - start)
        module_ms, encode_ms = (1e3 * statistics.median(times[side]) for side in ("module", "encode"))
        results[name] = {"module_ms": module_ms, "encode_ms": encode_ms, "speedup": module_ms / encode_ms}

    print(f"planner encoder, {n} tokens, default model, one thread, median of {args.repeats} (x20 for batch 1)")
    print(f"{'case':<26} {'module ms':>10} {'encode ms':>10} {'speedup':>8}")
    for name, r in results.items():
        print(f"{name:<26} {r['module_ms']:>10.3f} {r['encode_ms']:>10.3f} {r['speedup']:>7.2f}x")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"tokens": n, "batch": BATCH, "repeats": args.repeats, "cases": results}, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
