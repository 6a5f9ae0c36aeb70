"""Greedy decoding with an explicit KV cache, for one model or a stack of adapters.

One prefill over the (left-padded) prompts fills the cache; then a `lax.while_loop` feeds one
token per step until every row has produced an end-of-sequence token or `max_new_tokens` is
reached. The loop runs *outside* any vmap over adapters: the step function is what is
vmapped, so the loop counter and the cache's write slot stay unbatched scalars and the cache
update stays an in-place slice write. Rows that finished emit `pad_id`, as transformers'
`generate` does.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxlora.models.transformer import KVCache

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


def decode(
    forward: Forward,
    init_cache: Callable[[int], KVCache],
    tokens: Array,
    mask: Array,
    spec: DecodeSpec,
) -> Array:
    """Greedy continuation [..., B, max_new_tokens] of left-padded prompts [..., B, T]."""
    T = tokens.shape[-1]
    cache = init_cache(T + spec.max_new_tokens)
    logits, cache = forward(tokens, mask, cache)
    eos = jnp.asarray(spec.eos_ids if spec.eos_ids else (-1,), jnp.int32)

    def pick(logits_last, done):
        token = jnp.argmax(logits_last, axis=-1).astype(jnp.int32)
        token = jnp.where(done, spec.pad_id, token)
        return token, done | jnp.isin(token, eos)

    first, done = pick(logits[..., -1, :], jnp.zeros(tokens.shape[:-1], bool))
    out = jnp.full((*tokens.shape[:-1], spec.max_new_tokens), spec.pad_id, jnp.int32)
    out = out.at[..., 0].set(first)

    def cond(carry):
        step, _, _, done, _ = carry
        return (step < spec.max_new_tokens) & ~jnp.all(done)

    def body(carry):
        step, token, cache, done, out = carry
        logits, cache = forward(token[..., None], jnp.ones_like(token, bool)[..., None], cache)
        token, done = pick(logits[..., 0, :], done)
        return step + 1, token, cache, done, out.at[..., step].set(token)

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


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def _generate_base(graphdef, base, tokens, mask, spec: DecodeSpec):
    from flax import nnx

    module = nnx.merge(graphdef, nnx.State({}), nnx.State({}), base)
    cfg, dtype = module.config, module.dtype

    def forward(t, m, cache):
        return module(t, m, cache=cache, last_only=True)

    return decode(
        forward, lambda n: KVCache.init(cfg, tokens.shape[0], n, dtype), tokens, mask, spec
    )


# vmap axes of a stacked cache: everything per adapter except the shared write slot.
_CACHE_AXES = KVCache(k=0, v=0, valid=0, end=None, next_pos=0)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def decode_stack(graphdef, base, weights, consts, tokens_ABT, mask_ABT, spec: DecodeSpec):
    """Jitted greedy decoding of left-padded prompts [A, B, T] by a stack of A adapters."""
    from flax import nnx

    def one(w, c, t, m, cache):
        return nnx.merge(graphdef, w, c, base)(t, m, cache=cache, last_only=True)

    def forward(t, m, cache):
        return jax.vmap(
            one,
            in_axes=(0, 0, 0, 0, _CACHE_AXES),
            out_axes=(0, _CACHE_AXES),
            spmd_axis_name="adapter",
        )(weights, consts, t, m, cache)

    A, B = tokens_ABT.shape[:2]
    probe = nnx.merge(
        graphdef, jax.tree.map(lambda x: x[0], weights), jax.tree.map(lambda x: x[0], consts), base
    )
    cfg, dtype = probe.config, probe.dtype

    def init_cache(n):
        one = KVCache.init(cfg, B, n, dtype)
        stacked = lambda x: jnp.broadcast_to(x, (A, *x.shape))  # noqa: E731
        return KVCache(
            k=tuple(map(stacked, one.k)),
            v=tuple(map(stacked, one.v)),
            valid=stacked(one.valid),
            end=one.end,
            next_pos=stacked(one.next_pos),
        )

    return decode(forward, init_cache, tokens_ABT, mask_ABT, spec)


def generate_stack(
    model,
    adapters,
    input_ids_ABT,
    attention_mask_ABT=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Greedy continuations [A, B, max_new_tokens]: adapter a continues its own prompts [B, T]."""
    ids = np.asarray(input_ids_ABT)
    mask = (
        np.ones(ids.shape, bool) if attention_mask_ABT is None else np.asarray(attention_mask_ABT)
    )
    tokens, mask = left_align(ids, mask)
    eos, pad = eos_and_pad(model.tokenizer, model.config, eos_token_ids)
    out = decode_stack(
        model.graph(adapters.placement),
        model.params,
        adapters.weights,
        adapters.consts,
        jnp.asarray(tokens, jnp.int32),
        jnp.asarray(mask),
        DecodeSpec(max_new_tokens, eos, pad),
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
) -> np.ndarray:
    """Per-example mode: row b continues with adapter `adapter_ids[b]` -> [B, max_new_tokens]."""
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
    out = generate_stack(
        model, rows, ids[:, None], mask, max_new_tokens=max_new_tokens, eos_token_ids=eos_token_ids
    )
    return out[:, 0]


def generate(
    model,
    input_ids,
    attention_mask=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
) -> np.ndarray:
    """Greedy continuations [B, max_new_tokens] of prompts [B, T] (any padding side)."""
    input_ids = np.asarray(input_ids)
    mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
    tokens, mask = left_align(input_ids, mask)
    eos, pad = eos_and_pad(model.tokenizer, model.config, eos_token_ids)
    spec = DecodeSpec(max_new_tokens, eos, pad)
    out = _generate_base(
        model.graph(), model.params, jnp.asarray(tokens, jnp.int32), jnp.asarray(mask), spec
    )
    return np.asarray(out)
