"""What limits a trained planner, measured against the simulator's truth: how well its environment
model could possibly predict (the noise floor), whether it knows what a different dose would do
(counterfactual accuracy), and whether imitation fails by not imitating or by drifting.

    python bench/planner_diagnosis.py --run runs/planner_vs_clinician/seed0 [--cases 100] [--loop-cases 200]
        [--clones 32] [--json bench/results/planner_diagnosis.json] [--quick]

1. Noise floor. Held-out cases run under the simulated anesthesiologist; at decision steps t0 (15, 30,
   45, 60, 90 min) the whole simulation (patients, drug amounts, monitor-noise filter) is cloned
   `--clones` times, the future stimulation events are drawn anew and the monitors get fresh noise, and
   each clone takes the clinician's actual next `pre_len` actions. The mean charted BIS and MAP over
   the clones is the oracle's prediction (the expected observation given the exact state and the
   actions); its MAE against what was charted is the floor no model can beat. The model predicts the
   same steps from the charted history (expected value of its BIS and MAP heads).
2. Counterfactual accuracy. From the same states, each drug's current rate set to 0, x0.5, x1.5 and the
   pump's top rate, and joint changes, held for pre_len steps, against holding the current rates: the
   true change of BIS and MAP (noise-free, same stimulation) and the model's predicted change. MAE and
   sign agreement where |true change| >= 1.
3. Imitation. The clinician's next action against the policy head decoded three ways (argmax, expected
   level, median), per drug; the share of decisions that repeat the previous propofol rate; and the
   closed loop of the transformer's policy head and of a small MLP behaviour-cloning baseline on the
   same inputs (the last 8 history steps and the covariates), each decoded three ways.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from dosewise.data.anesthesia import load_cases
from dosewise.data.windows import build_windows, split_by_case
from dosewise.evaluate.anesthesia.closed_loop import evaluate_policies
from dosewise.evaluate.anesthesia.diagnosis import (
    DECISION_MINUTES,
    HELD_OUT_SEED,
    charted,
    counterfactual,
    model_prediction,
    snapshots,
    valid_rows,
)
from dosewise.planner.model import RATE_LEVELS, PlannerModel
from dosewise.planner.policy import (
    Decoding,
    PlannerPolicy,
    decode_levels,
    history_window,
)
from dosewise.planner.training import load_planner
from dosewise.sim.anesthesia.cases import (
    CaseCohort,
    CaseRun,
    CaseSpec,
    sample_cases,
    stimulation,
)
from dosewise.sim.anesthesia.clinician import SimulatedAnesthesiologist

DECODINGS: tuple[Decoding, ...] = ("argmax", "mean", "median")


# -- held-out states ----------------------------------------------------------------------------


def redraw_future_events(cohort: CaseCohort, after_s: float, rng: np.random.Generator, spec: CaseSpec) -> CaseCohort:
    """The cohort with every random stimulation peak that starts after `after_s` drawn anew (the
    gaps are exponential, so the next peak after any time is that time plus a fresh gap); intubation
    and incision, scheduled events, stay. Sizes and lengths of the redrawn peaks are fresh too."""
    starts = cohort.event_start_s.copy()
    lengths, bis, mean_ap = cohort.event_length_s.copy(), cohort.event_bis.copy(), cohort.event_map.copy()
    n, e = starts.shape
    random = np.arange(e)[None, :] >= 2
    redraw = random & (starts > after_s)
    origin = np.maximum(after_s, starts[:, 1:2])  # peaks come after the incision
    gaps = rng.exponential(spec.stimulation_every_min * 60.0, (n, e))
    fresh = origin + np.cumsum(np.where(redraw, gaps, 0.0), axis=1)
    size = rng.uniform(0.5, 1.5, (n, e))
    starts = np.where(redraw, fresh, starts)
    lengths = np.where(redraw, rng.uniform(120, 480, (n, e)), lengths)
    closing = starts + lengths > cohort.duration_s[:, None] - 600
    bis = np.where(redraw, np.where(closing, 0.0, 8.0 * size), bis)
    mean_ap = np.where(redraw, np.where(closing, 0.0, 12.0 * size), mean_ap)
    return replace(cohort, event_start_s=starts, event_length_s=lengths, event_bis=bis, event_map=mean_ap)


# -- 1. noise floor -----------------------------------------------------------------------------


def noise_floor(model: PlannerModel, states, clones: int, spec: CaseSpec, seed: int) -> dict:
    k = model.pre_len
    err = {name: [] for name in ("oracle_bis", "oracle_map", "model_bis", "model_map")}
    rng = np.random.default_rng(seed)
    for t0, state, actions in states:
        rows = valid_rows(state, k)
        observed_bis, observed_map = charted(state.clone(), actions)
        mean_bis, mean_map = np.zeros_like(observed_bis), np.zeros_like(observed_map)
        for _ in range(clones):
            clone = state.clone()
            clone.cohort = redraw_future_events(clone.cohort, t0 * spec.step_s, rng, spec)
            clone.reseed(int(rng.integers(2**32)))
            bis, mean_ap = charted(clone, actions)
            mean_bis += bis / clones
            mean_map += mean_ap / clones
        model_bis, model_map = model_prediction(model, state, actions)
        err["oracle_bis"].append(np.abs(mean_bis - observed_bis)[rows])
        err["oracle_map"].append(np.abs(mean_map - observed_map)[rows])
        # The model is trained on charted values rounded to whole BIS points and mmHg.
        err["model_bis"].append(np.abs(model_bis - np.round(observed_bis))[rows])
        err["model_map"].append(np.abs(model_map - np.round(observed_map))[rows])
    per_h = {name: np.concatenate(values).mean(axis=0) for name, values in err.items()}
    return {
        "states": int(sum(len(e) for e in err["oracle_bis"])),
        "clones": clones,
        **{f"{name}_mae": per_h[name].tolist() for name in per_h},
        "bis_ratio": (per_h["model_bis"] / per_h["oracle_bis"]).tolist(),
        "map_ratio": (per_h["model_map"] / per_h["oracle_map"]).tolist(),
    }


# -- 1b. what the charted history allows ---------------------------------------------------------

CEILING_STEPS = 16  # history steps the one-step predictors see
# Inputs of the one-step predictors: the charted history only (what any model of the data sees),
# the same with the noise-free BIS in place of the charted one, and that plus the surgical
# stimulation at the decision (both privileged: no dataset has them).
CEILING_INPUTS = ("charted", "noise-free BIS", "noise-free BIS + stimulation")


def ceiling_features(run: CaseRun, t: int, rows: np.ndarray, action: np.ndarray, inputs: str) -> np.ndarray:
    """[n, F] float32 input of a one-step BIS predictor at decision t of `run`, cases `rows`: the
    last CEILING_STEPS charted vitals (BIS noise-free with a privileged `inputs`), the rates set
    one step before each, a real-step flag, the induction flag, the covariates, the action at t
    [n, 2], and with "+ stimulation" the stimulation's BIS and MAP parts at t."""
    steps = np.arange(max(0, t - CEILING_STEPS + 1), t + 1)
    vitals = run.vitals[steps][:, rows].transpose(1, 0, 2).copy()  # [n, s, 5]
    if inputs != "charted":  # what the monitor would chart without its noise (97.4 before induction)
        clean = run.bis_true[np.maximum(steps * run.spec.step_s - 1, 0)][:, rows].T
        vitals[..., 0] = np.where(steps == 0, 97.4, clean)
    before = np.where((steps > 0)[None, :, None], run.rates[np.maximum(steps - 1, 0)][:, rows].transpose(1, 0, 2), 0)
    x = np.zeros((len(rows), CEILING_STEPS, 8))
    x[:, CEILING_STEPS - len(steps) :, :5] = (vitals - [50.0, 80.0, 110.0, 60.0, 70.0]) / [15.0, 15.0, 20.0, 12.0, 12.0]
    x[:, CEILING_STEPS - len(steps) :, 5:7] = before / 100.0
    x[:, CEILING_STEPS - len(steps) :, 7] = 1.0
    cov = run.cohort.covariates
    extra = [
        np.stack(
            [
                (cov.age[rows] - 58) / 14,
                cov.sex[rows],
                (cov.height[rows] - 165) / 9,
                (cov.weight[rows] - 65) / 12,
                np.full(len(rows), float(t * run.spec.step_s < 600)),
            ],
            axis=1,
        ),
        np.asarray(action, dtype=np.float64) / 100.0,
    ]
    if inputs.endswith("stimulation"):
        extra.append(stimulation(run.cohort, t * float(run.spec.step_s))[rows] / 10.0)
    return np.concatenate([x.reshape(len(rows), -1), *extra], axis=1).astype(np.float32)


def information_ceiling(states, n_cases: int, steps: int, spec: CaseSpec, seed: int, oracle_h1: float) -> dict:
    """One-step BIS predictors (a 2-layer MLP to the 101 BIS classes, expected value) trained on
    `n_cases` fresh simulated cases under the clinician, one per `CEILING_INPUTS`, tested on the
    noise floor's states: how close to the oracle a learner gets from the charted history, and
    how much of the rest is measurement noise and stimulation that no dataset records."""
    cohort = sample_cases(n_cases, np.random.default_rng(seed), spec)
    clinician = SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s)
    run = CaseRun(cohort, seed + 2, spec)
    while not run.done:
        run.advance(*clinician(run.history()))
    result = {"train_cases": n_cases, "train_steps": steps, "history_steps": CEILING_STEPS, "h1_bis_mae": {}, "ratio": {}}
    for inputs in CEILING_INPUTS:
        x, y = [], []
        for t in range(run.horizon - 1):
            rows = np.flatnonzero(run.steps > t + 1)
            x.append(ceiling_features(run, t, rows, run.rates[t, rows], inputs))
            y.append(np.clip(np.floor(run.vitals[t + 1, rows, 0] + 0.5), 0, 100))
        features, targets = torch.from_numpy(np.concatenate(x)), torch.from_numpy(np.concatenate(y)).long()
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(features.shape[1], 256), nn.GELU(), nn.Linear(256, 256), nn.GELU(), nn.Linear(256, 101))
        optimiser = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimiser, steps)
        generator = torch.Generator().manual_seed(0)
        for _ in range(steps):
            index = torch.randint(0, len(targets), (256,), generator=generator)
            loss = nn.functional.cross_entropy(net(features[index]), targets[index])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
            schedule.step()
        errors = []
        for t0, state, actions in states:
            rows = np.flatnonzero(valid_rows(state, actions.shape[1]))
            observed, _ = charted(state.clone(), actions)
            with torch.no_grad():
                logits = net(torch.from_numpy(ceiling_features(state, t0, rows, actions[rows, 0], inputs)))
            predicted = (logits.softmax(-1) @ torch.arange(101.0)).numpy()
            errors.append(np.abs(predicted - np.round(observed[rows, 0])))
        mae = float(np.concatenate(errors).mean())
        result["h1_bis_mae"][inputs] = mae
        result["ratio"][inputs] = mae / oracle_h1
    return result


# -- 2. counterfactual accuracy: `counterfactual` of dosewise.evaluate.anesthesia.diagnosis ------


# -- 3. imitation -------------------------------------------------------------------------------

MLP_STEPS = 8  # history steps the MLP baseline sees


class MLPCloner(nn.Module):
    """The behaviour-cloning baseline without a transformer: the last MLP_STEPS history steps and the
    covariates, normalised like the planner's inputs, through a 2-layer MLP to 2 x 201 logits."""

    def __init__(self, planner: PlannerModel, hidden: int = 256) -> None:
        super().__init__()
        self.planner = planner  # for its normalisation statistics only
        n_in = MLP_STEPS * 9 + planner.n_static
        self.net = nn.Sequential(
            nn.Linear(n_in, hidden), nn.GELU(), nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 2 * RATE_LEVELS)
        )

    def forward(self, history: torch.Tensor, mask: torch.Tensor, static: torch.Tensor) -> torch.Tensor:
        p = self.planner
        recent, real = history[:, -MLP_STEPS:], mask[:, -MLP_STEPS:, None].float()
        vitals = (recent[..., :5] - p.vital_mean) / p.vital_std
        features = torch.cat([vitals, recent[..., 5:7] / 100.0, recent[..., 7:8], real], dim=-1) * real
        covariates = (static - p.static_mean) / p.static_std
        return self.net(torch.cat([features.flatten(1), covariates], dim=1)).view(-1, 2, RATE_LEVELS)


def train_mlp_cloner(planner: PlannerModel, windows, steps: int, seed: int) -> MLPCloner:
    torch.manual_seed(seed)
    cloner = MLPCloner(planner)
    for parameter in cloner.planner.parameters():
        parameter.requires_grad_(False)
    optimiser = torch.optim.AdamW(list(cloner.net.parameters()), lr=1e-3, weight_decay=1e-4)
    history = torch.from_numpy(windows.history)
    mask = torch.from_numpy(windows.history_mask)
    static = torch.from_numpy(windows.static)
    target = torch.from_numpy(windows.actions[:, 0])  # [W, 2] the action at the decision
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        rows = torch.randint(0, len(target), (256,), generator=generator)
        logits = cloner(history[rows], mask[rows], static[rows])
        loss = nn.functional.cross_entropy(logits.flatten(0, 1), target[rows].flatten())
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    return cloner.eval()


class ClonerPolicy:
    """The MLP baseline as a closed-loop case policy."""

    def __init__(self, cloner: MLPCloner, decoding: Decoding) -> None:
        self.cloner, self.decoding = cloner, decoding

    @torch.no_grad()
    def __call__(self, history):
        window, mask, static = history_window(history, self.cloner.planner.max_len, concentrations=self.cloner.planner.concentrations)
        logits = self.cloner(torch.from_numpy(window), torch.from_numpy(mask), torch.from_numpy(static))
        levels = decode_levels(logits.log_softmax(-1), self.decoding).numpy()
        return levels[:, 0], levels[:, 1]


@torch.no_grad()
def action_errors(model: PlannerModel, cloner: MLPCloner, states) -> dict:
    """|decoded action - the clinician's| per drug at the held-out decisions (mL/h)."""
    errors = {f"{who}_{decoding}": [] for who in ("transformer", "mlp") for decoding in DECODINGS}
    for _, state, actions in states:
        window, mask, static = (
            torch.from_numpy(x) for x in history_window(state.history(), model.max_len, concentrations=model.concentrations)
        )
        memory, _ = model.represent(window, mask, static)
        heads = {"transformer": model.policy_logits(memory[:, -1]).log_softmax(-1), "mlp": cloner(window, mask, static).log_softmax(-1)}
        for who, log_policy in heads.items():
            for decoding in DECODINGS:
                errors[f"{who}_{decoding}"].append(np.abs(decode_levels(log_policy, decoding).numpy() - actions[:, 0]))
    return {name: dict(zip(("propofol", "remifentanil"), np.concatenate(v).mean(axis=0).tolist())) for name, v in errors.items()}


def repeat_share(traj) -> float:
    """Share of decisions (after the first) that repeat the previous propofol rate."""
    rates, mask = traj.rates[..., 0], traj.mask
    return float(((rates[1:] == rates[:-1]) & mask[1:]).sum() / mask[1:].sum())


def imitation(model: PlannerModel, cloner: MLPCloner, states, loop_cases: int, seed: int, spec: CaseSpec) -> dict:
    from dosewise.sim.anesthesia.cases import run_cases

    policies = {"clinician": lambda cohort: SimulatedAnesthesiologist(cohort, seed + 1, step_s=spec.step_s)}
    for decoding in DECODINGS:
        policies[f"transformer_bc_{decoding}"] = lambda cohort, d=decoding: PlannerPolicy(model, "argmax", decoding=d)
        policies[f"mlp_bc_{decoding}"] = lambda cohort, d=decoding: ClonerPolicy(cloner, d)
    closed = evaluate_policies(policies, n_cases=loop_cases, seed=seed, spec=spec)["policies"]
    keep = ("pct_bis_40_60", "pct_map_below_65", "bis_nadir", "propofol_mg_kg_h", "remifentanil_ug_kg_min")
    loop = {name: {key: closed[name][key] for key in keep} for name in closed}
    cohort = sample_cases(min(loop_cases, 50), np.random.default_rng(seed), spec)
    repeats = {
        name: repeat_share(run_cases(cohort, policies[name](cohort), seed + 2, spec))
        for name in ("clinician", "transformer_bc_argmax", "transformer_bc_mean", "mlp_bc_argmax")
    }
    return {"action_mae_ml_h": action_errors(model, cloner, states), "closed_loop": loop, "repeat_previous_propofol": repeats}


# -- entry point --------------------------------------------------------------------------------


def imitation_section(args: argparse.Namespace, model: PlannerModel, run, states, spec: CaseSpec) -> dict:
    """Section 3 of the diagnosis, printed: the MLP baseline trained on the run's training windows."""
    data = args.data or run.data_path
    if data is None:
        raise SystemExit(f"{args.run} does not record its training data; pass --data")
    frame, _ = load_cases(data, run.data)
    train_windows = build_windows(split_by_case(frame, run.windows)["train"], run.windows)
    cloner = train_mlp_cloner(model, train_windows, args.mlp_steps, seed=0)
    imitated = imitation(model, cloner, states, args.loop_cases, HELD_OUT_SEED + 20, spec)
    print("imitation: action MAE at held-out decisions (mL/h, propofol / remifentanil)")
    for name, value in imitated["action_mae_ml_h"].items():
        print(f"  {name:<24} {value['propofol']:6.2f} / {value['remifentanil']:6.2f}")
    print(f"closed loop on {args.loop_cases} held-out cases")
    for name, row in imitated["closed_loop"].items():
        print(
            f"  {name:<24} BIS 40-60 {row['pct_bis_40_60']['mean']:5.1f} %  MAP<65 {row['pct_map_below_65']['mean']:5.1f} %"
            f"  nadir {row['bis_nadir']['mean']:5.1f}  propofol {row['propofol_mg_kg_h']['mean']:5.2f} mg/kg/h"
        )
    print(
        "decisions repeating the previous propofol rate: "
        + ", ".join(f"{k} {100 * v:.1f} %" for k, v in imitated["repeat_previous_propofol"].items())
    )
    return imitated


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, required=True, help="a trained planner run directory")
    parser.add_argument("--data", type=Path, help="the run's training cases (default: the path its config records)")
    parser.add_argument("--cases", type=int, default=100, help="held-out cases whose states are tested")
    parser.add_argument("--clones", type=int, default=32, help="simulator clones per state for the noise floor")
    parser.add_argument("--loop-cases", type=int, default=200, help="held-out cases of the imitation closed loops")
    parser.add_argument("--mlp-steps", type=int, default=4000, help="training steps of the MLP baseline")
    parser.add_argument(
        "--ceiling-cases", type=int, default=1500, help="simulated training cases of the one-step predictors (0: skip them)"
    )
    parser.add_argument("--ceiling-steps", type=int, default=12000, help="training steps of each one-step predictor")
    parser.add_argument("--quick", action="store_true", help="few cases and clones: a smoke run")
    parser.add_argument("--env-only", action="store_true", help="the noise floor and counterfactuals only (no imitation)")
    parser.add_argument("--json", type=Path, default=Path("bench/results/planner_diagnosis.json"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.quick:
        args.cases, args.clones, args.loop_cases, args.mlp_steps = 12, 4, 12, 200
        args.ceiling_cases, args.ceiling_steps = 30, 200
    model, run = load_planner(args.run)
    spec = CaseSpec()
    started = time.perf_counter()
    states = snapshots(args.cases, model.pre_len, spec, HELD_OUT_SEED)
    floor = noise_floor(model, states, args.clones, spec, HELD_OUT_SEED + 10)
    print(f"noise floor ({floor['states']} states x {args.clones} clones), per horizon step 1..{model.pre_len}")
    for vital in ("bis", "map"):
        print(
            f"  {vital.upper()} MAE oracle {np.round(floor[f'oracle_{vital}_mae'], 2)}  model {np.round(floor[f'model_{vital}_mae'], 2)}"
            f"  ratio {np.round(floor[f'{vital}_ratio'], 2)}"
        )
    ceiling = None
    if args.ceiling_cases:
        ceiling = information_ceiling(states, args.ceiling_cases, args.ceiling_steps, spec, HELD_OUT_SEED + 30, floor["oracle_bis_mae"][0])
        print(f"one-step BIS predictors (MLP, {args.ceiling_cases} simulated training cases): h1 MAE and ratio to the oracle")
        for inputs, mae in ceiling["h1_bis_mae"].items():
            print(f"  {inputs:<30} {mae:.2f} ({ceiling['ratio'][inputs]:.2f}x)")
    effects = counterfactual(model, states)
    print("counterfactual change over horizon steps 1..K, true vs model (mean), sign agreement where |true| >= 1")
    for name, entry in effects["variants"].items():
        b = entry["bis"]
        print(
            f"  {name:<34} dBIS true {np.round(b['true_mean'], 1)} model {np.round(b['pred_mean'], 1)} "
            f"sign {100 * b['sign_agreement']:5.1f} % (n {b['sign_counted']}); dMAP sign {100 * entry['map']['sign_agreement']:5.1f} %"
        )
    for vital in ("bis", "map"):
        o = effects["overall"][vital]
        print(
            f"  overall d{vital.upper()}: MAE per step {np.round(o['mae'], 2)}, sign agreement {100 * o['sign_agreement']:.1f} % of {o['sign_counted']}"
        )
    imitated = None if args.env_only else imitation_section(args, model, run, states, spec)
    result = {
        "run": str(args.run),
        "quick": args.quick,
        "cases": args.cases,
        "decision_minutes": list(DECISION_MINUTES),
        "held_out_seed": HELD_OUT_SEED,
        "summary_val": {
            k: v for k, v in json.loads((args.run / "summary.json").read_text())["final"].items() if k.startswith(("val_", "rollout/"))
        },
        "noise_floor": floor,
        "information_ceiling": ceiling,
        "counterfactual": effects,
        "imitation": imitated,
        "machine": f"{platform.processor() or platform.machine()}, torch {torch.__version__}, 1 thread",
        "wall_s": time.perf_counter() - started,
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2, allow_nan=False))
    print(f"wrote {args.json} ({result['wall_s'] / 60:.1f} min)")


if __name__ == "__main__":
    main()
