"""Throughput of the batched anesthesia simulator vs PAS 1.0.0 on the same patients and infusions.

PAS steps one patient at a time (``Patient.one_step``, noise off, ``save_data_bool=False`` so it
does not write a DataFrame row per step); ours steps the whole batch at once. Both run at dt = 1 s
on the same covariates and piecewise-constant infusions (PAS on the first patients of the batch,
whose trajectories are also checked against ours). Prints a table and writes JSON.

    python bench/anesthesia_sim.py [--quick] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from dosewise.sim.anesthesia import open_loop


def cohort(n: int, minutes: int, seed: int = 0):
    """Adult covariates [N] and infusions [N, T] changing every 5 minutes (mg/s, µg/s)."""
    rng = np.random.default_rng(seed)
    cov = {
        "age": rng.uniform(18, 85, n),
        "height": rng.uniform(150, 195, n),
        "weight": rng.uniform(45, 120, n),
        "sex": rng.integers(0, 2, n).astype(float),
    }
    blocks = -(-minutes // 5)
    u_p = np.repeat(rng.uniform(0.05, 0.4, (n, blocks)), 300, axis=1)[:, : minutes * 60]
    u_r = np.repeat(rng.uniform(0.05, 0.5, (n, blocks)), 300, axis=1)[:, : minutes * 60]
    return cov, u_p, u_r


def run_pas(cov, u_p, u_r, save_data: bool = False) -> tuple[float, dict[str, np.ndarray]]:
    """Seconds to simulate every row with PAS, one patient at a time, and its BIS/MAP [N, T]."""
    import python_anesthesia_simulator as pas

    n, t = u_p.shape
    out = {"bis": np.empty((n, t)), "map": np.empty((n, t))}
    start = time.perf_counter()
    for i in range(n):
        patient = pas.Patient([cov["age"][i], cov["height"][i], cov["weight"][i], int(cov["sex"][i])], save_data_bool=save_data)
        for k in range(t):
            b, _, m, _ = patient.one_step(u_p[i, k], u_r[i, k], noise=False)
            out["bis"][i, k], out["map"][i, k] = b[0], m[0]
    return time.perf_counter() - start, out


def run_ours(cov, u_p, u_r) -> tuple[float, dict[str, np.ndarray]]:
    start = time.perf_counter()
    out = open_loop(**cov, propofol_mg_s=u_p, remifentanil_ug_s=u_r)
    return time.perf_counter() - start, out


def benchmark(quick: bool) -> dict:
    minutes, n_ours, n_pas = (30, 200, 4) if quick else (60, 2000, 16)
    cov, u_p, u_r = cohort(n_ours, minutes)
    hours = minutes / 60.0
    run_ours({k: v[:8] for k, v in cov.items()}, u_p[:8, :60], u_r[:8, :60])  # warm-up (imports, caches)
    ours_s, ours = run_ours(cov, u_p, u_r)
    pas_s, theirs = run_pas({k: v[:n_pas] for k, v in cov.items()}, u_p[:n_pas], u_r[:n_pas])
    ours_rate, pas_rate = n_ours * hours / ours_s, n_pas * hours / pas_s
    result = {
        "quick": quick,
        "dt_s": 1.0,
        "hours_per_patient": hours,
        "pas": {"patients": n_pas, "seconds": pas_s, "patient_hours_per_s": pas_rate, "save_data_bool": False},
        "ours": {"patients": n_ours, "seconds": ours_s, "patient_hours_per_s": ours_rate},
        "speedup_vs_pas": ours_rate / pas_rate,
        "max_abs_diff": {k: float(np.abs(ours[k][:n_pas] - theirs[k]).max()) for k in ("bis", "map")},
    }
    if not quick:  # PAS's default writes a DataFrame row per step: time a short run to show the cost
        m = 10
        slow_s, _ = run_pas({k: v[:1] for k, v in cov.items()}, u_p[:1, : m * 60], u_r[:1, : m * 60], save_data=True)
        result["pas_save_data_true"] = {"patients": 1, "minutes": m, "patient_hours_per_s": (m / 60.0) / slow_s}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="30 min; 200 patients (ours), 4 (PAS)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/anesthesia_sim.json"))
    args = parser.parse_args()
    r = benchmark(args.quick)
    print(f"{'simulator':<28} | {'patients':>8} | {'seconds':>8} | {'patient-h/s':>11}")
    for label, key in (("PAS 1.0.0 (one at a time)", "pas"), ("dosewise (batched)", "ours")):
        row = r[key]
        print(f"{label:<28} | {row['patients']:>8} | {row['seconds']:>8.2f} | {row['patient_hours_per_s']:>11.2f}")
    if "pas_save_data_true" in r:
        print(f"PAS with save_data_bool=True: {r['pas_save_data_true']['patient_hours_per_s']:.3f} patient-h/s")
    print(
        f"speedup vs PAS: {r['speedup_vs_pas']:.0f}x; max |ours - PAS|: BIS {r['max_abs_diff']['bis']:.1e}, "
        f"MAP {r['max_abs_diff']['map']:.1e} mmHg"
    )
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(r, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
