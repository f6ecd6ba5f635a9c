"""Measuring speed: FLOPs per image, the device's peak, and timers that wait for the device.

Used by `task=benchmark`; the numbers are only meaningful relative to each other on one machine.
"""

import math
import resource
import sys
import time
from collections.abc import Callable

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

# Dense peaks in TFLOP/s from the vendors' data sheets, by a substring of torch.cuda.get_device_name().
# "tf32" is what fp32 matmuls and convolutions run at once TF32 is allowed (ddpm.runtime.fast_paths allows it).
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"bf16": 756.0, "fp16": 756.0, "fp32": 378.0},
    "H100": {"bf16": 989.4, "fp16": 989.4, "fp32": 494.7},
    "A100": {"bf16": 312.0, "fp16": 312.0, "fp32": 156.0},
    "L40S": {"bf16": 362.1, "fp16": 362.1, "fp32": 183.2},
    "A10G": {"bf16": 70.0, "fp16": 70.0, "fp32": 35.0},
    "V100": {"fp16": 125.0, "fp32": 15.7},
}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"CPU ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def peak_tflops(device: torch.device, precision: str) -> float | None:
    """The device's dense peak at `precision`, where the table knows the device; None otherwise (CPUs)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, peaks in PEAK_TFLOPS.items():  # the more specific names come first
        if key in name:
            return peaks.get(precision)
    return None


def count_flops(function: Callable[[], object]) -> int:
    """Floating-point operations of one call of `function` (matmuls and convolutions; what FLOP counts mean).

    Attention runs through its math kernel here: the flop counter does not see inside the CPU flash kernel.
    """
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        function()
    return counter.get_total_flops()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_calls(
    function: Callable[[], object],
    device: torch.device,
    *,
    warmup: int,
    calls: int,
    max_seconds: float,
    warmup_seconds: float = math.inf,
    min_calls: int = 2,
) -> tuple[float, int]:
    """Seconds per call of `function` after `warmup` untimed calls (fewer, but at least one, once they have taken
    `warmup_seconds`), over `calls` calls or fewer (at least `min_calls`) when they would exceed `max_seconds`;
    and how many calls were timed. The device is drained before each clock read."""
    start = time.perf_counter()
    for _ in range(warmup):
        function()
        if time.perf_counter() - start > warmup_seconds:
            break
    synchronize(device)
    start = time.perf_counter()
    done = 0
    while done < calls:
        function()
        done += 1
        if done >= min_calls and time.perf_counter() - start > max_seconds:
            break
    synchronize(device)
    return (time.perf_counter() - start) / done, done


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """Peak memory allocated on a GPU since the last reset; on CPU, the process's peak resident memory."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**30 if sys.platform == "darwin" else peak / 2**20  # bytes on macOS, KiB on Linux
