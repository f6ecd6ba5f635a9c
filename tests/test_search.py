"""Sweeps that search: every task returns its objective, the Optuna sweeper minimizes it through
experiment=search_quickstart, and the sweep directory gets the study's table and the best trial's command."""

import csv
import json
import shlex

import pytest
import yaml
from conftest import run_main
from test_sweep_summary import finished, make_job

from ddpm.io.sweep_summary import BEST_COMMAND_FILE, best_command, best_job, summarize, write_summary
from ddpm.training.settings import TrainSettings

SEARCH = [
    "-m",
    "experiment=search_quickstart",
    "hydra/sweeper=optuna",
    "hydra.sweeper.n_trials=4",
    "logger=none",
    "trainer.iterations=4",
    "trainer.log_rate=2",
    "trainer.test_batches=1",
    "trainer.checkpoint_rate=0",
    "trainer.sample_at_end=false",
    "schedule.num_timesteps=50",
    "trainer.num_workers=0",
]


def test_the_objective_is_the_test_loss_unless_fid_is_measured():
    assert TrainSettings().objective_name == "test_loss"
    assert TrainSettings(eval_rate=100).objective_name == "best_fid"
    assert TrainSettings(objective="train_loss", eval_rate=100).objective_name == "train_loss"


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["trainer.objective=fid"], "trainer.objective='fid'"),
        (
            ["trainer.objective=best_fid"],
            "trainer.objective=best_fid is the best FID during training: set trainer.eval_rate > 0",
        ),
        (["trainer.objective=nll_bits_per_dim"], "set trainer.nll_at_end=true"),
    ],
)
def test_bad_objectives_name_the_key(overrides, message, capfd, tmp_path):
    from main_in_process import run_main_in_process

    code, output = run_main_in_process(
        ["experiment=quickstart", "logger=none", *overrides, f"hydra.run.dir={tmp_path}"], capfd
    )
    assert code == 1 and message in output and "Traceback" not in output


def test_the_best_job_is_the_lowest_objective_and_its_command_can_be_pasted(tmp_path):
    make_job(
        tmp_path,
        0,
        ["optimizer.lr=0.01", "schedule=cosine"],
        finished(tmp_path, 0, objective="test_loss", objective_value=0.5),
    )
    make_job(
        tmp_path,
        1,
        ["optimizer.lr=0.002", "schedule=linear", "model.channel_mults=[1,2]"],
        finished(tmp_path, 1, objective="test_loss", objective_value=0.25),
    )
    make_job(tmp_path, 2, ["optimizer.lr=0.1"])  # failed: no objective
    rows = summarize(tmp_path)
    assert [row.get("objective") for row in rows] == [0.5, 0.25, None]
    best = best_job(rows)
    assert best["job"] == 1
    command = best_command(best)
    assert command == "python main.py optimizer.lr=0.002 schedule=linear 'model.channel_mults=[1,2]'"
    assert shlex.split(command)[2:] == ["optimizer.lr=0.002", "schedule=linear", "model.channel_mults=[1,2]"]
    write_summary(tmp_path, rows)
    assert (tmp_path / BEST_COMMAND_FILE).read_text() == command + "\n"
    markdown = (tmp_path / "summary.md").read_text()
    assert "Best: job 1, objective (test_loss, minimized) 0.25:" in markdown and command in markdown
    assert list(csv.DictReader((tmp_path / "summary.csv").open()))[1]["objective"] == "0.25"


def check_study(sweep, trials):
    """Every trial done with its objective; Optuna's best value is the table's best, whose command is written."""
    rows = list(csv.DictReader((sweep / "summary.csv").open()))
    assert len(rows) == trials and all(row["status"] == "done" for row in rows), rows
    objectives = [float(row["objective"]) for row in rows]
    assert all(value > 0 for value in objectives)
    for row in rows:  # the trial's own test loss is its objective
        assert json.loads((sweep / row["job"] / "summary.json").read_text())["objective"] == "test_loss"
        assert float(row["objective"]) == pytest.approx(float(row["test_loss"]))
    assert len({row["overrides"] for row in rows}) == trials  # the search proposed different trials
    results = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    assert results["best_value"] == pytest.approx(min(objectives))
    best = rows[objectives.index(min(objectives))]
    command = (sweep / BEST_COMMAND_FILE).read_text().strip()
    assert command == "python main.py " + " ".join(shlex.quote(part) for part in best["overrides"].split())
    for name, value in results["best_params"].items():
        assert f"{name}={value}" in command
    assert (sweep / "summary.png").is_file()


@pytest.mark.slow
def test_the_optuna_search_runs_its_trials_and_writes_the_study(tmp_path):
    sweep = tmp_path / "search"
    run_main(*SEARCH, f"hydra.sweep.dir={sweep}")
    check_study(sweep, 4)
