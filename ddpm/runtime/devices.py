"""Which device a task runs on (`trainer.device`, `sample.device`, ...), and how its kernels are configured."""

import torch

from ddpm.config.errors import ConfigError


def resolve_device(name: str, key: str = "trainer.device") -> torch.device:
    """'auto' -> CUDA when present, else CPU; anything else must name an available device. `key` is the
    config key that holds `name`, for the error messages."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    refusal = f"{key}={name!r} is not a device this project runs on: use auto, cpu, cuda or cuda:N"
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as error:
        raise ConfigError(refusal) from error
    if device.type not in ("cpu", "cuda"):  # mps, meta, xpu, ...: untested here, or (meta) without data at all
        raise ConfigError(refusal)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"{key}={name!r}, but CUDA is not available here: use auto or cpu")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ConfigError(f"{key}={name!r}, but only {torch.cuda.device_count()} GPU(s) are visible here")
    return device


def configure_backends(device: torch.device, deterministic: bool) -> None:
    """TF32 matmuls for the fp32 parts of a step and cuDNN's autotuner; or, with `deterministic`, deterministic
    kernels only, which is what makes a resumed GPU run bit-identical to an uninterrupted one (cuBLAS's workspace
    setting for them is made when ddpm is imported: cuBLAS reads it once). CPU kernels are deterministic already."""
    if torch.are_deterministic_algorithms_enabled() != deterministic:  # setting it imports torch._inductor (seconds)
        torch.use_deterministic_algorithms(deterministic)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = not deterministic
