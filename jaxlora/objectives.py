"""What an adapter learns: next-token prediction, or distillation from the base with context.

**NTP** (`token_mean_ce`): cross-entropy of the loss mask's targets, averaged over them. The
training step computes it from the final hidden states a chunk of positions at a time
(`chunked_token_mean_ce`), so no step holds a whole batch's [B, T, V] logits. Distillation
still does (its KL reads the teacher's logits, cached or computed, over the whole sample).

**Distillation** ("knowledge modules", docs/study.md §6): the teacher is the frozen base model with
the adapter's unit (its document or chunk) in context before the sample; the student is the
base plus the adapter on the sample alone. The student learns to behave, without the document,
as the base does with it:

    loss = kl_weight * KL(teacher || student) [x T^2] + l1_weight * L1(hidden states)

- Alignment. The teacher reads `context ++ sample[offset:]`, where `offset` is 1 when the
  samples begin with the tokenizer's BOS (the context then begins with it instead, so the
  sequence has one BOS) and 0 otherwise. Teacher position `C - offset + j` (C the context
  width, left-padded) has read the document and then the same sample tokens as student
  position j, so both predict sample token j + 1. The context is left-padded and positions
  count real tokens, so every row's document sits right before its sample.
- Positions. Position j counts when token j + 1 is a target: the loss mask's targets
  (`response_only`, the response of a chat sample, or what `data.loss_mask` trains) or every
  real token of the sample. KL and L1 use the same positions.
- KL per position at temperature T, `sum_v p_t (log p_t - log p_s)` with p = softmax(logits / T),
  averaged over positions; times T^2 with `t_squared`.
- L1 over the chosen hidden states (transformers' `output_hidden_states` indices: 0 the
  embeddings, num_layers the final-norm output): per state k the ratio
  `sum |s_k - t_k| / sum |t_k|` over positions and features (= mean|s - t| / mean|t|); the
  ratios averaged over states (`layer_mean`), or all sums pooled first (`sum_ratio`).

The teacher never sees a LoRA weight and is outside the gradient: the step computes it per
pass (`teacher_outputs`), which costs one more base forward of context + sample per adapter
and step but no activation memory for the backward pass.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.errors import ConfigError
from jaxlora.sharding import constrain

Array = jax.Array


def token_mean_ce(logits_BTV: Array, tokens_BT: Array, loss_BT: Array) -> Array:
    """Next-token cross-entropy averaged over the target tokens (loss mask of the *targets*)."""
    logits = logits_BTV[:, :-1].astype(jnp.float32)
    targets = tokens_BT[:, 1:]
    weights = loss_BT[:, 1:].astype(jnp.float32)
    logz = jax.nn.logsumexp(logits, axis=-1)
    picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return jnp.sum((logz - picked) * weights) / jnp.maximum(jnp.sum(weights), 1.0)


# Logits per chunk of the chunked loss, per adapter (float32: 32 MiB): an 8B model's batch of
# 8 rows over a 128K vocabulary takes 8 positions per chunk; a small vocabulary takes the whole
# sequence in one chunk, exactly the plain loss.
LOSS_CHUNK_LOGITS = 2**23


def loss_chunk(B: int, T: int, V: int) -> int:
    """Positions per chunk of `chunked_token_mean_ce` for a [B, T] batch over V logits."""
    return max(1, min(T - 1, LOSS_CHUNK_LOGITS // (B * V)))


def chunked_token_mean_ce(
    head: Callable[[Array], Array], hidden_BTD: Array, tokens_BT: Array, loss_BT: Array, chunk: int
) -> Array:
    """`token_mean_ce(head(hidden), tokens, loss)` that never holds the whole [B, T, V] logits.

    `head` maps final-norm hidden states [B, c, D] to float32 logits [B, c, V]. The targets are
    taken `chunk` positions at a time (`lax.map`), each chunk's logits computed, reduced to its
    summed loss and dropped; the chunk is rematerialised (`jax.checkpoint`), so the backward
    pass recomputes one chunk's logits at a time instead of keeping them all. One chunk (a small
    vocabulary, `loss_chunk`) is the plain computation. Activations are pinned to the traced
    mesh's axes (`sharding.constrain`): batch over fsdp, vocabulary over tensor."""
    B, T, _ = hidden_BTD.shape
    x_BTD = hidden_BTD[:, :-1]
    targets_BT = tokens_BT[:, 1:]
    weights_BT = loss_BT[:, 1:].astype(jnp.float32)

    def summed(x_BcD, t_Bc, w_Bc):
        x_BcD = constrain(x_BcD, ("batch", "seq", None))
        logits = constrain(head(x_BcD).astype(jnp.float32), ("batch", "seq", "vocab"))
        logz = jax.nn.logsumexp(logits, axis=-1)
        picked = jnp.take_along_axis(logits, t_Bc[..., None], axis=-1)[..., 0]
        return jnp.sum((logz - picked) * w_Bc)

    n = -(-(T - 1) // chunk)
    if n == 1:
        total = summed(x_BTD, targets_BT, weights_BT)
    else:
        pad = n * chunk - (T - 1)  # padded positions weigh 0

        def chunks(x):  # [B, n c, ...] -> [n, B, c, ...]
            x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
            return jnp.moveaxis(x.reshape(B, n, chunk, *x.shape[2:]), 1, 0)

        xs = (chunks(x_BTD), chunks(targets_BT), chunks(weights_BT))
        one = jax.checkpoint(lambda xs: summed(*xs), prevent_cse=False)
        total = jnp.sum(jax.lax.map(one, xs))
    return total / jnp.maximum(jnp.sum(weights_BT), 1.0)


@dataclasses.dataclass(frozen=True)
class Distill:
    """Resolved distillation settings of a group of adapters (static in the compiled step)."""

    temperature: float
    kl_weight: float
    l1_weight: float
    layers: tuple[int, ...]  # hidden-state indices of the L1 term; () when l1_weight is 0
    l1_norm: str  # layer_mean | sum_ratio
    t_squared: bool
    response_only: bool

    @classmethod
    def from_section(cls, section, num_layers: int) -> Distill:
        """From a `distill:` config section (jaxlora.config.DistillSection) for a model of
        `num_layers` layers; an index beyond the model's hidden states is an error."""
        if section.layers == "all":
            layers = tuple(range(num_layers + 1))
        elif section.layers == "last":
            layers = (num_layers,)
        else:
            layers = tuple(section.layers)
            unknown = [i for i in layers if i > num_layers]
            if unknown:
                raise ConfigError(
                    f"distill.layers: no hidden state {unknown[0]}: this model has "
                    f"{num_layers} layers, so indices run 0 (embeddings) to {num_layers} "
                    "(final norm); use all, last or indices in that range"
                )
        return cls(
            temperature=section.temperature,
            kl_weight=section.kl_weight,
            l1_weight=section.l1_weight,
            layers=layers if section.l1_weight > 0 else (),
            l1_norm=section.l1_norm,
            t_squared=section.t_squared,
            response_only=section.response_only,
        )


def distill_loss(
    d: Distill,
    student_logits_BTV: Array,
    student_hidden_KBTD: Array | None,
    teacher_logits_BTV: Array,
    teacher_hidden_KBTD: Array | None,
    valid_BT: Array,
    loss_BT: Array,
) -> Array:
    """The distillation loss of one adapter's batch (teacher outputs aligned to the sample)."""
    counted = (loss_BT if d.response_only else valid_BT)[:, 1:].astype(jnp.float32)  # [B, T-1]
    n = jnp.maximum(jnp.sum(counted), 1.0)
    total = jnp.zeros((), jnp.float32)
    if d.kl_weight > 0:
        tau = d.temperature
        log_t = jax.nn.log_softmax(teacher_logits_BTV[:, :-1].astype(jnp.float32) / tau, -1)
        log_s = jax.nn.log_softmax(student_logits_BTV[:, :-1].astype(jnp.float32) / tau, -1)
        kl_BT = jnp.sum(jnp.exp(log_t) * (log_t - log_s), axis=-1)
        kl = jnp.sum(kl_BT * counted) / n * (tau**2 if d.t_squared else 1.0)
        total = total + d.kl_weight * kl
    if d.l1_weight > 0:
        s = student_hidden_KBTD[:, :, :-1].astype(jnp.float32)
        t = teacher_hidden_KBTD[:, :, :-1].astype(jnp.float32)
        num_K = jnp.einsum("KBTD,BT->K", jnp.abs(s - t), counted)
        den_K = jnp.einsum("KBTD,BT->K", jnp.abs(t), counted)
        if d.l1_norm == "layer_mean":
            l1 = jnp.mean(jnp.where(den_K > 0, num_K / jnp.where(den_K > 0, den_K, 1.0), 0.0))
        else:
            den = jnp.sum(den_K)
            l1 = jnp.where(den > 0, jnp.sum(num_K) / jnp.where(den > 0, den, 1.0), 0.0)
        total = total + d.l1_weight * l1
    return total


def teacher_outputs(
    graphdef,
    base: nnx.State,
    d: Distill,
    context_C: Array,
    context_valid_C: Array,
    tokens_BT: Array,
    valid_BT: Array,
    offset: int,
) -> tuple[Array, Array | None]:
    """The frozen base on `context ++ tokens[:, offset:]`: logits [B, T, V] and the chosen
    hidden states [K, B, T, D] at the sample's positions (see the module docstring), with no
    gradient. `graphdef` is the base model's (no LoRA)."""
    B, T = tokens_BT.shape
    C = context_C.shape[0]
    seq = jnp.concatenate([jnp.broadcast_to(context_C, (B, C)), tokens_BT[:, offset:]], axis=1)
    mask = jnp.concatenate(
        [jnp.broadcast_to(context_valid_C, (B, C)), valid_BT[:, offset:]], axis=1
    )
    module = nnx.merge(graphdef, base)
    start = C - offset
    if d.layers:
        logits, _, hidden = module(seq, mask, hidden_layers=d.layers)
        hidden = hidden[:, :, start : start + T]
    else:
        logits, hidden = module(seq, mask)[0], None
    out = logits[:, start : start + T], hidden
    return jax.tree.map(jax.lax.stop_gradient, out)


def student_loss(
    d: Distill,
    module,
    tokens_BT: Array,
    valid_BT: Array,
    loss_BT: Array,
    teacher: tuple[Array, Array | None],
    rng: Array | None,
    lora_stacks: dict[tuple, Array] | None = None,
) -> Array:
    """One adapter's distillation loss: `module` (base + adapter) on the sample alone;
    `lora_stacks` as `Transformer.__call__` takes them."""
    kw = dict(rng=rng, lora_stacks=lora_stacks)
    if d.layers:
        logits, _, hidden = module(tokens_BT, valid_BT, hidden_layers=d.layers, **kw)
    else:
        logits, hidden = module(tokens_BT, valid_BT, **kw)[0], None
    return distill_loss(d, logits, hidden, teacher[0], teacher[1], valid_BT, loss_BT)
