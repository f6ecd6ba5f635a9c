"""The settings of evaluation: the `fid` group (the feature network and its reference statistics, shared by
task=evaluate and FID during training) and the `eval` node of conf/task/evaluate.yaml."""

import dataclasses
from typing import Any, ClassVar

import torch
from hydra.utils import instantiate

from ddpm.config.errors import ConfigError
from ddpm.config.validation import Validated, at_least, one_of, seed_value

# Sampler names of eval.nfe_samplers -> their config nodes; ddpm runs once, at every timestep.
SWEEP_SAMPLERS = {
    "ddim": {"_target_": "ddpm.diffusion.samplers.ddim"},
    "ddim_stochastic": {"_target_": "ddpm.diffusion.samplers.ddim", "eta": 1.0},
    "dpm_solver": {"_target_": "ddpm.diffusion.samplers.dpm_solver"},
    "dpm_solver_sde": {"_target_": "ddpm.diffusion.samplers.dpm_solver", "eta": 1.0},
    "heun": {"_target_": "ddpm.diffusion.samplers.heun"},
    "ddpm": {"_target_": "ddpm.diffusion.samplers.ddpm_ancestral"},
}
DEFAULT_SWEEP_SAMPLERS = ["ddim", "dpm_solver", "ddpm"]


@dataclasses.dataclass
class FidSettings(Validated):
    """The `fid` node; `extractor` stays a config node until `build_extractor` puts the network on a device."""

    SECTION: ClassVar[str] = "fid"

    extractor: Any = None  # a node with _target_: a callable uint8 images -> (features, logits), with a `name`
    batch_size: int = at_least(1, 200)  # images per feature-extraction batch
    reference_dir: str | None = None  # None = <paths.data_dir>/fid_stats
    reference_split: str = one_of(("train", "test"), "train")  # the split FID compares with
    reference_num_images: int | None = at_least(2, None)  # None = the whole split; N = its first N images
    reference_pr_images: int = at_least(1, 10_000)  # real images whose features the cache keeps (KID, precision/recall)

    def build_extractor(self, device: torch.device) -> Any:
        """The feature network on `device` (the task's, or the training run's)."""
        return instantiate(self.extractor, device=str(device))


@dataclasses.dataclass
class EvalSettings(Validated):
    SECTION: ClassVar[str] = "eval"

    num_samples: int = at_least(2, 50_000)  # and >= eval.is_splits
    batch_size: int = at_least(1, 250)  # images per sampling batch; also the unit of sharding
    seed: int = seed_value()
    seeds: list[int] | None = None  # several seeds: FID per seed, reported as min, mean and std (overrides seed)
    use_ema: bool = True
    device: str = "auto"
    samples: str | None = None  # PATH.npz: evaluate it, generate nothing
    is_splits: int = at_least(1, 10)
    precision_recall: bool = True
    pr_num_samples: int = at_least(1, 10_000)  # generated images compared with the real ones
    pr_k: int = at_least(1, 3)
    kid: bool = True  # Binkowski et al. 2018, from the same features as FID
    kid_subsets: int = at_least(1, 100)
    kid_subset_size: int = at_least(2, 1000)
    shard: int = 0
    num_shards: int = at_least(1, 1)
    shard_dir: str | None = None
    merge: str | None = None  # DIR holding every shard_I_of_N.npz
    nfe_sweep: list[int] | None = None
    nfe_samplers: list[str] = dataclasses.field(default_factory=lambda: list(DEFAULT_SWEEP_SAMPLERS))
    precision: str = "fp32"
    compile: bool | None = None
    fid: bool = True  # false: no samples and no image metrics (with eval.nll=true: the likelihood alone)
    nll: bool = False  # the variational bound in bits/dim on the test split
    nll_timesteps: int | None = at_least(1, None, note="KL terms evaluated; null = all T - 1, the exact bound")
    nll_num_images: int | None = at_least(1, None, note="test images; null = the whole split")

    def check(self) -> None:
        if not self.fid and not self.nll:
            raise ConfigError(
                "eval.fid=false and eval.nll=false leave nothing to compute: set eval.nll=true for the likelihood alone"
            )
        if self.nll and (self.samples or self.merge):
            source = f"eval.samples={self.samples}" if self.samples else f"eval.merge={self.merge}"
            raise ConfigError(
                f"eval.nll=true with {source}: the likelihood is of a checkpoint's model (checkpoint=PATH), "
                "not of samples"
            )
        if self.nll and (self.num_shards > 1 or self.nfe_sweep is not None):
            raise ConfigError(
                "eval.nll=true runs in one job: it does not go with eval.num_shards > 1 or eval.nfe_sweep"
            )
        seeds = self.seeds
        if seeds is not None and not self.fid:
            raise ConfigError(
                f"eval.seeds={seeds!r} are the seeds of the images drawn for FID, but eval.fid=false draws none "
                "(the likelihood is computed on the test split): drop eval.seeds"
            )
        if seeds is not None:
            if not seeds or len(set(seeds)) != len(seeds) or not all(0 <= seed < 2**32 for seed in seeds):
                raise ConfigError(
                    f"eval.seeds={seeds!r} must be null or a list of distinct seeds in [0, 2**32), e.g. [0,1,2]"
                )
            if len(seeds) > 1 and (self.samples or self.merge or self.num_shards > 1 or self.nfe_sweep is not None):
                raise ConfigError(
                    f"eval.seeds={seeds!r}: several seeds draw their own images in one job; they do not "
                    "go with eval.samples, eval.merge, eval.num_shards > 1 or eval.nfe_sweep"
                )
        if self.num_samples < max(2, self.is_splits):
            raise ConfigError(
                f"eval.num_samples={self.num_samples} must be >= eval.is_splits={self.is_splits} (and >= 2)"
            )
        if not 0 <= self.shard < self.num_shards:
            raise ConfigError(
                f"eval.shard={self.shard!r} must be in 0..{self.num_shards - 1} (eval.num_shards={self.num_shards})"
            )
        if self.num_shards > self.num_batches:
            raise ConfigError(
                f"eval.num_shards={self.num_shards} is more than the {self.num_batches} batches of eval.batch_size="
                f"{self.batch_size} in eval.num_samples={self.num_samples}: lower eval.batch_size"
            )
        sweep = self.nfe_sweep
        if sweep is not None and (not sweep or not all(steps >= 1 for steps in sweep)):
            raise ConfigError(
                f"eval.nfe_sweep={sweep!r} must be null or a list of step counts, e.g. [10,20,50,100,1000]"
            )
        if not self.nfe_samplers or any(name not in SWEEP_SAMPLERS for name in self.nfe_samplers):
            raise ConfigError(f"eval.nfe_samplers={self.nfe_samplers!r}: choose from {list(SWEEP_SAMPLERS)}")
        sources = [
            f"{key}={value}" for key, value in (("eval.samples", self.samples), ("eval.merge", self.merge)) if value
        ]
        if len(sources) > 1:
            raise ConfigError(f"{' and '.join(sources)}: give one source of samples, not both")
        if sources and (sweep is not None or self.num_shards > 1):
            raise ConfigError(
                f"{sources[0]} reads existing samples: it does not go with eval.nfe_sweep or eval.num_shards > 1"
            )
        if sweep is not None and self.num_shards > 1:
            raise ConfigError("eval.nfe_sweep runs in one job: it does not go with eval.num_shards > 1")

    @property
    def seeds_to_draw(self) -> list[int]:
        return list(self.seeds) if self.seeds is not None else [self.seed]

    @property
    def num_batches(self) -> int:
        return -(-self.num_samples // self.batch_size)

    def shard_images(self) -> range:
        """The image indices of this shard: whole batches, contiguous, together every image."""
        first = self.shard * self.num_batches // self.num_shards
        last = (self.shard + 1) * self.num_batches // self.num_shards
        return range(first * self.batch_size, min(last * self.batch_size, self.num_samples))
