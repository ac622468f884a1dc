"""One canonical name per documented method, mapped to the class that implements it.

    @register("distiller", "kd")
    class KDTerm(LossTerm): ...

    build("distiller", "kd", temperature=4.0)

An unknown kind or name is an error listing the close matches. Modules register themselves when
their package is imported; `toolkit/__init__.py` imports every package so the registry is complete.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

KINDS = ("distiller", "loss", "selector", "callback", "optimizer", "scheduler", "model", "data")

_REGISTRY: dict[str, dict[str, Any]] = {k: {} for k in KINDS}


def _check_kind(kind: str) -> dict[str, Any]:
    if kind not in _REGISTRY:
        close = difflib.get_close_matches(kind, KINDS, n=3, cutoff=0.4)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown kind {kind!r}; kinds are {', '.join(KINDS)}.{hint}")
    return _REGISTRY[kind]


def register(kind: str, name: str) -> Callable[[Any], Any]:
    """Class/function decorator registering `obj` as `kind`/`name`. Names are unique per kind."""
    table = _check_kind(kind)

    def deco(obj: Any) -> Any:
        if name in table and table[name] is not obj:
            raise KeyError(f"{kind} {name!r} is already registered to {table[name]!r}")
        table[name] = obj
        return obj

    return deco


def names(kind: str) -> list[str]:
    """Registered names of one kind, sorted."""
    return sorted(_check_kind(kind))


def get(kind: str, name: str) -> Any:
    """The registered class or factory, or a KeyError naming the close matches."""
    table = _check_kind(kind)
    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3, cutoff=0.5)
        hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise KeyError(f"unknown {kind} {name!r}.{hint} Registered {kind} names: {', '.join(sorted(table))}")
    return table[name]


def build(kind: str, name: str, **kwargs: Any) -> Any:
    """Build the `kind` registered under `name` with keyword arguments."""
    return get(kind, name)(**kwargs)
