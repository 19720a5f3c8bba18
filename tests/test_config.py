from dosewise.algos.config import IQLRunConfig
from dosewise.config import load_config, save_config


def test_committed_conservative_config_is_the_default():
    assert load_config("iql_conservative", IQLRunConfig) == IQLRunConfig()


def test_config_round_trips_through_yaml(tmp_path):
    run = IQLRunConfig(data_path="/x/y.csv")
    save_config(run, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", IQLRunConfig) == run


def test_configs_are_found_by_name(tmp_path, monkeypatch):
    import pytest

    from dosewise.config import ConfigError
    from dosewise.planner.config import PlannerRunConfig

    monkeypatch.chdir(tmp_path)  # a name is found wherever the command runs
    assert load_config("iql_conservative", IQLRunConfig) == IQLRunConfig()
    recipe = load_config("planner", PlannerRunConfig)
    assert recipe.closed_loop.default_mode == "mpc" and recipe.model.action_encoding == "continuous"
    with pytest.raises(ConfigError, match="no config of that name.*planner_joint"):
        load_config("planner_jiont", PlannerRunConfig)


def test_a_name_is_a_packaged_config_and_anything_else_a_file(tmp_path, monkeypatch):
    import pytest

    from dosewise.config import CONFIG_DIR, ConfigError, config_path, packaged_configs
    from dosewise.evaluate.anesthesia.strategies import strategy_configs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "planner").write_text("not: a config")  # a file named like a packaged config is not read
    assert config_path("planner") == CONFIG_DIR / "planner.yaml"
    assert {"planner", "iql_conservative", "planner_joint", "planner_warmup_mcts"} <= set(packaged_configs())
    save_config(IQLRunConfig(data_path="mine.csv"), tmp_path / "mine.yaml")
    assert load_config("mine.yaml", IQLRunConfig).data_path == "mine.csv"  # a .yaml suffix: a file
    assert load_config("./mine.yaml", IQLRunConfig).data_path == "mine.csv"  # a path separator: a file
    with pytest.raises(ConfigError, match="config file not found"):
        load_config("sub/planner.yaml", IQLRunConfig)
    assert [run.strategy.name for run in strategy_configs().values()] == ["joint", "warmup", "weighted", "detach", "alternating"]
