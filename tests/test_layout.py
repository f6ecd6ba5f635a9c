"""The package's folders show the architecture, and moving modules broke nothing a user has: imports go down
the layers only, no module outgrows 300 lines, every `_target_` resolves, and a checkpoint written by the flat
layout (its config names the old modules) still resumes, samples and evaluates."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import torch
import yaml
from conftest import PROJECT_ROOT, user_environment
from hydra.utils import get_object
from main_in_process import run_in_process

from ddpm.config.moves import MOVED_MODULES, MOVED_OBJECTS, current_target, current_targets
from ddpm.io.checkpoint import load_checkpoint

PACKAGE = PROJECT_ROOT / "ddpm"
# Which subpackage may import which (README: Layout). Listed in layer order: each imports only earlier ones.
MAY_IMPORT = {
    "config": set(),
    "runtime": {"config"},
    "io": {"config"},
    "model": {"config"},
    "data": {"config"},
    "diffusion": {"config", "runtime", "io", "model"},
    "evaluation": {"config", "runtime", "io", "model", "data", "diffusion"},
    "training": {"config", "runtime", "io", "model", "data", "diffusion"},
    "tasks": {"config", "runtime", "io", "model", "data", "diffusion", "evaluation", "training"},
}
OLD_CHECKPOINT = PROJECT_ROOT / "tests" / "fixtures" / "old_layout" / "tiny_step4.pt"
# The command that wrote it (tests/fixtures/old_layout/README.md).
OLD_RUN = [
    "experiment=quickstart",
    "logger=none",
    "model.base_channels=4",
    "model.channel_mults=[1]",
    "model.attention_resolutions=[0]",
    "model.num_groups=1",
    "model.time_emb_dim=8",
    "dataset.image_size=8",
    "schedule.num_timesteps=50",
    "trainer.batch_size=8",
    "trainer.log_rate=2",
    "trainer.checkpoint_rate=2",
    "trainer.test_batches=1",
    "trainer.sample_at_end=false",
    "trainer.ema_start=0",
    "trainer.precision=fp32",
    "sampler=ddpm",
]


def imported_subpackages(path: Path) -> set[str]:
    """The ddpm subpackages that the module at `path` imports, at any depth of its code."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names = [node.module] if node.module != "ddpm" else [f"ddpm.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        else:
            continue
        found |= {name.split(".")[1] for name in names if name.startswith("ddpm.")}
    return found


def test_only_the_public_api_sits_directly_in_the_package():
    assert sorted(p.name for p in PACKAGE.iterdir() if p.suffix == ".py") == ["__init__.py"]
    assert {p.name for p in PACKAGE.iterdir() if p.is_dir() and p.name != "__pycache__"} == set(MAY_IMPORT)


def test_no_module_is_longer_than_300_lines():
    long = {
        str(p.relative_to(PROJECT_ROOT)): n
        for p in PACKAGE.rglob("*.py")
        if (n := len(p.read_text().splitlines())) > 300
    }
    assert not long, f"split these along their seams: {long}"


def test_subpackages_import_only_the_layers_below_them():
    upward = []
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE).parts
        if len(parts) == 1:
            continue  # ddpm/__init__.py: the public API gathers from every layer
        own = parts[0]
        upward += [
            f"{path.relative_to(PROJECT_ROOT)} imports ddpm.{other}"
            for other in imported_subpackages(path) - MAY_IMPORT[own] - {own}
        ]
    assert not upward, "\n".join(upward)


def test_the_allowed_imports_form_layers_without_a_cycle():
    placed: list[str] = []
    for package, allowed in MAY_IMPORT.items():  # each may import only packages listed before it
        assert allowed <= set(placed), f"{package} may import {allowed - set(placed)}, listed after it"
        placed.append(package)


def every_target(node) -> list[str]:
    if isinstance(node, dict):
        return [v for k, v in node.items() if k == "_target_" and isinstance(v, str)] + [
            t for v in node.values() for t in every_target(v)
        ]
    if isinstance(node, list):
        return [t for v in node for t in every_target(v)]
    return []


def test_every_target_in_the_configs_resolves():
    files = [*(PROJECT_ROOT / "conf").rglob("*.yaml"), *(PROJECT_ROOT / "experiments").glob("*.yaml")]
    targets = {t for f in files for t in every_target(yaml.safe_load(f.read_text()) or {})}
    assert len(targets) > 20
    for target in sorted(targets):
        get_object(target)  # raises with the path when it does not resolve


def test_every_moved_module_and_object_has_a_home_that_resolves():
    for old, new in MOVED_MODULES.items():
        assert get_object(new).__name__ == new, old
    for old, new in MOVED_OBJECTS.items():
        assert callable(get_object(new)), old
    assert current_target("ddpm.diffusion.GaussianDiffusion") == "ddpm.diffusion.gaussian.GaussianDiffusion"
    assert current_target("ddpm.samplers.heun") == "ddpm.diffusion.samplers.heun"
    assert current_target("ddpm.build.build_optimizer") == "ddpm.training.optimizer.build_optimizer"
    for unchanged in ("ddpm.diffusion.gaussian.GaussianDiffusion", "ddpm.data.digits.digits", "torch.optim.Adam"):
        assert current_target(unchanged) == unchanged
    nested = {
        "fid": {"_target_": "x", "extractor": {"_target_": "ddpm.feature_extractors.TinyExtractor"}},
        "l": [{"_target_": "ddpm.unet.UNet"}],
    }
    assert current_targets(nested) == {
        "fid": {"_target_": "x", "extractor": {"_target_": "ddpm.evaluation.feature_extractors.TinyExtractor"}},
        "l": [{"_target_": "ddpm.model.unet.UNet"}],
    }


def test_importing_a_module_of_the_flat_layout_names_its_new_home():
    code = "import ddpm.samplers"
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=user_environment(), cwd=PROJECT_ROOT
    )
    assert result.returncode == 1
    assert "ModuleNotFoundError: ddpm.samplers moved to ddpm.diffusion.samplers" in result.stderr.splitlines()[-1]


def test_the_readme_python_api_imports():
    from ddpm import EMA, GaussianDiffusion, UNet, dns_betas, load_diffusion  # noqa: F401
    from ddpm.diffusion import objectives, samplers

    assert callable(samplers.ddim) and callable(objectives.denoiser)


def test_the_old_layout_checkpoint_loads_with_the_current_targets():
    state = load_checkpoint(OLD_CHECKPOINT)
    assert state["config"]["model"]["_target_"] == "ddpm.model.unet.UNet"
    assert state["config"]["diffusion"]["_target_"] == "ddpm.diffusion.gaussian.GaussianDiffusion"
    assert state["config"]["trainer"]["_target_"] == "ddpm.training.settings.TrainSettings"
    raw = torch.load(OLD_CHECKPOINT, weights_only=True)  # the file itself still names the flat layout
    assert raw["config"]["model"]["_target_"] == "ddpm.unet.UNet"


def test_the_old_layout_checkpoint_resumes(tmp_path):
    checkpoint = tmp_path / "old.pt"
    shutil.copy(OLD_CHECKPOINT, checkpoint)
    run_dir = tmp_path / "resumed"
    run_in_process(*OLD_RUN, "trainer.iterations=6", f"trainer.resume={checkpoint}", f"hydra.run.dir={run_dir}")
    steps = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert steps and steps[0] > 4 and steps[-1] == 6, steps  # continued after step 4, not from the start
    assert load_checkpoint(run_dir / "checkpoints" / "last.pt")["step"] == 6


def test_the_old_layout_checkpoint_samples_and_evaluates(tmp_path):
    sample_dir = tmp_path / "sample"
    run_in_process(
        "task=sample",
        "logger=none",
        f"checkpoint={OLD_CHECKPOINT}",
        "sample.num_images=4",
        "sample.batch_size=4",
        "sample.device=cpu",
        f"hydra.run.dir={sample_dir}",
    )
    assert len(list(sample_dir.rglob("*.png"))) >= 4
    evaluate_dir = tmp_path / "evaluate"
    run_in_process(
        "task=evaluate",
        f"checkpoint={OLD_CHECKPOINT}",
        "fid=tiny",
        "eval.device=cpu",
        "eval.num_samples=20",
        "eval.batch_size=10",
        "eval.pr_num_samples=20",
        f"fid.reference_dir={tmp_path / 'stats'}",
        f"hydra.run.dir={evaluate_dir}",
    )
    metrics = json.loads((evaluate_dir / "metrics.json").read_text())
    assert metrics["fid"] > 0 and metrics["protocol"]["generated"]["checkpoint"] == str(OLD_CHECKPOINT)
