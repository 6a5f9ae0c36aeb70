"""The memory as a served model: `jaxlora serve RUN_DIR --memory METHOD`.

`jaxlora.llm.serve` answers requests for model `memory` by calling a hook with the questions of
a decoding pass; this module builds that hook from a run's adapter library and one method of
the evaluator's grammar (jaxlora/memory/compose.py), e.g. `bm25`, `bm25@3/ties` or
`embedding+rag@2`. Per pass: the router routes every question at once, the combiner gives each
question one adapter (its top-1, or the merge of its top k: one vmapped op for the whole pass),
and a context method puts the units' text before the question, rendered by the memory's
template up to its {question} (so the served prompt reads like the evaluated one). `mixture` needs k models per
decoding step and is not served; a router needs no oracle, which a served question lacks.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from jaxlora.config import MemorySection
from jaxlora.errors import JaxloraError
from jaxlora.memory import compose
from jaxlora.memory.compose import parse_method
from jaxlora.memory.evaluate import MemoryEvaluator
from jaxlora.memory.library import load_libraries
from jaxlora.memory.merging import merge


class MemoryHook:
    """`hook(questions) -> [MemoryRoute]` for `jaxlora.llm.serve.load_service(memory=...)`."""

    def __init__(self, job, run_dir: str | Path, method: str, library: str | None = None):
        self.method = parse_method(method)
        m = self.method
        if not m.uses_adapters or m.router == "oracle":
            raise JaxloraError(
                f"--memory {method}: a served memory routes its questions; use a router such "
                "as bm25, bm25@3/ties or embedding+rag"
            )
        if m.combiner in ("mixture", "arrow"):
            raise JaxloraError(f"--memory {method}: {m.combiner} is not served; use one or a merge")
        if m.context == "icl_doc":
            raise JaxloraError(f"--memory {method}: a served question has no document; use icl")
        section = job.config.memory or MemorySection()
        if section.scope == "document":
            raise JaxloraError(
                "memory.scope: document needs each question's document, which a served "
                "question lacks; serve with --set memory.scope=global"
            )
        libraries = load_libraries(job, Path(run_dir))
        labels = [lib.label for lib in libraries]
        if library is None and len(libraries) > 1:
            raise JaxloraError(
                f"{run_dir} holds {len(libraries)} libraries ({', '.join(labels)}); choose one "
                "with --memory-library"
            )
        if library is not None and library not in labels:
            raise JaxloraError(f"--memory-library {library}: not one of {', '.join(labels)}")
        lib = libraries[labels.index(library) if library is not None else 0]
        self.job, self.section, self.lib = job, section, lib
        self.evaluator = MemoryEvaluator(job, section, lib, Path(run_dir), with_questions=False)
        need = max(m.k, m.rag_k)
        if need > len(lib):
            raise JaxloraError(
                f"--memory {method}: k={need} is larger than the library ({len(lib)} units)"
            )
        self.router = self.evaluator.router(m.router)
        template = self.evaluator.template
        if not template.rstrip().endswith("{question}"):
            raise JaxloraError(
                f"memory.template must end with {{question}} to be served (the server puts the "
                f"context before the question); got {template!r}"
            )
        self.prefix = template.rstrip()[: -len("{question}")]
        if m.combiner != "one":  # ranks the merge cannot combine fail now, not per request
            self._merge([list(range(m.k))])

    def __call__(self, questions: Sequence[str]) -> list:
        from jaxlora.llm.serve import MemoryRoute

        m, lib = self.method, self.lib
        need = max(m.k, m.rag_k)
        idx = self.router.route(list(questions), need).indices
        if m.combiner == "one":
            adapters = [lib.stack.select([int(row[0])]) for row in idx]
        else:
            merged = self._merge(idx[:, : m.k].tolist())
            adapters = [merged.select([q]) for q in range(len(idx))]
        return [
            MemoryRoute(adapter, self._context(row))
            for adapter, row in zip(adapters, idx, strict=True)
        ]

    def _merge(self, indices: list[list[int]]):
        return merge(
            self.job.model,
            self.lib.stack,
            indices=indices,
            weights=[self.evaluator.merge_weights(self.method)] * len(indices),
            combination_type=self.method.combiner,
            density=self.section.density,
            majority_sign_method=self.section.majority_sign_method,
            seed=self.section.seed,
        )

    def _context(self, row) -> str:
        m, lib = self.method, self.lib
        if m.context == "none":
            return ""
        ids = range(len(lib)) if m.context == "icl" else [int(i) for i in row[: m.rag_k]]
        text = compose.join_units(
            [lib.texts[i] for i in ids], [lib.units[i] for i in ids], self.section.unit_format
        )
        fitted, _ = self.evaluator.budget.fit(text, self.job.model.tokenizer, "the served memory")
        return compose.render(self.prefix, context=fitted)
