"""task=evaluate end to end, with the small stand-in feature extractor (fast; the real network's runs are in
test_standard_fid.py): metrics and their protocol, several seeds, an npz, sharded generation and merge, the NFE
sweep, FID during training."""

import csv
import json
import math

import numpy as np
import pytest
import torch
from conftest import TINY_QUICKSTART, compose_config
from main_in_process import main_py, run_in_process, run_main_in_process
from PIL import Image

import ddpm.diffusion.samplers
from ddpm.config.errors import ConfigError
from ddpm.io.checkpoint import load_checkpoint
from ddpm.tasks.evaluate import check_settings, merge_shards

STAND_IN = ["dataset=digits", "fid=tiny", "eval.device=cpu"]
SMALL = ["eval.num_samples=20", "eval.batch_size=10", "eval.pr_num_samples=200"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A 2-step class-conditional checkpoint with a 20-step schedule, and a shared reference-statistics dir."""
    root = tmp_path_factory.mktemp("evaluate")
    run_in_process(
        *TINY_QUICKSTART,
        "schedule=cosine",
        "schedule.num_timesteps=20",
        "trainer.iterations=2",
        "trainer.batch_size=8",
        "trainer.sample_at_end=false",
        f"hydra.run.dir={root / 'train'}",
    )
    checkpoint = root / "train" / "checkpoints" / "last.pt"
    common = [*STAND_IN, f"checkpoint={checkpoint}", f"fid.reference_dir={root / 'stats'}"]
    run_in_process("task=evaluate", *common, *SMALL, f"hydra.run.dir={root / 'single'}")
    return {"root": root, "common": common, "single": root / "single", "checkpoint": checkpoint}


@pytest.mark.slow
def test_evaluate_writes_metrics_samples_and_cached_reference_statistics(setup):
    metrics = json.loads((setup["single"] / "metrics.json").read_text())
    assert metrics["num_samples"] == 20
    assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0 and np.isfinite(metrics["kid"])
    assert 1 <= metrics["inception_score"] <= 10 and 0 <= metrics["precision"] <= 1 and 0 <= metrics["recall"] <= 1
    extractor, reference, generated = (metrics["protocol"][key] for key in ("extractor", "reference", "generated"))
    assert extractor["name"] == "tiny-d32-c10-s0" and len(extractor["weights_sha256"]) == 64
    assert reference["split"] == "train" and reference["num_images"] == 1617  # the digits' training split
    # The cache file names the data, split, count and the extractor with its weights' hash.
    assert reference["statistics_file"].endswith(
        f"stats/digits-16px-train-all-tiny-d32-c10-s0-{extractor['weights_sha256'][:12]}.npz"
    )
    assert generated["num_images"] == 20 and generated["seeds"] == [0] and generated["weights"] == "ema"
    assert generated["sampler"]["name"] == "ddpm_ancestral" and generated["sampler"]["steps"] == 20
    assert generated["precision"] == "fp32" and generated["quantization"].startswith("uint8")
    assert generated["checkpoint"] == str(setup["checkpoint"]) and generated["step"] == 2
    samples = np.load(setup["single"] / "samples.npz")
    assert samples["arr_0"].shape == (20, 16, 16, 1) and samples["arr_0"].dtype == np.uint8
    assert np.bincount(samples["arr_1"]).tolist() == [2] * 10  # balanced classes
    assert json.loads(samples["meta"].item())["seed"] == 0  # the file carries how it was drawn


@pytest.mark.slow
def test_three_seeds_give_fid_per_seed_with_min_mean_and_std_and_a_partial_last_batch_counts(setup, tmp_path):
    """eval.seeds=[0,1,2]: each seed's images, all eval.num_samples of them (15 in batches of 10: the last,
    partial batch is drawn and counted); FID is the minimum over seeds (EDM's convention), with mean and std."""
    run_in_process(
        "task=evaluate",
        *setup["common"],
        "eval.num_samples=15",
        "eval.batch_size=10",
        "eval.pr_num_samples=200",
        "eval.seeds=[0,1,2]",
        f"hydra.run.dir={tmp_path}",
    )
    metrics = json.loads((tmp_path / "metrics.json").read_text())
    per_seed = [metrics["fid_per_seed"][seed] for seed in ("0", "1", "2")]
    assert metrics["fid"] == min(per_seed) and metrics["fid_mean"] == pytest.approx(np.mean(per_seed))
    assert metrics["fid_std"] == pytest.approx(np.std(per_seed, ddof=1)) and metrics["fid_std"] > 0
    assert metrics["protocol"]["generated"]["seeds"] == [0, 1, 2]
    assert metrics["protocol"]["generated"]["num_images"] == metrics["num_samples"] == 15
    drawn = [np.load(tmp_path / f"samples_seed{seed}.npz")["arr_0"] for seed in (0, 1, 2)]
    assert [len(images) for images in drawn] == [15, 15, 15] and not np.array_equal(drawn[0], drawn[1])
    # Seed 0's images are the single run's: the same generator, whatever else is drawn.
    np.testing.assert_array_equal(drawn[0], np.load(setup["single"] / "samples.npz")["arr_0"][:15])


@pytest.mark.slow
def test_existing_samples_give_the_same_metrics(setup, tmp_path):
    run_in_process(
        "task=evaluate",
        *STAND_IN,
        f"eval.samples={setup['single'] / 'samples.npz'}",
        f"fid.reference_dir={setup['root'] / 'stats'}",
        "eval.pr_num_samples=200",
        f"hydra.run.dir={tmp_path}",
    )
    again, single = (json.loads((d / "metrics.json").read_text()) for d in (tmp_path, setup["single"]))
    assert again["fid"] == pytest.approx(single["fid"]) and again["precision"] == single["precision"]


@pytest.mark.slow
def test_samples_are_compared_with_the_data_their_checkpoint_learned(setup, tmp_path, capfd):
    """task=sample's and task=evaluate's npz record the checkpoint's dataset: without dataset=... the digits
    are found; another dataset named on the command line is refused in one line, before any feature is computed."""
    samples = setup["single"] / "samples.npz"
    run_in_process(
        "task=evaluate",
        "fid=tiny",
        "eval.device=cpu",
        f"eval.samples={samples}",
        "eval.pr_num_samples=200",
        f"fid.reference_dir={setup['root'] / 'stats'}",
        f"hydra.run.dir={tmp_path / 'found'}",
    )
    found = json.loads((tmp_path / "found" / "metrics.json").read_text())
    assert found["protocol"]["reference"]["dataset"] == "digits-16px" and found["protocol"]["generated"]["step"] == 2
    code, output = run_main_in_process(
        [
            "task=evaluate",
            "fid=tiny",
            "dataset=cifar10",
            f"eval.samples={samples}",
            f"hydra.run.dir={tmp_path / 'refused'}",
        ],
        capfd,
    )
    assert code == 1 and f"eval.samples={samples} (from {setup['checkpoint']}) was trained with" in output, output
    assert "Traceback" not in output


@pytest.mark.slow
def test_two_shards_in_a_multirun_merge_into_the_single_run(setup, tmp_path):
    sweep = tmp_path / "sweep"
    run_in_process(
        "-m",
        "task=evaluate",
        *setup["common"],
        *SMALL,
        "eval.num_shards=2",
        "eval.shard=0,1",
        f"hydra.sweep.dir={sweep}",
    )
    assert sorted(p.name for p in sweep.glob("shard_*.npz")) == ["shard_0_of_2.npz", "shard_1_of_2.npz"]
    assert [len(np.load(sweep / f"shard_{i}_of_2.npz")["arr_0"]) for i in range(2)] == [10, 10]

    run_in_process(
        "task=evaluate",
        *STAND_IN,
        f"eval.merge={sweep}",
        f"fid.reference_dir={setup['root'] / 'stats'}",
        "eval.pr_num_samples=200",
        f"hydra.run.dir={tmp_path / 'merged'}",
    )
    merged = json.loads((tmp_path / "merged" / "metrics.json").read_text())
    single = json.loads((setup["single"] / "metrics.json").read_text())
    assert merged["num_samples"] == 20
    # Batch b is drawn from seed (eval.seed, b) wherever it runs: the shards hold exactly the single run's images.
    np.testing.assert_array_equal(
        np.load(tmp_path / "merged" / "samples.npz")["arr_0"], np.load(setup["single"] / "samples.npz")["arr_0"]
    )
    assert merged["fid"] == pytest.approx(single["fid"]) and merged["inception_score"] == pytest.approx(
        single["inception_score"]
    )

    (sweep / "shard_1_of_2.npz").unlink()
    with pytest.raises(ConfigError, match=r"lacks 1 of 2 shards: shard_1_of_2.npz"):
        merge_shards(sweep)


@pytest.mark.slow
def test_nfe_sweep_writes_a_table_and_a_plot(setup, tmp_path):
    # The step samplers join the sweep once ddpm.diffusion.samplers has them; ddpm alone runs at T = 20.
    samplers = [name for name in ("ddim", "dpm_solver") if hasattr(ddpm.diffusion.samplers, name)] + ["ddpm"]
    run_in_process(
        "task=evaluate",
        *setup["common"],
        "eval.num_samples=10",
        "eval.batch_size=10",
        "eval.is_splits=2",
        "eval.pr_num_samples=200",
        "eval.nfe_sweep=[5]",
        f"eval.nfe_samplers=[{','.join(samplers)}]",
        f"hydra.run.dir={tmp_path}",
    )
    with open(tmp_path / "nfe_sweep.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert [(row["sampler"], row["steps"]) for row in rows if row["sampler"] == "ddpm"] == [("ddpm", "20")]
    assert [row["nfe"] for row in rows if row["sampler"] == "ddpm"] == ["20"]  # counted network calls
    assert len(rows) == len(samplers)
    assert all(np.isfinite(float(row["fid"])) for row in rows)
    assert all(float(row["seconds_per_image"]) > 0 and np.isfinite(float(row["kid"])) for row in rows)
    assert (tmp_path / "nfe_sweep.md").read_text().startswith("| sampler | steps | nfe | seconds_per_image | fid |")
    protocol = json.loads((tmp_path / "metrics.json").read_text())["protocol"]
    assert protocol["generated"]["num_images"] == 10 and protocol["extractor"]["name"] == "tiny-d32-c10-s0"
    assert Image.open(tmp_path / "nfe_sweep.png").size[0] > 300


@pytest.mark.slow
def test_evaluate_without_a_source_of_samples_is_one_line_naming_the_keys(tmp_path, capfd):
    code, output = run_main_in_process(["task=evaluate", *STAND_IN, f"hydra.run.dir={tmp_path}"], capfd)
    assert code == 1 and "task=evaluate needs checkpoint=PATH" in output and "Traceback" not in output, output


@pytest.mark.parametrize(
    "overrides, expected",
    [
        (["checkpoint=x.pt", "eval.num_samples=0"], "eval.num_samples=0 must be >= 2"),
        (["checkpoint=x.pt", "eval.num_shards=2", "eval.shard=3"], "eval.shard=3 must be in 0..1 (eval.num_shards=2)"),
        (
            ["checkpoint=x.pt", "eval.num_samples=20", "eval.batch_size=10", "eval.num_shards=3"],
            "eval.num_shards=3 is more than the 2 batches",
        ),
        (["checkpoint=x.pt", "eval.nfe_sweep=[10]", "eval.nfe_samplers=[euler]"], "eval.nfe_samplers=['euler']"),
        (["checkpoint=x.pt", "eval.nfe_sweep=[0]"], "eval.nfe_sweep=[0] must be null or a list"),
        (["eval.samples=a.npz", "eval.merge=dir"], "give one source of samples"),
    ],
)
def test_bad_evaluate_settings_name_the_key(overrides, expected):
    with pytest.raises(ConfigError) as caught:
        check_settings(compose_config("task=evaluate", *STAND_IN, *overrides))
    assert expected in str(caught.value)


@pytest.mark.slow
def test_training_measures_fid_and_keeps_the_best_checkpoint(tmp_path):
    """trainer.eval_rate through main.py, with the stand-in extractor: fid in the log, best.pt on disk."""
    run_in_process(
        *TINY_QUICKSTART,
        "schedule=cosine",
        "schedule.num_timesteps=20",
        "trainer.iterations=4",
        "trainer.batch_size=8",
        "trainer.log_rate=2",
        "trainer.checkpoint_rate=0",
        "trainer.sample_at_end=false",
        "trainer.eval_rate=2",
        "trainer.eval_samples=20",
        "trainer.eval_steps=5",
        "trainer.eval_batch_size=20",
        "fid=tiny",
        f"fid.reference_dir={tmp_path / 'stats'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    fids = [row["fid"] for row in rows if "fid" in row]
    assert len(fids) == 2 and all(math.isfinite(value) for value in fids)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["best_fid"] == min(fids)
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "best.pt")["loop"]["best_fid"] == min(fids)
    # The cheap FID's protocol, next to its values: same extractor as task=evaluate, its images, sampler, steps.
    protocol = json.loads((tmp_path / "run" / "fid_protocol.json").read_text())
    assert protocol["extractor"]["name"] == "tiny-d32-c10-s0" and protocol["generated"]["num_images"] == 20
    assert protocol["generated"]["sampler"]["name"] == "ddim" and protocol["generated"]["sampler"]["steps"] == 5


@pytest.mark.slow
def test_sample_and_evaluate_draw_the_same_images_for_the_same_seed(setup, tmp_path):
    """One image generator: task=sample gives the images task=evaluate drew (same seed, classes i mod C, and
    evaluate's fp32: sample.precision=auto is bf16 on a CPU with bf16 units), and the first 7 of them when asked
    for 7, at another batch size."""
    checkpoint = setup["checkpoint"]
    run_in_process(
        "task=sample",
        f"checkpoint={checkpoint}",
        "sample.num_images=20",
        "sample.batch_size=10",
        "sample.device=cpu",
        "sample.precision=fp32",
        f"sample.out_dir={tmp_path / 'all'}",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    evaluated = np.load(setup["single"] / "samples.npz")
    sampled = np.load(tmp_path / "all" / "samples.npz")
    np.testing.assert_array_equal(sampled["arr_0"], evaluated["arr_0"])
    np.testing.assert_array_equal(sampled["arr_1"], evaluated["arr_1"])

    run_in_process(
        "task=sample",
        f"checkpoint={checkpoint}",
        "sample.num_images=7",
        "sample.batch_size=3",
        "sample.device=cpu",
        "sample.precision=fp32",
        f"sample.out_dir={tmp_path / 'first'}",
        f"hydra.run.dir={tmp_path / 'run2'}",
    )
    first = np.load(tmp_path / "first" / "samples.npz")["arr_0"].astype(int)
    assert np.abs(first - evaluated["arr_0"][:7].astype(int)).max() <= 1  # up to the last bit of another batch size


@pytest.mark.slow
def test_a_sample_task_that_dies_while_writing_leaves_no_partial_npz(setup, tmp_path, monkeypatch):
    def dies_half_way(file, **arrays):
        file.write(b"PK\x03\x04 half an archive")
        raise OSError("No space left on device")

    monkeypatch.setattr(np, "savez", dies_half_way)
    checkpoint = setup["checkpoint"]
    out_dir = tmp_path / "out"
    arguments = [
        "task=sample",
        f"checkpoint={checkpoint}",
        "sample.num_images=2",
        "sample.batch_size=2",
        "sample.device=cpu",
        "logger=none",
        f"sample.out_dir={out_dir}",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]
    with main_py(arguments) as run:
        with pytest.raises(SystemExit):
            run()
    # Neither a partial npz nor the PNGs of a command that did not finish: the folder is as it was (empty),
    # but for the hidden lock file of the command.
    assert [p.name for p in out_dir.iterdir() if not p.name.startswith(".")] == []


class RecordingExtractor:
    """A feature extractor that remembers the device it was built for."""

    built_on: list[str] = []

    def __init__(self, device="cpu", weights_path=None):
        RecordingExtractor.built_on.append(str(device))
        self.name, self.weights_sha256, self.preprocessing = "recording", "0" * 64, "none"

    def __call__(self, images):
        generator = np.random.default_rng(len(images))
        return generator.normal(size=(len(images), 4)), generator.normal(size=(len(images), 3))


def test_fid_during_training_builds_its_extractor_on_the_training_device(tmp_path):
    from ddpm.config.validation import build_settings
    from ddpm.evaluation.during_training import FidDuringTraining

    cfg = compose_config(
        "dataset=digits",
        "fid=tiny",
        f"fid.extractor._target_={__name__}.RecordingExtractor",
        f"fid.reference_dir={tmp_path}",
    )
    RecordingExtractor.built_on.clear()
    training_device = torch.device("cuda", 1)  # a device object needs no GPU; the extractor only records it
    evaluator = FidDuringTraining(
        build_settings(cfg.fid),
        cfg.dataset,
        cfg.paths.data_dir,
        device=training_device,
        num_samples=10,
        steps=2,
        batch_size=5,
    )
    assert RecordingExtractor.built_on == ["cuda:1"]
    assert evaluator.device == training_device and evaluator.reference["num_images"] == 1617
