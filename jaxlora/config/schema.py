"""The schema engine of the run config: one rule per field, and one-line errors.

A section is a frozen dataclass whose fields each carry their whole specification: the type
hint, which one generic coercer walks, plus metadata from `rule` (a check such as
`POSITIVE`, a normaliser, why the field cannot be swept, its YAML name). `field_value` applies
that rule; `Section.__post_init__` runs it on every field, then the section's cross-field
`_check`. The same `field_value` checks `--set` values and sweep list elements
(`jaxlora.config.grid`), so the three paths cannot disagree about what is valid.

Errors travel up as `FieldError` (a path relative to where the problem was found, which each
layer prefixes) and leave as one `ConfigError` line, `SOURCE: dotted.key: problem`
(`config_error`), with the closest valid word from `did_you_mean`.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Sequence
from typing import Any, ClassVar, Literal

from jaxlora.errors import ConfigError

_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")


# --------------------------------------------------------------------------- errors


class FieldError(ConfigError):
    """A problem at a dotted path relative to where it was found; callers prefix the section
    and the source as the error travels up, so each layer only names what it knows."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" if path else problem)

    def within(self, prefix: str) -> FieldError:
        return FieldError(f"{prefix}.{self.path}" if self.path else prefix, self.problem)


def config_error(source: str, e: FieldError | str) -> ConfigError:
    return ConfigError(one_line(f"{source}: {e}"))


def one_line(text: str) -> str:
    return " ".join(text.split())


def show(value: Any) -> str:
    """A value as a user wrote it in YAML, on one line and short."""
    if value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, tuple | list):
        text = "[" + ", ".join(show(v) for v in value) + "]"
    else:
        text = repr(value)
    text = one_line(text)
    return text if len(text) <= 60 else text[:57] + "..."


def did_you_mean(word: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# --------------------------------------------------------------------------- field rules

Check = Callable[[Any, str], None]


@dataclasses.dataclass(frozen=True)
class Range:
    """A numeric bound, applied to each element when the value is a list (`layers`)."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = True

    def __call__(self, value: Any, path: str) -> None:
        if isinstance(value, tuple):
            for i, v in enumerate(value):
                self(v, f"{path}[{i}]")
            return
        low_ok = self.lo is None or (value > self.lo if self.lo_open else value >= self.lo)
        high_ok = self.hi is None or (value < self.hi if self.hi_open else value <= self.hi)
        if not (low_ok and high_ok):
            raise FieldError(path, f"must be {self.describe()}, got {show(value)}")

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


POSITIVE = Range(lo=0, lo_open=True)
NON_NEGATIVE = Range(lo=0)
UNIT = Range(lo=0, hi=1)  # [0, 1)
FRACTION = Range(lo=0, hi=1, lo_open=True, hi_open=False)  # (0, 1]


def non_empty(value: Any, path: str) -> None:
    if value in ("", ()):
        raise FieldError(path, "must not be empty")


def rule(
    check: Check | None = None,
    normalize: Callable[[Any], Any] | None = None,
    fixed: str | None = None,
    key: str | None = None,
) -> dict[str, Any]:
    """Field metadata beyond the type hint. `check` validates the coerced value (never None),
    `normalize` gives it a canonical form, `fixed` says why the field cannot be swept, `key`
    is its YAML name where that is not a Python name (`async`)."""
    return {"check": check, "normalize": normalize, "fixed": fixed, "key": key}


def _describe(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is tuple:
        return f"a list of {_PLURAL[args[0]]}"
    return _SINGULAR[tp]


_SINGULAR = {bool: "true or false", int: "an int", float: "a number", str: "a string"}
_SINGULAR[type(None)] = "null"
_PLURAL = {int: "ints", float: "numbers", str: "strings"}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """`value` as type hint `tp`: ints are not bools, floats take ints and numeric strings
    (PyYAML reads `5e-5`, with no dot, as a string), lists become tuples."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for alt in args:
            if alt is type(None):
                continue
            try:
                return _coerce(value, alt, path)
            except FieldError as e:
                errors.append(e)
        # An error inside a list element is more useful than "expected a or b".
        deeper = [e for e in errors if e.path != path]
        raise deeper[0] if deeper else FieldError(path, _expected(tp, value))
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        hint = did_you_mean(value, args) if isinstance(value, str) else ""
        raise FieldError(path, _expected(tp, value) + hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FieldError(path, _expected(tp, value))
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise FieldError(path, f"must be a finite number, got {show(value)}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):  # bool, str
        return value
    raise FieldError(path, _expected(tp, value))


def _expected(tp: Any, value: Any) -> str:
    return f"expected {_describe(tp)}; got {show(value)}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def field_value(cls: type, spec: dataclasses.Field, value: Any, path: str) -> Any:
    """The one rule of a field: coerce to its type, check, normalise."""
    value = _coerce(value, _hints(cls)[spec.name], path)
    if value is not None:
        if spec.metadata.get("check"):
            spec.metadata["check"](value, path)
        if spec.metadata.get("normalize"):
            value = spec.metadata["normalize"](value)
    return value


def yaml_key(spec: dataclasses.Field) -> str:
    return spec.metadata.get("key") or spec.name


# --------------------------------------------------------------------------- sections


class Section:
    """Shared behaviour of the section dataclasses: every field is checked against its rule
    on construction, then `_check` applies the rules that involve several fields."""

    # Why no field of this section can be swept (None: each field decides).
    _fixed: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = field_value(type(self), f, getattr(self, f.name), yaml_key(f))
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        pass

    @classmethod
    def yaml_fields(cls) -> dict[str, dataclasses.Field]:
        """YAML key -> field, in declaration order."""
        return {yaml_key(f): f for f in dataclasses.fields(cls)}

    @classmethod
    def why_fixed(cls, key: str) -> str | None:
        """None when the key may be swept, else the reason it cannot be."""
        return cls._fixed or cls.yaml_fields()[key].metadata.get("fixed")

    def to_dict(self) -> dict[str, Any]:
        return {yaml_key(f): plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


def plain(value: Any) -> Any:
    """YAML- and JSON-able form: tuples become lists."""
    return [plain(v) for v in value] if isinstance(value, tuple) else value
