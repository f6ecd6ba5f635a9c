"""The switches that make a training step fast (mixed precision, channels_last, torch.compile, data kept on the
device), resolved to one decision each for the device at hand. The fused optimizer is `optimizer.fused`.

Every switch is a `trainer.*` key whose `auto`/null value picks what pays on that device: all of them on a GPU;
on a CPU, eager mode in the NCHW layout, with bf16 autocast only where the processor multiplies bf16 matrices
natively (AMX-BF16 or AVX512-BF16); elsewhere oneDNN emulates bf16 and it is slower than fp32.
"""

import contextlib
import dataclasses
import logging
import shutil

import torch
from torch import nn

from ddpm.config.errors import ConfigError

log = logging.getLogger(__name__)

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


@dataclasses.dataclass(frozen=True)
class FastPaths:
    """What one training process does, after `auto` has been resolved for its device."""

    precision: str = "fp32"  # fp32 | bf16 | fp16: the autocast dtype of the network's forward and backward
    channels_last: bool = False  # NHWC weights and activations (the layout tensor cores' convolutions use)
    compile: bool = False  # torch.compile the network (and the EMA copy that samples)
    data_on_device: bool = False  # the whole training split on the device, batches gathered and flipped there

    def describe(self) -> str:
        return ", ".join(f"{field.name}={getattr(self, field.name)}" for field in dataclasses.fields(self))


# The CPU features (torch.cpu.get_capabilities() names) whose bf16 matrix instructions make bf16 autocast pay.
CPU_BF16_UNITS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16"}


def cpu_capabilities() -> dict:
    """What torch detected about this processor (torch >= 2.8 reports it; older versions report nothing)."""
    report = getattr(torch.cpu, "get_capabilities", None)
    return dict(report()) if report else {}


def automatic_precision(device: torch.device) -> tuple[str, str]:
    """What `auto` means on `device`, and why: bf16 where the hardware multiplies bf16 natively, else fp32."""
    if device.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", f"{torch.cuda.get_device_name(device)} has bf16 tensor cores"
        return "fp32", f"{torch.cuda.get_device_name(device)} has no bf16"
    capabilities = cpu_capabilities()
    units = [name for feature, name in CPU_BF16_UNITS.items() if capabilities.get(feature)]
    if units:
        return "bf16", f"the CPU has {' and '.join(units)} (bf16 matrix instructions)"
    if not capabilities:
        return "fp32", f"torch {torch.__version__} does not report the CPU's features"
    return "fp32", "the CPU has neither AMX-BF16 nor AVX512-BF16, so bf16 would be emulated (slower than fp32)"


def resolve_precision(key: str, precision: str, device: torch.device) -> str:
    """The one precision check, for trainer.precision, sample.precision and eval.precision: `auto` -> the
    device's choice (automatic_precision, logged with its reason); a choice the device cannot do is a
    ConfigError naming `key`."""
    if precision not in PRECISIONS:
        raise ConfigError(f"{key}={precision!r} is not one of {list(PRECISIONS)}")
    cuda = device.type == "cuda"
    if precision == "auto":
        precision, reason = automatic_precision(device)
        log.info("%s=auto -> %s: %s", key, precision, reason)
    if precision == "fp16" and not cuda:
        raise ConfigError(
            f"{key}=fp16 needs a CUDA device (float16 autocast on CPU is slow and unscaled); use bf16 or fp32"
        )
    return precision


def resolve_fast_paths(
    *,
    device: torch.device,
    precision: str = "auto",
    channels_last: bool | None = None,
    compile: bool | None = None,
    data_on_device: bool | None = None,
) -> FastPaths:
    """`auto`/None -> the device's default; an explicit choice the device cannot do is a ConfigError."""
    cuda = device.type == "cuda"
    precision = resolve_precision("trainer.precision", precision, device)
    if compile and not cuda and shutil.which("g++") is None and shutil.which("c++") is None:
        raise ConfigError("trainer.compile=true on CPU needs a C++ compiler (g++) for torch.compile's kernels")
    return FastPaths(
        precision=precision,
        channels_last=cuda if channels_last is None else channels_last,
        compile=cuda if compile is None else compile,
        data_on_device=cuda if data_on_device is None else data_on_device,
    )


def autocast(precision: str, device: torch.device | str) -> contextlib.AbstractContextManager:
    """A forward pass's mixed-precision context for a resolved precision (a no-op at fp32)."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(torch.device(device).type, dtype=AUTOCAST_DTYPES[precision])


def grad_scaler(fast: FastPaths, device: torch.device) -> torch.amp.GradScaler:
    """fp16 gradients underflow without loss scaling; bf16 and fp32 need none (a disabled scaler is a no-op)."""
    return torch.amp.GradScaler(device.type, enabled=fast.precision == "fp16")


def memory_format(fast: FastPaths) -> torch.memory_format:
    return torch.channels_last if fast.channels_last else torch.contiguous_format


def prepare_network(network: nn.Module, fast: FastPaths) -> nn.Module:
    """Puts the weights in the chosen layout and compiles the module in place (its state_dict keys stay
    the same, so checkpoints do not depend on the switch)."""
    network.to(memory_format=memory_format(fast))
    if fast.compile:
        network.compile()
    return network


def prepare_diffusion(diffusion: nn.Module, fast: FastPaths) -> None:
    """prepare_network for the trained network and for its EMA copy, the one that samples: once per task.

    Compiling starts from a clean dynamo cache. Every UNet shares one cache, on the code of UNet.forward, with a
    limit of recompilations: the jobs of an in-process sweep (a local multirun over model.base_channels, a test
    session, a notebook) would reach it by the second or third job and then run eagerly with only a warning."""
    if fast.compile:
        import torch._dynamo  # a second of start-up that only compiling needs

        torch._dynamo.reset()
    prepare_network(diffusion.model, fast)
    if getattr(diffusion, "ema", None) is not None:
        prepare_network(diffusion.ema.module, fast)


def prepare_for_sampling(
    diffusion: nn.Module, *, device: torch.device, precision: str, compile: bool | None, key: str
) -> str:
    """Readies the network that samples (the EMA copy, or the raw one) for the fast paths of a sampling task;
    returns the precision to pass to `diffusion.sample`. `key` is the config node, for the error messages."""
    precision = resolve_precision(f"{key}.precision", precision, device)
    cuda = device.type == "cuda"
    prepare_diffusion(
        diffusion, FastPaths(precision=precision, channels_last=cuda, compile=cuda if compile is None else compile)
    )
    return precision
