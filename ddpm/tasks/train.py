"""task=train: compose every component from the config and run the training loop, or continue it."""

import json
import logging
import os
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.utils import instantiate, to_absolute_path
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.config.validation import build_settings
from ddpm.data.device import DeviceBatches, in_memory_images
from ddpm.data.loader import TrainingBatches, evaluation_batches
from ddpm.diffusion.build import build_diffusion, build_sampler, check_model_fits_data
from ddpm.evaluation.during_training import FidDuringTraining
from ddpm.evaluation.likelihood import test_set_nll
from ddpm.io.checkpoint import remove_temporaries
from ddpm.io.loggers import check_logger, sweep_job
from ddpm.runtime.devices import configure_backends, resolve_device
from ddpm.runtime.distributed import Ranks, init_distributed, local_batch_size, rank_device, shutdown
from ddpm.runtime.fast_paths import FastPaths, prepare_diffusion
from ddpm.runtime.preflight import check_storage, estimated_checkpoint_bytes
from ddpm.runtime.rng import seed_everything
from ddpm.runtime.run_directory import move_earlier_run_aside, record_run, run_id
from ddpm.runtime.sweep_directory import searching
from ddpm.training.loop import train
from ddpm.training.optimizer import build_optimizer
from ddpm.training.resume import check_resumable, find_resume_checkpoint, finished_run, what_may_not_change
from ddpm.training.settings import TrainSettings
from ddpm.training.setup import build_training

log = logging.getLogger(__name__)


def run(cfg: DictConfig) -> float:
    """Joins the other ranks when there are several (torchrun, or a SLURM job with several tasks; every rank
    runs this), trains, and leaves the process group again. Returns trainer.objective's value, which Hydra's
    sweepers minimize (NaN where the run has none, e.g. on ranks above 0: a sweeper counts such a trial as
    failed)."""
    settings: TrainSettings = build_settings(cfg.trainer)
    device = resolve_device(settings.device)
    ranks = init_distributed(device)
    try:
        summary = train_as_rank(cfg, settings, rank_device(device, ranks), ranks)
    finally:
        shutdown(ranks)
    value = summary.get("objective_value")
    return float("nan") if value is None else float(value)


def train_as_rank(cfg: DictConfig, settings: TrainSettings, device: torch.device, ranks: Ranks) -> dict:
    """YAML -> data -> diffusion -> optimizer -> fast paths -> sampler -> batches -> checkpoint to resume (a
    finished run ends here) -> the objective's check -> preflight, evaluator, an earlier run moved aside, logger (rank 0) -> the loop's parts -> the loop -> summary.json.

    Everything that can be wrong with the config, the data, the checkpoint or the disk is found before the
    first step, and nothing in the run directory is written before that.
    """
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    checkpoint_dir = run_dir / "checkpoints"
    config = OmegaConf.to_container(cfg, resolve=True)
    fast = settings.fast_paths(device)
    configure_backends(device, settings.deterministic)
    if ranks.is_main:
        check_logger(cfg.logger)
    train_set = instantiate(cfg.dataset, split="train")
    test_set = instantiate(cfg.dataset, split="test")
    check_model_fits_data(cfg.model, train_set[0][0])

    seed_everything(settings.seed)  # the same initial weights on every rank
    diffusion = build_diffusion(cfg).to(device)
    optimizer = build_optimizer(cfg, diffusion.model.parameters())
    prepare_diffusion(diffusion, fast)
    sampler, guidance_scale = build_sampler(cfg.sampler, diffusion.betas)  # for the sample grids
    if guidance_scale and diffusion.model.null_label is None:
        raise ConfigError(
            f"sampler.guidance_scale={guidance_scale} for the sample grids needs trainer.use_labels=true "
            "and trainer.label_dropout > 0"
        )
    if settings.eval_rate and settings.eval_steps > diffusion.num_timesteps:
        raise ConfigError(
            f"trainer.eval_steps={settings.eval_steps} (DDIM steps of the cheap FID) must be <= "
            f"schedule.num_timesteps={diffusion.num_timesteps}"
        )
    if ranks.rank:
        seed_everything(settings.seed + ranks.rank)  # but each rank its own dropout draws
    workers = settings.data_workers(device)
    batches = training_batches(
        train_set, local_batch_size(settings.batch_size, ranks), settings, fast, device, ranks, workers
    )
    test_loader = (
        evaluation_batches(test_set, settings.batch_size, num_workers=workers) if test_set is not None else None
    )

    resume_setting = settings.resume if settings.resume in ("auto", "never") else to_absolute_path(settings.resume)
    resume = find_resume_checkpoint(resume_setting, checkpoint_dir, run=run_id(run_dir), trust=cfg.trust_checkpoint)
    finished = resume and resume_setting == "auto" and finished_run(run_dir, resume[1], settings.iterations)
    if resume:
        check_resumable(*resume, config, refuse_changes=what_may_not_change(run_dir, finished))
    if finished:  # the same command again: the results stay as they are
        log.info(
            "the run in %s finished at step %d: nothing to do (results in %s; raise trainer.iterations to train "
            "on, or trainer.resume=never for a new run)",
            run_dir,
            finished["steps"],
            run_dir / "summary.json",
        )
        return finished
    without_objective = settings.check_measurements(
        start_step=resume[1]["step"] if resume else 0, has_test_split=test_set is not None, in_search=searching()
    )
    if without_objective and ranks.is_main:
        log.warning("this run will report no objective: %s", without_objective)
    if settings.warmup > settings.iterations and ranks.is_main:
        log.warning(
            "trainer.warmup=%d is more than trainer.iterations=%d: the learning rate never reaches optimizer.lr "
            "(it ends at %.3g of it)",
            settings.warmup,
            settings.iterations,
            settings.iterations / settings.warmup,
        )

    evaluator, logger, identity = None, None, None
    if ranks.is_main:  # rank 0 alone measures FIDs, logs and writes
        check_storage(
            checkpoint_dir,
            estimated_checkpoint_bytes(diffusion.model, diffusion.ema is not None),
            settings.keep_checkpoints,
        )
        # The feature extractor and the reference statistics are ready (or their error shown) before the first step.
        evaluator = (
            FidDuringTraining(
                build_settings(cfg.fid),
                cfg.dataset,
                cfg.paths.data_dir,
                device=device,
                num_samples=settings.eval_samples,
                steps=settings.eval_steps,
                batch_size=settings.eval_batch_size,
                ema=diffusion.ema is not None,
            )
            if settings.eval_rate
            else None
        )
        for leftover in remove_temporaries(checkpoint_dir):
            log.info("removed %s, left by a checkpoint write that was interrupted", leftover.name)
        log_start(diffusion, optimizer, batches, len(train_set), fast, device, ranks, run_dir, resume, settings)
        # Every check has passed: from here on the run writes. A new run first moves an earlier one's files aside.
        if resume is None and (moved := move_earlier_run_aside(run_dir)):
            log.warning(
                "moved the files of the earlier run in %s to %s (trainer.resume=%s)", run_dir, moved, settings.resume
            )
        identity = record_run(run_dir, resume[1].get("run_id") if resume else None)
        logger = instantiate(cfg.logger)(
            run_dir=run_dir,
            config=config,
            resume_step=resume[1]["step"] if resume else None,
            resume_state=resume[1].get("logger") if resume else None,
            sweep=sweep_job(),
        )
        OmegaConf.save(config, run_dir / "config.yaml")  # only now: a failed start leaves the run's files alone
        if evaluator is not None:  # what the logged `fid` values are: they compare only with each other
            (run_dir / "fid_protocol.json").write_text(json.dumps(evaluator.protocol, indent=2) + "\n")

    try:
        with build_training(
            diffusion,
            optimizer,
            batches,
            settings,
            fast=fast,
            device=device,
            run_dir=run_dir,
            config=config,
            logger=logger,
            ranks=ranks,
            resume=resume,
            test_loader=test_loader,
            sampler=sampler,
            guidance_scale=guidance_scale,
            evaluator=evaluator,
            run_id=identity,
        ) as parts:
            summary = train(parts, settings)
    finally:
        if logger is not None:
            logger.finish()
    if ranks.is_main:
        if settings.nll_at_end:
            summary["nll_bits_per_dim"] = final_likelihood(diffusion, test_loader, settings, device)
        summary["objective"] = settings.resolved_objective(has_test_split=test_set is not None)
        summary["objective_value"] = summary.get(summary["objective"])
        log.info("objective %s = %s", summary["objective"], summary["objective_value"])
        write_summary(summary, run_dir)
    return summary


def final_likelihood(diffusion, test_loader, settings: TrainSettings, device: torch.device) -> float | None:
    """trainer.nll_at_end: the bound of the final (EMA) weights on the test split, in bits/dim."""
    nll = test_set_nll(
        diffusion, test_loader, device=device, use_labels=settings.use_labels, timesteps=settings.nll_timesteps
    )
    log.info("NLL %.4f bits/dim on the %d test images (%s)", nll["bits_per_dim"], nll["num_images"], nll["note"])
    return nll["bits_per_dim"]


def training_batches(
    train_set,
    batch_size: int,
    settings: TrainSettings,
    fast: FastPaths,
    device: torch.device,
    ranks: Ranks,
    num_workers: int,
) -> TrainingBatches | DeviceBatches:
    """The whole split on the device when asked for and the dataset allows it (no workers, no copies per step);
    else DataLoader workers into pinned memory. Both give the same order and resume alike."""
    in_memory = in_memory_images(train_set) if fast.data_on_device else None
    if fast.data_on_device and in_memory is None and settings.data_on_device:
        log.warning(
            "trainer.data_on_device=true, but %s cannot be held as one tensor: using DataLoader workers",
            type(train_set).__name__,
        )
    if in_memory is not None:
        return DeviceBatches(
            in_memory, batch_size, seed=settings.seed, device=device, rank=ranks.rank, world_size=ranks.world_size
        )
    return TrainingBatches(
        train_set,
        batch_size,
        seed=settings.seed,
        num_workers=num_workers,
        pin_memory=device.type == "cuda",
        rank=ranks.rank,
        world_size=ranks.world_size,
    )


def log_start(
    diffusion,
    optimizer,
    batches,
    num_images: int,
    fast: FastPaths,
    device: torch.device,
    ranks: Ranks,
    run_dir: Path,
    resume,
    settings: TrainSettings,
) -> None:
    num_parameters = sum(p.numel() for p in diffusion.model.parameters())
    log.info(
        "model: %.2fM parameters; %d training images; device %s x %d ranks; run dir %s",
        num_parameters / 1e6,
        num_images,
        device,
        ranks.world_size,
        run_dir,
    )
    log.info(
        "fast paths: %s; optimizer fused=%s; batches from %s%s",
        fast.describe(),
        optimizer.defaults.get("fused"),
        type(batches).__name__,
        f" ({batches.num_workers} workers)" if isinstance(batches, TrainingBatches) else "",
    )
    if resume:
        log.info("resuming from %s at step %d (trainer.resume=%s)", resume[0], resume[1]["step"], settings.resume)


def write_summary(summary: dict, run_dir: Path) -> None:
    """summary.json, with the SLURM job it ran in (the sweep summary reads it)."""
    summary["slurm_job_id"] = os.environ.get("SLURM_JOB_ID")
    summary["slurm_array_job_id"] = os.environ.get("SLURM_ARRAY_JOB_ID")
    summary["slurm_restart_count"] = int(os.environ.get("SLURM_RESTART_COUNT", 0))
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info(
        "done: %d steps in %.0f s; checkpoint %s; samples %s",
        summary["steps"],
        summary["wall_time_s"],
        summary["checkpoint"],
        summary["sample_grid"],
    )
