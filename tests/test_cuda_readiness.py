"""CUDA paths made right without a GPU, where a CPU can show it."""

import subprocess
import sys

import pytest
import torch
from conftest import PROJECT_ROOT, user_environment

SHOW = "import ddpm, os; print(os.environ['CUBLAS_WORKSPACE_CONFIG'])"


@pytest.mark.parametrize("users", [None, ":16:8"], ids=["unset", "set-by-the-user"])
def test_importing_ddpm_sets_the_cublas_workspace_before_cuda_can_start_unless_the_user_did(users):
    """cuBLAS reads CUBLAS_WORKSPACE_CONFIG once, at its first call: set only when a job asks for deterministic
    kernels, it came too late for the second job of an in-process sweep."""
    environment = {k: v for k, v in user_environment().items() if k != "CUBLAS_WORKSPACE_CONFIG"}
    if users:
        environment["CUBLAS_WORKSPACE_CONFIG"] = users
    shown = subprocess.run(
        [sys.executable, "-c", SHOW], capture_output=True, text=True, env=environment, cwd=PROJECT_ROOT, check=True
    ).stdout.strip()
    assert shown == (users or ":4096:8")


def test_the_likelihood_reads_the_device_once_and_sums_every_term_as_the_terms_say(monkeypatch):
    """bits/dim on two batches with every term: equal to the terms summed by hand (in the same float64), with
    no host read per term or per batch: a GPU would otherwise sync a thousand times a batch."""
    from test_training import tiny_diffusion

    from ddpm.diffusion.bound import bound_at, prior_bits
    from ddpm.evaluation.likelihood import test_set_nll

    torch.manual_seed(0)
    diffusion = tiny_diffusion(use_labels=False, dropout=0.0)
    diffusion.betas = diffusion.betas[:6]  # a 6-step schedule: every term is cheap
    images = torch.rand(5, 1, 16, 16) * 2 - 1
    batches = [(images[:3], torch.zeros(3)), (images[3:], torch.zeros(2))]

    reads = {"count": 0}
    for name in ("item", "tolist"):
        original = getattr(torch.Tensor, name)

        def counted(self, *args, _original=original, **kwargs):
            reads["count"] += 1
            return _original(self, *args, **kwargs)

        monkeypatch.setattr(torch.Tensor, name, counted)
    result = test_set_nll(diffusion, batches, device=torch.device("cpu"), use_labels=False, progress=False, seed=3)
    monkeypatch.undo()
    assert reads["count"] <= 2, reads  # the sums once, at the end

    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        diffusion.eval()
        terms = {t: torch.zeros((), dtype=torch.float64) for t in range(6)}
        prior = torch.zeros((), dtype=torch.float64)
        for x0, _ in batches:
            for t in range(6):
                terms[t] += bound_at(diffusion, x0, t, None, generator=generator).sum().double()
            prior += prior_bits(diffusion, x0).sum().double()
    assert result["terms_bits_per_dim"] == [(terms[t] / 5).item() for t in range(6)]
    assert result["prior_bits_per_dim"] == (prior / 5).item()
    assert result["bits_per_dim"] == pytest.approx(
        (prior + sum(terms.values())).item() / 5, rel=1e-6
    )  # the KL sum is weighted in float32 on the device


@pytest.mark.parametrize("task", ["sample", "evaluate"])
def test_sampling_and_evaluation_configure_the_device_kernels_as_training_does(task, monkeypatch, tmp_path):
    """TF32 matmuls and cuDNN's autotuner on a GPU: task=sample and task=evaluate never asked for them."""
    import importlib

    from main_in_process import SAMPLE, run_in_process
    from test_layout import OLD_CHECKPOINT

    module = importlib.import_module(f"ddpm.tasks.{task}")
    configured = []
    monkeypatch.setattr(module, "configure_backends", lambda device, deterministic: configured.append(device))
    settings = (
        SAMPLE[2:] if task == "sample" else ["fid=tiny", "eval.device=cpu", "eval.num_samples=10", "eval.batch_size=10"]
    )
    extra = [] if task == "sample" else [f"fid.reference_dir={tmp_path / 'stats'}", "eval.pr_num_samples=10"]
    run_in_process(
        f"task={task}", "logger=none", f"checkpoint={OLD_CHECKPOINT}", *settings, *extra, f"hydra.run.dir={tmp_path}"
    )
    assert configured == [torch.device("cpu")]


@pytest.mark.parametrize(
    "visible, local_rank, expected",
    [(1, 1, 0), (1, 3, 0), (4, 2, 2), (2, 0, 0), (2, 3, None)],
    ids=["own-gpu-rank1", "own-gpu-rank3", "node-gpus", "node-gpus-rank0", "too-few-gpus"],
)
def test_each_rank_takes_the_gpu_it_can_see(visible, local_rank, expected, monkeypatch):
    """A task bound to its own GPU sees one, as cuda:0; cuda:LOCAL_RANK there is an invalid ordinal."""
    from ddpm.config.errors import ConfigError
    from ddpm.runtime.distributed import Ranks, rank_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    ranks = Ranks(rank=local_rank + 4, world_size=8, local_rank=local_rank)
    if expected is None:
        with pytest.raises(ConfigError, match=f"local rank {local_rank} has no GPU of its own: this process sees 2"):
            rank_device(torch.device("cuda"), ranks)
    else:
        assert rank_device(torch.device("cuda"), ranks) == torch.device("cuda", expected)
    assert rank_device(torch.device("cpu"), ranks) == torch.device("cpu")
    assert rank_device(torch.device("cuda"), Ranks()) == torch.device("cuda")  # one process: as configured


def test_a_rank_joins_nccl_bound_to_the_gpu_it_can_see(monkeypatch):
    """set_device and NCCL's device_id name the rank's own GPU (cuda:0 where the task sees one GPU), so that the
    communicator starts at once on that GPU; set_device(LOCAL_RANK) there was an invalid ordinal."""
    import torch.distributed as dist

    from ddpm.runtime import distributed

    calls = []
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "set_device", lambda device: calls.append(("set_device", device)))
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda **kwargs: calls.append(("init", kwargs)))
    monkeypatch.setattr(dist, "get_backend", lambda: "nccl")
    for name, value in {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    ranks = distributed.init_distributed(torch.device("cuda"))
    assert ranks == distributed.Ranks(3, 4, 1)
    own = torch.device("cuda", 0)
    assert calls == [("set_device", own), ("init", {"backend": "nccl", "device_id": own})]


def test_each_compiling_task_starts_from_a_clean_dynamo_cache(monkeypatch):
    """Three jobs of an in-process sweep over the width, each compiling its network: every one compiles its own
    graph. With one shared cache the third exceeded the recompile limit (2 here, 8 by default) and ran eagerly."""
    import torch._dynamo
    from torch import nn

    from ddpm.diffusion.gaussian import GaussianDiffusion
    from ddpm.diffusion.schedules import linear_betas
    from ddpm.model.unet import UNet
    from ddpm.runtime.fast_paths import FastPaths, prepare_diffusion

    compile_module = nn.Module.compile
    monkeypatch.setattr(nn.Module, "compile", lambda self, **_: compile_module(self, backend="eager"))  # no C++
    x, t = torch.randn(2, 1, 8, 8), torch.zeros(2, dtype=torch.long)
    with torch._dynamo.config.patch(recompile_limit=2):
        for width in (8, 16, 24):
            shape = {"channel_mults": (1,), "attention_resolutions": (0,), "num_res_blocks": 1, "num_groups": 4}
            model = UNet(in_channels=1, image_size=8, base_channels=width, **shape)
            diffusion = GaussianDiffusion(model, linear_betas(100), image_size=8, channels=1)
            prepare_diffusion(diffusion, FastPaths(compile=True))
            before = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            diffusion.model(x, t, None)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before + 1, f"width {width} ran eagerly"
    torch._dynamo.reset()


@pytest.mark.parametrize("fused", [True, False], ids=["fused-adam", "for-loop-adam"])
def test_only_a_fused_optimizer_counts_as_skipping_on_the_device_under_fp16_too(fused):
    """fp16's grad scaler reads found_inf on the host for a for-loop optimizer: such a step syncs, so the loop
    must check for faults at once rather than trust a skip on the device that does not happen."""
    from test_training import tiny_diffusion

    from ddpm.runtime.fast_paths import FastPaths
    from ddpm.training.update import UpdateStep

    diffusion = tiny_diffusion()
    optimizer = torch.optim.Adam(diffusion.model.parameters(), fused=fused)
    update = UpdateStep(
        diffusion,
        optimizer,
        diffusion.update_ema,
        fast=FastPaths(precision="fp16"),
        device=torch.device("cpu"),
        max_grad_norm=1.0,
    )
    assert update.scaler.is_enabled()
    assert update.skips_on_device == fused


def test_the_held_out_loss_of_a_compiled_network_compiles_nothing(monkeypatch):
    """The test split's partial last batch made dynamo compile a dynamic graph, and eval mode another one."""
    import torch._dynamo
    from test_training import tiny_diffusion

    from ddpm.data.digits import digits
    from ddpm.training.held_out_loss import HeldOutLoss

    torch.manual_seed(0)
    diffusion = tiny_diffusion(dropout=0.0)
    held_out = HeldOutLoss(
        torch.utils.data.DataLoader(torch.utils.data.Subset(digits(split="test"), range(11)), batch_size=4),
        device=torch.device("cpu"),
        use_labels=True,
        max_batches=0,
    )
    eager_loss = held_out(diffusion)
    torch._dynamo.reset()
    diffusion.model.compile(backend="eager")
    before = torch._dynamo.utils.counters["stats"]["unique_graphs"]  # what earlier tests compiled stays counted
    assert held_out(diffusion) == eager_loss  # the same number, from the same weights
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == before
    torch._dynamo.reset()


def test_a_deterministic_run_trains_and_resumes_exactly_and_the_next_job_is_not_held_to_it(tmp_path, capfd):
    """trainer.deterministic=true switches torch to deterministic kernels (every op of a step must have one) and
    keeps resume exact; a later job in the same process without it runs with the fast kernels again."""
    from main_in_process import RUN, run_main_in_process

    from ddpm.io.checkpoint import load_checkpoint

    deterministic = [*RUN, "trainer.deterministic=true", "trainer.keep_checkpoints=0"]
    assert (
        run_main_in_process([*deterministic, "trainer.iterations=4", f"hydra.run.dir={tmp_path / 'a'}"], capfd)[0] == 0
    )
    assert torch.are_deterministic_algorithms_enabled()
    assert run_main_in_process([*deterministic, f"hydra.run.dir={tmp_path / 'b'}"], capfd)[0] == 0
    code, output = run_main_in_process(
        [*deterministic, "trainer.iterations=4", f"hydra.run.dir={tmp_path / 'b'}"], capfd
    )
    assert code == 0 and "resuming from" in output
    straight = load_checkpoint(tmp_path / "a" / "checkpoints" / "last.pt")["model"]
    resumed = load_checkpoint(tmp_path / "b" / "checkpoints" / "last.pt")["model"]
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    assert run_main_in_process([*RUN, f"hydra.run.dir={tmp_path / 'c'}"], capfd)[0] == 0
    assert not torch.are_deterministic_algorithms_enabled()
