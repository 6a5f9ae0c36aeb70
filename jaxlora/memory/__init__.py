"""Adapter memory: routing questions to units of knowledge and composing their adapters.

The merge API (`merge`, `MergeError`, `COMBINATION_TYPES` from jaxlora/memory/merging.py) is
loaded on first use, so that importing the pure-Python method grammar
(jaxlora/memory/grammar.py), as config validation does, loads no JAX."""

import importlib

__all__ = ["COMBINATION_TYPES", "MergeError", "merge"]


def __getattr__(name: str):
    if name in __all__:
        return getattr(importlib.import_module("jaxlora.memory.merging"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
