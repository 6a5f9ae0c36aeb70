"""Arrow: a library of LoRA adapters routed per token, without training (PEFT's `ArrowConfig`
and `create_arrow_model`; the math is `jaxlora.models.arrow`'s).

`arrow_library(model, stack, top_k)` turns an `AdapterStack` of E adapters into an
`ArrowLibrary`: one adapter (PEFT's `arrow_router`) whose every adapted projection holds the E
experts' factors, scales and prototypes, so it goes wherever a stack of one adapter goes --
`model(ids[None], adapters=library)`, `generate_stack`, `decode_stack` with
`model.graph(library.placement)`. `arrow_logits` and `generate_arrow` are those calls for a
batch [B, T].

GenKnowSub (PEFT's `use_gks`; https://aclanthology.org/2025.acl-short.54/): the `general`
adapters' mean A and mean B are subtracted from every expert's A and B before the prototypes
are taken, as PEFT does (factor by factor, not dW; so every adapter must share rank, targets
and layers).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import LoRAError
from jaxlora.generate import Sampling, generate_stack
from jaxlora.lora import AdapterStack
from jaxlora.models.arrow import ArrowSpec, prototypes
from jaxlora.models.model import Model
from jaxlora.models.transformer import LoRAPlacement, abstract_module

Array = jax.Array


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class ArrowLibrary:
    """E LoRA adapters as one Arrow-routed adapter. Leaves carry a leading adapter axis of 1
    (a stack of one): `lora_a` [1, E, in, R], `lora_b` [1, E, R, out], `lora_scale` [1, E],
    `lora_proto` [1, E, in]. `placement` (its `arrow` set) builds the graph; `names` are the
    experts'."""

    weights: nnx.State
    consts: nnx.State
    placement: LoRAPlacement = dataclasses.field(metadata=dict(static=True))
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

    def __len__(self) -> int:
        return 1

    @property
    def spec(self) -> ArrowSpec:
        return self.placement.arrow


_prototypes = jax.jit(prototypes)


def _general_means(stack: AdapterStack, general: AdapterStack) -> dict[tuple, Array]:
    """GenKnowSub's mean A and mean B of the general adapters, by factor path (checked: every
    adapter of both stacks has one rank, targets and layers, as PEFT requires)."""
    configs = stack.configs + general.configs
    shape = {(c.rank, c.targets, c.layers) for c in configs}
    if len(shape) > 1:
        raise LoRAError(
            "GenKnowSub subtracts the general adapters' mean A and B from each expert: every "
            "adapter needs the same rank, targets and layers"
        )
    return {
        path: jnp.mean(var.get_value(), axis=0)
        for path, var in nnx.to_flat_state(general.weights)
        if path[-1] in ("lora_a", "lora_b")
    }


def arrow_library(
    model: Model,
    stack: AdapterStack,
    top_k: int,
    temperature: float = 1.0,
    *,
    general: AdapterStack | None = None,
) -> ArrowLibrary:
    """The adapters of `stack` as an Arrow library: every token of every adapted projection
    takes the `top_k` experts whose prototypes it aligns with most, mixed by a softmax at
    `temperature`. `general`: GenKnowSub's general adapters, subtracted first. Plain LoRA
    adapters only (PEFT's Arrow takes no DoRA, PiSSA or OLoRA adapters either); adapters of
    different ranks or targets share the library zero-padded (an expert scores 0 and adds
    nothing where it has no factors)."""
    if len(stack) == 0:
        raise LoRAError("Arrow needs a library of at least one adapter; the stack is empty")
    odd = [n for n, c in zip(stack.names, stack.configs, strict=True) if c.residual or c.use_dora]
    if odd:
        raise LoRAError(
            f"Arrow routes plain LoRA adapters; {odd[0]} is a PiSSA/OLoRA or DoRA adapter"
        )
    spec = ArrowSpec(len(stack), top_k, float(temperature))
    placement = dataclasses.replace(stack.placement, arrow=spec)
    _, w_abs, c_abs, _ = abstract_module(model.config, placement, model.dtype, model.param_dtype)
    have_w = dict(nnx.to_flat_state(stack.weights))
    have_c = dict(nnx.to_flat_state(stack.consts))
    means = {} if general is None else _general_means(stack, general)

    def factor(path) -> Array:
        x = have_w[path].get_value()
        return x - means[path] if path in means else x

    def weight(path, var):
        return var.replace(factor(path)[None])

    def const(path, var):
        module = path[:-1]
        if path[-1] == "lora_proto":
            a, b = factor((*module, "lora_a")), factor((*module, "lora_b"))
            return var.replace(_prototypes(a, b)[None])
        return var.replace(jnp.asarray(have_c[path].get_value())[None])

    return ArrowLibrary(
        nnx.map_state(weight, w_abs), nnx.map_state(const, c_abs), placement, stack.names
    )


def arrow_logits(
    model: Model, library: ArrowLibrary, input_ids_BT, attention_mask_BT=None
) -> Array:
    """float32 logits [B, T, V] of the Arrow-routed model."""
    ids = np.asarray(input_ids_BT)
    mask = None if attention_mask_BT is None else np.asarray(attention_mask_BT)[None]
    return model(ids[None], attention_mask=mask, adapters=library)[0]


def generate_arrow(
    model: Model,
    library: ArrowLibrary,
    input_ids_BT,
    attention_mask_BT=None,
    *,
    max_new_tokens: int = 50,
    eos_token_ids: Sequence[int] | None = None,
    sampling: Sampling | Sequence[Sampling] | None = None,
    seed: int | Sequence[int] = 0,
) -> np.ndarray:
    """Continuations [B, max_new_tokens] of prompts [B, T] by the Arrow-routed model (greedy,
    or sampled as in `jaxlora.generate.generate`)."""
    ids = np.asarray(input_ids_BT)
    mask = None if attention_mask_BT is None else np.asarray(attention_mask_BT)[None]
    out = generate_stack(
        model,
        library,
        ids[None],
        mask,
        max_new_tokens=max_new_tokens,
        eos_token_ids=eos_token_ids,
        sampling=sampling,
        seed=seed,
    )
    return out[0]
