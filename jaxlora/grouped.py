"""Many adapters in one batch, each row through its own, grouped by adapter.

`grouped_logits(model, stack, adapter_ids, ids)` and `generate_grouped(...)` give what
`jaxlora.lora.routed_logits` and `jaxlora.generate.generate_routed` give: row b of the batch
runs with adapter `adapter_ids[b]` of the stack. Those gather each row's adapter into a stack
of B one-row adapters (B copies of the factors) and vmap the model over it. Here the rows are
sorted by adapter and the model runs once over the batch, every adapted projection holding a
library of the batch's U distinct adapters (`Grouping`: U copies of the factors, not B;
`LoRAPlacement.groups`, `jaxlora.models.grouped`) through which each adapter's rows go in one
grouped product. Outputs come back in the rows' order. The serving engine calls
`decode_active` and `grouped_logits` the same way on its passes.

Stacks with DoRA adapters are not grouped (`groupable`): their per-output norms would be
computed for every adapter of the library at every step; they decode per row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import LoRAError
from jaxlora.generate import (
    DecodeSpec,
    Sampling,
    _generate_base,
    eos_and_pad,
    left_align,
    make_sampler,
)
from jaxlora.lora import AdapterStack
from jaxlora.models.layers import LoRAConst
from jaxlora.models.model import Model
from jaxlora.models.transformer import LoRAPlacement

Array = jax.Array


def weights_placement(stack: AdapterStack, num_layers: int) -> LoRAPlacement:
    """The placement a stack's weights are laid out for. The union of its configs can be
    smaller (a `select`ed adapter keeps the padding of the stack it came from), and the
    compiled graph must match the weights, not the configs."""
    paths = [(p, v.get_value().shape) for p, v in nnx.to_flat_state(stack.weights)]
    layers = frozenset(p[1] for p, _ in paths)
    return LoRAPlacement(
        rank=max(shape[-1] for p, shape in paths if p[-1] == "lora_a"),
        modules=frozenset(p[3] for p, _ in paths),
        layers=None if len(layers) == num_layers else layers,
        residual=any(p[-1] == "lora_a0" for p, _ in nnx.to_flat_state(stack.consts)),
        dora=any(p[-1] == "lora_magnitude" for p, _ in paths),
    )


def groupable(stack: AdapterStack) -> bool:
    """Whether the stack's rows can run grouped: no DoRA adapter in it."""
    return not any(p[-1] == "lora_magnitude" for p, _ in nnx.to_flat_state(stack.weights))


@dataclasses.dataclass(frozen=True)
class Grouping:
    """A batch's rows sorted by adapter. Row i of the sorted batch is row order[i]; the sorted
    batch runs over the library `active` [U] (its distinct adapters in order, padded to a power
    of two by repeating the last, so that few library sizes compile), adapter active[u] taking
    rows[u] consecutive rows (0 for the padding)."""

    order: np.ndarray
    active: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, adapter_ids, num_adapters: int, batch: int) -> Grouping:
        """The grouping of a batch of `batch` rows, row b on adapter adapter_ids[b]."""
        ids = np.asarray(adapter_ids)
        if ids.ndim != 1 or len(ids) == 0 or ids.min() < 0 or ids.max() >= num_adapters:
            raise LoRAError(
                f"adapter_ids must be a list of indices in [0, {num_adapters}); got {ids.tolist()}"
            )
        if len(ids) != batch:
            raise LoRAError(f"{batch} rows need as many adapter ids, got {len(ids)}")
        active, rows = np.unique(ids, return_counts=True)
        pad = (1 << (len(active) - 1).bit_length()) - len(active)
        return cls(
            np.argsort(ids, kind="stable"),
            np.concatenate([active, np.repeat(active[-1:], pad)]).astype(np.int32),
            np.pad(rows, (0, pad)).astype(np.int32),
        )

    def sort(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[self.order]

    def unsort(self, x) -> np.ndarray:
        out = np.empty_like(np.asarray(x))
        out[self.order] = np.asarray(x)
        return out

    def graph(self, model: Model, stack: AdapterStack) -> nnx.GraphDef:
        """The model's graph holding this grouping's library of `stack`'s adapters."""
        return library_graph(model, stack, len(self.active))


def with_rows(consts: nnx.State, rows) -> nnx.State:
    """A library's consts with `lora_rows` beside every adapted projection's scale."""
    rows = jnp.asarray(rows, jnp.int32)
    flat = list(nnx.to_flat_state(consts))
    flat += [((*p[:-1], "lora_rows"), LoRAConst(rows)) for p, _ in flat if p[-1] == "lora_scale"]
    return nnx.from_flat_state(flat)


def library_graph(model: Model, stack: AdapterStack, groups: int) -> nnx.GraphDef:
    """The model's graph with every adapted projection holding a library of `groups` adapters
    laid out as the stack's."""
    if not groupable(stack):
        raise LoRAError("a stack with DoRA adapters cannot run grouped; decode it per row")
    placement = weights_placement(stack, model.config.num_layers)
    return model.graph(dataclasses.replace(placement, groups=groups))


def _library(weights, consts, active, rows) -> tuple[nnx.State, nnx.State]:
    """The stack's adapters `active` [U] gathered once (inside the compiled program), with
    rows[u] sorted rows each."""
    w = jax.tree.map(lambda x: x[active], weights)
    return w, with_rows(jax.tree.map(lambda x: x[active], consts), rows)


@functools.partial(jax.jit, static_argnames=("graphdef", "spec", "mesh"))
def decode_active(
    graphdef, base, weights, consts, active, rows, tokens, mask, spec, sampler, mesh=None
):
    """Decoding of sorted rows [B, T] over the library `active` [U] of the stack with rows[u]
    rows each (a `Grouping`'s; `graphdef` its `graph`), traced for `mesh` (`_generate_base`)."""
    w, c = _library(weights, consts, active, rows)
    return _generate_base(graphdef, base, tokens, mask, spec, sampler, w, c, mesh)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward_active(graphdef, base, weights, consts, active, rows, tokens_BT, mask_BT):
    w, c = _library(weights, consts, active, rows)
    return nnx.merge(graphdef, w, c, base)(tokens_BT, mask_BT)[0]


def grouped_logits(
    model: Model, stack: AdapterStack, adapter_ids, input_ids_BT, attention_mask_BT=None
) -> Array:
    """Logits [B, T, V] of row b with adapter `adapter_ids[b]`, in the rows' order."""
    ids = np.asarray(input_ids_BT)
    mask = np.ones(ids.shape, bool) if attention_mask_BT is None else np.asarray(attention_mask_BT)
    grouping = Grouping.of(adapter_ids, len(stack), ids.shape[0])
    logits = _forward_active(
        grouping.graph(model, stack),
        model.params,
        stack.weights,
        stack.consts,
        jnp.asarray(grouping.active),
        jnp.asarray(grouping.rows),
        jnp.asarray(grouping.sort(ids), jnp.int32),
        jnp.asarray(grouping.sort(mask), bool),
    )
    return logits[jnp.asarray(np.argsort(grouping.order))]


def generate_grouped(
    model: Model,
    stack: AdapterStack,
    adapter_ids,
    input_ids_BT,
    attention_mask_BT=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Continuations [B, max_new_tokens]: row b continues with adapter `adapter_ids[b]`
    (greedy, or sampled as in `jaxlora.generate.generate`, each row with its own key: one
    seed gives row b fold_in(key(seed), b), whatever its place in the sorted batch)."""
    ids = np.asarray(input_ids_BT)
    mask = np.ones(ids.shape, bool) if attention_mask_BT is None else np.asarray(attention_mask_BT)
    tokens, mask = left_align(ids, mask)
    grouping = Grouping.of(adapter_ids, len(stack), ids.shape[0])
    sampler = None
    if sampling is not None:
        sampler = make_sampler(sampling, seed, tokens.shape[:1])
        sampler = jax.tree.map(lambda x: x[jnp.asarray(grouping.order)], sampler)
    eos, pad = eos_and_pad(model.tokenizer, model.config, eos_token_ids)
    out = decode_active(
        grouping.graph(model, stack),
        model.params,
        stack.weights,
        stack.consts,
        jnp.asarray(grouping.active),
        jnp.asarray(grouping.rows),
        jnp.asarray(grouping.sort(tokens), jnp.int32),
        jnp.asarray(grouping.sort(mask)),
        DecodeSpec(max_new_tokens, eos, pad),
        sampler,
    )
    return grouping.unsort(out)
