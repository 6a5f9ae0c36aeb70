"""Packed batches: the same rows, loss, gradients and adapters as unpacked rows.

Packing (jaxlora/data/stream.py) lays a step's rows end to end with segment ids; the model
(jaxlora/models/transformer.py) keeps attention inside each row and restarts positions per
row. Tests in tests/test_attention.py check the kernels; here the data layout, the loss and
its gradient, and whole training runs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxlora.config import load_config
from jaxlora.data.encode import Encoded
from jaxlora.data.stream import EpochStream, choose_packing, gather, pack, packed_length
from jaxlora.errors import ConfigError, DataError
from jaxlora.lora import LoRAConfig, init_adapters
from jaxlora.models.model import from_preset
from jaxlora.train import _group_losses
from tests.runs import adapters, assert_equal_to_rounding, rounding_bound, run, write_config

# Loss and gradient tolerance: both layouts sum the same float32 terms (per-token losses, and
# per-position gradient contributions) in another order, and softmax sums over another set
# of exactly-zero masked terms; with ~10^2 terms of order one that is ~1e-6 relative.
# 1e-5 holds on any machine; a row attending across a boundary moves them by ~1e-2.
RTOL = 1e-5


def _encoded(lengths: list[int], width: int, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    n = len(lengths)
    tokens = np.zeros((n, width), np.int32)
    valid = np.zeros((n, width), bool)
    loss = np.zeros((n, width), bool)
    for i, k in enumerate(lengths):
        tokens[i, :k] = rng.integers(1, 500, k)
        valid[i, :k] = True
        loss[i, 1:k] = rng.random(k - 1) < 0.7  # some non-targets, never the first token
    return Encoded(tokens, valid, loss, pad_id=0)


# Rows of very different lengths, one as long as the sequence, and an empty slot (-1).
LENGTHS = [64, 3, 17, 40, 1, 9, 64, 25]
WIDTH = 64


def test_pack_keeps_every_row_in_order_with_its_own_segment():
    enc = _encoded(LENGTHS, WIDTH)
    idx = np.array([2, 0, -1, 4, 5])
    tokens, valid, loss = gather(enc, idx)
    L = packed_length(enc.lengths, len(idx), 8)
    assert L == 216  # the 5 longest rows (64 + 64 + 40 + 25 + 17 = 210), rounded up to 8
    pt, pv, pl, seg = pack(tokens, valid, loss, L, enc.pad_id)
    assert pt.shape == (1, L)
    at = 0
    for slot, row in enumerate(idx):
        if row < 0:
            assert not (seg == slot + 1).any()  # an empty slot takes no position
            continue
        k = LENGTHS[row]
        np.testing.assert_array_equal(pt[0, at : at + k], enc.tokens[row, :k])
        np.testing.assert_array_equal(pl[0, at : at + k], enc.loss[row, :k])
        assert (seg[0, at : at + k] == slot + 1).all() and pv[0, at : at + k].all()
        at += k
    assert not pv[0, at:].any() and not pl[0, at:].any() and (seg[0, at:] == 0).all()
    assert pl.sum() == loss.sum()  # the same targets


def test_packed_length_covers_every_step_of_every_epoch():
    enc = _encoded(LENGTHS, WIDTH)
    L = packed_length(enc.lengths, 3, 8)
    stream = EpochStream(len(LENGTHS), 3, seed=7)
    for step in range(60):
        tokens, valid, loss = gather(enc, stream.indices(step))
        pack(tokens, valid, loss, L, 0)  # raises if a step did not fit


def test_pack_rejects_overflow_and_left_padding():
    enc = _encoded([10, 10], 16)
    with pytest.raises(DataError, match="do not fit"):
        pack(enc.tokens, enc.valid, enc.loss, 16, 0)
    left = np.zeros((1, 4), bool)
    left[0, 2:] = True
    with pytest.raises(DataError, match="right-padded"):
        pack(np.zeros((1, 4), np.int32), left, left, 8, 0)


def test_auto_packs_only_when_it_saves_enough():
    assert choose_packing("auto", width=64, batch_size=8, length=256, fsdp=1)[0]
    assert not choose_packing("auto", width=64, batch_size=8, length=480, fsdp=1)[0]
    assert not choose_packing("auto", width=64, batch_size=8, length=128, fsdp=2)[0]
    assert choose_packing(True, width=64, batch_size=8, length=480, fsdp=2)[0]
    assert not choose_packing(False, width=64, batch_size=8, length=8, fsdp=1)[0]


def test_packing_key_is_validated_in_one_line(tmp_path):
    path = write_config(tmp_path / "c.yaml")
    assert load_config(path).training.packing == "auto"
    assert load_config(path, ["training.packing=true"]).training.packing is True
    with pytest.raises(ConfigError, match=r"training\.packing") as e:
        load_config(path, ["training.packing=sometimes"])
    assert "\n" not in str(e.value)


def test_packed_loss_and_gradient_equal_unpacked():
    """One adapter stack (two ranks, nonzero B so that every LoRA path matters), the loss and
    its gradient on the same rows, packed and unpacked."""
    model = from_preset("tiny-llama")
    configs = [LoRAConfig(rank=4, init="gaussian"), LoRAConfig(rank=4, init="gaussian")]
    stack = init_adapters(model, configs, [1, 2])
    # B = 0 at init would hide the adapter: give it random values.
    leaves, treedef = jax.tree.flatten(stack.weights)
    keys = jax.random.split(jax.random.key(0), len(leaves))
    weights = jax.tree.unflatten(
        treedef, [0.05 * jax.random.normal(k, x.shape) for k, x in zip(keys, leaves, strict=True)]
    )
    graphdef = model.graph(stack.placement)
    enc = [_encoded(LENGTHS, WIDTH, seed) for seed in (0, 1)]
    idx = [np.array([0, 1, 2, 3, 4, 5, 6, -1]), np.array([7, 6, 5, -1, 3, 1, 2, 0])]
    rows = [gather(e, i) for e, i in zip(enc, idx, strict=True)]
    L = packed_length(enc[0].lengths, 8, 8)
    packed = [pack(*r, L, 0) for r in rows]
    unpacked_batch = tuple(jnp.asarray(np.stack(x)) for x in zip(*rows, strict=True))
    packed_batch = tuple(jnp.asarray(np.stack(x)) for x in zip(*packed, strict=True))

    def loss(w, batch, window):
        per = _group_losses(graphdef, model.params, w, stack.consts, batch, None, None, window)
        return per.sum(), per

    (_, per_u), grad_u = jax.value_and_grad(loss, has_aux=True)(weights, unpacked_batch, 0)
    (_, per_p), grad_p = jax.value_and_grad(loss, has_aux=True)(weights, packed_batch, WIDTH)
    np.testing.assert_allclose(per_p, per_u, rtol=RTOL)
    for gu, gp in zip(jax.tree.leaves(grad_u), jax.tree.leaves(grad_p), strict=True):
        scale = float(jnp.abs(gu).max())
        np.testing.assert_allclose(gp, gu, rtol=RTOL, atol=RTOL * scale)
    # The test has teeth: the same packed rows without segment ids (attention across rows,
    # positions running on) give another loss.
    flat = packed_batch[:3]
    crossing = _group_losses(graphdef, model.params, weights, stack.consts, flat, None, None, 0)
    assert np.abs(np.asarray(crossing) - np.asarray(per_u)).max() > 1e-3


def test_packed_training_equals_unpacked(tmp_path):
    """Whole runs (two adapters of different data sizes, so rows and empty slots differ):
    adapters equal to float32 rounding. Dropout is off: its masks are drawn for the layout's
    shape, so with dropout the two layouts train on different (equally distributed) masks."""
    out = {}
    for packing in ("false", "true"):
        config = load_config(
            write_config(tmp_path / f"{packing}.yaml", **{"lora.dropout": 0.0}),
            [f"training.packing={packing}", "sweep.data.size_tokens=[150,300]"],
        )
        result = run(config, tmp_path / packing)
        out[packing] = adapters(tmp_path / packing)
        assert result["summary"]
    assert_equal_to_rounding(out["true"], out["false"], rounding_bound(config))


def test_dropout_keeps_rows_so_an_adapter_never_depends_on_its_neighbours():
    """With LoRA dropout the masks follow the layout, and a packed length depends on every cell
    of the job: auto keeps rows, and asking for packing is a one-line error."""
    from jaxlora.data.stream import choose_packing
    from jaxlora.errors import DataError

    shape = dict(width=64, batch_size=8, length=192, fsdp=1)  # packing would save 62%
    assert choose_packing("auto", **shape)[0]
    packed, why = choose_packing("auto", **shape, dropout=True)
    assert not packed and "dropout" in why
    with pytest.raises(DataError, match=r"packing: true with lora\.dropout > 0") as e:
        choose_packing(True, **shape, dropout=True)
    assert "\n" not in str(e.value)
