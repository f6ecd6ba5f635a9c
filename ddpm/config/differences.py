"""Comparing resolved configs: which dotted keys differ, for messages that name them."""

from typing import Any


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"base_channels": 16}} -> {"model.base_channels": 16}; lists stay values."""
    if not isinstance(tree, dict):
        return {prefix: tree}
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        flat.update(flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def differences(old: dict[str, Any], new: dict[str, Any], sections: tuple[str, ...]) -> list[tuple[str, Any, Any]]:
    """(key, old value, new value) for every dotted key under `sections` whose value differs; <absent> if missing."""
    absent = "<absent>"
    flat_old = {k: v for s in sections for k, v in flatten(old.get(s, absent), s).items()}
    flat_new = {k: v for s in sections for k, v in flatten(new.get(s, absent), s).items()}
    keys = sorted(set(flat_old) | set(flat_new))
    return [
        (k, flat_old.get(k, absent), flat_new.get(k, absent))
        for k in keys
        if flat_old.get(k, absent) != flat_new.get(k, absent)
    ]


def describe(changes: list[tuple[str, Any, Any]], limit: int = 6) -> str:
    """ "model.base_channels: 16 -> 32, ..." for messages."""
    text = ", ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changes[:limit])
    return text + (f" and {len(changes) - limit} more" if len(changes) > limit else "")
