"""Build loss terms (and whole modules) from names and YAML-style dicts.

A terms spec is a mapping `name -> entry`, where an entry is one of
- a `LossTerm` instance (weight 1), or a `(LossTerm, weight)` pair;
- a registered name: "cross_entropy", "kd" (looked up as a loss, then as a distiller);
- a dict: `{"loss": "cross_entropy", "weight": 0.5, "label_smoothing": 0.1}` or
  `{"distiller": "kd", "weight": 0.5, "temperature": 4.0}`; `weight` may be a schedule dict.
A single entry (not a mapping of names) is accepted too and named after the method.
"""

from __future__ import annotations

import difflib
from collections.abc import Mapping
from typing import Any

from toolkit import registry
from toolkit.terms import LossTerm

TERM_KINDS = ("loss", "distiller")


def build_term(entry: Any) -> tuple[LossTerm, Any]:
    """(term, weight) from one entry of a terms spec."""
    if isinstance(entry, LossTerm):
        return entry, 1.0
    if isinstance(entry, tuple) and len(entry) == 2 and isinstance(entry[0], LossTerm):
        return entry
    if isinstance(entry, str):
        return _by_name(entry, {}), 1.0
    if isinstance(entry, Mapping):
        kw = dict(entry)
        weight = kw.pop("weight", 1.0)
        kinds = [k for k in TERM_KINDS if k in kw]
        if len(kinds) > 1 or (not kinds and "name" not in kw):
            raise ValueError(
                f"a term entry needs exactly one of 'loss', 'distiller' or 'name', got keys {sorted(entry)}"
            )
        if kinds:
            kind = kinds[0]
            return registry.build(kind, kw.pop(kind), **kw), weight
        return _by_name(kw.pop("name"), kw), weight
    raise TypeError(f"cannot build a loss term from {type(entry).__name__}: {entry!r}")


def _by_name(name: str, kwargs: dict[str, Any]) -> LossTerm:
    for kind in TERM_KINDS:
        if name in registry.names(kind):
            return registry.build(kind, name, **kwargs)
    # Neither kind has it: suggest close matches over both kinds.
    all_names = {n: k for k in TERM_KINDS for n in registry.names(k)}
    close = difflib.get_close_matches(name, list(all_names), n=3, cutoff=0.5)
    hint = f" Did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise KeyError(f"unknown loss or distiller {name!r}.{hint} Known: {', '.join(sorted(all_names))}")


def build_terms(spec: Any, default_name: str = "loss") -> dict[str, tuple[LossTerm, Any]]:
    """`{name: (term, weight)}` from a terms spec (see module docstring)."""
    if spec is None:
        return {}
    if isinstance(spec, Mapping) and not any(k in spec for k in (*TERM_KINDS, "name", "weight")):
        return {str(name): build_term(entry) for name, entry in spec.items()}
    return {default_name: build_term(spec)}
