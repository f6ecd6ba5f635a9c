"""Negative log-likelihood in bits/dim: the variational bound of a trained diffusion on held-out images
(Ho et al. 2020, Eq. 5), L_T + sum over t >= 1 of the KL terms + the discretized decoder L_0, per term.

With `timesteps` K < T - 1 the KL sum is estimated by a quadrature over K of its terms (`bound_quadrature`),
and reported as an estimate.
"""

import logging
from itertools import pairwise

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from ddpm.config.errors import ConfigError
from ddpm.data.loader import evaluation_batches
from ddpm.diffusion.bound import bound_at, prior_bits
from ddpm.diffusion.gaussian import GaussianDiffusion, eval_mode
from ddpm.evaluation.settings import EvalSettings

log = logging.getLogger(__name__)


def bound_quadrature(num_timesteps: int, timesteps: int | None) -> tuple[list[int], list[int]]:
    """The KL terms' timesteps evaluated and how many terms each stands for: every t of 1..T-1 once, or K of
    them, one apart at t = 1 and spreading out quadratically towards T - 1, each standing for the terms nearer
    to it than to its neighbours. Evenly spaced ones would give the first, largest term (t = 1, about
    a tenth of the whole bound of a trained model) the weight of (T - 1)/K terms that are far smaller."""
    last = num_timesteps - 1
    if timesteps is None or timesteps >= last:
        return list(range(1, num_timesteps)), [1] * last
    if timesteps == 1:
        return [num_timesteps // 2], [last]
    # i + c (i / (K - 1))^2 grows by at least 1 per step, so the K rounded timesteps are distinct: 1 ... T - 1
    stretch = last - timesteps
    points = [1 + round(i + stretch * (i / (timesteps - 1)) ** 2) for i in range(timesteps)]
    bounds = [1, *[(a + b) // 2 + 1 for a, b in pairwise(points)], num_timesteps]
    return points, [high - low for low, high in pairwise(bounds)]


@torch.no_grad()
def test_set_nll(
    diffusion: GaussianDiffusion,
    batches,
    *,
    device: torch.device,
    use_labels: bool,
    timesteps: int | None = None,
    num_images: int | None = None,
    use_ema: bool = True,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """The bound on (the first `num_images` of) the images of `batches`, in bits/dim: its mean over the images
    and the mean of each term (prior L_T, decoder L_0, the KL sum and every evaluated KL term). The noise of
    each term comes from `seed`, so that the same weights give the same number."""
    T = diffusion.num_timesteps
    kl_steps, kl_weights = bound_quadrature(T, timesteps)
    generator = torch.Generator(device).manual_seed(seed)
    evaluated = [0, *kl_steps]
    # Sums over the images, kept on the device: prior, decoder, KL sum, then each evaluated term. One host read at
    # the end rather than one per term and batch (a thousand syncs a batch on a GPU).
    sums = torch.zeros(3 + len(evaluated), dtype=torch.float64, device=device)
    count = 0
    with eval_mode(diffusion), tqdm(total=num_images, desc="bits/dim", disable=not progress, unit="img") as bar:
        for x0, y in batches:
            if num_images is not None and count >= num_images:
                break
            if num_images is not None:
                x0, y = x0[: num_images - count], y[: num_images - count]
            x0 = x0.to(device).float()
            labels = y.to(device) if use_labels else None
            terms = [bound_at(diffusion, x0, t, labels, generator=generator, use_ema=use_ema) for t in evaluated]
            kl = sum(
                (weight * term for term, weight in zip(terms[1:], kl_weights, strict=True)),
                torch.zeros(len(x0), device=device),
            )
            parts = [prior_bits(diffusion, x0), terms[0], kl, *terms]
            sums += torch.stack([part.sum() for part in parts]).double()
            count += len(x0)
            bar.update(len(x0))
    if count == 0:
        raise ValueError("no images to compute the likelihood of")
    prior, decoder, kl_sum, *term_sums = sums.tolist()
    totals = {"prior": prior, "decoder": decoder, "kl": kl_sum}
    means = {key: value / count for key, value in totals.items()}
    return {
        "bits_per_dim": means["prior"] + means["decoder"] + means["kl"],
        "prior_bits_per_dim": means["prior"],
        "decoder_bits_per_dim": means["decoder"],
        "kl_bits_per_dim": means["kl"],
        # two lists in timestep order (a dict's string keys would sort 0, 1, 10, 100, ...)
        "term_timesteps": [0, *kl_steps],
        "term_weights": [1, *kl_weights],
        "terms_bits_per_dim": [value / count for value in term_sums],
        "num_images": count,
        "timesteps_evaluated": len(kl_steps) + 1,
        "exact": len(kl_steps) == T - 1,
        "note": (
            "every term of the bound, one noise draw each"
            if len(kl_steps) == T - 1
            else f"an estimate: the KL sum from {len(kl_steps)} of its {T - 1} terms (dense at small t, then "
            "spread out), each weighted by the number of terms it stands for (term_weights)"
        ),
        "variance": diffusion.variance,
        "prediction": diffusion.prediction,
        "ema": use_ema and diffusion.ema is not None,
    }


def test_split_nll(
    diffusion: GaussianDiffusion, state: dict, dataset: DictConfig, settings: EvalSettings, device: torch.device
) -> dict:
    """The variational bound in bits/dim on the test split of the checkpoint's data, logged per term."""
    test_set = instantiate(dataset, split="test")
    if test_set is None:
        raise ConfigError(f"eval.nll=true needs a test split, and dataset {dataset.get('_target_')} has none")
    terms = diffusion.num_timesteps - 1
    if settings.nll_timesteps is not None and settings.nll_timesteps > terms:
        raise ConfigError(
            f"eval.nll_timesteps={settings.nll_timesteps} is more than the {terms} KL terms of the checkpoint's "
            "schedule: at most that many, or null for all of them (the exact bound)"
        )
    if settings.nll_num_images is not None and settings.nll_num_images > len(test_set):
        raise ConfigError(
            f"eval.nll_num_images={settings.nll_num_images} is more than the {len(test_set)} images of the test "
            "split: at most that many, or null for all of them"
        )
    use_labels = bool(OmegaConf.select(OmegaConf.create(state["config"]), "trainer.use_labels", default=False))
    batches = evaluation_batches(test_set, settings.batch_size, num_workers=0)
    nll = test_set_nll(
        diffusion,
        batches,
        device=device,
        use_labels=use_labels,
        timesteps=settings.nll_timesteps,
        num_images=settings.nll_num_images,
        use_ema=settings.use_ema,
        seed=settings.seed,
    )
    log.info(
        "NLL %.4f bits/dim on %d test images (L_T %.4f + KL %.4f + L_0 %.4f)%s",
        nll["bits_per_dim"],
        nll["num_images"],
        nll["prior_bits_per_dim"],
        nll["kl_bits_per_dim"],
        nll["decoder_bits_per_dim"],
        "" if nll["exact"] else f"; {nll['note']}",
    )
    return nll
