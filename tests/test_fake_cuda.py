"""The CUDA paths run on fake CUDA tensors, without a GPU: torch's FakeTensorMode gives every tensor a device,
dtype, shape and strides, and runs each operator's meta function (autocast's casts, device checks, layout
propagation) without running a kernel. A read of a device value on the host has no value to read there: fake
mode raises, and the `DeviceWatch` below names the line of ddpm that read (a scalar, a data-dependent shape,
or a copy to the host).

What fake mode cannot show, whatever the test: numbers (no kernel runs, so no NaN, no overflow, no wrong
result), speed, and whether a real kernel accepts what its meta function accepts (the fused Adam kernel, for
one, checks strides on CUDA that its meta function does not: the layout tests assert strides themselves).

What the tests patch, because fake mode or a machine without a driver cannot do it:
- `torch.cuda.amp.common.amp_definitely_not_available` and `torch.cuda.is_bf16_supported`: torch.autocast and
  GradScaler on "cuda" turn themselves off without a driver; the device is taken to have bf16 (A100, H100).
- `Tensor.backward`: the autograd engine asks the driver for the device's context. Each leaf that the loss's
  graph reaches gets a gradient of its own shape, dtype and strides, as AccumulateGrad gives it. Not caught:
  what the backward kernels compute or which dtype they run in.
- `torch.Generator(device)`: a CUDA generator needs a driver. A CPU generator stands in and remembers the device
  asked for. Not caught: a generator of the wrong device handed to a random function (fake mode does not check).
- `Tensor.pin_memory`: fake mode has no pinning; the tensor is recorded and returned as it is.
- The CPU-side batch order (EpochOrder), the samplers' schedule as floats, and the host's random states that a
  checkpoint saves and restores are computed outside fake mode: they read CPU tensors on the host by design
  (the schedule once per sampling call, before the first step).
- Moving weights into the channels_last layout (prepare_diffusion) happens on the CPU before the move to the
  fake device, where a fake parameter cannot be swapped in place: the same weights, layouts and optimizer.
"""

import contextlib
import dataclasses
import functools
import importlib
import traceback
from collections import Counter
from pathlib import Path

import pytest
import torch
from conftest import TINY_QUICKSTART, compose_config
from torch import nn
from torch._subclasses.fake_tensor import FakeTensorMode, unset_fake_temporarily
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import ddpm
from ddpm.config.validation import build_settings
from ddpm.data.device import DeviceBatches, InMemoryImages
from ddpm.data.loader import EpochOrder
from ddpm.diffusion.build import build_diffusion
from ddpm.diffusion.samplers import ddim, ddpm_ancestral, dpm_solver
from ddpm.io.checkpoint import load_checkpoint
from ddpm.runtime.fast_paths import FastPaths, prepare_diffusion, prepare_for_sampling
from ddpm.runtime.rng import capture_rng_state, restore_rng_state, seed_everything
from ddpm.training.loop import train
from ddpm.training.optimizer import build_optimizer
from ddpm.training.setup import build_training
from ddpm.training.update import UpdateStep

CUDA = torch.device("cuda")
AUTOCAST = {"bf16": torch.bfloat16, "fp16": torch.float16}
PACKAGE = Path(ddpm.__file__).resolve().parent
aten = torch.ops.aten
# Operators that hand a device value to the host: the step waits for the device there.
HOST_READS = {aten._local_scalar_dense, aten.is_nonzero, aten.nonzero, aten.equal, aten.masked_select, aten._unique2}


class HostRead(AssertionError):
    """A value on the device was read on the host where nothing may wait for the device."""


def ddpm_line() -> str:
    """The innermost line of ddpm on the call stack: where a host read came from."""
    for frame in reversed(traceback.extract_stack()):
        path = Path(frame.filename).resolve()
        if PACKAGE in path.parents:
            return f"{path.relative_to(PACKAGE.parent)}:{frame.lineno} ({frame.line})"
    return "outside ddpm"


def reads_on_host(func, args, kwargs) -> bool:
    tensors = [a for a in tree_leaves((args, kwargs)) if isinstance(a, torch.Tensor)]
    if not any(t.device.type == "cuda" for t in tensors):
        return False
    if func.overloadpacket in HOST_READS:
        return True
    if func is aten._to_copy.default:  # x.cpu(), x.to("cpu")
        return kwargs.get("device") is not None and torch.device(kwargs["device"]).type == "cpu"
    return func is aten.copy_.default and args[0].device.type == "cpu"  # cpu_tensor.copy_(cuda_tensor)


class DeviceWatch(TorchDispatchMode):
    """Sees every operator on its way to fake mode: counts those on CUDA tensors, keeps the fused optimizer
    steps' arguments, and records each host read of a device value with the line of ddpm that made it; a read
    while `strict` raises HostRead at once."""

    def __init__(self):
        super().__init__()
        self.strict = True
        self.reads: list[tuple[bool, str, str]] = []  # (strict, operator, where)
        self.ops: Counter[str] = Counter()
        self.fused_steps: list[dict] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if any(isinstance(a, torch.Tensor) and a.device.type == "cuda" for a in tree_leaves((args, kwargs))):
            self.ops[func.overloadpacket.__name__] += 1
        if func.overloadpacket in (aten._fused_adam_, aten._fused_adamw_):
            self.fused_steps.append(kwargs)
        if reads_on_host(func, args, kwargs):
            where = ddpm_line()
            self.reads.append((self.strict, str(func), where))
            if self.strict:
                raise HostRead(f"{func} reads a CUDA value on the host at {where}")
        return func(*args, **kwargs)

    def step_reads(self) -> list[tuple[str, str]]:
        return [(op, where) for strict, op, where in self.reads if strict]


class CpuGeneratorStandIn(torch.Generator):
    """torch.Generator(device) on a machine without a driver: a CPU generator that remembers the device."""

    def __new__(cls, device="cpu"):
        generator = super().__new__(cls, "cpu")
        generator.asked = torch.device(device)
        return generator

    def __init__(self, device="cpu"):
        pass


def graph_leaves(tensor: torch.Tensor) -> list[torch.Tensor]:
    """The leaves (parameters) whose gradients backward() from `tensor` would accumulate."""
    seen, stack, leaves = set(), [tensor.grad_fn], []
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if hasattr(node, "variable"):  # AccumulateGrad
            leaves.append(node.variable)
        stack.extend(next_node for next_node, _ in node.next_functions)
    return leaves


def fake_backward(self, gradient=None, retain_graph=None, create_graph=False, inputs=None):
    """Tensor.backward on fake CUDA tensors: every leaf reached gets a gradient laid out as its weight."""
    assert self.device.type == "cuda" and self.dim() == 0, "backward from a scalar loss on the device"
    for leaf in graph_leaves(self):
        grad = torch.empty_like(leaf)  # AccumulateGrad's layout contract: the parameter's strides
        leaf.grad = grad if leaf.grad is None else leaf.grad + grad


def epoch_order_on_the_host(original):
    """EpochOrder's batches, computed on real CPU tensors (it reads them on the host by design)."""

    @functools.wraps(original)
    def batches(self):
        stream = original(self)
        while True:
            with unset_fake_temporarily():
                item = next(stream)
            yield item

    return batches


def outside_fake_mode(function):
    @functools.wraps(function)
    def on_real_tensors(*args, **kwargs):
        with unset_fake_temporarily():
            return function(*args, **kwargs)

    return on_real_tensors


@dataclasses.dataclass
class FakeCuda:
    mode: FakeTensorMode
    watch: DeviceWatch
    pinned: list[torch.device]


@pytest.fixture(autouse=True)
def host_random_streams_kept():
    """The tests seed and restore the process's random streams: later tests find them as they were."""
    state = capture_rng_state()
    yield
    restore_rng_state(state)


def patch_fake_cuda(monkeypatch) -> FakeCuda:
    """A fake mode that makes CUDA tensors, with the patches the module docstring lists (undone with
    `monkeypatch`)."""
    pinned: list[torch.device] = []

    def pin_memory(self, device=None):
        pinned.append(self.device)
        return self

    monkeypatch.setattr(torch.cuda.amp.common, "amp_definitely_not_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    monkeypatch.setattr(torch.Tensor, "backward", fake_backward)
    monkeypatch.setattr(torch, "Generator", CpuGeneratorStandIn)
    monkeypatch.setattr(torch.Tensor, "pin_memory", pin_memory)
    monkeypatch.setattr(EpochOrder, "__iter__", epoch_order_on_the_host(EpochOrder.__iter__))
    return FakeCuda(FakeTensorMode(allow_non_fake_inputs=True), DeviceWatch(), pinned)


def tiny_config(device: str, precision: str, *overrides: str):
    """The tiny quickstart at 8x8 for `device`, two steps, nothing logged, sampled or checkpointed on the way."""
    return compose_config(
        *TINY_QUICKSTART,
        "dataset.image_size=8",
        "dataset.channels=3",  # one channel would be channels_last and NCHW at once
        "schedule.num_timesteps=50",
        f"trainer.device={device}",
        f"trainer.precision={precision}",
        "trainer.compile=false",
        "trainer.batch_size=4",
        "trainer.iterations=2",
        "trainer.log_rate=0",
        "trainer.checkpoint_rate=0",
        "trainer.sample_at_end=false",
        "trainer.label_dropout=0.1",
        "trainer.ema_start=2",  # step 1 copies the weights, step 2 averages
        *overrides,
    )


def device_images() -> InMemoryImages:
    """Twelve 3x8x8 uint8 images (CIFAR-10's kind: scaled and flipped on the device)."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (12, 3, 8, 8), dtype=torch.uint8, generator=generator)
    return InMemoryImages(images, torch.arange(12) % 10, random_flip=True)


def build_cuda_run(cfg, fake: FakeCuda, run_dir: Path, resume=None):
    """What task=train builds for a CUDA device, the fast paths resolved for it (called in fake mode): the
    diffusion and optimizer, batches held on the device, the loop's parts."""
    settings = build_settings(cfg.trainer)
    fast = settings.fast_paths(CUDA)
    assert fast == FastPaths(precision=cfg.trainer.precision, channels_last=True, compile=False, data_on_device=True)
    with unset_fake_temporarily():
        seed_everything(settings.seed)
        diffusion = build_diffusion(cfg)
        prepare_diffusion(diffusion, fast)  # channels_last (see the module docstring)
    diffusion.to(CUDA)
    optimizer = build_optimizer(cfg, diffusion.model.parameters())
    batches = DeviceBatches(device_images(), settings.batch_size, seed=settings.seed, device=CUDA)
    parts = build_training(
        diffusion, optimizer, batches, settings, fast=fast, device=CUDA, run_dir=run_dir, config={}, resume=resume
    )
    return settings, diffusion, optimizer, parts


def record_steps(monkeypatch) -> list[tuple[tuple, object]]:
    """(inputs, StepResult) of every UpdateStep call."""
    steps = []
    update = UpdateStep.__call__

    def recorded(self, *inputs):
        result = update(self, *inputs)
        steps.append((inputs, result))
        return result

    monkeypatch.setattr(UpdateStep, "__call__", recorded)
    return steps


@contextlib.contextmanager
def output_dtypes(module: nn.Module):
    """{"network": dtypes of module's outputs, "Conv2d"/"Linear": dtypes of its layers' outputs}."""
    seen: dict[str, set[torch.dtype]] = {"network": set(), "Conv2d": set(), "Linear": set()}
    hooks = [module.register_forward_hook(lambda m, i, out: seen["network"].add(out.dtype))]
    for layer in module.modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            kind = type(layer).__name__
            hooks.append(layer.register_forward_hook(lambda m, i, out, kind=kind: seen[kind].add(out.dtype)))
    try:
        yield seen
    finally:
        for hook in hooks:
            hook.remove()


def assert_adam_state_on_the_device_in_the_weights_layout(optimizer: torch.optim.Optimizer) -> None:
    for group in optimizer.param_groups:
        assert group["fused"], "optimizer.fused=null builds the fused Adam"
        for param in group["params"]:
            state = optimizer.state[param]
            assert param.device.type == "cuda"
            assert state["step"].device.type == "cuda" and state["step"].dtype == torch.float32  # fused: on device
            for name in ("exp_avg", "exp_avg_sq"):
                moment = state[name]
                assert (moment.device.type, moment.dtype) == ("cuda", torch.float32), name
                assert moment.stride() == param.stride(), f"{name} {moment.stride()} vs weight {param.stride()}"


def conv_weights(module: nn.Module) -> list[torch.Tensor]:
    return [layer.weight for layer in module.modules() if isinstance(layer, nn.Conv2d)]


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_cuda_training_steps_stay_on_the_device_under_autocast_with_no_host_read(precision, monkeypatch, tmp_path):
    """Two steps of the training loop (train(), as task=train builds it for CUDA: batches held on the device,
    the global-batch noise stream, autocast, fp16's grad scaler, clipping, fused Adam with found_inf, the EMA,
    the loop's on-device sums): no host read of a device value; every tensor on CUDA; the convolutions and
    linear layers (and the network's output) in the autocast dtype; Adam's moments on CUDA in the weights'
    channels_last layout. Not caught (fake mode): the backward pass (patched, see the module docstring), a
    generator of the wrong device handed to a random function, and the numbers themselves (an overflow that the
    scaler should skip, a NaN that found_inf should keep from the weights)."""
    monkeypatch.setattr("ddpm.training.loop.finish", lambda parts, settings, metrics, started: {})  # host reads
    steps = record_steps(monkeypatch)
    cfg = tiny_config("cuda", precision)
    fake_cuda = patch_fake_cuda(monkeypatch)
    watch = fake_cuda.watch
    with fake_cuda.mode:
        settings, diffusion, optimizer, parts = build_cuda_run(cfg, fake_cuda, tmp_path)
        with parts, output_dtypes(diffusion.model) as dtypes, watch:
            train(parts, settings)

    assert watch.step_reads() == []
    assert len(steps) == settings.iterations and parts.loop.step == settings.iterations
    # Batches, noise, timesteps and labels: drawn on the device, images and noise in the weights' layout.
    assert parts.batches.images.device.type == "cuda" and parts.batches.labels.device.type == "cuda"
    assert parts.noise.generator.asked.type == "cuda"
    assert fake_cuda.pinned and set(fake_cuda.pinned) == {torch.device("cpu")}  # indices and flips, pinned
    for (x, labels, t, noise), result in steps:
        assert (x.device.type, x.dtype) == ("cuda", torch.float32) and x.is_contiguous(
            memory_format=torch.channels_last
        )
        assert noise.device.type == "cuda" and noise.is_contiguous(memory_format=torch.channels_last)
        assert (t.device.type, t.dtype, labels.device.type, labels.dtype) == ("cuda", torch.long, "cuda", torch.long)
        assert (result.loss.device.type, result.loss.dtype) == ("cuda", torch.float32)
        assert result.grad_norm.device.type == "cuda"
        assert (result.applied.device.type, result.applied.dtype) == ("cuda", torch.bool)
        assert (result.fault.device.type, result.fault.dtype) == ("cuda", torch.bool)
    # Autocast: the layers ran in its dtype.
    assert dtypes == {
        "network": {AUTOCAST[precision]},
        "Conv2d": {AUTOCAST[precision]},
        "Linear": {AUTOCAST[precision]},
    }
    # The update: fp16's scaler on the device; the fused Adam stepped once a step, skipping on the device.
    scaler = parts.update.scaler
    assert scaler.is_enabled() == (precision == "fp16") and parts.update.skips_on_device
    if precision == "fp16":
        assert scaler._scale.device.type == "cuda" and scaler._growth_tracker.device.type == "cuda"
        assert watch.ops["_amp_foreach_non_finite_check_and_unscale_"] == 2 and watch.ops["_amp_update_scale_"] == 2
    assert len(watch.fused_steps) == settings.iterations
    for kwargs in watch.fused_steps:  # found_inf keeps a non-finite step from the weights, on the device
        assert kwargs.get("found_inf") is not None and kwargs["found_inf"].device.type == "cuda", kwargs.keys()
        assert kwargs.get("grad_scale") is None  # fp16: unscaled before clipping
    assert watch.ops["_foreach_norm"] >= 2  # clipping, on the device
    # Weights, gradients and Adam's state on the device, in the weights' layout (channels_last).
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert [id(p) for p in params] == [id(p) for p in diffusion.model.parameters()]
    assert all(p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights(diffusion.model))
    for param in params:
        assert param.grad is not None and param.grad.device.type == "cuda" and param.grad.stride() == param.stride()
    assert_adam_state_on_the_device_in_the_weights_layout(optimizer)
    # The EMA: counted every step, copied then averaged on the device, in the same layout.
    ema = diffusion.ema
    assert ema.num_updates == settings.iterations
    assert watch.ops["_foreach_copy_"] >= 1 and watch.ops["_foreach_lerp_"] >= 1
    assert all(t.device.type == "cuda" for t in [*ema.module.parameters(), *ema.module.buffers()])
    assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(ema.module))
    # The loop's running sums and the fault counters stay on the device until a log reads them.
    for tensor in (parts.loop.loss_sum, parts.loop.grad_norm_sum, parts.loop.good_steps):
        assert tensor.device.type == "cuda"
    assert parts.nonfinite.faults.device.type == "cuda" and parts.nonfinite.last_fault_step.device.type == "cuda"


def test_the_watch_names_the_host_read_of_a_for_loop_optimizer(monkeypatch, tmp_path):
    """The check above can fail: a for-loop Adam (optimizer.fused=false) decides a non-finite step on the host,
    and the watch stops that step at the line that reads."""
    monkeypatch.setattr("ddpm.training.loop.finish", lambda parts, settings, metrics, started: {})
    cfg = tiny_config("cuda", "bf16", "optimizer.fused=false")
    fake_cuda = patch_fake_cuda(monkeypatch)
    with fake_cuda.mode:
        settings, _, _, parts = build_cuda_run(cfg, fake_cuda, tmp_path)
        assert not parts.update.skips_on_device
        with parts, fake_cuda.watch, pytest.raises(HostRead, match=r"ddpm/training/update\.py:\d+ \(elif bool\("):
            train(parts, settings)


SAMPLERS = {
    "ddpm-respaced": functools.partial(ddpm_ancestral, steps=2),
    "ddim-stochastic": functools.partial(ddim, steps=2, eta=1.0),
    "dpm-solver-2m": functools.partial(dpm_solver, steps=3),
}


@pytest.mark.parametrize(
    "sampler, precision", [("ddpm-respaced", "bf16"), ("ddim-stochastic", "fp16"), ("dpm-solver-2m", "bf16")]
)
def test_sampling_steps_on_the_device_under_autocast_with_no_host_read_per_step(sampler, precision, monkeypatch):
    """diffusion.sample on CUDA (the EMA network prepared for sampling as task=sample prepares it, labels,
    autocast): every network call gets its images, timesteps and labels on CUDA, its layers run in the autocast
    dtype, the sampler's arithmetic stays float32 on CUDA, and nothing is read on the host after the first
    network call (the schedule, read once before it, is computed outside fake mode). Not caught (fake mode):
    the values (a sampler's formula), and a generator of the wrong device (none is passed here)."""
    cfg = tiny_config("cuda", precision)
    fake_cuda = patch_fake_cuda(monkeypatch)
    diffusion = build_diffusion(cfg)
    assert prepare_for_sampling(diffusion, device=CUDA, precision=precision, compile=False, key="sample") == precision
    schedule = diffusion.betas.clone()
    schedule_reads = []

    def alphas_cumprod_list(betas):
        schedule_reads.append(betas.device.type)
        with unset_fake_temporarily():
            return samplers_common.alphas_cumprod_list(schedule)

    samplers_common = importlib.import_module("ddpm.diffusion.samplers.common")
    for name in ("ancestral", "implicit", "multistep"):
        module = importlib.import_module(f"ddpm.diffusion.samplers.{name}")
        monkeypatch.setattr(module, "alphas_cumprod_list", alphas_cumprod_list)

    watch, calls = fake_cuda.watch, []

    def network_call(module, args):
        watch.strict = True  # from the first network call on, nothing may be read on the host
        calls.append(args)

    watch.strict = False
    with fake_cuda.mode:
        diffusion.to(CUDA)
        network = diffusion.ema.module
        assert all(w.is_contiguous(memory_format=torch.channels_last) for w in conv_weights(network))
        hook = network.register_forward_pre_hook(network_call)
        labels = torch.tensor([3, 7], device=CUDA)
        with output_dtypes(network) as dtypes, watch:
            images = diffusion.sample(2, CUDA, labels, sampler=SAMPLERS[sampler], precision=precision)
        hook.remove()

    assert watch.step_reads() == []
    assert len(watch.reads) == 1, watch.reads  # the denoiser's copy of the schedule to the host, before the steps
    assert schedule_reads == ["cuda"]  # the sampler's, once, before the steps too
    assert len(calls) == SAMPLERS[sampler].keywords["steps"]
    for x, t, y in calls:
        assert (x.device.type, x.dtype, x.shape) == ("cuda", torch.float32, (2, 3, 8, 8))
        assert (t.device.type, t.dtype, y.device.type) == ("cuda", torch.long, "cuda")
    assert dtypes == {
        "network": {AUTOCAST[precision]},
        "Conv2d": {AUTOCAST[precision]},
        "Linear": {AUTOCAST[precision]},
    }
    assert (images.device.type, images.dtype, images.shape) == ("cuda", torch.float32, (2, 3, 8, 8))


# LoopState.state_dict deep-copies its device sums (dataclasses.asdict) before taking them to the host; a deep
# copy of a fake tensor looks at its data pointer, and torch warns.
@pytest.mark.filterwarnings("ignore:Accessing the data pointer of FakeTensor")
def test_a_cuda_run_resumed_from_a_cpu_checkpoint_keeps_adam_on_the_device_in_the_weights_layout(monkeypatch, tmp_path):
    """A CPU run's checkpoint (NCHW weights and moments, written by the loop) resumed on CUDA, where the weights
    are channels_last: the checkpointer's restore leaves Adam's moments on CUDA with the weights' strides (which
    the fused CUDA kernel requires; match_parameter_layouts), the next fused step reads nothing on the host, and
    a checkpoint saved on CUDA holds that state and restores it alike. Not caught (fake mode): the values, and
    the noise stream's continuation (the CPU stand-in generator continues a CPU state that a real CUDA generator
    re-seeds from (seed, step))."""
    cpu_cfg = tiny_config("cpu", "fp32", "trainer.iterations=1")
    settings = build_settings(cpu_cfg.trainer)
    seed_everything(settings.seed)
    cpu_diffusion = build_diffusion(cpu_cfg)
    cpu_optimizer = build_optimizer(cpu_cfg, cpu_diffusion.model.parameters())
    cpu_batches = DeviceBatches(device_images(), settings.batch_size, seed=settings.seed, device=torch.device("cpu"))
    fast = settings.fast_paths(torch.device("cpu"))
    with build_training(
        cpu_diffusion,
        cpu_optimizer,
        cpu_batches,
        settings,
        fast=fast,
        device=torch.device("cpu"),
        run_dir=tmp_path / "cpu",
        config={},
    ) as parts:
        train(parts, settings)
    path = tmp_path / "cpu" / "checkpoints" / "last.pt"
    state = load_checkpoint(path)
    saved_moments = [s["exp_avg"] for s in state["optimizer"]["state"].values() if s["exp_avg"].dim() == 4]
    assert saved_moments and all(m.is_contiguous() for m in saved_moments)  # NCHW, as the CPU run held them

    monkeypatch.setattr("ddpm.training.loop.finish", lambda parts, settings, metrics, started: {})
    for name, function in (("capture_rng_state", capture_rng_state), ("restore_rng_state", restore_rng_state)):
        monkeypatch.setattr(f"ddpm.training.checkpointer.{name}", outside_fake_mode(function))
    written = []
    monkeypatch.setattr(
        "ddpm.training.checkpointer.save_checkpoint", lambda path, state, also=(): written.append(state)
    )
    cfg = tiny_config("cuda", "bf16")
    fake_cuda = patch_fake_cuda(monkeypatch)
    with fake_cuda.mode:
        settings, diffusion, optimizer, parts = build_cuda_run(cfg, fake_cuda, tmp_path / "cuda", resume=(path, state))
        assert parts.loop.step == 1 and all(
            p.is_contiguous(memory_format=torch.channels_last) for p in conv_weights(diffusion.model)
        )
        assert_adam_state_on_the_device_in_the_weights_layout(optimizer)
        with parts:
            with fake_cuda.watch:
                train(parts, settings)  # step 2, fused, from the restored moments
            parts.checkpoints.save(parts.loop.step, 0.0)
        assert fake_cuda.watch.step_reads() == [] and len(fake_cuda.watch.fused_steps) == 1
        assert_adam_state_on_the_device_in_the_weights_layout(optimizer)

        [cuda_state] = written
        saved = cuda_state["optimizer"]["state"]
        for index, param in enumerate(p for group in optimizer.param_groups for p in group["params"]):
            assert saved[index]["exp_avg"].device.type == "cuda" and saved[index]["exp_avg"].stride() == param.stride()
        _, _, again, _ = build_cuda_run(cfg, fake_cuda, tmp_path / "again", resume=(tmp_path / "cuda.pt", cuda_state))
        assert_adam_state_on_the_device_in_the_weights_layout(again)
