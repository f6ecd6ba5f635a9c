"""Launching a command again is safe: a finished run is left as it is and says where its results are."""

import hashlib
import json
import shutil
from pathlib import Path

import pytest
from conftest import CONF_DIR
from main_in_process import RUN, SAMPLE, run_main_in_process
from test_search import SEARCH

# Hydra's records and log of each launch, and the run directory's lock record: what a relaunch may touch.
LAUNCH_RECORDS = (".hydra", "main.log", "run.lock")


def file_digests(run_dir: Path) -> dict[str, str]:
    return {
        str(path.relative_to(run_dir)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.relative_to(run_dir).parts[0] not in LAUNCH_RECORDS
    }


def test_a_finished_run_started_again_is_left_as_it_is_until_its_iterations_are_raised(tmp_path, capfd):
    """The same command on a finished run rewrote summary.json with null losses and objective (exit 0)."""
    run_dir = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(args, capfd)[0] == 0
    finished = file_digests(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and summary["train_loss"] is not None and "checkpoints/last.pt" in finished

    code, output = run_main_in_process(args, capfd)
    assert code == 0
    assert f"the run in {run_dir} finished at step 2: nothing to do (results in {run_dir / 'summary.json'}" in output
    assert file_digests(run_dir) == finished

    code, output = run_main_in_process([*args, "trainer.iterations=3"], capfd)
    assert code == 0 and "resuming from" in output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 3 and summary["resumed_from_step"] == 2


def test_a_finished_run_is_not_continued_with_other_settings(tmp_path, capfd):
    run_dir = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(args, capfd)[0] == 0
    finished = file_digests(run_dir)
    code, output = run_main_in_process([*args, "optimizer.lr=0.5"], capfd)
    assert code == 1 and "Traceback" not in output
    assert (
        f"optimizer.lr=0.5, but the run in {run_dir} finished at step 2 with optimizer.lr=0.008 (optimizer.lr:"
        in output
    )
    assert file_digests(run_dir) == finished


def hydra_records(run_dir: Path) -> dict[str, bytes]:
    return {path.name: path.read_bytes() for path in (run_dir / ".hydra").iterdir()}


def test_a_refused_command_and_another_task_leave_the_runs_records_as_they_were(tmp_path, capfd):
    """A refused resume rewrote .hydra/overrides.yaml with the refused command; task=sample with hydra.run.dir
    set to a training run rewrote that run's .hydra/."""
    run_dir = tmp_path / "run"
    args = [*RUN, f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(args, capfd)[0] == 0
    records = hydra_records(run_dir)
    code, output = run_main_in_process([*args, "optimizer.lr=0.5"], capfd)
    assert code == 1 and "finished at step 2 with optimizer.lr=0.008" in output
    assert hydra_records(run_dir) == records
    sample = [*SAMPLE, f"checkpoint={run_dir / 'checkpoints' / 'last.pt'}", f"hydra.run.dir={run_dir}"]
    code, output = run_main_in_process(sample, capfd)
    assert code == 1 and "Traceback" not in output
    assert f"hydra.run.dir={run_dir} holds a training run: task=sample would write its records" in output
    assert hydra_records(run_dir) == records and not (run_dir / "samples").exists()


SWEEP = ["-m", *RUN, "trainer.checkpoint_rate=0"]


def test_a_sweep_launched_again_runs_only_its_jobs_without_a_result_and_another_sweep_is_refused(tmp_path, capfd):
    """A relaunched sweep continued its finished jobs, rewriting their results; a second sweep with other
    values in the same hydra.sweep.dir continued the first sweep's runs instead of training its own."""
    sweep = [*SWEEP, f"hydra.sweep.dir={tmp_path}", "schedule=linear,cosine"]
    assert run_main_in_process(sweep, capfd)[0] == 0
    first_job = file_digests(tmp_path / "0")
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    shutil.rmtree(tmp_path / "1")  # a job that never ran (killed before its first checkpoint)

    code, output = run_main_in_process(sweep, capfd)
    assert code == 0 and f"the run in {tmp_path / '0'} finished at step 2: nothing to do" in output
    assert file_digests(tmp_path / "0") == first_job
    relaunched = (tmp_path / "summary.csv").read_text().splitlines()
    assert relaunched[:2] == rows[:2] and len(relaunched) == 3 and ",done," in relaunched[2]

    before = {job: file_digests(tmp_path / job) for job in ("0", "1")}
    code, output = run_main_in_process([*sweep[:-1], "schedule=linear", "optimizer.lr=0.002,0.003"], capfd)
    assert code == 1 and "Traceback" not in output
    assert (
        f"hydra.sweep.dir={tmp_path} holds another sweep (this one has optimizer.lr=0.002,0.003 schedule=linear; "
        "that one had schedule=linear,cosine): give this sweep its own hydra.sweep.dir" in output
    )
    assert {job: file_digests(tmp_path / job) for job in ("0", "1")} == before


def test_jobs_that_share_a_directory_do_not_continue_each_others_runs(tmp_path, capfd):
    """A constant hydra.sweep.subdir merged the jobs: the second continued the first's run as its own."""
    sweep = [*SWEEP, "optimizer.lr=0.008,0.004", f"hydra.sweep.dir={tmp_path}", "hydra.sweep.subdir=same"]
    code, output = run_main_in_process(sweep, capfd)
    assert code == 1 and "Traceback" not in output
    assert (
        f"optimizer.lr=0.004, but {tmp_path / 'same'} holds the run of another job (of another sweep, or of this "
        "one) with optimizer.lr=0.008" in output
    )
    assert "hydra.sweep.subdir that differs per job" in output
    summary = json.loads((tmp_path / "same" / "summary.json").read_text())
    assert summary["steps"] == 2  # the first job's, as it wrote it


def search(tmp_path, trials: int, *overrides: str) -> list[str]:
    kept = [arg for arg in SEARCH if not arg.startswith("hydra.sweeper.n_trials")]
    return [*kept, f"hydra.sweeper.n_trials={trials}", f"hydra.sweep.dir={tmp_path}", *overrides]


def trial_records(tmp_path) -> list[dict]:
    return json.loads((tmp_path / "trials.json").read_text())


def test_a_search_launched_again_runs_only_its_missing_trials_in_new_job_directories(tmp_path, capfd):
    """A relaunched search started its study over in job directories 0, 1, ...: the first trial continued the
    first launch's trial 0, got no objective, and Optuna failed with a traceback."""
    assert run_main_in_process(search(tmp_path, 2), capfd)[0] == 0
    first_jobs = {job: file_digests(tmp_path / job) for job in ("0", "1")}
    code, output = run_main_in_process(search(tmp_path, 3), capfd)
    assert code == 0 and "2 of 3 trials finished, 1 to go" in output, output
    assert {job: file_digests(tmp_path / job) for job in ("0", "1")} == first_jobs
    records = trial_records(tmp_path)
    assert [record["state"] for record in records] == ["COMPLETE"] * 3
    assert records[2]["params"] not in (records[0]["params"], records[1]["params"])  # the sampler moved on
    assert json.loads((tmp_path / "2" / "summary.json").read_text())["steps"] == 4
    code, output = run_main_in_process(search(tmp_path, 3), capfd)
    assert code == 0 and "3 of 3 trials finished, 0 to go" in output
    assert len(list((tmp_path / "summary.csv").read_text().splitlines())) == 4  # a header and three trials


def test_a_trial_left_running_or_without_an_objective_fails_and_the_search_goes_on(tmp_path, capfd):
    bad_batch = "trainer.batch_size=choice(4,0)"  # 0 is refused: a trial that fails
    assert run_main_in_process(search(tmp_path, 1, bad_batch), capfd)[0] == 0
    records = trial_records(tmp_path)
    # A launch stopped during trial 1: its record says running.
    records.append({"number": 1, "params": records[0]["params"], "state": "RUNNING"})
    (tmp_path / "trials.json").write_text(json.dumps(records))
    code, output = run_main_in_process(search(tmp_path, 6, bad_batch), capfd)
    assert code == 0, output
    assert "trial 1 was left running by a stopped launch: it counts as failed" in output
    states = [record["state"] for record in trial_records(tmp_path)]
    assert len(states) == 6 and states[1] == "FAIL" and "COMPLETE" in states[2:]
    failed = [r["number"] for r in trial_records(tmp_path) if r["params"].get("trainer.batch_size") == 0]
    assert failed and all(states[number] == "FAIL" for number in failed)
    assert "trainer.batch_size=0" in (tmp_path / "summary.md").read_text()


def test_a_search_space_changed_in_its_file_is_another_sweep(tmp_path, capfd):
    """The recorded sweep holds the search space wherever it was given: an experiment file edited between two
    launches would otherwise have its new space replayed over the old trials."""
    from hydra import compose, initialize_config_dir
    from omegaconf import open_dict

    from ddpm.runtime.run_directory import ClaimRunDirectory

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        config = compose("config", overrides=["experiment=search_quickstart"], return_hydra_config=True)
    with open_dict(config):
        config.hydra.sweep.dir = str(tmp_path)
    ClaimRunDirectory().on_multirun_start(config)
    assert "hydra.sweeper.params.optimizer.lr=tag(log, interval(1e-3, 1.6e-2))" in (tmp_path / "sweep.json").read_text()
    (tmp_path / "0").mkdir()  # the sweep has run a job
    ClaimRunDirectory().on_multirun_start(config)  # the same sweep again
    with open_dict(config):
        config.hydra.sweeper.params["optimizer.lr"] = "tag(log, interval(1e-4, 1e-2))"  # the file, edited
    with pytest.raises(SystemExit):
        ClaimRunDirectory().on_multirun_start(config)
    assert f"hydra.sweep.dir={tmp_path} holds another sweep" in capfd.readouterr().err
