"""Threads sized to the allocation (ddpm.runtime.cpu_share): the CPUs a process may use, shared with the processes that
run on them at the same time; DataLoader workers by device; a local sweep tells its jobs how many they are."""

import json
import os

import pytest
import torch
from omegaconf import OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.runtime import cpu_share as share_module
from ddpm.runtime.cpu_share import (
    JOBS_AT_ONCE,
    LOCAL_LAUNCHER,
    ShareCpusAmongLocalJobs,
    cpu_share,
    data_workers,
    use_cpu_share,
)


@pytest.fixture
def sixteen_cpus(monkeypatch):
    """An affinity mask of 16 CPUs, whatever this machine has."""
    monkeypatch.setattr(share_module.os, "sched_getaffinity", lambda pid: set(range(16)))


@pytest.mark.parametrize(
    "environ, threads, source",
    [
        ({}, 16, "16 CPUs in the affinity mask"),
        ({"SLURM_CPUS_PER_TASK": "4", "SLURM_JOB_ID": "7"}, 4, "SLURM_CPUS_PER_TASK=4"),
        ({"SLURM_CPUS_PER_TASK": "32"}, 16, "16 CPUs in the affinity mask"),  # bound to fewer than it was told
        ({"LOCAL_WORLD_SIZE": "4"}, 4, "shared by 4 ranks"),  # torchrun's ranks share the mask
        ({"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "2"}, 4, "SLURM_CPUS_PER_TASK=8, shared by 2 ranks"),
        ({"SUBMITIT_LOCAL_NTASKS": "2", JOBS_AT_ONCE: "3"}, 2, "shared by 2 ranks x 3 sweep jobs at once"),
        ({JOBS_AT_ONCE: "40"}, 1, "shared by 40 sweep jobs at once"),  # never below one thread
        ({"LOCAL_WORLD_SIZE": "", "SLURM_CPUS_PER_TASK": "x"}, 16, "16 CPUs in the affinity mask"),  # junk ignored
        ({"OMP_NUM_THREADS": "1", "LOCAL_WORLD_SIZE": "2"}, 8, "shared by 2 ranks"),  # torchrun's 1 is not read
    ],
)
def test_threads_follow_affinity_slurm_and_the_processes_that_share_them(sixteen_cpus, environ, threads, source):
    share = cpu_share(None, environ)
    assert share.threads == threads
    assert source in share.source


def test_an_explicit_thread_count_wins_and_a_bad_one_is_named(sixteen_cpus):
    share = cpu_share(3, {"SLURM_CPUS_PER_TASK": "8", "LOCAL_WORLD_SIZE": "2"})
    assert (share.threads, share.source) == (3, "trainer.num_threads=3")
    for bad in (0, -2, 1.5, True, "4"):
        with pytest.raises(ConfigError, match=rf"trainer.num_threads={bad!r} must be a whole number >= 1"):
            cpu_share(bad, {})


def test_the_real_affinity_mask_is_read():
    assert cpu_share(None, {}).cpus == len(os.sched_getaffinity(0))


def test_use_cpu_share_sets_torch_threads_and_logs_them(monkeypatch, caplog):
    before = torch.get_num_threads()
    monkeypatch.setattr(share_module.os, "sched_getaffinity", lambda pid: {0, 1})
    monkeypatch.setenv(JOBS_AT_ONCE, "3")
    try:
        with caplog.at_level("INFO", logger="ddpm.runtime.cpu_share"):
            share = use_cpu_share(None)
            assert torch.get_num_threads() == share.threads == 1
        assert "1 CPU thread (2 CPUs in the affinity mask, shared by 3 sweep jobs at once)" in caplog.text
        assert "3 processes x 1 thread(s) run on 2 CPUs" in caplog.text
    finally:
        torch.set_num_threads(before)


def test_data_workers_by_device():
    eight = share_module.CpuShare(threads=8, cpus=8, processes=1, source="")
    two = share_module.CpuShare(threads=2, cpus=2, processes=1, source="")
    assert data_workers(None, torch.device("cuda"), eight) == 4
    assert data_workers(None, torch.device("cuda"), two) == 1  # one CPU left to the process feeding the GPU
    assert data_workers(None, torch.device("cpu"), eight) == 0
    assert data_workers(3, torch.device("cpu"), two) == 3


def sweep_config(launcher: str, overrides: list[str], **sweeper) -> OmegaConf:
    return OmegaConf.create(
        {"hydra": {"launcher": {"_target_": launcher}, "overrides": {"task": overrides}, "sweeper": sweeper}}
    )


@pytest.mark.parametrize(
    "overrides, sweeper, jobs",
    [
        (["schedule=linear,cosine,dns", "model.base_channels=64,128", "trainer.iterations=10"], {}, 6),
        (["schedule=linear,cosine,dns", "model.base_channels=64,128"], {"max_batch_size": 4}, 4),
        (["optimizer.lr=interval(1e-4,1e-3)"], {"n_jobs": 2}, 2),  # a search: its batch size bounds it
        (["trainer.iterations=10"], {}, 1),
    ],
)
def test_a_local_sweep_tells_its_jobs_how_many_run_at_once(monkeypatch, overrides, sweeper, jobs):
    monkeypatch.delenv(JOBS_AT_ONCE, raising=False)
    ShareCpusAmongLocalJobs().on_multirun_start(sweep_config(LOCAL_LAUNCHER, overrides, **sweeper))
    assert os.environ[JOBS_AT_ONCE] == str(jobs)


def test_other_launchers_are_left_alone(monkeypatch):
    monkeypatch.delenv(JOBS_AT_ONCE, raising=False)
    slurm = "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    ShareCpusAmongLocalJobs().on_multirun_start(sweep_config(slurm, ["schedule=linear,cosine"]))
    basic = "hydra._internal.core_plugins.basic_launcher.BasicLauncher"  # one job after the other, in this process
    ShareCpusAmongLocalJobs().on_multirun_start(sweep_config(basic, ["schedule=linear,cosine"]))
    assert JOBS_AT_ONCE not in os.environ


@pytest.mark.slow
def test_the_jobs_of_a_sweep_on_the_local_launcher_take_their_share(tmp_path):
    """The callback's count reaches the jobs through submitit's local controller, and each job logs its share."""
    from conftest import TINY_QUICKSTART, run_main

    run_main(
        "-m",
        *TINY_QUICKSTART,
        "hydra/launcher=local",
        "schedule=cosine,dns",
        "schedule.num_timesteps=50",
        "trainer.iterations=2",
        "trainer.batch_size=8",
        "trainer.sample_at_end=false",
        f"hydra.sweep.dir={tmp_path}",
    )
    cpus = len(os.sched_getaffinity(0))
    for job in ("0", "1"):
        log = next((tmp_path / job).glob("*.log")).read_text()
        threads = max(cpus // 2, 1)
        assert (
            f"{threads} CPU thread{'s' * (threads != 1)} ({cpus} CPUs in the affinity mask, shared by 2 sweep jobs at once)"
            in log
        )
        assert json.loads((tmp_path / job / "summary.json").read_text())["steps"] == 2
