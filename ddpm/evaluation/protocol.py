"""The protocol of an FID: everything the number depends on, recorded in metrics.json and printed beside it.

FIDs that disagree with the literature mostly differ in one of these (the issue trackers of the DDPM codebases
name them all): the feature network and its weights, the reference split and its size, the number of
generated images, the sampler and its steps, guidance, EMA or raw weights, the seeds, the precision and the
quantization of the images. Nothing is left out as "the usual".
"""

from typing import Any

from omegaconf import OmegaConf

# ddpm.io.images.to_uint8, the one place images become pixels.
QUANTIZATION = "uint8: round(127.5 * (x + 1)) of x clipped to [-1, 1]"


def extractor_protocol(extractor: Any) -> dict[str, Any]:
    return {
        "name": extractor.name,
        "weights_sha256": extractor.weights_sha256,
        "preprocessing": extractor.preprocessing,
    }


def reference_protocol(reference: dict[str, Any]) -> dict[str, Any]:
    return {
        "dataset": reference["dataset"],
        "split": reference["split"],
        "num_images": int(reference["num_images"]),
        "statistics_file": reference["path"],
    }


def sampler_protocol(sampler: dict[str, Any], num_timesteps: int) -> dict[str, Any]:
    """The sampler's name, its number of steps (ddpm's is the schedule's) and its other settings."""
    settings = {key: value for key, value in sampler.items() if key not in ("_target_", "_partial_")}
    return {
        "name": str(sampler["_target_"]).rsplit(".", 1)[-1],
        "steps": settings.pop("steps", None) or num_timesteps,
        "guidance_scale": float(settings.pop("guidance_scale", 0.0)),
        "settings": settings,
    }


def drawing_record(
    *,
    checkpoint: str,
    state: dict[str, Any],
    sampler_node: Any,
    num_timesteps: int,
    ema_used: bool,
    seed: int,
    precision: str,
) -> dict[str, Any]:
    """How a set of images was drawn from a checkpoint (its loaded `state`): stored in every samples.npz and
    shard (its `meta`), so that evaluating the file later still knows its protocol and the data to compare with."""
    sampler = OmegaConf.to_container(sampler_node, resolve=True) if OmegaConf.is_config(sampler_node) else sampler_node
    return {
        "checkpoint": str(checkpoint),
        "step": int(state["step"]),
        "sampler": sampler_protocol(sampler, num_timesteps),
        "use_ema": bool(ema_used),
        "seed": int(seed),
        "precision": precision,
        "dataset": state.get("config", {}).get("dataset"),
    }


def generation_protocol(
    num_images: int, record: dict[str, Any] | None, seeds: list[int] | None, source: dict[str, Any]
) -> dict[str, Any]:
    """How the evaluated images came to be, from their drawing record; what a file made elsewhere does not
    record is said to be unknown, never guessed."""
    unknown = "unknown: the samples file records no protocol"
    record = record or {}
    use_ema = record.get("use_ema")
    return {
        "num_images": num_images,
        "sampler": record.get("sampler", unknown),
        "weights": unknown if use_ema is None else ("ema" if use_ema else "raw"),
        "seeds": seeds or ([record["seed"]] if "seed" in record else unknown),
        "precision": record.get("precision", unknown),
        "checkpoint": record.get("checkpoint", unknown),
        "step": record.get("step", unknown),
        "quantization": QUANTIZATION,
        **source,
    }


def evaluation_protocol(extractor: Any, reference: dict[str, Any], generated: dict[str, Any]) -> dict[str, Any]:
    return {
        "extractor": extractor_protocol(extractor),
        "reference": reference_protocol(reference),
        "generated": generated,
    }


def summary(result: dict[str, Any]) -> list[str]:
    """The printed summary: the numbers, then the protocol they were measured under."""
    seeds = result.get("fid_per_seed", {})
    fid = f"FID {result['fid']:.4f}"
    if len(seeds) > 1:
        fid += f" (the minimum over seeds {', '.join(seeds)}; mean {result['fid_mean']:.4f} +- {result['fid_std']:.4f})"
    lines = [fid]
    if "kid" in result:
        lines.append(f"KID {result['kid']:.5f} +- {result['kid_std']:.5f} ({result['kid_subset_size']}-image subsets)")
    if "precision" in result:
        lines.append(
            f"precision {result['precision']:.4f}, recall {result['recall']:.4f} "
            f"(k={result['pr_k']}, {result['pr_num_fake']} generated, {result['pr_num_real']} real)"
        )
    if result.get("inception_score") is not None:
        lines.append(f"Inception Score {result['inception_score']:.4f} +- {result['inception_score_std']:.4f}")
    elif "inception_score_unavailable" in result:
        lines.append(f"Inception Score unavailable: {result['inception_score_unavailable']}")
    return lines + protocol_lines(result["protocol"])


def protocol_lines(protocol: dict[str, Any]) -> list[str]:
    extractor, reference, generated = protocol["extractor"], protocol["reference"], protocol["generated"]
    sampler = generated["sampler"]
    drawn = (
        f"{sampler['name']} {sampler['steps']} steps, guidance {sampler['guidance_scale']:g}"
        if isinstance(sampler, dict)
        else sampler
    )
    return [
        f"extractor: {extractor['name']} (weights sha256 {extractor['weights_sha256']}); {extractor['preprocessing']}",
        f"reference: {reference['dataset']}, {reference['split']} split, {reference['num_images']} images "
        f"({reference['statistics_file']})",
        f"generated: {generated['num_images']} images per seed; {drawn}; weights {generated['weights']}; "
        f"seeds {generated['seeds']}; precision {generated['precision']}; {generated['quantization']}",
    ]
