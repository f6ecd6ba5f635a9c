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
import math
from collections.abc import Sequence
from typing import Any, ClassVar

from hydra.errors import InstantiationException
from hydra.utils import get_class, instantiate
from omegaconf import DictConfig

from ddpm.checks import matches, type_error
from ddpm.errors import ConfigError


def at_least(minimum: float, default: Any, *, note: str = "") -> Any:
    """A number >= minimum (None passes where the annotation allows it); `note` says what the bound means."""
    return dataclasses.field(default=default, metadata={"minimum": minimum, "note": note})


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


def build_settings(node: DictConfig) -> Any:
    """A settings dataclass from its config node (`_target_`): unknown keys are refused with the closest known
    one, and a bad value's ConfigError is raised as itself rather than wrapped in Hydra's exception."""
    cls = get_class(node._target_)
    section = getattr(cls, "SECTION", "") or node._target_
    known = [field.name for field in dataclasses.fields(cls)]
    for key in node:
        if not str(key).startswith("_") and key not in known:
            close = difflib.get_close_matches(str(key), known, n=1)
            hint = f"; did you mean {section}.{close[0]}?" if close else f"; the keys are {known}"
            raise ConfigError(f"{section}.{key} is not a setting of {section}{hint}")
    try:
        return instantiate(node, _convert_="all")
    except InstantiationException as error:
        if isinstance(error.__cause__, ConfigError):
            raise error.__cause__ from None
        raise
