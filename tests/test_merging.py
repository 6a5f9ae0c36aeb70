"""Merged adapters (`jaxlora.memory.merge`) against PEFT's `add_weighted_adapter`.

Seven random adapters (ranks 2-8, different alphas, one rsLoRA, one on attention only, one on
two modules of one layer) are exported with `save_peft`, loaded into one PEFT model, merged
there and here with the same arguments, and compared by logits. Every merge call uses the same
[Q=2, k=3] shapes where it can, so each combination type compiles once for the whole module.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flax import nnx
from peft import PeftModel

import jaxlora
from jaxlora import lora
from jaxlora.errors import JaxloraError
from jaxlora.memory import COMBINATION_TYPES, MergeError, merge
from jaxlora.memory.merging import SVD_TYPES
from jaxlora.models.transformer import LINEAR_MODULES, LoRAPlacement
from tests.hf_factory import load_hf_model

CONFIGS = [
    lora.LoRAConfig(rank=4, alpha=8.0),
    lora.LoRAConfig(rank=4, alpha=16.0),
    lora.LoRAConfig(rank=4, alpha=2.0, targets="attention"),
    lora.LoRAConfig(rank=8, alpha=8.0),
    lora.LoRAConfig(rank=2, alpha=6.0),
    lora.LoRAConfig(rank=4, alpha=8.0, use_rslora=True),
    lora.LoRAConfig(rank=4, alpha=4.0, targets=("v_proj", "down_proj"), layers=(1,)),
]
# s_i by hand (alpha/r, alpha/sqrt(r) for rsLoRA), not through LoRAConfig.scale
SCALES = [2.0, 4.0, 0.5, 1.0, 3.0, 4.0, 1.0]
# Q = 3 rows of k = 3. Equal ranks within a row (adapter 2 lacks the MLP, adapter 5 is rsLoRA,
# the last row has rank 8, so rows differ in rank); mixed ranks (adapter 6 lives on layer 1
# only; the second row starts with the rsLoRA adapter; svd ranks 8, 4, 4 and cat 14, 10, 10).
EQUAL = (
    [[0, 1, 2], [1, 5, 0], [3, 3, 3]],
    [[0.7, -0.4, 1.1], [0.5, 0.9, 0.3], [1.0, -0.5, 0.25]],
)
MIXED = (
    [[3, 6, 4], [5, 0, 4], [4, 0, 2]],
    [[0.6, 1.3, -0.8], [0.4, 0.5, 0.7], [0.9, -0.3, 0.6]],
)
FIXED = lora.LoRAConfig(rank=16)  # 16 >= every merged rank here


@pytest.fixture(scope="module")
def lib(hf_checkpoint, tmp_path_factory):
    path = hf_checkpoint("llama")
    model = jaxlora.load_pretrained(path)
    stack = lora.init_adapters(model, CONFIGS, list(range(7)))
    # random B inside each adapter's own rank and targets (A is non-zero exactly there)
    rng = np.random.default_rng(0)

    def fill(p, var):
        if p[-1] != "lora_b":
            return var
        a = np.asarray(stack.weights[p[0]][p[1]][p[2]][p[3]]["lora_a"].get_value())
        live = np.any(a != 0, axis=1)[:, :, None]  # [A, R, 1]
        return var.replace(np.float32(0.3 * rng.standard_normal(var.get_value().shape) * live))

    stack = lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )
    out = tmp_path_factory.mktemp("merge-adapters")
    for i in range(len(CONFIGS)):
        jaxlora.save_peft(model, stack, i, out / f"a{i}")
    peft = PeftModel.from_pretrained(load_hf_model(path), out / "a0", adapter_name="a0")
    for i in range(1, len(CONFIGS)):
        peft.load_adapter(out / f"a{i}", adapter_name=f"a{i}")
    peft.eval()
    ids = np.random.default_rng(1).integers(10, 500, (2, 12))
    with torch.no_grad():
        base = peft.get_base_model()(input_ids=torch.tensor(ids)).logits.numpy()
    return model, stack, peft, ids, base


def logits(model, merged, ids):
    """Logits [Q, B, T, V] of a merged stack, padded to one placement so that the forward
    compiles once for the module (its configs only name the placement; the scales that the
    forward uses are in `consts`, which pad_to keeps)."""
    placement = LoRAPlacement(16, frozenset(LINEAR_MODULES))
    padded = lora.pad_to(model, merged, placement)
    fixed = lora.AdapterStack(padded.weights, padded.consts, (FIXED,) * len(merged), merged.names)
    return np.asarray(model(np.repeat(ids[None], len(merged), 0), adapters=fixed))


def peft_merge(peft, ids, name, row, weights, combination_type, **kw):
    peft.add_weighted_adapter(
        [f"a{i}" for i in row], [float(w) for w in weights], name, combination_type, **kw
    )
    peft.set_adapter(name)
    with torch.no_grad():
        return peft(input_ids=torch.tensor(ids)).logits.numpy(), peft.peft_config[name]


def delta(stack, q):
    """ΔW [in, out] per projection of adapter q, as float64 numpy (lora.delta_weights)."""
    return {p: np.asarray(d, np.float64) for p, d in lora.delta_weights(stack, q).items()}


# (combination type, rows, keyword arguments shared verbatim by PEFT and jaxlora)
PARITY = {
    "linear": ("linear", EQUAL, {}),
    "cat": ("cat", MIXED, {}),
    "svd": ("svd", MIXED, {}),
    "svd-rank-reduced": ("svd", MIXED, dict(svd_rank=5, svd_full_matrices=False)),
    "ties-total": ("ties", EQUAL, dict(density=0.5)),
    "ties-frequency": ("ties", EQUAL, dict(density=0.3, majority_sign_method="frequency")),
    "ties_svd": ("ties_svd", MIXED, dict(density=0.6, majority_sign_method="frequency")),
    "magnitude_prune": ("magnitude_prune", EQUAL, dict(density=0.4)),
    "magnitude_prune_svd": ("magnitude_prune_svd", MIXED, dict(density=0.5)),
    # DARE's Bernoulli mask comes from torch's global RNG; at density 1 it keeps everything
    "dare_linear-d1": ("dare_linear", EQUAL, dict(density=1.0)),
    "dare_ties-d1": ("dare_ties", EQUAL, dict(density=1.0)),
    "dare_linear_svd-d1": ("dare_linear_svd", MIXED, dict(density=1.0)),
    "dare_ties_svd-d1": ("dare_ties_svd", MIXED, dict(density=1.0)),
}


@pytest.mark.parametrize("case", list(PARITY))
def test_merge_matches_peft_add_weighted_adapter(lib, case):
    model, stack, peft, ids, base = lib
    combination_type, (rows, weights), kw = PARITY[case]
    merged = merge(model, stack, rows, weights, combination_type, **kw)
    ours = logits(model, merged, ids)
    for q, (row, w) in enumerate(zip(rows, weights, strict=True)):
        ref, config = peft_merge(peft, ids, f"{case}-{q}", row, w, combination_type, **kw)
        mine = merged.configs[q]
        assert (mine.rank, mine.alpha, mine.use_rslora) == (
            config.r,
            config.lora_alpha,
            config.use_rslora,
        )
        assert set(mine.targets) == set(config.target_modules)
        moved = np.abs(ref - base).max()
        # float32 forwards in torch and XLA (different sum orders): logits of size ~5 agree to
        # ~2e-5, so 1e-4 is the floor. svd types add two float32 SVDs truncated inside a
        # spectrum, whose difference grows as the gap at the truncation closes (_svd_bound);
        # the case must stay decisive: a wrong weight, sign, prune or scale moves the logits
        # by ~`moved` (> 1e-2)
        bound = 1e-4
        if combination_type in SVD_TYPES:
            bound += _svd_bound(stack, row, w, combination_type, mine.rank, kw) * moved
            assert bound < 0.01 * moved, f"{case} row {q}: the gap at the truncation is too narrow"
        assert np.abs(ours[q] - ref).max() < bound
        assert moved > 1e-2


def _svd_bound(stack, row, weights, combination_type: str, rank: int, kw: dict) -> float:
    """Relative change of the merged ΔW that float32 SVDs may cause, from the spectral gap.

    Each library's float32 SVD of the merged M (formed in float32 too) is the exact SVD of
    M + E with ||E|| ~ c eps ||M|| (backward stability), c = sqrt(min(in, out)) as rounding
    errors of that many independent steps add up in norm. Truncated at r, Wedin's sin-theta theorem with Weyl's inequality bounds the
    rotation of the kept singular subspaces by ||E|| / (gap - ||E||), gap = s_r - s_(r+1),
    so ||[M + E]_r - [M]_r|| <= ||E|| (1 + 2 s_1 / (gap - ||E||)). Relative to ||M|| = s_1,
    and doubled for the two libraries, this is the fraction of the merge's own effect on the
    logits that the two SVDs may disagree by (first order). Narrow gaps (the ill-conditioned
    truncation) give a wide bound, which the caller refuses past 5% of the effect.
    """
    eps = float(np.finfo(np.float32).eps)
    deltas = [delta(stack, i) for i in row]
    worst = 0.0
    for p in set().union(*deltas):
        t = np.stack([d.get(p, np.zeros_like(next(iter(d.values())))) for d in deltas])
        m = _task_reference(t, np.asarray(weights, np.float64), combination_type, kw)
        s = np.linalg.svd(m, compute_uv=False)
        if s[0] == 0.0:
            continue
        e = np.sqrt(min(m.shape)) * eps * s[0]
        gap = s[rank - 1] - (s[rank] if rank < len(s) else 0.0) if rank <= len(s) else s[0]
        if gap <= e:
            return np.inf
        worst = max(worst, 2 * (e / s[0]) * (1 + 2 * s[0] / (gap - e)))
    return worst


def _task_reference(t: np.ndarray, w: np.ndarray, combination_type: str, kw: dict) -> np.ndarray:
    """The merged ΔW before the SVD (float64): the weighted sum, or TIES on the ΔW_i (PEFT's
    magnitude prune to `density`, sign elected from the pruned stack, disjoint mean)."""
    task = "linear" if combination_type == "svd" else combination_type.removesuffix("_svd")
    if task in ("ties", "magnitude_prune"):
        keep = int(kw.get("density", 1.0) * t[0].size)
        for i in range(len(t)):
            flat = np.abs(t[i]).ravel()
            threshold = np.sort(flat)[max(flat.size - keep, 0)] if keep else np.inf
            t[i] = np.where(np.abs(t[i]) >= threshold, t[i], 0.0)
    weighted = t * w[:, None, None]
    if task in ("ties", "dare_ties"):
        sign = np.sign(t)
        frequency = kw.get("majority_sign_method", "total") == "frequency"
        magnitude = sign.sum(0) if frequency else t.sum(0)
        agree = sign == np.where(magnitude >= 0, 1.0, -1.0)
        return (weighted * agree).sum(0) / np.maximum(agree.sum(0), 1)
    return weighted.sum(0)


def test_svd_clamp_is_peft_clamp_up_to_singular_vector_signs(lib):
    """PEFT clamps U_r S_r and V_r^T to the `svd_clamp` quantile of their signed entries, so
    the result depends on the SVD's sign choices (MKL's and XLA's differ). Align PEFT's factors
    to our signs, clamp them with torch.quantile, and compare with our clamped factors."""
    model, stack, peft, ids, _ = lib
    rows, weights = MIXED
    kw = dict(svd_rank=5, svd_full_matrices=False)  # plain: compiled for the parity test
    plain = merge(model, stack, rows, weights, "svd", **kw)
    clamped = merge(model, stack, rows, weights, "svd", svd_clamp=0.8, **kw)
    ours_plain = {p: a for p, a, _ in _factor_leaves(plain)}
    ours_clamped = {p: (a, b) for p, a, b in _factor_leaves(clamped)}
    clipped = 0
    for q in range(3):
        peft_merge(peft, ids, f"clamp-{q}", rows[q], weights[q], "svd", **kw)
        for path, a in ours_plain.items():
            module = peft.base_model.model.model.layers[path[1]]
            module = getattr(getattr(module, path[2]), path[3])
            pa = module.lora_A[f"clamp-{q}"].weight.detach().double()  # [r, in]
            pb = module.lora_B[f"clamp-{q}"].weight.detach().double()  # [out, r]
            a_q = torch.tensor(np.asarray(a, np.float64)[q, :, :5])  # [in, r]
            sign = torch.sign((pa * a_q.T).sum(1))  # +-1 per singular vector
            pa, pb = pa * sign[:, None], pb * sign[None, :]
            hi = torch.quantile(torch.cat([pb.flatten(), pa.flatten()]), 0.8)
            want_a, want_b = pa.clamp(-hi, hi), pb.clamp(-hi, hi)
            got_a, got_b = (np.asarray(x)[q] for x in ours_clamped[path])
            clipped += int((want_a.abs() == hi).sum())
            # float32 SVDs of the same ΔW (factors of size ~0.1 agree to ~1e-6)
            np.testing.assert_allclose(got_a[:, :5], want_a.T.numpy(), atol=2e-5)
            np.testing.assert_allclose(got_b[:5], want_b.T.numpy(), atol=2e-5)
    assert clipped > 100  # the clamp bites


def test_delta_sum_is_the_exact_weighted_sum_of_deltas(lib):
    model, stack, _, _, _ = lib
    rows, weights = MIXED
    merged = merge(model, stack, rows, weights, "delta_sum")
    raw = {
        p: (np.asarray(a, np.float64), np.asarray(b, np.float64))
        for p, a, b in _factor_leaves(stack)
    }
    for q, (row, w) in enumerate(zip(rows, weights, strict=True)):
        assert merged.configs[q].rank == sum(CONFIGS[i].rank for i in row)
        assert merged.configs[q].scale == 1.0 and not merged.configs[q].use_rslora
        got = delta(merged, q)
        assert set(got) == {(*p, "kernel") for p in raw}
        for p, (a, b) in raw.items():
            want = sum(
                wi * SCALES[i] * a[i, :, : CONFIGS[i].rank] @ b[i, : CONFIGS[i].rank]
                for i, wi in zip(row, w, strict=True)
            )
            # float32 factors multiplied in float32 (<= 64-term sums) vs float64 here
            np.testing.assert_allclose(got[(*p, "kernel")], want, rtol=1e-5, atol=1e-6)


def _factor_leaves(stack):
    """(module path, A [A, in, R], B [A, R, out]) of every projection the stack carries."""
    flat = dict(nnx.to_flat_state(stack.weights))
    for p in flat:
        if p[-1] == "lora_a":
            yield p[:-1], flat[p].get_value(), flat[(*p[:-1], "lora_b")].get_value()


def test_one_source_with_weight_one_is_that_adapter(lib):
    model, stack, peft, ids, _ = lib
    alone = stack.select([3])
    want = delta(alone, 0)
    ours = None
    for combination_type in ("linear", "ties", "svd", "cat", "dare_ties", "delta_sum"):
        # PEFT turns every type into `linear` for one source (density is then unused)
        merged = merge(
            model, stack, [[3], [5], [0]], [[1.0], [0.5], [1.0]], combination_type, density=0.5
        )
        assert merged.configs[0].rank == 8 and merged.configs[0].scale == 1.0
        got = delta(merged, 0)
        assert set(got) == set(want)
        for p in want:
            # sqrt(s) on both factors: one float32 rounding of s = 1 away from the source
            np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7)
        ours = merged if combination_type == "ties" else ours
    # the merged stack as it comes (no padding) runs in the model, with the source's logits
    single = np.asarray(model(ids[None], adapters=ours.select([0])))[0]
    np.testing.assert_allclose(single, np.asarray(model(ids[None], adapters=alone))[0], atol=1e-5)
    # an rsLoRA source alone: PEFT's merged adapter keeps use_rslora with alpha = r, so its
    # scale is sqrt(r) = 2, not 1; we reproduce PEFT rather than the "obvious" result
    ref, config = peft_merge(peft, ids, "one-rslora", [5], [0.5], "ties", density=0.5)
    assert config.use_rslora and ours.configs[1].scale == 2.0
    # torch vs XLA float32 forwards (see test_merge_matches_peft_add_weighted_adapter)
    assert np.abs(logits(model, ours, ids)[1] - ref).max() < 1e-4


def test_batched_rows_equal_each_row_alone_from_any_padding(lib):
    """Q rows in one call == each row merged alone, here from a stack padded to rank 16: DARE's
    masks (seeded per projection, position and source, drawn rank-major) and the per-row ranks
    (4, 4 and 8, so the batch pads rows to 8) must not depend on the batch or the padding."""
    model, stack, _, _, _ = lib
    wider = lora.pad_to(model, stack, LoRAPlacement(16, frozenset(LINEAR_MODULES)))
    rows, weights = EQUAL
    kw = dict(density=0.6, seed=3)
    batched = merge(model, stack, rows, weights, "dare_ties", **kw)
    for q in range(3):
        alone = merge(model, wider, rows[q : q + 1], weights[q : q + 1], "dare_ties", **kw)
        assert batched.configs[q] == alone.configs[0]
        got, want = delta(batched, q), delta(alone, 0)
        assert set(want) <= set(got)  # the batch carries every row's projections
        for p in got:
            # the same math on other shapes (XLA may fuse the sums differently): float32 ulps
            np.testing.assert_allclose(got[p], want.get(p, 0.0), rtol=1e-5, atol=1e-7)


def test_dare_keeps_a_density_fraction_rescaled(lib):
    model, stack, _, _, _ = lib
    density = 0.3
    rows, _ = EQUAL
    # weight 0 for the other sources: row 0's A' is sqrt(s_0) * mask * A_0 / density exactly
    merged = merge(model, stack, rows, [[1.0, 0.0, 0.0]] * 3, "dare_linear", density=density)
    kept = total = 0
    masks = []
    new = {p: (a, b) for p, a, b in _factor_leaves(merged)}
    for p, a_src, b_src in _factor_leaves(stack):
        for src, out in ((a_src, new[p][0]), (b_src, new[p][1])):
            y = np.asarray(out)[0]
            # the source stack is padded to rank 8; adapter 0 and the merge have rank 4
            x = np.asarray(src)[0][tuple(slice(0, n) for n in y.shape)]
            live = x != 0
            keep = live & (y != 0)
            kept, total = kept + keep.sum(), total + live.sum()
            masks.append(keep[live])
            # sqrt(s) x / density in float32 there, float64 here: two roundings (~1e-7 relative)
            np.testing.assert_allclose(y[keep], np.sqrt(SCALES[0]) * x[keep] / density, rtol=1e-6)
            assert not np.any(y[~live])
    # kept ~ Binomial(n, p): n ~ 8000 here, so its sd is sqrt(p(1-p)/n) ~ 0.005 as a fraction;
    # 5 sd (a normal tail of 6e-7) bounds the fraction to within ~0.026 of p
    bound = 5 * np.sqrt(density * (1 - density) / total)
    assert abs(kept / total - density) < bound, (kept / total, bound)
    # independent masks: the first two projections' A masks are not the same draw
    n = min(len(masks[0]), len(masks[2]))
    assert not np.array_equal(masks[0][:n], masks[2][:n])


@pytest.mark.parametrize("combination_type", ["dare_ties", "dare_linear_svd"])
def test_dare_is_seeded(lib, combination_type):
    model, stack, _, _, _ = lib
    rows, weights = EQUAL if combination_type == "dare_ties" else MIXED
    run = lambda seed: delta(  # noqa: E731
        merge(model, stack, rows, weights, combination_type, density=0.5, seed=seed), 0
    )
    first, again, other = run(0), run(0), run(1)
    for p in first:
        np.testing.assert_array_equal(first[p], again[p])
    assert max(np.abs(first[p] - other[p]).max() for p in first) > 1e-3


@pytest.mark.parametrize(
    ("dare", "plain", "rows_weights", "kw"),
    [
        ("dare_linear", "linear", EQUAL, {}),
        ("dare_ties", "ties", EQUAL, dict(density=1.0)),
        ("dare_linear_svd", "svd", MIXED, {}),
        ("dare_ties_svd", "ties_svd", MIXED, dict(density=1.0, majority_sign_method="frequency")),
    ],
)
def test_dare_at_density_one_is_the_undropped_type(lib, dare, plain, rows_weights, kw):
    model, stack, _, _, _ = lib
    rows, weights = rows_weights
    one = merge(model, stack, rows, weights, dare, **{"density": 1.0, **kw})
    ref = merge(model, stack, rows, weights, plain, **kw)
    for q in range(3):
        got, want = delta(one, q), delta(ref, q)
        for p in want:
            # density 1 keeps all and divides by 1.0: the same float32 math, which XLA may fuse
            # otherwise (a few ulps); a dropped entry moves ΔW by ~1e-2
            np.testing.assert_allclose(got[p], want[p], rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------
# errors


@pytest.mark.parametrize(
    ("args", "kw", "needle"),
    [
        (([[0, 1]], [[1, 1]], "mean"), {}, "'mean'; use one of svd, linear, cat, ties"),
        (([[0, 1], [2]], [[1, 1], [1]], "cat"), {}, "[Q, k] grid"),
        (([[0, 7]], [[1, 1]], "cat"), {}, "indices must lie in [0, 7)"),
        (([[0, -1]], [[1, 1]], "cat"), {}, "indices must lie in [0, 7)"),
        (([], [], "cat"), {}, "[Q, k] grid"),
        (([[0, 1]], [[1, 1, 1]], "cat"), {}, "weights must be finite numbers shaped like"),
        (([[0, 1]], [[1, float("nan")]], "cat"), {}, "weights must be finite"),
        (([[0, 1]], [[1, 1]], "ties"), dict(density=0.0), "density must be in (0, 1]"),
        (([[0, 1]], [[1, 1]], "ties"), dict(density=1.5), "density must be in (0, 1]"),
        (([[0, 1]], [[1, 1]], "ties"), {}, "'ties' needs density"),
        (([[0, 1]], [[1, 1]], "ties"), dict(density=0.5, majority_sign_method="max"), "'max'"),
        (([[0, 3]], [[1, 1]], "linear"), {}, "ranks [4, 8]; use 'cat' or an '*_svd' type"),
        (([[4, 0]], [[1, 1]], "dare_ties"), dict(density=0.5), "ranks [2, 4]"),
        (([[6, 0]], [[1, 1]], "cat"), {}, "adapter 0 carries layers outside those of adapter 6"),
        (([[0, 3]], [[1, 1]], "svd"), dict(svd_rank=40), "exceeds min(in, out) = 32 of k_proj"),
        (([[0, 3]], [[1, 1]], "svd"), dict(svd_clamp=2.0), "svd_clamp is a quantile"),
    ],
)
def test_bad_merges_give_one_line_errors(lib, args, kw, needle):
    model, stack, _, _, _ = lib
    with pytest.raises(MergeError) as e:
        merge(model, stack, *args, **kw)
    assert isinstance(e.value, JaxloraError)
    assert needle in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_every_peft_type_is_offered():
    peft_types = {
        "svd", "linear", "cat", "ties", "ties_svd", "dare_ties", "dare_linear",
        "dare_ties_svd", "dare_linear_svd", "magnitude_prune", "magnitude_prune_svd",
    }  # fmt: skip
    assert set(COMBINATION_TYPES) == peft_types | {"delta_sum"}
