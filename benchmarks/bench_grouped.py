"""Many adapters in one decoding pass: each row's adapter gathered, or the rows grouped.

The engine's two ways to decode a pass of B rows over a library of G adapters
(`jaxlora.llm.engine.Engine._routed`):

- *per row*: every row's adapter gathered once per pass into a stack of B one-row adapters
  (B copies of the factors), the model vmapped over it (`generate_routed`);
- *grouped*: the rows sorted by adapter, the U distinct adapters of the pass gathered once (U
  copies), every adapted projection one `jax.lax.ragged_dot` over them (`jaxlora.grouped`).

On this machine's backend (default): seconds per pass (median of `--repeat` after one compiling
pass) for mixes of the B rows from all different adapters (U = B) to one (U = 1). The two paths
must return the same tokens.

With `--aot TOPOLOGY` (libtpu's compile-only devices, the `tpu-aot` extra): both programs
compiled for ONE chip of that TPU on a `*-shape` preset, for the same mixes, and the compiler's
memory per chip (arguments, temporaries).

    python -m benchmarks.bench_grouped                          # small-llama, 33 adapters, 32 rows
    python -m benchmarks.bench_grouped --aot v5e:2x2 --model llama-3.2-1b-shape --adapters 64 \
        --rows 64 --rank 16
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import report
from jaxlora.generate import DecodeSpec
from jaxlora.grouped import Grouping, decode_active, weights_placement
from jaxlora.llm.engine import _routed_decode


def mixes(rows: int, adapters: int) -> dict[int, np.ndarray]:
    """Adapter slots of the rows (sorted, as a pass sorts them) by number of distinct adapters
    U: every row its own (U = min(B, G)), a quarter of that, and one."""
    out = {}
    for u in sorted({min(rows, adapters), max(1, min(rows, adapters) // 4), 1}, reverse=True):
        out[u] = np.sort(np.arange(rows) % u)
    return out


def timed(fn, repeat: int) -> tuple[float, np.ndarray]:
    out = fn()  # compiles
    runs = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        runs.append(time.perf_counter() - t0)
    return statistics.median(runs), out


def on_this_backend(args) -> None:
    import jaxlora
    from jaxlora import lora

    model = jaxlora.load_pretrained(args.model)
    G = args.adapters
    stack = lora.init_adapters(
        model, [lora.LoRAConfig(rank=args.rank)] * G, range(G), [f"a{i}" for i in range(G)]
    )
    rng = np.random.default_rng(0)
    ids = jnp.asarray(rng.integers(3, 200, (args.rows, args.width)), jnp.int32)
    mask = jnp.ones(ids.shape, bool)
    spec = DecodeSpec(args.new_tokens, (), 0)
    per_row_graph = model.graph(weights_placement(stack, model.config.num_layers))
    results = {
        "model": args.model,
        "backend": jax.default_backend(),
        "adapters": G,
        "rank": args.rank,
        "rows x width + new": f"{args.rows} x {args.width} + {args.new_tokens}",
    }
    for u, slots in mixes(args.rows, G).items():
        name = f"U={u}"

        def per_row(slots=slots):
            slots_B = jnp.asarray(slots, jnp.int32)
            out = _routed_decode(
                per_row_graph,
                model.params,
                stack.weights,
                stack.consts,
                slots_B,
                ids,
                mask,
                spec,
                None,
            )
            return np.asarray(out)

        def grouped(slots=slots):
            g = Grouping.of(slots, len(stack), len(slots))
            out = decode_active(
                g.graph(model, stack), model.params, stack.weights, stack.consts,
                jnp.asarray(g.active), jnp.asarray(g.rows), ids, mask, spec, None,
            )  # fmt: skip
            return np.asarray(out)

        t_row, a = timed(per_row, args.repeat)
        t_grouped, b = timed(grouped, args.repeat)
        if not (a == b).all():
            raise SystemExit(f"{name}: grouped and per-row decoding differ")
        results[f"{name}: per row s"] = round(t_row, 3)
        results[f"{name}: grouped s"] = round(t_grouped, 3)
        results[f"{name}: grouped / per row"] = round(t_grouped / t_row, 2)
    report("decoding a pass of many adapters: per row vs grouped", results)


def on_a_tpu_chip(args) -> None:
    from jaxlora.aot import compile_program
    from jaxlora.aot_serve import serving_programs

    programs = serving_programs(
        args.model,
        args.aot,
        adapters=args.adapters,
        rows=args.rows,
        rank=args.rank,
        width=args.width,
        new_tokens=args.new_tokens,
        active=list(mixes(args.rows, args.adapters)),
        dtype=args.dtype,
    )
    results = {
        "topology": f"{args.aot}, one chip",
        "model": f"{args.model} ({args.dtype})",
        "adapters x rank": f"{args.adapters} x {args.rank} (every linear module, float32)",
        "rows x width + new": f"{args.rows} x {args.width} + {args.new_tokens}",
    }
    for p in programs:
        out = compile_program(p)
        if out.error:
            results[f"{p.name}: refused"] = out.error
            continue
        results[f"{p.name}: temporaries MiB"] = round(out.temporaries / 2**20, 1)
    results["arguments MiB (base + library)"] = round(out.arguments / 2**20, 1)
    report("decoding a pass of many adapters on one TPU chip: per row vs grouped", results)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="small-llama")
    p.add_argument("--adapters", type=int, default=33, help="the library (a server's slot 0 too)")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--rows", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--aot", metavar="TOPOLOGY", help="compile for one chip of a TPU topology")
    p.add_argument("--dtype", default="bfloat16", help="with --aot")
    args = p.parse_args()
    if args.aot:
        on_a_tpu_chip(args)
    else:
        on_this_backend(args)


if __name__ == "__main__":
    main()
