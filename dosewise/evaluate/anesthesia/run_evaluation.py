"""The evaluation of a trained planner run directory: offline metrics on its held-out windows
(`offline.planner_offline`) and the closed loop next to the simulated anesthesiologist and the
dual-loop PID on held-out simulated cases (`closed_loop.planner_vs_baselines`)."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from dosewise.checkpoint import CheckpointError, json_safe
from dosewise.evaluate.anesthesia.closed_loop import planner_vs_baselines
from dosewise.evaluate.anesthesia.offline import planner_offline
from dosewise.planner.training import load_planner
from dosewise.sim.anesthesia.cases import SHIFTED_SPEC, CaseSpec

SHIFTED_COHORT = "age 70-90, BMI 30-40, C50 of propofol and remifentanil / 1.3"


def shifted_spec(spec: CaseSpec) -> CaseSpec:
    """`spec` with the shifted population of `SHIFTED_SPEC` (elderly, obese, more sensitive)."""
    return replace(spec, age_range=SHIFTED_SPEC.age_range, bmi_range=SHIFTED_SPEC.bmi_range, pd_sensitivity=SHIFTED_SPEC.pd_sensitivity)


@dataclass(frozen=True)
class PlannerEvaluation:
    """A planner run's offline metrics and closed loop; every value strict-JSON-able (None where
    no case reached a metric, e.g. never below BIS 60)."""

    run_dir: str
    offline: dict[str, Any]  # source (test / val / summary), MAE per horizon step, reward/value MAE, action MAE mL/h
    closed_loop: dict[str, Any]  # cases, seed, modes, default_mode, policies {name: {metric: {mean, ci95}}}
    shifted: dict[str, Any] | None = None  # the same on the shifted cohort, on request

    def to_dict(self) -> dict[str, Any]:
        """The evaluation JSON."""
        out = {"kind": "planner", "run_dir": self.run_dir, "offline": self.offline, "closed_loop": self.closed_loop}
        if self.shifted is not None:
            out["shifted"] = self.shifted
        return out


def evaluate_planner_dir(
    run_dir: str | Path,
    cases: int | None = None,
    seed: int | None = None,
    data: str | Path | None = None,
    *,
    modes: tuple[str, ...] | None = None,
    shifted: bool = False,
    spec: CaseSpec | None = None,
    max_windows: int | None = None,
    echo: Callable[[str], Any] = lambda _: None,
) -> PlannerEvaluation:
    """Load the run (manifest-checked), compute the offline metrics, then run clinician, PID and
    the planner's modes (default: the run's closed_loop.modes) on `cases` held-out simulated cases
    (default: the run's closed_loop.cases, or 50 when it had none) of cohort `seed` (default the
    run's closed_loop.seed) drawn from `spec` (default `CaseSpec()`); with `shifted` also on the
    shifted cohort: `spec` with the ages, BMIs and drug sensitivity of `SHIFTED_SPEC`."""
    run_dir = Path(run_dir)
    run_dir = run_dir.parent if run_dir.suffix == ".pt" else run_dir
    model, run = load_planner(run_dir)
    summary_path = run_dir / "summary.json"
    try:
        summary = json.loads(summary_path.read_text()) if summary_path.is_file() else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{summary_path}: not readable JSON ({err.__class__.__name__}); train the run again") from None
    offline = planner_offline(model, run, data, summary, max_windows)
    where = (
        f"{offline['windows']} {offline['source']} windows" if offline["source"] != "summary" else "the training's last validation epoch"
    )
    echo(f"offline metrics on {where}")
    loop = run.closed_loop
    cases = cases if cases is not None else loop.cases or 50
    seed = loop.seed if seed is None else seed
    modes = tuple(modes) if modes is not None else tuple(loop.modes)
    echo(f"closed loop: clinician, pid and planner ({', '.join(modes)}) on {cases} held-out simulated cases (seed {seed})")
    header = {"cases": cases, "seed": seed, "modes": list(modes), "default_mode": loop.default_mode}
    spec = spec or CaseSpec()
    closed = {**header, **planner_vs_baselines(model, run, cases, seed, spec, modes)}
    extra = None
    if shifted:
        echo(f"closed loop on the shifted cohort ({SHIFTED_COHORT})")
        extra = {**header, "cohort": SHIFTED_COHORT, **planner_vs_baselines(model, run, cases, seed, shifted_spec(spec), modes)}
    return PlannerEvaluation(str(run_dir), json_safe(offline), json_safe(closed), json_safe(extra) if extra is not None else None)
