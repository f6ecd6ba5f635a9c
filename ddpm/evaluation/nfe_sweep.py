"""eval.nfe_sweep: sample quality against the number of network evaluations, for every sampler of
eval.nfe_samplers at every step count, as a CSV, a markdown table and a plot."""

import csv
import logging
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig

from ddpm.config.errors import ConfigError
from ddpm.diffusion.build import build_sampler
from ddpm.diffusion.gaussian import GaussianDiffusion
from ddpm.evaluation.drawing import generate
from ddpm.evaluation.protocol import drawing_record, evaluation_protocol, generation_protocol, protocol_lines
from ddpm.evaluation.scores import metrics_of
from ddpm.evaluation.settings import SWEEP_SAMPLERS, EvalSettings, FidSettings

log = logging.getLogger(__name__)
COLUMNS = ["sampler", "steps", "nfe", "seconds_per_image", "fid", "kid", "inception_score", "precision", "recall"]


def sweep_points(names: list[str], steps: list[int], num_timesteps: int) -> list[tuple[str, int | None]]:
    """(sampler, steps) pairs: the step samplers at every count up to T, ddpm once at T."""
    points = []
    for name in names:
        if name == "ddpm":
            points.append((name, None))
            continue
        for count in steps:
            if count > num_timesteps:
                log.warning(
                    "eval.nfe_sweep: %s with %d steps skipped (the schedule has %d)", name, count, num_timesteps
                )
            else:
                points.append((name, count))
    return points


def sweep_sampler(name: str, steps: int | None):
    """The sampler function of a sweep point, imported only now: a sampler not in ddpm.diffusion.samplers yet is a
    clear error, not an ImportError at the start."""
    node = {**SWEEP_SAMPLERS[name], "_partial_": True}
    if steps is not None:
        node["steps"] = steps
    try:
        return instantiate(node)
    except Exception as error:
        target = SWEEP_SAMPLERS[name]["_target_"]
        raise ConfigError(f"eval.nfe_samplers contains {name}, but {target} cannot be built: {error}") from error


class CountingSampler:
    """Wraps a sampler to count network evaluations, so the sweep reports the NFE actually spent."""

    def __init__(self, sampler):
        self.sampler = sampler
        self.calls = 0

    def count(self, denoise, x_t, t):
        self.calls += 1
        return denoise(x_t, t)

    def __call__(self, denoise, x, betas, **kwargs):
        return self.sampler(lambda x_t, t: self.count(denoise, x_t, t), x, betas, **kwargs)


def _cell(value: Any) -> str:
    return f"{value:.3f}" if isinstance(value, float) else ("" if value is None else str(value))


def write_sweep_table(rows: list[dict], run_dir: Path) -> list[Path]:
    """nfe_sweep.csv, nfe_sweep.md and nfe_sweep.png (FID against NFE, log x) in the run directory."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    with open(run_dir / "nfe_sweep.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(_cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    (run_dir / "nfe_sweep.md").write_text("\n".join(lines) + "\n")

    figure, axis = plt.subplots(figsize=(6, 4))
    for name in dict.fromkeys(row["sampler"] for row in rows):
        points = sorted((row["nfe"], row["fid"]) for row in rows if row["sampler"] == name)
        axis.plot(*zip(*points, strict=True), marker="o", label=name)
    axis.set(xscale="log", xlabel="network evaluations (NFE)", ylabel="FID", title="FID vs NFE")
    axis.grid(True, which="both", alpha=0.3)
    axis.legend()
    figure.tight_layout()
    figure.savefig(run_dir / "nfe_sweep.png", dpi=120)
    plt.close(figure)
    return [run_dir / f"nfe_sweep.{ext}" for ext in ("csv", "md", "png")]


def run_nfe_sweep(
    cfg: DictConfig,
    settings: EvalSettings,
    fid: FidSettings,
    diffusion: GaussianDiffusion,
    extractor,
    reference,
    device: torch.device,
    run_dir: Path,
    precision: str,
    state: dict,
) -> dict:
    """Every (sampler, steps) point of the sweep on the same images' seeds: its NFE, sampling time per image
    and metrics, all under one protocol (recorded with the table, written to run_dir)."""
    images, seed = range(settings.num_samples), settings.seeds_to_draw[0]
    _, guidance_scale = build_sampler(cfg.sampler)  # guidance, when the sampler node sets it, applies to every point
    rows = []
    for name, steps in sweep_points(settings.nfe_samplers, settings.nfe_sweep, diffusion.num_timesteps):
        sampler = CountingSampler(sweep_sampler(name, steps))
        started = time.perf_counter()
        pixels = generate(
            diffusion, sampler, settings, images, device, seed=seed, guidance_scale=guidance_scale, precision=precision
        )["arr_0"]
        seconds_per_image = (time.perf_counter() - started) / len(images)
        metrics = metrics_of(pixels, settings, fid, extractor, reference, device)
        nfe = sampler.calls / settings.num_batches  # per image batch: what one image costs
        rows.append(
            {
                "sampler": name,
                "steps": steps or diffusion.num_timesteps,
                "nfe": int(round(nfe)),
                "seconds_per_image": seconds_per_image,
                **metrics,
            }
        )
        log.info(
            "%s, %s steps: NFE %d, %.3f s per image, FID %.3f",
            name,
            rows[-1]["steps"],
            rows[-1]["nfe"],
            seconds_per_image,
            metrics["fid"],
        )
    files = write_sweep_table(rows, run_dir)
    record = drawing_record(
        checkpoint=cfg.checkpoint,
        state=state,
        sampler_node={"_target_": "per row"},
        num_timesteps=diffusion.num_timesteps,
        seed=seed,
        precision=precision,
        ema_used=settings.use_ema and diffusion.ema is not None,
    )
    generated = generation_protocol(
        settings.num_samples, {**record, "sampler": f"per row; guidance {guidance_scale:g}"}, [seed], {}
    )
    result = {
        "nfe_sweep": rows,
        "protocol": evaluation_protocol(extractor, reference, generated),
        "files": [str(f) for f in files],
    }
    for line in protocol_lines(result["protocol"]):
        log.info(line)
    return result
