"""MCTS speed changes, each measured against a git revision in one process.

    python bench/mcts_ab.py [--against f588926] [--repeats 8] [--json OUT]

Two A/B comparisons, alternating the two sides run by run, median of the repeats after one
warm-up each, one thread, the inputs of `bench/mcts.py` (batch 128, default planner model):

* ``search``: `dosewise.planner.mcts.search` from the encoded history (50 simulations, pUCT), the
  revision's module against the working tree's (on the same model and inputs);
* ``inference_mode``: the working tree's search under `torch.no_grad` against
  `torch.inference_mode`, with parameters that require gradients, as in a training step.

Prints ``old ms, new ms, old / new`` per comparison and writes JSON.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from dosewise.allocator import keep_freed_memory
from dosewise.planner import mcts as new_mcts
from dosewise.planner import search_model

sys.path.insert(0, str(Path(__file__).parent))
from mcts import BATCH, planner_model, windows  # bench/mcts.py


def module_at(revision: str, path: str, name: str, folder: Path):
    """The file `path` as it was at `revision`, imported as module `name`."""
    source = subprocess.run(["git", "show", f"{revision}:{path}"], capture_output=True, text=True, check=True).stdout
    file = folder / f"{name}.py"
    file.write_text(source)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def alternate(old, new, repeats: int) -> dict:
    """Median wall ms of old() and new(), run alternately; the first run of each is a warm-up."""
    times = {"old": [], "new": []}
    for _ in range(repeats + 1):
        for side, function in (("old", old), ("new", new)):
            start = time.perf_counter()
            function()
            times[side].append(time.perf_counter() - start)
    old_ms, new_ms = (1e3 * statistics.median(times[side][1:]) for side in ("old", "new"))
    return {"old_ms": round(old_ms, 1), "new_ms": round(new_ms, 1), "speedup": round(old_ms / new_ms, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--against", default="f588926", help="git revision of the 'old' side")
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    keep_freed_memory()
    model = planner_model()
    history, mask, static, invalid = windows(BATCH)
    with torch.inference_mode():
        memory, padding = model.represent(history, mask, static)
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        old_mcts = module_at(args.against, "dosewise/planner/mcts.py", "mcts_old", Path(tmp))

        def search_with(module, context=torch.inference_mode, searched=model):
            def run():
                config = module.MCTSConfig()
                noise = module.draw_noise(BATCH, config, torch.Generator().manual_seed(0))
                with context():
                    # a revision from before search_model.py has the planner's search functions in mcts.py
                    fns = getattr(module, "planner_search_fns_from_memory", search_model.planner_search_fns_from_memory)
                    root, recurrent = fns(searched, memory, padding)
                    module.search(root, recurrent, config, invalid, noise)

            return run

        results["search"] = alternate(search_with(old_mcts), search_with(new_mcts), args.repeats)

        trained = planner_model().train()
        results["inference_mode"] = alternate(
            search_with(new_mcts, torch.no_grad, trained), search_with(new_mcts, torch.inference_mode, trained), args.repeats
        )
    print(f"A/B against {args.against}, batch {BATCH}, one thread, median of {args.repeats}")
    print(f"{'comparison':<16} {'old ms':>8} {'new ms':>8} {'old / new':>10}")
    for name, r in results.items():
        print(f"{name:<16} {r['old_ms']:>8.1f} {r['new_ms']:>8.1f} {r['speedup']:>9.2f}x")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"against": args.against, "repeats": args.repeats, **results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
