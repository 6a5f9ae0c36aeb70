"""The whole config: its sections by name and their dotted keys, the `sweep:` block's axes,
the adapter grid (`Cell`s), `Config` itself, and parsing a plain mapping into one.

A Config with a sweep stores the *first* value of every axis in the swept field, so every
Config, the grid included, describes one trainable adapter; a cell's config is built from the
same coerced values a plain load would produce (see the package docstring). Setting one key
(`Config.with_value`, `--set` through jaxlora/config/loading.py) checks it with the field's own
rule and refuses a plain value under a swept key.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

import yaml

from jaxlora.config.schema import (
    FieldError,
    Section,
    config_error,
    did_you_mean,
    field_value,
    one_line,
    plain,
    show,
    yaml_key,
)
from jaxlora.config.sections import (
    CheckpointSection,
    DataSection,
    DistillSection,
    EvalSection,
    LLMSection,
    LoRASection,
    MemorySection,
    MeshSection,
    ModelSection,
    TrainingSection,
)
from jaxlora.errors import ConfigError

# A file path is enough for this: a one-cell name stays readable, and long grids stay unique.
_MAX_NAME = 120
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


# --------------------------------------------------------------------------- sections by name


SECTIONS: dict[str, type[Section]] = {
    "model": ModelSection,
    "lora": LoRASection,
    "data": DataSection,
    "training": TrainingSection,
    "mesh": MeshSection,
    "checkpoint": CheckpointSection,
    "eval": EvalSection,
    "memory": MemorySection,
    "llm": LLMSection,
    "distill": DistillSection,
}
OPTIONAL_SECTIONS = ("eval", "memory", "llm", "distill")  # absent: that step does not run


def config_keys(*, sweepable: bool | None = None) -> tuple[str, ...]:
    """Every dotted key (`lora.rank`, ...), optionally only those that may (not) be swept."""
    return tuple(
        f"{name}.{key}"
        for name, cls in SECTIONS.items()
        for key in cls.yaml_fields()
        if sweepable is None or sweepable == (cls.why_fixed(key) is None)
    )


def lookup(key: str) -> tuple[str, type[Section], dataclasses.Field] | None:
    section, _, leaf = key.partition(".")
    cls = SECTIONS.get(section)
    if cls is None or leaf not in cls.yaml_fields():
        return None
    return section, cls, cls.yaml_fields()[leaf]


def parse_section(name: str, raw: Any, cls: type[Section] | None = None) -> Section:
    """One section from its YAML mapping (`cls`: a subclass of the section's class), with the
    same one-line errors as a whole file: `llm.modle: unknown key (did you mean llm.model?)`."""
    if raw is None:
        raise ConfigError(f"{name}: expected a mapping of settings, got nothing")
    try:
        return build_section(cls or SECTIONS[name], raw, name)
    except FieldError as e:
        raise ConfigError(one_line(str(e))) from None


def build_section(cls: type[Section], raw: Any, name: str) -> Section:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise FieldError(name, f"expected a mapping of keys, got {show(raw)}")
    keys = cls.yaml_fields()
    for key in raw:
        if key not in keys:
            raise FieldError("", unknown_key(f"{name}.{key}"))
    try:
        return cls(**{keys[key].name: value for key, value in raw.items()})
    except FieldError as e:
        raise e.within(name) from None


def unknown_key(key: str) -> str:
    return f"unknown key {key}{key_hint(key)}"


def key_hint(key: str) -> str:
    """The closest valid key: in the same section first; a bare field name (`rank`, as a
    top-level key or `--set rank=4`) points to its section before any fuzzy match."""
    section = key.partition(".")[0]
    if section in SECTIONS:
        candidates = [f"{section}.{k}" for k in SECTIONS[section].yaml_fields()]
        return did_you_mean(key, candidates) or did_you_mean(key, config_keys())
    owners = [k for k in config_keys() if k.partition(".")[2] == key]
    if owners:
        return f" (did you mean {owners[0]}?)"
    return did_you_mean(key, [*SECTIONS, "sweep"]) or did_you_mean(key, config_keys())


# --------------------------------------------------------------------------- sweep


def sweep_entry(key: Any, values: Any) -> tuple[str, tuple]:
    """(key, coerced values) of one sweep axis; errors carry paths such as sweep.lora.rank[2]."""
    if not isinstance(key, str) or lookup(key) is None:
        if isinstance(key, str) and key in SECTIONS and isinstance(values, Mapping):
            raise FieldError("", f"sweep keys are dotted paths: write {key}.KEY: [...]")
        raise FieldError("", f"sweep key {key} is not a config key{key_hint(str(key))}")
    _, cls, spec = lookup(key)
    reason = cls.why_fixed(yaml_key(spec))
    if reason:
        raise FieldError("", f"sweep key {key} cannot be swept: {reason}")
    path = f"sweep.{key}"
    if not isinstance(values, list | tuple):
        raise FieldError(path, f"expected a list of values, got {show(values)}")
    if not values:
        raise FieldError(path, "empty list; give at least one value")
    coerced: list[Any] = []
    for i, v in enumerate(values):
        v = field_value(cls, spec, v, f"{path}[{i}]")
        if v in coerced:
            raise FieldError(f"{path}[{i}]", f"duplicate value {show(v)}")
        coerced.append(v)
    return key, tuple(coerced)


def _render(value: Any) -> str:
    if isinstance(value, tuple):
        return "+".join(_render(v) for v in value)
    if value is None or isinstance(value, bool):
        return json.dumps(value)
    return str(value)


def _cell_name(values: Sequence[tuple[str, Any]]) -> str:
    name = "-".join(f"{key.rpartition('.')[2]}{_render(v)}" for key, v in values)
    name = _UNSAFE.sub("_", name)
    if len(name) > _MAX_NAME:  # stay far below file-name limits; the hash keeps names unique
        digest = hashlib.sha256(name.encode()).hexdigest()[:10]
        name = f"{name[: _MAX_NAME - 11]}-{digest}"
    return name


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class Cell:
    """One adapter of the grid: a unique file-system-safe name, the swept values in sweep
    order, and the full config of that adapter (values applied, empty sweep)."""

    name: str
    values: tuple[tuple[str, Any], ...]
    config: Config


@dataclasses.dataclass(frozen=True)
class Config:
    """A whole run. `sweep` holds (dotted key, values) pairs in the order written; the first
    key varies slowest in `cells()`. `source` names the file in error messages and takes no
    part in equality or the fingerprint."""

    model: ModelSection = dataclasses.field(default_factory=ModelSection)
    lora: LoRASection = dataclasses.field(default_factory=LoRASection)
    data: DataSection = dataclasses.field(default_factory=DataSection)
    training: TrainingSection = dataclasses.field(default_factory=TrainingSection)
    mesh: MeshSection = dataclasses.field(default_factory=MeshSection)
    checkpoint: CheckpointSection = dataclasses.field(default_factory=CheckpointSection)
    eval: EvalSection | None = None
    memory: MemorySection | None = None
    llm: LLMSection | None = None
    distill: DistillSection | None = None
    sweep: tuple[tuple[str, tuple], ...] = ()
    source: str = dataclasses.field(default="<config>", compare=False, repr=False)

    def __post_init__(self) -> None:
        for name, cls in SECTIONS.items():
            value = getattr(self, name)
            if not isinstance(value, cls) and not (name in OPTIONAL_SECTIONS and value is None):
                raise config_error(self.source, f"{name}: expected a {cls.__name__}, got {value!r}")
        items = self.sweep.items() if isinstance(self.sweep, Mapping) else self.sweep
        try:
            sweep = tuple(sweep_entry(key, values) for key, values in items)
        except FieldError as e:
            raise config_error(self.source, e) from None
        object.__setattr__(self, "sweep", sweep)
        # Store the first value of each axis, so that this Config is itself a valid adapter.
        first = self._with_values([(key, values[0]) for key, values in sweep], where="sweep")
        for name in SECTIONS:
            object.__setattr__(self, name, getattr(first, name))
        if sweep:
            self.cells()  # every combination must be a valid config; fail now, not mid-job
        for name in ("eval", "memory"):
            if getattr(getattr(self, name), "judge", False) and self.llm is None:
                raise config_error(
                    self.source,
                    f"{name}.judge: the judge needs an llm: section (backend, model, ...)",
                )
        self._check_objective()
        if self.memory is not None and self.data.units == "none":
            raise config_error(
                self.source,
                "memory: needs a library of units: set data.units (sectors, documents, chunks "
                "or files), or remove the memory section",
            )

    def _check_objective(self) -> None:
        distilled = self.training.objective == "distill"
        if distilled and self.data.units == "none":
            raise config_error(
                self.source,
                "training.objective: distill: the teacher reads each adapter's unit as its "
                "context; set data.units (documents, chunks, sectors or files)",
            )
        if distilled and self.training.packing is True:
            raise config_error(
                self.source,
                "training.packing: true with training.objective: distill: the teacher's context "
                "goes before each row; set training.packing: auto or false",
            )

    def _with_values(self, values: Sequence[tuple[str, Any]], where: str) -> Config:
        """A copy with already coerced values applied and no sweep; cross-field errors name
        `where`."""
        updates: dict[str, dict[str, Any]] = {}
        for key, value in values:
            section, _, spec = lookup(key)
            updates.setdefault(section, {})[spec.name] = value
        sections = {}
        for name, fields in updates.items():
            try:
                sections[name] = dataclasses.replace(getattr(self, name), **fields)
            except FieldError as e:
                raise config_error(self.source, f"{where}: {e.within(name)}") from None
        if not sections and not self.sweep:
            return self
        return dataclasses.replace(self, sweep=(), **sections)

    @functools.cached_property
    def _cells(self) -> tuple[Cell, ...]:
        if not self.sweep:
            return (Cell("adapter", (), self),)
        keys = [key for key, _ in self.sweep]
        cells, seen = [], set()
        for index, combo in enumerate(itertools.product(*(values for _, values in self.sweep))):
            values = tuple(zip(keys, combo, strict=True))
            name = _cell_name(values)
            config = self._with_values(values, where=f"sweep cell {name}")
            while name in seen:  # only values that differ in unsafe characters get here
                name = f"{name}-{index}"
            seen.add(name)
            cells.append(Cell(name, values, config))
        return tuple(cells)

    def cells(self) -> list[Cell]:
        """The adapter grid: Cartesian product of the sweep, first key slowest; one cell
        named `adapter` when there is no sweep."""
        return list(self._cells)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict that `parse_config` reads back into an equal Config."""
        out: dict[str, Any] = {
            name: None if getattr(self, name) is None else getattr(self, name).to_dict()
            for name in SECTIONS
        }
        out["sweep"] = {key: plain(values) for key, values in self.sweep}
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def fingerprint(self) -> str:
        """sha256 of the canonical JSON of `to_dict()`: equal configs, equal fingerprints.
        Keys are sorted except the sweep's, whose order is the order of the cells."""
        canonical = self.to_dict()
        canonical["sweep"] = [[key, values] for key, values in canonical["sweep"].items()]
        text = json.dumps(canonical, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(text.encode()).hexdigest()

    def replace(self, **sections: Any) -> Config:
        """A copy with whole sections (or `sweep`) replaced, validated like a parsed file."""
        unknown = set(sections) - {*SECTIONS, "sweep"}
        if unknown:
            name = sorted(unknown)[0]
            raise config_error(self.source, f"unknown section {name}{key_hint(name)}")
        return dataclasses.replace(self, **sections)

    def with_value(self, dotted_key: str, value: Any) -> Config:
        """A copy with one key set, exactly as `--set dotted_key=value` would: `lora.rank`,
        a whole section (`eval`), or a sweep axis (`sweep.lora.rank`, None removes it)."""
        raw = self.to_dict()
        set_raw(raw, dotted_key, value, where=self.source)
        check_shadowed(raw, [dotted_key], where=self.source)
        return parse_config(raw, self.source)


# --------------------------------------------------------------------------- parsing a mapping


def parse_config(raw: Mapping | None, source: str = "<config>") -> Config:
    """A validated Config from a parsed YAML mapping; `source` names it in errors."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise config_error(source, f"expected a mapping of sections, got {show(raw)}")
    for name in raw:
        if name not in SECTIONS and name != "sweep":
            raise config_error(source, f"unknown section {name}{key_hint(str(name))}")
    try:
        sweep = raw.get("sweep") or {}
        if not isinstance(sweep, Mapping):
            raise FieldError("sweep", f"expected a mapping of key: [values], got {show(sweep)}")
        entries = [sweep_entry(key, values) for key, values in sweep.items()]
        raws = {name: raw.get(name) for name in SECTIONS}
        raws["data"] = _resolve_budget(raws["data"], {key for key, _ in entries})
        # The first value of each axis goes into the base sections (see Config): a section
        # that is only valid with its swept values (dataset: text with a swept path) still is.
        for key, values in entries:
            section, _, leaf = key.partition(".")
            if isinstance(raws[section], Mapping | None):
                raws[section] = {**(raws[section] or {}), leaf: values[0]}
        sections: dict[str, Any] = {
            name: None
            if name in OPTIONAL_SECTIONS and raws[name] is None
            else build_section(cls, raws[name], name)
            for name, cls in SECTIONS.items()
        }
    except FieldError as e:
        raise config_error(source, e) from None
    config = Config(**sections, sweep=tuple(entries), source=source)
    if config.distill is not None and all(
        c.config.training.objective != "distill" for c in config.cells()
    ):
        raise config_error(
            source,
            "distill: no adapter has training.objective: distill; set it (or sweep "
            "training.objective: [ntp, distill]), or remove the distill section",
        )
    return config


def _resolve_budget(data: Any, swept: set[str]) -> Any:
    """Writing a row budget (plainly or as a sweep) drops the default token budget, so that
    `size_rows: 100` alone means what it says; both written non-null stays an error."""
    if not isinstance(data, Mapping | None):
        return data
    data = dict(data or {})
    if "size_tokens" in data and "data.size_rows" in swept and data["size_tokens"] is not None:
        raise FieldError(
            "sweep.data.size_rows",
            f"data.size_tokens is also set ({show(data['size_tokens'])}); set "
            "data.size_tokens: null to budget by rows",
        )
    if "data.size_tokens" in swept and (
        data.get("size_rows") is not None or "data.size_rows" in swept
    ):
        raise FieldError(
            "sweep.data.size_tokens",
            "data.size_rows is also set; budget by tokens or by rows, not both",
        )
    rows_given = data.get("size_rows") is not None or "data.size_rows" in swept
    if rows_given and "size_tokens" not in data:
        data["size_tokens"] = None
    return data


def set_raw(raw: dict, key: str, value: Any, where: str) -> None:
    """Set a dotted key in a raw config dict, checking the key and (for a field or a sweep
    axis) the value with the field's own rule."""
    parts = key.split(".")
    try:
        if parts[0] == "sweep" and len(parts) > 1:
            axis = ".".join(parts[1:])
            sweep = dict(raw.get("sweep") or {})
            if value is None:
                sweep.pop(axis, None)
            else:
                sweep[axis] = sweep_entry(axis, value)[1]
            raw["sweep"] = sweep
        elif len(parts) == 1 and (key in SECTIONS or key == "sweep"):
            raw[key] = value
        elif len(parts) == 2 and lookup(key) is not None:
            _, cls, spec = lookup(key)
            field_value(cls, spec, value, key)
            section = raw.get(parts[0])
            section = dict(section) if isinstance(section, Mapping) else {}
            section[parts[1]] = value
            raw[parts[0]] = section
        else:
            raise FieldError("", unknown_key(key))
    except FieldError as e:
        raise config_error(where, e) from None


def check_shadowed(raw: Mapping, keys: Sequence[str], where: str) -> None:
    # A plain value under a swept key would be silently ignored: say so instead.
    sweep = raw.get("sweep") or {}
    for key in keys:
        if key in sweep:
            raise config_error(
                where,
                f"{key} is swept; set sweep.{key}=[...] instead, or remove the axis first "
                f"with sweep.{key}=null",
            )
