"""The training step: many independent adapters, one jitted function.

State is a tuple of *groups* (rank groups, or one padded group); each group holds a stack of
A_g adapters: LoRA weights, optimizer state and per-adapter hyperparameters. One step

1. evaluates every group's loss with `jax.vmap` over its adapters (base broadcast, never
   differentiated, never donated) and takes gradients of the *sum* of the per-adapter losses,
   so each adapter's gradient comes from its own loss alone (optionally in sequential passes
   over slices of the group, `training.adapters_per_pass`);
2. applies Optax AdamW per adapter, again under `vmap`: clipping by each adapter's own global
   norm, each adapter's own learning rate, warmup and weight decay (an lr sweep is one job).
   The weights are kept as layer stacks (`ByLayer`) and the update works on the stacks, a
   few operations whatever the number of layers, which keeps a scanned deep model's compile
   from growing with the per-leaf work of layers x projections. The AdamW moments are stacks
   too, each split over the mesh as its weights are (adapter, and fsdp: `sharding.RULES`), so
   a device holds its share of every adapter's optimizer state, never a whole adapter's;
3. freezes any adapter whose loss or gradients are not finite (its update is masked inside the
   step, and it stays frozen), leaving its neighbours untouched.

The learning-rate schedules follow transformers' `get_cosine_schedule_with_warmup` and
`get_linear_schedule_with_warmup` (warmup steps = ceil(ratio * steps)), so one adapter trained
here follows the study's PEFT + HF recipe update for update.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.models.transformer import path_keys
from jaxlora.objectives import (
    Distill,
    chunked_token_mean_ce,
    loss_chunk,
    student_loss,
    teacher_outputs,
)
from jaxlora.sharding import compiling_for

Array = jax.Array
Schedule = Literal["cosine", "linear", "constant"]
# The LoRA weights that LoRA+ trains at `lr_ratio` times the learning rate: PEFT's group B
# (`create_loraplus_optimizer`: the B factors and every 1-D parameter, DoRA's magnitudes).
FAST_FACTORS = frozenset({"lora_b", "lora_magnitude"})


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Hyper:
    """Per-adapter optimizer hyperparameters; every leaf is [A] (or a scalar for one adapter)."""

    lr: Array
    warmup_ratio: Array
    weight_decay: Array
    clip_norm: Array  # +inf: no clipping
    b1: Array
    b2: Array
    eps: Array
    lr_ratio: Array  # LoRA+: B's (and DoRA magnitudes') learning rate over A's

    @classmethod
    def stack(cls, hypers: Sequence[dict[str, float]]) -> Hyper:
        fields = [f.name for f in dataclasses.fields(cls)]
        return cls(**{f: jnp.asarray([h[f] for h in hypers], jnp.float32) for f in fields})


def lr_multiplier(kind: Schedule, step: Array, total_steps: int, warmup_ratio: Array) -> Array:
    """Fraction of the peak learning rate at optimizer step `step` (0-based)."""
    step = jnp.asarray(step, jnp.float32)
    warmup = jnp.ceil(warmup_ratio * total_steps)
    warm = step / jnp.maximum(warmup, 1.0)
    progress = (step - warmup) / jnp.maximum(total_steps - warmup, 1.0)
    if kind == "cosine":
        after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
    elif kind == "linear":
        after = jnp.maximum(0.0, 1.0 - progress)
    elif kind == "constant":
        after = jnp.ones_like(progress)
    else:
        raise ValueError(f"unknown schedule {kind!r}")
    return jnp.where(step < warmup, warm, after)


def make_optimizer(h: Hyper, kind: Schedule, total_steps: int) -> optax.GradientTransformation:
    """AdamW (decoupled weight decay, as torch.optim.AdamW) after global-norm clipping."""

    def schedule(count):
        return h.lr * lr_multiplier(kind, count, total_steps, h.warmup_ratio)

    return optax.chain(
        optax.clip_by_global_norm(h.clip_norm),
        optax.adamw(schedule, b1=h.b1, b2=h.b2, eps=h.eps, weight_decay=h.weight_decay),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class GroupState:
    """One stack of adapters being trained."""

    weights: list[Array]  # LoRA weights as layer stacks [A, L, ...] (`by_layer` splits them)
    consts: nnx.State  # LoRAConst leaves [A] (scale, dropout): not trained
    opt: Any  # optax state, leaves [A, ...]
    hyper: Hyper  # [A]
    dropout_keys: Array  # [A] key data: dropout mask of step s = fold_in(key, s)
    live: Array  # [A] bool: False for padding adapters and adapters that diverged
    diverged_at: Array  # [A] int32: first step with a non-finite loss/gradient, -1 if none
    by_layer: ByLayer = dataclasses.field(metadata=dict(static=True))

    @classmethod
    def create(
        cls,
        weights: nnx.State,
        consts: nnx.State,
        hyper: Hyper,
        dropout_keys: Array,
        live: Array,
        schedule: Schedule,
        total_steps: int,
    ) -> GroupState:
        """A fresh group of adapters (LoRA weights as the model's tree): zero AdamW state,
        none diverged."""
        stacks, by_layer = ByLayer.of(weights)
        placed = tuple(_placement(x) for x in stacks)
        opt = jax.jit(init_opt_state, static_argnums=(2, 3, 4))(
            stacks, hyper, schedule, total_steps, placed
        )
        never = jnp.full(live.shape, -1, jnp.int32)
        return cls(stacks, consts, opt, hyper, dropout_keys, live, never, by_layer)

    def adapter_weights(self) -> nnx.State:
        """The LoRA weights as the model's tree (LoRAWeight leaves [A, ...] per layer)."""
        return self.by_layer.split(self.weights)


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class TrainState:
    step: Array  # int32 scalar: optimizer steps taken
    groups: tuple[GroupState, ...]


@dataclasses.dataclass(frozen=True)
class StepConfig:
    """Static settings of the step (part of the compiled function's identity)."""

    graphdefs: tuple[Any, ...]  # one per group
    schedule: Schedule
    total_steps: int
    use_dropout: bool
    spmd_axis_name: str | None = None
    # Per group: sequential passes over its adapters (None or 1: all adapters in one vmap).
    passes: tuple[int, ...] | None = None
    # Packed batches: the longest row (how far back attention looks); 0: rows as they are.
    segment_window: int = 0
    # Per group: None (next-token prediction) or its distillation settings, whose batches
    # carry each adapter's teacher context (jaxlora/objectives.py).
    objectives: tuple[Distill | None, ...] | None = None
    # Distilling groups' batches carry the teacher's cached outputs instead of its context.
    teacher_cached: bool = False
    teacher_graphdef: Any = None  # the base model's graph (no LoRA), for distilling groups
    context_offset: int = 0  # 1 when samples begin with BOS (the context's BOS replaces it)
    scan_layers: bool = False  # the graphs scan their layers (`Transformer(scan_layers=True)`)
    # The devices the step runs on: platform paths (kernels, CPU-only products) follow their
    # platform, not the host's, and activations are constrained to its axes. None: the default
    # device, no constraints.
    mesh: Mesh | None = None


def _placement(x) -> NamedSharding | None:
    """A concrete array's mesh sharding; None for a tracer or an array on one device."""
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array):
        return None
    return x.sharding if isinstance(x.sharding, NamedSharding) else None


def init_opt_state(
    stacks: list[Array],
    hyper: Hyper,
    cfg_schedule: Schedule,
    total_steps: int,
    placed: Sequence[NamedSharding | None] = (),
):
    """Per-adapter optimizer state (vmapped over the stack): moments shaped like the layer
    stacks (`GroupState.weights`) and, given the stacks' shardings (`placed`), split as they
    are -- zeros have no input to follow, and the compiler would otherwise replicate them."""

    def init(w, h):
        return make_optimizer(h, cfg_schedule, total_steps).init(w)

    opt = jax.vmap(init)(stacks, hyper)
    if not placed or not all(placed):
        return opt
    per_slot = NamedSharding(placed[0].mesh, PartitionSpec("adapter"))  # the step counts [A]
    return map_opt_state(
        opt,
        jax.lax.with_sharding_constraint,
        lambda x: jax.lax.with_sharding_constraint(x, per_slot),
        list(placed),
    )


def map_opt_state(opt, moment: Callable, other: Callable, stacks: Sequence) -> Any:
    """An optimizer state with `moment(m, s)` applied to each moment m and its layer stack's
    entry s of `stacks` (a list parallel to `GroupState.weights`: shardings, abstract
    arrays), and `other(x)` to every other leaf (the step counts)."""
    # The state's structure only: no hyperparameter is read.
    tx = make_optimizer(Hyper(**{f.name: 0.0 for f in dataclasses.fields(Hyper)}), "constant", 1)
    return optax.tree_map_params(
        tx, moment, opt, list(stacks), transform_non_params=lambda x: jax.tree.map(other, x)
    )


@dataclasses.dataclass(frozen=True)
class ByLayer:
    """An adapter tree as *layer stacks*: the leaves that differ only in their layer index
    (`layers.<i>.self_attn.q_proj.lora_a` for every i) stacked on axis 1 ([A, L, ...]), so L
    layers x P projections leaves become P arrays.

    The training state keeps the weights so and the step works on the stacks: passes of
    `adapters_per_pass` slice P arrays, the optimizer updates P arrays (and keeps P moments of
    each kind), and the new weights leave the step as P arrays. Per-leaf work (a kernel for each of
    the L x P pieces) grows a compiled program with the depth, and dominated the compile of a
    scanned deep model (benchmarks/README.md). An unrolled model reads per-layer views
    (`split`); a scanned model reads the stacks themselves (`layer_stacks`), since the views
    it would stack again are L slices and a join per stack, each way, that XLA does not fold
    inside the passes' loop."""

    treedef: Any
    index: tuple[tuple[int, ...], ...]  # per stack, its leaves' positions in the tree
    # per stack of layer leaves, their path within a layer and their layers (None: not a layer's)
    within: tuple[tuple[tuple, tuple[int, ...]] | None, ...]
    # per stack, whether LoRA+ gives it B's learning rate (B factors, DoRA's magnitude vectors)
    fast: tuple[bool, ...]

    @classmethod
    def of(cls, tree) -> tuple[list[Array], ByLayer]:
        leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        stacks: dict[tuple, list[int]] = {}
        layers: dict[tuple, list[int]] = {}
        fast: dict[tuple, bool] = {}
        for i, (path, x) in enumerate(leaves):
            keys = path_keys(path)
            in_layer = keys[0] == "layers"
            key = (*(("layers", *keys[2:]) if in_layer else (i,)), x.shape, x.dtype)
            stacks.setdefault(key, []).append(i)
            fast[key] = bool(FAST_FACTORS & set(keys))
            if in_layer:
                layers.setdefault(key, []).append(keys[1])
        within = tuple((k[1:-2], tuple(layers[k])) if k in layers else None for k in stacks)
        by = cls(treedef, tuple(tuple(v) for v in stacks.values()), within, tuple(fast.values()))
        return by.join(tree), by

    def join(self, tree) -> list[Array]:
        """The stacks of a tree shaped like the one this was made `of` (weights, gradients)."""
        leaves = jax.tree.leaves(tree)
        return [jnp.stack([leaves[i] for i in idx], axis=1) for idx in self.index]

    def covers(self, depth: int) -> bool:
        """Whether there are layer stacks and each holds layers 0..depth-1 in order: what a
        scanned model of that depth reads as they are."""
        layers = [w[1] for w in self.within if w is not None]
        return bool(layers) and all(ls == tuple(range(depth)) for ls in layers)

    def layer_stacks(self, stacks: Sequence[Array]) -> dict[tuple, Array]:
        """The stacks of layer leaves, [A, L, ...], keyed by their path within a layer: what
        a scanned model reads (`Transformer.__call__(lora_stacks=)`)."""
        return {w[0]: x for w, x in zip(self.within, stacks, strict=True) if w is not None}

    def split(self, stacks: Sequence[Array]):
        """The tree of `stacks`."""
        leaves: list[Any] = [None] * sum(len(idx) for idx in self.index)
        for idx, stack in zip(self.index, stacks, strict=True):
            for j, i in enumerate(idx):
                leaves[i] = stack[:, j]
        return jax.tree.unflatten(self.treedef, leaves)


def _group_losses(
    graphdef,
    base,
    weights,
    consts,
    batch,
    rngs,
    spmd_axis_name,
    window,
    objective: Distill | None = None,
    teacher=None,
    lora_stacks: dict[tuple, Array] | None = None,
):
    """Per-adapter loss [A] of a batch (tokens, valid, loss mask[, segments]): the mean target
    cross-entropy, or with `objective` the distillation loss against `teacher` (its outputs).
    `lora_stacks` [A, L, ...]: the weights as layer stacks, for a scanned model.

    The mean cross-entropy is `token_mean_ce` computed a chunk of positions at a time from the
    final hidden states (`chunked_token_mean_ce`): no [B, T, V] logits of a whole batch.
    Packed (segment ids present) or not, it is the same sum over the same
    targets divided by their number: the first token of each packed row is never a target,
    so the logit at the end of one row predicts nothing in the next."""
    tokens, valid, loss_mask, *packed = batch
    if objective is not None:

        def distilled(w, c, s, t, m, loss, teach, rng):
            module = nnx.merge(graphdef, w, c, base)
            return student_loss(objective, module, t, m, loss, teach, rng, s)

        rng_axis = None if rngs is None else 0
        return jax.vmap(
            distilled, in_axes=(0, 0, 0, 0, 0, 0, 0, rng_axis), spmd_axis_name=spmd_axis_name
        )(weights, consts, lora_stacks, tokens, valid, loss_mask, teacher, rngs)

    def one(w, c, s, t, m, loss, seg, rng):
        module = nnx.merge(graphdef, w, c, base)
        kw = {} if seg is None else dict(segment_ids_BT=seg, segment_window=window)
        hidden = module(t, m, rng=rng, return_hidden=True, lora_stacks=s, **kw)[0]
        chunk = loss_chunk(*t.shape, module.config.vocab_size)
        return chunked_token_mean_ce(module.logits, hidden, t, loss, chunk)

    seg = packed[0] if packed else None
    return jax.vmap(
        one,
        in_axes=(0, 0, 0, 0, 0, 0, None if seg is None else 0, None if rngs is None else 0),
        spmd_axis_name=spmd_axis_name,
    )(weights, consts, lora_stacks, tokens, valid, loss_mask, seg, rngs)


def _losses_and_grads(
    graphdef,
    base,
    g: GroupState,
    batch,
    rngs,
    passes: int,
    spmd_axis_name,
    window: int = 0,
    objective: Distill | None = None,
    teacher_graphdef=None,
    offset: int = 0,
    cached: bool = False,
    scan: bool = False,
) -> tuple[Array, list[Array]]:
    """Per-adapter losses [A] and LoRA gradients of one group, as layer stacks (`ByLayer`);
    `scan`: the model scans its layers, and reads the stacks themselves where they hold every
    layer (with `lora.layers` it reads per-layer views, as the unrolled model does).

    With `passes` > 1 the adapters are taken in `passes` sequential vmaps (`lax.map`), pass i
    computing adapters i, i + passes, ... so that every device keeps an equal share of each
    pass. Each adapter's numbers are the same either way; fewer adapters at once means less
    activation memory and, on CPUs, activations that stay in cache."""
    c_stacks, c_layers = ByLayer.of(g.consts)
    depth = len(base["layers"])

    def chunk(w_stacks, c_stacks, batch, rngs, live):
        consts = c_layers.split(c_stacks)
        teacher = None
        if objective is not None and cached:  # logits [A, B, T, V], hidden [A, B, K, T, D]
            teacher = (batch[3], jnp.swapaxes(batch[4], 1, 2) if len(batch) > 4 else None)
        elif objective is not None:  # outside the gradient: the frozen base with the context
            tokens, valid, _, context, context_valid = batch
            teacher = jax.vmap(
                functools.partial(teacher_outputs, teacher_graphdef, base, objective),
                in_axes=(0, 0, 0, 0, None),
                spmd_axis_name=spmd_axis_name,
            )(context, context_valid, tokens, valid, offset)

        def total(views, stacks):
            args = (batch, rngs, spmd_axis_name, window, objective, teacher, stacks)
            per = _group_losses(graphdef, base, views, consts, *args)
            return jnp.sum(jnp.where(live, per, 0.0)), per

        if scan and g.by_layer.covers(depth):  # the model reads the stacks, not the views
            c_given = c_layers.layer_stacks(c_stacks)

            def stacked(w):
                return total(g.by_layer.split(w), {**g.by_layer.layer_stacks(w), **c_given})

            (_, per), grads = jax.value_and_grad(stacked, has_aux=True)(w_stacks)
            return per, grads
        # The gradient of the per-layer views, joined after: the transpose of slicing a stack
        # would add L zero-padded copies of it.
        views = g.by_layer.split(w_stacks)
        (_, per), grads = jax.value_and_grad(total, has_aux=True)(views, None)
        return per, g.by_layer.join(grads)

    args = (g.weights, c_stacks, tuple(batch), rngs, g.live)
    if passes == 1:
        return chunk(*args)

    def split(x):  # [A, ...] -> [passes, A / passes, ...]
        return jnp.swapaxes(x.reshape(-1, passes, *x.shape[1:]), 0, 1)

    def merge(x):
        return jnp.swapaxes(x, 0, 1).reshape(-1, *x.shape[2:])

    per, grads = jax.lax.map(lambda xs: chunk(*xs), jax.tree.map(split, args))
    return merge(per), jax.tree.map(merge, grads)


def train_step(
    cfg: StepConfig,
    base: nnx.State,
    state: TrainState,
    batches: tuple[tuple[Array, ...], ...],
) -> tuple[TrainState, tuple[Array, ...]]:
    """One optimizer step of every adapter. Returns the new state and each group's losses [A_g].

    Each group's batch is (tokens, valid, loss mask) [A, B, T], or with packing (tokens,
    valid, loss mask, segment ids) [A, 1, L] (`cfg.segment_window` > 0), or for a distilling
    group (tokens, valid, loss mask, context [A, C], context valid [A, C]), or with
    `cfg.teacher_cached` (tokens, valid, loss mask, teacher logits [A, B, T, V][, teacher
    hidden states [A, B, K, T, D]]).

    Traced for `cfg.mesh` (`sharding.compiling_for`): platform paths follow its devices and
    activations are pinned to its axes."""
    with compiling_for(cfg.mesh):
        return _train_step(cfg, base, state, batches)


def _train_step(cfg: StepConfig, base, state: TrainState, batches):
    new_groups, losses = [], []
    passes = cfg.passes or (1,) * len(cfg.graphdefs)
    objectives = cfg.objectives or (None,) * len(cfg.graphdefs)
    for graphdef, g, batch, n, objective in zip(
        cfg.graphdefs, state.groups, batches, passes, objectives, strict=True
    ):
        rngs = None
        if cfg.use_dropout:
            keys = jax.random.wrap_key_data(g.dropout_keys)
            rngs = jax.vmap(jax.random.fold_in, (0, None))(keys, state.step)
        per_adapter, grads = _losses_and_grads(
            graphdef,
            base,
            g,
            batch,
            rngs,
            n,
            cfg.spmd_axis_name,
            cfg.segment_window,
            objective,
            cfg.teacher_graphdef,
            cfg.context_offset,
            cfg.teacher_cached,
            cfg.scan_layers,
        )

        def update(gr, opt, w, h, live, loss, fast=g.by_layer.fast):
            """One adapter's AdamW step on its layer stacks, elementwise on each (moments and
            weights split alike), kept only where it is live and its loss and gradients are
            finite."""
            tx = make_optimizer(h, cfg.schedule, cfg.total_steps)
            upd, new_opt = tx.update(gr, opt, w)
            # LoRA+ (PEFT's `create_loraplus_optimizer`): B's parameter group runs at lr x ratio,
            # its decoupled decay included, which is the whole AdamW update scaled by the ratio.
            upd = [u * h.lr_ratio if f else u for u, f in zip(upd, fast, strict=True)]
            finite = jnp.isfinite(loss) & jnp.all(jnp.stack([jnp.isfinite(x).all() for x in gr]))
            keep = live & finite
            kept = lambda new, old: jnp.where(keep, new, old)  # noqa: E731
            new_w = jax.tree.map(kept, optax.apply_updates(w, upd), w)
            new_opt = jax.tree.map(kept, new_opt, opt)
            return new_w, new_opt, finite

        new_w, new_opt, finite = jax.vmap(update, spmd_axis_name=cfg.spmd_axis_name)(
            grads, g.opt, g.weights, g.hyper, g.live, per_adapter
        )
        keep = g.live & finite
        newly_diverged = g.live & ~finite
        new_groups.append(
            dataclasses.replace(
                g,
                weights=new_w,
                opt=new_opt,
                live=keep,
                diverged_at=jnp.where(newly_diverged, state.step, g.diverged_at),
            )
        )
        losses.append(per_adapter)
    return TrainState(step=state.step + 1, groups=tuple(new_groups)), tuple(losses)


@functools.lru_cache(maxsize=16)
def compile_step(cfg: StepConfig):
    """`train_step` jitted once per static config, donating the training state (never the base).

    Shardings follow the inputs: adapter stacks and batches arrive sharded on `adapter`, the base
    on fsdp/tensor, and `vmap(spmd_axis_name="adapter")` keeps the per-adapter work on its shard.
    """
    return jax.jit(functools.partial(train_step, cfg), donate_argnums=(1,))
