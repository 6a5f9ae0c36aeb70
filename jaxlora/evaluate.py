"""Batched evaluation: every adapter of a run asked about its own knowledge, one pass per group.

Each adapter's questions come from its own training records (or from `eval.path`). With
`eval.prompt: continuation` a question is its record's training sequence up to the first token
of the answer, exactly as the adapter saw it (chat template and all), so the greedy output is
the adapter's recall of what it stored; `question` asks the question alone as a new user turn.
All adapters of a group decode together (`generate.py`: vmap over the stack, KV cache, per-row
stopping), `eval.batch_size` questions per adapter at a time; an adapter with fewer questions
fills its remaining rows with empty prompts.

Metrics (`jaxlora/eval/metrics.py`), per question and then averaged per adapter:
- PhoneBook `accuracy`: the first `ddd-ddd-dddd` of the output has the answer's digits.
- CounterFact `accuracy`: the output starts with the new target; `efficacy` (when the record
  knows its true target, as in ROME's json): P(first token of target_new) > P(first token of
  target_true) after the prompt, the targets tokenized as they follow the prompt (leading space;
  `eval.efficacy_leading_space: false` gives the study's bare-word variant).
- question-answer data: `accuracy` = normalised exact match, `bleu` (sacrebleu sentence BLEU),
  `rouge_l` (rouge-score ROUGE-L F, stemmed).

Timing: the adapters of a group decode together, so a group has one time, not one per adapter.
Each row carries its group's `group_eval_seconds` (the evaluation's wall time without
compilation) and `group_compile_seconds` (what JAX spent tracing and compiling the group's
programs, `CompileClock`), the same on every row of the group, as their names say.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import monitoring
from jax.experimental import multihost_utils

from jaxlora import data as kdata
from jaxlora.config import EvalSection
from jaxlora.errors import DataError
from jaxlora.eval import metrics, scoring
from jaxlora.fsutil import RunLock, atomic_write
from jaxlora.generate import DecodeSpec, decode_stack, eos_and_pad, until_eos
from jaxlora.job import Job
from jaxlora.lora import AdapterStack
from jaxlora.models.model import stack_forward

SWEEP_ALIASES = ("lora.rank", "data.size_tokens")  # the `rank` and `size_tokens` columns


@dataclasses.dataclass(frozen=True)
class Question:
    prompt: tuple[int, ...]  # token ids the adapter continues
    answer: str
    target_true: str | None = None
    efficacy_prompt: str | None = None  # CounterFact: the text the targets follow
    source: Any = None  # the EvalQuestion of a document dataset (jaxlora/eval/scoring.py)


def build_questions(
    records: Sequence[kdata.Record],
    tokenizer,
    data,
    ev: EvalSection,
    vocab_size: int | None = None,
) -> list[Question]:
    """The questions one adapter is asked about its records; with `vocab_size`, every prompt
    token must lie inside the model's embedding table."""
    if any(r.kind == "text" for r in records):
        raise DataError(
            "text documents hold no questions to ask: set eval.path to a "
            "question/answer file about them"
        )
    missing = [i for i, r in enumerate(records) if not r.answer]
    if missing:
        raise DataError(
            f"record {missing[0]} has no known answer, so it cannot be asked (the study's "
            "CounterFact CSVs lack the prompt/target split beyond ~1K tokens): use ROME's "
            "counterfact.json, or set eval.path to a question/answer file"
        )
    if ev.prompt == "continuation":
        enc = kdata.encode(
            records,
            tokenizer,
            chat_template=data.chat_template,
            loss_mask="completion_only",
            max_length=data.max_length,
            vocab_size=vocab_size,
        )
        prompts = [
            tuple(int(t) for t in enc.tokens[i, : int(np.argmax(enc.loss[i]))])
            for i in range(len(records))
        ]
    else:
        prompts = [
            _question_prompt(r.question or "", tokenizer, data.chat_template) for r in records
        ]
        if vocab_size is not None:
            for i, p in enumerate(prompts):
                kdata.check_vocab(p, tokenizer, vocab_size, f"eval question {i}")
    return [
        Question(
            p,
            r.answer.strip(),
            r.target_true,
            r.question if r.target_true is not None and not data.chat_template else None,
        )
        for p, r in zip(prompts, records, strict=True)
    ]


def _question_prompt(question: str, tokenizer, chat_template: bool) -> tuple[int, ...]:
    if chat_template:
        text = tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
        )
        return tuple(tokenizer(text, add_special_tokens=False)["input_ids"])
    return tuple(tokenizer(question, add_special_tokens=True)["input_ids"])


def score(dataset: str, prediction: str, answer: str, source: Any = None) -> dict[str, Any]:
    """Per-question metrics for a dataset kind; `source` is the `EvalQuestion` of a document
    dataset (its references, options, level: `jaxlora/eval/scoring.py`)."""
    if source is not None and dataset in scoring.DOCUMENT_METRICS:
        return scoring.score_question(dataset, prediction, source)
    if dataset == "phonebook":
        return {"accuracy": float(metrics.phonebook_correct(prediction, answer))}
    if dataset == "counterfact":
        return {"accuracy": float(_normal(prediction).startswith(_normal(answer)))}
    return {
        "accuracy": float(metrics.exact_match(prediction, answer)),
        "bleu": metrics.bleu(prediction, answer),
        "rouge_l": metrics.rouge_l(prediction, answer),
    }


def _normal(text: str) -> str:
    return " ".join(text.split()).casefold()


def _efficacy_inputs(q: Question, tokenizer, leading_space: bool):
    """Context ids and target ids of the new and the true target."""
    bos = tokenizer("", add_special_tokens=True)["input_ids"]
    pairs = [
        metrics.target_token_context(tokenizer, q.efficacy_prompt, t, leading_space)
        for t in (q.answer, q.target_true)
    ]
    return [(tuple(bos) + tuple(ctx), tid) for ctx, tid in pairs]


@jax.jit
def _last_logprobs(logits_ABTV, last_AB, target_AB):
    logp = jax.nn.log_softmax(logits_ABTV, axis=-1)
    at_last = jnp.take_along_axis(logp, last_AB[..., None, None], axis=2)[:, :, 0]
    return jnp.take_along_axis(at_last, target_AB[..., None], axis=-1)[..., 0]


class CompileClock:
    """The seconds JAX spends tracing, lowering and compiling (or fetching from the compilation
    cache) while entered, from `jax.monitoring`'s compile events: a timing that subtracts them
    reports compilation apart from throughput. The listener is process-wide, so a compile in
    another thread meanwhile counts too; nested traces can count twice, so callers cap it at
    their own wall time (`split`)."""

    EVENTS = frozenset(
        {
            "/jax/core/compile/jaxpr_trace_duration",
            "/jax/core/compile/jaxpr_to_mlir_module_duration",
            "/jax/core/compile/backend_compile_duration",
        }
    )

    def __init__(self):
        self.seconds = 0.0

    def _listen(self, event: str, duration: float, **_: Any) -> None:
        if event in self.EVENTS:
            self.seconds += duration

    def __enter__(self) -> CompileClock:
        monitoring.register_event_duration_secs_listener(self._listen)
        return self

    def __exit__(self, *exc) -> None:
        monitoring.unregister_event_duration_listener(self._listen)

    def split(self, wall: float) -> tuple[float, float]:
        """(compile, steady) seconds of a `wall`-second span timed around this clock."""
        compile_s = min(self.seconds, wall)
        return compile_s, wall - compile_s


def progress_bar(total: int, desc: str, unit: str, enabled: bool):
    """A tqdm bar on stderr as training's (`SweepJob._progress_bar`): none when `enabled` is
    False (`--no-progress`) or off process 0."""
    from tqdm.auto import tqdm

    disable = not enabled or jax.process_index() != 0
    return tqdm(
        total=total, desc=desc, unit=unit, disable=disable, dynamic_ncols=True, file=sys.stderr
    )


def plural(n: int, word: str) -> str:
    """`1 adapter`, `2 adapters`: a count with its noun (regular plurals)."""
    return f"{n:,} {word}{'s' * (n != 1)}"


class Evaluator:
    """Evaluates the adapters of a `Job` given one stack per group."""

    def __init__(self, job: Job, ev: EvalSection, progress: bool = False):
        self.job, self.ev, self.progress = job, ev, progress
        self.tok = job.model.tokenizer
        self.eos, self.pad = eos_and_pad(self.tok, job.model.config)

    def questions(self, plan) -> list[Question]:
        data = plan.cell.config.data
        if self.ev.path is None and kdata.is_document_dataset(data):
            return self._document_questions(plan)
        if self.ev.path is not None:
            records = kdata.read_records(
                "qa",
                self.ev.path,
                question_field=data.question_field,
                answer_field=data.answer_field,
            )
        else:
            records = self.job.data.records(plan)
        return build_questions(
            records, self.tok, data, self.ev, vocab_size=self.job.model.config.vocab_size
        )

    def _document_questions(self, plan) -> list[Question]:
        """A document dataset's evaluation questions (never its training records): all of
        them for an adapter of the whole corpus, its document's for an adapter of one unit."""
        data = plan.cell.config.data
        asked = kdata.load_questions(data)
        if data.unit is not None:
            document = {u.id: u.document for u in self.job.units}[data.unit]
            asked = [q for q in asked if q.document == document]
        records = [kdata.ask_record(q) for q in asked]
        built = build_questions(
            records, self.tok, data, self.ev, vocab_size=self.job.model.config.vocab_size
        )
        return [dataclasses.replace(b, source=q) for b, q in zip(built, asked, strict=True)]

    def run(self, stacks: Sequence[AdapterStack]) -> tuple[list[dict], list[dict]]:
        rows, predictions = [], []
        asked_by_group = [
            {i: self.questions(self.job.plans[i]) for i in local} for local in self.job.local
        ]
        total = sum(len(qs) for asked in asked_by_group for qs in asked.values())
        n = sum(len(asked) for asked in asked_by_group)
        desc = f"evaluating {plural(n, 'adapter')}"
        with progress_bar(total, desc, "q", self.progress) as bar:
            for g, asked, stack in zip(self.job.groups, asked_by_group, stacks, strict=True):
                t0 = time.perf_counter()
                with CompileClock() as clock:
                    outputs = self._decode(g, stack, asked, bar)
                    efficacy = self._efficacy(g, stack, asked)
                timing = clock.split(time.perf_counter() - t0)
                rows += self._group_rows(g, asked, outputs, efficacy, timing, predictions)
        return rows, predictions

    def _group_rows(self, g, asked, outputs, efficacy, timing, predictions) -> list[dict]:
        """The rows of a group's adapters (their predictions appended to `predictions`)."""
        rows = []
        for slot, i in g.real:
            if i not in asked:
                continue
            plan = self.job.plans[i]
            scores = []
            for k, (q, out) in enumerate(zip(asked[i], outputs[slot], strict=True)):
                text = self.tok.decode(out, skip_special_tokens=True)
                s = score(plan.cell.config.data.dataset, text, q.answer, q.source)
                if efficacy.get(slot) is not None and efficacy[slot][k] is not None:
                    s["efficacy"] = float(efficacy[slot][k])
                scores.append(s)
                predictions.append(
                    {
                        "adapter": plan.name,
                        "index": k,
                        "prompt": self.tok.decode(q.prompt),
                        "answer": q.answer,
                        "prediction": text,
                        **s,
                    }
                )
            sources = [q.source for q in asked[i]]
            rows.append(self._row(plan, scores, sources, timing))
        return rows

    def _row(self, plan, scores, sources, timing: tuple[float, float]) -> dict[str, Any]:
        c = plan.cell.config
        means = scoring.aggregate(c.data.dataset, scores, sources)
        n_facts = len(sources)
        size = c.data.size_tokens
        if size is None and not kdata.is_document_dataset(c.data):
            # sized by rows (or the whole file): the knowledge it was given, counted as a
            # token budget counts it, so that the capacity report has its size axis
            size = int(kdata.count_tokens(self.job.data.records(plan), self.tok).sum())
        return {
            "index": plan.index,
            "name": plan.name,
            **{k: _csv(v) for k, v in plan.cell.values if k not in SWEEP_ALIASES},
            "rank": plan.lora.rank,
            "size_tokens": size,
            "n_facts": n_facts,
            "trainable_params": plan.lora.num_params(self.job.model.config),
            **means,
            "group_eval_seconds": round(timing[1], 3),
            "group_compile_seconds": round(timing[0], 3),
        }

    def _rounds(self, g, asked):
        n_max = max((len(asked.get(i, ())) for _, i in g.real), default=0)
        return range(math.ceil(n_max / self.ev.batch_size))

    def _decode(self, g, stack: AdapterStack, asked, bar=None) -> dict[int, list[list[int]]]:
        """Greedy outputs (token ids, up to EOS) of every local adapter's questions."""
        Q, n = self.ev.batch_size, len(g.slots)
        lengths = [len(q.prompt) for qs in asked.values() for q in qs]
        T = max(8, -(-max(lengths, default=1) // 8) * 8)
        T = int(np.max(multihost_utils.process_allgather(np.int32(T))))
        graph = self.job.model.graph(stack.placement)
        spec = DecodeSpec(self.ev.max_new_tokens, self.eos, self.pad)
        outputs: dict[int, list[list[int]]] = {slot: [] for slot, _ in g.real}
        for r in self._rounds(g, asked):
            tokens = np.full((n, Q, T), self.pad, np.int32)
            mask = np.zeros((n, Q, T), bool)
            for slot, i in g.real:
                for k, q in enumerate(asked.get(i, [])[r * Q : (r + 1) * Q]):
                    tokens[slot, k, T - len(q.prompt) :] = q.prompt
                    mask[slot, k, T - len(q.prompt) :] = True
            out = decode_stack(
                graph,
                self.job.model.params,
                stack.weights,
                stack.consts,
                self.job.global_array(tokens),
                self.job.global_array(mask),
                spec,
            )
            out = np.asarray(multihost_utils.process_allgather(out, tiled=True))
            for slot, i in g.real:
                for k in range(len(asked.get(i, [])[r * Q : (r + 1) * Q])):
                    outputs[slot].append(until_eos(out[slot, k], self.eos))
            if bar is not None:  # this process's questions of the round
                bar.update(sum(len(qs[r * Q : (r + 1) * Q]) for qs in asked.values()))
        return outputs

    def _efficacy(self, g, stack: AdapterStack, asked) -> dict[int, list[bool | None]]:
        """P(new) > P(true) per CounterFact question that knows its true target."""
        here = any(q.efficacy_prompt is not None for qs in asked.values() for q in qs)
        if not np.any(multihost_utils.process_allgather(np.int32(here))):  # every process agrees
            return {}
        Q, n = self.ev.batch_size, len(g.slots)
        inputs = {
            i: [
                _efficacy_inputs(q, self.tok, self.ev.efficacy_leading_space)
                if q.efficacy_prompt
                else None
                for q in qs
            ]
            for i, qs in asked.items()
        }
        T = max((len(ctx) for xs in inputs.values() for x in xs if x for ctx, _ in x), default=1)
        T = int(np.max(multihost_utils.process_allgather(np.int32(-(-T // 8) * 8))))
        graph = self.job.model.graph(stack.placement)
        result: dict[int, list[bool | None]] = {slot: [] for slot, _ in g.real}
        for r in self._rounds(g, asked):
            tokens = np.full((n, 2 * Q, T), self.pad, np.int32)
            mask = np.zeros((n, 2 * Q, T), bool)
            last = np.zeros((n, 2 * Q), np.int32)
            target = np.zeros((n, 2 * Q), np.int32)
            for slot, i in g.real:
                for k, pair in enumerate(inputs.get(i, [])[r * Q : (r + 1) * Q]):
                    for j, (ctx, tid) in enumerate(pair or ()):
                        row = 2 * k + j
                        tokens[slot, row, : len(ctx)] = ctx
                        mask[slot, row, : len(ctx)] = True
                        last[slot, row], target[slot, row] = len(ctx) - 1, tid
            logits = stack_forward(
                graph,
                self.job.model.params,
                stack.weights,
                stack.consts,
                self.job.global_array(tokens),
                self.job.global_array(mask),
            )
            logp = _last_logprobs(logits, jnp.asarray(last), jnp.asarray(target))
            logp = np.asarray(multihost_utils.process_allgather(logp, tiled=True))
            for slot, i in g.real:
                for k, pair in enumerate(inputs.get(i, [])[r * Q : (r + 1) * Q]):
                    result[slot].append(
                        None
                        if pair is None
                        else metrics.efficacy(
                            float(logp[slot, 2 * k]), float(logp[slot, 2 * k + 1])
                        )
                    )
        return result


def _csv(v: Any) -> Any:
    return "+".join(map(str, v)) if isinstance(v, list | tuple) else v


def write_results(run_dir: Path, rows: list[dict], predictions: list[dict]) -> None:
    """results.csv (one row per adapter, in grid order) and predictions.jsonl, atomically."""
    rows = sorted(rows, key=lambda r: r["index"])
    fields = list(dict.fromkeys(k for r in rows for k in r if k != "index"))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write(run_dir / "results.csv", buf.getvalue())
    atomic_write(
        run_dir / "predictions.jsonl",
        "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in predictions),
    )


def gather_rows(rows: list[dict]) -> list[dict]:
    """Every process's rows, on every process (JSON through a byte-array allgather)."""
    if jax.process_count() == 1:
        return rows
    blob = np.frombuffer(json.dumps(rows).encode(), np.uint8)
    size = int(np.max(multihost_utils.process_allgather(np.int64(len(blob)))))
    padded = np.zeros(size, np.uint8)
    padded[: len(blob)] = blob
    every = np.asarray(multihost_utils.process_allgather(padded)).reshape(-1, size)
    out = []
    for chunk in every:
        out.extend(json.loads(bytes(chunk).rstrip(b"\0").decode()))
    return out


def evaluate_run(
    job: Job,
    stacks: Sequence[AdapterStack],
    run_dir: Path,
    ev: EvalSection,
    progress: bool = False,
) -> list[dict]:
    """Evaluate (a progress bar on stderr with `progress`), then write results.csv,
    predictions.jsonl and the capacity report."""
    import logging

    from jaxlora.report import write_report

    judge = None
    if ev.judge and jax.process_index() == 0:  # its rubric checked before the evaluation
        from jaxlora.llm.judge import metric_judge

        judge = metric_judge(job.config.llm)
    rows, predictions = Evaluator(job, ev, progress).run(stacks)
    rows, predictions = gather_rows(rows), gather_rows(predictions)
    if judge is not None:
        from jaxlora.llm.judge import judge_results

        judge_results(
            rows,
            predictions,
            lambda r: r["name"],
            lambda p: p["adapter"],
            job.config.llm,
            run_dir / "judge_cache.sqlite",
            backend=judge,
        )
    if jax.process_index() == 0:
        write_results(run_dir, rows, predictions)
        try:
            write_report(run_dir)
        except DataError as e:  # the results stand; a report needs sizes to compare
            logging.getLogger(__name__).warning("no capacity report: %s", e)
    multihost_utils.sync_global_devices("jaxlora-eval")
    return sorted(rows, key=lambda r: r["index"])


def load_stacks(job: Job, run_dir: Path) -> list[AdapterStack]:
    """The run's exported adapters, stacked in the job's group layout (padding slots repeat the
    group's first adapter and are never read)."""
    from jaxlora.peft_io import load_peft

    stacks = []
    for g in job.groups:
        names = [job.plans[i].name for _, i in g.real]
        dirs = [run_dir / "adapters" / name for name in names]
        absent = [str(d) for d in dirs if not d.is_dir()]
        if absent:
            raise DataError(f"{absent[0]} is missing: evaluate a run whose training finished")
        stack = load_peft(job.model, dirs, names)
        slot = {i: k for k, (_, i) in enumerate(g.real)}
        stacks.append(stack.select([slot.get(i, 0) for i in g.slots]))
    return stacks


def run_eval(
    run_dir: str | Path,
    overrides: Sequence[str] = (),
    devices: Sequence[jax.Device] | None = None,
    progress: bool = False,
) -> list[dict]:
    """`jaxlora eval RUN_DIR [--no-progress]`: evaluate every adapter of a finished run."""
    from jaxlora.config import load_config

    run_dir = Path(run_dir)
    if not (run_dir / "config.yaml").exists():
        raise DataError(f"{run_dir} is not a jaxlora run directory (no config.yaml)")
    config = load_config(run_dir / "config.yaml", overrides)
    job = Job(config, devices)
    stacks = load_stacks(job, run_dir)
    lock = RunLock(run_dir).acquire() if jax.process_index() == 0 else None
    try:
        return evaluate_run(job, stacks, run_dir, config.eval or EvalSection(), progress)
    finally:
        if lock is not None:
            lock.release()
