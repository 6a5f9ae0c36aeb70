"""Run configuration: a YAML file parsed into frozen, validated dataclasses, and its `sweep:`
block expanded into the adapter grid.

A run file holds one mapping per section (`model`, `lora`, `data`, `training`, `mesh`,
`checkpoint`, `eval`) and a `sweep:` block mapping dotted keys to lists of values; the
Cartesian product of those lists is the set of adapters one job trains. `configs/README.md`
documents every key.

Design:

- **One rule per field.** A field's type hint (`int`, `float | None`, a `Literal`,
  `tuple[int, ...]`, ...) plus its metadata (a range check, a normaliser, why it cannot be
  swept) is its whole specification, and one generic coercer walks the hint. The same rule
  runs in each section's `__post_init__`, on `--set` values and on every element of a sweep
  list, so these three paths cannot disagree about what is valid.
- **Invalid objects cannot exist.** Sections check themselves on construction, cross-field
  rules included, so `dataclasses.replace` cannot build a bad section either.
- **A grid is a valid config.** A Config with a sweep stores the *first* value of every axis in
  the swept field, so every Config, the grid included, describes one trainable adapter, and a
  plain value written under a swept key is shadowed rather than half-used.
- **Cells equal plain configs.** `Cell.config` is built from the same coerced values a plain
  load would produce, so a cell equals (`==` and fingerprint) the config read from the same
  file with the sweep removed and the cell's values written as plain keys. The trainer relies
  on this to check resumes and to compare a batched job with single-adapter runs.
- **One-line errors** of the form `SOURCE: dotted.key: problem`, with the closest valid key
  (difflib) for a misspelling, raised as `ConfigError`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import functools
import hashlib
import itertools
import json
import math
import re
import types
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import field
from pathlib import Path
from typing import Any, ClassVar, Literal

import yaml

from jaxlora.errors import ConfigError

Dtype = Literal["float32", "bfloat16", "float16"]
Remat = Literal["none", "block"]
InitKind = Literal["kaiming", "gaussian"]
DatasetKind = Literal["phonebook", "counterfact", "text", "qa", "paperqa", "narrativeqa", "quality"]
PaperHeader = Literal["bracket", "natural", "none"]
Leakage = Literal["error", "drop"]
LossMask = Literal["full", "completion_only"]
Schedule = Literal["cosine", "linear", "constant"]
Layout = Literal["auto", "groups", "padded"]
EvalPrompt = Literal["continuation", "question"]
UnitKind = Literal["none", "sectors", "documents", "chunks", "files"]
Truncate = Literal["head", "tail"]
Scope = Literal["global", "document"]
Pooling = Literal["mean", "last"]
MergeWeights = Literal["study", "mean", "ones"]
SignMethod = Literal["total", "frequency"]
Objective = Literal["ntp", "distill"]
DistillPreset = Literal["release_a", "release_b", "knowledge_modules"]
L1Norm = Literal["layer_mean", "sum_ratio"]

# The same names as jaxlora.models.transformer.LINEAR_MODULES and jaxlora.lora.TARGET_GROUPS
# (a test keeps them equal), repeated here so that reading a config never imports JAX.
LINEAR_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
TARGET_GROUPS = ("all-linear", "attention", "mlp")

# A file path is enough for this: a one-cell name stays readable, and long grids stay unique.
_MAX_NAME = 120
_NUMBER = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?")
_UNSAFE = re.compile(r"[^A-Za-z0-9._+=-]")


# --------------------------------------------------------------------------- errors


class _FieldError(ConfigError):
    """A problem at a dotted path relative to where it was found; callers prefix the section
    and the source as the error travels up, so each layer only names what it knows."""

    def __init__(self, path: str, problem: str):
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem}" if path else problem)

    def within(self, prefix: str) -> _FieldError:
        return _FieldError(f"{prefix}.{self.path}" if self.path else prefix, self.problem)


def _error(source: str, e: _FieldError | str) -> ConfigError:
    return ConfigError(_one_line(f"{source}: {e}"))


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: Any) -> str:
    """A value as a user wrote it in YAML, on one line and short."""
    if value is None or isinstance(value, bool):
        text = json.dumps(value)
    elif isinstance(value, str):
        text = repr(value)
    elif isinstance(value, tuple | list):
        text = "[" + ", ".join(_show(v) for v in value) + "]"
    else:
        text = repr(value)
    text = _one_line(text)
    return text if len(text) <= 60 else text[:57] + "..."


def _did_you_mean(word: str, candidates: Sequence[str]) -> str:
    match = difflib.get_close_matches(word, candidates, n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""


# --------------------------------------------------------------------------- field rules

Check = Callable[[Any, str], None]


@dataclasses.dataclass(frozen=True)
class _Range:
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
            raise _FieldError(path, f"must be {self.describe()}, got {_show(value)}")

    def describe(self) -> str:
        if self.hi is None:
            return f"{'>' if self.lo_open else '>='} {self.lo:g}"
        if self.lo is None:
            return f"{'<' if self.hi_open else '<='} {self.hi:g}"
        left, right = "(" if self.lo_open else "[", ")" if self.hi_open else "]"
        return f"in {left}{self.lo:g}, {self.hi:g}{right}"


POSITIVE = _Range(lo=0, lo_open=True)
NON_NEGATIVE = _Range(lo=0)
UNIT = _Range(lo=0, hi=1)  # [0, 1)
FRACTION = _Range(lo=0, hi=1, lo_open=True, hi_open=False)  # (0, 1]


def _non_empty(value: Any, path: str) -> None:
    if value in ("", ()):
        raise _FieldError(path, "must not be empty")


# data.format: text, qa, qa_user, or a format or mix of a `jaxlora synth` directory (its file stem).
_DOC_FORMAT = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")


def _check_doc_format(value: Any, path: str) -> None:
    if not _DOC_FORMAT.fullmatch(value):
        raise _FieldError(
            path,
            "must be text, qa, qa_user, text_qa or a format of a jaxlora synth directory (letters, "
            f"digits, '_', '.', '-'), got {_show(value)}",
        )


def _positive_or_auto(value: int | str, path: str) -> None:
    if value != "auto":
        POSITIVE(value, path)


def _check_buckets(value: str | tuple[int, ...], path: str) -> None:
    if isinstance(value, tuple):
        if not value:
            raise _FieldError(path, "empty list; give rank ceilings such as [8, 64], or auto")
        POSITIVE(value, path)
        if list(value) != sorted(set(value)):
            raise _FieldError(path, f"rank ceilings must increase, got {list(value)}")


def _mesh_axis(value: int, path: str) -> None:
    if value != -1 and value <= 0:
        raise _FieldError(path, f"must be > 0, or -1 for all remaining devices; got {value}")


def _check_targets(value: str | tuple[str, ...], path: str) -> None:
    # A single string may name a group; list elements must be modules (`q` means `q_proj`).
    if isinstance(value, str):
        if value in TARGET_GROUPS or _module_name(value) in LINEAR_MODULES:
            return
        valid = [*TARGET_GROUPS, *LINEAR_MODULES]
        raise _FieldError(
            path,
            f"unknown LoRA target {value!r}{_did_you_mean(value, valid)}; use one of "
            f"{', '.join(valid)}, or a list of module names",
        )
    if not value:
        raise _FieldError(path, "empty list; name at least one module or use all-linear")
    for i, name in enumerate(value):
        if _module_name(name) not in LINEAR_MODULES:
            raise _FieldError(
                f"{path}[{i}]",
                f"unknown module {name!r}{_did_you_mean(name, LINEAR_MODULES)}; a list names "
                f"modules from {', '.join(LINEAR_MODULES)}",
            )


def _module_name(name: str) -> str:
    return name if name.endswith("_proj") else f"{name}_proj"


def _normalize_targets(value: str | tuple[str, ...]) -> str | tuple[str, ...]:
    # Canonical spelling, so that [v, q_proj] and [q_proj, v_proj] are the same config (and the
    # same fingerprint); groups stay as written because they read better in a run record.
    if isinstance(value, str):
        return value if value in TARGET_GROUPS else _module_name(value)
    names = {_module_name(n) for n in value}
    return tuple(m for m in LINEAR_MODULES if m in names)


def _check_layers(value: tuple[int, ...] | None, path: str) -> None:
    if value == ():
        raise _FieldError(path, "empty list; give layer indices, or null for every layer")
    NON_NEGATIVE(value, path)


def _sorted_unique(value: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(sorted(set(value)))


def _sorted_unique_or_name(value: str | tuple[int, ...]) -> str | tuple[int, ...]:
    return _sorted_unique(value) if isinstance(value, tuple) else value


def _rule(
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
            except _FieldError as e:
                errors.append(e)
        # An error inside a list element is more useful than "expected a or b".
        deeper = [e for e in errors if e.path != path]
        raise deeper[0] if deeper else _FieldError(path, _expected(tp, value))
    if origin is Literal:
        if isinstance(value, str) and value in args:
            return value
        hint = _did_you_mean(value, args) if isinstance(value, str) else ""
        raise _FieldError(path, _expected(tp, value) + hint)
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise _FieldError(path, _expected(tp, value))
        return tuple(_coerce(v, args[0], f"{path}[{i}]") for i, v in enumerate(value))
    if tp is float:
        if isinstance(value, str) and _NUMBER.fullmatch(value.strip()):
            value = float(value)
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise _FieldError(path, f"must be a finite number, got {_show(value)}")
            return float(value)
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(value, tp):  # bool, str
        return value
    raise _FieldError(path, _expected(tp, value))


def _expected(tp: Any, value: Any) -> str:
    return f"expected {_describe(tp)}; got {_show(value)}"


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _field_value(cls: type, spec: dataclasses.Field, value: Any, path: str) -> Any:
    """The one rule of a field: coerce to its type, check, normalise."""
    value = _coerce(value, _hints(cls)[spec.name], path)
    if value is not None:
        if spec.metadata.get("check"):
            spec.metadata["check"](value, path)
        if spec.metadata.get("normalize"):
            value = spec.metadata["normalize"](value)
    return value


def _yaml_key(spec: dataclasses.Field) -> str:
    return spec.metadata.get("key") or spec.name


# --------------------------------------------------------------------------- sections


class _Section:
    """Shared behaviour of the section dataclasses: every field is checked against its rule
    on construction, then `_check` applies the rules that involve several fields."""

    # Why no field of this section can be swept (None: each field decides).
    _fixed: ClassVar[str | None] = None

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            value = _field_value(type(self), f, getattr(self, f.name), _yaml_key(f))
            object.__setattr__(self, f.name, value)
        self._check()

    def _check(self) -> None:
        pass

    @classmethod
    def yaml_fields(cls) -> dict[str, dataclasses.Field]:
        """YAML key -> field, in declaration order."""
        return {_yaml_key(f): f for f in dataclasses.fields(cls)}

    @classmethod
    def why_fixed(cls, key: str) -> str | None:
        """None when the key may be swept, else the reason it cannot be."""
        return cls._fixed or cls.yaml_fields()[key].metadata.get("fixed")

    def to_dict(self) -> dict[str, Any]:
        return {_yaml_key(f): _plain(getattr(self, f.name)) for f in dataclasses.fields(self)}


@dataclasses.dataclass(frozen=True)
class ModelSection(_Section):
    """The frozen base model. `path` is resolved by `jaxlora.models.load_pretrained` (an HF
    directory, a hub id, a jaxlora-converted directory or a built-in preset), not here."""

    _fixed: ClassVar[str] = "all adapters of a job share one base model"

    path: str = field(default="tiny-llama", metadata=_rule(check=_non_empty))
    dtype: Dtype = "float32"
    param_dtype: Dtype | None = None  # None: same as dtype
    remat: Remat = "none"
    # The training step runs the layers as one lax.scan (one compiled block); same params.
    scan_layers: bool = False


@dataclasses.dataclass(frozen=True)
class LoRASection(_Section):
    """One adapter's LoRA hyperparameters; `alpha=None` means alpha = rank, resolved by
    `jaxlora.lora.LoRAConfig` so that a rank sweep keeps alpha/r = 1."""

    rank: int = field(default=8, metadata=_rule(check=POSITIVE))
    alpha: float | None = field(default=None, metadata=_rule(check=POSITIVE))
    targets: str | tuple[str, ...] = field(
        default="all-linear", metadata=_rule(check=_check_targets, normalize=_normalize_targets)
    )
    layers: tuple[int, ...] | None = field(
        default=None, metadata=_rule(check=_check_layers, normalize=_sorted_unique)
    )
    dropout: float = field(default=0.1, metadata=_rule(check=UNIT))
    use_rslora: bool = False
    init: InitKind = "kaiming"


_UNITS = "all adapters of a job are units of one corpus (data.unit is the unit axis)"


def _check_token_range(value: tuple[int | None, ...], path: str) -> None:
    for i, v in enumerate(value):
        if v is not None:
            NON_NEGATIVE(v, f"{path}[{i}]")
    low, high = value
    if low is not None and high is not None and low > high:
        raise _FieldError(path, f"MIN {low} is larger than MAX {high}")


@dataclasses.dataclass(frozen=True)
class DataSection(_Section):
    """The knowledge an adapter memorises. The budget is either `size_tokens` (tokens of the
    raw knowledge rows under the model's tokenizer, special tokens excluded) or `size_rows`;
    both None means the whole dataset."""

    dataset: DatasetKind = "phonebook"
    path: str | None = field(default=None, metadata=_rule(check=_non_empty))
    size_tokens: int | None = field(default=1000, metadata=_rule(check=POSITIVE))
    size_rows: int | None = field(default=None, metadata=_rule(check=POSITIVE))
    chat_template: bool = True
    loss_mask: LossMask = "full"
    max_length: int = field(default=128, metadata=_rule(check=POSITIVE))
    seed: int = 0
    text_field: str = field(default="text", metadata=_rule(check=_non_empty))
    question_field: str = field(default="question", metadata=_rule(check=_non_empty))
    answer_field: str = field(default="answer", metadata=_rule(check=_non_empty))
    # The column naming each row's document (units of documents and chunks are cut within it).
    document_field: str | None = field(default=None, metadata=_rule(check=_non_empty, fixed=_UNITS))
    # One adapter per unit of the corpus (jaxlora/data/units.py); the budget cuts the corpus.
    units: UnitKind = field(default="none", metadata=_rule(fixed=_UNITS))
    unit_count: int | None = field(default=None, metadata=_rule(check=POSITIVE, fixed=_UNITS))
    unit_tokens: int | None = field(default=None, metadata=_rule(check=POSITIVE, fixed=_UNITS))
    unit_overlap: int = field(default=0, metadata=_rule(check=NON_NEGATIVE, fixed=_UNITS))
    # A csv/json/jsonl file of `unit` and `key` columns: the text routers search (summaries).
    unit_keys: str | None = field(default=None, metadata=_rule(check=_non_empty, fixed=_UNITS))
    # The unit this adapter learns; the job sets it for every unit when it is null.
    unit: str | None = field(default=None, metadata=_rule(check=_non_empty))
    # Document datasets (paperqa, narrativeqa, quality; jaxlora/data/docsets.py): what an
    # adapter trains on, and the leakage guard between it and the evaluation questions.
    format: str = field(default="text", metadata=_rule(check=_check_doc_format))
    paper_header: PaperHeader = "bracket"
    question_prefix: PaperHeader = "none"
    train_path: str | None = field(default=None, metadata=_rule(check=_non_empty))
    split: str | None = field(default=None, metadata=_rule(check=_non_empty))
    leakage: Leakage = "error"
    # [MIN, MAX] tokens (the run's tokenizer, bounds inclusive, either null): the documents
    # kept, before the budget takes its first ones (the study's 35 books of 10-19K tokens).
    document_tokens: tuple[int | None, ...] | None = field(
        default=None, metadata=_rule(check=_check_token_range)
    )

    def __post_init__(self) -> None:
        # The shape first: the field's type names its elements, not the pair.
        value = self.document_tokens
        if value is not None and not (isinstance(value, list | tuple) and len(value) == 2):
            raise _FieldError(
                "document_tokens",
                f"must be [MIN, MAX] token counts (either may be null), got {_show(value)}",
            )
        super().__post_init__()

    def _check(self) -> None:
        self._check_units()
        self._check_documents()
        if self.size_tokens is not None and self.size_rows is not None:
            raise _FieldError(
                "size_rows",
                f"give either size_tokens ({self.size_tokens}) or size_rows "
                f"({self.size_rows}), not both; set the other to null",
            )
        # phonebook and the document datasets are generated when path is null (tiny corpora for
        # tests and the CI twins); counterfact, text and qa are always read.
        if self.path is None and self.dataset in ("counterfact", "text", "qa"):
            raise _FieldError(
                "path",
                f"dataset {self.dataset} needs a path (phonebook, paperqa, narrativeqa and "
                "quality are generated without one)",
            )

    def _check_documents(self) -> None:
        documents = ("paperqa", "narrativeqa", "quality")
        if self.dataset not in documents:
            keys = (("format", "text"), ("train_path", None), ("split", None))
            for key, default in (*keys, ("document_tokens", None)):
                if getattr(self, key) != default:
                    raise _FieldError(
                        key, "is for the document datasets paperqa, narrativeqa, quality"
                    )
            return
        if self.units == "files":
            raise _FieldError(
                "units", f"dataset {self.dataset} has documents: use documents or chunks"
            )
        # `text` is the documents (paperqa: or the {text} rows of a study train_path); any other
        # format is read from train_path, which a non-paperqa dataset only takes as a jaxlora
        # synth directory (checked when read: config parsing never touches the filesystem).
        # The generated PaperQA corpus (path null) has training QA of its own (jaxlora/data/
        # generated.py) for the formats of the study's training layout.
        generated = self.dataset == "paperqa" and self.path is None
        generated = generated and self.format in ("qa", "qa_user", "text_qa")
        if self.format != "text" and self.train_path is None and not generated:
            if self.dataset != "paperqa":
                raise _FieldError(
                    "format",
                    f"dataset {self.dataset} trains on its documents' text (format: text), or "
                    f"on format {self.format} of a jaxlora synth directory in data.train_path",
                )
            raise _FieldError(
                "train_path",
                f"format {self.format} needs the training QA (e.g. the study's paperqa_train "
                "sets) or a jaxlora synth directory: the paperQA.json questions are the "
                "evaluation set",
            )
        if self.dataset == "paperqa" and self.split is not None:
            raise _FieldError("split", "paperqa has one split (paperQA.json)")

    def _check_units(self) -> None:
        if self.units == "none":
            if self.unit is not None:
                raise _FieldError("unit", "selects a unit, but data.units is none")
            return
        if self.units == "sectors" and (self.unit_count is None) == (self.unit_tokens is None):
            raise _FieldError(
                "unit_count", "sectors need either unit_count (how many) or unit_tokens (how big)"
            )
        if self.units == "chunks":
            if self.unit_tokens is None:
                raise _FieldError("unit_tokens", "chunks need a size in tokens (e.g. 2048)")
            if self.unit_overlap >= self.unit_tokens:
                raise _FieldError(
                    "unit_overlap",
                    f"must be smaller than unit_tokens ({self.unit_tokens}), got "
                    f"{self.unit_overlap}",
                )
        if self.units == "files" and self.path is None:
            raise _FieldError("path", "data.units: files needs a glob in data.path")


_STEP_LOOP = "all adapters of a job share one step loop"
_STACKING = "the layout decides how all adapters of a job are stacked together"


@dataclasses.dataclass(frozen=True)
class TrainingSection(_Section):
    """Optimisation. Everything that is a number of the optimiser (lr, clipping, AdamW moments,
    seed) is per adapter and may be swept; what shapes the shared step loop is fixed."""

    steps: int = field(default=1500, metadata=_rule(check=POSITIVE, fixed=_STEP_LOOP))
    batch_size: int = field(default=8, metadata=_rule(check=POSITIVE, fixed=_STEP_LOOP))
    lr: float = field(default=5e-5, metadata=_rule(check=POSITIVE))
    schedule: Schedule = field(default="cosine", metadata=_rule(fixed=_STEP_LOOP))
    warmup_ratio: float = field(default=0.0, metadata=_rule(check=UNIT))
    weight_decay: float = field(default=0.01, metadata=_rule(check=NON_NEGATIVE))
    # Per-adapter global-norm clipping; None: none.
    clip_norm: float | None = field(default=1.0, metadata=_rule(check=POSITIVE))
    adam_b1: float = field(default=0.9, metadata=_rule(check=UNIT))
    adam_b2: float = field(default=0.999, metadata=_rule(check=UNIT))
    adam_eps: float = field(default=1e-8, metadata=_rule(check=POSITIVE))
    seed: int = 42
    # How adapters of different ranks share compiled stacks: groups (one per rank), padded
    # (one, zero-padded to the largest rank), a list of rank ceilings (one stack per bucket:
    # [8, 64] pads ranks <= 8 to 8 and the rest to 64), or auto: ranks share a bucket while
    # padding adds <= 5% to that bucket's FLOPs and <= 10% of a device's memory, and the job
    # stays within 90% of it (jaxlora.plan.choose_layout; logged, and the run's config.yaml
    # records the buckets).
    layout: Layout | tuple[int, ...] = field(
        default="auto", metadata=_rule(check=_check_buckets, fixed=_STACKING)
    )
    # Adapters of a group trained at once on each device; the rest of the group follows in
    # sequential passes of the same compiled step. None: all at once. auto: 1 on CPUs (cache-
    # sized activations, the fastest CPU setting measured), all at once on GPUs and TPUs.
    adapters_per_pass: int | Literal["auto"] | None = field(
        default="auto", metadata=_rule(check=_positive_or_auto, fixed=_STEP_LOOP)
    )
    # Rows of a step laid end to end in one sequence (segment ids; jaxlora/data/stream.py):
    # the same batch and loss without the padding. auto: when it saves >= 25% of positions and
    # no adapter has LoRA dropout (see jaxlora.data.stream.choose_packing).
    packing: bool | Literal["auto"] = field(default="auto", metadata=_rule(fixed=_STEP_LOOP))
    # What an adapter learns: next-token prediction of its data, or to make the base model
    # without its unit's text behave like the base with it in context (the distill: section).
    objective: Objective = "ntp"
    log_every: int = field(default=10, metadata=_rule(check=POSITIVE, fixed=_STEP_LOOP))


def _check_hidden_layers(value: str | tuple[int, ...], path: str) -> None:
    if value == ():
        raise _FieldError(path, "empty list; give hidden-state indices, all or last")
    if isinstance(value, tuple):
        NON_NEGATIVE(value, path)


_TEACHER = "one job computes its teacher one way"
# The study's two released variants and the Knowledge Modules paper's recipe (STUDY.md §6).
DISTILL_PRESETS: dict[str, dict[str, Any]] = {
    # (a): KL per response token, no T^2; L1 the mean over every hidden state of mean|s-t|/mean|t|.
    "release_a": dict(layers="all", l1_norm="layer_mean", t_squared=False, response_only=True),
    # (b): KL x T^2, L1 on the last layer as sum|s-t| / sum|t|, over every token of the sample.
    "release_b": dict(layers="last", l1_norm="sum_ratio", t_squared=True, response_only=False),
    # Caccia et al. 2025 (deep context distillation): the layer-mean L1 and KL over the sample.
    "knowledge_modules": dict(
        layers="all", l1_norm="layer_mean", t_squared=False, response_only=False
    ),
}
_DISTILL_COMMON = dict(temperature=2.0, kl_weight=1.0, l1_weight=0.1)


@dataclasses.dataclass(frozen=True)
class DistillSection(_Section):
    """The distillation objective (`training.objective: distill`; jaxlora/objectives.py). A key
    left null takes the preset's value; the preset itself fills keys and is not swept."""

    preset: DistillPreset = field(
        default="release_a", metadata=_rule(fixed="a preset fills the other keys; sweep those")
    )
    temperature: float | None = field(default=None, metadata=_rule(check=POSITIVE))
    kl_weight: float | None = field(default=None, metadata=_rule(check=NON_NEGATIVE))
    l1_weight: float | None = field(default=None, metadata=_rule(check=NON_NEGATIVE))
    # Hidden states in the L1 term: all (embeddings, every layer), last (the final-norm
    # output), or indices of transformers' hidden_states (0 embeddings ... num_layers).
    layers: Literal["all", "last"] | tuple[int, ...] | None = field(
        default=None, metadata=_rule(check=_check_hidden_layers, normalize=_sorted_unique_or_name)
    )
    l1_norm: L1Norm | None = None
    t_squared: bool | None = None
    # Distil on the loss mask's targets (the response) only, or on every token of the sample.
    response_only: bool | None = None
    # The teacher's outputs: computed in every step, or once per sample before training and
    # read back (host memory); auto caches when the cache fits `cache_gb` (logged).
    teacher: Literal["auto", "step", "cache"] = field(
        default="auto", metadata=_rule(fixed=_TEACHER)
    )
    cache_gb: float = field(default=2.0, metadata=_rule(check=POSITIVE, fixed=_TEACHER))

    def _check(self) -> None:
        for key, value in {**_DISTILL_COMMON, **DISTILL_PRESETS[self.preset]}.items():
            if getattr(self, key) is None:
                object.__setattr__(self, key, value)
        if self.kl_weight == 0 and self.l1_weight == 0:
            raise _FieldError("l1_weight", "kl_weight and l1_weight are both 0: nothing to learn")


@dataclasses.dataclass(frozen=True)
class MeshSection(_Section):
    """Device mesh axis sizes; -1 takes all devices the other axes leave."""

    _fixed: ClassVar[str] = "all adapters of a job share one device mesh"

    adapter: int = field(default=-1, metadata=_rule(check=_mesh_axis))
    fsdp: int = field(default=1, metadata=_rule(check=_mesh_axis))
    tensor: int = field(default=1, metadata=_rule(check=_mesh_axis))

    def _check(self) -> None:
        free = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) == -1]
        if len(free) > 1:
            raise _FieldError(free[1], f"at most one mesh axis may be -1 ({' and '.join(free)})")


@dataclasses.dataclass(frozen=True)
class CheckpointSection(_Section):
    """Orbax checkpointing of the whole job."""

    _fixed: ClassVar[str] = "all adapters of a job are checkpointed together"

    every_steps: int = field(default=500, metadata=_rule(check=POSITIVE))
    keep: int = field(default=2, metadata=_rule(check=POSITIVE))
    async_: bool = field(default=True, metadata=_rule(key="async"))


@dataclasses.dataclass(frozen=True)
class EvalSection(_Section):
    """Evaluation after training; the section itself is None when there is none."""

    _fixed: ClassVar[str] = "all adapters of a job are evaluated together"

    max_new_tokens: int = field(default=50, metadata=_rule(check=POSITIVE))
    # Questions per adapter per decoding batch.
    batch_size: int = field(default=64, metadata=_rule(check=POSITIVE))
    # CounterFact efficacy: score the target token as it follows the prompt (" Paris"), not the
    # bare word the original study compared.
    efficacy_leading_space: bool = True
    # How a row is asked: its training text up to the answer (recall of what was stored), or
    # the question alone as a fresh user turn.
    prompt: EvalPrompt = "continuation"
    # A separate question/answer file to evaluate on (csv/json/jsonl with the data section's
    # question and answer fields); null: each adapter is asked its own training knowledge.
    path: str | None = field(default=None, metadata=_rule(check=_non_empty))
    # Score every answer with the LLM judge (the llm: section) beside the metrics.
    judge: bool = False


def _memory_rule(check: str):
    """A check by jaxlora.memory.compose (imported when a memory section is read: the grammar of
    methods and templates lives with the code that runs them)."""

    def run(value: Any, path: str) -> None:
        from jaxlora.memory import compose

        values = value if isinstance(value, tuple) else (value,)
        for i, v in enumerate(values):
            try:
                getattr(compose, check)(v)
            except compose.MethodError as e:
                where = f"{path}[{i}]" if isinstance(value, tuple) else path
                raise _FieldError(where, str(e)) from None

    return run


@dataclasses.dataclass(frozen=True)
class MemorySection(_Section):
    """The adapter library as a memory, evaluated after training (or by `jaxlora memory`):
    every method (jaxlora/memory/compose.py) on every question, in batched passes."""

    _fixed: ClassVar[str] = "the memory is evaluated once, over the whole library"

    methods: tuple[str, ...] = field(
        default=("base", "oracle", "bm25", "bm25@3/ties", "base+icl", "base+rag@3"),
        metadata=_rule(check=_memory_rule("parse_method")),
    )
    # A csv/json/jsonl of questions (data.question_field / answer_field, and `unit` and/or
    # data.document_field columns); null: every unit's own questions.
    questions: str | None = field(default=None, metadata=_rule(check=_non_empty))
    # How a question is asked: as trained (a row's text up to its answer) or as a new user turn.
    prompt: EvalPrompt = "continuation"
    # A preset (phonebook, counterfact, paperqa, narrativeqa, quality) or a template with
    # {context} and {question}; auto: the preset of data.dataset (paperqa for qa/text).
    template: str = field(default="auto", metadata=_rule(check=_memory_rule("template_text")))
    unit_format: str = field(
        default="{text}", metadata=_rule(check=_memory_rule("check_unit_format"))
    )
    context_tokens: int = field(default=24576, metadata=_rule(check=POSITIVE))
    truncate: Truncate | None = None
    rag_router: Literal["bm25", "embedding"] = "bm25"
    scope: Scope = "global"
    # BM25 terms: words and runs of up to this many words. Pairs keep full names together: on
    # the study's 16 x 385-row PhoneBook sectors top-1 routing is 0.34 with words, 0.997 with
    # pairs (tests/test_routers.py).
    bm25_ngrams: int = field(default=2, metadata=_rule(check=_Range(lo=1, hi=2, hi_open=False)))
    # The embedding router: a Llama/Qwen checkpoint (null: the run's base model).
    encoder: str | None = field(default=None, metadata=_rule(check=_non_empty))
    pooling: Pooling = "mean"
    query_instruction: str | None = field(default=None, metadata=_rule(check=_non_empty))
    encoder_max_length: int = field(default=512, metadata=_rule(check=POSITIVE))
    # Embed only the first encoder_max_length tokens of a longer key (counted) instead of failing.
    encoder_truncate: bool = False
    # Merge weights per source: the study's (1/k for linear and delta_sum, 1 otherwise), 1/k, 1.
    merge_weights: MergeWeights = "study"
    density: float = field(default=0.5, metadata=_rule(check=FRACTION))
    majority_sign_method: SignMethod = "total"
    seed: int = 0
    max_new_tokens: int = field(default=50, metadata=_rule(check=POSITIVE))
    batch_size: int = field(default=64, metadata=_rule(check=POSITIVE))
    # Score every answer with the LLM judge (the llm: section) beside the metrics.
    judge: bool = False
    # QuALITY: also score each question by the log-likelihood of every option's text after the
    # prompt (one teacher-forced forward per option; loglik_accuracy, loglik_hard_accuracy).
    loglik: bool = True
    # Tokens (prompt + new, over the rows) of one decoding pass: long ICL prompts take fewer rows.
    max_batch_tokens: int = field(default=131072, metadata=_rule(check=POSITIVE))


@dataclasses.dataclass(frozen=True)
class LLMSection(_Section):
    """An LLM beside the model under study, for the judge (and `jaxlora synth`): the jaxlora
    model in process (`local`) or any OpenAI-compatible endpoint (`openai`); see
    jaxlora/llm/backends.py. `model` is a path, hub id, preset or run dir (local), or the
    endpoint's model name (openai)."""

    _fixed: ClassVar[str] = "one LLM serves the whole job"

    backend: Literal["local", "openai"] = "local"
    model: str | None = field(default=None, metadata=_rule(check=_non_empty))
    adapter: str | None = field(default=None, metadata=_rule(check=_non_empty))  # local
    dtype: Dtype | None = None  # local; null: the checkpoint's own or float32
    max_batch: int = field(default=32, metadata=_rule(check=POSITIVE))  # local: rows per pass
    base_url: str | None = field(default=None, metadata=_rule(check=_non_empty))  # openai
    # openai: the environment variable holding the key (null: OPENAI_API_KEY for
    # api.openai.com, no key for a base_url)
    api_key_env: str | None = field(default=None, metadata=_rule(check=_non_empty))
    max_concurrency: int = field(default=8, metadata=_rule(check=POSITIVE))  # openai
    timeout_s: float = field(default=120.0, metadata=_rule(check=POSITIVE))  # openai, per request
    max_retries: int = field(default=4, metadata=_rule(check=NON_NEGATIVE))  # openai
    backoff_s: float = field(default=1.0, metadata=_rule(check=NON_NEGATIVE))  # doubled per retry

    def _check(self) -> None:
        if self.model is None:
            raise _FieldError(
                "model", "required: a model path, preset or run dir, or the endpoint's model name"
            )
        if self.backend == "local" and (self.base_url or self.api_key_env):
            raise _FieldError(
                "base_url" if self.base_url else "api_key_env", "is for backend: openai"
            )
        if self.backend == "openai" and self.adapter:
            raise _FieldError(
                "adapter", "is for backend: local (an endpoint names its adapters as models)"
            )


SECTIONS: dict[str, type[_Section]] = {
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


def _plain(value: Any) -> Any:
    """YAML- and JSON-able form: tuples become lists."""
    return [_plain(v) for v in value] if isinstance(value, tuple) else value


# --------------------------------------------------------------------------- sweep


def _lookup(key: str) -> tuple[str, type[_Section], dataclasses.Field] | None:
    section, _, leaf = key.partition(".")
    cls = SECTIONS.get(section)
    if cls is None or leaf not in cls.yaml_fields():
        return None
    return section, cls, cls.yaml_fields()[leaf]


def _sweep_entry(key: Any, values: Any) -> tuple[str, tuple]:
    """(key, coerced values) of one sweep axis; errors carry paths such as sweep.lora.rank[2]."""
    if not isinstance(key, str) or _lookup(key) is None:
        if isinstance(key, str) and key in SECTIONS and isinstance(values, Mapping):
            raise _FieldError("", f"sweep keys are dotted paths: write {key}.KEY: [...]")
        raise _FieldError("", f"sweep key {key} is not a config key{_key_hint(str(key))}")
    _, cls, spec = _lookup(key)
    reason = cls.why_fixed(_yaml_key(spec))
    if reason:
        raise _FieldError("", f"sweep key {key} cannot be swept: {reason}")
    path = f"sweep.{key}"
    if not isinstance(values, list | tuple):
        raise _FieldError(path, f"expected a list of values, got {_show(values)}")
    if not values:
        raise _FieldError(path, "empty list; give at least one value")
    coerced: list[Any] = []
    for i, v in enumerate(values):
        v = _field_value(cls, spec, v, f"{path}[{i}]")
        if v in coerced:
            raise _FieldError(f"{path}[{i}]", f"duplicate value {_show(v)}")
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
                raise _error(self.source, f"{name}: expected a {cls.__name__}, got {value!r}")
        items = self.sweep.items() if isinstance(self.sweep, Mapping) else self.sweep
        try:
            sweep = tuple(_sweep_entry(key, values) for key, values in items)
        except _FieldError as e:
            raise _error(self.source, e) from None
        object.__setattr__(self, "sweep", sweep)
        # Store the first value of each axis, so that this Config is itself a valid adapter.
        first = self._with_values([(key, values[0]) for key, values in sweep], where="sweep")
        for name in SECTIONS:
            object.__setattr__(self, name, getattr(first, name))
        if sweep:
            self.cells()  # every combination must be a valid config; fail now, not mid-job
        for name in ("eval", "memory"):
            if getattr(getattr(self, name), "judge", False) and self.llm is None:
                raise _error(
                    self.source,
                    f"{name}.judge: the judge needs an llm: section (backend, model, ...)",
                )
        self._check_objective()
        if self.memory is not None and self.data.units == "none":
            raise _error(
                self.source,
                "memory: needs a library of units: set data.units (sectors, documents, chunks "
                "or files), or remove the memory section",
            )

    def _check_objective(self) -> None:
        distilled = self.training.objective == "distill"
        if distilled and self.data.units == "none":
            raise _error(
                self.source,
                "training.objective: distill: the teacher reads each adapter's unit as its "
                "context; set data.units (documents, chunks, sectors or files)",
            )
        if distilled and self.training.packing is True:
            raise _error(
                self.source,
                "training.packing: true with training.objective: distill: the teacher's context "
                "goes before each row; set training.packing: auto or false",
            )

    def _with_values(self, values: Sequence[tuple[str, Any]], where: str) -> Config:
        """A copy with already coerced values applied and no sweep; cross-field errors name
        `where`."""
        updates: dict[str, dict[str, Any]] = {}
        for key, value in values:
            section, _, spec = _lookup(key)
            updates.setdefault(section, {})[spec.name] = value
        sections = {}
        for name, fields in updates.items():
            try:
                sections[name] = dataclasses.replace(getattr(self, name), **fields)
            except _FieldError as e:
                raise _error(self.source, f"{where}: {e.within(name)}") from None
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
        out["sweep"] = {key: _plain(values) for key, values in self.sweep}
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
            raise _error(self.source, f"unknown section {name}{_key_hint(name)}")
        return dataclasses.replace(self, **sections)

    def with_value(self, dotted_key: str, value: Any) -> Config:
        """A copy with one key set, exactly as `--set dotted_key=value` would: `lora.rank`,
        a whole section (`eval`), or a sweep axis (`sweep.lora.rank`, None removes it)."""
        raw = self.to_dict()
        _set_raw(raw, dotted_key, value, where=self.source)
        _check_shadowed(raw, [dotted_key], where=self.source)
        return parse_config(raw, self.source)


# --------------------------------------------------------------------------- parsing


class _Loader(yaml.SafeLoader):
    """SafeLoader that rejects a repeated key instead of silently keeping the last one."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, typing.Hashable) and key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _load_yaml(text: str, source: str) -> Any:
    try:
        return yaml.load(text, Loader=_Loader)  # a SafeLoader: builds plain data only
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(e, "problem", None) or str(e)
        raise _error(source, f"invalid YAML at {where}{problem}") from None


def parse_section(name: str, raw: Any, cls: type[_Section] | None = None) -> _Section:
    """One section from its YAML mapping (`cls`: a subclass of the section's class), with the
    same one-line errors as a whole file: `llm.modle: unknown key (did you mean llm.model?)`."""
    if raw is None:
        raise ConfigError(f"{name}: expected a mapping of settings, got nothing")
    try:
        return _build_section(cls or SECTIONS[name], raw, name)
    except _FieldError as e:
        raise ConfigError(_one_line(str(e))) from None


def _build_section(cls: type[_Section], raw: Any, name: str) -> _Section:
    if raw is None:
        return cls()
    if not isinstance(raw, Mapping):
        raise _FieldError(name, f"expected a mapping of keys, got {_show(raw)}")
    keys = cls.yaml_fields()
    for key in raw:
        if key not in keys:
            raise _FieldError("", _unknown_key(f"{name}.{key}"))
    try:
        return cls(**{keys[key].name: value for key, value in raw.items()})
    except _FieldError as e:
        raise e.within(name) from None


def _unknown_key(key: str) -> str:
    return f"unknown key {key}{_key_hint(key)}"


def _key_hint(key: str) -> str:
    """The closest valid key: in the same section first; a bare field name (`rank`, as a
    top-level key or `--set rank=4`) points to its section before any fuzzy match."""
    section = key.partition(".")[0]
    if section in SECTIONS:
        candidates = [f"{section}.{k}" for k in SECTIONS[section].yaml_fields()]
        return _did_you_mean(key, candidates) or _did_you_mean(key, config_keys())
    owners = [k for k in config_keys() if k.partition(".")[2] == key]
    if owners:
        return f" (did you mean {owners[0]}?)"
    return _did_you_mean(key, [*SECTIONS, "sweep"]) or _did_you_mean(key, config_keys())


def parse_config(raw: Mapping | None, source: str = "<config>") -> Config:
    """A validated Config from a parsed YAML mapping; `source` names it in errors."""
    raw = {} if raw is None else raw
    if not isinstance(raw, Mapping):
        raise _error(source, f"expected a mapping of sections, got {_show(raw)}")
    for name in raw:
        if name not in SECTIONS and name != "sweep":
            raise _error(source, f"unknown section {name}{_key_hint(str(name))}")
    try:
        sweep = raw.get("sweep") or {}
        if not isinstance(sweep, Mapping):
            raise _FieldError("sweep", f"expected a mapping of key: [values], got {_show(sweep)}")
        entries = [_sweep_entry(key, values) for key, values in sweep.items()]
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
            else _build_section(cls, raws[name], name)
            for name, cls in SECTIONS.items()
        }
    except _FieldError as e:
        raise _error(source, e) from None
    config = Config(**sections, sweep=tuple(entries), source=source)
    if config.distill is not None and all(
        c.config.training.objective != "distill" for c in config.cells()
    ):
        raise _error(
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
        raise _FieldError(
            "sweep.data.size_rows",
            f"data.size_tokens is also set ({_show(data['size_tokens'])}); set "
            "data.size_tokens: null to budget by rows",
        )
    if "data.size_tokens" in swept and (
        data.get("size_rows") is not None or "data.size_rows" in swept
    ):
        raise _FieldError(
            "sweep.data.size_tokens",
            "data.size_rows is also set; budget by tokens or by rows, not both",
        )
    rows_given = data.get("size_rows") is not None or "data.size_rows" in swept
    if rows_given and "size_tokens" not in data:
        data["size_tokens"] = None
    return data


def _set_raw(raw: dict, key: str, value: Any, where: str) -> None:
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
                sweep[axis] = _sweep_entry(axis, value)[1]
            raw["sweep"] = sweep
        elif len(parts) == 1 and (key in SECTIONS or key == "sweep"):
            raw[key] = value
        elif len(parts) == 2 and _lookup(key) is not None:
            _, cls, spec = _lookup(key)
            _field_value(cls, spec, value, key)
            section = raw.get(parts[0])
            section = dict(section) if isinstance(section, Mapping) else {}
            section[parts[1]] = value
            raw[parts[0]] = section
        else:
            raise _FieldError("", _unknown_key(key))
    except _FieldError as e:
        raise _error(where, e) from None


def _check_shadowed(raw: Mapping, keys: Sequence[str], where: str) -> None:
    # A plain value under a swept key would be silently ignored: say so instead.
    sweep = raw.get("sweep") or {}
    for key in keys:
        if key in sweep:
            raise _error(
                where,
                f"{key} is swept; set sweep.{key}=[...] instead, or remove the axis first "
                f"with sweep.{key}=null",
            )


def apply_overrides(raw: Mapping | None, overrides: Sequence[str], source: str) -> dict:
    """A copy of `raw` with `--set KEY=VALUE` strings applied in order. VALUE is YAML
    (`[q_proj,v_proj]`, `null`, `{}`); KEY is a field (`training.lr`), a section (`eval`) or a
    sweep axis (`sweep.lora.rank`, `null` removes it)."""
    out = copy.deepcopy(dict(raw or {}))
    plain = []
    for override in overrides:
        where = f"{source}: --set {override}"
        key, sep, text = override.partition("=")
        key = key.strip()
        if not sep or not key:
            raise _error(where, "expected KEY=VALUE, e.g. --set training.lr=1e-4")
        _set_raw(out, key, _load_yaml(text, where), where)
        if key.split(".")[0] != "sweep":
            plain.append((key, where))
    for key, where in plain:
        _check_shadowed(out, [key], where)
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a run YAML file, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise _error(str(path), f"cannot read config file: {type(e).__name__}") from None
    raw = _load_yaml(text, str(path))
    if not raw:
        # An empty file is a mistake (a wrong path, an unsaved editor), not a request for the
        # default grid.
        raise _error(
            str(path),
            "the config is empty; start from configs/quickstart.yaml (every key: configs/README.md)",
        )
    if not isinstance(raw, Mapping):
        raise _error(str(path), f"expected a mapping of sections, got {_show(raw)}")
    return parse_config(apply_overrides(raw, overrides, str(path)), str(path))


__all__ = [
    "LINEAR_MODULES",
    "SECTIONS",
    "TARGET_GROUPS",
    "Cell",
    "CheckpointSection",
    "Config",
    "DataSection",
    "EvalSection",
    "LoRASection",
    "MeshSection",
    "ModelSection",
    "TrainingSection",
    "apply_overrides",
    "config_keys",
    "load_config",
    "parse_config",
]
