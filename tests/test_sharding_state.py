"""What `fsdp` splits besides the base: every LoRA matrix (its rank where its model-side
dimension does not take fsdp), the AdamW moments as their weights, and evaluation's decoding
(each adapter's prompts and KV cache over fsdp, data parallel). Placement never changes the
numbers: the training step on adapter 4 x fsdp 2 equals one device in tests/test_train.py
(`test_sharded_over_eight_devices_equals_one_device`, whose rank 8 now splits over fsdp); the
decoding here equals one device's.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

import jaxlora
from jaxlora import lora
from jaxlora.config import parse_config
from jaxlora.generate import DecodeSpec, decode_stack, decode_stack_for
from jaxlora.sharding import make_mesh
from jaxlora.sweep import SweepJob
from jaxlora.train import map_opt_state
from tests.runs import BASE


def test_lora_weights_and_their_adamw_moments_split_over_fsdp(tmp_path):
    config = parse_config(
        {
            **BASE,
            "lora": {"rank": 8, "dropout": 0.0},  # rank 8: divisible by fsdp = 4
            "mesh": {"adapter": 2, "fsdp": 4, "tensor": 1},
            "sweep": {"data.seed": [0, 1]},
        }
    )
    job = SweepJob(config, tmp_path / "run", progress=False, devices=jax.devices()[:8])
    (group,) = job.init_state().groups
    pairs, counts = [], []
    map_opt_state(group.opt, lambda m, w: pairs.append((m, w)), counts.append, list(group.weights))
    assert len(pairs) == 2 * len(group.weights)  # mu and nu of every stack
    for moment, weights in pairs:
        spec = weights.sharding.spec
        assert spec[0] == "adapter" and "fsdp" in spec, spec  # [A, L, in, out]
        assert moment.sharding == weights.sharding
        # a device holds an eighth: half the adapters, a quarter of each matrix
        assert moment.addressable_shards[0].data.size * 8 == moment.size
    assert counts and all(c.sharding.spec == PartitionSpec("adapter") for c in counts)


def _random_b(stack: lora.AdapterStack) -> lora.AdapterStack:
    """B = 0 would make every adapter the base: random B, so the adapters differ."""
    paths = [p for p, _ in nnx.to_flat_state(stack.weights) if p[-1] == "lora_b"]

    def fill(path, var):
        if path[-1] != "lora_b":
            return var
        x = var.get_value()
        key = jax.random.fold_in(jax.random.key(0), paths.index(path))
        return var.replace(jax.device_put(0.3 * jax.random.normal(key, x.shape), x.sharding))

    return lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )


def test_decoding_on_an_fsdp_mesh_equals_one_device():
    """2 adapters x 8 prompts on adapter 2 x fsdp 4: each device decodes 2 prompts of one
    adapter with a KV cache of its 2 rows, and the continuations are one device's."""
    mesh = make_mesh(2, 4, 1, devices=jax.devices()[:8])
    model = jaxlora.load_pretrained("tiny-llama", mesh=mesh)
    configs = [lora.LoRAConfig(rank=4, alpha=8.0), lora.LoRAConfig(rank=4, alpha=16.0)]
    stack = _random_b(lora.init_adapters(model, configs, [1, 2]))
    A, B, T = 2, 8, 12
    tokens = np.random.default_rng(0).integers(3, model.config.vocab_size, (A, B, T))
    mask = np.ones((A, B, T), bool)
    mask[:, ::3, :4] = False  # left padding on some rows
    spec = DecodeSpec(10, (), 0)  # no end-of-sequence: every row runs all 10 steps
    rows = NamedSharding(mesh, PartitionSpec("adapter", "fsdp"))
    args = (
        model.graph(stack.placement),
        model.params,
        stack.weights,
        stack.consts,
        jax.device_put(jnp.asarray(tokens, jnp.int32), rows),
        jax.device_put(jnp.asarray(mask), rows),
        spec,
    )
    sharded = np.asarray(decode_stack(*args))
    one = jax.devices()[0]
    on_one = jax.tree.map(lambda x: jax.device_put(x, one) if isinstance(x, jax.Array) else x, args)
    alone = np.asarray(decode_stack(*on_one))
    # float32 sums split over 4 devices round differently; greedy tokens of a random tiny
    # model are far from ties (margins ~1e-2, rounding ~1e-6), so they agree exactly.
    np.testing.assert_array_equal(sharded, alone)
    # The program traced for the mesh keeps each device's rows: a cache [A/2, B/4, K, S, H].
    hlo = decode_stack_for.lower(*args, None, mesh).compile().as_text()
    c = model.config
    local = rf"\[1,2,{c.num_kv_heads},{T + spec.max_new_tokens},{c.head_dim}\]"
    whole = rf"\[1,{B},{c.num_kv_heads},{T + spec.max_new_tokens},{c.head_dim}\]"
    assert re.search(local, hlo) and not re.search(whole, hlo)
