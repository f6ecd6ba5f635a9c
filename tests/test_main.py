"""End to end: `python main.py` in a subprocess, as a user runs it (tiny model, digits, CPU)."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import PROJECT_ROOT, run_main
from main_in_process import run_in_process, run_main_in_process
from PIL import Image
from wandb_records import config_values, history_rows, read_wandb_records

pytestmark = pytest.mark.slow

TINY = [
    "dataset=digits",
    "model.base_channels=16",
    "model.channel_mults=[1,2]",
    "model.num_res_blocks=1",
    "model.num_groups=8",
    "schedule.num_timesteps=50",
    "trainer.batch_size=8",
    "trainer.num_workers=0",
    "trainer.device=cpu",
    "trainer.test_batches=1",
    "trainer.grid_columns=2",
]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    """One class-conditional training run of 6 steps, shared by the tests that inspect its outputs."""
    run_dir = tmp_path_factory.mktemp("train")
    run_main(
        *TINY,
        "trainer.use_labels=true",
        "trainer.iterations=6",
        "trainer.log_rate=3",
        "trainer.checkpoint_rate=3",
        "trainer.sample_rate=6",
        "logger=wandb",
        "logger.mode=offline",
        f"hydra.run.dir={run_dir}",
    )
    return run_dir


def test_training_writes_checkpoints_with_weights_step_and_config(trained_run):
    checkpoints = trained_run / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step_0000003.pt", "step_0000006.pt"]
    state = torch.load(checkpoints / "last.pt", weights_only=True)
    assert state["step"] == 6
    assert {"model", "ema", "optimizer", "config"} <= set(state)
    assert state["config"]["model"]["base_channels"] == 16
    assert state["config"]["model"]["in_channels"] == 1  # resolved, not an interpolation
    assert (trained_run / "config.yaml").is_file() and (trained_run / ".hydra" / "config.yaml").is_file()


def test_training_saves_a_class_per_row_sample_grid(trained_run):
    grid = Image.open(trained_run / "samples" / "final.png")
    # 10 classes x 2 columns of 16x16 images enlarged 4 times (64-pixel cells) with 2-pixel padding.
    assert grid.size == (2 + 2 * 66, 2 + 10 * 66)
    assert (trained_run / "samples" / "step_0000006.png").is_file()
    assert Image.open(trained_run / "metrics.png").size[0] > 800  # drawn at the checkpoints from metrics.jsonl


def test_wandb_offline_run_records_config_and_losses(trained_run):
    [run_file] = trained_run.glob("wandb/offline-run-*/run-*.wandb")
    records = read_wandb_records(run_file)
    rows = [row for row in history_rows(records) if "train_loss" in row]
    assert [row["_step"] for row in rows] == [3, 6]
    assert all(np.isfinite(row["train_loss"]) and np.isfinite(row["test_loss"]) for row in rows)
    assert config_values(records)["model"]["base_channels"] == 16
    # The final grid was logged as an image at the last step, and its file travels with the run.
    images = [row for row in history_rows(records) if row.get("samples._type") == "image-file"]
    assert [row["_step"] for row in images] == [6]
    assert (run_file.parent / "files" / images[0]["samples.path"]).is_file()


def test_sample_task_writes_a_balanced_npz_and_pngs(trained_run, tmp_path):
    out_dir = tmp_path / "gen"
    run_in_process(
        "task=sample",
        f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}",
        "sample.num_images=10",
        "sample.batch_size=4",
        f"sample.out_dir={out_dir}",
        "sample.sequence=true",
        "sample.sequence_frames=5",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    samples = np.load(out_dir / "samples.npz")
    assert samples["arr_0"].shape == (10, 16, 16, 1) and samples["arr_0"].dtype == np.uint8
    assert sorted(samples["arr_1"].tolist()) == list(range(10))  # an equal share (one) per class
    assert len(list(out_dir.glob("*_class*.png"))) == 10
    assert Image.open(out_dir / "sequence.png").size == (2 + 5 * 66, 2 + 8 * 66)

    again = tmp_path / "again"
    run_in_process(
        "task=sample",
        f"checkpoint={trained_run / 'checkpoints' / 'last.pt'}",
        "sample.num_images=10",
        "sample.batch_size=4",
        f"sample.out_dir={again}",
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    np.testing.assert_array_equal(np.load(again / "samples.npz")["arr_0"], samples["arr_0"])  # same seed


def test_unconditional_run_and_a_local_multirun_sweep(tmp_path):
    run_in_process(
        "-m",
        *TINY,
        "schedule=linear,cosine",
        "trainer.iterations=2",
        "trainer.log_rate=1",
        "trainer.sample_at_end=false",
        "logger=none",
        f"hydra.sweep.dir={tmp_path}",
    )
    jobs = sorted(p for p in tmp_path.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 2
    targets = [
        torch.load(job / "checkpoints" / "last.pt", weights_only=True)["config"]["schedule"]["_target_"] for job in jobs
    ]
    assert targets == ["ddpm.diffusion.schedules.linear_betas", "ddpm.diffusion.schedules.cosine_betas"]


def test_experiments_compose_from_any_working_directory(tmp_path):
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), "experiment=quickstart", "--cfg", "job"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert "_target_: ddpm.data.digits.digits" in result.stdout and "use_labels: true" in result.stdout


def test_plot_schedules_writes_one_figure(tmp_path):
    run_in_process("task=plot_schedules", "logger=none", f"hydra.run.dir={tmp_path}")
    assert Image.open(tmp_path / "schedules.png").size[0] > 1000


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["trainer.batch_size=0"], "trainer.batch_size=0 must be >= 1"),
        (["trainer.batch_size=abc"], "trainer.batch_size='abc' must be of type int"),
        (["model.channel_mults=[1,2,2,2,2,2]"], "dataset.image_size=16 must be a multiple of"),  # the key typed
        (["model.num_groups=5"], "model.num_groups=5 must divide"),
        (["model.attention_resolutions=[7]"], "model.attention_resolutions contains 7"),
        (["schedule.low=0.5"], "schedule.low=0.5 must be < schedule.high=0.02"),
        (["task=sample", "checkpoint=/nonexistent/last.pt"], "checkpoint=/nonexistent/last.pt does not exist"),
        (["task=sample"], "task=sample needs checkpoint=PATH"),
        (["dataset=folder"], "dataset.path must be given a value"),
    ],
)
def test_bad_input_fails_before_training_with_a_message_naming_the_key(overrides, expected, tmp_path, capfd):
    code, output = run_main_in_process([*TINY, *overrides, "logger=none", f"hydra.run.dir={tmp_path}"], capfd)
    assert code == 1 and expected in output and "Traceback" not in output, output
    assert not (tmp_path / "checkpoints").exists()


def test_unknown_group_option_shows_hydras_choices(tmp_path, capfd):
    code, output = run_main_in_process(["schedule=quadratic", f"hydra.run.dir={tmp_path}"], capfd)
    assert code == 1 and "Could not find 'schedule/quadratic'" in output and "dnst" in output, output


def test_labels_on_a_folder_without_classes_are_refused(tmp_path, capfd):
    images = tmp_path / "flat"
    images.mkdir()
    for index in range(4):
        Image.new("RGB", (16, 16), color=(index * 40, 0, 0)).save(images / f"{index}.png")
    code, output = run_main_in_process(
        [
            "dataset=folder",
            f"dataset.path={images}",
            "dataset.image_size=16",
            "trainer.use_labels=true",
            *TINY[1:],
            "logger=none",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        capfd,
    )
    assert code == 1 and "trainer.use_labels=true needs class labels" in output, output


def test_a_file_that_is_not_a_checkpoint_is_refused(tmp_path, capfd):
    bogus = Path(tmp_path / "notes.pt")
    bogus.write_text("not a checkpoint")
    code, output = run_main_in_process(
        ["task=sample", f"checkpoint={bogus}", f"hydra.run.dir={tmp_path / 'run'}"], capfd
    )
    assert code == 1 and "is not a checkpoint: it holds text" in output, output


def test_data_on_the_device_trains_exactly_like_dataloader_workers(tmp_path):
    """The same batches either way (the digits have no flips), so the same weights, bit for bit."""
    steps = [
        "trainer.iterations=4",
        "trainer.log_rate=2",
        "trainer.checkpoint_rate=0",
        "logger=none",
        "trainer.sample_at_end=false",
    ]
    run_in_process(*TINY, *steps, "trainer.data_on_device=true", f"hydra.run.dir={tmp_path / 'device'}")
    run_in_process(*TINY, *steps, "trainer.data_on_device=false", f"hydra.run.dir={tmp_path / 'workers'}")
    assert "batches from DeviceBatches" in (tmp_path / "device" / "main.log").read_text()
    device = torch.load(tmp_path / "device" / "checkpoints" / "last.pt", weights_only=True)["model"]
    workers = torch.load(tmp_path / "workers" / "checkpoints" / "last.pt", weights_only=True)["model"]
    assert all(torch.equal(device[name], workers[name]) for name in workers)


def test_benchmark_prints_a_table_and_a_json_line_and_writes_benchmark_json(tmp_path):
    result = run_main(
        *TINY,
        "task=benchmark",
        "logger=none",
        "benchmark.batch_size=8",
        "benchmark.sample_batch_size=8",
        "benchmark.warmup_steps=1",
        "benchmark.steps=3",
        "benchmark.data_batches=3",
        "benchmark.precisions=[fp32,bf16]",
        f"hydra.run.dir={tmp_path}",
    )
    saved = json.loads((tmp_path / "benchmark.json").read_text())
    printed = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("{")))
    assert printed == saved
    assert "images/s" in result.stdout and "TFLOP/s" in result.stdout and "peak memory" in result.stdout
    assert saved["train_images_per_s"] > 0 and saved["sample_images_per_s"] > 0 and saved["data_images_per_s"] > 0
    assert saved["train_steps_timed"] == 3 and saved["batch_size"] == 8 and saved["precision"] == "fp32"
    # Both precisions side by side; the headline numbers are the first one's.
    assert list(saved["by_precision"]) == ["fp32", "bf16"]
    assert saved["by_precision"]["fp32"]["train_images_per_s"] == saved["train_images_per_s"]
    assert saved["by_precision"]["bf16"]["sample_images_per_s"] > 0
    assert "x the step time of fp32" in result.stdout
    # FLOPs are counted, not assumed: training costs about three forward passes.
    assert saved["train_gflop_per_image"] == pytest.approx(3 * saved["sample_gflop_per_image"], rel=0.05)
    assert saved["train_tflops"] == pytest.approx(saved["train_gflop_per_image"] * saved["train_images_per_s"] / 1e3)
