"""`dosewise compare-strategies` trains all five strategies on the same data and writes the
table and the figure; configs that would make the comparison unfair are refused."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from dosewise.cli import app
from dosewise.config import ConfigError, load_config, save_config
from dosewise.evaluate.anesthesia.strategies import compare_strategies, strategy_configs
from dosewise.planner.config import (
    STRATEGIES,
    ClosedLoopConfig,
    PlannerRunConfig,
    PlannerTrainConfig,
)
from tests.planner.conftest import tiny_run


def write_configs(directory, **train_fields):
    directory.mkdir(parents=True, exist_ok=True)
    for name in STRATEGIES:
        run = tiny_run(name, epochs=2, warmup_epochs=1 if name == "warmup" else None)
        train = PlannerTrainConfig(**{**run.train.model_dump(), **train_fields})
        run = run.model_copy(update={"closed_loop": ClosedLoopConfig(cases=2, seed=5), "train": train})
        save_config(run, directory / f"planner_{name}.yaml")
    return directory


@pytest.mark.slow
def test_compare_strategies_command_writes_table_and_figure(tiny_cases_file, tmp_path):
    configs = write_configs(tmp_path / "configs")
    out = tmp_path / "cmp"
    result = CliRunner().invoke(
        app, ["compare-strategies", "--data", str(tiny_cases_file), "--out", str(out), "--config-dir", str(configs), "--jobs", "2"]
    )
    assert result.exit_code == 0, result.output
    comparison = json.loads((out / "comparison.json").read_text())
    assert [row["strategy"] for row in comparison["rows"]] == list(STRATEGIES)
    for row in comparison["rows"]:
        assert row["final_val_bis_mae"] > 0 and 0 <= row["pct_bis_40_60"] <= 100
        assert (out / row["strategy"] / "model.pt").is_file()
    table = (out / "comparison.md").read_text()
    assert all(f"| {name} |" in table for name in STRATEGIES)
    assert (out / "env_metrics.png").stat().st_size > 10_000


@pytest.mark.slow
def test_epochs_and_seed_override_every_strategy(tiny_cases_file, tmp_path):
    configs = write_configs(tmp_path / "configs")
    result = compare_strategies(tiny_cases_file, tmp_path / "cmp", configs, epochs=1, jobs=1, strategies=("joint", "detach"), seed=3)
    assert [row["strategy"] for row in result["rows"]] == ["joint", "detach"]
    for name in ("joint", "detach"):
        saved = load_config(tmp_path / "cmp" / name / "config.yaml", PlannerRunConfig)
        assert saved.train.seed == 3 and saved.train.epochs == 1
        assert result["summaries"][name]["epochs"] == 1


def test_configs_must_share_data_model_and_training(tmp_path):
    configs = write_configs(tmp_path / "configs")
    assert list(strategy_configs(configs)) == list(STRATEGIES)
    save_config(tiny_run("detach").model_copy(update={"train": PlannerTrainConfig(seed=9)}), configs / "planner_detach.yaml")
    with pytest.raises(ConfigError, match="planner_detach.yaml: section 'train' differs"):
        strategy_configs(configs)
    save_config(tiny_run("joint"), configs / "planner_weighted.yaml")
    with pytest.raises(ConfigError, match="strategy.name is 'joint', expected 'weighted'"):
        strategy_configs(configs)
    (configs / "planner_weighted.yaml").unlink()
    with pytest.raises(ConfigError, match="planner_weighted.yaml: no such config"):
        strategy_configs(configs)
