import pytest

from dosewise.checkpoint import CheckpointError
from dosewise.evaluate.vancomycin.closed_loop import evaluate_vancomycin
from dosewise.evaluate.vancomycin.report import write_report

FIGURES = ("training_curves", "q_v_distributions", "q_curves", "sensitivity", "policy_vs_clinician", "trajectories")


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    from dosewise.algos.config import IQLRunConfig, TrainConfig
    from dosewise.algos.training import train_iql
    from dosewise.data import DataConfig, load_transitions
    from dosewise.sim.vancomycin_clinician import simulate_dataset

    root = tmp_path_factory.mktemp("report")
    data = root / "data.csv"
    simulate_dataset(30, seed=1).to_csv(data, index=False)
    transitions, _ = load_transitions(data, DataConfig())
    run = IQLRunConfig(train=TrainConfig(steps=100, checkpoint_every=0, log_every=10), data_path=str(data))
    train_iql(run, transitions, root / "run", show_progress=False)
    return root / "run"


@pytest.mark.slow
def test_report_renders_every_figure_and_the_outcome_table(small_run, tmp_path):
    import json

    from dosewise.algos.trained import TrainedIQL

    model = TrainedIQL.load(small_run)
    evaluation = tmp_path / "evaluation.json"
    evaluation.write_text(json.dumps({"closed_loop": evaluate_vancomycin(model.policy_action, 20, seed=3)}))
    page = write_report(small_run, tmp_path / "report", evaluation)
    text = page.read_text()
    for name in FIGURES:
        png = tmp_path / "report" / f"{name}.png"
        assert png.stat().st_size > 5000, name
        assert f"alt='{name}'" in text
    assert "learned policy" in text and "AKI" in text
    assert text.count("class='caption'") == len(FIGURES)


def test_report_of_a_folder_without_a_model_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="model.pt"):
        write_report(tmp_path)
