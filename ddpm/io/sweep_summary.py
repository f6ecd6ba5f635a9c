"""Sweep summary: after `python main.py -m ...`, one table of every job's result in the sweep directory.

`SweepSummary` is a Hydra callback (registered under `hydra.callbacks` in conf/config.yaml) whose
`on_multirun_end` writes `summary.csv`, `summary.md` and `summary.png` next to the job directories: one row per job with its
overrides, final train/test loss, steps, wall time, SLURM job id, sample grid (and FID once jobs report one).
Each job also updates it as it ends (`after_sweep_job`, called by main.py), so a sweep that stopped at a failed
job still has its table, with that job's error line. The work is done by the plain functions `summarize` and
`write_summary`, which also summarize a sweep by hand:

    python -m ddpm.io.sweep_summary outputs/multiruns/2026-11-27/14-03-12
"""

import csv
import fcntl
import io
import json
import logging
import math
import shlex
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpm.config.launcher import DETACHED_LAUNCHER
from ddpm.io.checkpoint import write_atomically
from ddpm.io.plots import plot_sweep

log = logging.getLogger(__name__)

COLUMNS = [
    "job",
    "status",
    "overrides",
    "steps",
    "train_loss",
    "test_loss",
    "wall_time_s",
    "slurm_job_id",
    "sample_grid",
]
OPTIONAL_COLUMNS = ["objective", "fid", "nll_bits_per_dim", "error"]  # listed only when some job reports it
BEST_COMMAND_FILE = "best_command.txt"
TRAIN_TASK = "ddpm.tasks.train.run"  # conf/task/train.yaml
ERROR_FILE = "error.txt"  # a job's one error line, written by main.py when the job fails
LOCK_FILE = ".summary.lock"  # jobs ending at once (SLURM arrays) rewrite the summary one at a time
NO_RESULT = "ended without a result (killed, or stopped by an earlier job's failure)"


def record_job_error(job_dir: str | Path, line: str) -> None:
    """Keeps the line a failed job ended with in its directory, for the summary's error column."""
    path = Path(job_dir) / ERROR_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(" ".join(line.split()) + "\n")  # one line: a table cell


def clear_job_error(job_dir: str | Path) -> None:
    """A job that starts again (a rerun, a requeue) is no longer failed."""
    (Path(job_dir) / ERROR_FILE).unlink(missing_ok=True)


def read_job_error(job_dir: Path) -> str | None:
    try:
        return (job_dir / ERROR_FILE).read_text().strip() or None
    except OSError:
        return None


def job_dirs(sweep_dir: Path) -> list[Path]:
    """The job directories (named by hydra.job.num), in job order. Other entries, such as the submitit
    launcher's `.submitit/` folder, are not jobs."""
    numbered = [path for path in sweep_dir.iterdir() if path.is_dir() and path.name.isdigit()]
    return sorted(numbered, key=lambda path: int(path.name))


def read_overrides(job_dir: Path) -> str:
    """The job's command-line overrides as `a=1 b=2` (empty when Hydra wrote none)."""
    path = job_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return ""
    return " ".join(str(override) for override in OmegaConf.load(path))


def read_job_summary(job_dir: Path) -> dict[str, Any] | None:
    """The summary.json a finished training job writes; None when the job did not get that far."""
    path = job_dir / "summary.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):  # missing, or cut short by a kill while being written
        return None


def relative_to_sweep(path: str | None, sweep_dir: Path) -> str | None:
    """`path` relative to the sweep directory when it lies inside it, so the table stays short and the
    sweep directory can be moved; any other path unchanged."""
    if not path:
        return path
    try:
        return str(Path(path).resolve().relative_to(sweep_dir.resolve()))
    except ValueError:
        return path


def job_row(job_dir: Path, sweep_dir: Path, final: bool = True) -> dict[str, Any]:
    """One row of the summary: the job's overrides and, when it finished, its results; when it failed, its
    error line. A job with neither is `running` while the sweep goes on (`final=False`), and failed after."""
    row: dict[str, Any] = {"job": int(job_dir.name), "overrides": read_overrides(job_dir)}
    summary = read_job_summary(job_dir)
    if summary is None:
        error = read_job_error(job_dir)
        if error is None and not final:
            return {**row, "status": "running"}
        return {**row, "status": "failed", "error": error or NO_RESULT}
    return {
        **row,
        "status": "done",
        "steps": summary.get("steps"),
        "train_loss": summary.get("train_loss"),
        "test_loss": summary.get("test_loss"),
        "wall_time_s": summary.get("wall_time_s"),
        "slurm_job_id": summary.get("slurm_job_id"),
        "sample_grid": relative_to_sweep(summary.get("sample_grid"), sweep_dir),
        "fid": summary.get("fid", summary.get("best_fid")),  # a training run reports its best FID
        "nll_bits_per_dim": summary.get("nll_bits_per_dim"),
        "objective": summary.get("objective_value"),
        "objective_name": summary.get("objective"),
    }


def best_job(rows: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The done job of the lowest objective (every objective here is minimized); None when no job has one."""
    scored = [
        row
        for row in rows
        if row["status"] == "done"
        and isinstance(row.get("objective"), (int, float))
        and math.isfinite(row["objective"])
    ]
    return min(scored, key=lambda row: (row["objective"], row["job"])) if scored else None


def best_command(row: dict[str, Any]) -> str:
    """The job's run as a command line to paste (each override quoted for the shell where it needs it)."""
    return " ".join(["python main.py", *(shlex.quote(part) for part in shlex.split(row["overrides"] or ""))])


def summarize(sweep_dir: str | Path, final: bool = True) -> list[dict[str, Any]]:
    """One row per job of the sweep, ordered by job number; a job without results has status `failed`
    (or `running`, before the sweep's end)."""
    sweep_dir = Path(sweep_dir)
    return [job_row(job_dir, sweep_dir, final) for job_dir in job_dirs(sweep_dir)]


def columns_of(rows: list[dict[str, Any]]) -> list[str]:
    """The fixed columns, plus each optional one that some row has a value for."""
    return COLUMNS + [name for name in OPTIONAL_COLUMNS if any(row.get(name) is not None for row in rows)]


def markdown_cell(name: str, value: Any) -> str:
    """A value as it reads in the markdown table: losses to 4 significant digits, seconds to 0.1 s."""
    if value is None:
        return ""
    if name == "wall_time_s" and isinstance(value, (int, float)):
        return f"{value:.1f}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value).replace("|", "\\|")  # a `|` in an override would split the cell


def markdown_table(sweep_dir: Path, rows: list[dict[str, Any]], columns: list[str]) -> str:
    counts = {status: sum(row["status"] == status for row in rows) for status in ("done", "failed", "running")}
    running = f", {counts['running']} running" if counts["running"] else ""
    lines = [
        f"Sweep `{sweep_dir}`: {len(rows)} job{'' if len(rows) == 1 else 's'}, {counts['done']} done, "
        f"{counts['failed']} failed{running}.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(markdown_cell(name, row.get(name)) for name in columns) + " |" for row in rows]
    if (best := best_job(rows)) is not None:
        names = sorted({row["objective_name"] for row in rows if row.get("objective_name")})
        lines += [
            "",
            f"Best: job {best['job']}, objective ({', '.join(names)}, minimized) {best['objective']:.6g}:",
            "",
            "```bash",
            best_command(best),
            "```",
        ]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Writes summary.csv (full precision, empty cells for missing values) and summary.md into the sweep
    directory; returns their paths."""
    sweep_dir = Path(sweep_dir)
    columns = columns_of(rows)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    table = io.StringIO(newline="")
    writer = csv.DictWriter(table, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    for row in rows:
        writer.writerow({name: "" if row.get(name) is None else row[name] for name in columns})
    write_text_atomically(csv_path, table.getvalue())  # jobs rewrite these as they end: never half a file
    write_text_atomically(md_path, markdown_table(sweep_dir, rows, columns))
    if (best := best_job(rows)) is not None:
        write_text_atomically(sweep_dir / BEST_COMMAND_FILE, best_command(best) + "\n")
    return csv_path, md_path


def write_text_atomically(path: Path, text: str) -> Path:
    return write_atomically(path, lambda file: file.write(text.encode()))


def update_summary(sweep_dir: str | Path, final: bool = True) -> tuple[Path, Path, Path | None]:
    """summary.csv, summary.md and summary.png from the job directories as they are now, one writer at a time."""
    sweep_dir = Path(sweep_dir)
    with open(sweep_dir / LOCK_FILE, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        rows = summarize(sweep_dir, final)
        objective = "objective" if any(row.get("objective") is not None for row in rows) else "test_loss"
        return (*write_summary(sweep_dir, rows), plot_sweep(sweep_dir, rows, objective))


def after_sweep_job(config: DictConfig, job_dir: str | Path, sweep_dir: str | Path) -> None:
    """Called by main.py as each job of a training sweep ends, done or failed: the summary is then current
    however the sweep itself ends (Hydra stops a sweep at a failed job, before its end-of-sweep callback)."""
    if OmegaConf.select(config, "task._target_") != TRAIN_TASK:
        return
    try:
        update_summary(sweep_dir, final=False)
    except Exception as error:  # the job's own result is on disk: a summary is not worth failing it for
        log.warning("could not update the sweep summary: %s: %s", type(error).__name__, error)


class SweepSummary(Callback):
    """Writes summary.csv, summary.md and summary.png into the sweep directory when a multirun ends.

    Hydra instantiates callbacks for single runs too; only `on_multirun_end` does anything, and only for a
    sweep of task=train. Hydra calls it only when no job failed: a job that fails stops the sweep before it,
    which is why every job also updates the summary as it ends (`after_sweep_job`); a job still without a
    result is then listed as running. `python -m ddpm.io.sweep_summary SWEEP_DIR` writes the final table by hand.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "task._target_") != TRAIN_TASK:
            return  # only training jobs write the summary.json read here: a sampling sweep would list all as failed
        detached = OmegaConf.select(config, "hydra.launcher._target_") == DETACHED_LAUNCHER
        try:  # a detached sweep's jobs are still running: listed as such, each updates the table as it ends
            csv_path, md_path, picture = update_summary(Path(str(config.hydra.sweep.dir)), final=not detached)
            log.info("sweep summary: %s, %s and %s", csv_path, md_path, picture)
        except Exception as error:  # the jobs' results are all on disk already: a summary is not worth failing for
            log.warning("could not write the sweep summary: %s: %s", type(error).__name__, error)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ddpm.io.sweep_summary SWEEP_DIR", file=sys.stderr)
        return 2
    csv_path, md_path, picture = update_summary(argv[0], final=True)
    print(f"wrote {csv_path}, {md_path} and {picture}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
