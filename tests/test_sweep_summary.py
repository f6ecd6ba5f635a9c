"""The sweep summary: summary.csv and summary.md list every job of a sweep, from a fake sweep directory and
from a real `python main.py -m` sweep."""

import csv
import json
import logging

import pytest
from conftest import TINY_QUICKSTART, run_main
from omegaconf import OmegaConf
from wandb_records import config_values, read_wandb_records

from ddpm.io.sweep_summary import NO_RESULT, SweepSummary, summarize, write_summary


def make_job(sweep_dir, num, overrides, summary=None):
    """A job directory as Hydra and task=train leave it; without `summary` the job failed before its end."""
    job_dir = sweep_dir / str(num)
    (job_dir / ".hydra").mkdir(parents=True)
    OmegaConf.save(OmegaConf.create(overrides), job_dir / ".hydra" / "overrides.yaml")
    if summary is not None:
        (job_dir / "summary.json").write_text(json.dumps(summary))
    return job_dir


def finished(sweep_dir, num, **changes):
    """The summary.json of a finished job, with the numbers of job `num`."""
    return {
        "steps": 100,
        "train_loss": 0.123456789,
        "test_loss": 0.2 + num,
        "stopped_early": False,
        "skipped_nonfinite": 0,
        "resumed_from_step": None,
        "wall_time_s": 12.3456,
        "sample_grid": str(sweep_dir / str(num) / "samples" / "final.png"),
        "checkpoint": str(sweep_dir / str(num) / "checkpoints" / "last.pt"),
        **changes,
    }


@pytest.fixture
def fake_sweep(tmp_path):
    """Job 0 finished, job 1 failed, job 2 finished under SLURM; listed out of order, as a directory may be,
    next to the submitit launcher's folder and Hydra's multirun.yaml."""
    make_job(tmp_path, 2, ["lr=0.2", "schedule=dns"], finished(tmp_path, 2, slurm_job_id="4242"))
    make_job(tmp_path, 10, ["lr=0.10"], finished(tmp_path, 10, sample_grid=None))
    make_job(tmp_path, 0, ["lr=0.0", "schedule=linear"], finished(tmp_path, 0))
    make_job(tmp_path, 1, ["lr=0.1", "schedule=cosine"])
    (tmp_path / ".submitit" / "4242_0").mkdir(parents=True)
    (tmp_path / "multirun.yaml").write_text("hydra: {}\n")
    return tmp_path


def read_csv(path):
    with path.open(newline="") as file:
        return list(csv.DictReader(file))


def test_summary_csv_has_one_row_per_job_in_job_order(fake_sweep):
    write_summary(fake_sweep, summarize(fake_sweep))
    rows = read_csv(fake_sweep / "summary.csv")

    assert [row["job"] for row in rows] == ["0", "1", "2", "10"]  # numerically, not as text
    assert list(rows[0]) == [
        "job",
        "status",
        "overrides",
        "steps",
        "train_loss",
        "test_loss",
        "wall_time_s",
        "slurm_job_id",
        "sample_grid",
        "error",
    ]  # no fid column: no job has one
    assert rows[0] == {
        "job": "0",
        "status": "done",
        "overrides": "lr=0.0 schedule=linear",
        "steps": "100",
        "train_loss": "0.123456789",
        "test_loss": "0.2",
        "wall_time_s": "12.3456",
        "slurm_job_id": "",
        "sample_grid": "0/samples/final.png",
        "error": "",
    }
    failed = {name: "" for name in ("steps", "train_loss", "test_loss", "wall_time_s", "slurm_job_id", "sample_grid")}
    assert rows[1] == {
        "job": "1",
        "status": "failed",
        "overrides": "lr=0.1 schedule=cosine",
        **failed,
        "error": NO_RESULT,
    }  # no error line: it was killed, or never ran
    assert rows[2]["slurm_job_id"] == "4242" and rows[2]["test_loss"] == "2.2"
    assert rows[3]["status"] == "done" and rows[3]["sample_grid"] == ""


def test_summary_md_has_a_header_and_a_table_row_per_job(fake_sweep):
    write_summary(fake_sweep, summarize(fake_sweep))
    lines = (fake_sweep / "summary.md").read_text().splitlines()

    assert lines[0] == f"Sweep `{fake_sweep}`: 4 jobs, 3 done, 1 failed."
    table = [line for line in lines if line.startswith("|")]
    assert len(table) == 2 + 4  # header, separator, one row per job
    assert table[2] == "| 0 | done | lr=0.0 schedule=linear | 100 | 0.1235 | 0.2 | 12.3 |  | 0/samples/final.png |  |"
    assert table[3] == f"| 1 | failed | lr=0.1 schedule=cosine |  |  |  |  |  |  | {NO_RESULT} |"
    assert "| 4242 |" in table[4]


def test_fid_column_appears_once_a_job_reports_it(tmp_path):
    make_job(tmp_path, 0, ["a=1"], finished(tmp_path, 0, fid=3.14159))
    make_job(tmp_path, 1, ["a=2"], finished(tmp_path, 1))
    write_summary(tmp_path, summarize(tmp_path))

    assert [row["fid"] for row in read_csv(tmp_path / "summary.csv")] == ["3.14159", ""]
    assert "| fid |" in (tmp_path / "summary.md").read_text()


def test_a_sample_grid_outside_the_sweep_keeps_its_path(tmp_path):
    make_job(tmp_path / "sweep", 0, ["a=1"], finished(tmp_path, 0))
    assert summarize(tmp_path / "sweep")[0]["sample_grid"] == str(tmp_path / "0" / "samples" / "final.png")


def test_the_callback_logs_a_failure_instead_of_raising(tmp_path, caplog):
    config = OmegaConf.create(
        {"task": {"_target_": "ddpm.tasks.train.run"}, "hydra": {"sweep": {"dir": str(tmp_path / "missing")}}}
    )
    with caplog.at_level(logging.WARNING, logger="ddpm.io.sweep_summary"):
        SweepSummary().on_multirun_end(config)
    assert "could not write the sweep summary" in caplog.text


def test_the_callback_summarizes_only_training_sweeps(tmp_path):
    make_job(tmp_path, 0, ["sample.seed=0"])
    config = OmegaConf.create(
        {"task": {"_target_": "ddpm.tasks.sample.run"}, "hydra": {"sweep": {"dir": str(tmp_path)}}}
    )
    SweepSummary().on_multirun_end(config)
    assert not (tmp_path / "summary.csv").exists()


@pytest.mark.slow
def test_a_local_multirun_writes_its_summary_and_groups_its_wandb_runs(tmp_path):
    with_wandb = [argument for argument in TINY_QUICKSTART if argument != "logger=none"] + ["logger.mode=offline"]
    run_main(
        "-m",
        *with_wandb,
        "schedule=linear,cosine",
        "trainer.iterations=2",
        "trainer.batch_size=4",
        "trainer.log_rate=1",
        "trainer.test_batches=1",
        "trainer.sample_at_end=false",
        "trainer.checkpoint_rate=0",
        "schedule.num_timesteps=50",
        f"hydra.sweep.dir={tmp_path}",
    )

    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["job"], row["status"], row["steps"]) for row in rows] == [("0", "done", "2"), ("1", "done", "2")]
    assert "schedule=linear" in rows[0]["overrides"].split() and "schedule=cosine" in rows[1]["overrides"].split()
    assert all(float(row["train_loss"]) > 0 and float(row["test_loss"]) > 0 for row in rows)
    markdown = (tmp_path / "summary.md").read_text()
    assert "2 jobs, 2 done, 0 failed" in markdown
    assert "| 0 | done |" in markdown and "| 1 | done |" in markdown
    assert (tmp_path / "summary.png").is_file()

    group = "-".join(tmp_path.resolve().parts[-2:])  # one wandb run per job, grouped by the sweep directory
    for job, schedule in ((0, "linear"), (1, "cosine")):
        [run_file] = (tmp_path / str(job)).glob("wandb/offline-run-*/run-*.wandb")
        records = read_wandb_records(run_file)
        [run] = [record.run for record in records if record.WhichOneof("record_type") == "run"]
        assert run.run_group == group and run.display_name == f"{group}/{job}"
        assert f"schedule={schedule}" in config_values(records)["overrides"]


def test_a_job_with_an_error_line_is_failed_with_it_and_one_without_is_running_until_the_end(tmp_path):
    from ddpm.io.sweep_summary import clear_job_error, record_job_error, update_summary

    make_job(tmp_path, 0, ["lr=0.1"], finished(tmp_path, 0))
    record_job_error(make_job(tmp_path, 1, ["lr=9"]), "trainer.lr=9 is\nnot a learning rate")
    make_job(tmp_path, 2, ["lr=0.2"])
    during = summarize(tmp_path, final=False)
    assert [(row["status"], row.get("error")) for row in during] == [
        ("done", None),
        ("failed", "trainer.lr=9 is not a learning rate"),
        ("running", None),
    ]
    csv_path, md_path, picture = update_summary(tmp_path, final=False)
    assert "3 jobs, 1 done, 1 failed, 1 running." in md_path.read_text() and picture.is_file()
    assert read_csv(csv_path)[1]["error"].startswith("trainer.lr=9")
    assert [row.get("error") for row in summarize(tmp_path)][2] == NO_RESULT  # after the sweep, failed
    clear_job_error(tmp_path / "1")
    assert summarize(tmp_path, final=False)[1]["status"] == "running"


@pytest.mark.slow
def test_a_sweep_that_stops_at_a_failed_job_still_has_its_summary(tmp_path):
    """Hydra ends a local sweep at its first failed job, before the end-of-sweep callback: the summary written
    as each job ended lists the done job, and the failed one with its one error line."""
    result = run_main(
        "-m",
        *TINY_QUICKSTART,
        "trainer.batch_size=4,0",
        "trainer.iterations=2",
        "trainer.log_rate=1",
        "trainer.test_batches=1",
        "trainer.sample_at_end=false",
        "trainer.checkpoint_rate=0",
        "schedule.num_timesteps=50",
        f"hydra.sweep.dir={tmp_path}",
        check=False,
    )
    assert result.returncode == 1
    rows = read_csv(tmp_path / "summary.csv")
    assert [(row["job"], row["status"]) for row in rows] == [("0", "done"), ("1", "failed")]
    assert "trainer.batch_size=0" in rows[1]["error"] and "\n" not in rows[1]["error"]
    assert "2 jobs, 1 done, 1 failed." in (tmp_path / "summary.md").read_text()
    assert (tmp_path / "summary.png").is_file()
