"""Grouped LoRA products: each row of a batch through its own adapter of a library (what
Punica's BGMV and S-LoRA do for many-adapter serving).

The rows are sorted by adapter, so adapter g takes a contiguous block of `rows[g]` rows
(zero for an adapter no row uses). Each product is one `jax.lax.ragged_dot` of the batch's
tokens against the library's stacked factors [G, in, R] and [G, R, out]. On a TPU it lowers to
a grouped-matmul kernel; XLA:CPU lowers it to a dense product masked per group, whose work
grows with G. Which of grouping and a per-row gather costs less depends on how many rows share
an adapter (measured: benchmarks/README.md; `jaxlora.llm.engine.Engine` chooses per pass).

The layer holding the library is `LoRALinear` with `groups` set; sorting the rows and building
the library from an adapter stack is `jaxlora.grouped`'s (this module knows arrays, not
stacks).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

Array = jax.Array


def row_adapters(rows_G: Array, batch: int) -> Array:
    """Each row's adapter [batch] from the sorted rows' counts per adapter [G]."""
    groups = jnp.arange(rows_G.shape[0], dtype=jnp.int32)
    return jnp.repeat(groups, rows_G, total_repeat_length=batch)


def product(x: Array, a_GIR: Array, b_GRO: Array, scale_G: Array, rows_G: Array) -> Array:
    """s_g x A_g B_g [B, ..., out] for every row of x [B, ..., in], g its adapter, in x's
    dtype. The scale multiplies the rank-R intermediate, as `LoRALinear` does."""
    batch, per_row = x.shape[0], math.prod(x.shape[1:-1])
    sizes = (rows_G * per_row).astype(jnp.int32)
    flat = x.reshape(-1, x.shape[-1])
    scale = scale_G[row_adapters(rows_G, batch)].astype(x.dtype)
    u = jax.lax.ragged_dot(flat, a_GIR.astype(x.dtype), sizes)
    u = (u.reshape(batch, per_row, -1) * scale[:, None, None]).reshape(flat.shape[0], -1)
    out = jax.lax.ragged_dot(u, b_GRO.astype(x.dtype), sizes)
    return out.reshape(*x.shape[:-1], out.shape[-1])
