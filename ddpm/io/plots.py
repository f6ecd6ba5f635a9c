"""Pictures of a run and of a sweep: `metrics.png` (a training run's curves, from its metrics.jsonl) and
`summary.png` (a sweep's jobs overlaid). Both are drawn from the files on disk, so they can be redrawn by hand
and never hold anything the files do not."""

import json
import math
from pathlib import Path
from typing import Any

METRICS_PICTURE = "metrics.png"
SWEEP_PICTURE = "summary.png"


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.jsonl, skipping a line cut short by a kill; non-finite values logged as strings
    ("nan", "inf") are left out of the curves."""
    rows = []
    try:
        lines = Path(path).read_text().splitlines()
    except OSError:
        return rows
    for line in lines:
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append({key: value for key, value in row.items() if isinstance(value, (int, float))})
    return rows


def series(rows: list[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of one metric, in step order, where it was logged and finite."""
    points = sorted((row["step"], row[key]) for row in rows if key in row and math.isfinite(row[key]))
    return [step for step, _ in points], [value for _, value in points]


def _figure(columns: int):
    import matplotlib  # here: the training loop imports this module, and matplotlib takes a second to load

    matplotlib.use("Agg")  # files only; no display on a compute node
    from matplotlib import pyplot

    figure, axes = pyplot.subplots(1, columns, figsize=(4.5 * columns, 3.6), squeeze=False)
    return pyplot, figure, axes[0]


def _save(pyplot, figure, path: Path) -> Path:
    """Written atomically (ddpm.io.checkpoint.write_atomically), so that a reader (or a kill) never sees half a PNG."""
    from ddpm.io.checkpoint import write_atomically

    figure.tight_layout()
    try:
        return write_atomically(path, lambda file: figure.savefig(file, format="png", dpi=110))
    finally:
        pyplot.close(figure)


def _positive(values: list[float]) -> bool:
    return bool(values) and min(values) > 0


def plot_training_metrics(metrics_path: str | Path, out_path: str | Path | None = None) -> Path | None:
    """metrics.png beside metrics.jsonl: train and test loss (log scale), the learning rate, and FID when it was
    measured, against the step. None when nothing has been logged yet."""
    metrics_path = Path(metrics_path)
    rows = read_metrics(metrics_path)
    losses = {key: series(rows, key) for key in ("train_loss", "test_loss")}
    lr, fid = series(rows, "lr"), series(rows, "fid")
    if not any(steps for steps, _ in losses.values()):
        return None
    panels = 2 + bool(fid[0])
    pyplot, figure, axes = _figure(panels)
    for key, (steps, values) in losses.items():
        if steps:
            axes[0].plot(steps, values, label=key.replace("_", " "), marker="." if len(steps) < 30 else None)
    if all(_positive(values) for steps, values in losses.values() if steps):
        axes[0].set_yscale("log")
    axes[0].set(xlabel="step", ylabel="loss", title="loss")
    axes[0].legend()
    axes[1].plot(*lr, color="tab:green")
    axes[1].set(xlabel="step", ylabel="learning rate", title="learning rate")
    if panels == 3:
        axes[2].plot(*fid, color="tab:red", marker="o")
        if _positive(fid[1]):
            axes[2].set_yscale("log")
        axes[2].set(xlabel="step", ylabel="FID", title="FID (during training)")
    for axis in axes:
        axis.grid(alpha=0.3)
    out_path = Path(out_path) if out_path is not None else metrics_path.with_name(METRICS_PICTURE)
    return _save(pyplot, figure, out_path)


def short_override(override: str) -> str:
    """key=value with the key's last part and a number to 3 significant digits: optimizer.lr=0.004579702920954077
    reads lr=0.00458."""
    key, separator, value = override.partition("=")
    try:
        number = float(value)
        value = value if value.lstrip("-").isdigit() else f"{number:.3g}"
    except ValueError:
        pass
    return key.rsplit(".", 1)[-1] + separator + value


def differing_overrides(overrides: list[str]) -> list[str]:
    """Each job's overrides less those every job shares, shortened (`short_override`), so that a label names
    what the job changed."""
    split = [override.split() for override in overrides]
    shared = set.intersection(*(set(parts) for parts in split)) if split else set()
    return [
        " ".join(short_override(part) for part in parts if part not in shared) or "(no override)" for parts in split
    ]


def plot_sweep(sweep_dir: str | Path, rows: list[dict[str, Any]], objective: str = "test_loss") -> Path | None:
    """summary.png in the sweep directory: every job's test loss against the step, overlaid, and each job's
    final `objective` (failed and running jobs marked), labelled by the overrides in which the jobs differ. None for a
    sweep without jobs."""
    if not rows:
        return None
    sweep_dir = Path(sweep_dir)
    labels = differing_overrides([str(row.get("overrides") or "") for row in rows])
    pyplot, figure, (curves, finals) = _figure(2)
    figure.set_figwidth(9 + 0.07 * max(len(label) for label in labels))  # room for the bars' labels
    palette = pyplot.rcParams["axes.prop_cycle"].by_key()["color"]
    color = {row["job"]: palette[i % len(palette)] for i, row in enumerate(rows)}  # a job's curve and bar alike
    all_positive = True
    for row in rows:
        steps, values = series(read_metrics(sweep_dir / str(row["job"]) / "metrics.jsonl"), "test_loss")
        if steps:
            curves.plot(steps, values, label=f"job {row['job']}", color=color[row["job"]])
            all_positive = all_positive and _positive(values)
    if curves.lines:
        if all_positive:
            curves.set_yscale("log")
        curves.legend(fontsize="small", ncol=1 + len(curves.lines) // 8)
    curves.set(xlabel="step", ylabel="test loss", title="test loss per job")
    curves.grid(alpha=0.3)
    heights, colors = [], []
    for row in rows:
        value = row.get(objective)
        done = row.get("status") == "done" and isinstance(value, (int, float)) and math.isfinite(value)
        heights.append(value if done else 0.0)
        colors.append(color[row["job"]])  # a failed or a running job has no bar, only its label
    positions = range(len(rows))
    finals.barh(list(positions), heights, color=colors)
    finals.set_yticks(
        list(positions),
        [
            f"{row['job']}: {label}" + ("" if row.get("status") == "done" else f" ({row.get('status')})")
            for row, label in zip(rows, labels, strict=True)
        ],
        fontsize="small",
    )
    finals.invert_yaxis()  # job 0 on top, as in the table
    finals.set(xlabel=objective.replace("_", " "), title=f"final {objective.replace('_', ' ')} per job")
    finals.grid(alpha=0.3, axis="x")
    return _save(pyplot, figure, sweep_dir / SWEEP_PICTURE)
