"""Sweep summary: after `python main.py -m ...`, one table of every job's result in the sweep directory.

`SweepSummary` is a Hydra callback (registered under `hydra.callbacks` in conf/config.yaml) whose
`on_multirun_end` writes `summary.csv`, `summary.md` and `summary.png` next to the job directories: one row per job with its
overrides, final train/test loss, steps, wall time, SLURM job id, sample grid (and FID once jobs report one).
The work is done by the plain functions `summarize` and `write_summary`, which also summarize a sweep by hand:

    python -m ddpm.sweep_summary outputs/multiruns/2026-11-27/14-03-12
"""

import csv
import json
import logging
import sys
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from ddpm.plots import plot_sweep

log = logging.getLogger(__name__)

COLUMNS = ["job", "status", "overrides", "steps", "train_loss", "test_loss", "wall_time_s", "slurm_job_id",
           "sample_grid"]  # fmt: skip
OPTIONAL_COLUMNS = ["fid", "nll_bits_per_dim"]  # listed only when some job reports it
TRAIN_TASK = "ddpm.tasks.train.run"  # conf/task/train.yaml


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


def job_row(job_dir: Path, sweep_dir: Path) -> dict[str, Any]:
    """One row of the summary: the job's overrides and, when it finished, its results."""
    row: dict[str, Any] = {"job": int(job_dir.name), "overrides": read_overrides(job_dir)}
    summary = read_job_summary(job_dir)
    if summary is None:
        return {**row, "status": "failed"}
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
    }


def summarize(sweep_dir: str | Path) -> list[dict[str, Any]]:
    """One row per job of the sweep, ordered by job number; a job without results has status `failed`."""
    sweep_dir = Path(sweep_dir)
    return [job_row(job_dir, sweep_dir) for job_dir in job_dirs(sweep_dir)]


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
    done = sum(row["status"] == "done" for row in rows)
    lines = [
        f"Sweep `{sweep_dir}`: {len(rows)} job{'' if len(rows) == 1 else 's'}, {done} done, {len(rows) - done} failed.",
        "",
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(markdown_cell(name, row.get(name)) for name in columns) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def write_summary(sweep_dir: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path]:
    """Writes summary.csv (full precision, empty cells for missing values) and summary.md into the sweep
    directory; returns their paths."""
    sweep_dir = Path(sweep_dir)
    columns = columns_of(rows)
    csv_path, md_path = sweep_dir / "summary.csv", sweep_dir / "summary.md"
    with csv_path.open("w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=columns, extrasaction="ignore")
        writer.writeheader()
        for row in rows:
            writer.writerow({name: "" if row.get(name) is None else row[name] for name in columns})
    md_path.write_text(markdown_table(sweep_dir, rows, columns))
    return csv_path, md_path


class SweepSummary(Callback):
    """Writes summary.csv and summary.md into the sweep directory when a multirun ends.

    Hydra instantiates callbacks for single runs too; only `on_multirun_end` does anything, and only for a
    sweep of task=train. Hydra calls it only when no job raised: a job that fails stops the sweep before it,
    so `python -m ddpm.sweep_summary SWEEP_DIR` summarizes such a sweep by hand, listing that job as failed.
    """

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        if OmegaConf.select(config, "task._target_") != TRAIN_TASK:
            return  # only training jobs write the summary.json read here: a sampling sweep would list all as failed
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
            rows = summarize(sweep_dir)
            csv_path, md_path = write_summary(sweep_dir, rows)
            log.info("sweep summary: %s and %s", csv_path, md_path)
            log.info("sweep picture: %s", plot_sweep(sweep_dir, rows))
        except Exception as error:  # the jobs' results are all on disk already: a summary is not worth failing for
            log.warning("could not write the sweep summary: %s: %s", type(error).__name__, error)


def main(argv: list[str]) -> int:
    if len(argv) != 1:
        print("usage: python -m ddpm.sweep_summary SWEEP_DIR", file=sys.stderr)
        return 2
    rows = summarize(argv[0])
    csv_path, md_path = write_summary(argv[0], rows)
    print(f"wrote {csv_path}, {md_path} and {plot_sweep(argv[0], rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
