"""LoRA A products that share an input: one matmul per projection vs one for all of them.

q, k and v read the same normed hidden states, as do gate and up; their LoRA A products
x @ A_q, x @ A_k, x @ A_v could be one x @ [A_q | A_k | A_v]. This times both ways, forward
and backward (gradients of every A and B and of x, as in training), vmapped over a stack of
adapters, at the shapes of one layer of a training step, and relates the saving to the step
it would come from. No dropout: with LoRA dropout each projection reads its own masked copy
of x, so there is no shared input to fuse.

    python -m benchmarks.bench_fused_lora                       # small-llama's widths on CPU
    python -m benchmarks.bench_fused_lora --width 4096 --kv 1024 --ffn 14336 --rank 16
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import report


def lora_out(x, As, Bs, fused: bool):
    """sum_i (x @ A_i) @ B_i as the loss's stand-in, either A product separately or fused."""
    if fused:
        h = x @ jnp.concatenate(As, axis=1)
        parts = jnp.split(h, len(As), axis=1)
    else:
        parts = [x @ a for a in As]
    return sum(jnp.sum(jnp.tanh(p @ b)) for p, b in zip(parts, Bs, strict=True))


def timed(fn, args, repeats: int) -> float:
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=256, help="hidden size (small-llama: 256)")
    p.add_argument("--kv", type=int, default=128, help="k/v projection width")
    p.add_argument("--ffn", type=int, default=1024, help="MLP width")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--tokens", type=int, default=512, help="batch x length per adapter")
    p.add_argument("--repeats", type=int, default=50)
    args = p.parse_args()
    rng = np.random.default_rng(0)
    n, t, d, r = args.adapters, args.tokens, args.width, args.rank

    def arr(*shape):
        return jnp.asarray(rng.normal(0, 0.05, shape), jnp.float32)

    rows = {}
    for name, outs in (("q/k/v", [d, args.kv, args.kv]), ("gate/up", [args.ffn, args.ffn])):
        x = arr(n, t, d)
        As = [arr(n, d, r) for _ in outs]
        Bs = [arr(n, r, o) for o in outs]
        for fused in (False, True):
            grad = jax.grad(lambda x, As, Bs, f=fused: lora_out(x, As, Bs, f), argnums=(0, 1, 2))
            step = jax.jit(jax.vmap(grad))
            rows[name, fused] = timed(step, (x, As, Bs), args.repeats)
        sep, fus = rows[name, False], rows[name, True]
        print(
            f"{name:>8}: separate {sep * 1e3:7.2f} ms  fused {fus * 1e3:7.2f} ms  "
            f"saving {(sep - fus) * 1e3:6.2f} ms per layer ({sep / fus:.2f}x)"
        )
    report(
        "bench_fused_lora",
        {
            "settings": vars(args),
            "ms": {f"{k[0]} {'fused' if k[1] else 'separate'}": v * 1e3 for k, v in rows.items()},
        },
    )


if __name__ == "__main__":
    main()
