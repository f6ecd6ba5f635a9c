"""The fault catalogue: every fault on the way into or out of a run ends in one line, with nothing lost.

Each case below is one bad command, grouped by the class of fault (checkpoint files, sample files, the run
directory, values, data). For each, `python main.py ...` (run in this process, as Hydra runs it) must exit with
status 1, print exactly one error line that holds the given substrings (the key, the value, what is allowed),
show no traceback, and leave the checkpoints of two existing runs byte for byte as they were.

Faults that need a second process or a timing (two runs in one directory, a worker killed, a disk that fills
during a run, SIGTERM and SIGINT) have tests of their own below and in test_resume.py.
"""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from fault_files import IS_ROOT, mounted_tmpfs
from main_in_process import RUN, SAMPLE, checkpoint_files, command, run_main_in_process
from test_resume import start_main, wait_for

from ddpm.io.checkpoint import load_checkpoint

EVALUATE = [
    "task=evaluate",
    "logger=none",
    "fid=tiny",
    "eval.device=cpu",
    "eval.num_samples=4",
    "eval.batch_size=2",
    "eval.is_splits=2",
    "eval.pr_k=1",
]


def case(kind: str, base: list[str], overrides: list[str], *expected: str, id: str, resume: str | None = None):
    """One bad command of class `kind`: `base` with `overrides`, and the substrings its error line must hold.
    resume="never" starts over in the run directory, so that the value's own check is what refuses it."""
    if resume:
        overrides = [*overrides, f"trainer.resume={resume}"]
    return pytest.param(base, overrides, expected, id=f"{kind}:{id}")


CATALOGUE = [
    # Checkpoint files: empty, truncated, directories, not zip archives, without a digest, of another model.
    case("checkpoint", SAMPLE, ["checkpoint={empty}"], "checkpoint={empty} is empty (0 bytes)", id="sample-empty"),
    case("checkpoint", RUN, ["trainer.resume={empty}"], "trainer.resume={empty} is empty (0 bytes)", id="resume-empty"),
    case(
        "checkpoint", SAMPLE, ["checkpoint={truncated}"], "checkpoint={truncated} is truncated", id="sample-truncated"
    ),
    case(
        "checkpoint",
        RUN,
        ["trainer.resume={truncated}"],
        "trainer.resume={truncated} is truncated",
        id="resume-truncated",
    ),
    case("checkpoint", SAMPLE, ["checkpoint={a_dir}"], "checkpoint={a_dir} is a directory", id="sample-directory"),
    case("checkpoint", RUN, ["trainer.resume={a_dir}"], "trainer.resume={a_dir} is a directory", id="resume-directory"),
    case(
        "checkpoint",
        SAMPLE,
        ["checkpoint={png_pt}"],
        "checkpoint={png_pt} is not a checkpoint",
        "a PNG image",
        id="sample-png-renamed",
    ),
    case(
        "checkpoint",
        RUN,
        ["trainer.resume={png_pt}"],
        "trainer.resume={png_pt} is not a checkpoint",
        "a PNG image",
        id="resume-png-renamed",
    ),
    case(
        "checkpoint",
        SAMPLE,
        ["checkpoint={text_pt}"],
        "checkpoint={text_pt} is not a checkpoint",
        "text",
        id="sample-text",
    ),
    case(
        "checkpoint",
        SAMPLE,
        ["checkpoint={undigested}"],
        "checkpoint={undigested} carries no digest",
        "trust_checkpoint=true",
        id="sample-no-digest",
    ),
    case(
        "checkpoint",
        RUN,
        ["trainer.resume={undigested}"],
        "trainer.resume={undigested} carries no digest",
        "trust_checkpoint=true",
        id="resume-no-digest",
    ),
    case(
        "checkpoint",
        EVALUATE,
        ["checkpoint={undigested}"],
        "checkpoint={undigested} carries no digest",
        id="evaluate-no-digest",
    ),
    case(
        "checkpoint",
        RUN,
        ["trainer.resume={swapped}"],
        "trainer.resume={swapped}",
        "weights are not those of the model",
        id="resume-weights-of-another-model",
    ),
    case("checkpoint", SAMPLE, ["checkpoint="], "task=sample needs checkpoint=PATH", id="sample-empty-path"),
    case("checkpoint", EVALUATE, ["checkpoint={a_dir}"], "checkpoint={a_dir} is a directory", id="evaluate-directory"),
    case(
        "checkpoint",
        SAMPLE,
        ["checkpoint={cond}", "trust_checkpoint=maybe"],
        "trust_checkpoint='maybe' must be of type bool",
        id="trust-checkpoint-not-bool",
    ),
    # Sample files given to task=evaluate: not npz, truncated, directories, shards that are not npz.
    case(
        "samples",
        EVALUATE,
        ["eval.samples={npz_truncated}"],
        "eval.samples={npz_truncated}",
        "truncated",
        id="npz-truncated",
    ),
    case(
        "samples",
        EVALUATE,
        ["eval.samples={png_npz}"],
        "eval.samples={png_npz} is not an npz file",
        "a PNG image",
        id="npz-is-png",
    ),
    case(
        "samples", EVALUATE, ["eval.samples={text_pt}"], "eval.samples={text_pt} is not an npz file", id="npz-is-text"
    ),
    case("samples", EVALUATE, ["eval.samples={a_dir}"], "eval.samples={a_dir} is a directory", id="npz-directory"),
    case(
        "samples",
        EVALUATE,
        ["eval.merge={merge_truncated}"],
        "eval.merge={merge_truncated}",
        "shard_0_of_1.npz",
        "truncated",
        id="merge-truncated-shard",
    ),
    case(
        "samples",
        EVALUATE,
        ["eval.merge={merge_png}"],
        "eval.merge={merge_png}",
        "shard_0_of_1.npz",
        "a PNG image",
        id="merge-png-shard",
    ),
    # The run directory: a file, under a file, read-only, on a full disk; checked before Hydra writes there.
    case("run-dir", RUN, ["hydra.run.dir={a_file}"], "hydra.run.dir={a_file}", "is a file", id="run-dir-is-a-file"),
    case(
        "run-dir",
        RUN,
        ["hydra.run.dir={a_file}/run"],
        "hydra.run.dir={a_file}/run",
        "cannot be created",
        id="run-dir-under-a-file",
    ),
    case(
        "run-dir",
        SAMPLE,
        ["checkpoint={cond}", "hydra.run.dir={a_file}"],
        "hydra.run.dir={a_file}",
        "is a file",
        id="sample-run-dir-is-a-file",
    ),
    case(
        "run-dir",
        RUN,
        ["hydra.run.dir={read_only}/run"],
        "hydra.run.dir={read_only}/run",
        "cannot be",
        id="run-dir-read-only",
    ),
    case(
        "run-dir",
        RUN,
        ["hydra.run.dir={full_disk}/run"],
        "hydra.run.dir={full_disk}/run",
        "MB free",
        id="run-dir-disk-full",
    ),
    case(
        "run-dir",
        RUN,
        ["hydra.run.dir={last_pt_is_dir}"],
        "{last_pt_is_dir}/checkpoints/last.pt is a directory",
        id="last-pt-is-a-directory",
    ),
    # Values, all checked before the first step: the samplers the run uses, seeds, devices, booleans given as
    # strings, channel counts against the dataset, learning rates, keys added with +, and names as typed.
    case("value", RUN, ["sampler=ddim", "sampler.eta=-1"], "sampler.eta=-1", ">= 0", id="grid-sampler-eta"),
    case("value", RUN, ["sampler=ddim", "sampler.steps=0"], "sampler.steps=0", "1..50", id="grid-sampler-steps"),
    case(
        "value",
        RUN,
        ["sampler=dpm_solver", "sampler.steps=51"],
        "sampler.steps=51",
        "1..50",
        id="grid-sampler-steps-above-timesteps",
    ),
    case(
        "value",
        RUN,
        ["sampler=ddpm", "sampler.variance=wide"],
        "sampler.variance='wide' is not one of",
        id="grid-sampler-variance",
    ),
    case(
        "value",
        RUN,
        ["sampler=ddim", "sampler.eta=lots"],
        "sampler.eta='lots' must be of type float",
        id="grid-sampler-eta-str",
    ),
    case(
        "value",
        RUN,
        ["trainer.eval_rate=1", "fid=tiny", "trainer.eval_steps=51"],
        "trainer.eval_steps=51",
        "schedule.num_timesteps=50",
        id="fid-sampler-steps",
    ),
    case("value", RUN, ["trainer.seed=-1"], "trainer.seed=-1 must be >= 0", id="trainer-seed-negative"),
    case(
        "value",
        SAMPLE,
        ["checkpoint={cond}", "sample.seed=abc"],
        "sample.seed='abc' must be of type int",
        id="sample-seed-str",
    ),
    case("value", SAMPLE, ["checkpoint={cond}", "sample.seed=-5"], "sample.seed=-5 must be >= 0", id="sample-seed-neg"),
    case("value", EVALUATE, ["checkpoint={cond}", "eval.seed=-1"], "eval.seed=-1 must be >= 0", id="eval-seed-neg"),
    case("value", RUN, ["trainer.device=mps"], "trainer.device='mps'", "auto, cpu, cuda or cuda:N", id="device-mps"),
    case("value", RUN, ["trainer.device=meta"], "trainer.device='meta'", "auto, cpu, cuda or cuda:N", id="device-meta"),
    case("value", SAMPLE, ["checkpoint={cond}", "sample.device=meta"], "sample.device='meta'", id="sample-device-meta"),
    case(
        "value",
        RUN,
        ["model.in_channels=3"],
        "model.in_channels=3",
        "1 channel",
        resume="never",
        id="in-channels-vs-dataset",
    ),
    case(
        "value",
        RUN,
        ["model.out_channels=3"],
        "model.out_channels=3",
        "model.in_channels=1",
        resume="never",
        id="out-channels-vs-dataset",
    ),
    case(
        "value",
        SAMPLE,
        ["checkpoint={cond}", "sample.use_ema=maybe"],
        "sample.use_ema='maybe' must be of type bool",
        id="sample-use-ema-str",
    ),
    case("value", RUN, ["trainer.use_ema=maybe"], "trainer.use_ema='maybe' must be of type bool", id="use-ema-str"),
    case(
        "value",
        RUN,
        ["+lerning_rate=0.1"],
        "lerning_rate=0.1 is not a key of the config",
        id="added-unknown-top-level-key",
    ),
    case(
        "value",
        RUN,
        ["+optimizer.lerning_rate=0.1"],
        "optimizer.lerning_rate is not a setting of optimizer",
        "'lr'",
        id="added-unknown-optimizer-key",
    ),
    case(
        "value",
        RUN,
        ["+model.dropuot=0.1"],
        "model.dropuot",
        "did you mean model.dropout",
        id="added-unknown-model-key",
    ),
    case("value", RUN, ["+sampler.etaa=0.5"], "sampler.etaa", "did you mean", id="added-unknown-sampler-key"),
    case("value", RUN, ["+trainer.lerning_rate=0.1"], "trainer.lerning_rate", id="added-unknown-trainer-key"),
    case("value", RUN, ["optimizer.lr=inf"], "optimizer.lr=inf", "finite number > 0", id="lr-inf"),
    case("value", RUN, ["optimizer.lr=nan"], "optimizer.lr=nan", "finite number > 0", id="lr-nan"),
    case("value", RUN, ["optimizer.lr=0"], "optimizer.lr=0", "finite number > 0", id="lr-zero"),
    case("value", RUN, ["model.num_groups=0"], "model.num_groups=0", resume="never", id="num-groups-zero"),
    case(
        "value", RUN, ["dataset.image_size=9"], "dataset.image_size=9", resume="never", id="image-size-named-as-typed"
    ),
    # Data: a file a worker cannot decode is named.
    case(
        "data",
        RUN,
        [
            "dataset=folder",
            "dataset.path={truncated_jpeg_dir}",
            "dataset.image_size=8",
            "dataset.channels=1",
            "trainer.use_labels=false",
            "trainer.num_workers=1",
            "trainer.batch_size=2",
            "hydra.run.dir={tmp}/jpeg_run",
        ],
        "broken.jpg",
        "dataset.path={truncated_jpeg_dir}",
        id="worker-cannot-decode",
    ),
]


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if "[ERROR]" in line]


@pytest.mark.parametrize("base, overrides, expected", CATALOGUE)
def test_a_fault_ends_in_one_line_with_nothing_lost(base, overrides, expected, runs, files, capfd):
    needed = [name for name in ("read_only", "full_disk") if any(f"{{{name}}}" in o for o in overrides)]
    if any(files[name] is None for name in needed):
        pytest.skip(f"{needed} needs root (a tmpfs mount) here")
    run_dir = runs["cond_run"] if base is RUN else files["tmp"] / "run"
    args = command([*base, f"hydra.run.dir={run_dir}"], overrides, files)
    before = checkpoint_files(runs)

    code, output = run_main_in_process(args, capfd)

    shown = assert_one_error_line(code, output, args, expected, files)
    assert checkpoint_files(runs) == before, f"the existing checkpoints were changed:\n{shown}"


def assert_one_error_line(code: int, output: str, args: list[str], expected, paths: dict) -> str:
    """Exit status 1, exactly one error line holding every expected text, no traceback; returns the command
    and its output, for the messages of further checks."""
    shown = f"python main.py {' '.join(args)}\n--- exit status {code}, output:\n{output}"
    assert code == 1, f"expected exit status 1:\n{shown}"
    errors = error_lines(output)
    assert len(errors) == 1, f"expected exactly one error line:\n{shown}"
    for text in expected:
        assert text.format(**paths) in errors[0], f"expected {text.format(**paths)!r} in the error line:\n{shown}"
    assert "Traceback" not in output, f"a traceback:\n{shown}"
    return shown


def test_the_catalogue_covers_every_class_with_several_cases():
    kinds = [param.id.split(":")[0] for param in CATALOGUE]
    assert len(CATALOGUE) >= 40
    assert all(kinds.count(kind) >= 5 for kind in ("checkpoint", "samples", "run-dir", "value")), kinds


# --- Faults that need a second process or a moment in a run ------------------------------------------------------

LONG_RUN = command(RUN, ["trainer.iterations=100000", "trainer.log_rate=0", "trainer.keep_checkpoints=1"], {})


def long_run(*overrides: str) -> list[str]:
    return command(LONG_RUN, list(overrides), {})


def stop(process: subprocess.Popen) -> str:
    if process.poll() is None:
        process.kill()
    output, _ = process.communicate(timeout=60)
    return output


def test_two_runs_in_one_directory_the_second_refuses_naming_the_first(tmp_path, capfd):
    run_dir = tmp_path / "run"
    first = start_main(*long_run(f"hydra.run.dir={run_dir}"))
    try:
        wait_for(run_dir / "checkpoints" / "step_0000002.pt", first)
        hydra_files = {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()}
        # 3 steps: were the lock broken, this run would end in a second, not train for hours, and fail below.
        second = long_run("trainer.seed=1", "trainer.iterations=3", f"hydra.run.dir={run_dir}")
        code, output = run_main_in_process(second, capfd)
        [error] = error_lines(output)
        assert code == 1 and f"PID {first.pid}" in error and "in use" in error, output
        assert "Traceback" not in output
        assert {p: p.read_bytes() for p in (run_dir / ".hydra").iterdir()} == hydra_files  # Hydra wrote nothing
    finally:
        stop(first)
    # The lock went with the process that held it: the directory is free again, and its run continues.
    code, output = run_main_in_process(long_run("trainer.iterations=3", f"hydra.run.dir={run_dir}"), capfd)
    assert code == 0 and "resuming from" in output, output


def test_resume_never_moves_the_earlier_run_aside_and_auto_keeps_to_its_own_run(tmp_path, capfd):
    run_dir = tmp_path / "run"
    four = [*RUN, "trainer.iterations=4", "trainer.keep_checkpoints=0", f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(four, capfd)[0] == 0
    first_run = json.loads((run_dir / "run.json").read_text())["run_id"]
    code, output = run_main_in_process([*four, "trainer.iterations=2", "trainer.resume=never"], capfd)
    assert code == 0, output
    [earlier] = (run_dir / "previous").iterdir()
    assert f"moved the files of the earlier run in {run_dir} to {earlier}" in " ".join(output.split())
    assert sorted(p.name for p in (earlier / "checkpoints").iterdir()) == [
        "last.pt",
        "step_0000001.pt",
        "step_0000002.pt",
        "step_0000003.pt",
        "step_0000004.pt",
    ]
    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.pt", "step_0000001.pt", "step_0000002.pt"]
    second_run = json.loads((run_dir / "run.json").read_text())["run_id"]
    assert second_run != first_run and load_checkpoint(checkpoints / "last.pt")["run_id"] == second_run

    # A checkpoint of the earlier run put back among this run's, and last.pt damaged: resume=auto continues this
    # run's newest intact checkpoint (step 2), never the other run's step 4.
    (checkpoints / "step_0000004.pt").write_bytes((earlier / "checkpoints" / "step_0000004.pt").read_bytes())
    (checkpoints / "last.pt").unlink()  # (a hard link of step_0000002.pt: damage it alone)
    (checkpoints / "last.pt").write_bytes(b"")
    code, output = run_main_in_process([*four, "trainer.iterations=3"], capfd)
    flat = " ".join(output.split())
    assert code == 0 and "belongs to another run" in flat and "resuming from" in flat, output
    assert f"{checkpoints / 'step_0000002.pt'} (step 2)" in flat, output
    assert load_checkpoint(checkpoints / "last.pt")["step"] == 3


def test_a_damaged_last_checkpoint_falls_back_to_the_intact_periodic_one(tmp_path, capfd):
    run_dir = tmp_path / "run"
    args = [*RUN, "trainer.iterations=2", f"hydra.run.dir={run_dir}"]
    assert run_main_in_process(args, capfd)[0] == 0
    (run_dir / "checkpoints" / "last.pt").unlink()  # (a hard link of step_0000002.pt: damage it alone)
    (run_dir / "checkpoints" / "last.pt").write_bytes(b"")  # a 0-byte file: once an IndexError in the loader
    code, output = run_main_in_process([*args, "trainer.iterations=3"], capfd)
    assert code == 0 and "is empty (0 bytes)" in output, output
    assert "step_0000002.pt (step 2) instead of the damaged last.pt" in " ".join(output.split()), output


def test_a_killed_data_loading_worker_ends_in_one_line(tmp_path):
    run_dir = tmp_path / "run"
    process = start_main(*long_run("trainer.num_workers=1", "trainer.checkpoint_rate=0", f"hydra.run.dir={run_dir}"))
    try:
        time.sleep(1.0)  # into the training steps
        deadline = time.monotonic() + 120
        while not (workers := children(process.pid)):
            assert process.poll() is None and time.monotonic() < deadline, "no data-loading worker started"
            time.sleep(0.01)
        for worker in workers:
            os.kill(worker, signal.SIGKILL)
        process.wait(timeout=30)  # the loader learns of a dead worker at once: a run that goes on is the failure
    finally:
        output = stop(process)
    assert process.returncode == 1, output
    assert len(error_lines(output)) == 1, output
    [error] = error_lines(output)
    assert "data-loading worker" in error and "trainer.num_workers=1" in error, output
    assert "Traceback" not in output, output


def children(pid: int) -> list[int]:
    """The processes whose parent is `pid` (forked by any of its threads)."""
    found = []
    for status in Path("/proc").glob("[0-9]*/status"):
        try:
            fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
        except OSError:
            continue
        if fields.get("PPid", "").strip() == str(pid):
            found.append(int(status.parent.name))
    return found


@pytest.mark.skipif(not IS_ROOT, reason="a disk that fills needs a tmpfs mount (root)")
def test_a_disk_that_fills_during_a_run_ends_in_one_line_naming_space_and_the_last_checkpoint(tmp_path):
    with mounted_tmpfs(tmp_path / "disk", "size=16m") as disk:
        if disk is None:
            pytest.skip("tmpfs could not be mounted")
        run_dir = disk / "run"
        process = start_main(*long_run("trainer.keep_checkpoints=0", f"hydra.run.dir={run_dir}"))
        try:
            wait_for(run_dir / "checkpoints" / "step_0000002.pt", process)
            with open(disk / "filler", "wb") as handle:  # another job fills the disk, leaving 100 KB
                while (free := os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize) > 150_000:
                    handle.write(b"\0" * min(65536, free - 100_000))
                    handle.flush()
            process.wait(timeout=120)
        finally:
            output = stop(process)
        intact = [p for p in (run_dir / "checkpoints").glob("step_*.pt")]
        assert intact and all(load_checkpoint(p)["step"] for p in intact)  # what was written is intact
    assert process.returncode == 1, output
    [error] = error_lines(output)
    assert f"{run_dir}/checkpoints" in error and "MB free" in error and "the last intact checkpoint is" in error, output
    assert "Traceback" not in output, output
