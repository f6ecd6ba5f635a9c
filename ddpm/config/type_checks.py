"""Type checks of config values against the annotations of the function they are passed to.

A value typed on the command line reaches a builder as whatever YAML made of it (`model.base_channels=abc` is
a string). Without a check it fails deep inside, as a TypeError that names neither the key nor the value.
"""

import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence

from omegaconf import ListConfig

from ddpm.config.errors import ConfigError


def matches(value: object, annotation: object) -> bool:
    """Whether `value` fits `annotation` (int, float, bool, str, X | None, Sequence[X]); others are not checked."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is bool:
        return isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is str:
        return isinstance(value, str)
    if origin in (list, tuple, Sequence) or annotation in (list, tuple):
        if not isinstance(value, (list, tuple, ListConfig)):
            return False
        item_types = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return len(item_types) != 1 or all(matches(item, item_types[0]) for item in value)
    return True


def describe(annotation: object) -> str:
    """int | None -> 'int or null'; Sequence[int] -> 'a list of int'."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(describe(option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return "null"
    if origin in (list, tuple, Sequence):
        items = [a for a in typing.get_args(annotation) if a is not Ellipsis]
        return f"a list of {describe(items[0])}" if len(items) == 1 else "a list"
    return getattr(annotation, "__name__", str(annotation))


def type_error(key: str, value: object, annotation: object) -> ConfigError:
    """The one message for a value of the wrong type."""
    return ConfigError(f"{key}={value!r} must be of type {describe(annotation)}")


def config_types(section: str) -> Callable:
    """Decorator: each argument that does not fit its annotation raises ConfigError naming `section.name`."""

    def decorate(function: Callable) -> Callable:
        signature = inspect.signature(function)
        hints = typing.get_type_hints(function)

        @functools.wraps(function)
        def checked(*args, **kwargs):
            for name, value in signature.bind(*args, **kwargs).arguments.items():
                if name in hints and not matches(value, hints[name]):
                    raise type_error(f"{section}.{name}", value, hints[name])
            return function(*args, **kwargs)

        return checked

    return decorate
