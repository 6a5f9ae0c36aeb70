"""Batched text generation over one base model and a library of adapters: what the local
backend and `jaxlora serve` both decode with.

A request is a `Row`: prompt token ids, which adapter continues them (0 = the base model), and
its own sampling settings, seed, token limit and stop strings. `Engine.run` decodes any number
of rows in shared passes:

- Rows whose adapter is the base model alone go through `jaxlora.generate.generate` (the base
  program, no LoRA work). A batch that mixes adapters is decoded over one stack whose slot 0
  is an all-zero adapter (the base: B = 0 makes the LoRA term exactly zero) and whose slots
  1.. are the library's adapters, so different adapters share one pass: its rows sorted by
  adapter, either each row's adapter gathered once per pass (`generate_routed`), or, on a TPU
  when the rows share adapters, the pass's distinct adapters gathered once and every adapted
  projection run as grouped products over them (`jaxlora.grouped`; `Engine`'s `grouped`).
- Shapes are bucketed so that a server sees few distinct programs (each compiles once, ~1-2 s
  on CPU): the prompt width to a power of two (>= 32), the batch to 4, 16 or `max_batch` rows
  (filler rows are one-token prompts whose output is dropped; decoding is memory-bound on an
  accelerator, so 4 rows cost what 1 does), the number of new tokens to a power of two
  (>= 16). A row is then cut to its own `max_tokens`.
- Row r draws with `jax.random.key(row.seed)`, whatever else shares its pass: the same request
  gives the same text alone or batched.
- Text is `tokenizer.decode(ids up to EOS, skip_special_tokens=True)`, cut before the earliest
  stop string; `finish_reason` is "stop" (EOS or a stop string) or "length".
- Streaming: `run(rows, on_text=fn)` calls `fn(i, piece)` with row i's text as it is produced
  for the rows that ask (`Row.stream`): their pass decodes with `DecodeSpec(stream=k)`, whose
  compiled loop hands its tokens every k steps to a sink (`generate.streaming`) that
  detokenises them incrementally (`stream.TextStream`); the pieces of a row concatenate to its
  `Output.text`. A pass without such rows compiles and runs as it would without streaming.

`resolve_source` reads what a model argument names: a model (path, hub id or preset) or a
`jaxlora train` run directory (its base model and its trained adapters).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.errors import JaxloraError
from jaxlora.generate import (
    DecodeSpec,
    Sampling,
    decode_stack_for,
    eos_and_pad,
    generate,
    make_sampler,
    streaming,
    until_eos,
)
from jaxlora.grouped import Grouping, decode_active, groupable, grouped_logits, weights_placement
from jaxlora.llm.stream import TextStream
from jaxlora.lora import AdapterStack, pad_to, routed_logits
from jaxlora.models.transformer import LoRAPlacement

FinishReason = Literal["stop", "length"]
# Rows per distinct adapter from which a TPU pass runs grouped (Engine's `grouped`).
GROUPED_ROWS_PER_ADAPTER = 4
MIN_WIDTH = 32
MIN_NEW_TOKENS = 16
# Decode steps per stream callback (`DecodeSpec.stream`): a ~0.1 ms host callback (and the
# detokenising) per step costs a tiny model 2.5x its decoding on CPU; every 4 steps 1.5-1.9x,
# small-llama +13%, and the chunks stay within 4 steps of the device (the first token leaves
# right after the prefill). benchmarks/README.md, "Streaming".
STREAM_BLOCK = 4


class LLMError(JaxloraError):
    """An LLM backend or server setting that cannot be honoured."""


@dataclasses.dataclass(frozen=True)
class Row:
    """One generation request: prompt ids, adapter slot (0 = base), and its own settings."""

    tokens: tuple[int, ...]
    adapter: int = 0
    max_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0
    stop: tuple[str, ...] = ()
    logprobs: int | None = None  # None: no log-probabilities; N: the token's and the top N
    echo: bool = False  # the prompt's tokens scored too
    stream: bool = False  # its text goes to `run`'s on_text as it is produced


# (row index, piece of its text) -> None: where `Engine.run` streams text.
OnText = Callable[[int, str], None]


# The most alternatives a scored token carries (OpenAI's chat allows 20, completions 5).
MAX_TOP_LOGPROBS = 20


@dataclasses.dataclass(frozen=True)
class Scores:
    """Log-probabilities under the row's model of `tokens` (the prompt's with echo, then the
    generated ones): `logprobs[i]` of token i given those before it (None for a first token),
    and `top[i]` the N most likely (id, log-probability) at that position."""

    tokens: tuple[int, ...]
    logprobs: tuple[float | None, ...]
    top: tuple[tuple[tuple[int, float], ...] | None, ...]


@dataclasses.dataclass(frozen=True)
class Output:
    tokens: tuple[int, ...]  # generated ids, up to (without) EOS
    text: str  # decoded, cut before the first stop string
    finish_reason: FinishReason
    scores: Scores | None = None  # when the row asked for logprobs (`Engine.score`)


@dataclasses.dataclass(frozen=True)
class Source:
    """What a model argument names: the base model to load and the adapters that come with it."""

    model: str
    dtype: str = "float32"
    adapters: dict[str, Path] = dataclasses.field(default_factory=dict)


def resolve_source(model_or_run_dir: str | Path) -> Source:
    """A run directory (config.yaml + adapters/) -> its base model and trained adapters;
    anything else is a model for `load_pretrained` (a path, a hub id or a preset)."""
    path = Path(model_or_run_dir)
    if not (path / "config.yaml").is_file():
        return Source(str(model_or_run_dir))
    from jaxlora.config import load_config

    config = load_config(path / "config.yaml")
    found = sorted(
        d for d in (path / "adapters").glob("*") if (d / "adapter_config.json").is_file()
    )
    if not found:
        raise LLMError(f"{path}: the run has no trained adapters in {path / 'adapters'}")
    return Source(config.model.path, config.model.dtype, {d.name: d for d in found})


def zero_slot_stack(adapters: AdapterStack | None) -> AdapterStack | None:
    """[zero adapter (the base), *adapters]: one stack that routes base and adapter rows."""
    if adapters is None:
        return None

    def prepend(x):
        return jax.numpy.concatenate([jax.numpy.zeros_like(x[:1]), x], axis=0)

    return AdapterStack(
        jax.tree.map(prepend, adapters.weights),
        jax.tree.map(prepend, adapters.consts),
        (adapters.configs[0], *adapters.configs),
        ("", *adapters.names),
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "mesh"))
def _routed_decode(
    graphdef, base, weights, consts, slots_B, tokens_BT, mask_BT, spec, sampler, mesh=None
):
    """Row b decoded by adapter slots_B[b]: a stack of B one-row adapters (`decode_stack_for`
    `mesh`), for passes that do not run grouped (`Engine._grouped_pass`)."""
    w = jax.tree.map(lambda x: x[slots_B], weights)
    c = jax.tree.map(lambda x: x[slots_B], consts)
    t, m = tokens_BT[:, None], mask_BT[:, None]
    return decode_stack_for(graphdef, base, w, c, t, m, spec, sampler, mesh)[:, 0]


def concat_stacks(model, stacks: Sequence[AdapterStack]) -> AdapterStack:
    """One stack of all adapters of `stacks`, zero-padded to the union of their layouts."""
    placements = [weights_placement(s, model.config.num_layers) for s in stacks]
    layers = [p.layers for p in placements]
    union = LoRAPlacement(
        rank=max(p.rank for p in placements),
        modules=frozenset().union(*(p.modules for p in placements)),
        layers=None if any(x is None for x in layers) else frozenset().union(*layers),
        residual=any(p.residual for p in placements),
        dora=any(p.dora for p in placements),
    )
    padded = [pad_to(model, s, union) for s in stacks]
    return AdapterStack(
        jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[p.weights for p in padded]),
        jax.tree.map(lambda *xs: jnp.concatenate(xs, axis=0), *[p.consts for p in padded]),
        tuple(c for s in stacks for c in s.configs),
        tuple(n for s in stacks for n in s.names),
    )


@jax.jit
def _token_scores(logits, ids):
    """log p(ids[t] | ids[:t]) [B, T] (0 at t = 0) and the top MAX_TOP_LOGPROBS log-probabilities
    and ids [B, T, K] of each position's next token."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    picked = jnp.take_along_axis(logp[:, :-1], ids[:, 1:, None], axis=-1)[..., 0]
    top_lp, top_ids = jax.lax.top_k(logp, MAX_TOP_LOGPROBS)
    return jnp.pad(picked, ((0, 0), (1, 0))), top_lp, top_ids


def _forward(on_text: OnText, indices: Sequence[int], b: int, piece: str) -> None:
    """A pass's row b is row indices[b] of the `run`."""
    on_text(indices[b], piece)


def _pow2(n: int, low: int) -> int:
    return max(low, 1 << max(0, math.ceil(math.log2(max(n, 1)))))


class Engine:
    """Decodes `Row`s of one model and one adapter stack in bucketed shared passes.

    `adapters` (optional) is the library; rows name slot 0 for the base and slot i for
    `adapters[i - 1]`. Not thread-safe: one thread (the server's batcher, or the caller of a
    local backend) drives it.

    `grouped`: whether passes that mix adapters gather each row's adapter (`generate_routed`,
    B copies for B rows) or gather the pass's U distinct adapters once and run every adapted
    projection as grouped products over them (`jaxlora.grouped`). None: grouped on a TPU when
    the rows share adapters (U <= B / GROUPED_ROWS_PER_ADAPTER), per row otherwise. Measured
    (benchmarks/README.md): on a TPU v5e chip (the compiler's memory) grouping needs 16% less
    than the per-row gather at U = B/4 and 63% less at U = 1, but 2.2x more at U = B (its
    kernel pads rank-16 factors to 128-wide tiles); on a CPU (no grouped matmul in XLA:CPU)
    it is 1.7-5.6x slower unless U = 1; GPUs are not measured. Stacks with DoRA adapters are
    always decoded per row.
    """

    def __init__(
        self,
        model,
        adapters: AdapterStack | None = None,
        *,
        max_batch: int = 32,
        grouped: bool | None = None,
    ):
        if model.tokenizer is None:
            raise LLMError(f"{model.config.name_or_path}: the model has no tokenizer to serve text")
        self.model, self.tok = model, model.tokenizer
        self.stack = zero_slot_stack(adapters)
        self.max_batch = max_batch
        self.grouped = grouped
        self.eos, self.pad = eos_and_pad(self.tok, model.config)
        self.max_positions = int(model.config.max_position_embeddings)
        # the platform the model's weights are on (decides `grouped=None`), not the host's
        self.platform = next(iter(jax.tree.leaves(model.params)[0].devices())).platform

    @property
    def num_slots(self) -> int:
        return 1 if self.stack is None else len(self.stack)

    # ------------------------------------------------------------------ text <-> tokens

    def encode(self, text: str) -> tuple[int, ...]:
        """A completion prompt: the text with the tokenizer's special tokens (BOS)."""
        return tuple(self.tok(text, add_special_tokens=True)["input_ids"])

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> tuple[int, ...]:
        """A chat prompt through the tokenizer's chat template, as `jaxlora eval` builds one."""
        if not getattr(self.tok, "chat_template", None):
            raise LLMError("the model's tokenizer has no chat template: use completions")
        text = self.tok.apply_chat_template(
            [dict(m) for m in messages], add_generation_prompt=True, tokenize=False
        )
        return tuple(self.tok(text, add_special_tokens=False)["input_ids"])

    def decode_text(self, ids: Sequence[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)

    def problem(self, row: Row, slots: int | None = None) -> str | None:
        """Why a row cannot be decoded (a one-line message naming the limit), or None; `slots`
        is the size of the stack its adapter indexes (default: the library's)."""
        if not row.tokens:
            return "the prompt is empty"
        if len(row.tokens) + row.max_tokens > self.max_positions:
            return (
                f"the prompt has {len(row.tokens)} tokens and max_tokens is {row.max_tokens}, "
                f"but the model reads at most {self.max_positions} positions"
            )
        if not 0 <= row.adapter < (self.num_slots if slots is None else slots):
            return f"adapter slot {row.adapter} is out of range"
        return None

    # ------------------------------------------------------------------ decoding

    def run(
        self,
        rows: Sequence[Row],
        adapters: AdapterStack | None = None,
        on_text: OnText | None = None,
    ) -> list[Output]:
        """Outputs of `rows`, in order. `adapters` replaces the library for this call (row i's
        adapter indexes it directly, no base slot): the hook for per-request stacks. `on_text`
        gets (i, piece) as row i's text is produced, for the rows with `stream` set (from the
        runtime's callback thread during a pass, the last piece from this thread after it)."""
        slots = None if adapters is None else len(adapters)
        for row in rows:
            if (why := self.problem(row, slots)) is not None:
                raise LLMError(why)
        # Similar lengths share a pass, so a long prompt does not widen every row.
        outputs: list[Output | None] = [None] * len(rows)
        for i, row in enumerate(rows):  # scoring only (echo): nothing to decode
            if row.max_tokens == 0:
                outputs[i] = Output((), "", "length")
        order = sorted(
            (i for i in range(len(rows)) if outputs[i] is None), key=lambda i: len(rows[i].tokens)
        )
        for start in range(0, len(order), self.max_batch):
            # A pass's rows sorted by adapter: each adapter's rows run as one group (`_routed`).
            chunk = sorted(order[start : start + self.max_batch], key=lambda i: rows[i].adapter)
            emit = None if on_text is None else functools.partial(_forward, on_text, chunk)
            passed = self._pass([rows[i] for i in chunk], adapters, emit)
            for i, out in zip(chunk, passed, strict=True):
                outputs[i] = out
        return outputs  # type: ignore[return-value]

    def score(
        self, rows: Sequence[Row], outputs: Sequence[Output], adapters: AdapterStack | None = None
    ) -> list[Output]:
        """`outputs` with the `Scores` their rows asked for (`Row.logprobs`): one forward pass
        over prompt + generated tokens under the row's adapter, log_softmax of its logits."""
        want = [i for i, r in enumerate(rows) if r.logprobs is not None]
        scored = list(outputs)
        for start in range(0, len(want), self.max_batch):
            chunk = want[start : start + self.max_batch]
            seqs = [rows[i].tokens + outputs[i].tokens for i in chunk]
            B, T = self._rows_bucket(len(chunk)), _pow2(max(map(len, seqs)), MIN_WIDTH)
            ids, mask = np.full((B, T), self.pad, np.int32), np.zeros((B, T), bool)
            for b, seq in enumerate(seqs):
                ids[b, : len(seq)], mask[b, : len(seq)] = seq, True
            stack = adapters if adapters is not None else self.stack
            if stack is None:
                logits = self.model(ids, mask)
            else:
                slots = [rows[i].adapter for i in chunk] + [0] * (B - len(chunk))
                if self._grouped_pass(stack, slots):
                    logits = grouped_logits(self.model, stack, slots, ids, mask)
                else:
                    logits = routed_logits(self.model, stack, slots, ids, mask)
            picked, top_lp, top_ids = (np.asarray(x) for x in _token_scores(logits, ids))
            for b, i in enumerate(chunk):
                r, n, first = rows[i], len(seqs[b]), 0 if rows[i].echo else len(rows[i].tokens)
                positions = range(first, n)
                scored[i] = dataclasses.replace(
                    outputs[i],
                    scores=Scores(
                        tokens=seqs[b][first:],
                        logprobs=tuple(float(picked[b, t]) if t else None for t in positions),
                        top=tuple(
                            tuple(
                                (int(top_ids[b, t - 1, k]), float(top_lp[b, t - 1, k]))
                                for k in range(r.logprobs)
                            )
                            if t
                            else None
                            for t in positions
                        ),
                    ),
                )
        return scored

    def _rows_buckets(self) -> list[int]:
        return [b for b in (4, 16) if b < self.max_batch] + [self.max_batch]

    def _rows_bucket(self, n: int) -> int:
        return next(b for b in self._rows_buckets() if b >= n)

    def warm_up(self) -> str:
        """Compile the passes that requests with prompts of up to MIN_WIDTH tokens and up to
        MIN_NEW_TOKENS new tokens use: every rows bucket, base and routed, greedy and sampled,
        streamed and not. Returns what was compiled. Longer prompts or completions compile on
        first use."""
        slots = [0] if self.stack is None else [0, 1]
        start = time.perf_counter()
        n = 0
        for rows in self._rows_buckets():
            for slot in slots:
                for temperature in (0.0, 1.0):
                    for stream in (False, True):
                        row = Row((self.pad,), slot, MIN_NEW_TOKENS, temperature, stream=stream)
                        self.run([row] * rows, on_text=lambda i, piece: None)
                        n += 1
        buckets = "/".join(map(str, self._rows_buckets()))
        paths = "base and routed" if len(slots) > 1 else "base"
        return (
            f"{n} decoding programs (rows {buckets}; {paths}; greedy and sampled; streamed and "
            f"not; prompts <= {MIN_WIDTH} tokens, <= {MIN_NEW_TOKENS} new) in "
            f"{time.perf_counter() - start:.1f} s"
        )

    def _pass(
        self, rows: Sequence[Row], adapters: AdapterStack | None, on_text: OnText | None = None
    ) -> list[Output]:
        B = self._rows_bucket(len(rows))
        T = _pow2(max(len(r.tokens) for r in rows), MIN_WIDTH)
        new = _pow2(max(r.max_tokens for r in rows), MIN_NEW_TOKENS)
        filler = Row((self.pad,), adapter=rows[-1].adapter, max_tokens=1)  # keeps rows sorted
        padded = [*rows, *[filler] * (B - len(rows))]
        ids = np.full((B, T), self.pad, np.int32)
        mask = np.zeros((B, T), bool)
        for b, r in enumerate(padded):
            ids[b, T - len(r.tokens) :], mask[b, T - len(r.tokens) :] = r.tokens, True
        sampled = any(r.temperature > 0 for r in rows)
        streams = {
            b: TextStream(self.decode_text, r.stop)
            for b, r in enumerate(rows)
            if r.stream and on_text is not None
        }
        kwargs = dict(
            max_new_tokens=new,
            sampling=[Sampling(r.temperature, r.top_p) for r in padded] if sampled else None,
            seed=[r.seed for r in padded],
            stream=STREAM_BLOCK if streams else 0,
        )
        stack = adapters if adapters is not None else self.stack
        with streaming(self._sink(rows, streams, on_text)) if streams else contextlib.nullcontext():
            if adapters is None and all(r.adapter == 0 for r in padded):
                out = generate(self.model, ids, mask, **kwargs)
            else:
                out = self._routed(stack, [r.adapter for r in padded], ids, mask, **kwargs)
        outputs = [self._finish(r, out[b]) for b, r in enumerate(rows)]
        for b, text in streams.items():
            if rest := text.finish(outputs[b].text):
                on_text(b, rest)  # type: ignore[misc]
        return outputs

    def _sink(self, rows: Sequence[Row], streams: dict[int, TextStream], on_text):
        """What a streamed pass's loop calls with its tokens so far: row b's new text to
        on_text(b, piece), up to its own max_tokens and EOS."""
        seen = dict.fromkeys(streams, 0)  # row b's tokens pushed so far (None: ended)

        def sink(step: int, tokens: np.ndarray) -> None:
            # [B, N] (base) or [B, 1, N] (routed: B one-row adapters), columns 0..step drawn
            tokens = tokens.reshape(tokens.shape[0], -1)
            for b, text in streams.items():
                if (start := seen[b]) is None:
                    continue
                end = min(step + 1, rows[b].max_tokens)
                for token in tokens[b, start:end].tolist():
                    if token in self.eos:
                        end = None
                        break
                    if piece := text.push(token):
                        on_text(b, piece)
                seen[b] = end

        return sink

    def _routed(
        self, stack: AdapterStack, slots, ids, mask, *, max_new_tokens, sampling, seed, stream=0
    ):
        """Row b decoded by adapter slots[b] of `stack`, the rows sorted by adapter (`run` sorts
        each pass): grouped over the pass's distinct adapters (`decode_active`) where
        `_grouped_pass` says so; otherwise as `generate_routed` does, each row's adapter
        gathered inside the compiled program (eagerly, its ~30 small gathers cost more than
        decoding a tiny model's pass)."""
        B = ids.shape[0]
        assert list(slots) == sorted(slots), "a pass's rows are sorted by adapter (`run`)"
        sampler = None if sampling is None else make_sampler(sampling, seed, (B,))
        spec = DecodeSpec(max_new_tokens, self.eos, self.pad, stream)
        tokens, mask = jnp.asarray(ids, jnp.int32), jnp.asarray(mask)
        if self._grouped_pass(stack, slots):
            grouping = Grouping.of(slots, len(stack), B)  # sorted already: order is 0..B-1
            out = decode_active(
                grouping.graph(self.model, stack),
                self.model.params,
                stack.weights,
                stack.consts,
                jnp.asarray(grouping.active),
                jnp.asarray(grouping.rows),
                tokens,
                mask,
                spec,
                sampler,
            )
            return np.asarray(out)
        if sampler is not None:
            sampler = jax.tree.map(lambda x: x[:, None], sampler)
        out = _routed_decode(
            self.model.graph(weights_placement(stack, self.model.config.num_layers)),
            self.model.params,
            stack.weights,
            stack.consts,
            jnp.asarray(slots, jnp.int32),
            tokens,
            mask,
            spec,
            sampler,
        )
        return np.asarray(out)

    def _grouped_pass(self, stack: AdapterStack, slots: Sequence[int]) -> bool:
        """Whether a pass whose rows use adapters `slots` runs grouped (see the class)."""
        if not groupable(stack):
            return False
        if self.grouped is not None:
            return self.grouped
        shared = len(set(slots)) * GROUPED_ROWS_PER_ADAPTER <= len(slots)
        return self.platform == "tpu" and shared

    def _finish(self, row: Row, out: np.ndarray) -> Output:
        generated = out[: row.max_tokens]
        ids = until_eos(generated, self.eos)
        reason: FinishReason = "stop" if len(ids) < len(generated) else "length"
        text = self.decode_text(ids)
        cut = min((i for s in row.stop if s and (i := text.find(s)) >= 0), default=-1)
        if cut >= 0:
            text, reason = text[:cut], "stop"
        return Output(tuple(ids), text, reason)
