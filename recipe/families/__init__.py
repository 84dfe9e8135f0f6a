"""The model families the recipe fine-tunes: one module per family in this package, found by name.

A family is a :class:`~recipe.families.family.Family` subclass in its own module here; adding one
touches no other file of the recipe (only its Hydra config group ``conf/model/<name>.yaml`` and its
test fixture).
"""

from __future__ import annotations

import importlib
import inspect
import pkgutil

from recipe.families.family import MAX_SEQUENCE_LENGTH, Family


def _discover() -> dict[str, Family]:
    """Every family defined in this package's modules, by name."""
    found: dict[str, Family] = {}
    for module in pkgutil.iter_modules(__path__):
        loaded = importlib.import_module(f"{__name__}.{module.name}")
        for _, cls in inspect.getmembers(loaded, inspect.isclass):
            if issubclass(cls, Family) and cls is not Family and cls.__module__ == loaded.__name__:
                found[cls.name] = cls()
    return found


FAMILIES: dict[str, Family] = _discover()


def family(name: str) -> Family:
    """The family called ``name`` (``model.family``), or an error naming the choices."""
    if name not in FAMILIES:
        raise ValueError(f"model.family={name!r} is not one of {sorted(FAMILIES)}")
    return FAMILIES[name]


__all__ = ["FAMILIES", "MAX_SEQUENCE_LENGTH", "Family", "family"]
