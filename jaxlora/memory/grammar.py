"""The memory method grammar: a method is (router, k, combiner, context), written as one short
string.

docs/design.md §2: composition is data, not code paths. Every method of the study's grid -- the
base model alone, the oracle adapter, routed top-k merges, ICL, RAG and their hybrids -- is a
point of one grammar, and `jaxlora/memory/evaluate.py` evaluates any list of them in batch:

    METHOD   := ADAPTERS ["+" CONTEXT]
    ADAPTERS := "base" | ROUTER ["@" K] ["/" COMBINER] | "arrow" ["@" K]
    CONTEXT  := "icl" | "icl_doc" | "rag" ["@" K]

    base            the base model, no adapter, no context
    oracle          each question's own unit's adapter
    bm25@3/ties     BM25's top 3 adapters merged with TIES (any PEFT combination type)
    bm25@3/mixture  the top 3 adapters decoding together, next-token distributions averaged
    base+icl        the base model with every unit's text in context (icl_doc: its document's)
    base+rag@3      the base model with the top 3 units' text (by `memory.rag_router`)
    oracle+rag      a hybrid: the oracle adapter with RAG context
    arrow@3         Arrow: every token of every adapted module mixes its top 3 adapters of the
                    whole library (jaxlora.arrow, PEFT's ArrowConfig; no question routing)

A hybrid with a routed adapter and `rag` takes its context from the adapter's router (the
study's QuALITY hybrids: the same top-k units); `oracle+rag@K` with K > 1, `base+rag` and
`arrow@K+rag` use `memory.rag_router`, since an oracle knows only one unit and Arrow routes
tokens, not questions (its K is adapters per token; its `rag` takes 3 units unless `rag@N`
says). `one` is the only combiner of a single adapter and the default for k = 1; k > 1 needs a
combiner.

Contexts are rendered by a prompt template with `{context}` and `{question}`; the study's
templates are named presets. A context longer than the token budget is an error unless
`truncate` says which end to keep, and every truncation is counted
(jaxlora/memory/compose.py).

Pure Python (no JAX), so that reading a config checks methods, templates and unit formats
without loading the models; the names of the combination types are repeated from
jaxlora/memory/merging.py for the same reason (a test keeps them equal).
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Sequence
from typing import Literal

from jaxlora.errors import JaxloraError

ROUTER_KINDS = ("oracle", "bm25", "embedding")
# Routers of tokens, not questions: the whole library in every forward (`arrow@K`, K adapters
# per token), with its own combiner of the same name.
TOKEN_ROUTERS = ("arrow",)
# PEFT's combination types (add_weighted_adapter) and delta_sum: what jaxlora.memory.merging
# merges by.
CombinationType = Literal[
    "svd",
    "linear",
    "cat",
    "ties",
    "ties_svd",
    "dare_ties",
    "dare_linear",
    "dare_ties_svd",
    "dare_linear_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
    "delta_sum",
]
COMBINATION_TYPES: tuple[str, ...] = CombinationType.__args__
COMBINERS = ("one", "mixture", *COMBINATION_TYPES)
CONTEXTS = ("none", "icl", "icl_doc", "rag")

# The study's prompt templates (docs/study.md §3). The question slot receives what the question
# record asks: for PhoneBook rows the trained prefix "Question: ... Answer:" itself.
TEMPLATES: dict[str, str] = {
    "phonebook": "Based on the context below, answer the question.\n\nContext:\n{context}\n\n"
    "{question}",
    "counterfact": "Context:\n{context}\n\n{question}",
    "paperqa": "Context: {context}\n\nQuestion: {question}\nAnswer:",
    "narrativeqa": "{context}\n\nAnswer the following question. Give only the answer, and no "
    "extra commentary, formatting, or chattiness.\n\nQuestion: {question}",
    "quality": "--------------BEGIN CONTEXT--------------\n{context}\n"
    "--------------END CONTEXT--------------\n\n{question}",
}

_METHOD = re.compile(
    r"(?P<adapters>base|(?P<router>[a-z][a-z0-9_]*)(?:@(?P<k>\d+))?(?:/(?P<combiner>[a-z_]+))?)"
    r"(?:\+(?P<context>[a-z_]+)(?:@(?P<ctx_k>\d+))?)?"
)


class MethodError(JaxloraError):
    """A memory method that cannot be parsed or evaluated as written."""


@dataclasses.dataclass(frozen=True)
class Method:
    """One point of the grid. `router` is None for the base model; `rag_k` is the number of
    units whose text a `rag` context holds."""

    name: str
    router: str | None
    k: int
    combiner: str | None
    context: str = "none"
    rag_k: int = 0

    @property
    def uses_adapters(self) -> bool:
        return self.router is not None

    @property
    def routes_questions(self) -> bool:
        """Whether each question gets its own adapters from a question router (not the base
        model, not Arrow's per-token routing over the whole library)."""
        return self.router is not None and self.router not in TOKEN_ROUTERS

    def context_router(self, rag_router: str) -> str | None:
        """The router whose top `rag_k` units form a `rag` context (None: no rag context)."""
        if self.context != "rag":
            return None
        if not self.routes_questions or (self.router == "oracle" and self.rag_k > 1):
            return rag_router
        return self.router


def parse_method(text: str, *, default_rag_k: int = 3) -> Method:
    """A `Method` from its string (see the module docstring), with one-line errors."""
    spec = text.strip()
    m = _METHOD.fullmatch(spec)
    if m is None:
        raise MethodError(
            f"memory method {text!r} is not ROUTER[@K][/COMBINER][+CONTEXT] or base[+CONTEXT] "
            "(e.g. oracle, bm25@3/ties, base+rag@3, oracle+icl)"
        )
    context = m["context"] or "none"
    if context not in CONTEXTS[1:] and m["context"] is not None:
        raise MethodError(
            f"memory method {text!r}: unknown context {context!r}; use icl, icl_doc or rag"
        )
    if m["ctx_k"] is not None and context != "rag":
        raise MethodError(f"memory method {text!r}: only rag takes a number of units (rag@K)")
    if m["adapters"] == "base":
        rag_k = int(m["ctx_k"] or default_rag_k) if context == "rag" else 0
        return Method(spec, None, 0, None, context, rag_k)
    router = m["router"]
    if router in TOKEN_ROUTERS:
        return _token_routed(text, spec, m, context, default_rag_k)
    if router not in ROUTER_KINDS:
        raise MethodError(
            f"memory method {text!r}: unknown router {router!r}; use base or one of "
            f"{', '.join(ROUTER_KINDS + TOKEN_ROUTERS)}"
        )
    k = int(m["k"] or 1)
    if k < 1:
        raise MethodError(f"memory method {text!r}: k must be at least 1")
    combiner = m["combiner"] or ("one" if k == 1 else None)
    if combiner is None:
        raise MethodError(
            f"memory method {text!r}: top-{k} needs a combiner, e.g. {spec}/ties, "
            f"{spec}/linear, {spec}/cat or {spec}/mixture"
        )
    if combiner not in COMBINERS:
        raise MethodError(
            f"memory method {text!r}: unknown combiner {combiner!r}; use one of "
            f"{', '.join(COMBINERS)}"
        )
    if combiner == "one" and k != 1:
        raise MethodError(f"memory method {text!r}: 'one' uses a single adapter; use @1")
    if router == "oracle" and k != 1:
        raise MethodError(
            f"memory method {text!r}: the oracle knows only each question's own unit; use oracle@1"
        )
    rag_k = 0
    if context == "rag":
        rag_k = int(m["ctx_k"]) if m["ctx_k"] is not None else k
    return Method(spec, router, k, combiner, context, rag_k)


def _token_routed(text: str, spec: str, m: re.Match, context: str, default_rag_k: int) -> Method:
    """`arrow@K[+CONTEXT]`: K adapters per token (default 1), combined by Arrow itself."""
    router = m["router"]
    if m["combiner"] not in (None, router):
        raise MethodError(
            f"memory method {text!r}: {router} mixes the adapters per token itself and takes "
            f"no combiner; write {router}@K"
        )
    k = int(m["k"] or 1)
    if k < 1:
        raise MethodError(f"memory method {text!r}: k must be at least 1")
    rag_k = (int(m["ctx_k"] or default_rag_k)) if context == "rag" else 0
    return Method(spec, router, k, router, context, rag_k)


def check_library(methods: Sequence[str], num_units: int) -> None:
    """Every method's k (and RAG's) fits a library of `num_units` units: checked before
    training, so a memory that cannot be evaluated never costs a training run."""
    for i, text in enumerate(methods):
        m = parse_method(text)
        need = max(m.k, m.rag_k)
        if need > num_units:
            raise MethodError(
                f"memory.methods[{i}] {text}: k={need} is larger than the library "
                f"({num_units} units)"
            )


def template_text(template: str) -> str:
    """A preset's text, or a user template, which must hold {context} and {question} (other
    braces are kept as written: slots are filled by `render`, not str.format). "auto" stands
    for the dataset's preset and is resolved by the evaluator."""
    if template == "auto":
        return template
    text = TEMPLATES.get(template, template)
    missing = [slot for slot in ("{context}", "{question}") if slot not in text]
    if missing:
        raise MethodError(
            f"memory.template {template!r} is neither a preset ({', '.join(TEMPLATES)}) nor a "
            f"template with {{context}} and {{question}} (missing {', '.join(missing)})"
        )
    return text


def check_unit_format(unit_format: str) -> str:
    if "{text}" not in unit_format:
        raise MethodError(
            f"memory.unit_format {unit_format!r} has no {{text}} (e.g. 'Paper {{unit}}: {{text}}')"
        )
    return unit_format


def render(template: str, **slots: str) -> str:
    """`template` with each {slot} replaced; a text's own braces are never interpreted."""
    for name, value in slots.items():
        template = template.replace("{" + name + "}", value)
    return template
