"""The one rule for the names of trajectories and bases.

A name becomes a folder (a key prefix) of the store, a part of file names the CLI writes next to
it, and text in messages, so it must be safe as all three on every backend: a letter or digit
first, then letters, digits, ``.``, ``_`` or ``-``, at most 128 characters in all. That excludes
``/`` and ``\\`` (nesting, and Zarr's and the direct writer's disagreement on them), a leading
``.`` (hidden and ``..``), whitespace and control characters, and names too long for a path
component of their own with suffixes added.

The rule is checked before any work starts (``create``, ``dldr(name=...)``) and on every name
read back from a store (a name in metadata is hostile input like any other).
"""

from __future__ import annotations

import re

from .errors import InvalidStoreError

__all__ = ["NAME_PATTERN", "check_name", "check_stored_name", "is_valid_name"]

NAME_PATTERN = r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}"
_NAME = re.compile(NAME_PATTERN)


def is_valid_name(name: object) -> bool:
    """Whether ``name`` is a string that follows the rule."""
    return isinstance(name, str) and _NAME.fullmatch(name) is not None


def check_name(name: object, what: str = "trajectory") -> str:
    """``name`` if it follows the rule; else ValueError naming the rule and the value."""
    if not is_valid_name(name):
        raise ValueError(f"{what} name must match {NAME_PATTERN} (a letter or digit, then letters, digits, "
                         f"'.', '_' or '-', at most 128 characters), got {name!r:.200}")
    return name  # type: ignore[return-value]


def check_stored_name(name: object, what: str, where: str) -> str:
    """A name read from a store: InvalidStoreError (damage or a hostile store) when it breaks the rule."""
    if not is_valid_name(name):
        raise InvalidStoreError(f"{where}: the stored {what} name {name!r:.200} does not match {NAME_PATTERN}")
    return name  # type: ignore[return-value]
