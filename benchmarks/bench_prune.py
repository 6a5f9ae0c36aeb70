"""TIES's magnitude pruning: the keep-th largest |t| found by bisection over its bits
(`jaxlora.memory.merging._magnitude_prune`) against sorting each tensor for it (what it did
before, as PEFT's `torch.topk` does).

One merge pass of the memory findings (configs/findings_memory_smollm2.yaml: 32 questions, the
top 4 rank-16 adapters each) prunes 128 copies of every LoRA factor of SmolLM2-135M; the
largest are B [1536, 16] (MLP up/gate) and A [16, 1536] (down), the smallest A [16, 576]. Both
sides get the same tensors and the same per-copy `keep` (density 0.5, some copies padded past
their rank), are checked equal entry for entry, then timed.

    python -m benchmarks.bench_prune
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import report, timed
from jaxlora.memory.merging import _magnitude_prune


def sorted_prune(t: jax.Array, keep: jax.Array) -> jax.Array:
    """The threshold from a sort of |t|: the previous implementation, the reference here."""
    flat = jnp.abs(t).ravel()
    threshold = jnp.sort(flat)[jnp.clip(flat.size - keep, 0, flat.size - 1)]
    return jnp.where((jnp.abs(t) >= threshold) & (keep > 0), t, 0.0)


def seconds(fn, t: jax.Array, keep: jax.Array, repeat: int) -> float:
    return timed(lambda: fn(t, keep).block_until_ready(), repeat)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--copies", type=int, default=128, help="tensors pruned per call (vmap)")
    p.add_argument("--repeat", type=int, default=5)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    results = {}
    for shape in [(1536, 16), (16, 1536), (16, 576)]:
        t = jnp.asarray(rng.standard_normal((args.copies, *shape), np.float32))
        size = shape[0] * shape[1]
        keep = np.full(args.copies, size // 2, np.int32)
        keep[::4] = size // 4  # a copy padded to twice its rank keeps half of its real entries
        keep = jnp.asarray(keep)
        bisect, by_sort = jax.jit(jax.vmap(_magnitude_prune)), jax.jit(jax.vmap(sorted_prune))
        np.testing.assert_array_equal(np.asarray(bisect(t, keep)), np.asarray(by_sort(t, keep)))
        s_bisect = seconds(bisect, t, keep, args.repeat)
        s_sort = seconds(by_sort, t, keep, args.repeat)
        name = "x".join(map(str, shape))
        results[f"{name}_bisect_ms"] = round(1e3 * s_bisect, 1)
        results[f"{name}_sort_ms"] = round(1e3 * s_sort, 1)
        results[f"{name}_speedup"] = round(s_sort / s_bisect, 2)
    report(f"TIES magnitude pruning, {args.copies} copies per call", results)


if __name__ == "__main__":
    main()
