"""Adapter memory: routing questions to units of knowledge and composing their adapters."""

from jaxlora.memory.merging import COMBINATION_TYPES, MergeError, merge

__all__ = ["COMBINATION_TYPES", "MergeError", "merge"]
