"""The speed switches: each fp32 one changes nothing beyond float tolerance, the reduced-precision ones train, a
fused optimizer skips a non-finite step on the device, and a compiled network is not recompiled step after step."""

from functools import partial

import pytest
import torch
from test_training import run_loop, tiny_diffusion

from ddpm.config.errors import ConfigError
from ddpm.diffusion.samplers import ddim
from ddpm.model.unet import UNet
from ddpm.runtime import fast_paths
from ddpm.runtime.fast_paths import FastPaths, grad_scaler, prepare_network, resolve_fast_paths, resolve_precision
from ddpm.runtime.throughput import count_flops
from ddpm.training.update import optimizer_skips_on_device, step_unless_nonfinite

CPU = torch.device("cpu")


def test_auto_picks_the_plain_path_on_cpu_and_names_bad_choices(monkeypatch):
    monkeypatch.setattr(fast_paths, "cpu_capabilities", lambda: {"avx2": True})
    assert resolve_fast_paths(device=CPU) == FastPaths(
        precision="fp32", channels_last=False, compile=False, data_on_device=False
    )
    assert resolve_fast_paths(device=CPU, precision="bf16", channels_last=True).precision == "bf16"
    with pytest.raises(ConfigError, match="trainer.precision='fp8' is not one of"):
        resolve_fast_paths(device=CPU, precision="fp8")
    with pytest.raises(ConfigError, match="trainer.precision=fp16 needs a CUDA device"):
        resolve_fast_paths(device=CPU, precision="fp16")


@pytest.mark.parametrize(
    "capabilities, expected, reason",
    [
        ({"amx_bf16": True, "amx_tile": True, "avx512_bf16": True, "avx2": True}, "bf16", "AMX-BF16 and AVX512-BF16"),
        ({"amx_bf16": False, "avx512_bf16": True, "avx512_f": True}, "bf16", "AVX512-BF16"),
        ({"amx_bf16": False, "avx512_bf16": False, "avx512_f": True, "avx2": True}, "fp32", "would be emulated"),
        ({"avx2": True, "bf16": False}, "fp32", "would be emulated"),
        ({}, "fp32", "does not report the CPU's features"),  # a torch older than get_capabilities()
    ],
)
def test_auto_precision_on_cpu_is_bf16_only_with_bf16_matrix_units(monkeypatch, caplog, capabilities, expected, reason):
    monkeypatch.setattr(fast_paths, "cpu_capabilities", lambda: capabilities)
    with caplog.at_level("INFO", logger="ddpm.runtime.fast_paths"):
        assert resolve_fast_paths(device=CPU).precision == expected
        assert resolve_precision("sample.precision", "auto", CPU) == expected
    assert f"trainer.precision=auto -> {expected}: " in caplog.text and reason in caplog.text
    assert f"sample.precision=auto -> {expected}: " in caplog.text
    assert resolve_precision("eval.precision", "fp32", CPU) == "fp32"  # an explicit choice stays as given


def test_the_capability_report_of_this_torch_is_read():
    capabilities = fast_paths.cpu_capabilities()
    if hasattr(torch.cpu, "get_capabilities"):
        assert capabilities["architecture"] and "amx_bf16" in capabilities or capabilities["architecture"] != "x86_64"


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_turns_everything_on_for_cuda():
    fast = resolve_fast_paths(device=torch.device("cuda"))
    assert fast.channels_last and fast.compile and fast.data_on_device
    assert fast.precision == ("bf16" if torch.cuda.is_bf16_supported() else "fp32")


def adam_after_one_step(fused: bool, finite: bool | None = None) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    optimizer = torch.optim.Adam(model.parameters(), lr=0.1, fused=fused)
    model(torch.randn(5, 4)).square().mean().backward()
    if finite is None:
        optimizer.step()
    else:
        step_unless_nonfinite(optimizer, grad_scaler(FastPaths(), CPU), torch.tensor(finite))
    return model, optimizer


def test_a_fused_optimizer_skips_a_nonfinite_step_on_the_device():
    before, _ = adam_after_one_step(fused=True, finite=False)
    torch.manual_seed(0)
    initial = torch.nn.Linear(4, 3)
    assert all(torch.equal(a, b) for a, b in zip(before.parameters(), initial.parameters(), strict=True))
    _, skipped = adam_after_one_step(fused=True, finite=False)
    assert all(int(state["step"]) == 0 and not state["exp_avg"].any() for state in skipped.state.values())

    taken, optimizer = adam_after_one_step(fused=True, finite=True)
    assert optimizer_skips_on_device(optimizer)
    assert all(int(state["step"]) == 1 for state in optimizer.state.values())
    reference, plain = adam_after_one_step(fused=False)  # the fused kernel computes what the for-loop one does
    assert not optimizer_skips_on_device(plain)
    for a, b in zip(taken.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(a, b)


def final_weights(
    tmp_path, fast: FastPaths, fused: bool = False, one_level: bool = False, **overrides
) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    # No dropout: channels_last draws its masks in memory order, so they fall on other pixels (equally valid,
    # but not comparable).
    diffusion = tiny_diffusion(dropout=0.0, one_level=one_level)
    prepare_network(diffusion.model, fast)
    prepare_network(diffusion.ema.module, fast)
    diffusion, _, _ = run_loop(
        tmp_path, diffusion=diffusion, fast=fast, fused=fused, sample_at_end=False, checkpoint_rate=0, **overrides
    )
    return {name: tensor.contiguous() for name, tensor in diffusion.model.state_dict().items()}


@pytest.mark.parametrize("switch", ["channels_last", "fused_adam"])
def test_an_fp32_switch_changes_nothing_beyond_float_tolerance(tmp_path, switch):
    reference = final_weights(tmp_path / "reference", FastPaths(), iterations=4)
    if switch == "channels_last":
        changed = final_weights(tmp_path / switch, FastPaths(channels_last=True), iterations=4)
    else:
        changed = final_weights(tmp_path / switch, FastPaths(), fused=True, iterations=4)
    assert reference.keys() == changed.keys()
    for name in reference:
        # Adam divides by the root of tiny second moments, which magnifies float rounding; 4 steps of lr 1e-3.
        torch.testing.assert_close(changed[name], reference[name], rtol=1e-3, atol=1e-4)


def test_bf16_autocast_runs_the_network_in_bf16_and_trains(tmp_path):
    diffusion = tiny_diffusion()
    dtypes = set()
    diffusion.model.init_conv.register_forward_hook(lambda module, args, output: dtypes.add(output.dtype))
    _, logger, summary = run_loop(
        tmp_path,
        diffusion=diffusion,
        fast=FastPaths(precision="bf16"),
        iterations=30,
        log_rate=10,
        checkpoint_rate=0,
        sample_at_end=False,
    )
    assert torch.bfloat16 in dtypes  # the training forward; the test loss runs at fp32
    losses = [metrics["train_loss"] for _, metrics in logger.metrics]
    assert all(torch.isfinite(torch.tensor(losses))) and losses[-1] < losses[0], losses
    assert all(p.dtype == torch.float32 for p in diffusion.model.parameters())  # fp32 master weights


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="fp16 autocast with a grad scaler needs CUDA")
def test_fp16_with_a_grad_scaler_trains(tmp_path):
    diffusion = tiny_diffusion().cuda()
    _, logger, _ = run_loop(
        tmp_path,
        diffusion=diffusion,
        fast=FastPaths(precision="fp16"),
        iterations=30,
        log_rate=10,
        checkpoint_rate=0,
        sample_at_end=False,
        device="cuda",
    )
    losses = [metrics["train_loss"] for _, metrics in logger.metrics]
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_a_compiled_network_matches_eager_and_is_not_recompiled_per_step(tmp_path):
    """Compilations are counted at every log: after the first (the training graph; the test loss runs eagerly)
    the count must stay put however many steps follow."""
    torch._dynamo.reset()
    counts = []

    def record(step, metrics):
        counts.append(torch._dynamo.utils.counters["stats"]["unique_graphs"])

    torch.manual_seed(0)
    # Compiled dropout draws its masks differently. One level: compilation time grows with the graph, and
    # what is checked (graphs, guards, weights) does not depend on its depth.
    diffusion = tiny_diffusion(dropout=0.0, one_level=True)
    fast = FastPaths(compile=True)
    prepare_network(diffusion.model, fast)
    compiled, logger, _ = run_loop(
        tmp_path / "compiled",
        diffusion=diffusion,
        fast=fast,
        iterations=10,
        log_rate=2,
        sample_at_end=False,
        checkpoint_rate=10,
        on_log=record,
    )
    assert counts[1] > 0 and counts[1:] == [counts[1]] * (len(counts) - 1), counts
    assert not any(
        "_orig_mod" in key
        for key in torch.load(tmp_path / "compiled" / "checkpoints" / "last.pt", weights_only=True)["model"]
    )
    eager = final_weights(tmp_path / "eager", FastPaths(), one_level=True, iterations=10, log_rate=2)
    for name, tensor in compiled.model.state_dict().items():
        torch.testing.assert_close(tensor, eager[name], rtol=1e-3, atol=2e-4)


@pytest.mark.parametrize(
    "precision, channels_last", [("fp32", False), ("bf16", True)], ids=["fp32-nchw", "bf16-channels-last"]
)
def test_a_compiled_training_run_compiles_two_graphs_and_breaks_none(tmp_path, monkeypatch, precision, channels_last):
    """The graphs of a whole compiled run, counted at every log with dynamo's own counters (the eager backend
    traces as inductor would, without a C++ compiler): the training step's graph by the first log, the EMA copy's
    (the sample grid of step 3) by the second, then nothing, and no graph break. The test loss runs eagerly.
    A change that makes anything recompile (a guard on the step, the lr, a new dtype or layout) fails here."""
    import torch._dynamo
    from torch import nn

    from ddpm.runtime.fast_paths import prepare_diffusion

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **_: compile_module(self, backend="eager"))
    counters = torch._dynamo.utils.counters  # they outlive dynamo's reset: counted from here
    graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
    seen = []

    def record(step, metrics):
        graphs = counters["stats"]["unique_graphs"] - graphs_before
        seen.append((step, graphs, sum(counters["graph_break"].values()) - breaks_before))

    torch.manual_seed(0)
    diffusion = tiny_diffusion(dropout=0.0, one_level=True)
    fast = FastPaths(precision=precision, channels_last=channels_last, compile=True)
    prepare_diffusion(diffusion, fast)
    run_loop(
        tmp_path,
        diffusion=diffusion,
        fast=fast,
        iterations=6,
        log_rate=2,
        sample_rate=3,
        sample_at_end=True,
        checkpoint_rate=3,
        on_log=record,
    )
    graphs_at_end = counters["stats"]["unique_graphs"] - graphs_before
    assert seen == [(2, 1, 0), (4, 2, 0), (6, 2, 0)] and graphs_at_end == 2
    torch._dynamo.reset()


def test_the_flop_count_of_the_ddpm_cifar10_network_is_the_known_one():
    """The convolutions of the 35.7M-parameter model at 32x32 cost 12.10 GFLOP per forward pass, the attention
    matmuls at 16x16 another 0.34; training costs 3x the forward pass. Subpixel upsampling does the three
    upsampling convolutions (1.59 GFLOP) as 2x2 convolutions at the low resolution (0.83 GFLOP, plus 0.06 to
    derive their kernels)."""
    model = UNet(subpixel_upsample=False)
    x, t = torch.randn(1, 3, 32, 32), torch.tensor([500])
    with torch.no_grad():
        forward = count_flops(lambda: model(x, t))
        subpixel = count_flops(lambda: UNet(subpixel_upsample=True)(x, t))
    assert forward / 1e9 == pytest.approx(12.10 + 0.34, rel=0.005)
    upsampling = sum(2 * 9 * 256**2 * size**2 for size in (8, 16, 32))
    at_low_resolution = sum(2 * 4 * 4 * 256**2 * (size // 2 + 1) ** 2 for size in (8, 16, 32))
    kernels = sum(2 * 9 * 16 * 256**2 for size in (8, 16, 32))  # the 2x2 kernels from the 3x3 ones
    assert subpixel == forward - upsampling + at_low_resolution + kernels
    assert count_flops(lambda: model(x, t).sum().backward()) / forward == pytest.approx(3.0, rel=0.05)


def test_bf16_sampling_runs_the_network_in_bf16_and_returns_float32_close_to_fp32():
    torch.manual_seed(0)
    diffusion = tiny_diffusion()
    labels = torch.arange(4)
    draws = {}
    for precision in ("fp32", "bf16"):
        draws[precision] = diffusion.sample(
            4,
            "cpu",
            labels,
            sampler=partial(ddim, steps=5),
            precision=precision,
            generator=torch.Generator().manual_seed(1),
        )
    assert draws["bf16"].dtype == torch.float32 and not torch.equal(draws["bf16"], draws["fp32"])
    assert (draws["bf16"] - draws["fp32"]).abs().mean() < 0.05


@pytest.mark.parametrize(
    "capabilities, configured, expected",
    [
        ({"amx_bf16": True}, None, ["bf16", "fp32"]),  # what training would use first, then the other
        ({"avx2": True}, None, ["fp32"]),  # bf16 would be emulated: not timed unless asked for
        ({"avx2": True}, ["fp32", "bf16"], ["fp32", "bf16"]),
        ({"avx2": True}, ["auto"], ["fp32"]),
    ],
)
def test_benchmark_times_bf16_beside_fp32_where_the_cpu_has_bf16_units(monkeypatch, capabilities, configured, expected):
    from ddpm.tasks.benchmark import BenchmarkSettings, precisions_to_time

    monkeypatch.setattr(fast_paths, "cpu_capabilities", lambda: capabilities)
    bench = BenchmarkSettings(precisions=configured)
    assert precisions_to_time(bench, resolve_precision("trainer.precision", "auto", CPU), CPU) == expected
    assert bench.batches(CPU) == (16, 64) and bench.batches(torch.device("cuda")) == (128, 256)
    assert BenchmarkSettings(batch_size=8).batches(CPU) == (8, 64)
