"""diffusers' weights read as this project's: a UNet2DModel's state dict (safetensors or a tensors-only .bin)
mapped tensor by tensor onto this UNet's, with every shape checked and every tensor used once."""

import pickle
from pathlib import Path

import torch
from torch import nn

from ddpm.config.errors import ConfigError

WEIGHT_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")


# Our residual block's parameters by diffusers' ResnetBlock2D names.
RESNET_NAMES = {
    "norm_1": "norm1",
    "conv_1": "conv1",
    "time_bias": "time_emb_proj",
    "norm_2": "norm2",
    "conv_2": "conv2",
    "skip": "conv_shortcut",
}
# diffusers' attention projections: the current names, then those of the checkpoints published before diffusers
# 0.14 (the google/ddpm-* ones), which diffusers itself still renames on load.
ATTENTION_NAMES = {
    "q": ("to_q", "query"),
    "k": ("to_k", "key"),
    "v": ("to_v", "value"),
    "out": ("to_out.0", "proj_attn"),
}


def read_weights(model_dir: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """The state dict in diffusion_pytorch_model.safetensors (read with the safetensors package) or .bin (with
    torch.load(weights_only=True): no code in the file runs)."""
    found = [model_dir / name for name in WEIGHT_FILES if (model_dir / name).is_file()]
    if not found:
        raise ConfigError(
            f"import.source: {model_dir} holds config.json but no {' or '.join(WEIGHT_FILES)} "
            f"(it holds {sorted(p.name for p in model_dir.iterdir())[:8]})"
        )
    path = found[0]
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file
        except ImportError as error:
            if len(found) > 1:
                path = found[1]
            else:
                raise ConfigError(
                    f"import.source: {path} needs the safetensors package to be read: pip install safetensors"
                ) from error
    try:
        if path.suffix == ".safetensors":
            state = load_file(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConfigError(
            f"import.source: {path} holds objects other than tensors, which are not loaded (loading "
            "them could run code from the file)"
        ) from error
    except Exception as error:
        reason = next(iter(str(error).splitlines()), "") or type(error).__name__
        raise ConfigError(
            f"import.source: {path} is not a readable weights file (truncated or damaged?): {reason}"
        ) from error
    if not isinstance(state, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in state.items()
    ):
        raise ConfigError(f"import.source: {path} does not hold a state dict (names and tensors)")
    return path, state


def module_pairs(
    levels: int, layers: int, down_attention: list[int], up_attention: list[int]
) -> list[tuple[str, str, str]]:
    """(our module, diffusers' module, kind) for every module with weights; kind is "resnet", "attention" or
    "plain" (weight and bias under the same names)."""
    pairs = [
        ("time_mlp.0", "time_embedding.linear_1", "plain"),
        ("time_mlp.2", "time_embedding.linear_2", "plain"),
        ("init_conv", "conv_in", "plain"),
    ]
    for level in range(levels):
        for j in range(layers):
            pairs.append((f"down.{level}.blocks.{j}", f"down_blocks.{level}.resnets.{j}", "resnet"))
            if level in down_attention:
                pairs.append((f"down.{level}.blocks.{j}.attention", f"down_blocks.{level}.attentions.{j}", "attention"))
        if level < levels - 1:
            pairs.append((f"down.{level}.resample.conv", f"down_blocks.{level}.downsamplers.0.conv", "plain"))
    pairs += [
        ("middle.0", "mid_block.resnets.0", "resnet"),
        ("middle.0.attention", "mid_block.attentions.0", "attention"),
        ("middle.1", "mid_block.resnets.1", "resnet"),
    ]
    for i in range(levels):  # both up paths run from the lowest resolution up
        for j in range(layers + 1):
            pairs.append((f"up.{i}.blocks.{j}", f"up_blocks.{i}.resnets.{j}", "resnet"))
            if levels - 1 - i in up_attention:
                pairs.append((f"up.{i}.blocks.{j}.attention", f"up_blocks.{i}.attentions.{j}", "attention"))
        if i < levels - 1:
            pairs.append((f"up.{i}.resample.conv", f"up_blocks.{i}.upsamplers.0.conv", "plain"))
    pairs += [("out_norm", "conv_norm_out", "plain"), ("out_conv", "conv_out", "plain")]
    return pairs


class WeightMapping:
    """Our state dict from diffusers' one: every tensor of ours from exactly the tensors it corresponds to, every
    one of theirs used once, every shape checked; the errors name diffusers' tensor and what was expected."""

    def __init__(self, source: dict[str, torch.Tensor], path: Path):
        self.source, self.path, self.used = source, path, set()

    def take(self, name: str, shape: tuple[int, ...], ours: str) -> torch.Tensor:
        """Their tensor `name`, which must have `shape`; `ours` names the tensor it becomes, for the messages."""
        if name not in self.source:
            raise ConfigError(
                f"import.source: {self.path} has no tensor {name}, which the architecture of config.json "
                f"has ({ours} here): the weights are not those of that config"
            )
        tensor = self.source[name]
        if tuple(tensor.shape) != shape or not tensor.is_floating_point():
            raise ConfigError(
                f"import.source: {self.path}: {name} is a {tensor.dtype} tensor of shape "
                f"{list(tensor.shape)}, but the architecture of config.json needs a floating-point one "
                f"of shape {list(shape)} ({ours} here)"
            )
        self.used.add(name)
        return tensor

    def spelled(self, module: str, names: tuple[str, ...], parameter: str) -> str:
        """An attention projection's name as this file spells it (the current spelling when none is present)."""
        candidates = [f"{module}.{name}.{parameter}" for name in names]
        return next((c for c in candidates if c in self.source), candidates[0])

    def convert(self, ours: str, relative: str, theirs: str, kind: str, target: torch.Tensor) -> torch.Tensor:
        """Our tensor `ours` (`relative` to its module), of `target`'s shape, from diffusers' module `theirs`
        (`kind`: see module_pairs)."""
        module, _, parameter = relative.rpartition(".")
        shape = tuple(target.shape)
        if kind == "plain":
            return self.take(f"{theirs}.{parameter}", shape, ours)
        if kind == "resnet":
            return self.take(f"{theirs}.{RESNET_NAMES[module]}.{parameter}", shape, ours)
        # Attention: our norm is their group_norm; our 1x1 convolutions to_qkv (q, k and v stacked) and to_out are
        # their linear layers.
        if module == "norm":
            return self.take(f"{theirs}.group_norm.{parameter}", shape, ours)
        parts = ("q", "k", "v") if module == "to_qkv" else ("out",)
        channels = target.shape[0] // len(parts)
        part_shape = (channels, channels) if parameter == "weight" else (channels,)
        tensors = [self.take(self.spelled(theirs, ATTENTION_NAMES[p], parameter), part_shape, ours) for p in parts]
        return torch.cat(tensors).reshape(shape)

    def state_dict(self, model: nn.Module, pairs: list[tuple[str, str, str]]) -> dict[str, torch.Tensor]:
        """Every tensor of `model`'s state dict, converted; their tensors left over are an error."""
        by_length = sorted(pairs, key=lambda pair: -len(pair[0]))  # "blocks.0.attention" before "blocks.0"
        converted = {}
        for name, target in model.state_dict().items():
            module, theirs, kind = next(p for p in by_length if name.startswith(p[0] + "."))
            tensor = self.convert(name, name[len(module) + 1 :], theirs, kind, target)
            converted[name] = tensor.to(target.dtype).contiguous()
        unused = sorted(set(self.source) - self.used)
        if unused:
            raise ConfigError(
                f"import.source: {self.path} holds {len(unused)} tensor(s) that the architecture of "
                f"config.json has no place for: {', '.join(unused[:4])}{' ...' if len(unused) > 4 else ''}"
            )
        return converted
