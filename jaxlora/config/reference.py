"""The config reference, docs/config.md, generated from the schema itself:

    python -m jaxlora.config.reference > docs/config.md

Every section of `SECTIONS` in file order, with its docstring, and a row per key: its YAML name,
type (Literal choices spelled out, `null` where None is allowed, a `Range` check as its bound),
default, whether a `sweep:` may vary it, and the comments written beside the field in its
section's source (the line(s) above it and its own line). tests/test_config.py fails when the
page is stale. configs/README.md keeps the prose this page cannot derive (the meaning of each
key at length, sweeps, examples).
"""

from __future__ import annotations

import ast
import dataclasses
import functools
import inspect
import io
import tokenize
import types
import typing
from typing import Any, Literal

from jaxlora.config.grid import OPTIONAL_SECTIONS, SECTIONS
from jaxlora.config.schema import Range, Section, yaml_key


@functools.cache
def _comments(path: str) -> tuple[dict[int, str], dict[str, dict[str, tuple[int, int]]]]:
    """The file's comments by line, and each class's fields as (first line, last line)."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    comments = {
        tok.start[0]: tok.string.lstrip("#").strip()
        for tok in tokenize.generate_tokens(io.StringIO(source).readline)
        if tok.type == tokenize.COMMENT
    }
    fields: dict[str, dict[str, tuple[int, int]]] = {}
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.ClassDef):
            fields[node.name] = {
                stmt.target.id: (stmt.lineno, stmt.end_lineno or stmt.lineno)
                for stmt in node.body
                if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)
            }
    return comments, fields


def field_comment(cls: type[Section], name: str) -> str:
    """The comment lines right above a field and those on its own lines, as one paragraph."""
    for klass in cls.__mro__:
        path = inspect.getsourcefile(klass) if klass is not object else None
        if path is None:
            continue
        comments, fields = _comments(path)
        span = fields.get(klass.__name__, {}).get(name)
        if span is None:
            continue
        first, last = span
        above = []
        line = first - 1
        while line in comments and not _code_on(path, line):
            above.insert(0, comments[line])
            line -= 1
        own = [comments[i] for i in range(first, last + 1) if i in comments]
        return _join(above + own)
    return ""


def _join(lines: list[str]) -> str:
    """Comment lines as one paragraph; a word hyphenated across lines is joined back."""
    text = ""
    for line in lines:
        text += line if text.endswith("-") or not text else " " + line
    return text


@functools.cache
def _lines(path: str) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return f.read().splitlines()


def _code_on(path: str, line: int) -> bool:
    """Whether a commented line also holds code (a trailing comment of the field above)."""
    return not _lines(path)[line - 1].lstrip().startswith("#")


def type_text(hint: Any) -> str:
    """A type hint as the page writes it: `a` | `b`, int, list of str, ... or null."""
    origin = typing.get_origin(hint)
    if origin is Literal:
        return " | ".join(f"`{a}`" for a in typing.get_args(hint))
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(hint)
        rest = [a for a in args if a is not type(None)]
        text = " or ".join(type_text(a) for a in rest)
        return f"{text} or null" if len(rest) < len(args) else text
    if origin is tuple:
        args = typing.get_args(hint)
        item = [type_text(a) for a in args if a is not Ellipsis]
        item = [f"({t})" if " or " in t else t for t in item]
        if len(args) == 2 and args[1] is Ellipsis:
            return f"list of {item[0]}"
        return "[" + ", ".join(item) + "]"
    if origin is not None:
        return str(hint).replace("typing.", "")
    return getattr(hint, "__name__", str(hint))


def _default(spec: dataclasses.Field) -> str:
    if spec.default is not dataclasses.MISSING:
        value = spec.default
    elif spec.default_factory is not dataclasses.MISSING:
        value = spec.default_factory()
    else:
        return "required"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    if isinstance(value, tuple):
        return "`[" + ", ".join(str(v) for v in value) + "]`"
    return f"`{value!r}`"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def section_rows(name: str, cls: type[Section]) -> list[str]:
    hints = typing.get_type_hints(cls)
    rows = ["| key | type | default | sweep | notes |", "|---|---|---|---|---|"]
    for spec in dataclasses.fields(cls):
        if spec.name.startswith("_"):
            continue
        kind = type_text(hints[spec.name])
        check = spec.metadata.get("check")
        if isinstance(check, Range):
            kind += f", {check.describe()}"
        key = yaml_key(spec)
        fixed = cls.why_fixed(key)
        sweep = "yes" if not fixed else "no" if cls._fixed else f"no: {fixed}"
        cells = (f"`{key}`", kind, _default(spec), sweep, field_comment(cls, spec.name))
        rows.append("| " + " | ".join(_cell(c) for c in cells) + " |")
    return rows


def reference() -> str:
    """docs/config.md, the whole page."""
    out = [
        "# Config reference",
        "",
        "<!-- Generated by `python -m jaxlora.config.reference > docs/config.md` from the schema",
        "(jaxlora/config/sections.py); tests/test_config.py fails when it is stale. Edit the",
        "schema, not this page. -->",
        "",
        "Every section of a run config and every key in it, with its type, default, whether a",
        "`sweep:` may vary it, and the notes written beside it in the schema. The meaning of each",
        "key at length, sweeps and examples: [configs/README.md](../configs/README.md).",
        f"Optional sections (absent: that step does not run): {', '.join(OPTIONAL_SECTIONS)}.",
    ]
    for name, cls in SECTIONS.items():
        doc = inspect.cleandoc(cls.__doc__ or "")
        if doc.startswith(cls.__name__ + "("):  # the dataclass's generated signature
            doc = ""
        out += ["", f"## `{name}`", ""]
        if doc:
            out += [" ".join(doc.split()), ""]
        fixed = getattr(cls, "_fixed", None)
        if fixed:
            out += [f"Not swept: {fixed}.", ""]
        out += section_rows(name, cls)
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    print(reference(), end="")
