"""The one check of a settings dataclass (trainer, sample, eval, benchmark): each field's type from its
annotation and its allowed values from its metadata, reported with the config key, the value and what is
allowed, before any work starts.

    @dataclasses.dataclass
    class SampleSettings(Validated):
        SECTION: ClassVar[str] = "sample"
        num_images: int = at_least(1, 1000)
        precision: str = one_of(("fp32", "bf16", "fp16"), "fp32")
"""

import dataclasses
import difflib
import inspect
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from hydra.errors import InstantiationException
from hydra.utils import get_class, get_object, instantiate
from omegaconf import DictConfig, OmegaConf

from ddpm.config.errors import ConfigError
from ddpm.config.type_checks import matches, type_error


def at_least(minimum: float, default: Any, *, note: str = "") -> Any:
    """A number >= minimum (None passes where the annotation allows it); `note` says what the bound means."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "note": note})


def seed_value(default: int = 0) -> Any:
    """A random seed: an integer in [0, 2**32), the range every generator here (NumPy's too) accepts."""
    return dataclasses.field(default=default, metadata={"minimum": 0, "maximum": 2**32 - 1, "note": ""})


def fraction(default: float) -> Any:
    """A number in [0, 1)."""
    return dataclasses.field(default=default, metadata={"interval": (0, 1)})


def one_of(choices: Sequence[str], default: Any) -> Any:
    return dataclasses.field(default=default, metadata={"choices": tuple(choices)})


def check_field(key: str, value: Any, annotation: Any, rule: dict[str, Any]) -> None:
    """Raises ConfigError naming `key` when `value` does not fit its annotation or its rule."""
    if not matches(value, annotation):
        raise type_error(key, value, annotation)
    if value is None:
        return
    if isinstance(value, float) and math.isnan(value):
        raise ConfigError(f"{key}=nan is not a number")
    if "minimum" in rule and value < rule["minimum"]:
        note = f" ({rule['note']})" if rule["note"] else ""
        raise ConfigError(f"{key}={value!r} must be >= {rule['minimum']}{note}")
    if "maximum" in rule and value > rule["maximum"]:
        raise ConfigError(f"{key}={value!r} must be <= {rule['maximum']}")
    if "interval" in rule and not rule["interval"][0] <= value < rule["interval"][1]:
        low, high = rule["interval"]
        raise ConfigError(f"{key}={value!r} must be in [{low}, {high})")
    if "choices" in rule and value not in rule["choices"]:
        raise ConfigError(f"{key}={value!r} is not one of {list(rule['choices'])}")


class Validated:
    """Base of the settings dataclasses: every field is checked on construction, then `check()` (a subclass's
    rules that relate two fields)."""

    SECTION: ClassVar[str] = ""

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):
            check_field(f"{self.SECTION}.{field.name}", getattr(self, field.name), field.type, dict(field.metadata))
        self.check()

    def check(self) -> None:
        """Rules between fields; the default has none."""


def accepted_keys(target: Any) -> list[str] | None:
    """The config keys a `_target_` takes: a dataclass's fields, or a callable's parameters; None when it takes
    any (**kwargs)."""
    if dataclasses.is_dataclass(target):
        return [field.name for field in dataclasses.fields(target)]
    try:
        parameters = inspect.signature(target).parameters.values()
    except (TypeError, ValueError):
        return None
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return [p.name for p in parameters if p.kind is not inspect.Parameter.VAR_POSITIONAL]


def unknown_key(key: str, section: str, known: Sequence[str], value: Any = None) -> ConfigError:
    """The one message for a key nothing reads: with the closest known key, else the list of them."""
    name = f"{section}.{key}" if section else key
    close = difflib.get_close_matches(key, known, n=1)
    hint = f"did you mean {section + '.' if section else ''}{close[0]}?" if close else f"the keys are {sorted(known)}"
    shown = f"{name}={value}" if value is not None else name
    where = f"a setting of {section}" if section else "a key of the config"
    return ConfigError(f"{shown} is not {where} (nothing would read it); {hint}")


def check_keys(node: DictConfig, section: str, also: Sequence[str] = ()) -> None:
    """Every key of a `_target_` node (and of the `_target_` nodes inside it) is one its target takes, or one
    of `also` (read by the caller). A key added with + that nothing reads would be ignored silently otherwise."""
    known = accepted_keys(get_object(node._target_))
    if known is not None:
        for key in node:
            if not str(key).startswith("_") and key not in known and key not in also:
                raise unknown_key(str(key), section, [*known, *also])
    for key in node:
        child = node._get_node(key)
        if isinstance(child, DictConfig) and not child._is_missing() and not child._is_none() and "_target_" in child:
            check_keys(child, f"{section}.{key}")


def build_settings(node: DictConfig) -> Any:
    """A settings dataclass from its config node (`_target_`): unknown keys are refused with the closest known
    one, and a bad value's ConfigError is raised as itself rather than wrapped in Hydra's exception."""
    cls = get_class(node._target_)
    check_keys(node, getattr(cls, "SECTION", "") or node._target_)
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise


# The top-level keys something reads: the config groups, and the keys of config.yaml and conf/task/*.yaml.
TOP_LEVEL = (
    "paths",
    "dataset",
    "model",
    "schedule",
    "diffusion",
    "optimizer",
    "trainer",
    "sampler",
    "logger",
    "fid",
    "task",
    "checkpoint",
    "trust_checkpoint",
    "sample",
    "eval",
    "benchmark",
    "import",
)
# Keys of a section that the code building it reads itself, rather than its `_target_`.
READ_BY_THE_BUILDER = {"sampler": ("guidance_scale",)}


def check_config(cfg: DictConfig) -> None:
    """Before any task runs: every ??? has a value, every key is one something reads (a key added with + is
    refused with the closest known one), and trust_checkpoint is a boolean."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        example = " ".join(f"{key}=..." for key in missing)
        raise ConfigError(f"{', '.join(missing)} must be given a value, e.g. python main.py ... {example}")
    for key in cfg:
        if key not in TOP_LEVEL:
            raise unknown_key(str(key), "", TOP_LEVEL, value=cfg._get_node(key)._value())
        node = cfg._get_node(key)
        if isinstance(node, DictConfig) and not node._is_none() and "_target_" in node:
            check_keys(node, str(key), also=READ_BY_THE_BUILDER.get(str(key), ()))
    check_field("trust_checkpoint", cfg.get("trust_checkpoint", False), bool, {})
