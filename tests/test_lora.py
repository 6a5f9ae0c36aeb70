"""The functional LoRA layer against PEFT, and stacked adapters against single adapters."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model

import jaxlora
from jaxlora import lora
from jaxlora.models import layers
from jaxlora.models.model import stack_forward
from tests.hf_factory import load_hf_model
from tests.test_model_parity import padded_batch

PEFT_CASES = {
    "llama-all-linear": ("llama", dict(target_modules="all-linear")),
    "qwen2-all-linear": ("qwen2", dict(target_modules="all-linear")),
    "qwen3-all-linear": ("qwen3", dict(target_modules="all-linear")),
    "llama-attention": ("llama", dict(target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])),
    "qwen3-list": ("qwen3", dict(target_modules=["q_proj", "up_proj", "down_proj"])),
    "llama-layer-subset": (
        "llama",
        dict(target_modules=["v_proj", "gate_proj"], layers_to_transform=[1]),
    ),
    "qwen2-rslora": ("qwen2", dict(target_modules="all-linear", use_rslora=True, lora_alpha=16)),
}


def peft_logits(peft_model, ids, mask):
    with torch.no_grad():
        return peft_model(
            input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)
        ).logits.numpy()


def random_peft_adapter(path, out_dir, seed=0, r=4, **kw):
    """A PEFT adapter with random non-zero A and B (init_lora_weights=False), saved to out_dir."""
    torch.manual_seed(seed)
    kw = {"lora_alpha": 8, **kw}
    peft_model = get_peft_model(
        load_hf_model(path), PeftLoraConfig(r=r, init_lora_weights=False, **kw)
    )
    peft_model.eval()
    peft_model.save_pretrained(out_dir)
    return peft_model


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_peft_adapter_logits_match(hf_checkpoint, tmp_path, case):
    family, kw = PEFT_CASES[case]
    path = hf_checkpoint(family)
    peft_model = random_peft_adapter(path, tmp_path / "adapter", **kw)
    model = jaxlora.load_pretrained(path)
    adapters = jaxlora.load_peft(model, [tmp_path / "adapter"])
    ids, mask = padded_batch("right")
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=adapters))[0]
    ref = peft_logits(peft_model, ids, mask)
    base = np.asarray(model(ids, mask))
    valid = mask.astype(bool)
    # float32 forward, torch's reduction order vs XLA's: logits of size ~1-10 through 2 layers
    # of <= 128-term sums agree to ~1e-6; an error in the math moves them by > 1e-2 (below).
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    assert np.abs(ref[valid] - base[valid]).max() > 1e-2  # the adapter changes the logits


def _random_b(stack: lora.AdapterStack, seed: int = 0) -> lora.AdapterStack:
    """The stack with B filled with random values (inside each adapter's rank and targets)."""
    key = jax.random.key(seed)

    def fill(path, var):
        x = var.get_value()
        if path[-1] != "lora_b":
            return var
        module = path[:-1]
        a = dict(nnx.to_flat_state(stack.weights))[(*module, "lora_a")].get_value()
        live = jnp.any(a != 0, axis=1)  # [A, R]: columns of A that are real
        noise = 0.2 * jax.random.normal(jax.random.fold_in(key, hash(path) % 2**31), x.shape)
        return var.replace(noise * live[:, :, None])

    return lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )


def test_export_loads_in_peft_with_equal_logits_and_round_trips(hf_checkpoint, tmp_path):
    path = hf_checkpoint("llama")
    model = jaxlora.load_pretrained(path)
    configs = [
        lora.LoRAConfig(rank=4, alpha=8.0, targets=("q_proj", "down_proj"), layers=(1,)),
        lora.LoRAConfig(rank=8, use_rslora=True),
    ]
    stack = _random_b(lora.init_adapters(model, configs, [1, 2]))
    ids, mask = padded_batch("right")
    ours = np.asarray(
        model(np.stack([ids, ids]), attention_mask=np.stack([mask, mask]), adapters=stack)
    )
    valid = mask.astype(bool)
    for index in range(2):
        out = jaxlora.save_peft(model, stack, index, tmp_path / f"a{index}")
        saved = json.loads((out / "adapter_config.json").read_text())
        assert saved["r"] == configs[index].rank and saved["base_model_name_or_path"] == str(path)
        peft_model = PeftModel.from_pretrained(load_hf_model(path), out).eval()
        # torch vs XLA rounding of one float32 forward (see test_peft_adapter_logits_match)
        assert np.abs(peft_logits(peft_model, ids, mask)[valid] - ours[index][valid]).max() < 1e-4
    back = jaxlora.load_peft(model, [tmp_path / "a0", tmp_path / "a1"])
    assert back.configs == tuple(configs)
    for (p, a), (_, b) in zip(
        nnx.to_flat_state(stack.weights), nnx.to_flat_state(back.weights), strict=True
    ):
        np.testing.assert_array_equal(
            np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(p)
        )


def test_adapter_trained_in_peft_gives_peft_logits(hf_checkpoint, tmp_path):
    path = hf_checkpoint("qwen3")
    torch.manual_seed(0)
    peft_model = get_peft_model(
        load_hf_model(path), PeftLoraConfig(r=4, lora_alpha=4, target_modules="all-linear")
    )
    peft_model.train()
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    ids, mask = padded_batch("right")
    for _ in range(5):
        loss = peft_model(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            labels=torch.tensor(np.where(mask, ids, -100)),
        ).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    peft_model.eval()
    peft_model.save_pretrained(tmp_path / "trained")
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, [tmp_path / "trained"])
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=stack))[0]
    valid = mask.astype(bool)
    # torch vs XLA rounding of one float32 forward (see test_peft_adapter_logits_match)
    assert np.abs(ours[valid] - peft_logits(peft_model, ids, mask)[valid]).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# stacks


RANKS = (2, 2, 4, 4, 8, 16)


@pytest.fixture(scope="module")
def six(hf_checkpoint):
    model = jaxlora.load_pretrained(hf_checkpoint("llama"))
    configs = [
        lora.LoRAConfig(rank=r, alpha=2.0 * r if i % 2 else None) for i, r in enumerate(RANKS)
    ]
    keys = [10 + i for i in range(len(RANKS))]
    stack = _random_b(lora.init_adapters(model, configs, keys))
    rng = np.random.default_rng(0)
    ids = rng.integers(10, 500, (len(RANKS), 3, 24))
    mask = np.ones_like(ids, bool)
    mask[:, 1, 17:] = False
    return model, configs, keys, stack, ids, mask


def _single(model, stack, i):
    """Adapter i alone, at its own rank (no padding): its own one-adapter stack."""
    placement = stack.configs[i].placement()
    _, w_abs, _, _ = lora.abstract_module(model.config, placement)
    shapes = dict(nnx.to_flat_state(w_abs))

    def cut(path, var):
        want = shapes[path].get_value().shape
        return var.replace(var.get_value()[i : i + 1, : want[0], : want[1]])

    return lora.AdapterStack(
        nnx.map_state(cut, stack.weights),
        jax.tree.map(lambda x: x[i : i + 1], stack.consts),
        (stack.configs[i],),
        (stack.names[i],),
    )


def test_vmapped_stack_equals_single_adapter_forwards(six):
    model, _, _, stack, ids, mask = six
    batched = np.asarray(model(ids, attention_mask=mask, adapters=stack))
    for i in range(len(RANKS)):
        single = _single(model, stack, i)
        assert (
            single.weights["layers"][0]["mlp"]["up_proj"]["lora_a"].get_value().shape[-1]
            == RANKS[i]
        )
        alone = np.asarray(model(ids[i : i + 1], attention_mask=mask[i : i + 1], adapters=single))[
            0
        ]
        # same math, other shapes (XLA may pick other kernels): a few float32 ulps of ~10
        assert np.abs(batched[i][mask[i]] - alone[mask[i]]).max() < 1e-5


def test_rank_groups_and_padding_agree(six):
    model, configs, _, stack, ids, mask = six
    groups = lora.layout_groups(configs, "groups")
    assert groups == [[0, 1], [2, 3], [4], [5]]
    stacks = []
    for g in groups:
        sub = [_single(model, stack, i) for i in g]
        stacks.append(lora.concatenate(model, sub))
    assert [
        s.weights["layers"][1]["self_attn"]["o_proj"]["lora_b"].get_value().shape[1] for s in stacks
    ] == [2, 4, 8, 16]
    order = [i for g in groups for i in g]
    grouped = np.asarray(model(ids[order], attention_mask=mask[order], adapters=stacks))
    padded = np.asarray(model(ids, attention_mask=mask, adapters=stack))[order]
    valid = mask[order]
    # zero-padded ranks add exact zeros; only the kernels' shapes differ: a few ulps of ~10
    assert np.abs(grouped[valid] - padded[valid]).max() < 1e-5


def test_per_example_mode_equals_each_row_with_its_adapter(six):
    model, _, _, stack, ids, mask = six
    rows, row_mask = ids[:, 0], mask[:, 0]
    adapter_ids = np.array([5, 0, 3, 3, 1, 2])
    routed = np.asarray(lora.routed_logits(model, stack, adapter_ids, rows, row_mask))
    everything = np.asarray(
        model(
            np.repeat(rows[None], 6, 0),
            attention_mask=np.repeat(row_mask[None], 6, 0),
            adapters=stack,
        )
    )
    for b, a in enumerate(adapter_ids):
        # the same adapter per row, gathered instead of stacked: a few ulps of ~10
        assert np.abs(routed[b] - everything[a, b]).max() < 1e-5


def test_zero_b_gives_exactly_the_base_logits(six):
    model, configs, keys, _, ids, mask = six
    fresh = lora.init_adapters(model, configs, keys)
    assert not np.any(
        np.asarray(fresh.weights["layers"][0]["self_attn"]["q_proj"]["lora_b"].get_value())
    )
    out = np.asarray(model(ids, attention_mask=mask, adapters=fresh))
    for i in range(len(RANKS)):
        np.testing.assert_array_equal(out[i], np.asarray(model(ids[i], attention_mask=mask[i])))


def test_merged_equals_unmerged(six):
    model, _, _, stack, ids, mask = six
    merged = lora.merge(model, stack, 4)
    # W + s B A rounded once into W vs added as a separate product: a few ulps of ~10
    np.testing.assert_allclose(
        np.asarray(merged(ids[4], mask[4])),
        np.asarray(model(ids, attention_mask=mask, adapters=stack))[4],
        atol=1e-5,
    )
    restored = lora.unmerge(merged, stack, 4)
    # (W + dW) - dW is W up to one rounding of each weight
    np.testing.assert_allclose(
        np.asarray(restored(ids[0], mask[0])), np.asarray(model(ids[0], mask[0])), atol=1e-5
    )


def test_dropout_is_per_adapter_key_and_off_without_a_key(six):
    model, _, _, stack, ids, mask = six
    consts = jax.tree.map(lambda x: x, stack.consts)
    with_dropout = lora.AdapterStack(
        stack.weights,
        nnx.map_state(
            lambda p, v: (
                v.replace(jnp.full_like(v.get_value(), 0.5)) if p[-1] == "lora_dropout" else v
            ),
            consts,
        ),
        stack.configs,
        stack.names,
    )
    graph = model.graph(stack.placement)
    t, m = jnp.asarray(ids), jnp.asarray(mask)
    args = (graph, model.params, with_dropout.weights, with_dropout.consts, t, m)
    keys = jax.random.split(jax.random.key(0), len(RANKS))
    a = np.asarray(stack_forward(*args, rng_A=keys))
    b = np.asarray(stack_forward(*args, rng_A=keys))
    c = np.asarray(stack_forward(*args, rng_A=jax.random.split(jax.random.key(1), len(RANKS))))
    off = np.asarray(stack_forward(*args))
    np.testing.assert_array_equal(a, b)
    assert np.abs(a - c).max() > 1e-3
    # no dropout key: the same math as the plain forward, through another code path
    np.testing.assert_allclose(
        off, np.asarray(model(ids, attention_mask=mask, adapters=stack)), atol=1e-5
    )


@pytest.mark.parametrize("rate", [0.1, 0.5])
def test_dropout_keeps_the_right_fraction_unbiased_and_uncorrelated(rate):
    x = jnp.ones((255, 1023), jnp.float32)  # odd rows: the last row of 16-bit draws is cut off
    out = np.asarray(layers._dropout(jax.random.key(3), jnp.float32(rate), x))
    kept = out != 0
    n = kept.size
    # binomial: 4 standard deviations
    assert abs(kept.mean() - (1 - rate)) < 4 * np.sqrt(rate * (1 - rate) / n)
    # 1 / (1 - rate) computed in float32 vs float64
    np.testing.assert_allclose(out[kept], 1 / (1 - rate), rtol=1e-4)
    assert abs(out.mean() - 1) < 4 * np.sqrt(rate / (1 - rate) / n)
    # rows r and r + 128 share 32-bit hashed words (their low and high halves), and words
    # follow each other along a row and down the rows: all must be independent
    flat = kept.reshape(-1).astype(np.float64)
    for lag in (1, 2, 3, 4, 1023, 128 * 1023 - 1, 128 * 1023, 128 * 1023 + 1):
        assert abs(np.corrcoef(flat[:-lag], flat[lag:])[0, 1]) < 4 / np.sqrt(n)
    # another key (a neighbouring seed, or split from this one as the layers' keys are), an
    # independent mask: two masks agree where both keep or both drop
    for key in (jax.random.key(4), jax.random.key(1000), *jax.random.split(jax.random.key(3))):
        other = np.asarray(layers._dropout(key, jnp.float32(rate), x)) != 0
        agree, expected = (other == kept).mean(), rate**2 + (1 - rate) ** 2
        assert abs(agree - expected) < 4 * np.sqrt(expected * (1 - expected) / n)
    np.testing.assert_array_equal(
        np.asarray(layers._dropout(jax.random.key(3), jnp.float32(0.0), x)), np.asarray(x)
    )


# A's shape ([in, r]: its gradient is summed as [r, in] and transposed) and B's ([r, out])
FACTOR_SHAPES = pytest.mark.parametrize("d_in, d_out", [(6, 4), (4, 7)], ids=["A", "B"])


@FACTOR_SHAPES
def test_factor_product_gradient_equals_autodiff(d_in, d_out):
    """The custom VJP of x A and u B, alone and vmapped over a stacked adapter axis as the
    trainer runs it, against autodiff of the plain product."""
    x = jax.random.normal(jax.random.key(0), (2, 3, 5, d_in))
    w = jax.random.normal(jax.random.key(1), (2, d_in, d_out))
    cot = jax.random.normal(jax.random.key(2), (2, 3, 5, d_out))

    def plain(x, w):
        return jnp.einsum("...i,io->...o", x, w)

    product = layers._factor_product
    for ours_fn, ref_fn, args, c in [
        (product, plain, (x[0], w[0]), cot[0]),
        (jax.vmap(product), jax.vmap(plain), (x, w), cot),
    ]:
        out, ours = jax.vjp(ours_fn, *args)
        ref_out, ref = jax.vjp(ref_fn, *args)
        # one float32 product each, contracted in another order: a few ulps
        np.testing.assert_allclose(np.asarray(out), np.asarray(ref_out), rtol=1e-6)
        for g, r in zip(ours(c), ref(c), strict=True):
            assert g.shape == r.shape
            # the gradients: two such products each (the cotangent through the other factor), so
            # 10x the outputs' bound; a wrong orientation or factor is off by O(1)
            np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5)


@FACTOR_SHAPES
def test_factor_gradients_are_summed_in_the_factors_float32(d_in, d_out):
    """bfloat16 activations, float32 factors (a bfloat16 model in training): the factor's
    gradient sums bfloat16 products in float32, as PEFT's float32 adapters do."""
    x = jax.random.normal(jax.random.key(0), (3, 40, 4 * d_in)).astype(jnp.bfloat16)
    w = jax.random.normal(jax.random.key(1), (4 * d_in, 4 * d_out))
    cot = jax.random.normal(jax.random.key(2), (3, 40, 4 * d_out)).astype(jnp.bfloat16)
    out, vjp = jax.vjp(layers._factor_product, x, w)
    dx, dw = vjp(cot)
    assert (out.dtype, dx.dtype, dw.dtype) == (jnp.bfloat16, jnp.bfloat16, jnp.float32)

    f32 = jnp.float32
    _, ref = jax.vjp(
        lambda w: jnp.einsum("...i,io->...o", x.astype(f32), w),
        w.astype(jnp.bfloat16).astype(f32),
    )
    # the same exact products of bfloat16 values, summed in float32 in another order: a few
    # float32 ulps of the 120-term sums; a bfloat16 result would be off by ~2^-9
    np.testing.assert_allclose(
        np.asarray(dw), np.asarray(ref(cot.astype(f32))[0]), rtol=1e-5, atol=1e-5
    )


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("kw", "needle"),
    [
        (dict(rank=0), "rank must be a positive integer"),
        (dict(rank=-3), "rank must be a positive integer"),
        (dict(rank=40), "exceeds min(in, out) = 32 of k_proj"),
        (dict(rank=4, targets=("q_proj", "qkv")), "unknown LoRA target 'qkv'"),
        (dict(rank=4, alpha=0.0), "alpha must be positive"),
        (dict(rank=4, layers=(5,)), "subset of 0..1"),
    ],
)
def test_bad_lora_configs_give_one_line_errors(kw, needle):
    model = jaxlora.load_pretrained("tiny-llama")
    with pytest.raises(lora.LoRAError) as e:
        lora.init_adapters(model, [lora.LoRAConfig(**kw)], [0])
    assert needle in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    ("change", "needle"),
    [
        ({"use_dora": True}, "lacks lora_magnitude_vector"),
        ({"init_lora_weights": "pissa"}, "path_initial_model_for_weight_conversion"),
        ({"bias": "all"}, "bias='all'"),
        ({"rank_pattern": {"q_proj": 8}}, "rank_pattern"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"peft_type": "IA3"}, "is not LoRA"),
    ],
)
def test_unsupported_peft_features_give_one_line_errors(hf_checkpoint, tmp_path, change, needle):
    path = hf_checkpoint("llama")
    random_peft_adapter(path, tmp_path / "a", target_modules=["q_proj"])
    cfg_file = tmp_path / "a" / "adapter_config.json"
    cfg_file.write_text(json.dumps({**json.loads(cfg_file.read_text()), **change}))
    with pytest.raises(lora.LoRAError) as e:
        jaxlora.load_peft(jaxlora.load_pretrained(path), [tmp_path / "a"])
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_peft_adapter_for_another_base_is_refused(hf_checkpoint, tmp_path):
    random_peft_adapter(
        hf_checkpoint("llama", hidden=32, intermediate=64),
        tmp_path / "a",
        target_modules=["q_proj"],
    )
    with pytest.raises(lora.LoRAError) as e:
        jaxlora.load_peft(jaxlora.load_pretrained(hf_checkpoint("llama")), [tmp_path / "a"])
    assert "the base model it was trained on" in str(e.value) and "\n" not in str(e.value)
