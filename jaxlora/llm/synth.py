"""Synthetic training formats for each unit of a corpus: QA, summary, rewrite, paraphrase, mixes.

The study (docs/study.md §4) trained adapters on a unit's original text and on LLM-written formats
of it: a rewrite, a paraphrase, 5 summaries, 20 QA pairs, list formats (facts, propositions,
implications, relational QA) and mixes of these, written by Qwen3-8B at temperature 0.6,
top-p 0.9. Those are the defaults here (`PRESETS`); every setting and every prompt can be
changed (`synth:` config section, `jaxlora synth` flags, or `SynthConfig` in Python).

A format has a *kind*, which says what one generation yields and how it is parsed:

- `text` (summary, rewrite, paraphrase): one item per request, the reply with any `<think>`
  block removed; an empty reply is a failure. `count` items take `count` requests, each with
  its own seed, so 5 summaries are 5 samples.
- `qa` (qa, relational_qa): the reply must hold JSON, `{"pairs": [{"question", "answer"}]}`
  or a bare list (fenced, with prose around, or after `<think>`, see `common.extract_json`);
  a request asks for up to `per_request` pairs. A reply with no JSON list, or with no valid
  pair, is a failed generation; malformed pairs inside valid JSON are counted as
  `invalid_items`. Nothing is guessed from prose.
- `list` (facts, propositions, implications): as `qa`, with strings (`{"items": [...]}`).
- `original`: the unit's own text, no request.

Generation runs in rounds. Round 0 asks for what each (unit, format) needs; every later round
(up to `max_attempts` rounds in all) asks again, with new seeds, for what is still missing:
failed requests (`LLMFailure`), unparseable replies and QA replies with fewer pairs than
asked -- except a (unit, format) whose request failed for good (`retryable=False`: a 4xx
such as a prompt too long), which is not asked again. What is still missing after the last round is *reported*, per unit and format, in
`synth_report.json` (requested, produced, failed requests and their reasons), never dropped
silently. A request's seed is a function of (round, request index, unit index) only, and the
backends draw each item with its own seed, so results do not depend on batching, and every
result is cached (`common.CachedBackend`): a rerun, or a run resumed after Ctrl-C or a crash,
asks only for what is not yet stored and writes the same files as an uninterrupted run.

Outputs (one jsonl per format and per mix, in the layouts `jaxlora train` reads):

- text-like formats: `{"text", "unit_id", "format", "index"}` -> `data.dataset: text`;
- QA formats: `{"question", "answer", "text", ...}`, read as `data.dataset: qa` (a chat turn,
  question as user, answer as assistant) or as `text` ("Question: q\\nAnswer: a");
- a mix `{name: {total, parts: {format: proportion}}}` takes, per unit, `total` items split by
  proportion (largest remainder) from the first items of each part's pool; its records all
  have `text` (QA items also keep question/answer), so `data.dataset: text` reads it; as a
  document dataset's `data.train_path` (a synth directory), each record trains by its own kind
  (QA items as turns, the rest as text).

Every record carries `unit_id` and `unit_hash` (`jaxlora.data.units.text_hash` of the text it
was written from; and the unit's `title` / `document` when given), so units stay separable:
`data.document_field: unit_id` with `data.units: documents` trains one adapter per unit.

Units are a jsonl file, or a run config (`synth_config.config_units`): the documents or chunks
that config trains, with the ids training gives them, and `units_from` in the report (the
config, its model and chunk settings). That config with `data.train_path` this directory then
trains each document's or chunk's adapter on its own records (the study's per-chunk summaries
and QA for NarrativeQA and QuALITY), and a directory cut with other chunk settings is refused.
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxlora.data.units import text_hash
from jaxlora.errors import ConfigError, DataError
from jaxlora.llm.common import (
    CachedBackend,
    ResultCache,
    extract_json,
    fill,
    render_template,
    strip_thinking,
)
from jaxlora.llm.synth_config import (
    MAX_REQUESTS,
    PRESETS,
    FormatSpec,
    MixSpec,
    SynthConfig,
    Unit,
    check_units,
    config_units,
    read_units,
)

if TYPE_CHECKING:
    from jaxlora.llm.backends import Backend

# Seeds: request slot k (= round * MAX_REQUESTS + request index) of unit u draws with
# (base + k * _UNIT_STRIDE) mod _SEED_SPACE + u, below 2**31 for up to _MAX_UNITS units. Past
# _UNIT_STRIDE units, two units may share a seed; their prompts differ, so nothing repeats.
_UNIT_STRIDE = 1 << 16
_MAX_UNITS = 1 << 24
_SEED_SPACE = (1 << 31) - _MAX_UNITS

__all__ = [
    "PRESETS",
    "FormatSpec",
    "MixSpec",
    "SynthConfig",
    "SynthResult",
    "Unit",
    "read_units",
    "synthesize",
    "write_outputs",
]


@dataclasses.dataclass
class _Pool:
    """The items of one (unit, format) and what it took to get them."""

    need: int
    items: list[Any] = dataclasses.field(default_factory=list)
    requests: int = 0
    llm_failures: int = 0
    parse_failures: int = 0
    invalid_items: int = 0
    errors: Counter = dataclasses.field(default_factory=Counter)
    final: bool = False  # a request failed for good: asking again cannot succeed

    def report(self) -> dict[str, Any]:
        produced = min(len(self.items), self.need)
        return {
            "requested": self.need,
            "produced": produced,
            "short": self.need - produced,
            "requests": self.requests,
            "failed": self.llm_failures + self.parse_failures,
            "llm_failures": self.llm_failures,
            "parse_failures": self.parse_failures,
            "invalid_items": self.invalid_items,
            "errors": dict(self.errors),
        }


@dataclasses.dataclass
class SynthResult:
    """The records of each written format and mix, and the report."""

    files: dict[str, list[dict[str, Any]]]
    report: dict[str, Any]


def synthesize(
    units: Sequence[Unit],
    config: SynthConfig,
    backend: Backend,
    *,
    cache: ResultCache | str | Path | None = None,
    progress: bool = False,
) -> SynthResult:
    """Write every format of `config` for every unit through `backend` (see module docstring).

    `cache` is a `ResultCache`, the path of one, or None (no cache)."""
    check_units(units)
    if len(units) > _MAX_UNITS:
        raise DataError(f"{len(units)} units: synth takes at most {_MAX_UNITS} per run")
    if isinstance(cache, str | Path):
        cache = ResultCache(cache)
    llm = backend if isinstance(backend, CachedBackend) else CachedBackend(backend, cache)
    needs = config.needs()
    pools = {(u.id, f.name): _Pool(needs[f.name]) for u in units for f in config.formats}
    for f in config.formats:
        if f.kind == "original":  # the unit itself, repeated when a mix asks for more
            for u in units:
                pools[(u.id, f.name)].items = [u.text] * needs[f.name]
    from tqdm.auto import tqdm

    bar = tqdm(desc="synth", unit="req", total=0, disable=not progress)
    hits0, misses0 = llm.hits, llm.misses
    try:
        for rnd in range(config.max_attempts):
            asked = _round(llm, units, config, pools, rnd, bar)
            if not asked:
                break
    finally:
        bar.close()
    report = _report(units, config, pools, llm, hits0, misses0)
    files = _records(units, config, pools)
    for name, recs in files.items():
        entry = report["formats"].get(name) or report["mixes"][name]
        entry["file"], entry["records"] = f"{name}.jsonl", len(recs)
    return SynthResult(files, report)


def _round(llm, units, config: SynthConfig, pools, rnd: int, bar) -> int:
    """Ask, in batches, for what every pool still misses; returns the number of requests."""
    # (format, request index) -> [(unit index, messages, n asked)]; units in file order, so
    # a batch's seeds are consecutive (see `_seed`) and one call covers many units.
    groups: dict[tuple[str, int], list[tuple[int, list[dict[str, str]], int]]] = {}
    for f in config.formats:
        if f.kind == "original":
            continue
        for ui, u in enumerate(units):
            if pools[(u.id, f.name)].final:
                continue
            short = pools[(u.id, f.name)].need - len(pools[(u.id, f.name)].items)
            for j in range(math.ceil(short / f.per_request) if short > 0 else 0):
                n = min(f.per_request, short - j * f.per_request)
                groups.setdefault((f.name, j), []).append((ui, _messages(f, u, n), n))
    total = sum(len(g) for g in groups.values())
    bar.total += total
    bar.refresh()
    results: dict[tuple[str, int, int], str | Any] = {}
    for (name, j), items in groups.items():
        f = config.spec(name)
        if j >= MAX_REQUESTS:
            raise ConfigError(f"synth.formats.{name}: more than {MAX_REQUESTS} requests per unit")
        for start in range(0, len(items), config.batch_size):
            chunk = items[start : start + config.batch_size]
            outs = _generate(llm, f, chunk, _seed(config.seed, rnd, j))
            for (ui, _, _), out in zip(chunk, outs, strict=True):
                results[(name, j, ui)] = out
            bar.update(len(chunk))
    # Items join their pool in request order, whatever order the batches ran in.
    for (name, j), items in groups.items():
        f = config.spec(name)
        for ui, _, n in items:
            _absorb(pools[(units[ui].id, name)], f, results[(name, j, ui)], n)
    return total


def _seed(base: int, rnd: int, j: int) -> int:
    """The seed of unit 0's request j in round rnd; unit u's is this + u. Distinct for every
    (round, request) of one unit, so repeated requests (5 summaries, retries) differ."""
    return (base + (rnd * MAX_REQUESTS + j) * _UNIT_STRIDE) % _SEED_SPACE


def _generate(llm, f: FormatSpec, chunk, seed0: int) -> list:
    """One call per run of consecutive unit indices: item i of a call gets seed + i."""
    outs: list = []
    a = 0
    while a < len(chunk):
        b = a + 1
        while b < len(chunk) and chunk[b][0] == chunk[b - 1][0] + 1:
            b += 1
        outs.extend(llm.chat([c[1] for c in chunk[a:b]], f.params(seed0 + chunk[a][0])))
        a = b
    return outs


def _messages(f: FormatSpec, u: Unit, n: int) -> list[dict[str, str]]:
    values = {"text": u.text, "title": u.title or "", "unit_id": u.id, "n": str(n)}
    user = render_template(f.template, values)
    return ([{"role": "system", "content": f.system}] if f.system else []) + [
        {"role": "user", "content": user}
    ]


def _absorb(pool: _Pool, f: FormatSpec, out: Any, n: int) -> None:
    """Parse one reply into the pool, counting what failed and why."""
    pool.requests += 1
    if not isinstance(out, str):  # LLMFailure
        pool.llm_failures += 1
        pool.errors[f"request failed: {out.error}"[:200]] += 1
        pool.final = pool.final or not out.retryable
        return
    items, invalid, error = parse_items(f.kind, out)
    pool.invalid_items += invalid
    if error is not None:
        pool.parse_failures += 1
        pool.errors[error] += 1
        return
    pool.items.extend(items[:n])


def parse_items(kind: str, text: str) -> tuple[list[Any], int, str | None]:
    """(items, invalid items, error) of one reply for a format kind; error None when usable."""
    if kind == "text":
        body = strip_thinking(text)
        return ([body], 0, None) if body else ([], 0, "empty reply")
    value = extract_json(text)
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if len(lists) == 1 else None
    if not isinstance(value, list):
        return [], 0, "no JSON list in the reply"
    items: list[Any] = []
    for x in value:
        if kind == "qa":
            ok = isinstance(x, dict) and all(
                isinstance(x.get(k), str) and x[k].strip() for k in ("question", "answer")
            )
            if ok:
                items.append((x["question"].strip(), x["answer"].strip()))
        elif isinstance(x, str) and x.strip():
            items.append(x.strip())
    invalid = len(value) - len(items)
    return items, invalid, (None if items else "no valid item in the JSON")


def _records(units, config: SynthConfig, pools) -> dict[str, list[dict[str, Any]]]:
    files: dict[str, list[dict[str, Any]]] = {}
    for name in config.written:
        f = config.spec(name)
        files[name] = [
            _record(u, f, i, item)
            for u in units
            for i, item in enumerate(pools[(u.id, name)].items[: f.count])
        ]
    for mix in config.mixes:
        files[mix.name] = [
            _record(u, config.spec(part), i, item)
            for u in units
            for part, k in mix.counts().items()
            for i, item in enumerate(pools[(u.id, part)].items[:k])
        ]
    return files


def _record(u: Unit, f: FormatSpec, index: int, item: Any) -> dict[str, Any]:
    extra = {k: v for k, v in (("title", u.title), ("document", u.document)) if v}
    meta = {"unit_id": u.id, "unit_hash": text_hash(u.text), "format": f.name, "index": index}
    meta.update(extra)
    if f.kind == "qa":
        question, answer = item
        question = fill(f.question_prefix, {"unit_id": u.id, "title": u.title or ""}) + question
        return {
            "question": question,
            "answer": answer,
            "text": f"Question: {question}\nAnswer: {answer}",
            **meta,
        }
    return {"text": item, **meta}


def _report(units, config: SynthConfig, pools, llm, hits0: int, misses0: int) -> dict[str, Any]:
    per_unit = {
        u.id: {f.name: pools[(u.id, f.name)].report() for f in config.formats} for u in units
    }
    formats: dict[str, dict[str, Any]] = {}
    for f in config.formats:
        entries = [per_unit[u.id][f.name] for u in units]
        total = (
            {k: sum(e[k] for e in entries) for k in entries[0] if k != "errors"} if entries else {}
        )
        errors: Counter = Counter()
        for e in entries:
            errors.update(e["errors"])
        total.update(
            kind=f.kind,
            units_short=sum(1 for e in entries if e["short"]),
            errors=dict(errors),
            written=f.name in config.written,
        )
        formats[f.name] = total
    mixes = {}
    for mix in config.mixes:
        want = mix.counts()
        got = sum(min(len(pools[(u.id, p)].items), k) for u in units for p, k in want.items())
        mixes[mix.name] = {
            "parts": dict(mix.parts),
            "per_unit": want,
            "requested": mix.total * len(units),
            "produced": got,
            "short": mix.total * len(units) - got,
        }
    written = [e for name, e in formats.items() if e["written"]] + list(mixes.values())
    return {
        "backend": llm.name,
        "units": len(units),
        # what was asked for and is missing from the written files: `jaxlora synth` exits 3
        # ("incomplete") when short > --allow-short x requested
        "requested": sum(e["requested"] for e in written),
        "short": sum(e["short"] for e in written),
        "cache": {"hits": llm.hits - hits0, "misses": llm.misses - misses0},
        "formats": formats,
        "mixes": mixes,
        "per_unit": per_unit,
    }


def write_outputs(result: SynthResult, out_dir: str | Path) -> list[Path]:
    """One jsonl per format and mix, and synth_report.json, each written atomically."""
    from jaxlora.fsutil import atomic_write

    out = Path(out_dir).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, recs in result.files.items():
        path = out / f"{name}.jsonl"
        atomic_write(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in recs))
        paths.append(path)
    atomic_write(out / "synth_report.json", json.dumps(result.report, indent=2) + "\n")
    return paths


def run_synth(
    source: str | Path,
    *,
    out: str | Path | None = None,
    formats: str | None = None,
    mixes: Sequence[str] = (),
    mix_total: int = 20,
    counts: Sequence[str] = (),
    templates: Sequence[str] = (),
    overrides: Mapping[str, Any] | None = None,
    llm: Mapping[str, Any] | None = None,
    seed: int | None = None,
    max_attempts: int | None = None,
    batch_size: int | None = None,
    cache: str | Path | None = None,
    progress: bool = True,
) -> tuple[Path, dict[str, Any]]:
    """`jaxlora synth`: SOURCE is a units jsonl, a run config (its units), or a YAML config with
    `llm:` and `synth:` sections (`synth.units`: either of the first two); flags (`formats`,
    `mixes` as `qa=0.5,summary=0.5`, `counts` and `templates` as FORMAT=VALUE, sampling
    `overrides`, `llm` settings) win over the config. Returns the output directory and the
    report."""
    from jaxlora.llm.backends import make_llm
    from jaxlora.llm.synth_config import parse_mix

    src = Path(source).expanduser()
    llm_section, section = None, {}
    if src.suffix.lower() in (".yaml", ".yml"):
        llm_section, section = _read_config(src)
        if not section.get("units"):
            raise ConfigError(
                f"{src}: synth.units is required (the units jsonl file, or a run config)"
            )
        units_path = Path(section["units"])
    else:
        units_path = src
    section = dict(section)
    if formats is not None:
        section["formats"] = [x.strip() for x in formats.split(",") if x.strip()]
    if mixes:
        parsed = [parse_mix(m, mix_total) for m in mixes]
        section["mixes"] = {m.name: {"total": m.total, "parts": dict(m.parts)} for m in parsed}
    fmts = section.get("formats") or []
    if isinstance(fmts, str):
        fmts = [x.strip() for x in fmts.split(",") if x.strip()]
    if isinstance(fmts, list):
        fmts = {name: {} for name in fmts}
    fmts = {k: dict(v or {}) for k, v in dict(fmts).items()}
    for flag, key, convert in (("--count", "count", int), ("--template", "template", str)):
        for item in counts if key == "count" else templates:
            name, sep, value = item.partition("=")
            if not sep or name not in fmts:
                raise ConfigError(
                    f"{flag} {item!r}: expected FORMAT={key.upper()} for one of the formats "
                    f"written ({', '.join(fmts) or 'none'})"
                )
            try:
                fmts[name][key] = convert(value)
            except ValueError:
                raise ConfigError(f"{flag} {item!r}: {value!r} is not an integer") from None
    section["formats"] = fmts
    for key, value in (("seed", seed), ("max_attempts", max_attempts), ("batch_size", batch_size)):
        if value is not None:
            section[key] = value
    if not (out or section.get("out")):
        raise ConfigError("no output directory: pass --out DIR (or set synth.out)")
    out_dir = Path(out or section["out"]).expanduser()
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"--out {out_dir} exists and is not a directory")
    cache_path = Path(cache or section.get("cache") or out_dir / "cache.sqlite").expanduser()
    section = {k: v for k, v in section.items() if k not in ("units", "out", "cache")}
    config = SynthConfig.from_dict(section, overrides=overrides)
    if units_path.suffix.lower() in (".yaml", ".yml"):
        units, units_from = config_units(units_path)
    else:
        units, units_from = read_units(units_path), {"file": str(units_path)}
    backend = make_llm(llm_section, dict(llm or {}))
    result_cache = ResultCache(cache_path)
    try:
        result = synthesize(units, config, backend, cache=result_cache, progress=progress)
    finally:
        result_cache.close()
    result.report["cache"]["path"] = str(cache_path)
    result.report["units_from"] = units_from
    write_outputs(result, out_dir)
    return out_dir, result.report


def _read_config(path: Path) -> tuple[dict | None, dict]:
    from jaxlora.llm.backends import read_yaml_section

    section = read_yaml_section(path, "synth")
    if section is None and read_yaml_section(path, "data") is not None:
        return None, {"units": str(path)}  # a run config: its units (its llm: is the judge's)
    if section is None:
        raise ConfigError(f"{path}: no synth: section (a mapping of settings), nor a run config")
    return read_yaml_section(path, "llm"), section


def summary_lines(report: Mapping[str, Any]) -> list[str]:
    """One line per written format and mix, for the terminal."""
    lines = []
    for name, e in {**report["formats"], **report["mixes"]}.items():
        if "records" not in e:
            continue  # generated only as part of a mix
        failed = f", {e['failed']} failed requests" if e.get("failed") else ""
        short = f", SHORT by {e['short']}" if e["short"] else ""
        lines.append(
            f"{name}: {e['records']} records ({e['produced']}/{e['requested']}{short}{failed})"
        )
    return lines
