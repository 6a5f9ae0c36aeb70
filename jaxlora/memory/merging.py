"""Merging adapters of a stack into new adapters, with PEFT `add_weighted_adapter` semantics.

`merge(model, stack, indices [Q, k], weights [Q, k], combination_type, ...)` returns a stack of
Q adapters, row q merging adapters `indices[q]`. All Q rows are ONE jitted call: the sources
are gathered to [Q, k, ...] per projection and the per-row merge is `vmap`ped; what differs
between rows (ranks, targets, column layouts, pruning counts) is computed on the host and passed
as arrays, so the compiled program depends only on shapes.

Semantics are those of `peft.LoraModel.add_weighted_adapter` (peft 0.21), which users compare
against. With c_i = w_i s_i (s_i = alpha_i / r_i, or alpha_i / sqrt(r_i) with rsLoRA):
- `cat`: A' = [c_i A_i], B' = [B_i] over the rank axis, rank sum(r_i): exactly sum c_i B_i A_i.
- `linear`, `ties`, `dare_linear`, `dare_ties`, `magnitude_prune` merge the A and B factors
  *separately*, A with weights sign(c_i) sqrt|c_i| and B with sqrt|c_i|, so the product has
  cross terms B_i A_j; PEFT requires equal ranks, and so do we (a `MergeError` otherwise).
- `svd`, `ties_svd`, `dare_linear_svd`, `dare_ties_svd`, `magnitude_prune_svd` merge the
  ΔW_i = s_i B_i A_i with weights w_i and truncate an SVD to `svd_rank` (default max r_i):
  B' = U_r S_r, A' = V_r^T, optionally clamped to [-h, h], h the `svd_clamp` quantile of their
  (signed) entries. That quantile depends on the signs the SVD gives its singular vectors, which
  LAPACK builds choose differently (torch's MKL, cuSOLVER and XLA disagree), so with a clamp
  PEFT's own result varies by platform; ours is PEFT's formula on XLA's SVD.
- TIES magnitude-prunes every tensor to its top `int(density * numel)` entries, elects a sign
  per entry from the unweighted pruned tensors (`total`: sign of the sum, `frequency`: sign of
  the sum of signs, ties going to +) and averages the weighted entries agreeing with it
  (sum / max(1, count)). DARE keeps each entry with probability `density` and rescales by
  1/density; `density >= 1` prunes nothing (no rescale), as in PEFT.
- One source (k = 1) is always `linear` (PEFT's rule): B'A' = w s BA at the source's rank.
- DoRA: PEFT merges the sources' A and B alone and gives the new adapter the first source's
  `use_dora` with fresh magnitudes ||W|| (those of an adapter created at B = 0, before its
  factors are filled in); so do we. PiSSA/OLoRA sources of a training stack carry a residual
  correction that PEFT never sees: merge their exports (`save_peft`, `load_peft`) instead.
- The new adapter has r = alpha = new rank and inherits the first source's dropout and
  use_rslora. The latter is PEFT's: a first source with rsLoRA gives the merged adapter scale
  alpha/sqrt(r) = sqrt(r), not 1, and we reproduce that rather than diverge from PEFT.
- Targets are the union of the sources'; a source absent from a module counts as zero there,
  which is what PEFT's skipping of absent adapters amounts to for every type (for `cat` its
  columns stay zero where PEFT packs the others left: the same ΔW). PEFT places the
  new adapter on the FIRST source's layers only (silently dropping other sources' layers), so
  a row whose other sources carry layers outside the first one's is refused.

`delta_sum` is not a PEFT type: the plain ΔW-space sum sum_i w_i s_i B_i A_i (no cross terms),
stored exactly as `cat` (rank sum(r_i), scale 1, never rsLoRA), also for k = 1.

PEFT draws DARE masks from torch's global RNG, which cannot be reproduced; here they come from
`jax.random.key(seed)` folded with the projection's number, the source's position in its row
and its index in the stack. A row's merge is therefore a pure function of (seed, row, weights):
batched equals sequential, and masks are drawn rank-major (row j masks A[:, j] and B[j]), so
they do not depend on how much the stack is zero-padded.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Sequence
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlora.errors import JaxloraError
from jaxlora.lora import (
    AdapterStack,
    LoRAConfig,
    _module_index,
    const_values,
    module_dims,
    place_stacked,
    union_placement,
)
from jaxlora.memory.grammar import COMBINATION_TYPES, CombinationType
from jaxlora.models.config import ModelConfig
from jaxlora.models.model import Model, abstract_module
from jaxlora.sharding import compiling_for, constrain, mesh_of

Array = jax.Array
EQUAL_RANK_TYPES = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD_TYPES = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
CONCAT_TYPES = ("cat", "delta_sum")
DENSITY_TYPES = (
    "ties",
    "ties_svd",
    "dare_linear",
    "dare_ties",
    "dare_linear_svd",
    "dare_ties_svd",
    "magnitude_prune",
    "magnitude_prune_svd",
)


class MergeError(JaxloraError):
    """A merge request that cannot be carried out (bad indices, weights, type or ranks)."""


@dataclasses.dataclass(frozen=True)
class _Plan:
    """Everything static about one merge call (the jit cache key)."""

    kind: str  # the combination type after PEFT's k = 1 -> linear rule
    clamp: float | None
    full_matrices: bool
    rank: int  # R of the merged stack (max over rows)

    @property
    def task(self) -> str:
        """The task-arithmetic step: svd types reduce to their non-svd step on ΔW."""
        return "linear" if self.kind == "svd" else self.kind.removesuffix("_svd")


def merge(
    model: Model,
    stack: AdapterStack,
    indices: Sequence[Sequence[int]] | np.ndarray,
    weights: Sequence[Sequence[float]] | np.ndarray,
    combination_type: CombinationType = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    seed: int = 0,
) -> AdapterStack:
    """Q merged adapters, row q combining `stack` adapters `indices[q]` with `weights[q]`.

    Arguments mirror `peft.LoraModel.add_weighted_adapter` (no `svd_driver`: CUDA only);
    `seed` seeds the DARE masks. See the module docstring for the semantics of each type.
    """
    call = merge_call(
        model.config,
        stack,
        indices,
        weights,
        combination_type,
        svd_rank=svd_rank,
        svd_clamp=svd_clamp,
        svd_full_matrices=svd_full_matrices,
        density=density,
        majority_sign_method=majority_sign_method,
        seed=seed,
    )
    arrays = jax.device_put(call.arrays)
    merged = _merge_rows(
        call.plan, call.paths, call.sources, arrays, call.seed, call.layouts, call.mesh
    )
    return _as_stack(model, merged, call.configs, call.names)


@dataclasses.dataclass(frozen=True)
class MergeCall:
    """A merge checked and described on the host, as the one jitted call `_merge_rows` takes it
    (`merge` runs it; `jaxlora plan --aot` compiles it over abstract sources, `aot_memory`)."""

    plan: _Plan
    paths: tuple  # projection paths, grouped by shape and layout
    sources: dict  # {path: (A [n, in, r], B [n, r, out])} of the whole stack
    arrays: dict  # numpy arrays describing each row (`_host_arrays`)
    seed: Array
    configs: tuple[LoRAConfig, ...]  # each merged adapter's
    names: tuple[str, ...]
    layouts: tuple  # per group of paths, the logical axes of its A and B factors
    mesh: Mesh | None  # the stack's: the merged factors keep its split (None: not on a mesh)


def merge_call(
    config: ModelConfig,
    stack: AdapterStack,
    indices: Sequence[Sequence[int]] | np.ndarray,
    weights: Sequence[Sequence[float]] | np.ndarray,
    combination_type: CombinationType = "svd",
    *,
    svd_rank: int | None = None,
    svd_clamp: float | None = None,
    svd_full_matrices: bool = True,
    density: float | None = None,
    majority_sign_method: Literal["total", "frequency"] = "total",
    seed: int = 0,
) -> MergeCall:
    """`merge`'s request checked (a `MergeError` for a bad one) and turned into its call."""
    if combination_type not in COMBINATION_TYPES:
        raise MergeError(
            f"unknown combination_type {combination_type!r}; use one of "
            f"{', '.join(COMBINATION_TYPES)}"
        )
    if majority_sign_method not in ("total", "frequency"):
        raise MergeError(
            f"unknown majority_sign_method {majority_sign_method!r}; use 'total' or 'frequency'"
        )
    if density is not None and not 0.0 < density <= 1.0:
        raise MergeError(f"density must be in (0, 1], got {density!r}")
    if svd_clamp is not None and not 0.0 <= svd_clamp <= 1.0:
        raise MergeError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp!r}")
    if svd_rank is not None and (not isinstance(svd_rank, int) or svd_rank <= 0):
        raise MergeError(f"svd_rank must be a positive integer, got {svd_rank!r}")
    rows = _rows(indices, len(stack))
    w = _weights(weights, rows.shape)
    kind = "linear" if rows.shape[1] == 1 and combination_type != "delta_sum" else combination_type
    if kind in DENSITY_TYPES and density is None:
        raise MergeError(f"combination_type {kind!r} needs density in (0, 1]; got none")
    configs = tuple(
        _merged_config(config, stack, row, q, kind, svd_rank) for q, row in enumerate(rows)
    )
    density = 1.0 if density is None else float(density)
    plan = _Plan(
        kind,
        None if svd_clamp is None else float(svd_clamp),
        bool(svd_full_matrices),
        max(c.rank for c in configs),
    )
    paths, layouts, arrays = _host_arrays(
        config, stack, rows, w, configs, plan, density, majority_sign_method == "frequency"
    )
    flat = dict(nnx.to_flat_state(stack.weights))
    sources = {
        p: (flat[(*p, "lora_a")].get_value(), flat[(*p, "lora_b")].get_value())
        for group in paths
        for p in group
    }
    seed = jnp.asarray(int(seed) % 2**32, jnp.uint32)  # traced: a new seed does not recompile
    names = tuple(_name(stack, row, kind) for row in rows)
    mesh = mesh_of(next(iter(sources.values()))[0])
    return MergeCall(plan, paths, sources, arrays, seed, configs, names, layouts, mesh)


# ---------------------------------------------------------------------------------------------
# host side: checking the request, one config per row, arrays that describe each row


def _rows(indices, n: int) -> np.ndarray:
    try:
        rows = np.asarray(indices)
    except ValueError:  # numpy refuses ragged nested lists
        rows = np.empty(0, object)
    if rows.ndim != 2 or rows.shape[1] == 0 or rows.dtype.kind not in "iu" or rows.shape[0] == 0:
        raise MergeError(
            "indices must be a non-empty [Q, k] grid of adapter indices (every row the same "
            f"length k >= 1); got {_short(indices)}"
        )
    if rows.min() < 0 or rows.max() >= n:
        raise MergeError(f"indices must lie in [0, {n}) for a stack of {n}; got {_short(indices)}")
    return rows.astype(np.int32)


def _weights(weights, shape: tuple[int, int]) -> np.ndarray:
    try:
        w = np.asarray(weights, np.float64)
    except (ValueError, TypeError):
        w = np.empty(0)
    if w.shape != shape or not np.all(np.isfinite(w)):
        raise MergeError(
            f"weights must be finite numbers shaped like indices {list(shape)}; got "
            f"{_short(weights)}"
        )
    return w


def _short(x) -> str:
    text = repr(x.tolist() if isinstance(x, np.ndarray) else x).replace("\n", " ")
    return text if len(text) < 80 else text[:77] + "..."


def _layers(config: LoRAConfig, num_layers: int) -> frozenset[int]:
    return frozenset(range(num_layers) if config.layers is None else config.layers)


def _merged_config(
    config: ModelConfig,
    stack: AdapterStack,
    row: np.ndarray,
    q: int,
    kind: str,
    svd_rank: int | None,
) -> LoRAConfig:
    """The new adapter's config, as PEFT's `_check_add_weighted_adapter` + `replace` make it."""
    src = [stack.configs[i] for i in row]
    ranks = [c.rank for c in src]
    first = src[0]
    residual = [int(i) for i, c in zip(row, src, strict=True) if c.residual]
    if residual:
        raise MergeError(
            f"row {q}: adapter {residual[0]} is a {stack.configs[residual[0]].init} adapter with "
            "its residual correction; merge its PEFT export instead (save_peft, then load_peft)"
        )
    num_layers = config.num_layers
    for i, c in zip(row[1:], src[1:], strict=True):
        if not _layers(c, num_layers) <= _layers(first, num_layers):
            raise MergeError(
                f"row {q}: adapter {i} carries layers outside those of adapter {row[0]} (first "
                "in the row); PEFT keeps only the first source's layers, so put the adapter with "
                "the most layers first or merge adapters on the same layers"
            )
    if kind in EQUAL_RANK_TYPES:
        if len(set(ranks)) > 1:
            raise MergeError(
                f"combination_type {kind!r} needs sources of equal rank, but row {q} has ranks "
                f"{ranks}; use 'cat' or an '*_svd' type (e.g. 'svd', 'ties_svd')"
            )
        rank = ranks[0]
    elif kind in CONCAT_TYPES:
        rank = sum(ranks)
    else:
        rank = svd_rank or max(ranks)
    targets = tuple(sorted({m for c in src for m in c.targets}))
    merged = LoRAConfig(
        rank=rank,
        alpha=float(rank),
        targets=targets,
        layers=first.layers,
        dropout=first.dropout,
        use_rslora=first.use_rslora and kind != "delta_sum",
        init=first.init,
        use_dora=first.use_dora,
    )
    if kind in SVD_TYPES:
        small = [
            (m, min(module_dims(config, m)))
            for m in merged.targets
            if rank > min(module_dims(config, m))
        ]
        if small:
            m, d = small[0]
            raise MergeError(
                f"svd_rank {rank} exceeds min(in, out) = {d} of {m} (row {q}); use svd_rank <= {d}"
            )
    return merged


def _host_arrays(
    config: ModelConfig, stack, rows, w, configs, plan: _Plan, density: float, frequency: bool
) -> tuple[tuple, dict]:
    """Projection paths grouped by shape and layout (the logical axes of their factors), and
    arrays describing each row: factor weights, cat column layout, and per projection its
    pruning counts and live columns."""
    Q, k = rows.shape
    R = plan.rank
    scale = np.array([[stack.configs[i].scale for i in row] for row in rows])
    ranks = np.array([[stack.configs[i].rank for i in row] for row in rows])
    c = w * scale  # PEFT folds each source's scaling into its weight, in Python floats
    sign = np.where(c >= 0, 1.0, -1.0)
    arrays = {
        # traced, not static: one compiled merge serves every density (density 1 prunes
        # nothing through the same code: it keeps all numel entries, DARE keeps with p = 1)
        "density": np.full(Q, density, np.float32),
        "frequency": np.full(Q, frequency),  # the majority sign method, traced for the same reason
        "rows": rows,
        "w": w.astype(np.float32),
        "s": scale.astype(np.float32),
        "c": c.astype(np.float32),
        "wa": (sign * np.sqrt(np.abs(c))).astype(np.float32),
        "wb": np.sqrt(np.abs(c)).astype(np.float32),
    }
    # cat: output column j of row q is column col[q, j] of source src[q, j]
    src = np.zeros((Q, R), np.int32)
    col = np.zeros((Q, R), np.int32)
    for q in range(Q if plan.kind in CONCAT_TYPES else 0):
        pairs = [(j, r) for j in range(k) for r in range(ranks[q, j])]
        src[q, : len(pairs)], col[q, : len(pairs)] = np.array(pairs, np.int32).reshape(-1, 2).T
    arrays["cat_src"], arrays["cat_col"] = src, col
    numbers = _module_index(config)
    groups: dict[tuple, list] = {}  # projections of one shape and layout share one loop body
    flat = dict(nnx.to_flat_state(stack.weights))
    for path, var in flat.items():
        if path[-1] != "lora_a":
            continue
        module_path = path[:-1]
        layer, name = module_path[1], module_path[3]
        live = np.array([cfg.placement().rank_for(layer, name) for cfg in configs])
        if not live.any():
            continue  # no row's merged adapter carries this projection
        d_in, d_out = module_dims(config, name)
        per = {
            "number": np.int32(numbers[module_path]),
            # PEFT keeps int(density * numel) entries of each tensor, numel at the own rank
            "keep_a": _keep(density, ranks * d_in),
            "keep_b": _keep(density, ranks * d_out),
            "keep_d": _keep(density, np.full((Q, k), d_in * d_out)),
            "live": np.arange(R)[None, :] < live[:, None],
        }
        layout = tuple(_axes(v) for v in (var, flat[(*module_path, "lora_b")]))
        groups.setdefault((d_in, d_out, layout), []).append((module_path, per))
    paths = tuple(tuple(p for p, _ in members) for members in groups.values())
    layouts = tuple(layout for *_, layout in groups)
    arrays["groups"] = [
        {n: np.stack([per[n] for _, per in members]) for n in members[0][1]}
        for members in groups.values()
    ]
    return paths, layouts, arrays


def _axes(var: nnx.Variable) -> tuple[str | None, ...]:
    """A factor's logical axes (its `axes` metadata, without the stack's leading axis)."""
    return tuple(var.get_metadata().get("axes", (None, None)))


def _keep(density: float, numel: np.ndarray) -> np.ndarray:
    """int(density * numel) per entry, in Python floats exactly as PEFT computes it."""
    return np.array([[int(density * int(n)) for n in row] for row in numel], np.int32)


def _name(stack: AdapterStack, row: np.ndarray, kind: str) -> str:
    return f"{kind}({','.join(stack.names[i] for i in row)})"


def _as_stack(model: Model, merged: dict, configs, names) -> AdapterStack:
    placement = union_placement(configs)
    _, w_abs, c_abs, _ = abstract_module(model.config, placement, model.dtype, model.param_dtype)

    kernels = dict(nnx.to_flat_state(model.params)) if placement.dora else {}

    def weight(path, var):
        if path[-1] == "lora_magnitude":  # PEFT's fresh magnitudes: ||W|| per output
            kernel = np.asarray(kernels[(*path[:-1], "kernel")].get_value(), np.float32)
            norms = np.linalg.norm(kernel, axis=0)
            return place_stacked(var, np.stack([norms] * len(configs)), model)
        a, b = merged[path[:-1]]
        return place_stacked(var, a if path[-1] == "lora_a" else b, model)

    def const(path, var):
        return place_stacked(var, const_values(configs, path), model)

    return AdapterStack(nnx.map_state(weight, w_abs), nnx.map_state(const, c_abs), configs, names)


# ---------------------------------------------------------------------------------------------
# device side: one jitted call, vmapped over rows


@functools.partial(jax.jit, static_argnames=("plan", "paths", "layouts", "mesh"))
def _merge_rows(
    plan: _Plan,
    paths: tuple,
    sources: dict,
    arrays: dict,
    seed: Array,
    layouts: tuple,
    mesh: Mesh | None = None,
) -> dict:
    """{module path: (A' [Q, in, R], B' [Q, R, out])} for every projection of the merge.

    Projections of one shape and layout are stacked and merged by one `lax.map` body (a loop,
    so memory holds one projection's ΔW at a time and compile time does not grow with depth);
    rows of a projection are `vmap`ped. On a mesh every gathered source and merged factor keeps
    the split of the stack's factors (`layouts`; rows over `adapter`): left to itself, the
    compiler held a group's merged factors whole on every device (an 8B's 16 rank-192 `cat`
    merges: 37 GiB per TPU v5e chip, docs/aot.md)."""
    rows = arrays["rows"]
    key = jax.random.key(seed)
    names = ("density", "frequency", "rows", "w", "s", "c", "wa", "wb", "cat_src", "cat_col")
    row_arrays = {n: arrays[n] for n in names}
    out = {}
    with compiling_for(mesh):
        for group, per, (axes_a, axes_b) in zip(paths, arrays["groups"], layouts, strict=True):
            # the [Q, k, ...] sources of every projection of the group: [M, Q, k, ...]
            a = constrain(
                jnp.stack([sources[p][0][rows] for p in group]), (None, "adapter", None, *axes_a)
            )
            b = constrain(
                jnp.stack([sources[p][1][rows] for p in group]), (None, "adapter", None, *axes_b)
            )

            def body(xs, axes_a=axes_a, axes_b=axes_b):
                a_m, b_m, per_m = xs
                fn = functools.partial(_merge_one, plan, jax.random.fold_in(key, per_m["number"]))
                per_row = {n: per_m[n] for n in ("keep_a", "keep_b", "keep_d", "live")}
                new_a, new_b = jax.vmap(fn)(a_m, b_m, {**row_arrays, **per_row})
                return constrain(new_a, ("adapter", *axes_a)), constrain(
                    new_b, ("adapter", *axes_b)
                )

            new_a, new_b = jax.lax.map(body, (a, b, per))
            new_a = constrain(new_a, (None, "adapter", *axes_a))
            new_b = constrain(new_b, (None, "adapter", *axes_b))
            out.update({p: (new_a[m], new_b[m]) for m, p in enumerate(group)})
    return out


def _merge_one(plan: _Plan, key: Array, a: Array, b: Array, x: dict) -> tuple[Array, Array]:
    """One row, one projection: a [k, in, R0], b [k, R0, out] -> (A' [in, R], B' [R, out])."""
    R = plan.rank
    if plan.kind in CONCAT_TYPES:
        src, col = x["cat_src"], x["cat_col"]
        new_a = (a[src, :, col] * x["c"][src][:, None]).T  # [in, R]
        new_b = b[src, col, :]  # [R, out]
    elif plan.kind in SVD_TYPES:
        delta = jnp.einsum("kir,kro->kio", a, b) * x["s"][:, None, None]  # ΔW_i [k, in, out]
        masks = _dare_masks(plan, key, x, delta.shape[1:])
        merged = _task(plan, delta, x["w"], x["keep_d"], x, masks)
        # the SVD of ΔW^T [out, in] that PEFT takes is this one transposed: U <-> V
        u, s, vh = jnp.linalg.svd(merged, full_matrices=plan.full_matrices)
        n = min(R, s.shape[0])  # R may exceed min(in, out) here when only other rows need it
        new_a = _fit(u[:, :n], 1, R)  # PEFT's A' = Vh_r
        new_b = _fit(s[:n, None] * vh[:n], 0, R)  # PEFT's B' = U_r S_r
        if plan.clamp is not None:
            live = x["live"]
            dist = jnp.concatenate(
                [
                    jnp.where(live[:, None], new_b, jnp.nan).ravel(),
                    jnp.where(live, new_a, jnp.nan).ravel(),
                ]
            )
            hi = jnp.nanquantile(dist, plan.clamp)  # torch.quantile's default: linear
            new_a, new_b = jnp.clip(new_a, -hi, hi), jnp.clip(new_b, -hi, hi)
    else:
        # one draw per source covers A and B: row j of [R0, in + out] masks A[:, j] and B[j],
        # so a source's mask does not depend on how far the stack pads its rank
        d_in, r0 = a.shape[1:]
        masks = _dare_masks(plan, key, x, (r0, d_in + b.shape[2]))
        mask_a = None if masks is None else masks[:, :, :d_in].transpose(0, 2, 1)
        mask_b = None if masks is None else masks[:, :, d_in:]
        new_a = _fit(_task(plan, a, x["wa"], x["keep_a"], x, mask_a), 1, R)
        new_b = _fit(_task(plan, b, x["wb"], x["keep_b"], x, mask_b), 0, R)
    # columns past the row's own rank and projections its adapter does not carry are zero
    live = x["live"]
    return jnp.where(live[None, :], new_a, 0.0), jnp.where(live[:, None], new_b, 0.0)


def _dare_masks(plan: _Plan, key: Array, x: dict, shape: tuple[int, ...]) -> Array | None:
    """DARE's Bernoulli(density) keep masks [k, *shape], one key per source from (projection
    key, position in the row, stack index); None for the other types."""
    if plan.task not in ("dare_linear", "dare_ties"):
        return None
    fold = lambda j, i: jax.random.fold_in(jax.random.fold_in(key, j), i)  # noqa: E731
    keys = jax.vmap(fold)(jnp.arange(x["rows"].shape[0]), x["rows"])
    return jax.vmap(lambda k: jax.random.bernoulli(k, x["density"], shape))(keys)


def _fit(x: Array, axis: int, size: int) -> Array:
    """Slice or zero-pad `axis` to `size`."""
    x = jax.lax.slice_in_dim(x, 0, min(size, x.shape[axis]), axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad)


def _task(plan: _Plan, t: Array, w: Array, keep: Array, x: dict, masks: Array | None) -> Array:
    """PEFT's merge_utils on stacked task tensors t [k, ...] with weights w [k]. PEFT's prune()
    returns a tensor untouched for density >= 1; here density 1 keeps every entry anyway."""
    task = plan.task
    if task in ("ties", "magnitude_prune"):
        t = jax.vmap(_magnitude_prune)(t, keep)
    elif masks is not None:  # DARE: keep with probability density, rescale by 1/density
        t = jnp.where(masks, t, 0.0) / x["density"]
    weighted = t * w.reshape(-1, *(1,) * (t.ndim - 1))
    if task in ("ties", "dare_ties"):
        sign = jnp.sign(t)  # the sign is elected from the unweighted (pruned) tensors
        magnitude = jnp.where(x["frequency"], sign.sum(0), t.sum(0))
        agree = sign == jnp.where(magnitude >= 0, 1.0, -1.0)
        return (weighted * agree).sum(0) / jnp.maximum(agree.sum(0), 1)
    return weighted.sum(0)


def _magnitude_prune(t: Array, keep: Array) -> Array:
    """Keep the `keep` entries of largest |t| (PEFT: topk of |t|); zeros beyond a tensor's own
    rank sort last, so padding never displaces a real entry.

    The threshold, the keep-th largest |t|, is found by bisection over the bits of |t| (a
    non-negative float32 orders as its bits do as an int32): 31 counting passes, 5-25x faster
    than sorting each tensor on a 2-core CPU (benchmarks/bench_prune.py), and the same entry."""
    bits = jax.lax.bitcast_convert_type(jnp.abs(t).astype(jnp.float32), jnp.int32)

    def halve(_, bounds):  # count(bits >= lo) >= keep > count(bits >= hi)
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        enough = jnp.sum(bits >= mid) >= keep
        return jnp.where(enough, mid, lo), jnp.where(enough, hi, mid)

    threshold, _ = jax.lax.fori_loop(0, 31, halve, (jnp.int32(0), jnp.int32(2**31 - 1)))
    # equal magnitudes at the threshold are kept together (topk would pick one): for real-valued
    # weights that needs two entries equal to the bit, and zeros are zero either way
    return jnp.where((bits >= threshold) & (keep > 0), t, 0.0)


__all__ = ["COMBINATION_TYPES", "MergeError", "merge"]
