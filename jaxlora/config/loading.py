"""Reading a run config: YAML text (a repeated key is an error, not a silent overwrite), a
file, and `--set KEY=VALUE` overrides, each value YAML and checked with its field's rule.
"""

from __future__ import annotations

import copy
import typing
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxlora.config.grid import Config, check_shadowed, parse_config, set_raw
from jaxlora.config.schema import config_error, show
from jaxlora.errors import ConfigError

# --------------------------------------------------------------------------- YAML


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
        raise config_error(source, f"invalid YAML at {where}{problem}") from None


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
            raise config_error(where, "expected KEY=VALUE, e.g. --set training.lr=1e-4")
        set_raw(out, key, _load_yaml(text, where), where)
        if key.split(".")[0] != "sweep":
            plain.append((key, where))
    for key, where in plain:
        check_shadowed(out, [key], where)
    return out


def load_config(path: str | Path, overrides: Sequence[str] = ()) -> Config:
    """Read a run YAML file, apply `--set` overrides, validate."""
    path = Path(path)
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise config_error(str(path), f"cannot read config file: {type(e).__name__}") from None
    raw = _load_yaml(text, str(path))
    if not raw:
        # An empty file is a mistake (a wrong path, an unsaved editor), not a request for the
        # default grid.
        raise config_error(
            str(path),
            "the config is empty; start from configs/quickstart.yaml (every key: configs/README.md)",
        )
    if not isinstance(raw, Mapping):
        raise config_error(str(path), f"expected a mapping of sections, got {show(raw)}")
    return parse_config(apply_overrides(raw, overrides, str(path)), str(path))
