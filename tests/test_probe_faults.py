"""The faults a hostile probe found after the fault catalogue: each command ends in one line (exit status 1, no
traceback) before any compute, and the existing runs' checkpoints and records (summary.json, metrics, samples,
.hydra/) stay byte for byte as they were.

The cases run as tests/test_fault_catalogue.py runs its own: `python main.py ...` in this process, with the
catalogue's files; a case that starts a new run names a run directory of its own.
"""

import hashlib

import pytest
from main_in_process import RUN, SAMPLE, checkpoint_files, command, run_main_in_process
from PIL import Image
from test_fault_catalogue import EVALUATE, assert_one_error_line, case, error_lines
from test_search import SEARCH

NEW_RUN = "hydra.run.dir={tmp}/probe_run"
SEARCH_DIR = "hydra.sweep.dir={tmp}/probe_search"
FOLDER = ["dataset=folder", "dataset.path={grey_folder}", "dataset.image_size=8", "dataset.channels=1"]
FOLDER_RUN = [*FOLDER, "trainer.use_labels=false", "trainer.batch_size=2", NEW_RUN]

PROBES = [
    # Objectives and end-of-run measurements that this run cannot produce.
    case(
        "objective",
        RUN,
        ["trainer.objective=test_loss", "trainer.iterations=3", "trainer.log_rate=5", NEW_RUN],
        "trainer.objective=test_loss is the test loss at the last log, but no step in 1..3 logs",
        "trainer.log_rate=5",
        id="test-loss-without-a-log",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=train_loss", "trainer.log_rate=0", NEW_RUN],
        "trainer.objective=train_loss is the train loss at the last log, but no step in 1..2 logs",
        id="train-loss-logging-off",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=best_fid", "trainer.eval_rate=10", "trainer.iterations=3", "fid=tiny", NEW_RUN],
        "trainer.objective=best_fid is the best FID during training, but no step up to trainer.iterations=3",
        "trainer.eval_rate=10",
        id="best-fid-after-the-end",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=test_loss", *FOLDER_RUN],
        "trainer.objective=test_loss is measured on the test split, but the dataset has none",
        id="test-loss-of-a-folder",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=nll_bits_per_dim", "trainer.nll_at_end=true", *FOLDER_RUN],
        "trainer.nll_at_end=true measures the bound on the test split, but the dataset has none",
        id="nll-of-a-folder",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=train_loss", "trainer.nll_at_end=true", *FOLDER_RUN],
        "trainer.nll_at_end=true measures the bound on the test split",
        id="nll-at-end-of-a-folder",
    ),
    case(
        "objective",
        RUN,
        ["trainer.objective=test_loss", "trainer.iterations=3"],
        "no step in 3..3 logs (trainer.log_rate=2, trainer.iterations=3)",
        id="resumed-without-a-log-left",
    ),
    # Overrides of what the checkpoint defines, which a task that builds its model from it would ignore.
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "diffusion.prediction=v"],
        "diffusion.prediction='v' was given, but checkpoint={cond} holds a model with diffusion.prediction='eps'",
        "task=evaluate builds the model from the checkpoint: drop diffusion.prediction=v",
        id="evaluate-prediction",
    ),
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "schedule=cosine"],
        "but checkpoint={cond} holds a model with schedule.",
        "drop schedule=cosine",
        id="evaluate-schedule",
    ),
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "trainer.use_labels=false"],
        "trainer.use_labels=False was given, but checkpoint={cond} holds a model with trainer.use_labels=True",
        id="evaluate-labels",
    ),
    case(
        "ignored",
        SAMPLE,
        ["checkpoint={cond}", "trainer.use_labels=false"],
        "task=sample builds the model from the checkpoint: drop trainer.use_labels=false",
        id="sample-labels",
    ),
    # Settings that would do nothing in the configuration given.
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "eval.fid=false", "eval.nll=true", "eval.seeds=[0,1]"],
        "eval.seeds=[0, 1] are the seeds of the images drawn for FID, but eval.fid=false draws none",
        id="evaluate-seeds-without-fid",
    ),
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "eval.fid=false", "eval.nll=true", "eval.nll_timesteps=500"],
        "eval.nll_timesteps=500 is more than the 49 KL terms of the checkpoint's schedule",
        id="evaluate-nll-timesteps-above-t",
    ),
    case(
        "ignored",
        EVALUATE,
        ["checkpoint={cond}", "eval.fid=false", "eval.nll=true", "eval.nll_num_images=100000"],
        "eval.nll_num_images=100000 is more than the",
        "images of the test split",
        id="evaluate-nll-images-above-the-split",
    ),
    # The search sweeper's own settings, before any trial.
    case(
        "search",
        SEARCH,
        ["hydra.sweeper.n_trials=0", SEARCH_DIR],
        "hydra.sweeper.n_trials=0 must be an integer >= 1",
        id="n-trials-zero",
    ),
    case(
        "search",
        SEARCH,
        ["hydra.sweeper.n_jobs=0", SEARCH_DIR],
        "hydra.sweeper.n_jobs=0 must be an integer >= 1",
        id="n-jobs-zero",
    ),
    case(
        "search",
        SEARCH,
        ["hydra.sweeper.direction=max", SEARCH_DIR],
        "hydra.sweeper.direction='max' must be one of ['minimize', 'maximize']",
        id="direction-max",
    ),
    case(
        "search",
        SEARCH,
        ["optimizer.lr=interval(0.1,0.01)", SEARCH_DIR],
        "optimizer.lr=interval(0.1,0.01):",
        id="interval-low-above-high",
    ),
    case(
        "search",
        SEARCH,
        ["optimizer.lrr=interval(0.001,0.01)", SEARCH_DIR],
        "optimizer.lrr is not a setting of optimizer",
        "did you mean optimizer.lr?",
        id="misspelt-search-key",
    ),
    case(
        "search",
        SEARCH,
        ["trainer.bach_size=choice(4,8)", SEARCH_DIR],
        "trainer.bach_size",
        "did you mean trainer.batch_size?",
        id="misspelt-sweep-argument",
    ),
    # The components' and the machine's limits, in one line naming the key typed.
    case(
        "component",
        RUN,
        ["trainer.num_threads=100000", NEW_RUN],
        "trainer.num_threads=100000 is more than the",
        "CPUs this process may use",
        id="threads-beyond-the-machine",
    ),
    case(
        "component",
        RUN,
        ["dataset.image_size=2048", NEW_RUN],
        "dataset.image_size=2048: the 1797 digits at that size take",
        "GiB free; choose a smaller dataset.image_size",
        id="images-that-cannot-fit-memory",
    ),
    case(
        "component",
        RUN,
        ["hydra.run.dir={tmp}/" + "x" * 300],
        "the name xxxxxxxxxxxxxxxxxxxxxxxx... is 300 bytes long, more than the 255 the file system allows",
        id="run-directory-name-too-long",
    ),
    case(
        "component",
        RUN,
        ["trainer.eval_rate=1", "fid=tiny", "fid.reference_dir={a_file}", NEW_RUN],
        "fid.reference_dir={a_file} is a file, not a directory: remove it or point fid.reference_dir at",
        id="reference-dir-is-a-file",
    ),
    case(
        "component",
        RUN,
        ["trainer.eval_rate=1", "fid=tiny", "paths.data_dir={a_file}", NEW_RUN],
        "paths.data_dir={a_file} (its fid_stats/) cannot be created",
        id="data-dir-is-a-file",
    ),
    case(
        "component",
        ["-m", *RUN],
        ["hydra/launcher=slurm", "hydra.launcher.timeout_min=0", SEARCH_DIR],
        "hydra.launcher.timeout_min=0 must be a whole number >= 1",
        id="slurm-time-limit-zero",
    ),
    case(
        "component",
        ["-m", *RUN],
        ["hydra/launcher=slurm", "hydra.launcher.timeout_min=1", "hydra.launcher.signal_delay_s=30", SEARCH_DIR],
        "hydra.launcher.timeout_min=1 leaves no time before the USR2 warning",
        id="slurm-time-limit-before-the-warning",
    ),
]


def run_records(runs) -> dict[str, str]:
    """Every file of the two runs but their checkpoints (compared with their times too), their log (which each
    command appends to) and their lock record: summary.json, metrics, samples, .hydra/ and the rest."""
    return {
        str(path): hashlib.sha256(path.read_bytes()).hexdigest()
        for run_dir in runs.values()
        for path in sorted(run_dir.rglob("*"))
        if path.is_file() and path.name not in ("main.log", "run.lock") and "checkpoints" not in path.parts
    }


@pytest.fixture(scope="module")
def probe_files(files):
    """The catalogue's files, and a folder of grey images (a dataset without a test split)."""
    folder = files["tmp"] / "grey_folder"
    folder.mkdir(exist_ok=True)
    for index in range(4):
        Image.new("L", (8, 8), color=index * 60).save(folder / f"{index}.png")
    return {**files, "grey_folder": folder}


@pytest.mark.parametrize("base, overrides, expected", PROBES)
def test_a_probe_fault_ends_in_one_line_before_the_compute(base, overrides, expected, runs, probe_files, capfd):
    run_dir = runs["cond_run"] if base is RUN else probe_files["tmp"] / "probe_task"
    args = command([*base, f"hydra.run.dir={run_dir}"], overrides, probe_files)
    before = checkpoint_files(runs), run_records(runs)

    code, output = run_main_in_process(args, capfd)

    shown = assert_one_error_line(code, output, args, expected, probe_files)
    assert "training:" not in output, f"a step:\n{shown}"
    assert checkpoint_files(runs) == before[0], f"the existing checkpoints were changed:\n{shown}"
    assert run_records(runs) == before[1], f"the runs' records were changed:\n{shown}"
    assert not list((probe_files["tmp"] / "probe_run").glob("checkpoints/*.pt")), f"a new run wrote:\n{shown}"


def test_auto_objective_warns_outside_a_sweep_and_means_the_train_loss_without_a_test_split(probe_files, capfd):
    run_dir = probe_files["tmp"] / "auto_folder_run"
    args = command(RUN, [*FOLDER_RUN, f"hydra.run.dir={run_dir}", "trainer.log_rate=3"], probe_files)
    code, output = run_main_in_process(args, capfd)
    assert code == 0, output
    assert "this run will report no objective: trainer.objective=auto (train_loss) is the train loss" in output


@pytest.mark.parametrize("reachable", [False, True], ids=["no-api-key", "server-unreachable"])
def test_wandb_online_is_checked_before_the_data_loads(reachable, runs, probe_files, capfd, monkeypatch, tmp_path):
    """wandb online without a key, or without a server it can reach, failed after the data had loaded (with a
    key, after a minute and a half of retries). The server here is a closed port on the loopback interface."""
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.netrc
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    if reachable:
        monkeypatch.setenv("WANDB_API_KEY", "0" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    args = command(RUN, ["logger=wandb", "logger.mode=online", f"hydra.run.dir={tmp_path / 'run'}"], probe_files)
    code, output = run_main_in_process(args, capfd)
    [error] = error_lines(output)
    assert code == 1 and "Traceback" not in output
    if reachable:
        assert "logger.mode=online cannot reach http://127.0.0.1:9 (" in error
    else:
        assert "logger.mode=online needs a W&B API key for api.wandb.ai, and none is set" in error
    assert "logger.mode=offline" in error and not (tmp_path / "run" / "wandb").exists()


def test_a_warmup_longer_than_the_run_is_warned_about_before_the_first_step(probe_files, capfd):
    run_dir = probe_files["tmp"] / "long_warmup_run"
    args = command(RUN, ["trainer.warmup=8", f"hydra.run.dir={run_dir}"], probe_files)
    code, output = run_main_in_process(args, capfd)
    assert code == 0, output
    warning = "trainer.warmup=8 is more than trainer.iterations=2: the learning rate never reaches optimizer.lr"
    assert warning in output and output.index(warning) < output.index("step 2/2")


def test_a_path_outside_ascii_without_quotes_gets_the_hint_to_quote_it(probe_files, capfd):
    """Hydra's lexer error named no way out."""
    run_dir = f"{probe_files['tmp']}/läuft"
    code, output = run_main_in_process(command(RUN, [f"hydra.run.dir={run_dir}"], probe_files), capfd)
    assert code == 1 and "Traceback" not in output and "LexerNoViableAltException" not in output
    assert f"hydra.run.dir={run_dir} cannot be read: a value with characters outside ASCII must be quoted" in output
    code, output = run_main_in_process(command(RUN, [f'hydra.run.dir="{run_dir}"'], probe_files), capfd)
    assert code == 0, output


def test_a_shard_directory_holds_the_shards_of_one_evaluation(runs, probe_files, capfd):
    """A shard drawn from another checkpoint was overwritten silently (and would have been merged)."""
    shard_dir = probe_files["tmp"] / "shards"
    shard = [*EVALUATE, "eval.num_shards=2", "eval.shard=0", f"eval.shard_dir={shard_dir}"]
    run_dir = f"hydra.run.dir={probe_files['tmp'] / 'shard_run'}"
    cond = command(shard, [f"checkpoint={runs['cond_run'] / 'checkpoints' / 'last.pt'}", run_dir], probe_files)
    assert run_main_in_process(cond, capfd)[0] == 0
    written = (shard_dir / "shard_0_of_2.npz").read_bytes()
    assert run_main_in_process(cond, capfd)[0] == 0  # the same settings again: the same shard, drawn again
    assert (shard_dir / "shard_0_of_2.npz").read_bytes() == written
    other = command(cond, [f"checkpoint={runs['uncond_run'] / 'checkpoints' / 'last.pt'}"], probe_files)
    code, output = run_main_in_process(other, capfd)
    [error] = error_lines(output)
    assert code == 1 and "Traceback" not in output
    assert f"eval.shard_dir={shard_dir} holds shard_0_of_2.npz, drawn from" in error and "cond_run" in error
    assert (shard_dir / "shard_0_of_2.npz").read_bytes() == written
