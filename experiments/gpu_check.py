"""The Python half of the GPU check kit (experiments/gpu_check.sh runs it): one subcommand per check.

    python3 experiments/gpu_check.py STEP [--device cuda|cpu] [--small] [--results FILE] [--work DIR]

Steps (README "GPU check"): versions, tests, sync, nonfinite, resume, cross-device, benchmark [--eager], sample,
profile. Every step prints what it checks and its numbers, records them in --results (one JSON file, a key per
step) and exits 0 when the check passes, 1 when it fails. It builds everything through the project's own code: the config composed from conf/ as main.py composes
it, `ddpm.training.setup.build_training` (the loop's parts, `UpdateStep` among them), main.py itself for the
runs that a user would start, `ddpm.diffusion.generation.draw_images` for sampling.

`--small` cuts every size for a rehearsal on a CPU: the tests' tiny UNet (tests/conftest.py TINY_QUICKSTART),
few images, few steps. Nothing here needs the package installed: the checkout's ddpm is put on sys.path, and
Hydra may come from a folder on PYTHONPATH (the kit's .gpu_kit/).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import math
import os
import platform
import runpy
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the ddpm package of this checkout, also when it is not installed
os.environ.setdefault("DDPM_PROJECT_ROOT", str(ROOT))
os.environ.setdefault("WANDB_SILENT", "true")

import torch

# What every run through main.py adds: no wandb, the stand-in feature network (nothing to download).
COMMON = ["logger=none", "fid=tiny"]
# tests/conftest.py TINY_QUICKSTART's network: a 46k-parameter UNet, for the rehearsal on a CPU.
TINY_MODEL = [
    "model.base_channels=8",
    "model.channel_mults=[1,2]",
    "model.attention_resolutions=[1]",
    "model.num_groups=4",
]


@dataclasses.dataclass(frozen=True)
class Sizes:
    """How big each check is: the GPU's sizes, or the rehearsal's (--small)."""

    train: list[str]  # the training runs of sync, nonfinite, resume and cross-device: a UNet on the digits
    batch: int
    sync_steps: int  # steps under torch.cuda.set_sync_debug_mode, per variant
    resume_steps: int  # N of "N straight against N/2 + resume N/2"
    benchmark: list[str]  # overrides of task=benchmark (the default 35.7M model at CIFAR-10's shape)
    sample_model: list[str]
    sample_images: int
    sample_batch: int
    profile_model: list[str]
    profile_batch: int
    profile_steps: int


GPU_SIZES = Sizes(
    train=["experiment=quickstart"],  # the quickstart's 0.7M-parameter UNet, class-conditional, 16x16 digits
    batch=64,
    sync_steps=10,
    resume_steps=20,
    benchmark=["benchmark.batch_size=128"],
    sample_model=[],
    sample_images=10_000,
    sample_batch=1000,
    profile_model=[],
    profile_batch=128,
    profile_steps=20,
)
SMALL_SIZES = Sizes(
    train=["experiment=quickstart", *TINY_MODEL, "schedule.num_timesteps=100"],
    batch=8,
    sync_steps=10,
    resume_steps=6,
    benchmark=[
        *TINY_MODEL,
        "benchmark.batch_size=4",
        "benchmark.sample_batch_size=4",
        "benchmark.warmup_steps=1",
        "benchmark.warmup_seconds=1",
        "benchmark.steps=2",
        "benchmark.max_seconds=5",
        "benchmark.data_batches=2",
        "benchmark.precisions=[auto]",  # one precision, as on a GPU (a CPU with bf16 units would time fp32 too)
    ],
    sample_model=TINY_MODEL,
    sample_images=16,
    sample_batch=8,
    profile_model=TINY_MODEL,
    profile_batch=4,
    profile_steps=3,
)

# (precision, fused optimizer) of the training steps checked for host syncs and for a poisoned step.
SYNC_VARIANTS = {"bf16+fused": ("bf16", True), "fp16+fused": ("fp16", True), "fp16+foreach": ("fp16", False)}
NONFINITE_VARIANTS = {**SYNC_VARIANTS, "bf16+foreach": ("bf16", False)}
# Where a step of a for-loop (foreach) optimizer reads the device by design (README "Performance"): fp16's grad
# scaler reads its found_inf to decide the step, and the loop then checks the non-finite count at once.
DOCUMENTED_SYNCS = ("torch/amp/grad_scaler.py", "ddpm/training/nonfinite.py")


class CheckFailed(Exception):
    """A check that ran and found something wrong (its message is the step's note)."""


# ----------------------------------------------------------------------------------------------------------------
# Shared pieces


def compose(*overrides: str):
    """The config `python main.py OVERRIDES...` would run with."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        return hydra_compose(config_name="config", overrides=list(overrides))


def is_cuda(args: argparse.Namespace) -> bool:
    return torch.device(args.device).type == "cuda"


def synchronize(args: argparse.Namespace) -> None:
    if is_cuda(args):
        torch.cuda.synchronize()


def record(args: argparse.Namespace, step: str, values: dict[str, Any]) -> None:
    """Merges `values` into results[step] of the --results JSON file (written whole, then renamed)."""
    if not args.results:
        return
    path = Path(args.results)
    results = json.loads(path.read_text()) if path.exists() else {}
    results.setdefault(step, {}).update(values)
    temporary = path.with_suffix(".tmp")
    temporary.write_text(json.dumps(results, indent=2, default=str) + "\n")
    temporary.replace(path)


def all_finite(values: list[torch.Tensor]) -> bool:
    return bool(torch.stack([v.float() for v in values]).isfinite().all())


def main_py(*overrides: str) -> str:
    """`python3 main.py OVERRIDES...` in a subprocess, as a user runs it: its output goes to this log line by
    line (so a step killed by its timeout still shows how far it got) and is returned."""
    print("$ python3 main.py " + " ".join(overrides), flush=True)
    environment = {**os.environ, "HYDRA_FULL_ERROR": "1"}
    process = subprocess.Popen(
        [sys.executable, str(ROOT / "main.py"), *overrides],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=environment,
    )
    lines = []
    for line in process.stdout:
        print(line, end="", flush=True)
        lines.append(line)
    if process.wait():
        raise CheckFailed(f"main.py {' '.join(overrides)} exited with status {process.returncode}")
    return "".join(lines)


def main_py_in_process(*overrides: str) -> int:
    """`python3 main.py OVERRIDES...` in this process (so that dynamo's counters and compile times can be read
    afterwards); its exit status."""
    from hydra.core.global_hydra import GlobalHydra

    print("$ python3 main.py " + " ".join(overrides) + "   (in process)", flush=True)
    GlobalHydra.instance().clear()
    argv = sys.argv
    sys.argv = ["main.py", *overrides]
    os.environ["HYDRA_FULL_ERROR"] = "1"
    try:
        runpy.run_path(str(ROOT / "main.py"), run_name="__main__")
        return 0
    except SystemExit as exit:
        return exit.code if isinstance(exit.code, int) else 1
    finally:
        sys.argv = argv
        GlobalHydra.instance().clear()


@contextlib.contextmanager
def training_parts(args: argparse.Namespace, precision: str, fused: bool, *overrides: str) -> Iterator[Stepper]:
    """The training loop's parts, built as task=train builds them (ddpm.tasks.train.train_as_rank without the
    run directory's bookkeeping): the train config of --small/GPU size, eager, with this precision and optimizer.

    On a CPU, fp16 is refused by the config's check (it needs CUDA), so the rehearsal asks for fp32 there and then
    sets fp16 on the resolved fast paths: the same grad scaler and autocast code run, on the CPU."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from ddpm.config.validation import build_settings
    from ddpm.diffusion.build import build_diffusion
    from ddpm.runtime.devices import configure_backends, resolve_device
    from ddpm.runtime.distributed import Ranks
    from ddpm.runtime.fast_paths import prepare_diffusion
    from ddpm.runtime.rng import seed_everything
    from ddpm.tasks.train import training_batches
    from ddpm.training.optimizer import build_optimizer
    from ddpm.training.setup import build_training

    configured = precision if is_cuda(args) or precision != "fp16" else "fp32"
    cfg = compose(
        *args.sizes.train,
        *COMMON,
        f"trainer.device={args.device}",
        f"trainer.batch_size={args.sizes.batch}",
        f"trainer.precision={configured}",
        "trainer.compile=false",
        f"optimizer.fused={str(fused).lower()}",
        *overrides,
    )
    settings = build_settings(cfg.trainer)
    device = resolve_device(settings.device)
    fast = dataclasses.replace(settings.fast_paths(device), precision=precision)
    configure_backends(device, settings.deterministic)
    train_set = instantiate(cfg.dataset, split="train")
    seed_everything(settings.seed)
    diffusion = build_diffusion(cfg).to(device)
    optimizer = build_optimizer(cfg, diffusion.model.parameters())
    prepare_diffusion(diffusion, fast)
    batches = training_batches(
        train_set, settings.batch_size, settings, fast, device, Ranks(), settings.data_workers(device)
    )
    print(f"built: {fast.describe()}, optimizer fused={optimizer.defaults.get('fused')}, {type(batches).__name__}")
    with tempfile.TemporaryDirectory(dir=args.work) as run_dir:
        config = OmegaConf.to_container(cfg, resolve=True)
        with build_training(
            diffusion, optimizer, batches, settings, fast=fast, device=device, run_dir=Path(run_dir), config=config
        ) as parts:
            yield Stepper(parts, settings)


class Stepper:
    """`step()`: one step of the training loop (ddpm.training.loop.take_step, as train() takes it), without the
    end of train() (which syncs to write the summary)."""

    def __init__(self, parts, settings):
        self.parts, self.settings = parts, settings
        self.base_lrs = [group["lr"] for group in parts.update.optimizer.param_groups]  # as train() reads them

    def step(self, poison: bool = False):
        """`poison` puts a NaN into the batch."""
        from ddpm.training.loop import take_step

        batches = self.parts.batches
        if poison:
            self.parts.batches = poisoned(batches)
        try:
            return take_step(self.parts, self.settings, self.base_lrs)
        finally:
            self.parts.batches = batches


def poisoned(batches):
    """The next batch of `batches` with a NaN in its first image."""
    x, y = next(batches)
    x = x.clone()
    x[0] = math.nan
    yield x, y


@contextlib.contextmanager
def sync_debug(mode: str) -> Iterator[None]:
    torch.cuda.set_sync_debug_mode(mode)
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def syncs_of(function: Callable[[], Any]) -> list[tuple[str, int]]:
    """(file, line) of every host-device synchronization `function` makes (CUDA's sync debug mode "warn")."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with sync_debug("warn"):
            function()
    return [(w.filename.replace("\\", "/"), w.lineno) for w in caught if "synchroniz" in str(w.message)]


def short(sites: list[tuple[str, int]]) -> list[str]:
    """file:line with the path cut to its last two parts, each site once with its count."""
    counts: dict[str, int] = {}
    for filename, line in sites:
        key = f"{'/'.join(Path(filename).parts[-2:])}:{line}"
        counts[key] = counts.get(key, 0) + 1
    return [f"{site} x{count}" for site, count in counts.items()]


# ----------------------------------------------------------------------------------------------------------------
# (a) versions


def step_versions(args: argparse.Namespace) -> dict[str, Any]:
    import hydra
    import numpy
    import omegaconf

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cuda_available": torch.cuda.is_available(),
        "numpy": numpy.__version__,
        "hydra": f"{hydra.__version__} ({Path(hydra.__file__).parent.parent})",
        "omegaconf": omegaconf.__version__,
        "cpus": os.cpu_count(),
    }
    with contextlib.suppress(ImportError):
        import triton

        info["triton"] = triton.__version__
    if torch.cuda.is_available():
        properties = torch.cuda.get_device_properties(0)
        info.update(
            gpu=properties.name,
            gpu_memory_gib=round(properties.total_memory / 2**30, 1),
            capability=f"{properties.major}.{properties.minor}",
            multiprocessors=properties.multi_processor_count,
            bf16=torch.cuda.is_bf16_supported(),
        )
    if shutil.which("nvidia-smi"):
        query = "--query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit"
        smi = subprocess.run(["nvidia-smi", query, "--format=csv,noheader"], capture_output=True, text=True)
        info["nvidia_smi"] = (smi.stdout or smi.stderr).strip()
    for key, value in info.items():
        print(f"{key:>16}: {value}")
    if is_cuda(args) and not torch.cuda.is_available():
        raise CheckFailed(f"torch {torch.__version__} sees no CUDA device")
    gpu = f"{info['gpu']}, {info['gpu_memory_gib']} GiB, " if "gpu" in info else "no GPU, "
    note = f"{gpu}torch {info['torch']}, CUDA {info['torch_cuda']}, cuDNN {info['cudnn']}, hydra {hydra.__version__}"
    return {**info, "note": note}


# ----------------------------------------------------------------------------------------------------------------
# (b) the CUDA-only tests


def step_tests(args: argparse.Namespace) -> dict[str, Any]:
    """pytest -m cuda over the test files that hold such tests (found by their marker, so a new one is run too)."""
    import pytest

    files = sorted(
        str(path.relative_to(ROOT))
        for path in (ROOT / "tests").glob("test_*.py")
        if "pytest.mark.cuda" in path.read_text()
    )
    if not files:
        raise CheckFailed("no test file holds a test marked cuda")
    outcomes: dict[str, list[str]] = {"passed": [], "failed": [], "skipped": []}

    class Outcomes:
        def pytest_runtest_logreport(self, report):
            if report.when == "call" or report.outcome != "passed":
                outcomes.setdefault(report.outcome, []).append(report.nodeid)

    command = ["-m", "cuda", "-q", "-p", "no:cacheprovider", "--rootdir", str(ROOT), *files]
    print("$ python3 -m pytest " + " ".join(command), flush=True)
    code = int(pytest.main(command, plugins=[Outcomes()]))
    counts = {outcome: len(ids) for outcome, ids in outcomes.items()}
    note = f"{counts.get('passed', 0)} passed, {counts.get('failed', 0)} failed, {counts.get('skipped', 0)} skipped"
    values = {"files": files, "exit_status": code, **{k: v for k, v in outcomes.items() if v}, "note": note}
    if code != 0:
        raise CheckFailed(f"pytest exit status {code}: {note}")
    if is_cuda(args) and outcomes["skipped"]:
        raise CheckFailed(f"CUDA tests were skipped on the GPU: {note}")
    return values


# ----------------------------------------------------------------------------------------------------------------
# (c) training steps without host syncs


def step_sync(args: argparse.Namespace) -> dict[str, Any]:
    """sync_steps training steps per variant under torch.cuda.set_sync_debug_mode: "error" for the fused
    optimizer (no sync may happen), "warn" for the for-loop one with fp16, whose grad scaler reads found_inf
    on the host by design (pass: every sync is one of DOCUMENTED_SYNCS, at least one and at most two per step).
    The first step of each variant runs before, with its syncs (lazy initialization) reported, not judged."""
    steps, values, failures = args.sizes.sync_steps, {}, []
    for name, (precision, fused) in SYNC_VARIANTS.items():
        print(f"--- {name}: {steps} steps", flush=True)
        with training_parts(args, precision, fused) as stepper:
            if not is_cuda(args):
                results = [stepper.step() for _ in range(1 + steps)]
                finite = all_finite([r.loss for r in results])
                values[name] = {"finite": finite, "syncs": "not measured (the sync debug mode needs CUDA)"}
                if not finite:
                    failures.append(f"{name}: non-finite loss")
                continue
            first = syncs_of(lambda: stepper.step())
            results: list = []
            if fused:
                try:
                    with sync_debug("error"):
                        for _ in range(steps):
                            results.append(stepper.step())
                    error = None
                except RuntimeError as caught:
                    frames = traceback.extract_tb(caught.__traceback__)
                    ours = [f for f in frames if f.filename.startswith(str(ROOT / "ddpm"))] or frames
                    where = f"{ours[-1].filename}:{ours[-1].lineno}"  # the project's line that read the device
                    error = f"{caught} at {where} ({len(results)} steps done)"
                    traceback.print_exc()
                synchronize(args)
                row = {"first_step_syncs": short(first), "error": error}
                if error:
                    failures.append(f"{name}: {error}")
            else:
                syncs = syncs_of(lambda: results.extend(stepper.step() for _ in range(steps)))  # noqa: B023
                synchronize(args)
                undocumented = [s for s in syncs if not s[0].endswith(DOCUMENTED_SYNCS)]
                row = {
                    "first_step_syncs": short(first),
                    "syncs": len(syncs),
                    "syncs_per_step": len(syncs) / steps,
                    "sites": short(syncs),
                }
                if undocumented or not steps <= len(syncs) <= 2 * steps:
                    failures.append(f"{name}: {len(syncs)} syncs in {steps} steps, undocumented {short(undocumented)}")
            row["finite"] = bool(results) and all_finite([r.loss for r in results])
            if results and not row["finite"]:
                failures.append(f"{name}: non-finite loss")
            values[name] = row
            print(json.dumps(row, indent=2), flush=True)
    if failures:
        raise CheckFailed("; ".join(failures))
    if is_cuda(args):
        foreach = values["fp16+foreach"]
        note = (
            f"{steps} steps each: bf16+fused and fp16+fused without a sync; fp16+foreach "
            f"{foreach['syncs_per_step']:g} sync/step, all documented ({', '.join(foreach['sites'])})"
        )
    else:
        note = f"{steps + 1} steps of each variant ran, losses finite (syncs not measurable on a CPU)"
    return {**values, "note": note}


# ----------------------------------------------------------------------------------------------------------------
# (d) a poisoned step


def optimizer_snapshot(parts) -> dict[str, Any]:
    model = parts.diffusion.model
    return {
        "weights": {name: p.detach().clone() for name, p in model.named_parameters()},
        "state": [
            {key: value.clone() if torch.is_tensor(value) else value for key, value in state.items()}
            for state in parts.update.optimizer.state.values()
        ],
    }


def same(a: Any, b: Any) -> bool:
    if torch.is_tensor(a):
        return torch.is_tensor(b) and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


def step_nonfinite(args: argparse.Namespace) -> dict[str, Any]:
    """Per variant, with trainer.skip_nonfinite=1: two clean steps, then one whose batch holds a NaN. The step must
    leave weights, Adam's moments and step counts exactly as they were, count as one fault (warned, not raised),
    and a clean step after it must move the weights again."""
    values, failures = {}, []
    precisions = NONFINITE_VARIANTS
    for name, (precision, fused) in precisions.items():
        with training_parts(args, precision, fused, "trainer.skip_nonfinite=1") as stepper:
            parts = stepper.parts
            for clean in range(6):  # two clean steps, or more until Adam has moments (fp16's scaler may skip)
                stepper.step()
                if clean and parts.update.optimizer.state:
                    break
            before = optimizer_snapshot(parts)
            poisoned = stepper.step(poison=True)
            parts.nonfinite.check(parts.checkpoints.describe_last())  # one fault of at most one: a warning
            after = optimizer_snapshot(parts)
            moved = False
            for _ in range(3):  # fp16's scaler may skip an overflowing clean step too
                stepper.step()
                if not same(before["weights"], optimizer_snapshot(parts)["weights"]):
                    moved = True
                    break
            row = {
                "clean_steps_before": clean + 1,
                "adam_states": len(before["state"]),
                "weights_unchanged": same(before["weights"], after["weights"]),
                "moments_and_steps_unchanged": same(before["state"], after["state"]),
                "applied": bool(poisoned.applied),
                "fault": bool(poisoned.fault),
                "faults_reported": parts.nonfinite.reported,
                "moved_after": moved,
            }
        print(f"--- {name}: {json.dumps(row)}", flush=True)
        values[name] = row
        expected = {
            "weights_unchanged": True,
            "moments_and_steps_unchanged": True,
            "applied": False,
            "fault": True,
            "faults_reported": 1,
            "moved_after": True,
        }
        wrong = {key: row[key] for key, value in expected.items() if row[key] != value}
        if not row["adam_states"]:
            wrong["adam_states"] = 0
        if wrong:
            failures.append(f"{name}: {wrong}")
    if failures:
        raise CheckFailed("; ".join(failures))
    note = f"{', '.join(precisions)}: a NaN batch left weights, moments and step counts unchanged; 1 fault counted"
    return {**values, "note": note}


# ----------------------------------------------------------------------------------------------------------------
# (e) exact resume, (f) a CPU checkpoint resumed on the device


def run_overrides(args: argparse.Namespace, steps: int) -> list[str]:
    """A short training run through main.py: checkpoints at the half and at the end, eager."""
    half = steps // 2
    return [
        *args.sizes.train,
        *COMMON,
        f"trainer.iterations={steps}",
        f"trainer.batch_size={args.sizes.batch}",
        f"trainer.checkpoint_rate={half}",
        "trainer.keep_checkpoints=0",
        f"trainer.log_rate={half}",
        "trainer.test_batches=1",
        "trainer.sample_at_end=false",
        "trainer.compile=false",
    ]


def compared_state(path: Path) -> dict[str, Any]:
    """What must be bit-identical between an uninterrupted run and a resumed one: everything but wall times."""
    from ddpm.io.checkpoint import load_checkpoint

    state = load_checkpoint(path)
    loop = {k: v for k, v in state["loop"].items() if k != "wall_time_s"}
    return {
        "model": state["model"],
        "ema": state["ema"],
        "optimizer": state["optimizer"],
        "step": state["step"],
        "loop": loop,
        "data": state["data"],
        "noise": state["rng"]["noise"],
    }


def step_resume(args: argparse.Namespace) -> dict[str, Any]:
    """trainer.deterministic=true, dropout on: N steps straight (checkpoints at N/2 and N) against a second run
    that resumes from the first one's step-N/2 checkpoint for the other N/2; both final checkpoints bit for bit."""
    from ddpm.io.checkpoint import periodic_name

    steps = args.sizes.resume_steps
    base = [*run_overrides(args, steps), f"trainer.device={args.device}", "trainer.deterministic=true"]
    base.append("model.dropout=0.1")  # dropout draws from the global random stream at every step
    straight, resumed = Path(args.work) / "resume_straight", Path(args.work) / "resume_resumed"
    started = time.perf_counter()
    main_py(*base, f"hydra.run.dir={straight}")
    middle = straight / "checkpoints" / periodic_name(steps // 2)
    main_py(*base, f"hydra.run.dir={resumed}", f"trainer.resume={middle}")
    a, b = compared_state(straight / "checkpoints" / "last.pt"), compared_state(resumed / "checkpoints" / "last.pt")
    differing = [key for key in a if not same(a[key], b[key])]
    values = {"steps": steps, "seconds": round(time.perf_counter() - started, 1), "differing": differing}
    if differing:
        raise CheckFailed(f"{steps} steps straight and {steps // 2} + resumed {steps // 2} differ in {differing}")
    values["note"] = (
        f"{steps} steps straight == {steps // 2} + resumed {steps // 2}, bit for bit (model, EMA, optimizer, loop, "
        "data position, noise stream)"
    )
    return values


def step_cross_device(args: argparse.Namespace) -> dict[str, Any]:
    """A run with trainer.device=cpu writes its step-N/2 checkpoint; a run on --device resumes from it and
    finishes: the noise stream of another device type is re-seeded, with a warning."""
    from ddpm.io.checkpoint import periodic_name

    steps = args.sizes.resume_steps // 2 * 2
    base = run_overrides(args, steps)
    on_cpu, on_device = Path(args.work) / "cross_cpu", Path(args.work) / "cross_device"
    main_py(*base, "trainer.device=cpu", f"hydra.run.dir={on_cpu}")
    checkpoint = on_cpu / "checkpoints" / periodic_name(steps // 2)
    output = main_py(
        *base, f"trainer.device={args.device}", f"hydra.run.dir={on_device}", f"trainer.resume={checkpoint}"
    )
    summary = json.loads((on_device / "summary.json").read_text())
    reseeded = "re-seeded" in output
    values = {
        "steps": summary["steps"],
        "resumed_from_step": summary["resumed_from_step"],
        "train_loss": summary["train_loss"],
        "noise_stream_reseeded_warning": reseeded,
    }
    print(json.dumps(values), flush=True)
    other_type = torch.device(args.device).type != "cpu"
    if summary["steps"] != steps or summary["resumed_from_step"] != steps // 2:
        raise CheckFailed(f"the resumed run ended at step {summary['steps']}, from {summary['resumed_from_step']}")
    if not (summary["train_loss"] is not None and math.isfinite(summary["train_loss"])):
        raise CheckFailed(f"train loss {summary['train_loss']} after the resume")
    if reseeded != other_type:
        raise CheckFailed(f"the noise-stream warning was {'' if reseeded else 'not '}given")
    warning = ", with the noise-stream re-seeded warning" if reseeded else " (same device type: no re-seeding)"
    values["note"] = f"CPU checkpoint of step {steps // 2} resumed on {args.device} to step {steps}{warning}"
    return values


# ----------------------------------------------------------------------------------------------------------------
# (g), (h) task=benchmark, compiled and eager


class LogCount(logging.Handler):
    """Counts the records under `logger` whose message starts with `start`; None when that logger's records
    are not emitted (a torch artifact log that TORCH_LOGS does not name)."""

    def __init__(self, logger: str, start: str):
        super().__init__()
        self.start, self.seen = start, 0
        logging.getLogger(logger).addHandler(self)

    def emit(self, record: logging.LogRecord) -> None:
        self.seen += record.getMessage().startswith(self.start)

    @property
    def count(self) -> int | None:
        return self.seen if "recompiles" in os.environ.get("TORCH_LOGS", "") else None


def use_compile_backend(backend: str) -> None:
    """Makes `nn.Module.compile` (what ddpm.runtime.fast_paths.prepare_network calls) use `backend`: the
    rehearsal's aot_eager traces with dynamo and AOTAutograd as inductor would, without generating code, which
    costs minutes on a CPU even for the tiny UNet."""
    compile_module = torch.nn.Module.compile

    def compile_with(module: torch.nn.Module, *args: Any, **kwargs: Any) -> None:
        compile_module(module, *args, **{"backend": backend, **kwargs})

    torch.nn.Module.compile = compile_with


def step_benchmark(args: argparse.Namespace) -> dict[str, Any]:
    """task=benchmark of the default model (35.7M, CIFAR-10's shape) through main.py, in this process; compiled
    unless --eager. Reports images/s, and for the compiled run dynamo's compile time, graphs and recompiles."""
    name = "eager" if args.eager else "compiled"
    run_dir = Path(args.work) / f"benchmark_{name}"
    overrides = [
        "task=benchmark",
        *COMMON,
        f"trainer.device={args.device}",
        f"trainer.compile={str(not args.eager).lower()}",
        *args.sizes.benchmark,
        f"hydra.run.dir={run_dir}",
    ]
    if not args.eager and args.compile_backend != "inductor":
        use_compile_backend(args.compile_backend)
    recompiles = LogCount("torch._dynamo", "Recompiling function")
    started = time.perf_counter()
    code = main_py_in_process(*overrides)
    seconds = time.perf_counter() - started
    if code:
        raise CheckFailed(f"task=benchmark exited with status {code}")
    result = json.loads((run_dir / "benchmark.json").read_text())
    keep = (
        "device",
        "precision",
        "channels_last",
        "compile",
        "optimizer_fused",
        "data_on_device",
        "parameters",
        "batch_size",
        "train_images_per_s",
        "train_step_ms",
        "train_tflops",
        "train_peak_fraction",
        "sample_batch_size",
        "sample_images_per_s",
        "data_images_per_s",
        "peak_memory_gib",
    )
    values: dict[str, Any] = {key: result.get(key) for key in keep}
    values["wall_seconds"] = round(seconds, 1)
    compiled = ""
    if not args.eager:
        import torch._dynamo.utils as dynamo_utils

        spent = dynamo_utils.calculate_time_spent()
        counters = dynamo_utils.counters
        values.update(
            compile_seconds=round(spent.get("total_wall_time", 0.0), 1),
            compile_phases={key: round(value, 1) for key, value in spent.items()},
            unique_graphs=counters["stats"].get("unique_graphs", 0),
            graph_breaks=sum(counters["graph_break"].values()),
            graph_break_reasons=dict(counters["graph_break"]),
            frames_compiled=counters["frames"].get("total", 0),
            recompiles=recompiles.count,  # as TORCH_LOGS=recompiles logs them (None without it)
            compile_backend=args.compile_backend,
        )
        compiled = (
            f", compile {values['compile_seconds']:.0f} s ({args.compile_backend}: {values['unique_graphs']} graphs, "
            f"{values['graph_breaks']} graph breaks, {values['recompiles']} recompiles)"
        )
    print(json.dumps(values, indent=2, default=str), flush=True)
    if not (values["train_images_per_s"] and math.isfinite(values["train_images_per_s"])):
        raise CheckFailed(f"no training throughput: {values['train_images_per_s']}")
    values["note"] = (
        f"{values['precision']}, batch {values['batch_size']}: training {values['train_images_per_s']:,.0f} images/s "
        f"({values['train_step_ms']:.1f} ms/step), sampling {values['sample_images_per_s']:,.0f} images/s per "
        f"network call{compiled}; {values['wall_seconds']:.0f} s in all"
    )
    return values


# ----------------------------------------------------------------------------------------------------------------
# (i) sampling


def step_sample(args: argparse.Namespace) -> dict[str, Any]:
    """sample_images images of CIFAR-10's shape from the default (untrained) model with sampler=dpm_solver
    sampler.steps=20, through the image generator task=sample uses, at sample.precision=auto, eager unless
    --compile."""
    from ddpm.diffusion.build import build_diffusion, build_sampler
    from ddpm.diffusion.generation import draw_images
    from ddpm.runtime.devices import configure_backends
    from ddpm.runtime.fast_paths import prepare_for_sampling
    from ddpm.runtime.rng import seed_everything

    cfg = compose(*COMMON, "sampler=dpm_solver", "sampler.steps=20", *args.sizes.sample_model)
    device = torch.device(args.device)
    configure_backends(device, deterministic=False)
    seed_everything(0)
    diffusion = build_diffusion(cfg).to(device).eval()
    precision = prepare_for_sampling(diffusion, device=device, precision="auto", compile=args.compile, key="sample")
    sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)
    count, batch = args.sizes.sample_images, args.sizes.sample_batch
    batches = draw_images(
        diffusion,
        sampler,
        images=range(count),
        batch_size=batch,
        seed=0,
        device=device,
        precision=precision,
        guidance_scale=guidance_scale,
    )
    started = time.perf_counter()
    first_batch_seconds, shape, finite = None, None, True
    for drawn in batches:
        finite = finite and bool(torch.isfinite(drawn.images).all())
        shape = drawn.pixels.shape[1:]  # on the host, as uint8, as task=sample saves them
        if first_batch_seconds is None:
            first_batch_seconds = time.perf_counter() - started
    seconds = time.perf_counter() - started
    steady = (count - batch) / (seconds - first_batch_seconds) if count > batch else None
    values = {
        "images": count,
        "batch_size": batch,
        "image_shape": list(shape),
        "precision": precision,
        "compiled": bool(args.compile),
        "seconds": round(seconds, 2),
        "images_per_s": count / seconds,
        "images_per_s_after_first_batch": steady,
        "first_batch_seconds": round(first_batch_seconds, 2),
    }
    print(json.dumps(values, indent=2), flush=True)
    if list(shape) != [32, 32, 3] or not finite:
        raise CheckFailed(f"images of shape {list(shape)} (32 x 32 x 3 expected), all finite: {finite}")
    after = f" ({steady:,.0f} after the first batch)" if steady else ""
    values["note"] = (
        f"{count:,} images 3x32x32, dpm_solver 20 steps, {precision}, batch {batch}, "
        f"{'compiled' if args.compile else 'eager'}: {count / seconds:,.0f} images/s{after}"
    )
    return values


# ----------------------------------------------------------------------------------------------------------------
# (j) the profile of training steps


def step_profile(args: argparse.Namespace) -> dict[str, Any]:
    """profile_steps training steps of the default model (UpdateStep, as task=benchmark steps it, eager unless
    --compile) under torch.profiler; the top 15 kernels by device time (self CPU time on a CPU)."""
    from torch.profiler import ProfilerActivity, profile

    from ddpm.config.validation import build_settings
    from ddpm.diffusion.build import build_diffusion
    from ddpm.runtime.devices import configure_backends
    from ddpm.runtime.fast_paths import memory_format, prepare_diffusion
    from ddpm.runtime.rng import seed_everything
    from ddpm.training.optimizer import build_optimizer
    from ddpm.training.update import UpdateStep

    cfg = compose(
        *COMMON,
        f"trainer.device={args.device}",
        f"trainer.compile={str(bool(args.compile)).lower()}",
        *args.sizes.profile_model,
    )
    settings = build_settings(cfg.trainer)
    device = torch.device(args.device)
    fast = settings.fast_paths(device)
    configure_backends(device, deterministic=False)
    seed_everything(0)
    diffusion = build_diffusion(cfg).to(device)
    optimizer = build_optimizer(cfg, diffusion.model.parameters())
    prepare_diffusion(diffusion, fast)
    update = UpdateStep(
        diffusion, optimizer, diffusion.update_ema, fast=fast, device=device, max_grad_norm=settings.max_grad_norm
    )
    layout, batch = memory_format(fast), args.sizes.profile_batch
    shape = (diffusion.channels, diffusion.image_size, diffusion.image_size)
    x = (torch.rand(batch, *shape, device=device) * 2 - 1).contiguous(memory_format=layout)
    classes = diffusion.model.num_classes
    labels = torch.randint(0, classes, (batch,), device=device) if classes and settings.use_labels else None
    generator = torch.Generator(device).manual_seed(0)

    def train_step() -> None:
        t, noise = diffusion.training_noise(batch, device, generator)
        update(x, labels, t, noise.contiguous(memory_format=layout))

    diffusion.train()
    for _ in range(3):  # cuDNN's autotuner (and compilation) first
        train_step()
    synchronize(args)
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if is_cuda(args) else [])
    started = time.perf_counter()
    with profile(activities=activities) as profiler:
        for _ in range(args.sizes.profile_steps):
            train_step()
        synchronize(args)
    seconds = time.perf_counter() - started
    averages = profiler.key_averages()
    if is_cuda(args):
        attribute = (
            "self_device_time_total" if hasattr(averages[0], "self_device_time_total") else "self_cuda_time_total"
        )
    else:
        attribute = "self_cpu_time_total"
    print(averages.table(sort_by=attribute, row_limit=15), flush=True)
    total = sum(getattr(event, attribute) for event in averages)
    top = sorted(averages, key=lambda event: getattr(event, attribute), reverse=True)[:15]
    rows = [
        {
            "name": event.key[:120],
            "calls": event.count,
            "ms_per_step": getattr(event, attribute) / 1e3 / args.sizes.profile_steps,
            "share": getattr(event, attribute) / total if total else None,
        }
        for event in top
    ]
    values = {
        "steps": args.sizes.profile_steps,
        "batch_size": batch,
        "fast_paths": fast.describe(),
        "sorted_by": attribute,
        "ms_per_step_profiled": seconds * 1e3 / args.sizes.profile_steps,
        "top": rows,
    }
    head = ", ".join(f"{row['name'][:40]} {row['share']:.0%}" for row in rows[:3] if row["share"] is not None)
    values["note"] = f"{args.sizes.profile_steps} steps of batch {batch} ({fast.precision}); top: {head}"
    return values


# ----------------------------------------------------------------------------------------------------------------


STEPS = {
    "versions": ("a", step_versions),
    "tests": ("b", step_tests),
    "sync": ("c", step_sync),
    "nonfinite": ("d", step_nonfinite),
    "resume": ("e", step_resume),
    "cross-device": ("f", step_cross_device),
    "benchmark": (None, step_benchmark),  # (g) compiled, (h) --eager
    "sample": ("i", step_sample),
    "profile": ("j", step_profile),
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("step", choices=list(STEPS))
    parser.add_argument("--device", default=os.environ.get("GPU_CHECK_DEVICE", "cuda"))
    parser.add_argument("--small", action="store_true", help="the rehearsal's sizes (a CPU)")
    parser.add_argument("--results", help="the JSON file of every step's numbers")
    parser.add_argument("--work", default=None, help="a scratch folder for run directories (default: a temporary one)")
    parser.add_argument("--eager", action="store_true", help="benchmark: trainer.compile=false")
    parser.add_argument("--compile", action="store_true", help="sample, profile: compile the network")
    parser.add_argument(
        "--compile-backend", default="inductor", help="benchmark: torch.compile's backend (the rehearsal: aot_eager)"
    )
    args = parser.parse_args()
    args.sizes = SMALL_SIZES if args.small else GPU_SIZES
    key, function = STEPS[args.step]
    key = key or ("h" if args.eager else "g")
    with contextlib.ExitStack() as stack:
        if args.work is None:
            args.work = stack.enter_context(tempfile.TemporaryDirectory(prefix="gpu_check_"))
        Path(args.work).mkdir(parents=True, exist_ok=True)
        print(f"=== ({key}) {args.step} on {args.device}{' (small)' if args.small else ''}", flush=True)
        started = time.perf_counter()
        try:
            values = function(args)
            ok, note = True, values.get("note", "")
        except CheckFailed as failure:
            values, ok, note = {}, False, str(failure)
        except Exception as error:  # the step's own fault, or the project's: the traceback is in the log
            traceback.print_exc()
            values, ok, note = {}, False, f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}"
        values.update(ok=ok, note=note, seconds=round(time.perf_counter() - started, 1))
        record(args, key, values)
        print(f"=== ({key}) {args.step}: {'PASS' if ok else 'FAIL'}: {note}", flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
