from dosewise.config import IQLRunConfig, load_config, save_config


def test_committed_conservative_config_is_the_default():
    assert load_config("configs/iql_conservative.yaml", IQLRunConfig) == IQLRunConfig()


def test_config_round_trips_through_yaml(tmp_path):
    run = IQLRunConfig(data_path="/x/y.csv")
    save_config(run, tmp_path / "c.yaml")
    assert load_config(tmp_path / "c.yaml", IQLRunConfig) == run
