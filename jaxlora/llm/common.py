"""What `synth` and `judge` share: a result cache, a caching backend, templates and JSON parsing.

Cache. Every request is keyed by sha256 of (backend name, call kind, prompt or messages, all
generation parameters, and the item's own seed unless the temperature is 0) and its text
stored in one SQLite file, committed after every batch the backend answers: a rerun, or a resume after Ctrl-C or a crash, asks the
backend only for what is not stored. SQLite rather than an append-only jsonl because a killed
writer can leave a torn last line in a text file, while a transaction is either in or not.
Failures (`LLMFailure`: a request the backend gave up on) are NOT stored: they are usually
transient (a server down, a rate limit), so the next run asks again; an unparseable text IS
stored, since asking again with the same seed would return the same text.

`CachedBackend` wraps any backend and implements the same interface, so the pipelines never see
the cache; it also counts hits and misses (the resume tests and the reports read them).

Templates are plain text with `{name}` placeholders replaced by value (other braces, such as a
JSON example in the prompt, stay as written); a line holding a placeholder whose value is empty
(a unit without a title) is left out, so one template serves units with and without titles.

JSON in generations. Models wrap JSON in prose, in ```json fences, or after a `<think>` block
(Qwen3). `extract_json` tries, in order: the whole text, each fenced block, then the first
balanced `{...}` or `[...]` that parses; it returns None when nothing does, and the caller
counts that as a failure rather than guessing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import re
import sqlite3
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

from jaxlora.errors import JaxloraError

if TYPE_CHECKING:
    from jaxlora.llm.backends import Backend, GenParams, LLMFailure, Message

__all__ = [
    "CachedBackend",
    "ResultCache",
    "extract_json",
    "load_template",
    "render_template",
    "strip_thinking",
]

_FENCE = re.compile(r"```[A-Za-z0-9_-]*[ \t]*\n?(.*?)```", re.DOTALL)
_THINK_CLOSE = "</think>"


class ResultCache:
    """Request key -> generated text, in one SQLite file. An existing file is opened (and
    checked) at once; a new one is created with the first answer stored, so a run that got no
    answer (a server that is not there) leaves no empty cache behind."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self._db: sqlite3.Connection | None = None
        if self.path.exists():
            self._open()

    def _open(self) -> sqlite3.Connection:
        if self._db is None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                db = sqlite3.connect(self.path)
                db.execute("CREATE TABLE IF NOT EXISTS results (key TEXT PRIMARY KEY, text TEXT)")
                db.commit()
            except (OSError, sqlite3.Error) as e:
                raise JaxloraError(f"cannot open the LLM cache {self.path}: {e}") from e
            self._db = db
        return self._db

    def get_many(self, keys: Sequence[str]) -> dict[str, str]:
        if self._db is None:  # no file yet: nothing stored
            return {}
        found: dict[str, str] = {}
        unique = list(dict.fromkeys(keys))
        for i in range(0, len(unique), 500):  # SQLite caps the number of bound parameters
            part = unique[i : i + 500]
            marks = ",".join("?" * len(part))
            rows = self._db.execute(f"SELECT key, text FROM results WHERE key IN ({marks})", part)
            found.update(rows.fetchall())
        return found

    def put_many(self, items: dict[str, str]) -> None:
        """Store and commit at once: what is committed survives a kill a moment later."""
        db = self._open()
        db.executemany("INSERT OR REPLACE INTO results VALUES (?, ?)", items.items())
        db.commit()

    def __len__(self) -> int:
        if self._db is None:
            return 0
        return int(self._db.execute("SELECT COUNT(*) FROM results").fetchone()[0])

    def close(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None


def request_key(backend_name: str, kind: str, payload: Any, params: GenParams) -> str:
    """sha256 of everything that determines a generation (the seed is one of the params)."""
    blob = json.dumps(
        {
            "backend": backend_name,
            "kind": kind,
            "input": payload,
            "params": dataclasses.asdict(params),
        },
        sort_keys=True,
        ensure_ascii=False,
    )
    return hashlib.sha256(blob.encode()).hexdigest()


class CachedBackend:
    """A backend whose answers are served from a `ResultCache` when stored there.

    The backends draw item i of a call with seed `params.seed + i` (backends.py), so an item's
    key holds its own seed, and the misses are sent in runs of consecutive positions, each
    with the seed of its first item: every item is generated with exactly the seed its key
    says, however many of its neighbours were cached. At temperature 0 the seed changes
    nothing, so it is left out of the key (re-judging the same answer anywhere is a hit) and
    the misses go in one call, identical requests asked once. Successful answers are committed
    before this returns."""

    def __init__(self, backend: Backend, cache: ResultCache | None):
        self.backend, self.cache = backend, cache
        self.name = backend.name
        self.hits = 0
        self.misses = 0

    def complete(self, prompts: Sequence[str], params: GenParams) -> list[str | LLMFailure]:
        return self._serve("complete", list(prompts), params, self.backend.complete)

    def chat(
        self, conversations: Sequence[Sequence[Message]], params: GenParams
    ) -> list[str | LLMFailure]:
        convs = [[dict(m) for m in c] for c in conversations]
        return self._serve("chat", convs, params, self.backend.chat)

    def _serve(self, kind: str, inputs: list, params: GenParams, call) -> list[str | LLMFailure]:
        seeded = params.temperature > 0
        keys = [
            request_key(
                self.name,
                kind,
                x,
                dataclasses.replace(params, seed=params.seed + i if seeded else 0),
            )
            for i, x in enumerate(inputs)
        ]
        stored = self.cache.get_many(keys) if self.cache is not None else {}
        missing = [i for i, k in enumerate(keys) if k not in stored]
        fresh: dict[str, str | LLMFailure] = {}
        if seeded:
            for a, b in _runs(missing):
                part = dataclasses.replace(params, seed=params.seed + a)
                fresh.update(zip(keys[a:b], self._call(call, inputs[a:b], part), strict=True))
        elif missing:
            first = {keys[i]: inputs[i] for i in reversed(missing)}
            fresh.update(zip(first, self._call(call, list(first.values()), params), strict=True))
        self.hits += len(keys) - len(missing)
        self.misses += len(fresh)
        ok = {k: v for k, v in fresh.items() if isinstance(v, str)}
        if self.cache is not None and ok:
            self.cache.put_many(ok)
        return [stored[k] if k in stored else fresh[k] for k in keys]

    def _call(self, call, inputs: list, params: GenParams) -> list[str | LLMFailure]:
        answers = call(inputs, params)
        if len(answers) != len(inputs):
            raise RuntimeError(
                f"backend {self.name!r} returned {len(answers)} results for {len(inputs)} requests"
            )
        return answers


def _runs(indices: list[int]) -> list[tuple[int, int]]:
    """[a, b) runs of consecutive integers in a sorted list."""
    runs: list[tuple[int, int]] = []
    for i in indices:
        if runs and runs[-1][1] == i:
            runs[-1] = (runs[-1][0], i + 1)
        else:
            runs.append((i, i + 1))
    return runs


def strip_thinking(text: str) -> str:
    """The answer part of a generation: what follows the last `</think>`; a `<think>` block
    that never closed means the model spent its budget thinking, so there is no answer."""
    if _THINK_CLOSE in text:
        return text.rsplit(_THINK_CLOSE, 1)[1].strip()
    if text.lstrip().startswith("<think>"):
        return ""
    return text.strip()


def extract_json(text: str, want: type | tuple[type, ...] = (dict, list)) -> Any | None:
    """The first JSON value of type `want` a generation holds (see the module docstring)."""
    text = strip_thinking(text)
    candidates = [text, *(m.group(1) for m in _FENCE.finditer(text))]
    for c in candidates:
        try:
            value = json.loads(c.strip())
        except ValueError:
            continue
        if isinstance(value, want):
            return value
    # Bounded: each start scans to its closing bracket, and gibberish can hold many brackets.
    starts = [i for i, ch in enumerate(text) if ch in "{["][:64]
    for start in starts:
        end = _balanced_end(text, start)
        if end is None:
            continue
        try:
            value = json.loads(text[start:end])
        except ValueError:
            continue
        if isinstance(value, want):
            return value
    return None


def _balanced_end(text: str, start: int) -> int | None:
    """Index after the bracket that closes text[start], skipping brackets inside strings."""
    depth, in_string, escaped = 0, False, False
    for i in range(start, len(text)):
        ch = text[i]
        if in_string:
            if escaped:
                escaped = False
            elif ch == "\\":
                escaped = True
            elif ch == '"':
                in_string = False
        elif ch == '"':
            in_string = True
        elif ch in "{[":
            depth += 1
        elif ch in "}]":
            depth -= 1
            if depth == 0:
                return i + 1
    return None


def load_template(name_or_path: str | Path) -> str:
    """A preset's template (`qa`, `summary`, ..., `judge`) or the text of a template file."""
    path = Path(name_or_path).expanduser()
    if path.suffix or path.is_file() or "/" in str(name_or_path):
        try:
            return path.read_text(encoding="utf-8")
        except OSError as e:
            raise JaxloraError(f"cannot read template {path}: {e.strerror or e}") from e
    res = resources.files("jaxlora.llm") / "prompts" / f"{name_or_path}.txt"
    if not res.is_file():
        raise JaxloraError(
            f"no template preset {str(name_or_path)!r}: name a preset "
            f"({', '.join(template_presets())}) or a template file"
        )
    return res.read_text(encoding="utf-8")


def template_presets() -> list[str]:
    folder = resources.files("jaxlora.llm") / "prompts"
    return sorted(p.name[:-4] for p in folder.iterdir() if p.name.endswith(".txt"))


def render_template(template: str, values: dict[str, str]) -> str:
    """Replace each `{name}` of `values`; lines whose placeholders are all empty are dropped."""
    pattern = _placeholders(values)
    lines = []
    for line in template.splitlines():
        used = [m.group(0)[1:-1] for m in pattern.finditer(line)]
        if used and all(not str(values[k]).strip() for k in used):
            continue
        lines.append(fill(line, values, pattern))
    out = "\n".join(lines)
    return re.sub(r"\n{3,}", "\n\n", out).strip() + "\n"


def fill(text: str, values: dict[str, str], pattern: re.Pattern | None = None) -> str:
    """Replace each `{name}` of `values` in one pass, so a value that itself contains
    "{title}" is never substituted into."""
    pattern = pattern or _placeholders(values)
    return pattern.sub(lambda m: str(values[m.group(0)[1:-1]]), text)


def _placeholders(values: dict[str, str]) -> re.Pattern:
    return re.compile("|".join(re.escape("{" + k + "}") for k in values) or r"(?!)")
