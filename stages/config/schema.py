"""Checks that every params schema class shares: a key that must be there with
a type, and no key that the schema does not know.

Messages name the key with its full dotted path, so a user can find it.
"""

from __future__ import annotations

from typing import Any

from stages.core.errors import ReleaseError


def need(data: Any, key: str, where: str, kind: type | tuple[type, ...]) -> Any:
    """``data[key]``, which must exist and be of ``kind``."""
    if not isinstance(data, dict):
        raise ReleaseError(f"params: `{where}` must be a mapping, got {type(data).__name__}")
    if key not in data:
        raise ReleaseError(f"params: `{where}.{key}` is missing")
    value = data[key]
    # bool is an int in Python; a YAML `true` is never a count or a threshold.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
        raise ReleaseError(
            f"params: `{where}.{key}` must be {names}, got {type(value).__name__} ({value!r})"
        )
    return value


def unknown(data: dict, allowed: set[str], where: str) -> None:
    """Fail on the first key of ``data`` that is not in ``allowed``."""
    extra = sorted(set(data) - allowed)
    if extra:
        raise ReleaseError(
            f"params: unknown key `{where}.{extra[0]}`; allowed keys: {', '.join(sorted(allowed))}"
        )


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)
