"""Run configuration: a YAML file parsed into frozen, validated dataclasses, and its `sweep:`
block expanded into the adapter grid.

A run file holds one mapping per section (`model`, `lora`, `data`, `training`, `mesh`,
`checkpoint`, `eval`) and a `sweep:` block mapping dotted keys to lists of values; the
Cartesian product of those lists is the set of adapters one job trains. `configs/README.md`
documents every key.

The package, bottom up: `schema` (the field rules, the coercer and the one-line errors),
`sections` (each section's fields and checks), `grid` (the sections by name, sweep axes,
cells, `Config`, parsing a mapping) and `loading` (YAML files and `--set` overrides).

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

from jaxlora.config.grid import SECTIONS, Cell, Config, config_keys, parse_config, parse_section
from jaxlora.config.loading import apply_overrides, load_config
from jaxlora.config.sections import (
    LINEAR_MODULES,
    TARGET_GROUPS,
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

__all__ = [
    "LINEAR_MODULES",
    "SECTIONS",
    "TARGET_GROUPS",
    "Cell",
    "CheckpointSection",
    "Config",
    "DataSection",
    "DistillSection",
    "EvalSection",
    "LLMSection",
    "LoRASection",
    "MemorySection",
    "MeshSection",
    "ModelSection",
    "TrainingSection",
    "apply_overrides",
    "config_keys",
    "load_config",
    "parse_config",
    "parse_section",
]
