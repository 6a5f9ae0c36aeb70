"""Attention kernels: blocked (online softmax), packed (local band) and cuDNN against the full
[T, S] logits of the reference, on random inputs with padding, GQA, packed rows and a KV cache.

Tolerance: float32 throughout; the kernels sum the same exp terms in another order (blocks,
bands) and rescale by exp(m_old - m_new), each a few float32 roundings on values of order one,
so outputs agree to ~1e-6 relative. 2e-5 leaves room for that on any machine while a real
difference (a key seen or missed) moves outputs by ~1e-1.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora.models.config import ModelConfig
from jaxlora.models.transformer import (
    AttentionMask,
    KVCache,
    Transformer,
    _blocked,
    _full,
    _local,
    attend,
    choose_attention,
)

RTOL = ATOL = 2e-5  # see the module docstring

GQA = ModelConfig(
    model_type="llama",
    vocab_size=97,
    hidden_size=64,
    intermediate_size=96,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=16,
)


def _qkv(B, T, S, N=4, K=2, H=16, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (B, T, N, H))
    k = jax.random.normal(kk, (B, K, S, H)) * 2.0  # peaked softmax: order errors would show
    v = jax.random.normal(kv, (B, K, S, H))
    return q, k, v


def _padding(B, S, seed=1):
    """Rows with left and right padding and one with none."""
    rng = np.random.default_rng(seed)
    valid = np.zeros((B, S), bool)
    for b in range(B):
        lo = int(rng.integers(0, S // 3)) if b % 2 else 0
        hi = S - (int(rng.integers(0, S // 3)) if b % 3 else 0)
        valid[b, lo:hi] = True
    return jnp.asarray(valid)


def _seen(mask: AttentionMask) -> np.ndarray:
    """[B, T] query slots that see at least one key (the others' outputs are never read)."""
    return np.asarray(mask.dense().any(-1))


@pytest.mark.parametrize(("T", "S", "block"), [(37, 37, 8), (64, 64, 64), (5, 50, 16)])
def test_blocked_equals_full_with_padding_and_gqa(T, S, block):
    q, k, v = _qkv(3, T, S)
    mask = AttentionMask(jnp.arange(S - T, S), _padding(3, S))  # queries are the last T slots
    ref = _full(q, k, v, mask.dense(), jnp.float32)
    out = _blocked(q, k, v, mask, jnp.float32, block=block)
    seen = _seen(mask)
    np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], RTOL, ATOL)


def _segments(lengths, T):
    seg = np.zeros(T, np.int32)
    at = 0
    for i, n in enumerate(lengths):
        seg[at : at + n] = i + 1
        at += n
    return seg


@pytest.mark.parametrize("lengths", [[5, 9, 1, 12], [30], [3, 3, 3, 3, 3, 3], [17, 2, 11]])
def test_packed_band_equals_full_segment_mask(lengths):
    T = 40
    seg = jnp.asarray(np.stack([_segments(lengths, T), _segments(lengths[::-1], T)]))
    q, k, v = _qkv(2, T, T)
    mask = AttentionMask(jnp.arange(T), seg > 0, seg, seg, window=max(lengths))
    ref = _full(q, k, v, mask.dense(), jnp.float32)
    for chunk in (4, 16, 64):
        out = _local(q, k, v, mask, jnp.float32, chunk=chunk)
        seen = _seen(mask)
        np.testing.assert_allclose(np.asarray(out)[seen], np.asarray(ref)[seen], RTOL, ATOL)


def test_the_dense_segment_mask_never_crosses_rows():
    seg = jnp.asarray(_segments([3, 4], 8))[None]
    dense = np.asarray(AttentionMask(jnp.arange(8), seg > 0, seg, seg).dense()[0])
    assert not dense[3:7, :3].any() and not dense[:3, 3:].any()  # row 2 never sees row 1
    assert dense[6, 3:7].all() and not dense[7].any()  # causal within a row; padding sees none


def _pair(impl_a, impl_b, config=GQA):
    """Two decoders with the same random weights and different attention kernels."""
    a = Transformer(config, attention=impl_a, rngs=nnx.Rngs(0))
    b = Transformer(config, attention=impl_b, rngs=nnx.Rngs(0))
    return a, b


def test_blocked_decoder_equals_full_through_prefill_and_cached_decode():
    """Left-padded prefill into a KV cache, then one-token steps: the path `generate` takes."""
    full, blocked = _pair("full", "blocked")
    B, T, steps = 3, 21, 4
    tokens = jax.random.randint(jax.random.key(3), (B, T + steps), 0, GQA.vocab_size)
    mask = np.ones((B, T), bool)
    mask[1, :6] = False  # left padding
    mask[2, :1] = False
    outs = []
    for model in (full, blocked):
        cache = KVCache.init(GQA, B, T + steps)
        logits, cache = model(tokens[:, :T], jnp.asarray(mask), cache=cache)
        seq = [logits]
        for i in range(steps):
            step_logits, cache = model(tokens[:, T + i : T + i + 1], cache=cache)
            seq.append(step_logits)
        outs.append(np.concatenate([np.asarray(x) for x in seq], axis=1))
    real = np.concatenate([mask, np.ones((B, steps), bool)], axis=1)
    # whole-model logits over a prefill and 4 cached steps: the kernels' ~1e-6 passes through
    # every layer and the LM head, so 10x the kernel bound; a key seen or missed moves ~1e-1
    np.testing.assert_allclose(outs[1][real], outs[0][real], RTOL * 10, ATOL * 10)


def test_blocked_kernel_is_used_for_a_long_prefill_and_matches(monkeypatch):
    import jaxlora.models.transformer as tr

    assert choose_attention("auto", T=4096, S=4096, cached=False, dtype=jnp.float32, head_dim=16)
    monkeypatch.setattr(tr, "LONG_CONTEXT", 32)  # a "long" prefill the test can afford
    monkeypatch.setattr(tr, "KEY_BLOCK", 16)
    auto, full = _pair("auto", "full")
    tokens = jax.random.randint(jax.random.key(4), (2, 50), 0, GQA.vocab_size)
    a = np.asarray(auto(tokens)[0])
    b = np.asarray(full(tokens)[0])
    # whole-model logits: the kernel's rounding through every layer and the LM head (10x the
    # kernel bound); a key seen or missed moves them by ~1e-1
    np.testing.assert_allclose(a, b, RTOL * 10, ATOL * 10)


def test_auto_picks_by_backend_and_length():
    f32 = jnp.float32
    if jax.default_backend() != "gpu":
        assert choose_attention("auto", T=64, S=64, cached=False, dtype=f32, head_dim=64) == "full"
    assert choose_attention("auto", T=8192, S=8192, cached=True, dtype=f32, head_dim=64) == (
        "blocked"
    )
    assert choose_attention("auto", T=1, S=8192, cached=True, dtype=f32, head_dim=64) == "full"
    assert choose_attention("full", T=8192, S=8192, cached=False, dtype=f32, head_dim=64) == "full"


def test_packed_rows_equal_the_same_rows_unpacked():
    """The decoder on a packed sequence gives each row the logits it has alone: positions
    restart per row and attention stays inside the row."""
    model = Transformer(GQA, rngs=nnx.Rngs(0))
    lengths = [7, 13, 1, 20]
    rows = [
        jax.random.randint(jax.random.key(10 + i), (n,), 0, GQA.vocab_size)
        for i, n in enumerate(lengths)
    ]
    seg = jnp.asarray(_segments(lengths, 48))[None]
    packed = jnp.zeros((1, 48), jnp.int32).at[0, : sum(lengths)].set(jnp.concatenate(rows))
    out = np.asarray(model(packed, segment_ids_BT=seg, segment_window=max(lengths))[0])[0]
    at = 0
    for row in rows:
        alone = np.asarray(model(row[None])[0])[0]
        # whole-model logits, as above: 10x the kernel bound; attention across rows moves ~1e-1
        np.testing.assert_allclose(out[at : at + len(row)], alone, RTOL * 10, ATOL * 10)
        at += len(row)


def test_packed_rows_do_not_see_each_other():
    """Changing one row's tokens changes no other row's logits (fails if attention crosses)."""
    model = Transformer(GQA, rngs=nnx.Rngs(0))
    seg = jnp.asarray(_segments([10, 10, 10], 32))[None]
    tokens = jax.random.randint(jax.random.key(5), (1, 32), 0, GQA.vocab_size)
    other = tokens.at[0, 10:20].set((tokens[0, 10:20] + 1) % GQA.vocab_size)
    a = np.asarray(model(tokens, segment_ids_BT=seg, segment_window=10)[0])[0]
    b = np.asarray(model(other, segment_ids_BT=seg, segment_window=10)[0])[0]
    np.testing.assert_array_equal(a[:10], b[:10])
    np.testing.assert_array_equal(a[20:30], b[20:30])
    assert np.abs(a[10:20] - b[10:20]).max() > 1e-3


def test_positions_restart_per_row(monkeypatch):
    import jaxlora.models.transformer as tr

    seen = {}
    real = tr.rope_sin_cos

    def spy(positions, inv_freq, dtype):
        seen["pos"] = np.asarray(positions)
        return real(positions, inv_freq, dtype)

    monkeypatch.setattr(tr, "rope_sin_cos", spy)
    model = Transformer(GQA, rngs=nnx.Rngs(0))
    seg = jnp.asarray(_segments([3, 1, 4], 10))[None]
    model(jnp.zeros((1, 10), jnp.int32), segment_ids_BT=seg, segment_window=4)
    np.testing.assert_array_equal(seen["pos"][0, :8], [0, 1, 2, 0, 0, 1, 2, 3])


def test_packing_rejects_a_cache():
    model = Transformer(GQA, rngs=nnx.Rngs(0))
    seg = jnp.ones((1, 4), jnp.int32)
    with pytest.raises(ValueError, match="segment"):
        model(jnp.zeros((1, 4), jnp.int32), segment_ids_BT=seg, cache=KVCache.init(GQA, 1, 4))


def test_unknown_kernel_is_one_line():
    with pytest.raises(ValueError, match="attention must be one of"):
        Transformer(GQA, attention="flash", rngs=nnx.Rngs(0))
    q, k, v = _qkv(1, 4, 4)
    with pytest.raises(ValueError, match="unknown attention kernel"):
        attend(q, k, v, AttentionMask(jnp.arange(4), jnp.ones((1, 4), bool), impl="x"), jnp.float32)


@pytest.mark.skipif(jax.default_backend() != "gpu", reason="cuDNN needs a GPU")
def test_cudnn_equals_full_on_gpu():
    # bf16 inputs: cuDNN and XLA round the products differently; 2e-2 is a few bf16 ulps.
    q, k, v = _qkv(2, 64, 64, N=8, K=2, H=64)
    mask = AttentionMask(jnp.arange(64), _padding(2, 64), impl="cudnn")
    bf = jnp.bfloat16
    out = attend(q.astype(bf), k.astype(bf), v.astype(bf), mask, bf)
    ref = _full(q.astype(bf), k.astype(bf), v.astype(bf), mask.dense(), bf)
    seen = _seen(mask)
    np.testing.assert_allclose(
        np.asarray(out, np.float32)[seen], np.asarray(ref, np.float32)[seen], 2e-2, 2e-2
    )


def test_blocked_prefill_memory_grows_linearly():
    """XLA's own buffer plan (compiled, nothing run) of a prefill at 2K and 4K tokens: the
    blocked kernel's temporaries about double, the full kernel's [T, S] logits quadruple."""
    c = GQA.replace(vocab_size=64, intermediate_size=128, num_layers=1)

    def temp_bytes(impl, T):
        graphdef, state = nnx.split(Transformer(c, attention=impl, rngs=nnx.Rngs(0)))

        def prefill(state, tokens):
            return nnx.merge(graphdef, state)(tokens, last_only=True)[0]

        tokens = jax.ShapeDtypeStruct((1, T), jnp.int32)
        compiled = jax.jit(prefill).lower(state, tokens).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    blocked = temp_bytes("blocked", 4096) / temp_bytes("blocked", 2048)
    full = temp_bytes("full", 4096) / temp_bytes("full", 2048)
    assert blocked < 2.5, blocked
    assert full > 3.0, full


def test_plan_reports_a_long_context_prefill(capsys):
    """`jaxlora plan --context`: the 1B shape's 32K-token prefill, by hand, fits an 80 GB GPU;
    its attention memory doubles (not quadruples) with the context."""
    from jaxlora.cli import main as cli
    from jaxlora.config import load_config
    from jaxlora.models.model import model_config
    from jaxlora.models.transformer import KEY_BLOCK
    from jaxlora.plan import make_plan

    sets = ["model.path=llama-3.2-1b-shape", "model.dtype=bfloat16"]
    config = load_config("configs/quickstart.yaml", sets)
    c = model_config("llama-3.2-1b-shape")
    plans = {T: make_plan(config, 1, 80, 989, 0.4, context=T) for T in (16384, 32768)}
    rows = dict(plans[32768].prefill)
    T = 32768
    assert (
        rows["KV cache (32,768 tokens)"] == 2 * c.num_layers * c.num_kv_heads * c.head_dim * T * 2
    )
    assert (
        rows[f"attention ({KEY_BLOCK}-key blocks)"]
        == c.num_heads * T * (KEY_BLOCK * 2 + c.head_dim * 4)  # bf16 blocks, f32 accumulator
    )
    assert plans[32768].prefill_total < 80 * 2**30
    assert plans[32768].prefill_full_attention == 2 * c.num_heads * T * T * 4  # would not fit
    small = dict(plans[16384].prefill)[f"attention ({KEY_BLOCK}-key blocks)"]
    assert rows[f"attention ({KEY_BLOCK}-key blocks)"] == 2 * small
    code = cli(
        ["plan", "configs/quickstart.yaml", "--devices", "1", "--context", "32768"]
        + [a for s in sets for a in ("--set", s)]
    )
    out = capsys.readouterr().out
    assert code == 0 and "prefill of 32,768 tokens" in out and "fits" in out
