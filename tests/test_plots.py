"""The pictures of a run and of a sweep: metrics.png from a metrics.jsonl (cut lines and non-finite values
included), summary.png with a failed job, and the labels that name what each job changed."""

import json

import pytest
from PIL import Image

from ddpm.io.plots import differing_overrides, plot_sweep, plot_training_metrics, read_metrics, series


def write_metrics(path, rows, tail=""):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows) + tail)


def training_rows(scale=1.0, fid=True):
    rows = [
        {"step": step, "train_loss": scale / step, "test_loss": 1.2 * scale / step, "lr": 1e-3 * (1 - step / 500)}
        for step in range(10, 410, 10)
    ]
    if fid:
        rows += [{"step": 200, "fid": 80.0, "best_fid": 80.0}, {"step": 400, "fid": 40.0, "best_fid": 40.0}]
    return rows


def test_read_metrics_skips_a_cut_line_and_non_finite_values(tmp_path):
    path = tmp_path / "metrics.jsonl"
    write_metrics(
        path,
        [{"step": 1, "train_loss": 0.5}, {"step": 2, "train_loss": "nan", "lr": 0.1}],
        tail='{"step": 3, "train_lo',
    )
    rows = read_metrics(path)
    assert rows == [{"step": 1, "train_loss": 0.5}, {"step": 2, "lr": 0.1}]
    assert series(rows, "train_loss") == ([1], [0.5])
    assert read_metrics(tmp_path / "missing.jsonl") == []


@pytest.mark.parametrize("fid", [True, False])
def test_metrics_png_has_a_panel_per_quantity(tmp_path, fid):
    path = tmp_path / "metrics.jsonl"
    write_metrics(path, training_rows(fid=fid))
    picture = plot_training_metrics(path)
    assert picture == tmp_path / "metrics.png" and not list(tmp_path.glob("*.partial.png"))
    width, height = Image.open(picture).size
    assert height > 300 and width > (3 if fid else 2) * 400  # one panel per quantity, FID only when measured


def test_metrics_png_is_not_drawn_before_anything_is_logged(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("")
    assert plot_training_metrics(tmp_path / "metrics.jsonl") is None and not (tmp_path / "metrics.png").exists()


def test_labels_name_only_the_overrides_that_differ():
    assert differing_overrides(["experiment=q lr=1", "experiment=q lr=2"]) == ["lr=1", "lr=2"]
    assert differing_overrides(["a=1", "a=1"]) == ["(no override)", "(no override)"]
    assert differing_overrides([]) == []


def test_summary_png_overlays_the_jobs_and_marks_a_failed_one(tmp_path):
    for job, scale in ((0, 1.0), (1, 2.0)):
        write_metrics(tmp_path / str(job) / "metrics.jsonl", training_rows(scale))
    rows = [
        {"job": 0, "status": "done", "overrides": "experiment=q lr=1", "test_loss": 0.003},
        {"job": 1, "status": "done", "overrides": "experiment=q lr=2", "test_loss": 0.006},
        {"job": 2, "status": "failed", "overrides": "experiment=q lr=9"},
    ]
    picture = plot_sweep(tmp_path, rows)
    assert picture == tmp_path / "summary.png" and Image.open(picture).size[0] > 800
    assert plot_sweep(tmp_path / "empty", []) is None


def test_labels_are_short():
    from ddpm.io.plots import short_override

    assert short_override("optimizer.lr=0.004579702920954077") == "lr=0.00458"
    assert short_override("model.base_channels=32") == "base_channels=32"
    assert short_override("schedule=cosine") == "schedule=cosine"
    assert differing_overrides(["experiment=q optimizer.lr=0.0123456", "experiment=q optimizer.lr=2e-3"]) == [
        "lr=0.0123",
        "lr=0.002",
    ]
