"""The Python API of dosewise: each function takes typed inputs, returns a typed result, and is
what one `dosewise` command runs (the CLI only parses options and prints).

    from dosewise import api
    trained = api.train_iql_from_file("data.csv", "runs/iql")                 # IQLTraining
    evaluation = api.evaluate_iql("runs/iql", patients=1000)                   # IQLEvaluation
    advice = api.recommend_iql("runs/iql", {"vanco_level": 25.0, ...})        # DoseRecommendation
    page = api.report_iql("runs/iql")                                          # Path of index.html

    run = api.resolve_planner_run("planner", "cases.csv")                     # PlannerRunConfig
    planner = api.train_planner_from_file(run, "cases.csv", "runs/planner")    # PlannerRun
    scores = api.evaluate_planner("runs/planner", cases=100)                   # PlannerEvaluation
    rates = api.recommend_planner("runs/planner", "case_so_far.csv")           # PlannerRecommendation
    table = api.compare_planner_strategies("cases.csv", "runs/strategies")     # dict (comparison.json)
    page = api.report_planner("runs/planner")                                  # Path of index.html

`dosewise.planner.policy.PlannerPolicy` acts on a case history with a trained planner.
"""

from __future__ import annotations

import io
import json
import shutil
import statistics
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pandas as pd
import yaml

from dosewise.algos.config import IQLRunConfig, TrainConfig
from dosewise.algos.recommend import Recommendation, StateError, recommend, require_finite, validate_state
from dosewise.algos.trained import TrainedIQL
from dosewise.checkpoint import CheckpointError, verify_manifest, write_bytes_atomic, write_json_atomic
from dosewise.config import ConfigError, config_path, load_config
from dosewise.data.anesthesia import CaseReport, load_cases
from dosewise.data.kinds import DATA_KINDS, DATA_PRESETS, anesthesia_preset, detect_kind, file_columns
from dosewise.data.loading import DataError, DataReport, load_table
from dosewise.data.transitions import build_transitions
from dosewise.evaluate.anesthesia.closed_loop import evaluate_planner_run
from dosewise.evaluate.anesthesia.run_evaluation import evaluate_planner_dir
from dosewise.evaluate.anesthesia.strategies import compare_strategies
from dosewise.planner.config import PlannerRunConfig
from dosewise.planner.model import PlannerModel
from dosewise.planner.recommend import PlannerRecommendation
from dosewise.planner.run import resolve_run, train_from_file
from dosewise.planner.training import PlannerRun

if TYPE_CHECKING:
    from fastapi import FastAPI

    from dosewise.algos.export import ExportResult

# Outcomes compared member by member in an ensemble's evaluation.
MEMBER_OUTCOMES = ("auc_in_target_frac", "aki_rate", "mean_return")

Echo = Callable[[str], Any]


@dataclass(frozen=True)
class IQLTraining:
    """What `train_iql_from_file` did: where, on how much data, which seeds."""

    run_dir: Path
    run: IQLRunConfig  # the resolved config, as saved in run_dir/config.yaml
    report: DataReport  # rows read, dropped (per column) and kept, patients
    transitions: int
    seeds: list[int]  # one per ensemble member
    losses: dict | None  # losses.json of an ensemble: final losses per member and their mean +- sd


@dataclass(frozen=True)
class IQLSweep:
    """What `sweep_iql_from_file` did: one run folder per grid point, the table in sweep.json."""

    run_dir: Path
    report: DataReport
    transitions: int
    points: int
    seeds: list[int]
    summary: list[dict]  # per point: config and final losses (mean, sd over seeds)


@dataclass(frozen=True)
class IQLEvaluation:
    """Offline statistics of the critics, the closed loop against the clinician and, on request,
    off-policy estimates next to the simulator's true value; an ensemble also member by member."""

    offline: dict[str, Any]  # num_transitions, q_stats, v_stats, greedy_q, behaviour_q, mc_return ...
    closed_loop: dict[str, Any]  # learned / clinician / difference, mean and 95 % CI; bayesian / bayesian_free beside them
    ope: dict[str, Any] | None = None
    ensemble: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        """The evaluation JSON: offline statistics at the top level, then the sections."""
        out = {**self.offline, "closed_loop": self.closed_loop}
        out.update({name: getattr(self, name) for name in ("ope", "ensemble") if getattr(self, name) is not None})
        return out


@dataclass(frozen=True)
class DoseRecommendation(Recommendation):
    """A `Recommendation` with the ensemble's view: members, their actions and their spread."""

    members: int = 1
    policy_action_sd: float = 0.0  # sd of the members' policy actions; 0 for a single model
    member_actions: list[float] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass(frozen=True)
class DemoResult:
    data: Path
    run_dir: Path
    report: DataReport
    evaluation: IQLEvaluation
    evaluation_path: Path
    page: Path


def run_kind(run: str | Path) -> Literal["iql", "planner"]:
    """Which algorithm made a run directory (or the directory of a model.pt): its config.yaml's
    `algo` ("iql" or "planner"); the commands that take --run dispatch on it."""
    run_dir = Path(run)
    run_dir = run_dir.parent if run_dir.suffix == ".pt" else run_dir
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(
            f"{run_dir}: not a run directory (no config.yaml); expected the --out of `dosewise train iql` or `train planner`"
        )
    try:
        algo = (yaml.safe_load(path.read_text()) or {}).get("algo", "iql")
    except (yaml.YAMLError, AttributeError) as err:
        verify_manifest(path)  # a config damaged after training is reported as such, not as bad YAML
        raise CheckpointError(f"{path}: not a readable run config ({err.__class__.__name__})") from None
    if algo not in ("iql", "planner"):
        raise CheckpointError(f"{path}: algo is {algo!r}; expected 'iql' or 'planner'")
    return algo


def resolve_iql_run(config: str | Path | None, data: str | Path, steps: int | None = None, seed: int | None = None) -> IQLRunConfig:
    """The run config (a YAML path or a named config; default the conservative set) with the data
    path recorded and `steps` / `seed` overriding train.steps / train.seed."""
    run = load_config(config, IQLRunConfig) if config else IQLRunConfig()
    train = run.train.model_dump()
    train.update({k: v for k, v in {"steps": steps, "seed": seed}.items() if v is not None})
    return run.model_copy(update={"train": TrainConfig(**train), "data_path": str(Path(data).resolve())})


def train_iql_from_file(
    data: str | Path,
    out: str | Path,
    config: str | Path | IQLRunConfig | None = None,
    *,
    seeds: int = 1,
    resume: bool = False,
    compile: bool = False,
    show_progress: bool = False,
    echo: Echo = print,
) -> IQLTraining:
    """Load and check `data`, then train IQL into `out` (config.yaml, tb/, checkpoints/, model.pt;
    with seeds > 1 an ensemble of members seed..seed+seeds-1 on stacked weights, and losses.json)."""
    from dosewise.algos.training import train_iql

    run, report, transitions, members = _prepare(data, config, seeds, echo)
    ensemble = f" x {seeds} members (seeds {members[0]}..{members[-1]})" if seeds > 1 else ""
    echo(f"{transitions.n} transitions from {report.patients} patients; training {run.train.steps} steps{ensemble} -> {out}")
    train_iql(run, transitions, out, resume=resume, show_progress=show_progress, seeds=members, compile=compile)
    losses_path = Path(out) / "losses.json"
    losses = json.loads(losses_path.read_text()) if seeds > 1 and losses_path.exists() else None
    return IQLTraining(Path(out), run, report, transitions.n, members, losses)


def sweep_iql_from_file(
    data: str | Path,
    out: str | Path,
    sweep: str | Path,
    config: str | Path | IQLRunConfig | None = None,
    *,
    seeds: int = 1,
    resume: bool = False,
    compile: bool = False,
    show_progress: bool = False,
    echo: Echo = print,
) -> IQLSweep:
    """Every point of the sweep grid (`sweep:` YAML with lists of lr, gamma, beta, tau, hidden),
    once per seed, trained in one process on stacked weights: OUT/<point>/ is a run per point."""
    from dosewise.algos.sweep import load_grid, train_sweep

    run, report, transitions, members = _prepare(data, config, seeds, echo)
    grid = load_grid(sweep, run.iql)
    echo(f"{transitions.n} transitions; sweeping {len(grid)} configs x {seeds} seeds, {run.train.steps} steps -> {out}")
    table = train_sweep(run, transitions, out, grid, members, resume=resume, show_progress=show_progress, compile=compile)
    return IQLSweep(Path(out), report, transitions.n, len(grid), members, table["summary"])


def evaluate_iql(
    run_dir: str | Path,
    patients: int = 1000,
    seed: int = 1000,
    data: str | Path | None = None,
    *,
    per_member: bool = True,
    ope: bool = False,
    bayesian: bool = True,
) -> IQLEvaluation:
    """Offline statistics on the training data (default: the file the run records), the learned
    policy (an ensemble: the members' mean) against the clinician on `patients` held-out simulated
    patients, optionally OPE, and with `per_member` every member of an ensemble on the same patients.
    With `bayesian` the closed loop also holds MAP-Bayesian dosing on the same patients
    (`closed_loop["bayesian"]` through the learned policy's action space, `["bayesian_free"]` setting the regimen freely)."""
    from dosewise.evaluate.vancomycin.closed_loop import bayesian_baselines, evaluate_vancomycin
    from dosewise.evaluate.vancomycin.offline import offline_statistics

    model = TrainedIQL.load(run_dir)
    data_path = Path(data) if data else (Path(model.run_config.data_path) if model.run_config.data_path else None)
    if data_path is None:
        raise DataError(f"{run_dir}: the run does not record its training data; pass --data")
    frame, _ = load_table(data_path, model.data_config)
    transitions = build_transitions(frame, model.data_config)
    offline = offline_statistics(model, transitions)
    features = model.feature_names
    baselines = bayesian_baselines() if bayesian else None
    closed_loop = evaluate_vancomycin(model.policy_action, patients, seed, features=features, baselines=baselines)
    estimates = None
    if ope:
        from dosewise.evaluate.vancomycin.off_policy import OffPolicyEvaluator
        from dosewise.evaluate.vancomycin.ope import vancomycin_true_value

        gamma = model.config.gamma
        judge = OffPolicyEvaluator(frame, transitions, gamma, model.data_config, seed, source=str(data_path))
        estimates = judge.evaluate(model.policy_action, features)
        estimates["true_value"] = vancomycin_true_value(
            model.policy_action, gamma, n_patients=max(patients, 2000), seed=seed, features=features
        )
    ensemble = None
    if model.members > 1 and per_member:
        members = {}
        for k, member_seed in enumerate(model.seeds):
            closed = evaluate_vancomycin(lambda obs, k=k: model.policy_members(obs)[k], patients, seed, features=features)
            members[str(member_seed)] = {key: closed["learned"][key]["mean"] for key in MEMBER_OUTCOMES}
        rows = list(members.values())
        ensemble = {
            "seeds": model.seeds,
            "per_member": members,
            "summary": {
                key: {"mean": statistics.mean(r[key] for r in rows), "sd": statistics.stdev(r[key] for r in rows)}
                for key in MEMBER_OUTCOMES
            },
        }
    return IQLEvaluation(offline=offline, closed_loop=closed_loop, ope=estimates, ensemble=ensemble)


# A planner run's offline metrics on its held-out windows and its closed loop next to the clinician
# and the PID, with 95 % bootstrap intervals (`PlannerEvaluation.to_dict()` is the evaluation JSON).
evaluate_planner = evaluate_planner_dir


def recommend_iql(
    run_or_model: str | Path | TrainedIQL,
    state: Mapping[str, object] | None = None,
    *,
    history: str | Path | pd.DataFrame | None = None,
    patient: str | None = None,
    allow_out_of_range: bool = False,
) -> DoseRecommendation:
    """The dose recommendation for one patient state {feature: value} (every feature of the
    model, raw clinical units): the policy mean and the next dose in mg it means, the critic's
    greedy action and Q-curve, the ensemble's spread, and warnings (outside the training range, a
    greedy action far from the policy, a predicted exposure outside its target).

    `history` (a .csv or .parquet file with the training file's columns, or its rows as a DataFrame)
    is the patient's rows so far: the state is its last row, and the patient's MAP-Bayesian PK from
    all their levels predicts the AUC24 and trough under the recommended dose. `patient` picks one of
    several patients. Given with a state, the state must be the history's last row.

    A value outside its physiological range (`dosewise.data.schema.PHYSIOLOGICAL_BOUNDS`) is a
    StateError unless `allow_out_of_range`, which records each such value in `overrides`; a
    non-finite model output is a StateError too; a bad history is a DataError."""
    from dosewise.algos.recommend import history_state, load_history, patient_rows

    model = run_or_model if isinstance(run_or_model, TrainedIQL) else TrainedIQL.load(run_or_model)
    rows = None
    if history is None:
        if state is None:
            raise StateError(f"give the patient's state or their history; the model uses: {', '.join(model.feature_names)}")
        if patient is not None:
            raise StateError(f"patient '{patient}' picks a patient of a history; no history was given")
    else:
        source = "history" if isinstance(history, pd.DataFrame) else str(history)
        config = model.data_config
        rows = patient_rows(load_history(history, config, source), config, patient, source)
        last = history_state(rows, model.feature_names)
        if state is not None:
            given = validate_state(state, model.feature_names, allow_out_of_range)
            differ = [f"{name} = {given[name]:g} (history {last[name]:g})" for name in model.feature_names if given[name] != last[name]]
            if differ:
                raise StateError(f"the state differs from the history's last row: {'; '.join(differ)}; give one of them")
        state = last
    rec = recommend(model, state, allow_out_of_range=allow_out_of_range, history=rows)
    obs = [[rec.state[name] for name in model.feature_names]]
    member_actions = model.policy_members(obs)[:, 0]
    spread = model.policy_spread(obs)[0]
    require_finite("member policy actions", member_actions)
    require_finite("policy spread", spread)
    return DoseRecommendation(
        **{name: getattr(rec, name) for name in Recommendation.__dataclass_fields__},
        members=model.members,
        policy_action_sd=float(spread),
        member_actions=[float(a) for a in member_actions],
    )


def recommend_planner(
    run: str | Path | tuple[PlannerModel, PlannerRunConfig],
    history: str | Path | pd.DataFrame,
    case_id: str | None = None,
    mode: str | None = None,
    max_propofol: int | None = None,
    max_remifentanil: int | None = None,
    data_preset: str | None = None,
) -> PlannerRecommendation:
    """The next propofol and remifentanil rates for the case so far in `history` (a .csv or
    .parquet file, or its rows as a DataFrame), with the planner run `run` (a directory, its
    model.pt, or what `load_planner` returned): the predicted BIS and MAP under them and under the
    current rates, their learned value, and warnings.

    The history is read by `load_cases` under the run's data config, the contract the run trained
    on (impossible vitals masked, short gaps carried forward, the same step); `data_preset`
    (canonical or vitaldb) takes that preset's column names instead, and the run's other settings.
    `case_id` picks one of several cases; `mode` defaults to the run's closed_loop.default_mode,
    the dose limits (mL/h) to its closed_loop.max_rate."""
    from dosewise.data.anesthesia import load_case_rows
    from dosewise.planner.recommend import recommend_planner as recommend_case
    from dosewise.planner.training import load_planner

    if isinstance(run, tuple):
        model, config = run
    else:
        if run_kind(run) != "planner":
            raise ConfigError(f"{run}: an IQL run; planner recommendations need a run of `dosewise train planner` (IQL runs take a state)")
        model, config = load_planner(run)
    data = config.data
    if data_preset is not None:
        if data_preset not in DATA_PRESETS:
            raise ConfigError(f"unknown data preset '{data_preset}'; expected one of: {', '.join(DATA_PRESETS)}")
        layout = DATA_PRESETS[data_preset]
        data = data.model_copy(update={name: getattr(layout, name) for name in ("case_id", "time", "tracks", "covariates")})
    frame, report = load_case_rows(history, data, "history") if isinstance(history, pd.DataFrame) else load_cases(history, data)
    limits = config.closed_loop.max_rate
    max_rate = (limits[0] if max_propofol is None else max_propofol, limits[1] if max_remifentanil is None else max_remifentanil)
    return recommend_case(model, config, frame, case_id=case_id, mode=mode, max_rate=max_rate, report=report)


def report_iql(run_dir: str | Path, out: str | Path | None = None, evaluation: str | Path | None = None) -> Path:
    """The HTML analysis report with PNG figures (default folder RUN/report); returns index.html."""
    from dosewise.evaluate.vancomycin.report import write_report

    return write_report(Path(run_dir), Path(out) if out else None, Path(evaluation) if evaluation else None)


def report_planner(
    run: str | Path, out: str | Path | None = None, cases: int = 6, seed: int = 300_000, evaluation: str | Path | None = None
) -> Path:
    """The HTML report of a planner run with PNG figures (default folder RUN/report): `cases`
    held-out simulated cases under the planner and the simulated anesthesiologist, BIS predicted
    per horizon step and after propofol changes against the simulator, training curves with their
    alarms, the closed-loop and strategy tables; returns index.html."""
    from dosewise.evaluate.anesthesia.report import write_planner_report

    return write_planner_report(run, out, cases=cases, seed=seed, evaluation=evaluation)


def train_planner_from_file(
    run: PlannerRunConfig, data: str | Path, out: str | Path, show_progress: bool = False, echo: Echo = print
) -> PlannerRun:
    """Train the planner on a cases file into `out`, then evaluate it closed loop next to the
    simulated anesthesiologist (`run.closed_loop`); summary.json holds both."""
    result = train_from_file(run, data, out, show_progress=show_progress, echo=echo)
    evaluate_planner_run(result, run, out, echo)
    return result


# The planner's run config (a YAML file or a packaged name, default the `planner` recipe) and the
# strategy comparison, as the API names them.
resolve_planner_run = resolve_run
compare_planner_strategies = compare_strategies


def export_iql(run: str | Path | TrainedIQL, out: str | Path, fmt: str = "onnx", check: bool = True) -> ExportResult:
    """The vancomycin policy and critics as ONNX or TorchScript for serving elsewhere, checked
    against PyTorch when `check`; a JSON description lands next to it (`ExportResult.sidecar`)."""
    from dosewise.algos.export import export_iql as export

    return export(run, out, fmt, check=check)


def service_app(runs: list[str | Path], db: str | None = None, host: str = "127.0.0.1") -> FastAPI:
    """The decision-support service over `runs` as an ASGI app (for uvicorn, or httpx in tests),
    audit log and tokens at `db` (default $DOSEWISE_HOME/serve.db); `dosewise serve` runs it."""
    from dosewise.serve.server import build_app

    return build_app(runs, db, host)


def write_table(frame, out: str | Path) -> Path:
    """A simulated or exported table to .csv or .parquet (by suffix), written atomically."""
    out = Path(out)
    if out.suffix not in (".parquet", ".csv"):
        raise DataError(f"{out}: unsupported output suffix {out.suffix!r}; use .csv or .parquet")
    if out.suffix == ".parquet":
        buffer = io.BytesIO()
        frame.to_parquet(buffer, index=False)
        return write_bytes_atomic(out, buffer.getvalue())
    return write_bytes_atomic(out, frame.to_csv(index=False).encode())


def simulate_vancomycin(out: str | Path, patients: int = 150, seed: int = 0) -> int:
    """Simulated vancomycin courses under the simulated clinician (one row per patient per 4 h)
    written to `out` (.csv or .parquet); returns the number of rows."""
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    frame = simulate_dataset(patients, seed)
    write_table(frame, out)
    return len(frame)


def simulate_anesthesia(out: str | Path, cases: int = 500, seed: int = 0) -> int:
    """Simulated TIVA cases under the simulated anesthesiologist (one row per case per minute,
    VitalDB track names) written to `out`; returns the number of rows."""
    from dosewise.sim.anesthesia.clinician import simulate_cases

    frame = simulate_cases(cases, seed)
    write_table(frame, out)
    return len(frame)


def inspect_data(
    path: str | Path,
    config: str | Path | None = None,
    kind: str | None = None,
    data_preset: str | None = None,
) -> DataReport | CaseReport:
    """Validate a dosing file and return its load report: a DataReport for a vancomycin table
    (rows, drops per column, patients, feature ranges), a CaseReport for anesthesia series (rows,
    cases kept and dropped with reasons, carried-forward values, masked artefacts, duplicates,
    reordered rows). `kind`, when not given, follows `config` (`algo: planner`: anesthesia) or
    else the columns (a `patient_id` column: vancomycin; `case_id` or VitalDB's `caseid`:
    anesthesia). The columns come from the `data:`
    section of `config` (an IQL or planner run config), or for anesthesia from `data_preset`
    (`canonical` or `vitaldb`, detected from the columns when neither is given)."""
    if kind is not None and kind not in DATA_KINDS:
        raise ConfigError(f"unknown data kind '{kind}'; expected one of: {', '.join(DATA_KINDS)}")
    if data_preset is not None and data_preset not in DATA_PRESETS:
        raise ConfigError(f"unknown data preset '{data_preset}'; expected one of: {', '.join(DATA_PRESETS)}")
    if data_preset is not None and config is not None:
        raise ConfigError("give either a config or a data preset, not both: both say how the columns are named")
    if data_preset is not None and kind == "vancomycin":
        raise ConfigError(f"data preset '{data_preset}' names anesthesia columns; vancomycin columns come from a config")
    if kind is None and data_preset is not None:
        kind = "anesthesia"
    columns: list[str] | None = None
    if kind is None and config is not None:
        kind = _config_kind(config)
    if kind is None:
        columns = file_columns(path)
        kind = detect_kind(path, columns)
    if kind == "vancomycin":
        data = load_config(config, IQLRunConfig).data if config else IQLRunConfig().data
        return load_table(path, data)[1]
    if config is not None:
        anesthesia = load_config(config, PlannerRunConfig).data
    elif data_preset is not None:
        anesthesia = DATA_PRESETS[data_preset]
    else:
        anesthesia = anesthesia_preset(columns if columns is not None else file_columns(path))
    return load_cases(path, anesthesia)[1]


def _config_kind(config: str | Path) -> str:
    """A run config's kind of data: a planner config (`algo: planner`) reads anesthesia series, any
    other one a vancomycin table; an unreadable config is left to `load_config` to report."""
    try:
        raw = yaml.safe_load(config_path(config).read_text())
    except (OSError, yaml.YAMLError, ConfigError):
        return "vancomycin"
    return "anesthesia" if isinstance(raw, dict) and raw.get("algo") == "planner" else "vancomycin"


def run_demo(
    out: str | Path = "runs/demo",
    patients: int = 150,
    steps: int = 5000,
    eval_patients: int = 1000,
    seed: int = 0,
    echo: Echo = print,
) -> DemoResult:
    """Vancomycin end to end on embedded defaults: simulate `patients` -> train IQL -> evaluate on
    `eval_patients` held-out patients (with OPE) -> report, all under `out`."""
    from dosewise.algos.training import train_iql
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    out = Path(out)
    if (out / "iql").exists():
        echo(f"replacing the earlier demo in {out}")
        shutil.rmtree(out / "iql")
    data_path = write_table(simulate_dataset(patients, seed), out / "vancomycin.csv")
    run = IQLRunConfig(train=TrainConfig(steps=steps, seed=seed), data_path=str(data_path.resolve()))
    frame, report = load_table(data_path, run.data)
    train_iql(run, build_transitions(frame, run.data), out / "iql")
    evaluation = evaluate_iql(out / "iql", eval_patients, seed=1000 + seed, ope=True)
    evaluation_path = out / "evaluation.json"
    write_json_atomic(evaluation.to_dict(), evaluation_path)
    page = report_iql(out / "iql", out / "report", evaluation_path)
    return DemoResult(data_path, out / "iql", report, evaluation, evaluation_path, page)


def _prepare(data: str | Path, config: str | Path | IQLRunConfig | None, seeds: int, echo: Echo):
    """The resolved run (recording the optional state columns the data has), the load report, the
    transitions and the member seeds of a training call."""
    from dosewise.algos.training import record_found_features

    run = config if isinstance(config, IQLRunConfig) else resolve_iql_run(config, data)
    frame, report = load_table(data, run.data)
    if report.rows_dropped_nan:
        echo(f"dropped {report.rows_dropped_nan} of {report.rows_total} rows with missing values: {report.dropped_nan_by_column}")
    if report.optional_features:
        echo(f"dose-aware state: {len(report.optional_features)} optional columns found ({', '.join(report.optional_features)})")
    transitions = build_transitions(frame, run.data)
    return record_found_features(run, transitions.feature_names), report, transitions, [run.train.seed + k for k in range(seeds)]
