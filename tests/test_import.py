"""task=import: diffusers UNet2DModel directories (the format of the released DDPM weights, google/ddpm-cifar10-32)
become checkpoints whose network computes what diffusers computes, and whatever cannot be imported is refused in
one line. The models are built here, randomly initialized: nothing is downloaded."""

import copy
import inspect
import json
import math
import re
import shutil

import numpy as np
import pytest
import torch
from conftest import compose_config
from diffusers import DDPMScheduler, UNet2DModel
from hydra.utils import instantiate
from main_in_process import run_in_process, run_main_in_process
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ddpm.config.errors import ConfigError
from ddpm.diffusion.build import load_diffusion
from ddpm.io.checkpoint import load_checkpoint, save_checkpoint
from ddpm.io.diffusers_config import SCHEDULER_DEFAULTS, UNET2D_DEFAULTS, model_options, schedule_from
from ddpm.model.blocks import AttentionBlock, Downsample, sinusoidal_embedding
from ddpm.model.unet import UNet

# google/ddpm-cifar10-32's config.json (experiments/compare_diffusers.py): the up path's attention sits in the
# second up block (8x8), the down path's at 16x16; TensorFlow's padding, GroupNorm eps 1e-6, the DDPM paper's
# timestep features (sin first, frequencies 1 ... 1/10000).
HUB = {
    "sample_size": 32,
    "in_channels": 3,
    "out_channels": 3,
    "block_out_channels": [128, 256, 256, 256],
    "layers_per_block": 2,
    "down_block_types": ["DownBlock2D", "AttnDownBlock2D", "DownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D", "UpBlock2D"],
    "norm_num_groups": 32,
    "norm_eps": 1e-6,
    "act_fn": "silu",
    "attention_head_dim": None,
    "downsample_padding": 0,
    "flip_sin_to_cos": False,
    "freq_shift": 1,
    "mid_block_scale_factor": 1,
    "time_embedding_type": "positional",
    "resnet_time_scale_shift": "default",
    "add_attention": True,
    "center_input_sample": False,
}
NARROW = {**HUB, "block_out_channels": [32, 64, 64, 64], "norm_num_groups": 8}  # the same shape, 16x fewer weights
DDPM_SCHEDULER = {
    "num_train_timesteps": 1000,
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "beta_schedule": "linear",
    "variance_type": "fixed_large",
    "clip_sample": True,
}
TIMESTEPS = torch.tensor([0, 1, 10, 250, 500, 999])
THREADS = ["logger=none", "trainer.num_threads=1"]
TOLERANCE = 1e-5


def diffusers_model(config: dict, seed: int = 0) -> UNet2DModel:
    """A randomly initialized UNet2DModel whose biases and norm scales are random too (diffusers initializes
    norms to 1 and 0, which would hide a mix-up of two norms)."""
    torch.manual_seed(seed)
    model = UNet2DModel(**config)
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.dim() == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def save(model: UNet2DModel, directory, scheduler: dict | None = DDPM_SCHEDULER):
    model.save_pretrained(directory)
    if scheduler is not None:
        DDPMScheduler(**scheduler).save_pretrained(directory)
    return directory


def import_model(source, run_dir, *overrides: str):
    run_in_process("task=import", f"import.source={source}", *THREADS, f"hydra.run.dir={run_dir}", *overrides)
    return run_dir / "checkpoints" / "imported.pt"


def max_difference(theirs: UNet2DModel, ours: torch.nn.Module, batch: int = len(TIMESTEPS)) -> float:
    """The largest absolute difference of the two networks' outputs, for random x at the TIMESTEPS."""
    x = torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    t = TIMESTEPS[torch.linspace(0, len(TIMESTEPS) - 1, batch).long()]
    with torch.no_grad():
        expected = theirs(x, t).sample
        assert 0.3 < expected.abs().max() < 30  # outputs of order 1, so the tolerance is an absolute one
        return (ours(x, t) - expected).abs().max().item()


@pytest.fixture(scope="module")
def hub_shaped(tmp_path_factory):
    """The google/ddpm-cifar10-32 architecture at a quarter of the width, saved as diffusers saves it, imported."""
    root = tmp_path_factory.mktemp("hub_shaped")
    theirs = diffusers_model(NARROW)
    source = save(theirs, root / "ddpm-cifar10-32")
    return {"theirs": theirs, "source": source, "checkpoint": import_model(source, root / "run"), "root": root}


def test_the_imported_network_computes_what_diffusers_computes(hub_shaped):
    diffusion, state = load_diffusion(hub_shaped["checkpoint"])
    assert max_difference(hub_shaped["theirs"], diffusion.model) < TOLERANCE
    assert max_difference(hub_shaped["theirs"], diffusion.ema.module) < TOLERANCE  # EMA weights = the imported ones
    model = state["config"]["model"]
    assert (model["norm_eps"], model["downsample_padding"]) == (1e-6, "tf_same")
    assert (model["attention_resolutions"], model["up_attention_resolutions"]) == ([1], [2])
    assert (model["base_channels"], model["channel_mults"], model["num_groups"]) == (32, [1, 2, 2, 2], 8)


def test_the_checkpoint_is_one_of_ours_with_the_schedule_of_scheduler_config_json(hub_shaped):
    state = load_checkpoint(hub_shaped["checkpoint"])  # its digest checked: no trust_checkpoint needed
    assert state["step"] == 0 and state["imported_from"]["weights"] == "diffusion_pytorch_model.safetensors"
    config = state["config"]
    assert config["schedule"] == {
        "_target_": "ddpm.diffusion.schedules.linear_betas",
        "num_timesteps": 1000,
        "low": 1e-4,
        "high": 0.02,
    }
    assert config["dataset"]["_target_"] == "ddpm.data.cifar10.cifar10" and config["task"]["_target_"].endswith(
        "train.run"
    )
    assert "import" not in config
    diffusion, _ = load_diffusion(hub_shaped["checkpoint"])
    torch.testing.assert_close(
        diffusion.betas.double(), DDPMScheduler(**DDPM_SCHEDULER).betas.double(), rtol=1e-6, atol=0
    )


@pytest.mark.parametrize(
    "change",
    [
        {"norm_eps": 1e-5},
        {"downsample_padding": "symmetric"},
        {"time_embedding_freq_shift": 0},
        {"time_embedding_order": "cos_sin"},
    ],
)
def test_without_each_convention_the_outputs_differ(change, hub_shaped):
    """Each option is needed: this project's own value in its place moves the outputs well past the tolerance."""
    state = load_checkpoint(hub_shaped["checkpoint"])
    options = {k: v for k, v in state["config"]["model"].items() if k != "_target_"}
    ours = UNet(**{**options, **change}).eval()
    ours.load_state_dict(state["model"])
    assert max_difference(hub_shaped["theirs"], ours) > 3 * TOLERANCE


def test_an_imported_checkpoint_samples_with_task_sample(hub_shaped, tmp_path):
    run_in_process(
        "task=sample",
        f"checkpoint={hub_shaped['checkpoint']}",
        *THREADS,
        "sample.num_images=2",
        "sample.batch_size=2",
        "sample.device=cpu",
        "sampler=ddim",
        "sampler.steps=3",
        f"hydra.run.dir={tmp_path}",
    )
    images = np.load(tmp_path / "samples" / "samples.npz")["arr_0"]
    assert images.shape == (2, 32, 32, 3) and images.dtype == np.uint8


def test_the_released_models_configuration_at_full_width(tmp_path):
    """The real google/ddpm-cifar10-32 architecture: the paper's 35.7M parameters, the same outputs."""
    theirs = diffusers_model(HUB)
    checkpoint = import_model(save(theirs, tmp_path / "ddpm-cifar10-32"), tmp_path / "run")
    diffusion, _ = load_diffusion(checkpoint)
    assert sum(p.numel() for p in diffusion.model.parameters()) == 35_746_307
    assert max_difference(theirs, diffusion.ema.module, batch=2) < TOLERANCE


def test_weights_saved_by_older_diffusers_as_bin_with_the_old_attention_names(hub_shaped, tmp_path):
    old_names = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    state = {}
    for name, tensor in load_file(hub_shaped["source"] / "diffusion_pytorch_model.safetensors").items():
        for new, old in old_names.items():
            name = name.replace(f".attentions.0.{new}.", f".attentions.0.{old}.").replace(
                f".attentions.1.{new}.", f".attentions.1.{old}."
            )
        state[name] = tensor
    assert any(".query." in name for name in state)
    source = tmp_path / "old"
    source.mkdir()
    shutil.copy(hub_shaped["source"] / "config.json", source)
    torch.save(state, source / "diffusion_pytorch_model.bin")
    diffusion, _ = load_diffusion(import_model(source, tmp_path / "run"))
    assert max_difference(hub_shaped["theirs"], diffusion.model) < TOLERANCE


def test_diffusers_own_conventions_and_a_pipeline_directory(tmp_path):
    """diffusers' defaults (cosines first, freq_shift 0, heads of 8 channels, symmetric padding, eps 1e-5), saved
    as a pipeline (unet/ and scheduler/), with a cosine schedule."""
    config = {
        "sample_size": 32,
        "block_out_channels": [16, 32],
        "layers_per_block": 1,
        "norm_num_groups": 4,
        "down_block_types": ["AttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "AttnUpBlock2D"],
        "time_embedding_dim": 48,
        "dropout": 0.1,
    }
    theirs = diffusers_model(config)
    save(theirs, tmp_path / "pipeline" / "unet", scheduler=None)
    scheduler = {"num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"}
    DDPMScheduler(**scheduler).save_pretrained(tmp_path / "pipeline" / "scheduler")
    diffusion, state = load_diffusion(import_model(tmp_path / "pipeline", tmp_path / "run"))
    model = state["config"]["model"]
    assert (model["time_embedding_order"], model["time_embedding_freq_shift"]) == ("cos_sin", 0)
    assert (model["attention_head_dim"], model["downsample_padding"], model["norm_eps"]) == (8, "symmetric", 1e-5)
    assert diffusion.model.down[0].blocks[0].attention.num_heads == 2
    assert max_difference(theirs, diffusion.model) < TOLERANCE
    torch.testing.assert_close(diffusion.betas.double(), DDPMScheduler(**scheduler).betas.double(), rtol=0, atol=1e-6)


@pytest.mark.parametrize(
    "scheduler",
    [
        {"num_train_timesteps": 500},
        {"beta_start": 2e-4, "beta_end": 0.01},
        {"beta_schedule": "squaredcos_cap_v2", "num_train_timesteps": 4000},
    ],
)
def test_schedules_have_diffusers_betas(scheduler, tmp_path):
    ours = instantiate(schedule_from(scheduler, tmp_path / "scheduler_config.json"))
    torch.testing.assert_close(ours, DDPMScheduler(**scheduler).betas.double(), rtol=1e-6, atol=1e-7)


def test_the_defaults_written_here_are_diffusers_own():
    """A key config.json leaves out means diffusers' default: the tables of those must be diffusers' own."""
    for cls, table in ((UNet2DModel, UNET2D_DEFAULTS), (DDPMScheduler, SCHEDULER_DEFAULTS)):
        defaults = {name: p.default for name, p in inspect.signature(cls.__init__).parameters.items() if name != "self"}
        for key, value in table.items():
            assert key in defaults, f"{cls.__name__} no longer takes {key}"
            assert (list(defaults[key]) if isinstance(defaults[key], tuple) else defaults[key]) == value, key
    assert set(UNET2D_DEFAULTS) == set(inspect.signature(UNet2DModel.__init__).parameters) - {"self"}


# ---- refusals: one line naming what cannot be imported ----


@pytest.mark.parametrize(
    "change, message",
    [
        ({"_class_name": "UNet2DConditionModel"}, r"_class_name='UNet2DConditionModel'; only a diffusers UNet2DModel"),
        (
            {"down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D", "DownBlock2D"]},
            r"down_block_types=.*CrossAttnDownBlock2D.*each one of \['DownBlock2D', 'AttnDownBlock2D'\]",
        ),
        ({"up_block_types": ["UpBlock2D", "AttnUpBlock2D", "UpBlock2D"]}, r"up_block_types=.*4 blocks"),
        ({"act_fn": "gelu"}, r"act_fn='gelu' cannot be imported: only 'silu'"),
        ({"class_embed_type": "timestep"}, r"class_embed_type='timestep' cannot be imported: diffusers adds class"),
        ({"num_class_embeds": 10}, r"num_class_embeds=10 cannot be imported"),
        ({"resnet_time_scale_shift": "scale_shift"}, r"resnet_time_scale_shift='scale_shift' cannot be imported"),
        ({"time_embedding_type": "fourier"}, r"time_embedding_type='fourier' cannot be imported"),
        ({"mid_block_scale_factor": 2}, r"mid_block_scale_factor=2 cannot be imported"),
        ({"downsample_padding": 2}, r"downsample_padding=2 cannot be imported"),
        ({"center_input_sample": True}, r"center_input_sample=True cannot be imported"),
        ({"add_attention": False}, r"add_attention=False cannot be imported"),
        ({"upsample_type": "resnet"}, r"upsample_type='resnet' cannot be imported"),
        ({"block_out_channels": [32, 48, 64, 64]}, r"block_out_channels=\[32, 48, 64, 64\].*multiple of the first, 32"),
        ({"sample_size": [32, 64]}, r"sample_size=\[32, 64\] cannot be imported: square images"),
        ({"out_channels": 6}, r"out_channels=6 cannot be imported: the network predicts the noise"),
        ({"attn_norm_num_groups": 4}, r"attn_norm_num_groups=4 cannot be imported"),
    ],
)
def test_a_config_this_unet_cannot_express_is_refused_naming_the_setting(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        model_options({**NARROW, **change}, tmp_path / "config.json")


@pytest.mark.parametrize(
    "change, message",
    [
        ({"prediction_type": "v_prediction"}, r"prediction_type='v_prediction' cannot be imported"),
        ({"beta_schedule": "scaled_linear"}, r"beta_schedule='scaled_linear' cannot be imported"),
        ({"trained_betas": [0.1, 0.2]}, r"trained_betas=\[0.1, 0.2\] cannot be imported"),
    ],
)
def test_a_schedule_this_project_cannot_express_is_refused(change, message, tmp_path):
    with pytest.raises(ConfigError, match=message):
        schedule_from({**DDPM_SCHEDULER, **change}, tmp_path / "scheduler_config.json")


def edited_copy(hub_shaped, directory, *, config=None, weights=None):
    """A copy of the hub-shaped source with config.json and/or the weights changed by the given functions."""
    directory.mkdir()
    source = hub_shaped["source"]
    content = json.loads((source / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps(config(content) if config else content))
    state = load_file(source / "diffusion_pytorch_model.safetensors")
    save_file(weights(state) if weights else state, directory / "diffusion_pytorch_model.safetensors")
    return directory


def without(state, name):
    del state[name]
    return state


def reshaped(state, name):
    state[name] = state[name][:-1]
    return state


class Code:
    def __reduce__(self):
        return (print, ("this ran while loading",))


@pytest.mark.parametrize(
    "case, message",
    [
        ("no source", r"task=import needs import.source=DIR"),
        ("no config.json", r"holds no config.json \(nor unet/config.json\): it is not a diffusers model directory"),
        ("no weights", r"holds config.json but no diffusion_pytorch_model.safetensors or diffusion_pytorch_model.bin"),
        (
            "missing tensor",
            (
                r"has no tensor down_blocks.1.attentions.0.to_k.weight, which the architecture of "
                r"config.json has \(down.1.blocks.0.attention.to_qkv.weight here\)"
            ),
        ),
        ("extra tensor", r"holds 1 tensor\(s\) that the architecture of config.json has no place for: extra.weight"),
        (
            "wrong shape",
            (
                r"up_blocks.2.resnets.0.conv1.bias is a torch.float32 tensor of shape \[63\], but the "
                r"architecture of config.json needs a floating-point one of shape \[64\]"
            ),
        ),
        ("unbuildable", r"config.json describes a UNet this project cannot build: model.num_groups=7 must divide"),
        (
            "unusable schedule",  # it blamed config.json
            r"scheduler_config.json describes a noise schedule this project cannot use: schedule.high=",
        ),
        ("other size", r"the imported model has image_size=64, but dataset.image_size=32: name the dataset"),
        ("code in the weights", r"holds objects other than tensors, which are not loaded"),
        ("conditional", r"trainer.use_labels=true, but a UNet2DModel without class embeddings is unconditional"),
        ("out exists", r"import.out=.* exists already"),
    ],
)
def test_what_cannot_be_imported_ends_in_one_line(case, message, hub_shaped, tmp_path, capfd):
    source, extra = tmp_path / "source", []
    if case == "no config.json":
        source.mkdir()
    elif case == "no weights":
        source.mkdir()
        shutil.copy(hub_shaped["source"] / "config.json", source)
    elif case == "missing tensor":
        edited_copy(hub_shaped, source, weights=lambda s: without(s, "down_blocks.1.attentions.0.to_k.weight"))
    elif case == "extra tensor":
        edited_copy(hub_shaped, source, weights=lambda s: {**s, "extra.weight": torch.zeros(2)})
    elif case == "wrong shape":
        edited_copy(hub_shaped, source, weights=lambda s: reshaped(s, "up_blocks.2.resnets.0.conv1.bias"))
    elif case == "unbuildable":
        edited_copy(hub_shaped, source, config=lambda c: {**c, "norm_num_groups": 7})
    elif case == "unusable schedule":
        edited_copy(hub_shaped, source)
        (source / "scheduler_config.json").write_text(json.dumps({**DDPM_SCHEDULER, "beta_end": 2.0}))
    elif case == "other size":
        edited_copy(hub_shaped, source, config=lambda c: {**c, "sample_size": 64})
    elif case == "code in the weights":
        source.mkdir()
        shutil.copy(hub_shaped["source"] / "config.json", source)
        torch.save({"conv_in.weight": Code()}, source / "diffusion_pytorch_model.bin")
    elif case in ("conditional", "out exists"):
        source = hub_shaped["source"]
        extra = ["trainer.use_labels=true"] if case == "conditional" else [f"import.out={hub_shaped['checkpoint']}"]
    arguments = [] if case == "no source" else [f"import.source={source}"]
    before = hub_shaped["checkpoint"].read_bytes()
    code, output = run_main_in_process(
        ["task=import", *arguments, *THREADS, *extra, f"hydra.run.dir={tmp_path / 'run'}"], capfd
    )
    errors = [line for line in output.splitlines() if "[ERROR]" in line]
    assert code == 1 and len(errors) == 1 and "Traceback" not in output and "this ran" not in output, output
    assert re.search(message, errors[0]), errors[0]
    assert not (tmp_path / "run" / "checkpoints" / "imported.pt").exists()
    assert hub_shaped["checkpoint"].read_bytes() == before


# ---- this project's own UNet is unchanged by the new options ----


def test_the_convention_options_default_to_this_projects_own_unet():
    node = compose_config().model
    assert (node.norm_eps, node.downsample_padding, node.up_attention_resolutions, node.attention_head_dim) == (
        1e-5,
        "symmetric",
        None,
        None,
    )
    assert (node.time_embedding_order, node.time_embedding_freq_shift) == ("sin_cos", 1)
    small = {"base_channels": 32, "channel_mults": [1, 2, 2], "num_groups": 8, "attention_resolutions": [1]}
    torch.manual_seed(0)
    model = UNet(**small).eval()
    assert all(m.eps == 1e-5 for m in model.modules() if isinstance(m, torch.nn.GroupNorm))
    assert all(m.conv.padding == (1, 1) and not m.tf_same for m in model.modules() if isinstance(m, Downsample))
    attention = [m for m in model.modules() if isinstance(m, AttentionBlock)]
    assert len(attention) == 2 + 1 + 3 and all(m.num_heads == 1 for m in attention)  # down, middle, up at level 1
    # The DDPM paper's timestep features: sines then cosines of t * 10000^(-i / (half - 1)).
    t = torch.tensor([0, 7, 999])
    i = torch.arange(16, dtype=torch.float32)
    angles = t[:, None].float() * torch.exp(-math.log(10000) * i / 15)[None]
    assert torch.equal(sinusoidal_embedding(t, 32), torch.cat([angles.sin(), angles.cos()], dim=1))


def test_a_checkpoint_from_before_the_options_existed_loads_the_same_network(tmp_path):
    """An older checkpoint's config has none of the new keys: it builds the network it was trained as."""
    cfg = compose_config(*THREADS, "model.base_channels=16", "model.channel_mults=[1,2]", "model.num_groups=8")
    config = OmegaConf.to_container(cfg, resolve=True)
    new = (
        "norm_eps",
        "downsample_padding",
        "up_attention_resolutions",
        "attention_head_dim",
        "time_embedding_order",
        "time_embedding_freq_shift",
    )
    older = copy.deepcopy(config)
    for key in new:
        del older["model"][key]
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    save_checkpoint(tmp_path / "old.pt", {"model": model.state_dict(), "ema": None, "step": 3, "config": older})
    diffusion, _ = load_diffusion(tmp_path / "old.pt")
    x, t = torch.randn(2, 3, 32, 32), torch.tensor([1, 900])
    with torch.no_grad():
        assert torch.equal(diffusion.model(x, t), model.eval()(x, t))


def test_an_imported_checkpoint_evaluates_with_task_evaluate(hub_shaped, tmp_path, monkeypatch):
    from test_data import trust_cifar_archive, write_cifar_archive

    written = write_cifar_archive(tmp_path / "cifar")
    trust_cifar_archive(monkeypatch, written)
    run_in_process(
        "task=evaluate",
        f"checkpoint={hub_shaped['checkpoint']}",
        *THREADS,
        f"paths.data_dir={written.root}",
        "fid=tiny",
        "eval.device=cpu",
        "eval.num_samples=8",
        "eval.batch_size=4",
        "eval.is_splits=2",
        "eval.precision_recall=false",
        "sampler=ddim",
        "sampler.steps=3",
        f"hydra.run.dir={tmp_path / 'run'}",
    )
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["num_samples"] == 8 and math.isfinite(metrics["fid"])
