"""The memory evaluator: every method of a `memory:` section on every question, in batch.

A trained run whose data was cut into units (`data.units`) is an adapter *library*: one
adapter per unit, plus `units.jsonl` (each unit's key, text, document and questions). When the
grid has other axes (units x ranks), each combination of them is its own library
(jaxlora/memory/library.py), evaluated separately and labelled in the `library` column.

For each library the evaluator
1. builds the questions (every unit's own, or `memory.questions`) and knows each one's unit;
2. fits every router the methods name once on the keys and routes all questions at once,
   to the largest k any method asks of it (a top-k route is a prefix of a top-k' route);
3. per method, builds each question's context (none, ICL, RAG; budgeted, truncation counted)
   and its prompt, then decodes `memory.batch_size` questions per pass: the base model alone
   (a start all of a pass's prompts share, such as ICL's book, prefilled once for the pass),
   a per-question stack of routed adapters (vmap over questions, KV cache), a stack of
   per-question merges (`jaxlora.memory.merge`, one vmapped op per batch) or a mixture;
4. scores the outputs with the dataset's metrics and routing accuracy against the oracle, and
   times each method: `compile_seconds` (JAX's tracing and compiling, `CompileClock`) apart
   from `questions_per_s`, the questions over the rest of its wall time (steady throughput);
5. QuALITY (`memory.loglik`): scores every option by its log-likelihood as the answer after the
   same prompt, under the same base / adapters / merge / mixture (`option_logprobs`,
   jaxlora/memory/loglik.py).

Outputs: a result set (`jaxlora/memory/results.py`: `memory_results.csv`, one row per library
x method, `memory_predictions.jsonl`, `memory_report.md` and plots), each method merged into it
as soon as it has finished.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from jaxlora import data as kdata
from jaxlora.arrow import ArrowLibrary, arrow_library
from jaxlora.config import Config, MemorySection
from jaxlora.errors import DataError
from jaxlora.eval import scoring
from jaxlora.evaluate import CompileClock, build_questions, plural, progress_bar, score
from jaxlora.fsutil import RunLock
from jaxlora.generate import (
    DecodeSpec,
    _generate_base,
    decode_stack,
    eos_and_pad,
    shared_start,
    until_eos,
)
from jaxlora.job import Job
from jaxlora.memory import compose
from jaxlora.memory.compose import Budget, Method, MethodError
from jaxlora.memory.library import Library, MemoryQuestion, legacy_label, load_libraries
from jaxlora.memory.loglik import OptionScoring, prompt_width
from jaxlora.memory.merging import merge
from jaxlora.memory.results import ResultSet, question_fields, result_key, set_dir
from jaxlora.memory.routers import Route, make_router, routing_accuracy
from jaxlora.memory.validate import parse_methods, read_questions

log = logging.getLogger(__name__)

# A start shared by every prompt of a pass is prefilled once when it is at least this long:
# below it the second compiled program (prefix + rest) costs more time than the prefill saves.
SHARED_PREFIX_MIN = 256

_DATASET_TEMPLATE = {
    name: name for name in ("phonebook", "counterfact", "paperqa", "narrativeqa", "quality")
}


class MemoryEvaluator(OptionScoring):
    """Evaluates methods on one library of a job (see the module docstring)."""

    def __init__(
        self,
        job: Job,
        section: MemorySection,
        library: Library,
        run_dir: Path,
        *,
        with_questions: bool = True,
    ):
        """`with_questions=False` (serving) routes and composes for questions given later."""
        self.job, self.m, self.lib, self.run_dir = job, section, library, run_dir
        self.mesh = job.mesh  # every decoding program is traced for it, as `plan --aot` builds them
        self.model, self.tok = job.model, job.model.tokenizer
        self.data = job.config.data
        self.eos, self.pad = eos_and_pad(self.tok, self.model.config)
        self.template = compose.template_text(
            _DATASET_TEMPLATE.get(self.data.dataset, "paperqa")
            if section.template == "auto"
            else section.template
        )
        self.budget = Budget(section.context_tokens, section.truncate)
        self.questions = self._questions() if with_questions else []
        self._routers: dict[str, Any] = {}
        self._routes: dict[str, Route] = {}
        self._ks: dict[str, list[int]] = {}  # every k asked of each router by the methods
        self._arrows: dict[int, ArrowLibrary] = {}  # the library as Arrow, by top-k

    # -- questions ------------------------------------------------------------------------

    def _questions(self) -> list[MemoryQuestion]:
        if self.m.questions is None and kdata.is_document_dataset(self.data):
            out = self._document_questions()
        elif self.m.questions is None:
            out = [
                MemoryQuestion(self._as_trained(r), u, self.lib.documents[u])
                for u, records in enumerate(self.lib.questions)
                for r in records
            ]
        else:
            out = self._question_file(self.m.questions)
        if not out:
            raise DataError(
                "the library's units hold no questions (text units): set memory.questions to a "
                "question file with a unit or document column"
            )
        return out

    def _document_questions(self) -> list[MemoryQuestion]:
        """The dataset's evaluation questions about the library's documents, each with its
        document, and its unit when units are whole documents (the oracle's answer)."""
        questions = kdata.load_questions(self.data)
        mine = [q for q in questions if q.document in set(self.lib.documents)]
        if len(mine) < len(questions):  # the data budget kept fewer documents: say so
            log.warning(
                "memory: %d of %d evaluation questions are about documents outside the library "
                "(the data budget): not asked",
                len(questions) - len(mine),
                len(questions),
            )
        unit_of = (
            {d: i for i, d in enumerate(self.lib.documents)}
            if self.data.units == "documents"
            else {}
        )
        return [
            MemoryQuestion(kdata.ask_record(q), unit_of.get(q.document), q.document, q)
            for q in mine
        ]

    def _as_trained(self, r: kdata.Record) -> kdata.Record:
        """A unit's question in its training record kind (rows keep their continuation)."""
        if self.data.dataset in ("phonebook", "counterfact"):
            return kdata.row_record(r.question, r.answer)
        return r

    def _question_file(self, path: str) -> list[MemoryQuestion]:
        d = self.data
        rows = read_questions(path, d.question_field, d.answer_field, d.document_field)
        index = {u: i for i, u in enumerate(self.lib.units)}
        by_doc = {doc: i for i, doc in enumerate(self.lib.documents)}
        out = []
        for row in rows:
            unit = None
            if row.unit is not None:
                if row.unit not in index:
                    raise DataError(
                        f"{path} {row.where}: unit {row.unit!r} is not in the library; unit ids "
                        "are in the run's units.jsonl"
                    )
                unit = index[row.unit]
            elif d.units == "documents" and row.document is not None:
                if row.document not in by_doc:
                    raise DataError(
                        f"{path} {row.where}: document {row.document!r} has no unit in the "
                        "library; its documents are in the run's units.jsonl"
                    )
                unit = by_doc[row.document]
            record = kdata.Record("qa", question=row.question, answer=row.answer)
            out.append(MemoryQuestion(self._as_trained(record), unit, row.document))
        return out

    # -- routing --------------------------------------------------------------------------

    def route(self, router: str, k: int) -> Route:
        """Top-k units of every question by `router` (fitted and routed once per library)."""
        if router not in self._routes or self._routes[router].k < k:
            r = self.router(router)
            need = max(k, max(self._ks.get(router, [k])))
            units = [q.unit for q in self.questions]
            if router == "oracle" and any(u is None for u in units):
                raise MethodError(
                    "the oracle needs every question's unit: give memory.questions a unit column"
                )
            docs = [q.document for q in self.questions]
            self._routes[router] = r.route(
                [q.query for q in self.questions],
                need,
                question_units=units if router == "oracle" else None,
                question_docs=docs if self.m.scope == "document" else None,
            )
        full = self._routes[router]
        return Route(full.indices[:, :k], full.scores[:, :k])

    def router(self, kind: str):
        """The router of this kind, fitted on the library's keys once."""
        if kind not in self._routers:
            options: dict[str, Any] = {}
            if kind in ("bm25", "embedding"):
                options["scope"] = self.m.scope
            if kind == "bm25":
                options["ngrams"] = self.m.bm25_ngrams
            if kind == "embedding":
                options.update(
                    encoder=self.m.encoder or self.model,
                    pooling=self.m.pooling,
                    max_length=self.m.encoder_max_length,
                    instruction=self.m.query_instruction,
                    truncate=self.m.encoder_truncate,
                    cache_dir=self.run_dir / "memory",
                )
            self._routers[kind] = make_router(kind, **options).fit(
                list(self.lib.keys), list(self.lib.documents)
            )
        return self._routers[kind]

    def routing(self, method: Method) -> dict[str, float]:
        """Routing accuracy of the method's adapters (or its RAG context) against the oracle."""
        router, k = method.router, method.k
        if not method.routes_questions:  # the base model, or Arrow: no question routing
            router = self.m.rag_router if method.context == "rag" else None
            k = method.rag_k
        units = [q.unit for q in self.questions]
        if router in (None, "oracle") or any(u is None for u in units):
            return {}
        acc = routing_accuracy(self.route(router, k), units)
        return {"routing_top1": acc["top1"], "routing_recall": acc[f"recall@{k}"]}

    # -- prompts --------------------------------------------------------------------------

    def contexts(self, method: Method) -> tuple[list[str | None], int]:
        """Each question's context (None: no context) and how many were truncated."""
        if method.context == "none":
            return [None] * len(self.questions), 0
        fmt = self.m.unit_format
        if method.context == "icl":
            everything = compose.join_units(self.lib.texts, self.lib.units, fmt)
            raw = [everything] * len(self.questions)
        elif method.context == "icl_doc":
            raw = []
            for q in self.questions:
                if q.document is None:
                    raise MethodError(
                        f"{method.name}: icl_doc needs each question's document; give "
                        "memory.questions a document column"
                    )
                mine = [i for i, d in enumerate(self.lib.documents) if d == q.document]
                raw.append(
                    compose.join_units(
                        [self.lib.texts[i] for i in mine], [self.lib.units[i] for i in mine], fmt
                    )
                )
        else:
            route = self.route(method.context_router(self.m.rag_router), method.rag_k)
            raw = [
                compose.join_units(
                    [self.lib.texts[i] for i in row], [self.lib.units[i] for i in row], fmt
                )
                for row in route.indices
            ]
        out, cut, cache = [], 0, {}
        for text in raw:
            if text not in cache:
                cache[text] = self.budget.fit(text, self.tok, f"memory method {method.name}")
            fitted, was_cut = cache[text]
            out.append(fitted)
            cut += was_cut
        if cut:
            log.warning("%s: %d of %d contexts truncated", method.name, cut, len(out))
        return out, cut

    def prompts(self, contexts: Sequence[str | None]) -> list[tuple[int, ...]]:
        """Token ids of every question, its context (if any) rendered by the template."""
        records = []
        for q, ctx in zip(self.questions, contexts, strict=True):
            r = q.record
            if ctx is not None:
                asked = compose.render(self.template, context=ctx, question=r.question)
                r = (
                    kdata.row_record(asked, r.answer)
                    if r.kind == "row"
                    else dataclasses.replace(r, question=asked)
                )
            records.append(r)
        data = SimpleNamespace(
            chat_template=self.data.chat_template, max_length=1 << 30, dataset=self.data.dataset
        )
        ev = SimpleNamespace(prompt=self.m.prompt)
        prompts = [
            q.prompt
            for q in build_questions(records, self.tok, data, ev, self.model.config.vocab_size)
        ]
        longest = max((len(p) for p in prompts), default=0) + self.m.max_new_tokens
        positions = self.model.config.max_position_embeddings
        if longest > positions:
            raise MethodError(
                f"a prompt of {longest - self.m.max_new_tokens:,} tokens + "
                f"memory.max_new_tokens={self.m.max_new_tokens} exceeds the model's "
                f"{positions:,} positions; lower memory.context_tokens (with memory.truncate)"
            )
        return prompts

    # -- decoding -------------------------------------------------------------------------

    def merge_weights(self, method: Method) -> list[float]:
        """Per-source merge weights of a method (memory.merge_weights)."""
        k, kind = method.k, self.m.merge_weights
        if kind == "mean" or (kind == "study" and method.combiner in ("linear", "delta_sum")):
            return [1.0 / k] * k
        return [1.0] * k

    def decode(self, method: Method, prompts: Sequence[tuple[int, ...]], bar) -> list[list[int]]:
        """Greedy outputs (up to EOS) of every question under `method`."""
        route = self.route(method.router, method.k) if method.routes_questions else None
        n = len(prompts)
        width = prompt_width(max(len(p) for p in prompts))
        # Rows per pass: memory.batch_size, fewer for long prompts (max_batch_tokens), a power of
        # two so that the passes of all methods share a few compiled shapes.
        fit = max(1, self.m.max_batch_tokens // (width + self.m.max_new_tokens))
        B = 1 << (min(self.m.batch_size, fit).bit_length() - 1)
        spec = DecodeSpec(self.m.max_new_tokens, self.eos, self.pad)
        outputs: list[list[int]] = []
        for start in range(0, n, B):
            rows = list(range(start, min(start + B, n)))
            rows += [rows[0]] * (B - len(rows))  # a full batch: one compile per prompt width
            batch = [prompts[i] for i in rows]
            if method.router == "arrow":
                out = self._decode_arrow(method, *self._pack(batch, width), spec)
            elif route is None:
                out = self._decode_base(batch, width, spec)
            else:
                idx_BK = route.indices[rows]
                out = self._decode_adapters(method, idx_BK, *self._pack(batch, width), spec)
            out = np.asarray(out)
            real = min(B, n - start)
            outputs.extend(until_eos(out[j], self.eos) for j in range(real))
            bar.update(real)
        return outputs

    def _decode_base(self, batch: Sequence[tuple[int, ...]], width: int, spec: DecodeSpec):
        """A pass decoded by the base model alone. A start that all its prompts share, of at
        least SHARED_PREFIX_MIN tokens (ICL's whole book), is prefilled once for the pass, not
        once per row (`_generate_base`'s prefix)."""
        graph, params = self.model.graph(), self.model.params
        P = shared_start(batch) if len(batch) > 1 else 0
        if P < SHARED_PREFIX_MIN:
            return _generate_base(
                graph, params, *self._pack(batch, width), spec, None, mesh=self.mesh
            )
        (prefix,), (prefix_mask,) = self._pack([batch[0][:P]], prompt_width(P))
        rest = [p[P:] for p in batch]
        tokens, mask = self._pack(rest, prompt_width(max(map(len, rest))))
        return _generate_base(
            graph, params, tokens, mask, spec, None, mesh=self.mesh, prefix=(prefix, prefix_mask)
        )

    def arrow(self, k: int) -> ArrowLibrary:
        """The whole library as Arrow routing with top-k k (built once per k)."""
        if k not in self._arrows:
            stack = self.lib.stack
            self._arrows[k] = arrow_library(self.model, stack, k, self.m.arrow_temperature)
        return self._arrows[k]

    def _decode_arrow(self, method: Method, tokens, mask, spec):
        """Every question of the pass decoded by the Arrow-routed library (a stack of one)."""
        lib = self.arrow(method.k)
        graph = self.model.graph(lib.placement)
        out = decode_stack(
            graph, self.model.params, lib.weights, lib.consts, tokens[None], mask[None], spec
        )
        return out[0]

    def _decode_adapters(self, method: Method, idx_BK, tokens, mask, spec):
        stack = self.lib.stack
        if method.combiner == "mixture":
            members = stack.select(idx_BK.reshape(-1).tolist())
            # Selected rows keep the library's padded layout, whatever their own ranks.
            return compose.decode_mixture(
                self.model.graph(stack.placement),
                self.model.params,
                members.weights,
                members.consts,
                tokens,
                mask,
                spec,
                method.k,
                self.mesh,
            )
        if method.combiner == "one":
            chosen, placement = stack.select(idx_BK[:, 0].tolist()), stack.placement
        else:
            chosen = self._merged(method, idx_BK)
            placement = chosen.placement
        out = decode_stack(
            self.model.graph(placement),
            self.model.params,
            chosen.weights,
            chosen.consts,
            tokens[:, None],
            mask[:, None],
            spec,
        )
        return out[:, 0]

    def _merged(self, method: Method, idx_BK: np.ndarray):
        """Each row's routed adapters merged by the method's combiner (`memory.merge`)."""
        return merge(
            self.model,
            self.lib.stack,
            indices=idx_BK.tolist(),
            weights=[self.merge_weights(method)] * len(idx_BK),
            combination_type=method.combiner,
            density=self.m.density,
            majority_sign_method=self.m.majority_sign_method,
            seed=self.m.seed,
        )

    def _pack(self, prompts: Sequence[tuple[int, ...]], T: int):
        """Left-padded [B, T], whole on every device of the job's mesh: the placement `jaxlora
        plan --aot` compiles the memory's programs for (`aot_memory`), not one the compiler
        picks; `decode_stack` traces for the mesh its prompts are on."""
        tokens = np.full((len(prompts), T), self.pad, np.int32)
        mask = np.zeros((len(prompts), T), bool)
        for j, p in enumerate(prompts):
            tokens[j, T - len(p) :] = p
            mask[j, T - len(p) :] = True
        return self.job.replicated_array(tokens), self.job.replicated_array(mask)

    # -- the grid -------------------------------------------------------------------------

    def check(self, methods: Sequence[Method]) -> None:
        """Fail before any decoding: route every question, build every context, and merge the
        first question's adapters for every merging method (k too large, ranks a type cannot
        merge, a context over budget all raise here)."""
        self._plan_routes(methods)
        for method in methods:
            self.contexts(method)
            if method.router == "arrow":
                self.arrow(method.k)
            elif method.uses_adapters and method.combiner not in ("one", "mixture"):
                self._merged(method, self.route(method.router, method.k).indices[:1])

    def _plan_routes(self, methods: Sequence[Method]) -> None:
        for m in methods:
            if m.routes_questions:
                self._ks.setdefault(m.router, []).append(m.k)
            if m.context == "rag":
                self._ks.setdefault(m.context_router(self.m.rag_router), []).append(m.rag_k)

    def run(
        self,
        methods: Sequence[Method],
        progress: bool = True,
        commit: Callable[[dict, list[dict]], None] | None = None,
    ) -> tuple[list[dict], list[dict]]:
        """Rows and predictions of `methods`; `commit(row, predictions)` after each method."""
        self._plan_routes(methods)
        rows, predictions = [], []
        total = len(methods) * len(self.questions)
        desc = f"memory {self.lib.label}: {plural(len(methods), 'method')}"
        with progress_bar(total, desc, "q", progress) as bar:
            for method in methods:
                t0 = time.perf_counter()
                with CompileClock() as clock:
                    contexts, truncated = self.contexts(method)
                    prompts = self.prompts(contexts)
                    outputs = self.decode(method, prompts, bar)
                    options = self.option_logprobs(method, prompts) if self.scores_options else None
                timing = clock.split(time.perf_counter() - t0)
                scores, mine = [], []
                for i, (q, out) in enumerate(zip(self.questions, outputs, strict=True)):
                    text = self.tok.decode(out, skip_special_tokens=True)
                    s = score(self.data.dataset, text, q.record.answer, q.source)
                    if options is not None:
                        s.update(scoring.loglik_score(options[i], q.source))
                        s["option_logprobs"] = [round(x, 4) for x in options[i]]
                    scores.append(s)
                    mine.append(
                        {
                            "library": self.lib.label,
                            "method": method.name,
                            "question": q.record.question,
                            "unit": None if q.unit is None else self.lib.units[q.unit],
                            "document": q.document,
                            **question_fields(q.source),
                            "answer": q.record.answer,
                            "prediction": text,
                            **s,
                        }
                    )
                rows.append(self._row(method, scores, truncated, timing))
                predictions += mine
                if commit is not None:
                    commit(rows[-1], mine)
        return rows, predictions

    def _row(
        self, method: Method, scores, truncated: int, timing: tuple[float, float]
    ) -> dict[str, Any]:
        """A method's row; `timing` is (compile, steady) seconds (`CompileClock.split`)."""
        sources = [q.source for q in self.questions]
        means = scoring.aggregate(self.data.dataset, scores, sources)
        return {
            "library": self.lib.label,
            **dict(self.lib.values),
            "method": method.name,
            "router": method.router or "",
            "k": method.k,
            "combiner": method.combiner or "",
            "context": method.context if method.context != "rag" else f"rag@{method.rag_k}",
            "questions": self.m.questions or "",
            **means,
            **self.routing(method),
            "truncated": truncated,
            "n_questions": len(self.questions),
            "compile_seconds": round(timing[0], 3),
            "questions_per_s": round(len(self.questions) / max(timing[1], 1e-9), 2),
        }


def evaluate_memory(
    job: Job,
    run_dir: Path,
    section: MemorySection,
    progress: bool = True,
    out: str | None = None,
    resume: bool = False,
) -> list[dict]:
    """Every method on every library of a job, each merged into the result set `out` (None: the
    run's own) when it finishes, then its report; the rows evaluated are returned. `resume`
    skips the methods the set already holds for the same questions."""
    from jaxlora.memory.report import write_memory_report

    methods = parse_methods(section.methods)
    libraries = load_libraries(job, run_dir)
    evaluators = [MemoryEvaluator(job, section, lib, run_dir) for lib in libraries]
    for ev in evaluators:
        ev.check(methods)
    judge = None
    if section.judge:  # its rubric checked against its model before anything is evaluated
        from jaxlora.llm.judge import metric_judge

        judge = metric_judge(job.config.llm)
    store = ResultSet.open(run_dir, out, [k for k, _ in libraries[0].values])
    for lib in libraries:  # a set from before key=value labels keeps its rows under the new ones
        store.relabel(legacy_label(lib.values), lib.label)

    def commit(row: dict, predictions: list[dict]) -> None:
        if section.judge:  # judged before its commit: a committed method is complete
            from jaxlora.llm.judge import judge_results

            cache, key = run_dir / "memory" / "judge_cache.sqlite", result_key
            judge_results([row], predictions, key, key, job.config.llm, cache, progress, judge)
            scoring.judge_per_level([row], predictions, key, key)
        store.commit(row, predictions)

    rows = []
    for ev in evaluators:
        todo = store.todo(ev.lib.label, methods, section.questions) if resume else methods
        rows += ev.run(todo, progress, commit)[0]
    write_memory_report(store.directory)
    return rows


def run_memory(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    progress: bool = True,
    out: str | None = None,
    resume: bool = False,
) -> list[dict]:
    """`jaxlora memory RUN_DIR [--out NAME] [--resume]`: evaluate the memory of a finished run
    into a result set (see `evaluate_memory`)."""
    from jaxlora.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise DataError(f"{run_dir} is not a jaxlora run directory (no config.yaml)")
    set_dir(run_dir, out)  # a bad --out name fails before the model is loaded
    config: Config = load_config(run_dir / "config.yaml", overrides)
    job = Job(config)
    lock = RunLock(run_dir).acquire()
    try:
        section = config.memory or MemorySection()
        return evaluate_memory(job, run_dir, section, progress, out, resume)
    finally:
        lock.release()
