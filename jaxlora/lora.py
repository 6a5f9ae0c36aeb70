"""LoRA applied functionally: stacks of adapters, rank groups, per-example routing, merging.

An `AdapterStack` holds A adapters with a leading adapter axis on every LoRA leaf. A forward
pass over the stack is `jax.vmap` over (adapter weights, adapter constants, that adapter's
tokens) with the frozen base broadcast (`in_axes=None`): XLA sees one batched matmul per
projection instead of A separate programs.

Adapters of different ranks, targets or layers share one stack by zero-padding: a zero row of
A or column of B gets exactly zero gradient and zero AdamW update, so padding to the largest
rank (or to the union of targets) changes nothing about any adapter. The alternative layout,
*rank groups*, keeps one stack per distinct rank and evaluates every group inside the same
compiled function; `layout_groups` chooses between the two.

Initialisation follows PEFT: A Kaiming-uniform (bound 1/sqrt(in)) or Gaussian (std 1/r), B
zero. A is drawn at the adapter's own rank from a generator seeded by (adapter seed,
projection number) and then zero-padded, so an adapter's initial weights depend only on its
own seed and config, never on its neighbours in the stack or on padding.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.errors import LoRAError
from jaxlora.models.config import ModelConfig
from jaxlora.models.model import stack_forward
from jaxlora.models.transformer import (
    ATTENTION_MODULES,
    LINEAR_MODULES,
    MLP_MODULES,
    LoRAPlacement,
    abstract_module,
)
from jaxlora.sharding import variable_sharding
from jaxlora.svd import pissa_niter, randomized_svd

if TYPE_CHECKING:
    from jaxlora.models.model import Model

Array = jax.Array
Layout = Literal["groups", "padded"] | tuple[int, ...]
# PEFT's names; besides them `pissa_niter_N` (N >= 1 power iterations of a randomised SVD).
InitKind = Literal["kaiming", "gaussian", "pissa", "olora"] | str
# Initialisations from the base weight (PEFT's `init_lora_weights`): the adapter starts at the
# weight's leading SVD (`pissa`, and `pissa_niter_N` from a randomised SVD) or QR (`olora`)
# factors and trains on the residual (`is_residual_init`).
RESIDUAL_INITS = frozenset({"pissa", "olora"})


def is_residual_init(init: str) -> bool:
    """Whether `init` starts from the base weight: `pissa`, `olora` or `pissa_niter_N`."""
    return init in RESIDUAL_INITS or pissa_niter(init) is not None


TARGET_GROUPS: dict[str, tuple[str, ...]] = {
    "all-linear": LINEAR_MODULES,
    "attention": ATTENTION_MODULES,
    "mlp": MLP_MODULES,
}


def resolve_targets(targets: str | Sequence[str]) -> frozenset[str]:
    """Module names from `all-linear`, `attention`, `mlp` or a list (`q_proj` or `q`)."""
    if isinstance(targets, str):
        if targets in TARGET_GROUPS:
            return frozenset(TARGET_GROUPS[targets])
        targets = [targets]
    names = set()
    for t in targets:
        name = t if t.endswith("_proj") else f"{t}_proj"
        if name not in LINEAR_MODULES:
            valid = ", ".join([*TARGET_GROUPS, *LINEAR_MODULES])
            raise LoRAError(f"unknown LoRA target {t!r}; use one of {valid}")
        names.add(name)
    if not names:
        raise LoRAError("LoRA targets are empty; name at least one module or use 'all-linear'")
    return frozenset(names)


def module_dims(config: ModelConfig, module: str) -> tuple[int, int]:
    """(in, out) features of a projection."""
    D, F, H = config.hidden_size, config.intermediate_size, config.head_dim
    return {
        "q_proj": (D, config.num_heads * H),
        "k_proj": (D, config.num_kv_heads * H),
        "v_proj": (D, config.num_kv_heads * H),
        "o_proj": (config.num_heads * H, D),
        "gate_proj": (D, F),
        "up_proj": (D, F),
        "down_proj": (F, D),
    }[module]


@dataclasses.dataclass(frozen=True)
class LoRAConfig:
    """One adapter's hyperparameters, normalised on construction: `targets` becomes the tuple of
    module names in model order, `alpha=None` becomes alpha = rank, `layers` a sorted tuple."""

    rank: int
    alpha: float | None = None
    targets: str | tuple[str, ...] = "all-linear"
    layers: tuple[int, ...] | None = None
    dropout: float = 0.0
    use_rslora: bool = False
    init: InitKind = "kaiming"
    use_dora: bool = False

    def __post_init__(self) -> None:
        modules = resolve_targets(self.targets)
        object.__setattr__(self, "targets", tuple(m for m in LINEAR_MODULES if m in modules))
        if self.alpha is None and isinstance(self.rank, int):
            object.__setattr__(self, "alpha", float(self.rank))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(sorted(set(self.layers))))

    @property
    def scale(self) -> float:
        """s in y = Wx + s BAx: alpha/r, or alpha/sqrt(r) for rsLoRA."""
        return self.alpha / (math.sqrt(self.rank) if self.use_rslora else self.rank)

    @property
    def modules(self) -> frozenset[str]:
        return frozenset(self.targets)

    @property
    def residual(self) -> bool:
        """Whether the adapter starts from the base weight and carries its frozen correction."""
        return is_residual_init(self.init)

    def validate(self, config: ModelConfig) -> LoRAConfig:
        if not isinstance(self.rank, int) or self.rank <= 0:
            raise LoRAError(f"LoRA rank must be a positive integer, got {self.rank!r}")
        if self.alpha is None or self.alpha <= 0:
            raise LoRAError(f"LoRA alpha must be positive, got {self.alpha!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise LoRAError(f"LoRA dropout must be in [0, 1), got {self.dropout!r}")
        if self.init not in ("kaiming", "gaussian") and not is_residual_init(self.init):
            raise LoRAError(
                "LoRA init must be 'kaiming', 'gaussian', 'pissa', 'olora' or 'pissa_niter_N' "
                f"(N >= 1 power iterations), got {self.init!r}"
            )
        if self.layers is not None:
            bad = [i for i in self.layers if not 0 <= i < config.num_layers]
            if bad or not self.layers:
                raise LoRAError(
                    f"LoRA layers {list(self.layers)} must be a non-empty subset of "
                    f"0..{config.num_layers - 1}"
                )
        for module in sorted(self.modules):
            d_in, d_out = module_dims(config, module)
            if self.rank > min(d_in, d_out):
                raise LoRAError(
                    f"LoRA rank {self.rank} exceeds min(in, out) = {min(d_in, d_out)} of "
                    f"{module} ({d_in} -> {d_out}); use rank <= {min(d_in, d_out)} or drop "
                    f"{module} from the targets"
                )
        return self

    def num_params(self, config: ModelConfig) -> int:
        """Trainable parameters of this adapter on a model (rank r, its targets and layers)."""
        return placement_params(config, self.placement())

    def placement(self) -> LoRAPlacement:
        layers = None if self.layers is None else frozenset(self.layers)
        return LoRAPlacement(self.rank, self.modules, layers, self.residual, self.use_dora)


def placement_params(config: ModelConfig, placement: LoRAPlacement) -> int:
    """LoRA parameters of one adapter laid out as `placement` (its rank, modules and layers;
    with DoRA a magnitude per output of each module)."""
    layers = config.num_layers if placement.layers is None else len(placement.layers)
    dims = [module_dims(config, m) for m in placement.modules]
    magnitudes = sum(d_out for _, d_out in dims) if placement.dora else 0
    return layers * (placement.rank * sum(map(sum, dims)) + magnitudes)


def union_placement(configs: Sequence[LoRAConfig]) -> LoRAPlacement:
    """The smallest placement holding every adapter (max rank, union of modules and layers)."""
    layers = None
    if all(c.layers is not None for c in configs):
        layers = frozenset(i for c in configs for i in c.layers)
    return LoRAPlacement(
        rank=max(c.rank for c in configs),
        modules=frozenset(m for c in configs for m in c.modules),
        layers=layers,
        residual=any(c.residual for c in configs),
        dora=any(c.use_dora for c in configs),
    )


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AdapterStack:
    """A adapters stacked on a leading axis: `weights` (A, B factors), `consts` (scale, dropout).

    LoRAWeight leaves are [A, in, R] and [A, R, out] with R the largest rank in the stack;
    LoRAConst leaves are [A]. `configs` and `names` are static (one per adapter).
    """

    weights: nnx.State
    consts: nnx.State
    configs: tuple[LoRAConfig, ...] = dataclasses.field(metadata=dict(static=True))
    names: tuple[str, ...] = dataclasses.field(metadata=dict(static=True))

    def __len__(self) -> int:
        return len(self.configs)

    @property
    def placement(self) -> LoRAPlacement:
        return union_placement(self.configs)

    def select(self, indices: Sequence[int]) -> AdapterStack:
        """The sub-stack of the given adapters (padding kept)."""
        idx = np.asarray(indices)
        return AdapterStack(
            jax.tree.map(lambda x: x[idx], self.weights),
            jax.tree.map(lambda x: x[idx], self.consts),
            tuple(self.configs[i] for i in indices),
            tuple(self.names[i] for i in indices),
        )

    def num_trainable(self, index: int, config: ModelConfig) -> int:
        """Trainable parameters of adapter `index` (its own rank and targets, no padding)."""
        return self.configs[index].num_params(config)


# ---------------------------------------------------------------------------------------------
# building stacks


def _module_index(config: ModelConfig) -> dict[tuple, int]:
    """A fixed number for every projection of the model (its seed offset), in model order."""
    modules = [("self_attn", m) for m in ATTENTION_MODULES] + [("mlp", m) for m in MLP_MODULES]
    return {
        ("layers", layer, parent, module): layer * len(modules) + j
        for layer in range(config.num_layers)
        for j, (parent, module) in enumerate(modules)
    }


def init_lora_a(config: LoRAConfig, seed: int, module_index: int, d_in: int) -> np.ndarray:
    """PEFT-style initial A [in, r] of one projection: Kaiming-uniform (bound 1/sqrt(in), what
    `kaiming_uniform_(a=sqrt(5))` gives) or Gaussian with std 1/r."""
    rng = np.random.default_rng([seed, module_index])
    if config.init == "gaussian":
        a = rng.normal(0.0, 1.0 / config.rank, (d_in, config.rank))
    else:
        bound = 1.0 / math.sqrt(d_in)
        a = rng.uniform(-bound, bound, (d_in, config.rank))
    return a.astype(np.float32)


def base_decomposition(init: str, kernel, rank: int) -> tuple[np.ndarray, ...]:
    """The factorisation of a frozen kernel [in, out] that a residual adapter (`pissa`,
    `pissa_niter_N`, `olora`) starts from, of the weight as PEFT holds it ([out, in]), in
    float64: the SVD (V, S, U^T) or the QR (Q, R). The exact ones do not depend on `rank`:
    every rank and scale of that init slices them. `pissa_niter_N`'s randomised SVD is
    computed at the adapter's rank (jaxlora/svd.py), so it holds exactly `rank` triplets."""
    w = np.asarray(kernel, np.float64).T
    niter = pissa_niter(init)
    if niter is not None:
        return randomized_svd(w, rank, niter)
    if init == "pissa":
        return tuple(np.linalg.svd(w, full_matrices=False))
    return tuple(np.linalg.qr(w))


def base_factors(config: LoRAConfig, parts: Sequence[np.ndarray]) -> tuple[np.ndarray, ...]:
    """PEFT's initial (A [in, r], B [r, out]) of a residual adapter from its kernel's
    `base_decomposition`: PiSSA (either SVD) A = sqrt(S_r / s) U_r^T, B = V_r sqrt(S_r / s),
    so that s B A is the rank-r principal part of the weight; OLoRA A = R_r, B = Q_r."""
    r = config.rank
    if config.init == "olora":
        q, upper = parts
        a, b = upper[:r], q[:, :r]
    else:
        v, sv, uh = parts
        root = np.sqrt(sv[:r] / config.scale)
        a, b = root[:, None] * uh[:r], v[:, :r] * root
    return a.T.astype(np.float32), b.T.astype(np.float32)


def init_adapters(
    model: Model,
    configs: Sequence[LoRAConfig],
    seeds: Sequence[int],
    names: Sequence[str] | None = None,
) -> AdapterStack:
    """A stack of freshly initialised adapters, sharded on `adapter`.

    `kaiming`/`gaussian`: A as PEFT draws it, B = 0; with DoRA the magnitudes start at the
    base weight's column norms ||W||_c, as PEFT's do (the norm of W + s B A with B = 0). Adapter i's A comes from
    `np.random.default_rng([seeds[i], projection number])` at its own rank, then zero-padded:
    it depends on nothing but its seed and config. `pissa`/`pissa_niter_N`/`olora`: A and B
    from the base weight (`base_factors`), and the same values as the adapter's frozen residual
    correction (`lora_a0`, `lora_b0`; zero for the stack's other adapters). Each device's slice
    is generated where it is needed (`make_array_from_callback`), so a process builds only its
    own adapters.
    """
    configs = tuple(c.validate(model.config) for c in configs)
    names = (
        tuple(names) if names is not None else tuple(f"adapter_{i}" for i in range(len(configs)))
    )
    if not (len(names) == len(seeds) == len(configs)):
        raise LoRAError(
            f"{len(configs)} adapters need as many seeds and names; got {len(seeds)} "
            f"seeds and {len(names)} names"
        )
    placement = union_placement(configs)
    _, weights_abs, consts_abs, _ = abstract_module(
        model.config, placement, model.dtype, model.param_dtype
    )
    numbers = _module_index(model.config)
    kernels = dict(nnx.to_flat_state(model.params)) if placement.residual or placement.dora else {}
    decompositions: dict[tuple, tuple[np.ndarray, ...]] = {}
    n = len(configs)

    def start(a: int, module_path: tuple, factor: str) -> np.ndarray | None:
        """Adapter a's initial `lora_a` [in, r] or `lora_b` [r, out] of a projection (None:
        zeros)."""
        c = configs[a]
        if not c.placement().rank_for(module_path[1], module_path[3]):
            return None
        if factor == "lora_magnitude":
            if not c.use_dora:
                return None
            kernel = np.asarray(kernels[(*module_path, "kernel")].get_value(), np.float32)
            return np.linalg.norm(kernel, axis=0)
        if not c.residual:
            if factor == "lora_b":
                return None
            d_in = module_dims(model.config, module_path[3])[0]
            return init_lora_a(c, seeds[a], numbers[module_path], d_in)
        # The exact factorisations serve every rank; the randomised one is the rank's own.
        key = (module_path, c.init, c.rank if pissa_niter(c.init) else None)
        if key not in decompositions:
            kernel = kernels[(*module_path, "kernel")].get_value()
            decompositions[key] = base_decomposition(c.init, kernel, c.rank)
        return base_factors(c, decompositions[key])[factor == "lora_b"]

    def stacked(path, var, factor: str, *, residual_only: bool):
        shape = (n, *var.get_value().shape)
        module_path = path[:-1]

        def block(index):
            rows = range(*index[0].indices(n))
            out = np.zeros((len(rows), *shape[1:]), np.float32)
            for k, a in enumerate(rows):
                x = (
                    None
                    if residual_only and not configs[a].residual
                    else start(a, module_path, factor)
                )
                if x is not None:
                    out[(k, *(slice(0, d) for d in x.shape))] = x
            return out[(slice(None), *index[1:])]

        sharding = variable_sharding(
            var.replace(jax.ShapeDtypeStruct(shape, jnp.float32)), model.mesh, ("adapter",)
        )
        return var.replace(jax.make_array_from_callback(shape, sharding, block))

    def weight(path, var):
        return stacked(path, var, path[-1], residual_only=False)

    def const(path, var):
        if path[-1] in ("lora_a0", "lora_b0"):
            return stacked(path, var, path[-1][:-1], residual_only=True)
        return place_stacked(var, const_values(configs, path), model)

    return AdapterStack(
        nnx.map_state(weight, weights_abs), nnx.map_state(const, consts_abs), configs, names
    )


def const_values(configs: Sequence[LoRAConfig], path: tuple) -> np.ndarray:
    """A scalar LoRA constant of each adapter at a projection's `path`: its scale, dropout rate,
    or whether it is a DoRA adapter there."""
    if path[-1] == "lora_dora":
        layer, module = path[1], path[3]
        values = [c.use_dora and bool(c.placement().rank_for(layer, module)) for c in configs]
    else:
        values = [c.scale if path[-1] == "lora_scale" else c.dropout for c in configs]
    return np.asarray(values, np.float32)


def place_stacked(var: nnx.Variable, host: np.ndarray, model: Model) -> nnx.Variable:
    """A stacked host array as `var`'s value, placed `adapter`-sharded on the model's mesh."""
    stacked = var.replace(host)
    return stacked.replace(
        jax.device_put(host, variable_sharding(stacked, model.mesh, ("adapter",)))
    )


def concatenate(model: Model, stacks: Sequence[AdapterStack]) -> AdapterStack:
    """One stack of all adapters of `stacks`, zero-padded to a common rank and placement."""
    configs = tuple(c for s in stacks for c in s.configs)
    placement = union_placement(configs)
    padded = [pad_to(model, s, placement) for s in stacks]
    cat = lambda *xs: jnp.concatenate(xs, axis=0)  # noqa: E731
    return AdapterStack(
        jax.tree.map(cat, *[p.weights for p in padded]),
        jax.tree.map(cat, *[p.consts for p in padded]),
        configs,
        tuple(n for s in stacks for n in s.names),
    )


def pad_to(model: Model, stack: AdapterStack, placement: LoRAPlacement) -> AdapterStack:
    """Zero-pad a stack's rank (factors and residual corrections) and fill modules, or
    corrections, it does not have with zeros."""
    _, w_abs, c_abs, _ = abstract_module(model.config, placement)
    have_w = dict(nnx.to_flat_state(stack.weights))
    have_c = dict(nnx.to_flat_state(stack.consts))
    n = len(stack)

    def fill(path, var, have):
        shape = var.get_value().shape
        if path not in have:
            return var.replace(jnp.zeros((n, *shape), jnp.float32))
        x = have[path].get_value()
        x = jnp.pad(x, [(0, 0)] + [(0, t - s) for s, t in zip(x.shape[1:], shape, strict=True)])
        return var.replace(x)

    return AdapterStack(
        nnx.map_state(lambda p, v: fill(p, v, have_w), w_abs),
        nnx.map_state(lambda p, v: fill(p, v, have_c), c_abs),
        stack.configs,
        stack.names,
    )


def layout_groups(configs: Sequence[LoRAConfig], layout: Layout) -> list[list[int]]:
    """Adapter indices per stack: one group per distinct rank (`groups`), one padded group
    (`padded`), or one group per rank bucket (a tuple of increasing rank ceilings: each adapter
    joins the first bucket whose ceiling is >= its rank). Empty groups are left out."""
    if layout == "padded":
        return [list(range(len(configs)))]
    if isinstance(layout, tuple):
        too_big = [c.rank for c in configs if c.rank > layout[-1]]
        if too_big:
            raise LoRAError(
                f"rank {max(too_big)} is above the largest rank ceiling of training.layout "
                f"{list(layout)}; add a ceiling >= {max(too_big)}"
            )
        key = lambda c: next(top for top in layout if c.rank <= top)  # noqa: E731
    elif layout == "groups":
        key = lambda c: c.rank  # noqa: E731
    else:
        raise LoRAError(
            f"unknown adapter layout {layout!r}: use 'groups', 'padded' or rank ceilings"
        )
    groups: dict[int, list[int]] = {}
    for i, c in enumerate(configs):
        groups.setdefault(key(c), []).append(i)
    return [groups[r] for r in sorted(groups)]


# ---------------------------------------------------------------------------------------------
# forward passes (`stack_forward` itself is the model's: jaxlora.models.model)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _routed_forward(graphdef, base, stack, adapter_ids, tokens, mask):
    weights = jax.tree.map(lambda x: x[adapter_ids], stack.weights)
    consts = jax.tree.map(lambda x: x[adapter_ids], stack.consts)
    out = stack_forward(graphdef, base, weights, consts, tokens[:, None], mask[:, None])
    return out[:, 0]


def routed_logits(
    model: Model, adapters: AdapterStack, adapter_ids, input_ids_BT, mask_BT=None
) -> Array:
    """Per-example mode: row b of the batch runs with adapter `adapter_ids[b]` -> [B, T, V]."""
    ids = jnp.asarray(input_ids_BT, jnp.int32)
    mask = jnp.ones(ids.shape, bool) if mask_BT is None else jnp.asarray(mask_BT, bool)
    adapter_ids = np.asarray(adapter_ids)
    if (
        adapter_ids.shape != (ids.shape[0],)
        or adapter_ids.min() < 0
        or adapter_ids.max() >= len(adapters)
    ):
        raise LoRAError(
            f"adapter_ids must be {ids.shape[0]} indices in [0, {len(adapters)}); "
            f"got {adapter_ids.tolist()}"
        )
    return _routed_forward(
        model.graph(adapters.placement), model.params, adapters, jnp.asarray(adapter_ids), ids, mask
    )


# ---------------------------------------------------------------------------------------------
# merging into the base


def delta_weights(
    stack: AdapterStack, index: int, base: nnx.State | None = None
) -> dict[tuple, Array]:
    """The change adapter `index` makes to each kernel [in, out] it carries, by kernel path:
    s (A B - A0 B0) (A0 B0: the residual correction of a PiSSA/OLoRA adapter, else none), or
    for a DoRA adapter g (W + s A B) - W, with g = m / ||W + s A B|| per column, which needs the
    `base` weights W."""
    weights = dict(nnx.to_flat_state(stack.weights))
    consts = dict(nnx.to_flat_state(stack.consts))
    kernels = {} if base is None else dict(nnx.to_flat_state(base))
    out = {}
    for path, var in weights.items():
        if path[-1] != "lora_a":
            continue
        module = path[:-1]
        a = var.get_value()[index]
        b = weights[(*module, "lora_b")].get_value()[index]
        s = consts[(*module, "lora_scale")].get_value()[index]
        delta = s * (a @ b)
        if (*module, "lora_a0") in consts:  # the residual base: W - s A0 B0
            a0, b0 = (consts[(*module, f)].get_value()[index] for f in ("lora_a0", "lora_b0"))
            delta = delta - s * (a0 @ b0)
        if (*module, "lora_dora") in consts and consts[(*module, "lora_dora")].get_value()[index]:
            if base is None:
                raise LoRAError("a DoRA adapter's change to a weight depends on it: pass the base")
            w = kernels[(*module, "kernel")].get_value().astype(jnp.float32)
            m = weights[(*module, "lora_magnitude")].get_value()[index]
            delta = (m / jnp.linalg.norm(w + delta, axis=0)) * (w + delta) - w
        out[(*module, "kernel")] = delta
    return out


def merge(model: Model, stack: AdapterStack, index: int, *, sign: float = 1.0) -> Model:
    """A model whose base weights include adapter `index` (sign=-1 removes it again; a DoRA
    adapter cannot be removed so: its column scaling is not known from the merged weights)."""
    if sign < 0 and stack.configs[index].use_dora:
        raise LoRAError(
            "a merged DoRA adapter cannot be removed from the merged weights alone; keep the "
            "unmerged model"
        )
    deltas = delta_weights(stack, index, model.params)

    def add(path, var):
        if path not in deltas:
            return var
        w = var.get_value()
        return var.replace((w.astype(jnp.float32) + sign * deltas[path]).astype(w.dtype))

    return dataclasses.replace(model, params=nnx.map_state(add, model.params))


def unmerge(model: Model, stack: AdapterStack, index: int) -> Model:
    """Inverse of `merge` (exact up to float rounding) for every adapter but DoRA's."""
    return merge(model, stack, index, sign=-1.0)
