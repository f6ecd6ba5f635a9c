"""Negative log-likelihood in bits/dim: the variational bound of a trained diffusion on held-out images
(Ho et al. 2020, Eq. 5), L_T + sum over t >= 1 of the KL terms + the discretized decoder L_0, per term.

With `timesteps` K < T - 1 the KL sum is estimated from K evenly spaced timesteps (their mean times T - 1):
unbiased only in the sense of a Riemann sum, and reported as an estimate.
"""

import logging

import torch
from tqdm.auto import tqdm

from ddpm.diffusion import GaussianDiffusion, eval_mode

log = logging.getLogger(__name__)


def bound_timesteps(num_timesteps: int, timesteps: int | None) -> list[int]:
    """The KL terms' timesteps evaluated: all of 1..T-1, or `timesteps` of them evenly spaced."""
    every = list(range(1, num_timesteps))
    if timesteps is None or timesteps >= len(every):
        return every
    return sorted({every[round(i * (len(every) - 1) / max(timesteps - 1, 1))] for i in range(timesteps)})


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
    kl_steps = bound_timesteps(T, timesteps)
    scale = (T - 1) / max(len(kl_steps), 1)  # 1 when every term is evaluated
    generator = torch.Generator(device).manual_seed(seed)
    totals = {"prior": 0.0, "decoder": 0.0, "kl": 0.0}
    per_term = torch.zeros(T, dtype=torch.float64)
    count = 0
    with eval_mode(diffusion), tqdm(total=num_images, desc="bits/dim", disable=not progress, unit="img") as bar:
        for x0, y in batches:
            if num_images is not None and count >= num_images:
                break
            if num_images is not None:
                x0, y = x0[: num_images - count], y[: num_images - count]
            x0 = x0.to(device).float()
            labels = y.to(device) if use_labels else None
            terms = {t: diffusion.bound_at(x0, t, labels, generator=generator, use_ema=use_ema) for t in [0, *kl_steps]}
            kl = sum(terms[t] for t in kl_steps) * scale if kl_steps else torch.zeros(len(x0), device=device)
            totals["prior"] += diffusion.prior_bits(x0).sum().item()
            totals["decoder"] += terms[0].sum().item()
            totals["kl"] += kl.sum().item()
            for t, values in terms.items():
                per_term[t] += values.sum().item()
            count += len(x0)
            bar.update(len(x0))
    if count == 0:
        raise ValueError("no images to compute the likelihood of")
    means = {key: value / count for key, value in totals.items()}
    return {
        "bits_per_dim": means["prior"] + means["decoder"] + means["kl"],
        "prior_bits_per_dim": means["prior"],
        "decoder_bits_per_dim": means["decoder"],
        "kl_bits_per_dim": means["kl"],
        "terms_bits_per_dim": {str(t): per_term[t].item() / count for t in [0, *kl_steps]},
        "num_images": count,
        "timesteps_evaluated": len(kl_steps) + 1,
        "exact": len(kl_steps) == T - 1,
        "note": (
            "every term of the bound, one noise draw each"
            if len(kl_steps) == T - 1
            else f"an estimate: the KL sum from {len(kl_steps)} of its {T - 1} terms, evenly spaced, times {scale:.4g}"
        ),
        "variance": diffusion.variance,
        "prediction": diffusion.prediction,
        "ema": use_ema and diffusion.ema is not None,
    }

