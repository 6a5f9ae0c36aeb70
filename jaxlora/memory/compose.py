"""Composition at evaluation time: contexts within a token budget, and mixture decoding.

A method is a point of one grammar (jaxlora/memory/grammar.py: `parse_method`, the prompt
templates and their checks, pure Python so that config validation loads no JAX); its names are
re-exported here, where `jaxlora/memory/evaluate.py` composes what a method says:

    Budget          a context's token budget and which end `truncate` keeps
    join_units      units' texts as one context, each by `memory.unit_format`
    decode_mixture  top-k adapters decoding together (the `mixture` combiner)
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from jaxlora.generate import CACHE_AXES, DecodeSpec, decode, stacked_cache
from jaxlora.memory.grammar import (
    COMBINERS,
    CONTEXTS,
    ROUTER_KINDS,
    TEMPLATES,
    Method,
    MethodError,
    check_library,
    check_unit_format,
    parse_method,
    render,
    template_text,
)
from jaxlora.sharding import compiling_for

__all__ = [
    "COMBINERS",
    "CONTEXTS",
    "ROUTER_KINDS",
    "TEMPLATES",
    "Budget",
    "Method",
    "MethodError",
    "check_library",
    "check_unit_format",
    "decode_mixture",
    "join_units",
    "parse_method",
    "render",
    "template_text",
]


@dataclasses.dataclass(frozen=True)
class Budget:
    """At most `tokens` context tokens; `truncate` keeps the `head` or the `tail` of a longer
    context, or None: a longer context is an error."""

    tokens: int
    truncate: str | None = None

    def fit(self, context: str, tokenizer, where: str) -> tuple[str, bool]:
        """The context within budget, and whether it was cut."""
        enc = tokenizer(context, add_special_tokens=False, return_offsets_mapping=True)
        spans = enc["offset_mapping"]
        if len(spans) <= self.tokens:
            return context, False
        if self.truncate is None:
            raise MethodError(
                f"{where}: the context has {len(spans):,} tokens, over memory.context_tokens="
                f"{self.tokens:,}; raise the budget or set memory.truncate: head or tail"
            )
        if self.truncate == "head":
            return context[: spans[self.tokens - 1][1]], True
        return context[spans[len(spans) - self.tokens][0] :], True


def join_units(texts: Sequence[str], ids: Sequence[str], unit_format: str) -> str:
    """Units' texts as one context, each rendered by `unit_format` ({text}, {unit})."""
    return "\n\n".join(render(unit_format, text=t, unit=u) for t, u in zip(texts, ids, strict=True))


# --------------------------------------------------------------------------- mixture decoding


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "k", "mesh"))
def decode_mixture(
    graphdef,
    base,
    weights,
    consts,
    tokens_QT,
    mask_QT,
    spec: DecodeSpec,
    k: int,
    mesh: Mesh | None = None,
):
    """Greedy continuations [Q, N] where question q decodes with adapters q*k .. q*k+k-1 of the
    stack together: at each step the next-token distribution is the mean of their softmaxes.
    Traced for `mesh` (`sharding.compiling_for`; None: no constraints).

    Each adapter keeps its own KV cache (its own activations); the k members of a question
    always agree on the token, since they pick it from the same mixed distribution."""
    with compiling_for(mesh):
        return _decode_mixture(graphdef, base, weights, consts, tokens_QT, mask_QT, spec, k)


def _decode_mixture(graphdef, base, weights, consts, tokens_QT, mask_QT, spec, k):
    from flax import nnx

    Q = tokens_QT.shape[0]
    tokens = jnp.repeat(tokens_QT, k, axis=0)[:, None]  # [Q*k, 1, T]
    mask = jnp.repeat(mask_QT, k, axis=0)[:, None]

    def one(w, c, t, m, cache):
        return nnx.merge(graphdef, w, c, base)(t, m, cache=cache, last_only=True)

    def forward(t, m, cache):
        logits, cache = jax.vmap(one, in_axes=(0, 0, 0, 0, CACHE_AXES), out_axes=(0, CACHE_AXES))(
            weights, consts, t, m, cache
        )
        logp = jax.nn.log_softmax(logits, axis=-1).reshape(Q, k, *logits.shape[1:])
        mixed = jax.nn.logsumexp(logp, axis=1) - jnp.log(k)
        return jnp.repeat(mixed, k, axis=0), cache

    init_cache = stacked_cache(graphdef, base, weights, consts, Q * k, 1)
    out = decode(forward, init_cache, tokens, mask, spec)  # [Q*k, 1, N]
    return out[::k, 0]
