"""The `synth:` section: which formats to write, how, and the mixes (see synth.py for what the
formats are). Parsed into frozen dataclasses with one-line errors that name the key.

    synth:
      units: data/units.jsonl        # {id, text[, title, document]} per line, or a run config:
      # units: configs/narrativeqa_memory_llama3_8b.yaml   # the units that run trains
      out: synth/                    # one jsonl per format and mix, synth_report.json
      formats: [qa, summary]         # preset names, or a mapping name -> options:
      # formats:
      #   qa: {count: 40, template: prompts/my_qa.txt, question_prefix: "[Paper ID: {unit_id}] "}
      #   claims: {kind: list, count: 8, template: prompts/claims.txt}
      mixes:
        qa_summary: {total: 20, parts: {qa: 0.5, summary: 0.5}}
      temperature: 0.6               # defaults for every format (a format's own options win)
      top_p: 0.9
      seed: 0
      max_attempts: 3                # rounds: the first and up to 2 retries of what is missing
      batch_size: 32                 # requests per backend call (cache commits per call)

Precedence, lowest first: the preset, the section's defaults, the format's own options, then
command-line flags (`overrides`). Paths (units, out, cache, templates) are relative to the
working directory, as `data.path` is in run configs.

Units from a run config (`config_units`): its data section read and cut as `jaxlora train`
cuts it (document selection, budget, `data.units`, its model's tokenizer), one unit per chunk
with `data.units: chunks`, else one per document, named as training names them, so that config
with `data.train_path` the synth directory gives every record to its own unit's adapter.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxlora.data.readers import jsonl_objects
from jaxlora.errors import ConfigError, DataError
from jaxlora.llm.common import load_template, template_presets

if TYPE_CHECKING:
    from jaxlora.llm.backends import GenParams

KINDS = ("text", "qa", "list", "original")
_JSON = {"json_mode": True}  # qa/list replies are JSON objects: ask for JSON mode
PRESETS: dict[str, dict[str, Any]] = {
    "original": {"kind": "original", "count": 1},
    "qa": {"kind": "qa", "count": 20, "per_request": 20, "max_tokens": 2048, **_JSON},
    "summary": {"kind": "text", "count": 5, "max_tokens": 512},
    "rewrite": {"kind": "text", "count": 1, "max_tokens": 1024},
    "paraphrase": {"kind": "text", "count": 1, "max_tokens": 1024},
    # The study's mix ingredients; it does not publish their counts, so 10 each.
    "facts": {"kind": "list", "count": 10, "per_request": 10, "max_tokens": 1024, **_JSON},
    "propositions": {"kind": "list", "count": 10, "per_request": 10, "max_tokens": 1024, **_JSON},
    "implications": {"kind": "list", "count": 10, "per_request": 10, "max_tokens": 1024, **_JSON},
    "relational_qa": {"kind": "qa", "count": 10, "per_request": 10, "max_tokens": 1024, **_JSON},
}
MAX_REQUESTS = 1000  # per unit, format and round: request j's seed slot is round * 1000 + j
SECTION_KEYS = (
    "units", "out", "cache", "formats", "mixes", "seed", "max_attempts", "batch_size",
    "temperature", "top_p", "max_tokens", "system",
)  # fmt: skip
DEFAULT_KEYS = ("temperature", "top_p", "max_tokens", "system")


@dataclasses.dataclass(frozen=True)
class Unit:
    """One unit of knowledge to write formats of."""

    id: str
    text: str
    title: str | None = None
    document: str | None = None


@dataclasses.dataclass(frozen=True)
class FormatSpec:
    """How to write one format; see synth.py for what `kind` means."""

    name: str
    kind: str
    count: int
    template: str = ""  # the user prompt, with {text}, {title}, {unit_id}, {n}
    per_request: int = 1
    temperature: float = 0.6
    top_p: float = 0.9
    max_tokens: int = 1024
    json_mode: bool = False
    system: str | None = None
    question_prefix: str = ""  # qa kinds: prepended to each question ({unit_id}, {title})

    def __post_init__(self) -> None:
        where = f"synth.formats.{self.name}"
        if self.kind not in KINDS:
            raise ConfigError(f"{where}.kind: {self.kind!r} is not one of {', '.join(KINDS)}")
        for key, low in (("count", 0), ("per_request", 1), ("max_tokens", 1)):
            value = getattr(self, key)
            if not _is_int(value) or value < low:
                raise ConfigError(f"{where}.{key}: expected an integer >= {low}, got {value!r}")
        if self.kind == "text" and self.per_request != 1:
            raise ConfigError(f"{where}.per_request: a text format yields one item per request")
        if math.ceil(self.count / self.per_request) > MAX_REQUESTS:
            raise ConfigError(f"{where}.count: at most {MAX_REQUESTS} requests per unit")
        for key, lo, hi in (("temperature", 0.0, 2.0), ("top_p", 1e-9, 1.0)):
            value = getattr(self, key)
            if (
                not isinstance(value, int | float)
                or isinstance(value, bool)
                or not lo <= value <= hi
            ):
                raise ConfigError(
                    f"{where}.{key}: expected a number in [{lo:g}, {hi:g}], got {value!r}"
                )
        if self.kind != "original" and "{text}" not in self.template:
            raise ConfigError(f"{where}.template has no {{text}}: the model would not see the unit")

    def params(self, seed: int) -> GenParams:
        from jaxlora.llm.backends import GenParams

        return GenParams(
            max_tokens=self.max_tokens,
            temperature=float(self.temperature),
            top_p=float(self.top_p),
            json_mode=self.json_mode,
            seed=seed,
        )


@dataclasses.dataclass(frozen=True)
class MixSpec:
    """`total` items per unit, drawn from the formats in `parts` by proportion."""

    name: str
    total: int
    parts: tuple[tuple[str, float], ...]

    def counts(self) -> dict[str, int]:
        """Items per part: proportions (normalised) times total, by largest remainder."""
        weight = math.fsum(p for _, p in self.parts)
        exact = [(name, self.total * p / weight) for name, p in self.parts]
        counts = {name: math.floor(x) for name, x in exact}
        left = self.total - sum(counts.values())
        by_remainder = sorted(exact, key=lambda nx: nx[1] - math.floor(nx[1]), reverse=True)
        for name, _ in by_remainder[:left]:
            counts[name] += 1
        return counts


@dataclasses.dataclass(frozen=True)
class SynthConfig:
    """The formats written, the mixes, and how hard to try."""

    formats: tuple[FormatSpec, ...]  # every format generated (the written ones first)
    written: tuple[str, ...]  # formats with a file of their own
    mixes: tuple[MixSpec, ...] = ()
    seed: int = 0
    max_attempts: int = 3
    batch_size: int = 32

    @classmethod
    def from_dict(
        cls,
        section: Mapping[str, Any],
        base: str | Path | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> SynthConfig:
        """From a YAML mapping (module docstring); template paths are relative to `base` (the
        working directory by default); `overrides` (temperature, top_p, max_tokens, system)
        win over everything, as command-line flags do."""
        return _parse(section, Path(base) if base else Path.cwd(), dict(overrides or {}))

    def spec(self, name: str) -> FormatSpec:
        return next(f for f in self.formats if f.name == name)

    def needs(self) -> dict[str, int]:
        """Items per unit to generate for each format: its own count, or more for a mix."""
        need = {f.name: (f.count if f.name in self.written else 0) for f in self.formats}
        for mix in self.mixes:
            for name, k in mix.counts().items():
                need[name] = max(need[name], k)
        return need


def format_spec(name: str, options: Mapping[str, Any], base: Path) -> FormatSpec:
    """A preset (or a new format when `options` has `kind` and `template`) with options."""
    fields = {f.name for f in dataclasses.fields(FormatSpec)} - {"name"}
    _check_keys(options, fields, f"synth.formats.{name}")
    if name not in PRESETS and not ("kind" in options and "template" in options):
        raise ConfigError(
            f"synth.formats.{name}: not a preset ({', '.join(PRESETS)}); a new format needs "
            "kind (text, qa or list) and template"
        )
    merged = {**PRESETS.get(name, {}), **options}
    template = merged.get("template")
    if merged.get("kind") == "original":
        template = ""
    elif template is None:
        template = load_template(name)
    elif not isinstance(template, str) or not template:
        raise ConfigError(f"synth.formats.{name}.template: expected a preset name or a file path")
    elif template in template_presets():
        template = load_template(template)
    else:
        template = load_template(base / template)
    return FormatSpec(name=name, **{**merged, "template": template})


def _parse(section: Mapping[str, Any], base: Path, overrides: dict[str, Any]) -> SynthConfig:
    if not isinstance(section, Mapping):
        raise ConfigError(f"synth: expected a mapping of settings, got {section!r}")
    _check_keys(section, SECTION_KEYS, "synth")
    defaults = {k: section[k] for k in DEFAULT_KEYS if section.get(k) is not None}
    raw = section.get("formats") or []
    if isinstance(raw, str):
        raw = [x.strip() for x in raw.split(",") if x.strip()]
    if isinstance(raw, list):
        if not all(isinstance(x, str) for x in raw):
            raise ConfigError("synth.formats: expected format names or a mapping name -> options")
        raw = {x: {} for x in raw}
    if not isinstance(raw, Mapping):
        raise ConfigError("synth.formats: expected a list of names or a mapping name -> options")
    mixes = _mixes(section.get("mixes") or {})
    if not raw and not mixes:
        raise ConfigError(
            f"synth.formats: nothing to write; name formats ({', '.join(PRESETS)}) or mixes"
        )
    wanted = dict(raw)
    for mix in mixes:  # a mix's parts are generated even when not written on their own
        for part, _ in mix.parts:
            wanted.setdefault(part, None)
    specs = []
    for name, opts in wanted.items():
        if opts is not None and not isinstance(opts, Mapping):
            raise ConfigError(f"synth.formats.{name}: expected a mapping of options")
        spec = format_spec(str(name), {**defaults, **(opts or {}), **overrides}, base)
        specs.append(spec)
    names = {m.name for m in mixes} & set(map(str, raw))
    if names:
        raise ConfigError(f"synth.mixes.{sorted(names)[0]}: a mix and a format share the name")
    kw = {}
    for key, low in (("seed", 0), ("max_attempts", 1), ("batch_size", 1)):
        if section.get(key) is not None:
            if not _is_int(section[key]) or section[key] < low:
                raise ConfigError(
                    f"synth.{key}: expected an integer >= {low}, got {section[key]!r}"
                )
            kw[key] = section[key]
    return SynthConfig(tuple(specs), tuple(map(str, raw)), tuple(mixes), **kw)


def _mixes(raw: Any) -> list[MixSpec]:
    if not isinstance(raw, Mapping):
        raise ConfigError("synth.mixes: expected a mapping name -> {total, parts}")
    out = []
    for name, m in raw.items():
        where = f"synth.mixes.{name}"
        if not isinstance(m, Mapping):
            raise ConfigError(f"{where}: expected {{total: N, parts: {{format: proportion}}}}")
        _check_keys(m, ("total", "parts"), where)
        total, parts = m.get("total", 20), m.get("parts")
        if not _is_int(total) or total < 1:
            raise ConfigError(f"{where}.total: expected an integer >= 1, got {total!r}")
        if not isinstance(parts, Mapping) or not parts:
            raise ConfigError(f"{where}.parts: expected a mapping format -> proportion")
        for part, p in parts.items():
            if not isinstance(p, int | float) or isinstance(p, bool) or not p > 0:
                raise ConfigError(f"{where}.parts.{part}: expected a proportion > 0, got {p!r}")
        out.append(MixSpec(str(name), total, tuple((str(k), float(v)) for k, v in parts.items())))
    return out


def parse_mix(spec: str, total: int) -> MixSpec:
    """`qa=0.5,summary=0.5` (the `--mix` flag) -> a MixSpec named `mix_qa50_summary50`."""
    parts = []
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        try:
            p = float(value)
        except ValueError:
            p = -1.0
        if not sep or not name.strip() or not math.isfinite(p) or p <= 0:
            raise ConfigError(
                f"--mix {spec!r}: expected FORMAT=PROPORTION,... e.g. qa=0.5,summary=0.5"
            )
        parts.append((name.strip(), p))
    weight = math.fsum(p for _, p in parts)
    label = "_".join(f"{n}{round(100 * p / weight)}" for n, p in parts)
    return MixSpec(f"mix_{label}", total, tuple(parts))


def _check_keys(d: Mapping[str, Any], known, where: str) -> None:
    for key in d:
        if key not in known:
            near = difflib.get_close_matches(str(key), list(known), n=1)
            hint = (
                f"; did you mean {near[0]!r}?" if near else f"; known: {', '.join(sorted(known))}"
            )
            raise ConfigError(f"{where}.{key}: unknown key{hint}")


def config_units(path: str | Path) -> tuple[list[Unit], dict[str, Any]]:
    """The units a run config trains (module docstring) and what they were cut with (the
    report's `units_from`: config, model, dataset, unit kind and chunk settings)."""
    from jaxlora import data as kdata
    from jaxlora.config import load_config

    config = load_config(Path(path).expanduser())
    data = config.data
    data = dataclasses.replace(
        data,
        units="documents" if data.units == "none" else data.units,
        unit=None,
        format="text",  # the documents themselves, whatever the run trains on
        train_path=None,
    )
    tokenizer = _tokenizer(config.model.path)
    found = kdata.load_units(data, tokenizer)
    titles = kdata.load_document_set(data).titles if kdata.is_document_dataset(data) else {}
    units = [Unit(u.id, u.text, titles.get(u.document) or None, u.document) for u in found]
    source = {
        "config": str(path),
        "model": config.model.path,
        "dataset": data.dataset,
        "units": data.units,
        "unit_tokens": data.unit_tokens,
        "unit_overlap": data.unit_overlap,
    }
    return units, source


def _tokenizer(model: str):
    """The tokenizer a run of `model.path` cuts its units with, without its weights."""
    from jaxlora.models.presets import PRESETS

    p = Path(model).expanduser()
    if model in PRESETS and not p.exists():
        from jaxlora.models.tokenizer import train_tokenizer

        preset = PRESETS[model]
        return train_tokenizer(preset.tokenizer_style, preset.tokenizer_vocab)
    from transformers import AutoTokenizer

    from jaxlora.data.readers import first_line, quiet

    try:
        with quiet():
            return AutoTokenizer.from_pretrained(str(p) if p.exists() else model)
    except Exception as e:
        raise ConfigError(
            f"model.path {model}: no tokenizer to cut the units with ({first_line(e)})"
        ) from e


def read_units(path: str | Path, *, id_field: str = "id", text_field: str = "text") -> list[Unit]:
    """Units from a jsonl file of `{id, text[, title, document]}` objects."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise DataError(f"units file not found: {p}")
    units = []
    for n, row in jsonl_objects(p):
        # A run's units.jsonl names its units `unit`: read it as it is.
        uid = row.get(id_field, row.get("unit") if id_field == "id" else None)
        text = row.get(text_field)
        if not isinstance(uid, str | int) or isinstance(uid, bool) or str(uid) == "":
            raise DataError(f"{p} line {n}: no {id_field!r} (a string or an integer)")
        if not isinstance(text, str) or not text.strip():
            raise DataError(f"{p} line {n}: no {text_field!r} text")
        title, document = row.get("title"), row.get("document")
        units.append(
            Unit(
                str(uid),
                text,
                title if isinstance(title, str) and title.strip() else None,
                document if isinstance(document, str) and document.strip() else None,
            )
        )
    if not units:
        raise DataError(f"{p} has no units")
    check_units(units)
    return units


def check_units(units: Sequence[Unit]) -> None:
    seen: set[str] = set()
    for u in units:
        if u.id in seen:
            raise DataError(f"unit id {u.id!r} appears twice: unit ids must be unique")
        seen.add(u.id)


def _is_int(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)
