"""Every bad value a user can type is refused with one message that names the key and the value.

For each case in CASES, `python main.py OVERRIDES...` (run in-process, as Hydra runs it from the command line)
must exit with status 1; its output must contain the given substrings (the key and the bad value) and no
traceback; and the checkpoints of two existing training runs must be byte for byte what they were (same files,
same SHA-256, same mtime). Training cases run inside the directory of an existing run, where trainer.resume=auto
finds its checkpoints; a case that slipped through validation would train there and write over them.

Two cases are also run as a real `python main.py` subprocess (marked slow), as a user would see them.
"""

import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import PROJECT_ROOT, user_environment
from main_in_process import PLOT, RUN, SAMPLE, checkpoint_files, command, run_main_in_process
from PIL import Image

from ddpm.io.checkpoint import save_checkpoint


def case(base: list[str], overrides: list[str], *expected: str, id: str, resume: str | None = None):
    """One bad command: `base` with `overrides` added or replacing the same keys, and the substrings its
    output must show. resume="never" asks to start over in the run directory (so that the check of the value
    itself is reached rather than the refusal to resume a run of another model)."""
    if resume:
        overrides = [*overrides, f"trainer.resume={resume}"]
    return pytest.param(base, overrides, expected, id=id)


CASES = [
    # Unknown options of config groups, and unknown keys: Hydra refuses them while composing.
    case(RUN, ["schedule=foo"], "schedule/foo", id="unknown-schedule"),
    case(RUN, ["model=resnet"], "model/resnet", id="unknown-model"),
    case(RUN, ["dataset=imagenet"], "dataset/imagenet", id="unknown-dataset"),
    case(RUN, ["optimizer=sgd"], "optimizer/sgd", id="unknown-optimizer"),
    case(RUN, ["sampler=unipc"], "sampler/unipc", id="unknown-sampler"),
    case(RUN, ["task=benchmarks"], "task/benchmarks", id="unknown-task"),
    case(RUN, ["logger=tensorboard"], "logger/tensorboard", id="unknown-logger"),
    case(RUN, ["experiment=cifar100"], "experiment/cifar100", id="unknown-experiment"),
    case(RUN, ["trainer.iteratons=3"], "trainer.iteratons", "iteratons=3", id="unknown-key-typo"),
    # trainer: out of range and wrong types.
    case(RUN, ["trainer.iterations=0"], "trainer.iterations=0 must be >= 1", id="trainer-iterations-zero"),
    case(RUN, ["trainer.batch_size=5000"], "trainer.batch_size=5000", "training set", id="trainer-batch-size-too-big"),
    case(
        RUN, ["trainer.iterations=many"], "trainer.iterations='many' must be of type int", id="trainer-iterations-str"
    ),
    case(
        RUN, ["trainer.iterations=[1,2]"], "trainer.iterations=[1, 2] must be of type int", id="trainer-iterations-list"
    ),
    case(RUN, ["trainer.ema_decay=1.5"], "trainer.ema_decay=1.5 must be in [0, 1)", id="trainer-ema-decay"),
    case(RUN, ["trainer.loss_type=l3"], "trainer.loss_type='l3'", id="trainer-loss-type"),
    case(
        RUN, ["trainer.keep_checkpoints=-1"], "trainer.keep_checkpoints=-1 must be >= 0", id="trainer-keep-checkpoints"
    ),
    case(RUN, ["trainer.skip_nonfinite=-1"], "trainer.skip_nonfinite=-1 must be >= 0", id="trainer-skip-nonfinite"),
    case(RUN, ["trainer.device=tpu"], "trainer.device='tpu' is not a device", id="trainer-device-unknown"),
    # cuda:99 exists on no machine: without CUDA it is refused as unavailable, with CUDA as a missing index.
    case(RUN, ["trainer.device=cuda:99"], "trainer.device='cuda:99'", id="trainer-device-unavailable"),
    # trainer.resume: a missing file, a file that is not a checkpoint, a run of another model.
    case(
        RUN,
        ["trainer.resume={tmp}/missing.pt"],
        "trainer.resume={tmp}/missing.pt does not exist",
        id="resume-missing-path",
    ),
    case(
        RUN,
        ["trainer.resume={state_dict}"],
        "trainer.resume={state_dict} is not a ddpm checkpoint",
        id="resume-not-a-checkpoint",
    ),
    case(
        RUN,
        ["model.base_channels=16"],
        "model.base_channels=16",
        "model.base_channels=8",
        id="resume-with-changed-model",
    ),
    # model: out of range and wrong types (trainer.resume=never: the model's own checks, not the resume check).
    case(
        RUN,
        ["model.base_channels=7"],
        "model.base_channels=7 must be a positive even number",
        resume="never",
        id="model-base-channels-odd",
    ),
    case(RUN, ["model.dropout=1.5"], "model.dropout=1.5 must be in [0, 1)", resume="never", id="model-dropout"),
    case(RUN, ["model.norm=batch"], "model.norm='batch' is not one of", resume="never", id="model-norm"),
    case(
        RUN,
        ["model.channel_mults=[]"],
        "model.channel_mults=[] must be a non-empty list",
        resume="never",
        id="model-channel-mults-empty",
    ),
    case(RUN, ["model.base_channels=abc"], "model.base_channels='abc'", resume="never", id="model-base-channels-str"),
    # schedule: out of range and wrong types.
    case(
        RUN,
        ["schedule.num_timesteps=0"],
        "schedule.num_timesteps=0",
        ">= 1",
        resume="never",
        id="schedule-num-timesteps-zero",
    ),
    case(
        RUN,
        ["schedule=cosine", "schedule.max_beta=1.5"],
        "schedule.max_beta=1.5 must be in (0, 1)",
        resume="never",
        id="schedule-cosine-max-beta",
    ),
    case(
        RUN,
        ["schedule.num_timesteps=ten"],
        "schedule.num_timesteps='ten'",
        resume="never",
        id="schedule-num-timesteps-str",
    ),
    case(PLOT, ["schedule.low=-0.1"], "schedule.low=-0.1 must be >= 0", id="plot-schedules-low-negative"),
    # optimizer: out of range and wrong types.
    case(RUN, ["optimizer.lr=-1"], "optimizer.lr=-1 must be a finite number > 0", id="optimizer-lr-negative"),
    case(RUN, ["optimizer.lr=fast"], "optimizer.lr='fast' must be a finite number > 0", id="optimizer-lr-str"),
    case(RUN, ["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] must be two numbers", id="optimizer-betas-one"),
    case(
        RUN,
        ["optimizer=adamw", "optimizer.weight_decay=-0.1"],
        "optimizer.weight_decay=-0.1 must be a finite number",
        id="optimizer-adamw-weight-decay",
    ),
    # dataset: digits, folder and cifar10.
    case(RUN, ["dataset.image_size=4"], "dataset.image_size=4 must be >= 8", id="digits-image-size"),
    case(RUN, ["dataset.image_size=big"], "dataset.image_size='big'", id="digits-image-size-str"),
    case(RUN, ["dataset=folder"], "dataset.path must be given a value", id="folder-path-missing"),
    case(
        RUN,
        ["dataset=folder", "dataset.path={tmp}/nowhere"],
        "dataset.path={tmp}/nowhere is not a directory",
        id="folder-path-nonexistent",
    ),
    case(
        RUN,
        ["dataset=folder", "dataset.path={empty_dir}"],
        "dataset.path={empty_dir} holds no images",
        id="folder-empty",
    ),
    case(
        RUN,
        ["dataset=folder", "dataset.path={notes_dir}"],
        "dataset.path={notes_dir}",
        "notes.txt",
        id="folder-non-image-file",
    ),
    case(
        RUN,
        ["dataset=folder", "dataset.path={fake_png_dir}"],
        "dataset.path={fake_png_dir}",
        "fake.png",
        "is not a readable image",
        id="folder-corrupt-png",
    ),
    case(
        RUN,
        ["dataset=cifar10", "paths.data_dir={empty_dir}", "dataset.download=false"],
        "dataset.root={empty_dir}",
        "cifar-10-python.tar.gz",
        id="cifar10-missing-data",
    ),
    # logger: refused before wandb starts (the test checks that no wandb/ folder appears).
    case(RUN, ["logger=wandb", "logger.mode=onlin"], "logger.mode='onlin' is not one of", id="wandb-mode"),
    case(RUN, ["trainer.precision=fp8"], "trainer.precision='fp8' is not one of", id="trainer-precision"),
    case(
        RUN,
        ["trainer.device=cpu", "trainer.precision=fp16"],
        "trainer.precision=fp16 needs a CUDA device",
        id="trainer-precision-fp16-on-cpu",
    ),
    case(RUN, ["trainer.compile=maybe"], "trainer.compile='maybe' must be of type", id="trainer-compile"),
    case(RUN, ["optimizer.fused=yes"], "optimizer.fused='yes' must be true, false or null", id="optimizer-fused"),
    case(
        RUN,
        ["task=benchmark", "benchmark.batch_size=0"],
        "benchmark.batch_size=0 must be >= 1",
        id="benchmark-batch-size",
    ),
    # task=sample: checkpoint, labels, settings, and a command line that contradicts the checkpoint.
    case(SAMPLE, [], "task=sample needs checkpoint=PATH", id="sample-no-checkpoint"),
    case(
        SAMPLE,
        ["checkpoint={tmp}/missing.pt"],
        "checkpoint={tmp}/missing.pt does not exist",
        id="sample-checkpoint-missing",
    ),
    case(
        SAMPLE,
        ["checkpoint={text_file}"],
        "checkpoint={text_file} is not a checkpoint: it holds text",
        id="sample-checkpoint-text-file",
    ),
    case(
        SAMPLE,
        ["checkpoint={state_dict}"],
        "checkpoint={state_dict} is not a ddpm checkpoint",
        id="sample-checkpoint-plain-state-dict",
    ),
    case(SAMPLE, ["checkpoint={corrupted}"], "checkpoint={corrupted} is corrupted", id="sample-checkpoint-corrupted"),
    case(
        SAMPLE,
        ["checkpoint={other_model}"],
        "checkpoint={other_model}",
        "weights are not those of the model",
        id="sample-checkpoint-of-another-model",
    ),
    case(
        SAMPLE,
        ["checkpoint={cond}", "model.base_channels=32"],
        "model.base_channels=32",
        "model.base_channels=8",
        id="sample-model-override-differs",
    ),
    case(
        SAMPLE,
        ["checkpoint={uncond}", "sample.labels=[3]"],
        "sample.labels=[3]",
        "trained without labels",
        id="sample-labels-from-unconditional",
    ),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sample.labels=[3,12]"],
        "sample.labels=[3, 12]",
        "[12] not in 0..9",
        id="sample-label-out-of-range",
    ),
    case(SAMPLE, ["checkpoint={cond}", "sample.labels=three"], "sample.labels='three'", id="sample-labels-str"),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sample.precision=half"],
        "sample.precision='half' is not one of",
        id="sample-precision",
    ),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sample.num_images=0"],
        "sample.num_images=0 must be >= 1",
        id="sample-num-images-zero",
    ),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sample.batch_size=abc"],
        "sample.batch_size='abc' must be of type int",
        id="sample-batch-size-str",
    ),
    case(SAMPLE, ["checkpoint={cond}", "sample.device=tpu"], "sample.device='tpu'", id="sample-device-unknown"),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sampler.guidance_scale=2.0"],
        "sampler.guidance_scale=2.0 needs",
        "trainer.label_dropout > 0",
        id="sample-guidance-without-label-dropout",
    ),
    case(
        SAMPLE,
        ["checkpoint={cond}", "sampler=ddim", "sampler.steps=500"],
        "sampler.steps=500",
        id="sample-ddim-more-steps-than-timesteps",
    ),
    case(
        RUN,
        ["trainer.early_stop_metric=fid"],
        "trainer.early_stop_metric=fid",
        "trainer.eval_rate",
        id="trainer-early-stop-fid-without-evaluations",
    ),
]
SUBPROCESS_CASES = ["trainer-keep-checkpoints", "unknown-key-typo"]  # a ddpm error and one of Hydra's own


@pytest.fixture(scope="module")
def paths(runs, tmp_path_factory) -> dict[str, Path]:
    """Every path a case may name: the runs' checkpoints and the bad files and folders."""
    tmp = tmp_path_factory.mktemp("bad_inputs")
    cond = runs["cond_run"] / "checkpoints" / "last.pt"
    state = torch.load(cond, weights_only=True)

    text_file = tmp / "notes.pt"
    text_file.write_text("not a checkpoint")
    state_dict = tmp / "weights_only.pt"
    torch.save(state["model"], state_dict)  # what torch.save(model.state_dict()) writes
    corrupted = tmp / "corrupted.pt"
    corrupted.write_bytes(cond.read_bytes())
    data = bytearray(corrupted.read_bytes())
    data[middle_of_largest_tensor(corrupted)] ^= 0xFF  # one flipped byte in the middle of the tensor data
    corrupted.write_bytes(bytes(data))
    other_model = tmp / "other_model.pt"  # a config of one model with the weights of another
    config = {**state["config"], "model": {**state["config"]["model"], "base_channels": 16}}
    save_checkpoint(other_model, {**state, "config": config})

    empty_dir = tmp / "empty"
    empty_dir.mkdir()
    notes_dir, fake_png_dir = tmp / "with_notes", tmp / "with_fake_png"  # good images, and one bad file
    for folder in (notes_dir, fake_png_dir):
        folder.mkdir()
        for index in range(2):
            Image.new("RGB", (16, 16), color=(index * 100, 50, 0)).save(folder / f"{index}.png")
    (notes_dir / "notes.txt").write_text("a note, not an image")
    (fake_png_dir / "fake.png").write_text("text in a file named .png")

    return {
        "tmp": tmp,
        "cond": cond,
        "uncond": runs["uncond_run"] / "checkpoints" / "last.pt",
        "text_file": text_file,
        "state_dict": state_dict,
        "corrupted": corrupted,
        "other_model": other_model,
        "empty_dir": empty_dir,
        "notes_dir": notes_dir,
        "fake_png_dir": fake_png_dir,
    }


def middle_of_largest_tensor(path: Path) -> int:
    """The file offset of the middle byte of the largest tensor record in a torch.save zip archive (the middle of
    the file may fall in the alignment padding between records, which no reader looks at)."""
    with zipfile.ZipFile(path) as archive:
        record = max(
            (info for info in archive.infolist() if "/data/" in info.filename), key=lambda info: info.file_size
        )
    with open(path, "rb") as file:
        file.seek(record.header_offset + 26)
        name_length, extra_length = struct.unpack("<HH", file.read(4))
    return record.header_offset + 30 + name_length + extra_length + record.file_size // 2


@pytest.mark.parametrize("base, overrides, expected", CASES)
def test_bad_input_is_refused_with_a_message_naming_key_and_value(base, overrides, expected, runs, paths, capfd):
    # A training command runs in the directory of the conditional run, where trainer.resume=auto finds its
    # checkpoints; other tasks (which may not write into a training run's directory) in a directory of their own.
    training = base is RUN and not any(override.startswith("task=") for override in overrides)
    run_dir = runs["cond_run"] if training else paths["tmp"] / "run"
    args = [*command(base, overrides, paths), f"hydra.run.dir={run_dir}"]
    before = checkpoint_files(runs)

    code, output = run_main_in_process(args, capfd)

    shown = f"python main.py {' '.join(args)}\n--- exit status {code}, output:\n{output}"
    assert code == 1, f"expected exit status 1:\n{shown}"
    for text in expected:
        text = text.format(**paths)
        assert text in output, f"expected {text!r} in the output:\n{shown}"
    assert "Traceback" not in output, f"an expected error showed a traceback:\n{shown}"
    assert checkpoint_files(runs) == before, f"the existing checkpoints were changed:\n{shown}"
    assert not (run_dir / "wandb").exists(), f"wandb was started:\n{shown}"


@pytest.mark.slow
@pytest.mark.parametrize("case_id", SUBPROCESS_CASES)
def test_bad_input_in_a_real_process_shows_no_traceback(case_id, runs, paths):
    [(base, overrides, expected)] = [c.values for c in CASES if c.id == case_id]
    args = [*command(base, overrides, paths), f"hydra.run.dir={runs['cond_run']}"]
    before = checkpoint_files(runs)
    env = user_environment()
    result = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "main.py"), *args], capture_output=True, text=True, env=env, timeout=120
    )
    output = result.stdout + result.stderr
    shown = f"python main.py {' '.join(args)}\n--- exit status {result.returncode}, output:\n{output}"
    assert result.returncode == 1, shown
    assert all(text.format(**paths) in output for text in expected), shown
    assert "Traceback" not in output, shown
    assert checkpoint_files(runs) == before, shown
