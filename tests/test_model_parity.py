"""The Flax decoder against transformers (PyTorch, float32) on tiny random checkpoints."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

import jaxlora
from jaxlora.generate import generate
from jaxlora.models.layers import dense
from jaxlora.models.transformer import KVCache
from tests.hf_factory import load_hf_model

# (family, config overrides): every family, GQA with 1, 2 and 4 query heads per kv head,
# tied and untied embeddings, Llama 3 rope scaling (original context 16 < sequence length 40).
CASES = [
    ("llama", dict(num_heads=4, num_kv_heads=4)),
    ("llama", dict(num_heads=4, num_kv_heads=2)),
    ("llama", dict(num_heads=4, num_kv_heads=1, tie=True)),
    ("qwen2", dict(num_heads=4, num_kv_heads=2)),
    ("qwen2", dict(num_heads=4, num_kv_heads=1, tie=True)),
    ("qwen3", dict(num_heads=4, num_kv_heads=2, tie=True)),
    ("qwen3", dict(num_heads=4, num_kv_heads=4)),
]
IDS = [
    f"{f}-N{kw['num_heads']}K{kw['num_kv_heads']}{'-tied' if kw.get('tie') else ''}"
    for f, kw in CASES
]
T = 40
LENGTHS = (40, 23, 9)


def padded_batch(padding: str, vocab: int = 512, seed: int = 0):
    rng = np.random.default_rng(seed)
    ids = np.zeros((len(LENGTHS), T), np.int64)
    mask = np.zeros((len(LENGTHS), T), np.int64)
    for row, n in enumerate(LENGTHS):
        cols = slice(T - n, T) if padding == "left" else slice(0, n)
        ids[row, cols] = rng.integers(10, vocab, n)
        mask[row, cols] = 1
    return ids, mask


def hf_logits(hf, ids, mask):
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    with torch.no_grad():
        out = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        )
    return out.logits.numpy()


@pytest.mark.parametrize("padding", ["left", "right"])
@pytest.mark.parametrize(("family", "kw"), CASES, ids=IDS)
def test_logits_match_transformers(hf_checkpoint, family, kw, padding):
    path = hf_checkpoint(family, **kw)
    model = jaxlora.load_pretrained(path, dtype="float32")
    ids, mask = padded_batch(padding)
    ours = np.asarray(model(ids, attention_mask=mask))
    ref = hf_logits(load_hf_model(path), ids, mask)
    valid = mask.astype(bool)
    # float32 forward, torch's reduction order vs XLA's: logits of size ~1-10 through 2 layers
    # of <= 128-term sums agree to ~1e-6; a wrong norm, bias or rotary moves them by > 1e-2.
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    assert np.abs(ref[valid]).max() > 1.0  # the comparison is not between near-zero logits


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_hidden_states_match_transformers(hf_checkpoint, family):
    """`hidden_layers` follows transformers' output_hidden_states: 0 the embeddings, i layer
    i's output, the last the final-norm output."""
    path = hf_checkpoint(family, num_heads=4, num_kv_heads=2)
    model = jaxlora.load_pretrained(path, dtype="float32")
    ids, mask = padded_batch("right")
    layers = tuple(range(model.config.num_layers + 1))
    module = nnx.merge(model.graph(), model.params)
    logits, _, hidden = module(jnp.asarray(ids), jnp.asarray(mask, bool), hidden_layers=layers)
    with torch.no_grad():
        out = load_hf_model(path)(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            output_hidden_states=True,
        )
    valid = mask.astype(bool)
    assert hidden.shape == (len(layers), *ids.shape, model.config.hidden_size)
    for i in layers:
        ref = out.hidden_states[i].numpy()[valid]
        # float32, as the logits above: activations of size ~1 agree to ~1e-6.
        assert np.abs(np.asarray(hidden[i])[valid] - ref).max() < 1e-4, i
    assert np.abs(np.asarray(logits)[valid] - out.logits.numpy()[valid]).max() < 1e-4


def test_llama3_rope_scaling_is_applied(hf_checkpoint):
    """Dropping the llama3 scaling must change the logits (so the parity above tests it)."""
    path = hf_checkpoint("llama", num_heads=4, num_kv_heads=2)
    model = jaxlora.load_pretrained(path)
    unscaled = jaxlora.Model(model.config.replace(rope_scaling=None), model.params, model.tokenizer)
    ids, mask = padded_batch("right")
    assert model.config.rope_scaling is not None
    assert np.abs(np.asarray(model(ids, mask)) - np.asarray(unscaled(ids, mask))).max() > 1e-2


@pytest.mark.parametrize(
    ("family", "kw"), [CASES[1], CASES[3], CASES[5]], ids=[IDS[1], IDS[3], IDS[5]]
)
def test_greedy_generation_matches_transformers(hf_checkpoint, family, kw):
    path = hf_checkpoint(family, **kw)
    model = jaxlora.load_pretrained(path)
    ids, mask = padded_batch("left", seed=1)
    ours = generate(model, ids, mask, max_new_tokens=16)
    hf = load_hf_model(path)
    tok = model.tokenizer
    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=16,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=tok.eos_token_id,
        ).numpy()[:, T:]
    ref = np.pad(ref, ((0, 0), (0, 16 - ref.shape[1])), constant_values=tok.pad_token_id)
    np.testing.assert_array_equal(ours, ref)


def test_right_padded_prompts_generate_like_left_padded(hf_checkpoint):
    model = jaxlora.load_pretrained(hf_checkpoint("llama", num_heads=4, num_kv_heads=2))
    left = generate(model, *padded_batch("left", seed=2), max_new_tokens=8)
    right = generate(model, *padded_batch("right", seed=2), max_new_tokens=8)
    np.testing.assert_array_equal(left, right)


@pytest.mark.parametrize(("family", "kw"), [CASES[2], CASES[5]], ids=[IDS[2], IDS[5]])
def test_cached_decoding_equals_full_recomputation(hf_checkpoint, family, kw):
    model = jaxlora.load_pretrained(hf_checkpoint(family, **kw))
    module = nnx.merge(model.graph(), nnx.State({}), nnx.State({}), model.params)
    ids, mask = padded_batch("left", seed=3)
    prompt, steps = 30, T - 30
    cache = KVCache.init(model.config, ids.shape[0], T)
    logits, cache = module(jnp.asarray(ids[:, :prompt]), jnp.asarray(mask[:, :prompt]), cache=cache)
    stepped = [logits]
    for t in range(prompt, prompt + steps):
        logits, cache = module(
            jnp.asarray(ids[:, t : t + 1]), jnp.asarray(mask[:, t : t + 1]), cache=cache
        )
        stepped.append(logits)
    stepped = np.concatenate(stepped, axis=1)
    full = np.asarray(module(jnp.asarray(ids), jnp.asarray(mask))[0])
    valid = mask.astype(bool)
    # the same math one position at a time (other shapes, other kernels): a few ulps of ~10
    assert np.abs(stepped[valid] - full[valid]).max() < 1e-5


BF16_TOLERANCE = 0.05  # max |logit difference| relative to max |logit|, documented in README


@pytest.mark.parametrize("family", ["llama", "qwen3"])
def test_bfloat16_stays_close_to_float32(hf_checkpoint, family):
    path = hf_checkpoint(family)
    ids, mask = padded_batch("right")
    f32 = np.asarray(jaxlora.load_pretrained(path, dtype="float32")(ids, mask))
    model16 = jaxlora.load_pretrained(path, dtype="bfloat16")
    assert {x.dtype for x in jax_leaves(model16.params)} == {jnp.dtype(jnp.bfloat16)}
    b16 = np.asarray(model16(ids, mask))
    valid = mask.astype(bool)
    rel = np.abs(b16[valid] - f32[valid]).max() / np.abs(f32[valid]).max()
    assert 0 < rel < BF16_TOLERANCE
    agree = (b16[valid].argmax(-1) == f32[valid].argmax(-1)).mean()
    assert agree > 0.9


def test_dense_products_equal_xlas_own_and_run_bfloat16_kernels_on_cpu():
    """`dense` (the projections' product): in float32 the plain product; in bfloat16 on a CPU
    the float32-summed product (a `custom_vjp` asking XLA for bf16 kernels), equal to XLA's own
    bfloat16 product forward and backward. Both round a float32 sum of the same products to
    bfloat16, in another order: they may differ by one bfloat16 step (2^-7 relative) where a
    sum falls near a rounding boundary, never more."""
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(3, 40, 96)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(96, 72)) / 10, jnp.bfloat16)
    c = jnp.asarray(rng.normal(size=(3, 40, 72)), jnp.bfloat16)

    def plain(x, w):
        return jnp.einsum("...i,io->...o", x, w)

    def loss(f):
        return jax.grad(lambda x, w: jnp.sum((f(x, w) * c).astype(jnp.float32)), (0, 1))

    assert "custom_vjp_call" in str(jax.make_jaxpr(dense)(x, w))
    ours = [jax.jit(dense)(x, w), *jax.jit(loss(dense))(x, w)]
    xla = [jax.jit(plain)(x, w), *jax.jit(loss(plain))(x, w)]
    for a, b in zip(ours, xla, strict=True):
        a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
        assert a.shape == b.shape and np.abs(b).max() > 1
        assert np.all(np.abs(a - b) <= 2**-7 * np.abs(b))
    x32, w32 = x.astype(jnp.float32), w.astype(jnp.float32)
    assert "custom_vjp_call" not in str(jax.make_jaxpr(dense)(x32, w32))


def jax_leaves(state):
    return jax.tree.leaves(state)
