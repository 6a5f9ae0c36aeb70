"""The serving engine's decoding passes compiled for one TPU chip (`jaxlora.aot`'s compile-only
devices): what `Engine(grouped=None)` chooses between on a TPU, sized by the TPU compiler.

A pass of B rows (prompts of `width` tokens, `new_tokens` more) over a library of G adapters of
one rank on every linear module, float32 as a server holds them:

- *per row* (`engine._routed_decode`): each row's adapter gathered into a stack of B one-row
  adapters, the model vmapped over it;
- *grouped over U* (`grouped.decode_active`): the pass's U distinct adapters gathered once,
  every adapted projection one `ragged_dot` over them, for each U of `active`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh

from jaxlora.aot import Program, _adapter_stack, _sharded, _variables, topology_devices
from jaxlora.generate import DecodeSpec
from jaxlora.grouped import decode_active
from jaxlora.llm.engine import _routed_decode
from jaxlora.lora import LINEAR_MODULES
from jaxlora.models.model import abstract_module, model_config, parse_dtype
from jaxlora.models.transformer import LoRAPlacement
from jaxlora.sharding import MESH_AXES


def serving_programs(
    model: str,
    topology: str,
    *,
    adapters: int,
    rows: int,
    rank: int,
    width: int,
    new_tokens: int,
    active: Sequence[int],
    dtype: str = "bfloat16",
) -> list[Program]:
    """[per row, grouped over U for U in `active`] for one chip of `topology`."""
    chip = topology_devices(topology)[0]
    mesh = Mesh(np.asarray([chip]).reshape(1, 1, 1), MESH_AXES)
    c, dt = model_config(model), parse_dtype(dtype)
    placement = LoRAPlacement(rank, frozenset(LINEAR_MODULES))
    spec = DecodeSpec(new_tokens, tuple(c.eos_token_ids) or (0,), c.pad_token_id or 0)

    def array(shape, kind):
        return _sharded(jax.ShapeDtypeStruct(shape, kind), mesh, (None,) * len(shape))

    prompts = (array((rows, width), jnp.int32), array((rows, width), bool))
    base = _variables(abstract_module(c, None, dt, dt)[3], mesh)
    graph, w_one, c_one, _ = abstract_module(c, placement, dt, dt)
    weights, consts = _adapter_stack(w_one, c_one, adapters, mesh)
    programs = [
        Program(
            "per row",
            _routed_decode,
            (graph, base, weights, consts, array((rows,), jnp.int32), *prompts, spec, None, mesh),
            0.0,
            0.0,
            mesh,
        )
    ]
    for u in active:
        g_graph = abstract_module(c, dataclasses.replace(placement, groups=u), dt, dt)[0]
        groups = (array((u,), jnp.int32), array((u,), jnp.int32))
        programs.append(
            Program(
                f"grouped U={u}",
                decode_active,
                (g_graph, base, weights, consts, *groups, *prompts, spec, None, mesh),
                0.0,
                0.0,
                mesh,
            )
        )
    return programs
