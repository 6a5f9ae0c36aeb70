"""Decoding with an explicit KV cache, for one model or a stack of adapters: greedy, or
sampled with a temperature, top-k and top-p, each row with its own settings and random key.

One prefill over the (left-padded) prompts fills the cache; then a `lax.while_loop` feeds one
token per step until every row has produced an end-of-sequence token or `max_new_tokens` is
reached. The loop runs *outside* any vmap over adapters: the step function is what is
vmapped, so the loop counter and the cache's write slot stay unbatched scalars and the cache
update stays an in-place slice write. Rows that finished emit `pad_id`, as transformers'
`generate` does.

Streaming (`DecodeSpec.stream` = k > 0): the loop hands its tokens to the host as they are
produced, the first one right after the prefill and then every k steps (and at the end),
through an ordered `io_callback` to `_emit`, which forwards (step, tokens [..., B, N] whose
columns 0..step are drawn) to the sink set by `streaming(sink)` (one pass at a time runs under
it). A callback costs ~0.1 ms of host time on CPU, more than a tiny model's step: a block of k
steps shares one. A sink never raises into XLA (`_emit` logs what it raises). A spec without
streaming compiles no callback at all.

Sampling (`Sampling`) follows transformers' warpers: logits / temperature, then the top_k most
likely tokens, then the smallest set of them whose probability reaches top_p; a row with
temperature 0 takes the argmax. Row r's draw at step t uses `fold_in(key_r, t)` of its own key,
so a row's output never depends on the other rows of its batch: a batch equals its rows decoded
one at a time with the same keys.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import io_callback
from jax.sharding import Mesh

from jaxlora.errors import JaxloraError
from jaxlora.models.transformer import KVCache
from jaxlora.sharding import compiling_for, constrain, mesh_of

Array = jax.Array
# forward(tokens [..., B, T], mask [..., B, T], cache) -> (logits [..., B, T, V], cache)
Forward = Callable[[Array, Array, KVCache], tuple[Array, KVCache]]


def left_align(tokens: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Move each row's real tokens to the right end (left padding), keeping their order."""
    tokens, mask = np.asarray(tokens), np.asarray(mask).astype(bool)
    order = np.argsort(mask, axis=-1, kind="stable")
    return np.take_along_axis(tokens, order, -1), np.take_along_axis(mask, order, -1)


@dataclasses.dataclass(frozen=True)
class DecodeSpec:
    max_new_tokens: int
    eos_ids: tuple[int, ...]
    pad_id: int
    stream: int = 0  # k > 0: the tokens go to the `streaming` sink every k steps


# (step, tokens [..., B, N] drawn up to column step) -> None: where a streamed pass's tokens
# go (`streaming`).
StreamSink = Callable[[int, np.ndarray], None]
_sink: StreamSink | None = None
_sink_lock = threading.Lock()
log = logging.getLogger(__name__)


@contextlib.contextmanager
def streaming(sink: StreamSink) -> Iterator[None]:
    """Run a `DecodeSpec(stream=True)` pass with `sink` receiving its tokens step by step
    (called on the runtime's callback thread, in step order). One streamed pass at a time."""
    global _sink
    with _sink_lock:
        _sink = sink
        try:
            yield
        finally:
            _sink = None


def _emit(step, tokens) -> None:
    sink = _sink
    if sink is None:
        return
    try:
        sink(int(step), np.asarray(tokens))
    except Exception:  # an exception must never cross into the compiled loop
        log.exception("the stream sink failed")


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How one row picks its next token. temperature 0 is greedy (whatever top_k and top_p);
    top_k 0 and top_p 1.0 keep every token."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if not (np.isfinite(self.temperature) and self.temperature >= 0):
            raise JaxloraError(f"temperature must be a finite number >= 0, got {self.temperature}")
        if not (0 < self.top_p <= 1):
            raise JaxloraError(f"top_p must be in (0, 1], got {self.top_p}")
        if not (isinstance(self.top_k, int | np.integer) and self.top_k >= 0):
            raise JaxloraError(f"top_k must be an integer >= 0 (0: no limit), got {self.top_k}")


class Sampler(NamedTuple):
    """Per-row sampling settings as arrays of the batch shape [...]: what `decode` takes."""

    keys: Array  # typed PRNG keys
    temperature: Array  # float32
    top_p: Array  # float32
    top_k: Array  # int32, 0: no limit


def make_sampler(
    sampling: Sampling | Sequence[Sampling], seed: int | Sequence[int], shape: tuple[int, ...]
) -> Sampler:
    """A Sampler for rows of `shape`: one Sampling for all or one per row (row-major), and a
    seed for all (row r's key is fold_in(key(seed), r)) or one per row (key(seed_r))."""
    n = int(np.prod(shape))
    rows = [sampling] * n if isinstance(sampling, Sampling) else list(sampling)
    if len(rows) != n:
        raise JaxloraError(
            f"got {len(rows)} sampling settings for {n} rows: give one or one per row"
        )
    if isinstance(seed, int | np.integer):
        keys = jax.vmap(lambda r: jax.random.fold_in(jax.random.key(int(seed)), r))(jnp.arange(n))
    else:
        seeds = np.asarray(seed).reshape(-1)
        if seeds.size != n:
            raise JaxloraError(f"got {seeds.size} seeds for {n} rows: give one or one per row")
        keys = jax.vmap(jax.random.key)(jnp.asarray(seeds))

    def column(name: str, dtype) -> Array:
        return jnp.asarray([getattr(r, name) for r in rows], dtype).reshape(shape)

    return Sampler(
        keys.reshape(shape),
        column("temperature", jnp.float32),
        column("top_p", jnp.float32),
        column("top_k", jnp.int32),
    )


def sample_next(logits: Array, sampler: Sampler, step: Array) -> Array:
    """Next tokens [...] from logits [..., V]: a draw from the tempered, top-k and top-p
    filtered softmax, or the argmax where a row's temperature is 0."""
    logits = logits.astype(jnp.float32)
    greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
    V = logits.shape[-1]
    scaled = logits / jnp.where(sampler.temperature > 0, sampler.temperature, 1.0)[..., None]
    desc = -jnp.sort(-scaled, axis=-1)
    # top-k: keep logits >= the k-th largest (ties with it stay, as in transformers).
    k = jnp.where(sampler.top_k > 0, jnp.minimum(sampler.top_k, V), V)
    kth = jnp.take_along_axis(desc, (k - 1)[..., None], axis=-1)
    desc = jnp.where(desc >= kth, desc, -jnp.inf)
    # top-p over what top-k kept: the most likely tokens until their mass reaches top_p (the
    # first token always stays).
    probs = jax.nn.softmax(desc, axis=-1)
    before = jnp.cumsum(probs, axis=-1) - probs
    kept = jnp.where((before < sampler.top_p[..., None]) & (desc > -jnp.inf), desc, jnp.inf)
    threshold = jnp.min(kept, axis=-1, keepdims=True)
    filtered = jnp.where(scaled >= threshold, scaled, -jnp.inf)

    def draw(key, row):
        return jax.random.categorical(jax.random.fold_in(key, step), row)

    flat = jax.vmap(draw)(sampler.keys.reshape(-1), filtered.reshape(-1, V))
    drawn = flat.reshape(greedy.shape).astype(jnp.int32)
    return jnp.where(sampler.temperature > 0, drawn, greedy)


def decode(
    forward: Forward,
    init_cache: Callable[[int], KVCache],
    tokens: Array,
    mask: Array,
    spec: DecodeSpec,
    sampler: Sampler | None = None,
) -> Array:
    """Continuation [..., B, max_new_tokens] of left-padded prompts [..., B, T]: greedy, or
    sampled by each row's `sampler` settings."""
    T = tokens.shape[-1]
    cache = init_cache(T + spec.max_new_tokens)
    logits, cache = forward(tokens, mask, cache)
    eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)

    def pick(logits_last, done, step):
        if sampler is None:
            token = jnp.argmax(logits_last, axis=-1).astype(jnp.int32)
        else:
            token = sample_next(logits_last, sampler, step)
        token = jnp.where(done, spec.pad_id, token)
        return token, done | jnp.isin(token, eos)

    first, done = pick(logits[..., -1, :], jnp.zeros(tokens.shape[:-1], bool), jnp.int32(0))
    out = jnp.full((*tokens.shape[:-1], spec.max_new_tokens), spec.pad_id, jnp.int32)
    out = out.at[..., 0].set(first)
    if spec.stream:  # the first token as soon as it is drawn
        io_callback(_emit, None, jnp.int32(0), out, ordered=True)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < spec.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, out = carry
        logits, cache = forward(token[..., None], jnp.ones_like(token, bool)[..., None], cache)
        token, done = pick(logits[..., 0, :], done, step)
        out = out.at[..., step].set(token)
        if spec.stream:
            last = jnp.all(done) | (step + 1 == spec.max_new_tokens)
            jax.lax.cond(
                (step % spec.stream == 0) | last,
                lambda: io_callback(_emit, None, step, out, ordered=True),
                lambda: None,
            )
        return step + 1, token, cache, done, out

    *_, out = jax.lax.while_loop(cond, body, (jnp.int32(1), first, cache, done, out))
    return out


def eos_and_pad(
    tokenizer, config, eos_token_ids: Sequence[int] | None = None
) -> tuple[tuple[int, ...], int]:
    """End-of-sequence ids (tokenizer's and config's) and the pad id used after them."""
    if eos_token_ids is None:
        ids = set(config.eos_token_ids)
        if tokenizer is not None and tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        eos_token_ids = sorted(ids)
    pad = config.pad_token_id
    if pad is None and tokenizer is not None:
        pad = tokenizer.pad_token_id
    if pad is None:
        pad = eos_token_ids[0] if eos_token_ids else 0
    return tuple(int(i) for i in eos_token_ids), int(pad)


def until_eos(ids: np.ndarray, eos: Sequence[int]) -> list[int]:
    """The generated ids before the first end-of-sequence id."""
    out = []
    for t in ids.tolist():
        if t in eos:
            break
        out.append(t)
    return out


def shared_start(prompts: Sequence[Sequence[int]]) -> int:
    """The number of leading tokens every prompt shares, leaving each at least one of its own
    (the pass's first logits come from the prompts' own last tokens)."""
    shortest = min(len(p) for p in prompts)
    ids = np.array([p[:shortest] for p in prompts])
    differs = np.flatnonzero((ids != ids[0]).any(axis=0))
    return min(int(differs[0]) if differs.size else shortest, shortest - 1)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "mesh"))
def _generate_base(
    graphdef,
    base,
    tokens,
    mask,
    spec: DecodeSpec,
    sampler: Sampler | None,
    weights=None,
    consts=None,
    mesh: Mesh | None = None,
    prefix: tuple[Array, Array] | None = None,
):
    """Decoding of prompts [B, T] by one module: the base model, or with `weights` and `consts`
    the LoRA variables its graph holds (a grouped library: `jaxlora.grouped`), traced for
    `mesh` (`sharding.compiling_for`: the model's activation constraints and the platform of
    its devices; None: no constraints, the default device's platform).

    `prefix` (tokens and mask [P], left-padded) is a start every row shares: each row's prompt
    is the prefix followed by its own row of `tokens`. It is prefilled once, as one row, and
    its cache copied to the B rows, so a long common context (ICL over a whole book) costs one
    prefill instead of B. Only for one module: a grouped library's rows differ from the first
    token on."""
    from flax import nnx

    if prefix is not None and weights is not None:
        raise ValueError("a shared prefix needs one module for every row, not a grouped library")
    none = nnx.State({})
    weights, consts = (none if x is None else x for x in (weights, consts))
    module = nnx.merge(graphdef, weights, consts, base)
    cfg, dtype = module.config, module.dtype
    B = tokens.shape[0]

    def forward(t, m, cache):
        return module(t, m, cache=cache, last_only=True)

    def init_cache(n: int) -> KVCache:  # room for n tokens after what it holds
        if prefix is None:
            return KVCache.init(cfg, B, n, dtype)
        p_tokens, p_mask = prefix
        one = KVCache.init(cfg, 1, p_tokens.shape[-1] + n, dtype)
        _, one = forward(p_tokens[None], p_mask[None], one)
        return jax.tree.map(lambda x: jnp.broadcast_to(x, (B, *x.shape[1:])) if x.ndim else x, one)

    with compiling_for(mesh):
        return decode(forward, init_cache, tokens, mask, spec, sampler)


# vmap axes of a stacked cache: everything per adapter except the shared write slot.
CACHE_AXES = KVCache(k=0, v=0, valid=0, end=None, next_pos=0)


def decode_stack(
    graphdef,
    base,
    weights,
    consts,
    tokens_ABT,
    mask_ABT,
    spec: DecodeSpec,
    sampler: Sampler | None = None,
):
    """Decoding of left-padded prompts [A, B, T] by a stack of A adapters (greedy, or sampled
    by a Sampler of shape [A, B]), traced for the mesh the prompts are placed on
    (`decode_stack_for`)."""
    mesh = mesh_of(tokens_ABT)
    return decode_stack_for(
        graphdef, base, weights, consts, tokens_ABT, mask_ABT, spec, sampler, mesh
    )


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "mesh"))
def decode_stack_for(
    graphdef,
    base,
    weights,
    consts,
    tokens_ABT,
    mask_ABT,
    spec: DecodeSpec,
    sampler: Sampler | None,
    mesh: Mesh | None,
):
    """`decode_stack` jitted for `mesh` (`sharding.compiling_for`): the KV cache and the
    activations split as the prompts are, adapters over `adapter` and each adapter's prompts
    over `fsdp` (data parallel: every device decodes its rows with the fsdp-split weights);
    None: no constraints, the default device's platform."""
    with compiling_for(mesh):
        return _decode_stack(graphdef, base, weights, consts, tokens_ABT, mask_ABT, spec, sampler)


def _decode_stack(graphdef, base, weights, consts, tokens_ABT, mask_ABT, spec, sampler):
    from flax import nnx

    def one(w, c, t, m, cache):
        return nnx.merge(graphdef, w, c, base)(t, m, cache=cache, last_only=True)

    def forward(t, m, cache):
        return jax.vmap(
            one,
            in_axes=(0, 0, 0, 0, CACHE_AXES),
            out_axes=(0, CACHE_AXES),
            spmd_axis_name="adapter",
        )(weights, consts, t, m, cache)

    A, B = tokens_ABT.shape[:2]
    init_cache = stacked_cache(graphdef, base, weights, consts, A, B)
    return decode(forward, init_cache, tokens_ABT, mask_ABT, spec, sampler)


def stacked_cache(graphdef, base, weights, consts, A: int, B: int) -> Callable[[int], KVCache]:
    """n -> an empty KV cache per adapter of a stack of A ([A, B, n, ...] leaves; one shared
    write slot), for the vmapped decoding of `decode_stack`. On a traced mesh it is split as
    the prompts are (adapters, then rows over `fsdp`) and kv heads over `tensor`: a broadcast
    zero has no input to follow, and whole it is a device's largest buffer (8B, 8 adapters of
    64 prompts x 178 positions: 11.1 GiB)."""
    from flax import nnx

    probe = nnx.merge(
        graphdef, jax.tree.map(lambda x: x[0], weights), jax.tree.map(lambda x: x[0], consts), base
    )

    def init_cache(n):
        one = KVCache.init(probe.config, B, n, probe.dtype)

        def stacked(x, axes):
            return constrain(jnp.broadcast_to(x, (A, *x.shape)), ("adapter", *axes))

        kv = ("batch", "kv_heads", None, None)
        return KVCache(
            k=tuple(stacked(x, kv) for x in one.k),
            v=tuple(stacked(x, kv) for x in one.v),
            valid=stacked(one.valid, ("batch", None)),
            end=one.end,
            next_pos=stacked(one.next_pos, ("batch",)),
        )

    return init_cache


def generate_stack(
    model,
    adapters,
    input_ids_ABT,
    attention_mask_ABT=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Continuations [A, B, max_new_tokens]: adapter a continues its own prompts [B, T].

    Greedy without `sampling`; with it, one Sampling for every row or one per row (row-major
    over [A, B]), and `seed` one seed or one per row (see `make_sampler`)."""
    return _generate_stack(
        model,
        adapters,
        adapters.placement,
        input_ids_ABT,
        attention_mask_ABT,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        sampling=sampling,
        seed=seed,
    )


def _generate_stack(
    model,
    adapters,
    placement,
    input_ids_ABT,
    attention_mask_ABT,
    *,
    max_new_tokens,
    eos_token_ids,
    sampling,
    seed,
) -> np.ndarray:
    ids = np.asarray(input_ids_ABT)
    mask = (
        np.ones(ids.shape, bool) if attention_mask_ABT is None else np.asarray(attention_mask_ABT)
    )
    tokens, mask = left_align(ids, mask)
    eos, pad = eos_and_pad(model.tokenizer, model.config, eos_token_ids)
    out = decode_stack(
        model.graph(placement),
        model.params,
        adapters.weights,
        adapters.consts,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask),
        DecodeSpec(max_new_tokens, eos, pad),
        None if sampling is None else make_sampler(sampling, seed, tokens.shape[:2]),
    )
    return np.asarray(out)


def generate_routed(
    model,
    adapters,
    adapter_ids,
    input_ids_BT,
    attention_mask_BT=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Per-example mode: row b continues with adapter `adapter_ids[b]` -> [B, max_new_tokens]
    (greedy, or sampled as in `generate`)."""
    from jaxlora.lora import AdapterStack

    idx = np.asarray(adapter_ids)
    rows = AdapterStack(
        jax.tree.map(lambda x: x[idx], adapters.weights),
        jax.tree.map(lambda x: x[idx], adapters.consts),
        tuple(adapters.configs[i] for i in idx),
        tuple(adapters.names[i] for i in idx),
    )
    ids = np.asarray(input_ids_BT)
    mask = None if attention_mask_BT is None else np.asarray(attention_mask_BT)[:, None]
    # The rows keep the whole stack's placement (the layout of its weights): the union of the
    # chosen adapters' own configs can be smaller (e.g. only attention-only adapters chosen).
    out = _generate_stack(
        model,
        rows,
        adapters.placement,
        ids[:, None],
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        sampling=sampling,
        seed=seed,
    )
    return out[:, 0]


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    seed: int | Sequence[int] = 0,
    stream: int = 0,
) -> np.ndarray:
    """Continuations [B, max_new_tokens] of prompts [B, T] (any padding side).

    Greedy without `sampling`; with it, one Sampling for every row or one per row, and `seed`
    one seed (row b's key is fold_in(key(seed), b)) or one per row (key(seed_b)). `stream` k > 0:
    the tokens also go to the `streaming` sink every k steps (`DecodeSpec.stream`)."""
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    tokens, mask = left_align(input_ids, mask)
    eos, pad = eos_and_pad(model.tokenizer, model.config, eos_token_ids)
    spec = DecodeSpec(max_new_tokens, eos, pad, stream)
    sampler = None if sampling is None else make_sampler(sampling, seed, tokens.shape[:1])
    out = _generate_base(
        model.graph(),
        model.params,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask),
        spec,
        sampler,
    )
    return np.asarray(out)
