from dosewise.config import IQLRunConfig, load_config, save_config


def test_committed_conservative_config_is_the_default():
    assert load_config("configs/iql_conservative.yaml", IQLRunConfig) == IQLRunConfig()


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
