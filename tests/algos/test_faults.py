"""Runs that meet a full disk, a read-only or missing folder, a flipped bit or a kill: the command
ends with one line and exit code 2 and leaves no partial file; a damaged weight file is caught by
the manifest and named; resume skips a damaged checkpoint for the newest intact one and says so;
a run killed at random points only ever holds complete files and resumes to the same weights."""

from __future__ import annotations

import errno
import hashlib
import json
import multiprocessing
import os
import random
import shutil
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

import dosewise.checkpoint as ckpt
from dosewise.algos.config import IQLRunConfig
from dosewise.algos.trained import TrainedIQL
from dosewise.algos.training import CHECKPOINT_FORMAT, MODEL_FORMAT, TrainingError, checkpoint_path, latest_checkpoint, train_iql
from dosewise.api import resolve_iql_run, simulate_vancomycin, train_iql_from_file
from dosewise.checkpoint import MANIFEST, CheckpointError, IntegrityWarning, load_safe, read_manifest, verify_manifest
from dosewise.cli import app
from dosewise.config import load_config

STEPS, EVERY = 120, 20
SHA_MISMATCH = "SHA-256 does not match manifest.json (the file changed after training or is damaged)"


def invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


def _stderr_lines(result) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.strip()]


def _temp_files(folder: Path) -> list[str]:
    return [name for _, _, names in os.walk(folder) for name in names if name.endswith(".tmp")]


def _strict_json(path: Path):
    def refuse(token):
        raise AssertionError(f"{path}: non-standard JSON constant {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def _networks(run_dir: Path) -> dict:
    return load_safe(run_dir / "model.pt", MODEL_FORMAT)["networks"]


def _assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


@pytest.fixture(scope="module")
def vanco(tmp_path_factory) -> tuple[Path, Path]:
    """30 simulated patients and a small, fast run config (YAML, as a user would pass it)."""
    root = tmp_path_factory.mktemp("faults")
    data, config = root / "vanco.csv", root / "small.yaml"
    simulate_vancomycin(data, patients=30, seed=11)
    config.write_text(
        f"iql:\n  hidden: [16, 16]\n  batch_size: 32\ntrain:\n  steps: {STEPS}\n  checkpoint_every: {EVERY}\n  log_every: {EVERY}\n"
    )
    return data, config


@pytest.fixture(scope="module")
def reference(vanco, tmp_path_factory, _one_torch_thread) -> tuple[Path, float]:
    """An uninterrupted run and how long it took."""
    data, config = vanco
    out = tmp_path_factory.mktemp("reference") / "run"
    started = time.perf_counter()
    train_iql_from_file(data, out, resolve_iql_run(config, data), echo=lambda _: None)
    return out, time.perf_counter() - started


@pytest.fixture()
def full_disk(monkeypatch):
    """The disk fills up while writing the file named `name`: half of its bytes land, then errno `code`."""

    def install(name: str, code: int = errno.ENOSPC):
        real = ckpt._write

        def failing(handle, data, path):
            if path.name == name:
                handle.write(data[: len(data) // 2])
                raise OSError(code, os.strerror(code))
            real(handle, data, path)

        monkeypatch.setattr(ckpt, "_write", failing)

    return install


# -- weight integrity -----------------------------------------------------------------------------


def test_a_run_records_the_sha256_of_its_weights_and_config(reference):
    out = reference[0]
    files = read_manifest(out)["files"]
    expected = {"config.yaml", "model.pt", *(f"checkpoints/step_{s:06d}.pt" for s in range(EVERY, STEPS + 1, EVERY))}
    assert expected <= set(files)
    for name in expected:
        assert files[name]["sha256"] == hashlib.sha256((out / name).read_bytes()).hexdigest(), name


@pytest.mark.parametrize("name", ["model.pt", "config.yaml"])
def test_a_flipped_bit_in_model_or_config_is_a_clear_error(reference, tmp_path, name):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    data = bytearray((run / name).read_bytes())
    data[len(data) // 2] ^= 0x10
    (run / name).write_bytes(bytes(data))
    with pytest.raises(CheckpointError) as err:
        TrainedIQL.load(run)
    assert str(err.value) == f"{run / name}: {SHA_MISMATCH}"

    result = invoke("recommend", "--run", run, "--state", "vanco_level=25")
    assert result.exit_code == 2
    assert _stderr_lines(result) == [f"error: {run / name}: {SHA_MISMATCH}"]


def test_a_run_without_manifest_loads_with_one_warning_line(reference, tmp_path):
    """Runs written before manifests existed stay usable: loading is still weights-only."""
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / MANIFEST).unlink()
    with pytest.warns(IntegrityWarning, match="no manifest.json to check model.pt, config.yaml against"):
        model = TrainedIQL.load(run)
    assert model.step == STEPS
    state = ["vanco_level=25", "creatinine=1.1", "wbc=12", "bun=18", "temperature=38.2", "sbp=118", "heart_rate=96"]
    state += ["dose_mg=1250", "interval_h=12", "hours_since_dose=4", "weight_kg=80", "age=60", "dialysis=0"]  # simulated data is dose-aware
    result = invoke("recommend", "--run", run, *[x for s in state for x in ("--state", s)], "--json")
    assert result.exit_code == 0, result.output
    lines = _stderr_lines(result)
    assert len(lines) == 1 and lines[0].startswith(f"warning: {run}: no manifest.json") and lines[0].endswith("loaded unverified")


def test_planner_runs_are_verified_too(tiny_windows, tmp_path):
    from dosewise.planner.training import load_planner, train_planner
    from tests.planner.conftest import tiny_run

    out = tmp_path / "planner"
    train_planner(tiny_run(), tiny_windows["train"], tiny_windows["val"], out)
    assert {"config.yaml", "model.pt"} <= set(read_manifest(out)["files"])
    _strict_json(out / "summary.json")
    load_planner(out)
    data = bytearray((out / "model.pt").read_bytes())
    data[-3000] ^= 0x01
    (out / "model.pt").write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"^{out / 'model.pt'}: SHA-256 does not match manifest.json"):
        load_planner(out)


def test_planner_summary_on_a_full_disk_leaves_no_partial_file(tiny_windows, tmp_path, full_disk):
    from dosewise.planner.training import train_planner
    from tests.planner.conftest import tiny_run

    out = tmp_path / "planner"
    full_disk("summary.json")
    with pytest.raises(OSError, match=rf"cannot write {out / 'summary.json'}: No space left on device"):
        train_planner(tiny_run(), tiny_windows["train"], tiny_windows["val"], out)
    assert not (out / "summary.json").exists() and _temp_files(out) == []
    verify_manifest(out)  # what was written before the failure is complete


# -- resume from the newest intact checkpoint -----------------------------------------------------


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-2000] ^= 0x01  # tensor data: torch would load it without complaint
    path.write_bytes(bytes(data))


def _garbage(path: Path) -> None:
    path.write_bytes(b"\x00" * 512)


@pytest.mark.parametrize("damage", [_truncate, _flip, _garbage], ids=["truncated", "bit-flipped", "not-a-zip"])
def test_resume_skips_a_damaged_latest_checkpoint_and_says_so(reference, vanco, tmp_path, damage):
    data, config = vanco
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / "model.pt").unlink()
    last, used = checkpoint_path(run, STEPS), checkpoint_path(run, STEPS - EVERY)
    damage(last)
    result = invoke("train", "iql", "--data", data, "--out", run, "--config", config, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    lines = _stderr_lines(result)
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"warning: skipped damaged checkpoint {last}: ")
    assert lines[0].endswith(f"; resuming from {used} (step {STEPS - EVERY})")
    _assert_same(_networks(run), _networks(reference[0]))  # resumed from step 100, ends where the intact run did
    verify_manifest(run)
    verify_manifest(last)  # rewritten, and recorded again


def test_resume_with_every_checkpoint_damaged_names_them_all(reference, vanco, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    for step in range(EVERY, STEPS + 1, EVERY):
        _flip(checkpoint_path(run, step))
    with pytest.raises(TrainingError, match=r"no intact checkpoint to resume from") as err:
        train_iql(resolve_iql_run(vanco[1], vanco[0]), _transitions(vanco), run, resume=True, show_progress=False)
    assert all(str(checkpoint_path(run, s)) in str(err.value) for s in range(EVERY, STEPS + 1, EVERY))


def test_resume_of_a_run_without_manifest_warns_and_continues(reference, vanco, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference[0], run)
    (run / MANIFEST).unlink()
    (run / "model.pt").unlink()
    with pytest.warns(IntegrityWarning, match="no manifest.json to check the checkpoints against"):
        train_iql(resolve_iql_run(vanco[1], vanco[0]), _transitions(vanco), run, resume=True, show_progress=False)
    verify_manifest(run)  # from now on the run has one
    _assert_same(_networks(run), _networks(reference[0]))


def _transitions(vanco):
    from dosewise.data.loading import load_table
    from dosewise.data.transitions import build_transitions

    run = resolve_iql_run(vanco[1], vanco[0])
    return build_transitions(load_table(vanco[0], run.data)[0], run.data)


# -- full disk, no permission, missing folder: one line, exit 2, nothing partial -------------------


@pytest.mark.parametrize(
    ("name", "code"),
    [
        ("manifest.json", errno.ENOSPC),
        ("config.yaml", errno.ENOSPC),
        ("step_000040.pt", errno.ENOSPC),
        ("losses.json", errno.ENOSPC),
        ("model.pt", errno.ENOSPC),
        ("config.yaml", errno.EACCES),
        ("model.pt", errno.EACCES),
    ],
)
def test_train_on_a_full_or_refusing_disk_is_one_line_and_leaves_no_partial_file(vanco, tmp_path, full_disk, name, code):
    data, config = vanco
    run = tmp_path / "run"
    full_disk(name, code)
    result = invoke("train", "iql", "--data", data, "--out", run, "--config", config, "--quiet")
    assert result.exit_code == 2, result.output
    target = run / "checkpoints" / name if name.startswith("step_") else run / name
    assert _stderr_lines(result) == [f"error: cannot write {target}: {os.strerror(code)}"]
    assert not target.exists() and _temp_files(run) == []
    for path in (run / "checkpoints").glob("*.pt"):  # everything written before the failure is complete
        verify_manifest(path)
        load_safe(path, CHECKPOINT_FORMAT)
    if (run / "config.yaml").exists():
        assert load_config(run / "config.yaml", IQLRunConfig).train.steps == STEPS


def test_sweep_and_evaluation_json_on_a_full_disk(vanco, reference, tmp_path, full_disk):
    data, config = vanco
    grid = tmp_path / "grid.yaml"
    grid.write_text("grid:\n  lr: [0.001, 0.003]\n")
    full_disk("sweep.json")
    result = invoke(
        "train", "iql", "--data", data, "--out", tmp_path / "sweep", "--config", config, "--sweep", grid, "--steps", 20, "--quiet"
    )
    assert result.exit_code == 2, result.output
    assert _stderr_lines(result) == [f"error: cannot write {tmp_path / 'sweep' / 'sweep.json'}: No space left on device"]
    assert not (tmp_path / "sweep" / "sweep.json").exists() and _temp_files(tmp_path / "sweep") == []
    points = [p for p in (tmp_path / "sweep").iterdir() if p.name.startswith("lr")]
    assert len(points) == 2
    for point in points:  # every finished point is a verified run
        verify_manifest(point)
        assert TrainedIQL.load(point).step == 20

    full_disk("eval.json")
    result = invoke("evaluate", "--run", reference[0], "--out", tmp_path / "eval.json", "--patients", 2, "--no-per-member")
    assert result.exit_code == 2, result.output
    assert _stderr_lines(result) == [f"error: cannot write {tmp_path / 'eval.json'}: No space left on device"]
    assert not (tmp_path / "eval.json").exists()
    assert _temp_files(tmp_path) == []


def test_an_output_folder_that_cannot_be_made_is_one_line(vanco, tmp_path):
    data, config = vanco
    blocker = tmp_path / "file.txt"
    blocker.write_text("not a folder")
    result = invoke("train", "iql", "--data", data, "--out", blocker / "run", "--config", config, "--quiet")
    assert result.exit_code == 2, result.output
    assert _stderr_lines(result) == [f"error: cannot write {blocker / 'run'}: Not a directory"]


def test_an_os_error_from_another_writer_is_one_line_naming_its_file(vanco, tmp_path, monkeypatch):
    """Files dosewise does not write itself (TensorBoard's event log) fail the same way: one line, exit 2."""
    import dosewise.api

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(tmp_path / "run" / "tb"))

    monkeypatch.setattr(dosewise.api, "train_iql_from_file", refuse)
    result = invoke("train", "iql", "--data", vanco[0], "--out", tmp_path / "run", "--config", vanco[1], "--quiet")
    assert result.exit_code == 2
    assert _stderr_lines(result) == [f"error: {tmp_path / 'run' / 'tb'}: Permission denied"]


# -- killed at random points ----------------------------------------------------------------------


def _train_child(data: Path, out: Path, config: Path) -> None:
    torch.set_num_threads(1)
    run = resolve_iql_run(config, data)
    train_iql_from_file(data, out, run, resume=latest_checkpoint(out) is not None, echo=lambda _: None)


def _assert_every_file_is_complete(out: Path) -> None:
    """Hidden temporary files of a killed write may remain (the next training removes them); every
    other file is whole: weights verify and load, JSON parses strictly, the config loads."""
    read_manifest(out)
    for root, dirs, names in os.walk(out):
        dirs[:] = [d for d in dirs if d != "tb"]  # TensorBoard's event log tolerates a cut last record
        for name in names:
            path = Path(root) / name
            if name.startswith(".") and name.endswith(".tmp"):
                continue
            if path.suffix == ".pt":
                verify_manifest(path)
                load_safe(path, MODEL_FORMAT if name == "model.pt" else CHECKPOINT_FORMAT)
            elif path.suffix == ".json":
                _strict_json(path)
            elif path.suffix == ".yaml":
                load_config(path, IQLRunConfig)
            else:
                raise AssertionError(f"unexpected file {path}")


KILL_STEPS, KILL_EVERY = 400, 10


def _checkpoint_count(out: Path) -> int:
    return len(list((out / "checkpoints").glob("step_*.pt")))


def _writing(folder: Path) -> bool:
    """A write in progress: its hidden temporary file exists (between mkstemp and os.replace)."""
    return bool(list(folder.glob(".*.tmp")))


def test_a_run_killed_at_random_points_holds_only_complete_files_and_resumes(vanco, tmp_path):
    """SIGKILL a training (a forked process, so no import time) six times: at a random moment
    between checkpoints, or while manifest.json or a checkpoint is being written; then `--resume`
    finishes the run with the weights of an uninterrupted one."""
    data, _ = vanco
    config = tmp_path / "kill.yaml"
    config.write_text(
        f"iql:\n  hidden: [16, 16]\n  batch_size: 32\ntrain:\n  steps: {KILL_STEPS}\n  checkpoint_every: {KILL_EVERY}\n  log_every: {KILL_EVERY}\n"
    )
    started = time.perf_counter()
    train_iql_from_file(data, tmp_path / "reference", resolve_iql_run(config, data), echo=lambda _: None)
    interval = (time.perf_counter() - started) / (KILL_STEPS // KILL_EVERY)

    out = tmp_path / "run"
    rng = random.Random(20240611)
    fork = multiprocessing.get_context("fork")
    kills = []
    for attempt in range(6):
        target = _checkpoint_count(out) + rng.randint(1, 5)
        mid_write = [None, out, out / "checkpoints"][attempt % 3]  # kill at random, or while writing there
        extra = rng.uniform(0.0, interval)
        child = fork.Process(target=_train_child, args=(data, out, config))
        child.start()
        deadline = time.monotonic() + 60
        while child.is_alive() and _checkpoint_count(out) < target and time.monotonic() < deadline:
            time.sleep(0.001)
        if mid_write is not None:
            while child.is_alive() and not _writing(mid_write) and time.monotonic() < deadline:
                pass
        else:
            time.sleep(extra)
        if child.is_alive():
            child.kill()  # SIGKILL: no cleanup code runs
        child.join()
        kills.append(child.exitcode == -9)
        _assert_every_file_is_complete(out)
    assert sum(kills) >= 4, kills
    assert latest_checkpoint(out) is not None

    result = invoke("train", "iql", "--data", data, "--out", out, "--config", config, "--resume", "--quiet")
    assert result.exit_code == 0, result.output
    _assert_every_file_is_complete(out)
    assert _temp_files(out) == []
    _assert_same(_networks(out), _networks(tmp_path / "reference"))


@pytest.mark.parametrize("name", ["vanco.csv", "vanco.parquet"])
def test_simulated_table_on_a_full_disk_leaves_no_partial_file(tmp_path, full_disk, name):
    full_disk(name)
    result = invoke("simulate", "vancomycin", "--out", tmp_path / name, "--patients", 3)
    assert result.exit_code == 2, result.output
    assert _stderr_lines(result) == [f"error: cannot write {tmp_path / name}: No space left on device"]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", ["index.html", "q_curves.png"])
def test_report_on_a_full_disk_leaves_no_partial_file(reference, tmp_path, full_disk, name):
    full_disk(name)
    out = tmp_path / "report"
    result = invoke("report", "--run", reference[0], "--out", out)
    assert result.exit_code == 2, result.output
    assert _stderr_lines(result) == [f"error: cannot write {out / name}: No space left on device"]
    assert not (out / name).exists() and _temp_files(tmp_path) == []
