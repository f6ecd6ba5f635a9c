"""The one validation helper of the settings dataclasses (trainer, sample, eval, benchmark, fid): the same checks
and the same messages everywhere, with the key the user typed."""

import subprocess
import sys

import pytest
from conftest import PROJECT_ROOT, compose_config, user_environment

from ddpm.config.errors import ConfigError
from ddpm.config.validation import build_settings


@pytest.mark.parametrize(
    "task, overrides, message",
    [
        ("train", ["trainer.iterations=0"], "trainer.iterations=0 must be >= 1"),
        ("sample", ["sample.num_images=0"], "sample.num_images=0 must be >= 1"),
        ("evaluate", ["eval.num_samples=0"], "eval.num_samples=0 must be >= 2"),
        ("benchmark", ["benchmark.batch_size=0"], "benchmark.batch_size=0 must be >= 1"),
        ("train", ["trainer.batch_size=abc"], "trainer.batch_size='abc' must be of type int"),
        ("sample", ["sample.batch_size=abc"], "sample.batch_size='abc' must be of type int"),
        ("evaluate", ["eval.pr_k=1.5"], "eval.pr_k=1.5 must be of type int"),
        ("benchmark", ["benchmark.max_seconds=0"], "benchmark.max_seconds=0 must be >= 0.001"),
        ("train", ["trainer.ema_decay=nan"], "trainer.ema_decay=nan is not a number"),
        (
            "train",
            ["trainer.early_stop_metric=fidd"],
            "trainer.early_stop_metric='fidd' is not one of ['train_loss', 'fid']",
        ),
        ("sample", ["sample.use_ema=maybe"], "sample.use_ema='maybe' must be of type bool"),
        ("evaluate", ["fid.batch_size=0"], "fid.batch_size=0 must be >= 1"),
    ],
)
def test_every_settings_node_is_checked_alike(task, overrides, message):
    node = {"train": "trainer", "sample": "sample", "evaluate": "eval", "benchmark": "benchmark"}[task]
    node = "fid" if overrides[0].startswith("fid.") else node
    cfg = compose_config(f"task={task}", *overrides)
    with pytest.raises(ConfigError) as caught:
        build_settings(cfg[node])
    assert message in str(caught.value)


def test_an_unknown_key_added_with_plus_is_refused_with_the_closest_known_one():
    cfg = compose_config("task=sample", "+sample.num_image=3")
    with pytest.raises(
        ConfigError,
        match=r"sample.num_image is not a setting of sample \(nothing would read it\); did you mean sample.num_images\?",
    ):
        build_settings(cfg.sample)


def test_a_renamed_key_fails_in_one_line_naming_the_new_one():
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), "task=evaluate", "eval.reference_dir=stats"],
        capture_output=True,
        text=True,
        env=user_environment(),
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "main.py: eval.reference_dir is now fid.reference_dir: eval.reference_dir=stats -> fid.reference_dir=stats"
    )
