"""Launching a command again is safe: a finished run is left as it is and says where its results are."""

import hashlib
import json
from pathlib import Path

from main_in_process import RUN, run_main_in_process

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
