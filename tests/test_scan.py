"""`scan_layers`: the layers as one `lax.scan` compute what the unrolled stack computes.

The model is tiny-llama: 2 layers, GQA (4 query heads over 2 kv heads). The adapters have
mixed ranks and targets on layer 1 only, so the scan's zero-filled layer (0) and zero-padded
ranks are exercised.

Tolerances: scanned and unrolled run the same float32 operations in the same order; they differ
only in how XLA fuses and vectorises a loop body versus straight-line code, i.e. in the last
bits of a few sums. Logits of size ~1-10 after 2 layers of <= 128-term sums then agree to
~1e-6; a wrong layer (a missing adapter, the wrong layer's weights) moves them by > 1e-2.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from jaxlora import lora
from jaxlora.cells import seed_key
from jaxlora.config import load_config
from jaxlora.models.model import Model, init_params, stack_forward
from jaxlora.models.presets import PRESETS
from jaxlora.models.transformer import KVCache
from jaxlora.objectives import token_mean_ce
from jaxlora.train import ByLayer, GroupState, Hyper, StepConfig, TrainState, train_step
from tests.runs import adapters, assert_equal_to_rounding, rounding_bound, run, write_config
from tests.test_model_parity import padded_batch

CONFIG = PRESETS["tiny-llama"].config
LOGIT_TOL = 1e-5  # see the module docstring


@pytest.fixture(scope="module")
def model() -> Model:
    return Model(CONFIG, init_params(CONFIG, seed=0))


def _random_b(stack: lora.AdapterStack, seed: int) -> lora.AdapterStack:
    """B filled with noise, so that every adapter changes the logits."""
    rng = np.random.default_rng(seed)

    def fill(path, var):
        x = var.get_value()
        if path[-1] != "lora_b":
            return var
        return var.replace(jnp.asarray(rng.normal(0, 0.2, x.shape), jnp.float32))

    return lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )


def _stack(model, configs, seed=0) -> lora.AdapterStack:
    seeds = list(range(seed, seed + len(configs)))
    return _random_b(lora.init_adapters(model, configs, seeds), seed)


# layer 0 carries no adapter; ranks 2 (q, v) and 4 (all-linear) on layer 1
SOME_LAYERS = [
    lora.LoRAConfig(rank=2, targets=("q_proj", "v_proj"), layers=(1,), dropout=0.1),
    lora.LoRAConfig(rank=4, layers=(1,), dropout=0.1),
]


@functools.partial(jax.jit, static_argnames=("graph", "segment_window", "hidden_layers"))
def _call(graph, states, tokens, mask=None, **kw):
    """`nnx.merge(graph, *states)(tokens, mask, **kw)`, jitted (eager calls are slow)."""
    return nnx.merge(graph, *states)(tokens, mask, **kw)


def _one(stack: lora.AdapterStack, a: int):
    return (
        jax.tree.map(lambda x: x[a], stack.weights),
        jax.tree.map(lambda x: x[a], stack.consts),
    )


def test_scanned_logits_equal_unrolled_with_padding_gqa_some_layers_and_dropout(model):
    stack = _stack(model, SOME_LAYERS)
    ids, mask = padded_batch("left")
    ids_ABT = np.stack([ids, ids[::-1]])
    mask_ABT = np.stack([mask, mask[::-1]])
    keys = jax.random.split(jax.random.key(0), 2)  # LoRA dropout 0.1: per-layer rngs in the scan
    out = {}
    for scan in (False, True):
        graph = model.graph(stack.placement, scan_layers=scan)
        fwd = jax.jit(functools.partial(stack_forward, graph))
        logits = fwd(model.params, stack.weights, stack.consts, ids_ABT, mask_ABT, rng_A=keys)
        out[scan] = np.asarray(logits)
    valid = np.broadcast_to(mask_ABT.astype(bool), out[False].shape[:-1])
    np.testing.assert_allclose(out[True][valid], out[False][valid], atol=LOGIT_TOL)
    base = np.asarray(model(ids, mask))
    assert np.abs(out[False][0][mask.astype(bool)] - base[mask.astype(bool)]).max() > 1e-2

    # packed rows (segment ids) take the scan too
    seg = np.asarray([[1] * 5 + [2] * 7 + [3] * 4, [1] * 16], np.int32)
    tokens = ids[:2, :16]
    w, c = _one(stack, 1)
    packed = {}
    for scan in (False, True):
        graph = model.graph(stack.placement, scan_layers=scan)
        states = (w, c, model.params)
        packed[scan] = _call(graph, states, tokens, segment_ids_BT=seg, segment_window=16)[0]
    np.testing.assert_allclose(packed[True], packed[False], atol=LOGIT_TOL)


def test_scanned_hidden_layers_equal_unrolled(model):
    stack = _stack(model, SOME_LAYERS)
    w, c = _one(stack, 0)
    ids, mask = padded_batch("right")
    out = {}
    for scan in (False, True):
        graph = model.graph(stack.placement, scan_layers=scan)
        logits, _, hidden = _call(graph, (w, c, model.params), ids, mask, hidden_layers=(0, 1, 2))
        out[scan] = np.asarray(logits), np.asarray(hidden)
    valid = mask.astype(bool)
    np.testing.assert_allclose(out[True][0][valid], out[False][0][valid], atol=LOGIT_TOL)
    # hidden states are O(1-10) like the logits: the same tolerance
    np.testing.assert_allclose(out[True][1][:, valid], out[False][1][:, valid], atol=LOGIT_TOL)


def test_scanned_model_decodes_with_a_cache_like_unrolled(model):
    """A cached call runs its layers unrolled (in-place cache updates); prefill + one decoding
    step of the scanned model equal the unrolled model's and the scanned full forward."""
    stack = _stack(model, SOME_LAYERS)
    w, c = _one(stack, 0)
    ids, mask = padded_batch("left")
    prompt, prompt_mask = ids[:, :-1], mask[:, :-1]
    out = {}
    for scan in (False, True):
        graph, states = model.graph(stack.placement, scan_layers=scan), (w, c, model.params)
        cache = KVCache.init(CONFIG, ids.shape[0], ids.shape[1])
        _, cache = _call(graph, states, prompt, prompt_mask, cache=cache)
        step, _ = _call(graph, states, ids[:, -1:], mask[:, -1:], cache=cache)
        out[scan] = np.asarray(step[:, 0])
        out[scan, "full"] = np.asarray(_call(graph, states, ids, mask)[0][:, -1])
    np.testing.assert_allclose(out[True], out[False], atol=LOGIT_TOL)
    np.testing.assert_allclose(out[True], out[True, "full"], atol=LOGIT_TOL)


def test_scanned_model_reads_the_given_layer_stacks(model):
    """`lora_stacks` replace the layers' own LoRA weights in a scanned stack: merged with
    adapter 0 and given adapter 1's stacks, the scanned model computes adapter 1's logits (the
    unrolled model reads its layers' own: adapter 0's)."""
    stack = _stack(model, EVERY_LAYER)
    ids, mask = padded_batch("right")
    states = [(*_one(stack, a), model.params) for a in (0, 1)]
    stacks = {}
    for tree in states[1][:2]:
        by_layer = ByLayer.of(jax.tree.map(lambda x: x[None], tree))
        stacks |= {k: x[0] for k, x in by_layer[1].layer_stacks(by_layer[0]).items()}
    valid = mask.astype(bool)
    unrolled = model.graph(stack.placement)
    own = [np.asarray(_call(unrolled, states[a], ids, mask)[0])[valid] for a in (0, 1)]
    assert np.abs(own[1] - own[0]).max() > 1e-2  # the adapters' logits differ
    for scan, reads in ((True, 1), (False, 0)):
        graph = model.graph(stack.placement, scan_layers=scan)
        given = _call(graph, states[0], ids, mask, lora_stacks=stacks)[0]
        np.testing.assert_allclose(np.asarray(given)[valid], own[reads], atol=LOGIT_TOL)


def _group(model, configs, seed) -> tuple[GroupState, lora.LoRAPlacement]:
    stack = _stack(model, configs, seed)
    hyper = Hyper.stack(
        [
            dict(lr=1e-2, warmup_ratio=0.0, weight_decay=0.01, clip_norm=1.0)
            | dict(b1=0.9, b2=0.999, eps=1e-8, lr_ratio=1.0)
        ]
        * len(configs)
    )
    keys = jnp.stack([jax.random.key_data(seed_key(seed + i)) for i in range(len(configs))])
    live = jnp.ones(len(configs), bool)
    group = GroupState.create(stack.weights, stack.consts, hyper, keys, live, "cosine", 10)
    return group, stack.placement


# every layer: the scanned step reads the training state's layer stacks themselves
EVERY_LAYER = [
    lora.LoRAConfig(rank=2, targets=("q_proj", "v_proj"), dropout=0.1),
    lora.LoRAConfig(rank=4, dropout=0.1),
]


@pytest.mark.parametrize(
    ("configs", "passes", "packed"),
    [(SOME_LAYERS, 1, False), (EVERY_LAYER, 1, False), (EVERY_LAYER, 2, True)],
    ids=["some layers", "every layer", "every layer, 2 passes, packed"],
)
def test_scanned_train_step_equals_unrolled(model, configs, passes, packed):
    """One rank group of mixed ranks (padded to one stack): the scanned step with block remat
    gives the unrolled step's losses and updated adapters (without remat: the gradient test
    below). With adapters on every layer the scan reads the step's layer stacks (`lora_stacks`),
    else the layers' own weights, stacked by the model."""
    group, placement = _group(model, configs, seed=0)
    state = TrainState(jnp.zeros((), jnp.int32), (group,))
    ids = np.random.default_rng(0).integers(10, 500, (2, 1, 24) if packed else (2, 3, 12))
    valid = np.ones(ids.shape, bool)
    valid[:, 0, -4:] = False  # a right-padded row (packed: the empty end of the sequence)
    batch = (ids, valid, valid)
    if packed:  # rows of 8, 10 and 2 tokens
        batch += (np.broadcast_to(np.repeat([1, 2, 3, 0], [8, 10, 2, 4]), ids.shape),)
    out = {}
    for remat, scan in (("none", False), ("block", True)):
        cfg = StepConfig(
            graphdefs=(model.graph(placement, remat=remat, scan_layers=scan),),
            schedule="cosine",
            total_steps=10,
            use_dropout=False,  # dropout through the scan: the logits test
            passes=(passes,),
            segment_window=10 if packed else 0,
            scan_layers=scan,
        )
        step = jax.jit(functools.partial(train_step, cfg))
        new, losses = step(model.params, state, (batch,))
        out[remat, scan] = (losses[0], new.groups[0].weights)
    l0, w0 = out["none", False]
    for key in (("block", True),):
        l1, w1 = out[key]
        # losses ~6 (ln 512): float32 rounding of the loop body's sums, as for the logits
        np.testing.assert_allclose(l1, l0, atol=1e-5)
        for a, b in zip(jax.tree.leaves(w1), jax.tree.leaves(w0), strict=True):
            # Adam's first update is lr * g / (|g| + eps) = +-lr wherever |g| >> eps; only an
            # entry whose gradient is itself a cancellation near rounding level (|g| ~ eps)
            # can move differently, by a fraction of lr (1e-6 seen): 1e-5 = lr / 1000
            np.testing.assert_allclose(a, b, atol=1e-5)
    moved = max(
        float(np.abs(np.asarray(x) - np.asarray(y)).max())
        for x, y in zip(jax.tree.leaves(w0), jax.tree.leaves(group.weights), strict=True)
    )
    assert moved > 1e-3  # the step did update the adapters


def test_scanned_gradients_equal_unrolled_and_hold_one_layer_of_base_weights():
    """Without remat (the scan's own remat policy: the backward pass fetches a layer's base
    weights again rather than keeping every layer's fetch), gradients equal the unrolled ones
    and the temporary buffers grow by about one layer's weights, never by a stacked copy of
    the whole base (6 layers here, adapters on 2 of them)."""
    config = CONFIG.replace(hidden_size=256, intermediate_size=1024, num_layers=6, head_dim=64)
    model = Model(config, init_params(config, seed=1))
    configs = [lora.LoRAConfig(rank=4, layers=(0, 3)), lora.LoRAConfig(rank=2, layers=(3,))]
    stack = _stack(model, configs)
    ids = np.random.default_rng(1).integers(10, 500, (2, 1, 8))
    mask = np.ones(ids.shape, bool)
    base_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(model.params))
    temp, grads = {}, {}
    for scan in (False, True):
        graph = model.graph(stack.placement, scan_layers=scan)

        def loss(w, base, graph=graph):
            logits = stack_forward(graph, base, w, stack.consts, ids, mask)
            return jax.vmap(token_mean_ce)(logits, ids, mask).sum()

        lowered = jax.jit(jax.grad(loss)).lower(stack.weights, model.params)
        if scan:  # one block in the program: a scan whose body fetches by `case`
            text = lowered.as_text()
            assert "stablehlo.while" in text and "stablehlo.case" in text
        compiled = lowered.compile()
        temp[scan] = compiled.memory_analysis().temp_size_in_bytes
        grads[scan] = jax.tree.leaves(compiled(stack.weights, model.params))
    for a, b in zip(grads[True], grads[False], strict=True):
        # gradients of a loss ~6 through 6 layers: float32 rounding of the loop body's sums
        np.testing.assert_allclose(a, b, atol=1e-5)
    # the fetch buffers: a layer's weights (1/6 of the base) for the forward and the backward
    # (~1.5 layers measured); a stacked copy of the base would add all of it
    assert temp[True] - temp[False] < 0.5 * base_bytes, (temp, base_bytes)


@pytest.mark.parametrize(
    ("layers", "depth"), [(None, 6), ((1, 4), 2)], ids=["every layer", "two layers"]
)
def test_layer_stacks_hold_one_array_per_projection_factor_at_any_depth(layers, depth):
    """The training state's layer stacks (`ByLayer`): 7 projections x (A, B) = 14 arrays of
    [adapters, layers with an adapter, ...] whatever the depth, which split back into the
    model's per-layer tree exactly."""
    config = dataclasses.replace(CONFIG, num_layers=6)
    deep = Model(config, init_params(config, seed=0))
    stack = _stack(deep, [lora.LoRAConfig(rank=4, layers=layers)] * 3)
    stacks, by_layer = ByLayer.of(stack.weights)
    assert len(stacks) == 14 and {s.shape[:2] for s in stacks} == {(3, depth)}
    # what a scanned step hands the model as it is: stacks of all 6 layers only
    assert by_layer.covers(6) == (layers is None) and not by_layer.covers(5)
    assert ("mlp", "down_proj", "lora_b", "value") in by_layer.layer_stacks(stacks)
    assert jax.tree.structure(by_layer.split(stacks)) == jax.tree.structure(stack.weights)
    split, whole = by_layer.split(stacks), stack.weights
    for a, b in zip(jax.tree.leaves(split), jax.tree.leaves(whole), strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(by_layer.join(stack.weights), stacks, strict=True):
        np.testing.assert_array_equal(a, b)


def test_scanned_job_equals_unrolled_with_distillation(tmp_path):
    """`model.scan_layers: true` through a whole job (its step hands the scan the training
    state's layer stacks): an NTP group and a distilling group (release_b, which reads the
    student's hidden states too), with dropout, train the unrolled job's adapters."""
    changes = {
        "data": {"dataset": "phonebook", "size_tokens": 160, "max_length": 48,
                 "units": "sectors", "unit_count": 2, "chat_template": False},
        "training": {"steps": 4, "batch_size": 4, "lr": 3e-3, "log_every": 2},
        "distill": {"preset": "release_b", "temperature": 1.0, "teacher": "step"},
        "sweep": {"training.objective": ["ntp", "distill"]},
    }  # fmt: skip
    out = {}
    for scan in ("false", "true"):
        config = load_config(
            write_config(tmp_path / f"{scan}.yaml", **changes), [f"model.scan_layers={scan}"]
        )
        run(config, tmp_path / scan)
        out[scan] = adapters(tmp_path / scan)
    assert len(out["true"]) == 4
    # the same float32 operations in another loop structure: rounding only (see runs.py)
    assert_equal_to_rounding(out["true"], out["false"], rounding_bound(config))
