"""Sweeps, searches, a data-parallel job across two nodes, preemption and time limits against a real SLURM
cluster, through `hydra/launcher=slurm` (hydra-submitit-launcher), as a user runs them. (Two ranks on one
machine are tested with torchrun, in test_distributed.py.)

The cluster is the local one of tests/slurm/cluster-up.sh, which .ci/run starts, with its partition of two
nodes emulated in network namespaces. Without a cluster these tests
are skipped, except under CI (CI=true), where a missing cluster is a failure.
"""

import csv
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, TINY_QUICKSTART, comparable, run_main, user_environment
from wandb_records import read_wandb_records

from ddpm.io.checkpoint import load_checkpoint


def cluster_problem() -> str | None:
    """Why the tests cannot use a SLURM cluster here, or None when they can."""
    if shutil.which("sbatch") is None:
        return "no SLURM client (sbatch) on PATH: start one with tests/slurm/cluster-up.sh"
    result = subprocess.run(["sinfo", "-h", "-o", "%t"], capture_output=True, text=True, timeout=30)
    if result.returncode != 0 or not {"idle", "mix", "alloc"} & set(result.stdout.split()):
        return f"no usable SLURM node (sinfo: {result.stdout.strip() or result.stderr.strip()})"
    return None


# The partition of two nodes that tests/slurm/cluster-up.sh emulates (each node a network namespace).
TWO_NODE_PARTITION = os.environ.get("DDPM_SLURM_TWO_NODE_PARTITION", "twonode")


def two_node_problem() -> str | None:
    """Why the two-node test cannot run here, or None when it can."""
    result = subprocess.run(
        ["sinfo", "-h", "-p", TWO_NODE_PARTITION, "-o", "%n %t"], capture_output=True, text=True, timeout=30
    )
    usable = [line for line in result.stdout.splitlines() if line.split()[-1] in {"idle", "mix", "alloc"}]
    if len(usable) < 2:
        return f"no partition {TWO_NODE_PARTITION} of two usable nodes (sinfo: {result.stdout.strip() or 'none'})"
    return None


PROBLEM = cluster_problem()
TWO_NODE_PROBLEM = PROBLEM or two_node_problem()
if TWO_NODE_PROBLEM and os.environ.get("CI"):
    raise RuntimeError(f"CI needs the local SLURM cluster of tests/slurm/cluster-up.sh: {TWO_NODE_PROBLEM}")
pytestmark = [pytest.mark.slow, pytest.mark.skipif(PROBLEM is not None, reason=PROBLEM or "")]

SLURM = ["-m", "hydra/launcher=slurm", "hydra.launcher.cpus_per_task=1", "hydra.launcher.timeout_min=30"]
TRAIN = [
    *TINY_QUICKSTART,
    "schedule.num_timesteps=50",
    "trainer.batch_size=16",
    "trainer.test_batches=1",
    "trainer.sample_at_end=false",
]


def job_summary(sweep: Path, job: int = 0) -> dict:
    return json.loads((sweep / str(job) / "summary.json").read_text())


def test_a_sweep_runs_as_a_job_array_and_is_summarized(tmp_path):
    sweep = tmp_path / "sweep"
    run_main(
        *SLURM,
        *TRAIN,
        "schedule=linear,cosine,dns",
        "trainer.iterations=4",
        "trainer.log_rate=2",
        "trainer.checkpoint_rate=2",
        f"hydra.sweep.dir={sweep}",
    )
    summaries = [job_summary(sweep, job) for job in range(3)]
    assert all(s["steps"] == 4 and s["slurm_job_id"] for s in summaries)
    assert len({s["slurm_array_job_id"] for s in summaries}) == 1 and summaries[0]["slurm_array_job_id"]
    assert all((sweep / str(job) / "checkpoints" / "last.pt").is_file() for job in range(3))
    schedules = [
        load_checkpoint(sweep / str(j) / "checkpoints" / "last.pt")["config"]["schedule"]["_target_"] for j in range(3)
    ]
    assert schedules == [
        "ddpm.diffusion.schedules.linear_betas",
        "ddpm.diffusion.schedules.cosine_betas",
        "ddpm.diffusion.schedules.dns_betas",
    ]
    with open(sweep / "summary.csv") as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["done"] * 3
    assert [row["slurm_job_id"] for row in rows] == [s["slurm_job_id"] for s in summaries]


def test_an_optuna_search_runs_its_trials_as_slurm_jobs(tmp_path):
    """The search preset through the SLURM launcher, two trials at a time: Optuna proposes, SLURM runs."""
    from test_search import SEARCH, check_study

    sweep = tmp_path / "search"
    run_main(*SEARCH, *SLURM[1:], "hydra.sweeper.n_jobs=2", f"hydra.sweep.dir={sweep}", timeout=900)
    check_study(sweep, 4)
    assert all(job_summary(sweep, job)["slurm_job_id"] for job in range(4))


def start_sweep(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, str(PROJECT_ROOT / "main.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=user_environment(),
    )


def submitted_job_id(sweep: Path, process: subprocess.Popen, timeout: float = 120) -> str:
    """The SLURM id of the sweep's one job (submitit names a folder after it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        folders = [p.name for p in (sweep / ".submitit").glob("*") if p.is_dir() and p.name[0].isdigit()]
        if folders:
            return sorted(folders)[0].split("_")[0]
        assert process.poll() is None, process.stdout.read()
        time.sleep(0.5)
    raise AssertionError("the sweep submitted no job")


def wait_for_file(path: Path, process: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert process.poll() is None, f"the sweep ended before {path} appeared:\n{process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path} did not appear within {timeout} s"
        time.sleep(0.2)


def check_resumed_and_complete(sweep: Path, iterations: int) -> None:
    summary = job_summary(sweep)
    assert summary["steps"] == iterations
    assert summary["slurm_restart_count"] >= 1, summary  # requeued: the same job, run again
    assert summary["resumed_from_step"] and 0 < summary["resumed_from_step"] < iterations, summary
    logged = [json.loads(line)["step"] for line in (sweep / "0" / "metrics.jsonl").read_text().splitlines()]
    assert logged == sorted(set(logged)) and logged[-1] == iterations  # continued, not restarted


def test_a_preempted_job_checkpoints_is_requeued_and_resumes_its_wandb_run(tmp_path):
    sweep = tmp_path / "sweep"
    iterations = 300
    with_wandb = [argument if argument != "logger=none" else "logger=wandb" for argument in TRAIN]
    process = start_sweep(
        *SLURM,
        *with_wandb,
        "logger.mode=offline",
        f"trainer.iterations={iterations}",
        "trainer.log_rate=10",
        "trainer.checkpoint_rate=20",
        f"hydra.sweep.dir={sweep}",
    )
    job_id = submitted_job_id(sweep, process)
    wait_for_file(sweep / "0" / "checkpoints" / "step_0000020.pt", process)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)  # what preemption sends
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    check_resumed_and_complete(sweep, iterations)
    # The requeued job continued its own wandb run: two processes, one run id, in the sweep's group.
    runs = sorted((sweep / "0" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and len({path.name.rsplit("-", 1)[1] for path in runs}) == 1, runs
    for run_dir in runs:
        [run] = [
            record.run
            for record in read_wandb_records(next(run_dir.glob("run-*.wandb")))
            if record.WhichOneof("record_type") == "run"
        ]
        assert run.run_group == "-".join(sweep.resolve().parts[-2:])


def assert_same_weights(run_dir: Path, reference_dir: Path, checkpoint: str = "last.pt") -> None:
    """The same batches and noise give the same weights; only the order of the gradient sums differs."""
    ranks = load_checkpoint(run_dir / "checkpoints" / checkpoint)["model"]
    one = load_checkpoint(reference_dir / "checkpoints" / checkpoint)["model"]
    for name in one:
        torch.testing.assert_close(
            comparable(name, ranks[name]), comparable(name, one[name]), rtol=1e-3, atol=1e-3, msg=name
        )


@pytest.mark.skipif(TWO_NODE_PROBLEM is not None, reason=TWO_NODE_PROBLEM or "")
def test_a_two_node_job_trains_like_one_process_and_resumes_on_two_nodes_after_a_preemption(tmp_path):
    """Two ranks on two nodes (the rendezvous from SLURM: the allocation's first node is the master), stopped
    by USR2 after a checkpoint, requeued, resumed on two nodes and trained to the end."""
    sweep = tmp_path / "sweep"
    settings = [
        "trainer.iterations=60",
        "trainer.log_rate=10",
        "trainer.checkpoint_rate=10",
        "trainer.keep_checkpoints=0",
    ]
    process = start_sweep(
        *SLURM,
        *TRAIN,
        *settings,
        f"hydra.launcher.partition={TWO_NODE_PARTITION}",
        "hydra.launcher.nodes=2",
        "hydra.launcher.tasks_per_node=1",
        f"hydra.sweep.dir={sweep}",
    )
    job_id = submitted_job_id(sweep, process)
    wait_for_file(sweep / "0" / "checkpoints" / "step_0000010.pt", process)
    subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
    output, _ = process.communicate(timeout=600)
    assert process.returncode == 0, output
    check_resumed_and_complete(sweep, 60)
    summary = job_summary(sweep)
    assert summary["world_size"] == 2 and len(set(summary["rank_hosts"])) == 2, summary  # two nodes, after resume
    assert len(set(summary["rank_weight_digests"])) == 1, summary

    # Like one process with the same global batch. Over tens of steps Adam makes full-size steps out of the rounding
    # noise of weights whose gradient is nearly zero, so the weights are compared at step 10 (where the order
    # of the sums has not moved them yet), and the end by its test loss. (The resumed job's weights equal those
    # of the same job left alone, bit for bit: resuming is exact.)
    run_main(*TRAIN, *settings, f"hydra.run.dir={tmp_path / 'one'}")
    assert_same_weights(sweep / "0", tmp_path / "one", "step_0000010.pt")
    one = json.loads((tmp_path / "one" / "summary.json").read_text())
    assert summary["test_loss"] == pytest.approx(one["test_loss"], rel=0.02), (summary, one)


def steps_per_second(tmp_path: Path) -> float:
    """How fast TRAIN runs on one CPU of this machine (the cluster's node), from a short local run."""
    run_dir = tmp_path / "calibration"
    run_main(
        *TRAIN,
        "trainer.iterations=150",
        "trainer.log_rate=50",
        "trainer.checkpoint_rate=0",
        "trainer.num_workers=0",
        f"hydra.run.dir={run_dir}",
    )
    logged = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return min(m["images_per_s"] for m in logged[1:]) / 16  # batch 16; the first interval includes warm-up


def test_a_job_at_its_time_limit_checkpoints_is_requeued_and_resumes(tmp_path):
    sweep = tmp_path / "sweep"
    # 2 minute jobs warned 30 s before the limit. SLURM may send the warning up to 60 s early, so it comes
    # 30-90 s into each allocation: after the job has started (a warning during Python's start-up, before
    # any handler exists, would kill it), and before the end of training sized to last about 100 s (and a
    # multiple of the log rate, so that the last step is logged).
    iterations = 10 * round(100 * steps_per_second(tmp_path) / 10)
    run_main(
        *SLURM,
        *TRAIN,
        f"trainer.iterations={iterations}",
        "trainer.log_rate=10",
        "trainer.checkpoint_rate=50",
        "hydra.launcher.timeout_min=2",
        "hydra.launcher.signal_delay_s=30",
        "hydra.launcher.max_num_timeout=8",
        f"hydra.sweep.dir={sweep}",
        timeout=1200,
    )
    check_resumed_and_complete(sweep, iterations)


def test_a_job_killed_outright_fails_the_sweep_instead_of_hanging(tmp_path):
    sweep = tmp_path / "sweep"
    process = start_sweep(*SLURM, *TRAIN, "trainer.iterations=100000", f"hydra.sweep.dir={sweep}")
    job_id = submitted_job_id(sweep, process)
    wait_for_file(sweep / "0" / "metrics.jsonl", process)
    subprocess.run(["scancel", "--signal=KILL", "--full", job_id], check=True, timeout=30)
    output, _ = process.communicate(timeout=180)
    assert process.returncode != 0
    assert "UncompletedJobError" in output or "has not produced any output" in output, output


def test_a_detached_sweep_returns_once_submitted_and_its_jobs_write_their_summary_rows(tmp_path):
    """hydra/launcher=slurm_detached: the command ends before its jobs (which train for tens of seconds); the
    summary lists them as running, and each job fills in its row as it ends."""
    sweep = tmp_path / "sweep"
    started = time.monotonic()
    result = run_main(
        "-m",
        "hydra/launcher=slurm_detached",
        "hydra.launcher.cpus_per_task=1",
        "hydra.launcher.timeout_min=30",
        *TRAIN,
        "schedule=linear,cosine",
        "trainer.iterations=200",
        "trainer.log_rate=100",
        f"hydra.sweep.dir={sweep}",
    )
    returned_after = time.monotonic() - started
    assert "submitted 2 jobs (SLURM job ids" in result.stdout + result.stderr
    assert not (sweep / "1" / "summary.json").exists(), f"the command waited for the jobs ({returned_after:.0f} s)"
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        rows = list(csv.DictReader(open(sweep / "summary.csv"))) if (sweep / "summary.csv").exists() else []
        if [row.get("status") for row in rows] == ["done", "done"]:
            break
        time.sleep(2)
    assert [row["status"] for row in rows] == ["done", "done"], rows
    assert all(job_summary(sweep, job)["steps"] == 200 for job in range(2))
