"""Many adapters in one batch, each row through its own, grouped by adapter.

`grouped_logits(model, stack, adapter_ids, ids)` and `generate_grouped(...)` give what
`jaxlora.lora.routed_logits` and `jaxlora.generate.generate_routed` give: row b of the batch
runs with adapter `adapter_ids[b]` of the stack. Those gather each row's adapter into a stack
of B one-row adapters (B copies of the factors) and vmap the model over it. Here the rows are
sorted by adapter and the model runs once over the batch, every adapted projection holding a
library of adapters (`LoRAPlacement.groups`, `jaxlora.models.grouped`) through which each
adapter's rows go in one grouped product. Outputs come back in the rows' order.
`decode_active` is the engine's: it gathers only the U distinct adapters of a pass (U copies,
not B) and decodes over them.

Stacks with DoRA adapters are not grouped (`groupable`): their per-output norms would be
computed for every adapter of the library at every step; they decode per row.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence

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
    """Rows sorted by adapter: `order` (row i of the sorted batch is row order[i]) and `rows`
    [G] (how many rows each adapter of the stack takes)."""

    order: np.ndarray
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
        order = np.argsort(ids, kind="stable")
        return cls(order, np.bincount(ids, minlength=num_adapters).astype(np.int32))

    def sort(self, x: np.ndarray) -> np.ndarray:
        return np.asarray(x)[self.order]

    def unsort(self, x) -> np.ndarray:
        out = np.empty_like(np.asarray(x))
        out[self.order] = np.asarray(x)
        return out


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


def library(model: Model, stack: AdapterStack, rows) -> tuple[nnx.GraphDef, nnx.State, nnx.State]:
    """(graph, weights, consts) of the model holding the whole `stack` as a grouped library,
    the sorted batch taking rows[g] rows of adapter g: the stack's own weights and consts,
    plus `lora_rows`."""
    graph = library_graph(model, stack, len(stack))
    return graph, stack.weights, with_rows(stack.consts, rows)


def active_set(slots: Sequence[int], bucket: Callable[[int], int]) -> tuple[np.ndarray, np.ndarray]:
    """(adapters, rows) of a pass whose rows, sorted, use adapters `slots`: the distinct
    adapters in order, padded to `bucket(count)` groups by repeating the last (with no rows),
    and each one's number of rows."""
    active, rows = np.unique(np.asarray(slots), return_counts=True)
    pad = bucket(len(active)) - len(active)
    return np.concatenate([active, np.repeat(active[-1:], pad)]), np.pad(rows, (0, pad))


@functools.partial(jax.jit, static_argnames=("graphdef", "spec"))
def decode_active(graphdef, base, weights, consts, active, rows, tokens, mask, spec, sampler):
    """Decoding of sorted rows [B, T] over the pass's active adapters: `active` [U] of the
    stack gathered once (U copies, not one per row), a grouped library of U with rows[u]
    rows each (`library_graph(..., U)`)."""
    w = jax.tree.map(lambda x: x[active], weights)
    c = with_rows(jax.tree.map(lambda x: x[active], consts), rows)
    return _generate_base(graphdef, base, tokens, mask, spec, sampler, w, c)


@functools.partial(jax.jit, static_argnames="graphdef")
def _forward(graphdef, base, weights, consts, tokens_BT, mask_BT):
    return nnx.merge(graphdef, weights, consts, base)(tokens_BT, mask_BT)[0]


def grouped_logits(
    model: Model, stack: AdapterStack, adapter_ids, input_ids_BT, attention_mask_BT=None
) -> Array:
    """Logits [B, T, V] of row b with adapter `adapter_ids[b]`, in the rows' order."""
    ids = np.asarray(input_ids_BT)
    mask = np.ones(ids.shape, bool) if attention_mask_BT is None else np.asarray(attention_mask_BT)
    grouping = Grouping.of(adapter_ids, len(stack), ids.shape[0])
    graph, weights, consts = library(model, stack, grouping.rows)
    logits = _forward(
        graph,
        model.params,
        weights,
        consts,
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
    graph, weights, consts = library(model, stack, grouping.rows)
    out = _generate_base(
        graph,
        model.params,
        jnp.asarray(grouping.sort(tokens), jnp.int32),
        jnp.asarray(grouping.sort(mask)),
        DecodeSpec(max_new_tokens, eos, pad),
        sampler,
        weights,
        consts,
    )
    return grouping.unsort(out)
