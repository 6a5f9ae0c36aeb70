"""Routers: which units of the adapter library answer a question.

A router is fitted once on the library's *keys* (one text per unit: its content or a summary,
stored in the run directory) and then routes a whole batch of questions at once, returning a
`Route`: the top-k unit indices [Q, k], best first, and their scores [Q, k].

- `oracle`: each question's own unit (the study's assumption of ideal routing); k must be 1,
  since an oracle has no opinion about a second-best unit.
- `bm25`: lexical retrieval with `bm25s` (its own tokenizer, optional English stopwords).
- `embedding`: any Llama/Qwen decoder jaxlora loads used as an encoder (the study used
  bge-large; Qwen3-Embedding is such a decoder). Hidden states after the final norm are pooled
  (`mean` over real tokens or the `last` real token), L2-normalised and compared by cosine.
  Unlike the study, keys longer than `max_length` are an error unless `truncate=True` (and then
  counted in `truncated`), and queries may carry an instruction (Qwen3-Embedding's
  `Instruct: {task}\\nQuery:{query}`), applied to queries only. Key embeddings are cached on
  disk, named by a hash of everything that determines them, so a second run reads them.

Every scoring router builds the full score matrix [Q, U] and takes the top-k in numpy, which
makes *search scope* one mask: with `scope="document"` a question sees only the units of its
own document (the study's NarrativeQA/QuALITY setting); others are set to -inf. A document with
fewer than k units is an error rather than a ragged or padded answer, so a `Route` always holds
k real units per question. Ties are broken by unit order (stable sort), so routes are
deterministic.

Errors are one-line `RouterError`s naming the fix. Arrow routing (PEFT's per-token routing
from each adapter's own singular vectors) is not implemented here: it needs adapter weights,
not keys, and belongs with the combiner.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import itertools
import json
import logging
import os
from collections.abc import Hashable, Sequence
from pathlib import Path
from typing import Any, ClassVar, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import JaxloraError

log = logging.getLogger(__name__)

Scope = Literal["global", "document"]
Pooling = Literal["mean", "last"]
QUERY_TEMPLATE = "Instruct: {instruction}\nQuery:{query}"  # Qwen3-Embedding's query format


class RouterError(JaxloraError):
    """A router that cannot be built or asked as requested."""


@dataclasses.dataclass(frozen=True)
class Route:
    """Top-k units per question, best first: `indices` int32 [Q, k], `scores` float32 [Q, k]."""

    indices: np.ndarray
    scores: np.ndarray

    @property
    def k(self) -> int:
        return int(self.indices.shape[1])


def routing_accuracy(route: Route, question_units: Sequence[int]) -> dict[str, float]:
    """Agreement with the oracle: {"top1": share whose best unit is their own,
    f"recall@{k}": share whose own unit is anywhere in the top k}."""
    own = np.asarray(question_units)
    if own.shape != (route.indices.shape[0],):
        raise RouterError(
            f"routing_accuracy needs one unit per routed question: {route.indices.shape[0]} "
            f"questions were routed, {own.size} question units given"
        )
    hits = route.indices == own[:, None]
    return {"top1": float(hits[:, 0].mean()), f"recall@{route.k}": float(hits.any(1).mean())}


class Router:
    """`fit(keys, key_docs)` once, then `route(questions, k, ...)` for batches of questions."""

    kind: ClassVar[str]
    num_units: int = 0

    def fit(self, keys: Sequence[str], key_docs: Sequence[Hashable] | None = None) -> Router:
        raise NotImplementedError

    def route(
        self,
        questions: Sequence[str],
        k: int,
        question_units: Sequence[int] | None = None,
        question_docs: Sequence[Hashable] | None = None,
    ) -> Route:
        raise NotImplementedError

    def _check_k(self, k: int, where: str = "the library") -> None:
        if self.num_units == 0:
            raise RouterError(f"{self.kind} router has no keys: call fit(keys) before route()")
        if not isinstance(k, int | np.integer) or k < 1:
            raise RouterError(f"routing k must be a positive integer, got {k!r}")
        if k > self.num_units:
            raise RouterError(f"routing k={k} is larger than {where} ({self.num_units} units)")


class OracleRouter(Router):
    """Each question's own unit (`question_units`), score 1."""

    kind = "oracle"

    def fit(self, keys: Sequence[str], key_docs: Sequence[Hashable] | None = None) -> Router:
        # Only the number of units matters: an oracle never reads the key texts.
        if len(keys) == 0:
            raise RouterError("oracle router has no keys: the library has no units")
        self.num_units = len(keys)
        return self

    def route(self, questions, k, question_units=None, question_docs=None) -> Route:
        self._check_k(k)
        if k != 1:
            raise RouterError(
                f"the oracle router knows only each question's own unit: k must be 1, got {k}"
            )
        if question_units is None or len(question_units) != len(questions):
            raise RouterError("the oracle router needs question_units: one unit index per question")
        own = np.asarray(question_units, np.int64)
        if own.size and (own.min() < 0 or own.max() >= self.num_units):
            raise RouterError(
                f"question_units must lie in [0, {self.num_units}), got {own.min()}..{own.max()}"
            )
        return Route(own.astype(np.int32)[:, None], np.ones((own.size, 1), np.float32))


class ScoringRouter(Router):
    """A router that scores every (question, unit) pair; subclasses define `scores`."""

    def __init__(self, scope: Scope = "global"):
        if scope not in ("global", "document"):
            raise RouterError(f"unknown routing scope {scope!r}: use 'global' or 'document'")
        self.scope = scope
        self.key_docs: list[Hashable] | None = None

    def fit(self, keys: Sequence[str], key_docs: Sequence[Hashable] | None = None) -> Router:
        keys = list(keys)
        if not keys:
            raise RouterError(f"{self.kind} router has no keys: the library has no units")
        for i, key in enumerate(keys):
            if not isinstance(key, str) or not key.strip():
                raise RouterError(
                    f"{self.kind} router: key {i} is empty; every unit needs a key text"
                )
        if self.scope == "document":
            if key_docs is None or len(key_docs) != len(keys):
                raise RouterError("document-scoped routing needs key_docs: one document id per key")
            self.key_docs = list(key_docs)
        self._fit_keys(keys)
        self.num_units = len(keys)
        return self

    def _fit_keys(self, keys: list[str]) -> None:
        raise NotImplementedError

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        """float32 [Q, U]: every question against every unit (higher is better)."""
        raise NotImplementedError

    def route(self, questions, k, question_units=None, question_docs=None) -> Route:
        self._check_k(k)
        questions = list(questions)
        for i, q in enumerate(questions):
            if not isinstance(q, str) or not q.strip():
                raise RouterError(f"question {i} is empty; routing needs its text")
        mask_QU = self._scope_mask(question_docs, len(questions), k)
        scores_QU = self.scores(questions) if questions else np.zeros((0, self.num_units))
        if mask_QU is not None:
            scores_QU = np.where(mask_QU, scores_QU, -np.inf)
        # Stable sort of the negated scores: ties go to the lower unit index, deterministically.
        top_Qk = np.argsort(-scores_QU, axis=1, kind="stable")[:, :k]
        top_scores = np.take_along_axis(scores_QU, top_Qk, axis=1)
        return Route(top_Qk.astype(np.int32), top_scores.astype(np.float32))

    def _scope_mask(self, question_docs, num_questions: int, k: int) -> np.ndarray | None:
        if self.scope == "global":
            return None
        if question_docs is None or len(question_docs) != num_questions:
            raise RouterError(
                "document-scoped routing needs question_docs: one document id per question"
            )
        units_of: dict[Hashable, list[int]] = {}
        for u, doc in enumerate(self.key_docs):
            units_of.setdefault(doc, []).append(u)
        mask_QU = np.zeros((num_questions, self.num_units), bool)
        for q, doc in enumerate(question_docs):
            units = units_of.get(doc, [])
            # Fewer candidates than k: an error, so that every Route has k real units.
            if len(units) < k:
                raise RouterError(
                    f"document {doc!r} (question {q}) has {len(units)} units, fewer than "
                    f"k={k}: lower k or use scope 'global'"
                )
            mask_QU[q, units] = True
        return mask_QU


def _bm25s():
    import bm25s

    # bm25s sets its own logger to DEBUG on import; its progress notes are not ours to print.
    logging.getLogger("bm25s").setLevel(logging.WARNING)
    return bm25s


class BM25Router(ScoringRouter):
    """Okapi BM25 (`bm25s`) over the key texts; `stopwords` "en" or None.

    `ngrams=2` indexes adjacent word pairs as well as words: a bag of words cannot tell a key
    holding "Mary Smith" from one holding "Mary Jones" and "John Smith", a bigram can.
    """

    kind = "bm25"

    def __init__(
        self,
        scope: Scope = "global",
        stopwords: str | None = "en",
        k1: float = 1.5,
        b: float = 0.75,
        method: str = "lucene",
        ngrams: int = 1,
    ):
        super().__init__(scope)
        if ngrams not in (1, 2):
            raise RouterError(f"bm25 ngrams must be 1 or 2, got {ngrams!r}")
        self.stopwords, self.k1, self.b, self.method = stopwords, k1, b, method
        self.ngrams = ngrams

    def _tokenize(self, texts: list[str]) -> list[list[str]]:
        bm25s = _bm25s()
        words = bm25s.tokenize(
            texts, stopwords=self.stopwords or [], return_ids=False, show_progress=False
        )
        if self.ngrams == 1:
            return words
        # Pairs are joined by a space, which no word contains, so they never collide with words.
        return [w + [f"{a} {b}" for a, b in itertools.pairwise(w)] for w in words]

    def _fit_keys(self, keys: list[str]) -> None:
        bm25s = _bm25s()
        tokens = self._tokenize(keys)
        for i, toks in enumerate(tokens):
            # A key of stopwords only could never be retrieved: refuse it like an empty one.
            if not toks:
                raise RouterError(
                    f"bm25 router: key {i} has no words left to index ({keys[i][:40]!r})"
                )
        self._index = bm25s.BM25(k1=self.k1, b=self.b, method=self.method)
        self._index.index(tokens, show_progress=False)

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        # bm25s scores one query at a time against its sparse index (a vectorised sum over the
        # query's terms); a question with no indexed word scores 0 everywhere.
        rows = []
        for toks in self._tokenize(list(questions)):
            ids = self._index.get_tokens_ids(toks)
            rows.append(self._index.get_scores_from_ids(ids))
        return np.stack(rows).astype(np.float32)


def pool(hidden_BTD: jax.Array, mask_BT: jax.Array, pooling: Pooling) -> jax.Array:
    """Pool hidden states over real tokens -> L2-normalised float32 [B, D].

    `last` takes each row's last real token, wherever the padding is (left or right).
    """
    h = hidden_BTD.astype(jnp.float32)
    mask = mask_BT.astype(bool)
    if pooling == "mean":
        w = mask.astype(jnp.float32)[..., None]
        x_BD = (h * w).sum(1) / jnp.maximum(w.sum(1), 1.0)
    elif pooling == "last":
        T = mask.shape[1]
        last_B = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)
        x_BD = jnp.take_along_axis(h, last_B[:, None, None], axis=1)[:, 0]
    else:
        raise RouterError(f"unknown pooling {pooling!r}: use 'mean' or 'last'")
    return x_BD / jnp.maximum(jnp.linalg.norm(x_BD, axis=-1, keepdims=True), 1e-12)


@functools.partial(jax.jit, static_argnames=("graphdef", "pooling"))
def _encode(graphdef, params, tokens_BT, mask_BT, pooling):
    module = nnx.merge(graphdef, nnx.State({}), nnx.State({}), params)
    hidden_BTD, _ = module(tokens_BT, mask_BT, return_hidden=True)
    return pool(hidden_BTD, mask_BT, pooling)


class EmbeddingRouter(ScoringRouter):
    """Cosine similarity of pooled decoder hidden states (see the module docstring).

    `encoder`: a checkpoint directory, hub id or preset name (loaded in `dtype` on first use),
    or a loaded `jaxlora.Model`. `pooling`: "mean" over real tokens or the "last" real token
    (use "last" with `padding_side="left"` for Qwen3-Embedding). Texts longer than
    `max_length` tokens are an error unless `truncate` (counted in `truncated`). `instruction`
    is put into `query_template` around each question, never around keys. With `cache_dir`,
    key embeddings are stored as `cache_dir/keys_<hash>.npy` and read back by later fits.
    """

    kind = "embedding"

    def __init__(
        self,
        encoder: Any,
        scope: Scope = "global",
        pooling: Pooling = "mean",
        max_length: int = 512,
        truncate: bool = False,
        instruction: str | None = None,
        query_template: str = QUERY_TEMPLATE,
        batch_size: int = 16,
        padding_side: Literal["left", "right"] = "right",
        cache_dir: str | os.PathLike | None = None,
        dtype: str = "float32",
        progress: bool = True,
    ):
        super().__init__(scope)
        if pooling not in ("mean", "last"):
            raise RouterError(f"unknown pooling {pooling!r}: use 'mean' or 'last'")
        if padding_side not in ("left", "right"):
            raise RouterError(f"unknown padding_side {padding_side!r}: use 'left' or 'right'")
        if max_length < 1 or batch_size < 1:
            raise RouterError("embedding max_length and batch_size must be positive")
        self.encoder, self.pooling, self.max_length = encoder, pooling, max_length
        self.truncate, self.instruction, self.query_template = truncate, instruction, query_template
        self.batch_size, self.padding_side, self.dtype = batch_size, padding_side, dtype
        self.cache_dir = None if cache_dir is None else Path(cache_dir)
        self.progress = progress
        self.truncated = {"keys": 0, "queries": 0}
        self.cache_path: Path | None = None
        self._model = None

    @property
    def model(self):
        """The encoder, loaded on first use (a cache hit for the keys may still need queries)."""
        if self._model is None:
            if isinstance(self.encoder, str | os.PathLike):
                from jaxlora.models.model import load_pretrained

                self._model = load_pretrained(self.encoder, dtype=self.dtype)
            else:
                self._model = self.encoder
            if self._model.tokenizer is None:
                raise RouterError(f"embedding encoder {self._encoder_name()} has no tokenizer")
        return self._model

    def _encoder_name(self) -> str:
        if isinstance(self.encoder, str | os.PathLike):
            return str(self.encoder)
        return self.encoder.config.name_or_path or "<model>"

    def _tokenize(self, texts: list[str], what: str) -> list[list[int]]:
        tok = self.model.tokenizer
        ids = tok(texts, add_special_tokens=True)["input_ids"]
        too_long = [i for i, x in enumerate(ids) if len(x) > self.max_length]
        if too_long and not self.truncate:
            i = too_long[0]
            raise RouterError(
                f"{len(too_long)} embedding {what} are longer than max_length {self.max_length} "
                f"tokens ({what} {i} has {len(ids[i])}): raise max_length or pass truncate=True"
            )
        if too_long:
            # The tokenizer's own truncation keeps its special tokens (e.g. a final EOS).
            cut = tok([texts[i] for i in too_long], truncation=True, max_length=self.max_length)
            for i, x in zip(too_long, cut["input_ids"], strict=True):
                ids[i] = x
            self.truncated[what] += len(too_long)
            log.warning(f"embedding: truncated {len(too_long)} {what} to {self.max_length} tokens")
        return ids

    def encode(self, texts: Sequence[str], what: Literal["keys", "queries"] = "keys") -> np.ndarray:
        """L2-normalised embeddings float32 [len(texts), D] of texts as given (no instruction)."""
        model = self.model
        if not texts:
            return np.zeros((0, model.config.hidden_size), np.float32)
        ids = self._tokenize(list(texts), what)
        graphdef = model.graph()
        pad_id = model.tokenizer.pad_token_id or 0
        B = self.batch_size
        # Sorting by length keeps each batch's padding small; results are put back in order.
        order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
        out = np.zeros((len(ids), model.config.hidden_size), np.float32)
        batches = range(0, len(order), B)
        if self.progress and len(order) > 4 * B:
            from tqdm.auto import tqdm

            batches = tqdm(batches, desc=f"embedding {what}", unit="batch")
        for start in batches:
            rows = order[start : start + B]
            # Fixed batch size and power-of-two lengths: one compiled program per length bucket.
            T = max(16, 1 << (max(len(ids[i]) for i in rows) - 1).bit_length())
            tokens = np.full((B, T), pad_id, np.int32)
            mask = np.zeros((B, T), bool)
            mask[:, -1 if self.padding_side == "left" else 0] = True  # filler rows stay finite
            for r, i in enumerate(rows):
                n = len(ids[i])
                cols = slice(T - n, T) if self.padding_side == "left" else slice(0, n)
                tokens[r], mask[r] = pad_id, False
                tokens[r, cols], mask[r, cols] = ids[i], True
            emb = _encode(
                graphdef, model.params, jnp.asarray(tokens), jnp.asarray(mask), self.pooling
            )
            out[rows] = np.asarray(emb)[: len(rows)]
        return out

    def _fit_keys(self, keys: list[str]) -> None:
        self.cache_path = None
        if self.cache_dir is not None:
            self.cache_path = self.cache_dir / f"keys_{self._cache_hash(keys)}.npy"
            if self.cache_path.exists():
                cached = np.load(self.cache_path)
                if cached.ndim == 2 and cached.shape[0] == len(keys):
                    self.key_emb_UD = cached
                    if self.truncate:  # count truncations as a fresh fit would, never silent
                        self._tokenize(keys, "keys")
                    return
                log.warning(
                    f"{self.cache_path}: cached key embeddings have the wrong shape; recomputing"
                )
        self.key_emb_UD = self.encode(keys, "keys")
        if self.cache_path is not None:
            self.cache_dir.mkdir(parents=True, exist_ok=True)
            # Through a temporary name: a killed run never leaves a half-written cache to read.
            tmp = self.cache_path.with_name(f".{self.cache_path.name}.tmp-{os.getpid()}.npy")
            np.save(tmp, self.key_emb_UD)
            os.replace(tmp, self.cache_path)

    def _cache_hash(self, keys: list[str]) -> str:
        """A hash of everything the key embeddings depend on (not scope, batching or padding)."""
        if isinstance(self.encoder, str | os.PathLike) and Path(self.encoder).exists():
            path = Path(self.encoder).resolve()
            files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
            # Size and mtime of each file: rewritten weights under the same path invalidate it.
            encoder = [str(path)] + [
                f"{p.relative_to(path) if path.is_dir() else p.name}:{p.stat().st_size}:"
                f"{p.stat().st_mtime_ns}"
                for p in files
            ]
        elif isinstance(self.encoder, str | os.PathLike):
            encoder = [str(self.encoder)]  # a preset name or hub id
        else:
            # A Model object: its config and a sample of every weight tensor.
            leaves = jax.tree.leaves(self.encoder.params)
            sample = [np.asarray(x.reshape(-1)[:64], np.float32).tobytes().hex() for x in leaves]
            encoder = [repr(self.encoder.config), *sample]
        spec = {
            "format": 1,
            "encoder": encoder,
            "pooling": self.pooling,
            "max_length": self.max_length,
            "truncate": self.truncate,
            "dtype": self.dtype,
            "keys": hashlib.sha256(json.dumps(keys).encode()).hexdigest(),
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:16]

    def scores(self, questions: Sequence[str]) -> np.ndarray:
        if self.instruction:
            questions = [
                self.query_template.format(instruction=self.instruction, query=q) for q in questions
            ]
        q_QD = self.encode(questions, "queries")
        return q_QD @ self.key_emb_UD.T


ROUTERS: dict[str, type[Router]] = {r.kind: r for r in (OracleRouter, BM25Router, EmbeddingRouter)}


def make_router(kind: str, **options: Any) -> Router:
    """A router by name ("oracle", "bm25", "embedding") with its options (see each class)."""
    if kind not in ROUTERS:
        raise RouterError(f"unknown router {kind!r}: use one of {', '.join(ROUTERS)}")
    cls = ROUTERS[kind]
    params = {
        name: p
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)  # object.__init__'s (*args, **kw)
    }
    unknown = sorted(set(options) - set(params) - {"self"})
    if unknown:
        allowed = ", ".join(p for p in params if p != "self") or "none"
        raise RouterError(
            f"{kind} router: unknown option(s) {', '.join(unknown)} (allowed: {allowed})"
        )
    missing = [
        p.name
        for p in params.values()
        if p.name != "self" and p.default is inspect.Parameter.empty and p.name not in options
    ]
    if missing:
        raise RouterError(f"{kind} router needs option(s) {', '.join(missing)}")
    return cls(**options)
