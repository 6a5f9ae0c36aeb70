"""The training step's loss from hidden states a chunk of positions at a time equals the plain
`token_mean_ce` on the whole [B, T, V] logits, in value and gradient, and never holds them."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from jaxlora import objectives
from jaxlora.models.presets import PRESETS
from jaxlora.models.transformer import Transformer

B, T = 3, 11  # 10 targets: chunks of 4 leave a padded chunk, chunks of 10 are one


def _model_and_batch(tied: bool):
    config = dataclasses.replace(PRESETS["tiny-llama"].config, tie_word_embeddings=tied)
    module = Transformer(config, rngs=nnx.Rngs(0))
    k1, k2, k3 = jax.random.split(jax.random.key(1), 3)
    tokens = jax.random.randint(k1, (B, T), 0, config.vocab_size)
    hidden = jax.random.normal(k2, (B, T, config.hidden_size))
    loss = jax.random.bernoulli(k3, 0.7, (B, T))
    return module, tokens, hidden, loss


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "lm_head"])
@pytest.mark.parametrize("chunk", [1, 4, 10])
def test_chunked_loss_and_gradient_equal_the_plain_loss(tied, chunk):
    module, tokens, hidden, loss = _model_and_batch(tied)

    def plain(h):
        return objectives.token_mean_ce(module.logits(h), tokens, loss)

    def chunked(h):
        return objectives.chunked_token_mean_ce(module.logits, h, tokens, loss, chunk)

    want, want_grad = jax.value_and_grad(plain)(hidden)
    got, got_grad = jax.jit(jax.value_and_grad(chunked))(hidden)
    # float32 throughout: the chunks' sums are added in another order than the whole sum, and a
    # chunk's logits may come from a differently blocked product: a few ulps of values of
    # order 1-10 (per-token losses near log V = 6.2), far below 1e-5 relative.
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_grad, want_grad, rtol=1e-5, atol=1e-7)


def _shapes(jaxpr) -> list[tuple[int, ...]]:
    """Every intermediate's shape in a jaxpr and the jaxprs inside it (scan bodies, remat)."""
    out = []
    for eqn in jaxpr.eqns:
        out += [tuple(v.aval.shape) for v in eqn.outvars if hasattr(v.aval, "shape")]
        for p in eqn.params.values():
            for sub in p if isinstance(p, (list, tuple)) else [p]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    out += _shapes(inner)
    return out


def test_the_chunked_step_never_holds_a_whole_batch_of_logits(monkeypatch):
    """The gradient of the chunked loss, traced: no intermediate holds more than one chunk's
    logits. The same trace of the plain loss does (the check can fail)."""
    module, tokens, hidden, loss = _model_and_batch(True)
    V = module.config.vocab_size

    def biggest_logits(f) -> int:
        shapes = _shapes(jax.make_jaxpr(jax.grad(f))(hidden).jaxpr)
        return max(int(np.prod(s)) for s in shapes if len(s) >= 3 and s[-1] == V)

    def chunked(h):
        return objectives.chunked_token_mean_ce(module.logits, h, tokens, loss, 4)

    def plain(h):
        return objectives.token_mean_ce(module.logits(h), tokens, loss)

    assert biggest_logits(chunked) == B * 4 * V
    assert biggest_logits(plain) >= B * (T - 1) * V


def test_loss_chunk_bounds_the_logits_of_a_chunk():
    assert objectives.loss_chunk(8, 128, 128256) == 8  # the 8B step: 16 chunks of 8 positions
    assert objectives.loss_chunk(8, 128, 512) == 127  # a small vocabulary: one chunk
    assert objectives.loss_chunk(64, 4096, 2**20) == 1


def test_logits_is_the_head_the_forward_applies():
    for tied in (True, False):
        module, tokens, _, _ = _model_and_batch(tied)
        hidden = module(tokens, return_hidden=True)[0]
        np.testing.assert_array_equal(module.logits(hidden), module(tokens)[0])
