"""Activations follow the mesh: on a fsdp=4 mesh no device holds a whole batch's activations or
logits (`sharding.constrain` at block boundaries and in the loss), and with no mesh nothing
changes. That the numbers stay those of one device: tests/test_train.py (sharded == unsharded).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp

from benchmarks.tpu_fit import abstract_step
from jaxlora import sharding
from jaxlora.models.presets import PRESETS
from jaxlora.sharding import make_mesh

B, T = 8, 16  # per adapter; fsdp = 4 leaves 2 rows per device


def _whole_batch_buffers(step_mesh: bool) -> set[str]:
    """Float buffers of the compiled step (per device, after partitioning) that hold a whole
    batch: B rows of T or T - 1 (the loss's targets) positions of a whole model, MLP or vocab
    width. (The embedding lookup gives [B, T, D / fsdp] pieces, sharded along D by the table's
    own layout before the constraint moves them: a quarter each, not counted.)"""
    c = PRESETS["tiny-llama"].config
    widths = "|".join(str(w) for w in (c.hidden_size, c.intermediate_size, c.vocab_size))
    mesh = make_mesh(2, 4, 1, devices=jax.devices()[:8])
    step, inputs = abstract_step(
        "tiny-llama", mesh, adapters=2, batch=B, seq=T, scan=False, step_mesh=step_mesh
    )
    hlo = step.lower(*inputs).compile().as_text()
    shapes = set(re.findall(r"(?:f32|bf16)\[([\d,]+)\]", hlo))
    return {s for s in shapes if re.search(rf"(^|,){B},({T}|{T - 1}),({widths})$", s)}


def test_a_fsdp_mesh_never_holds_a_whole_batch_of_activations():
    assert not _whole_batch_buffers(step_mesh=True)
    # The step without its mesh (no constraints): the partitioner keeps whole batches, the
    # [B, T, D] and [B, T, F] activations, so the check above can fail.
    assert _whole_batch_buffers(step_mesh=False)


def test_with_no_mesh_nothing_is_constrained():
    x = jnp.ones((B, T, 4))
    assert sharding.constrain(x, ("batch", "seq", None)) is x
    with sharding.compiling_for(None):
        assert sharding.constrain(x, ("batch", "seq", None)) is x
        assert sharding.target_platform() == jax.default_backend()
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    with sharding.compiling_for(mesh):
        assert sharding.target_platform() == "cpu"
        y = jax.jit(lambda x: sharding.constrain(x, ("batch", "seq", "mlp")))(x)
    assert y.sharding.spec == jax.sharding.PartitionSpec("fsdp", None, "tensor")
