"""Composed evaluation: every question gets its own merge of its top-k adapters, then decodes.

jaxlora: `jaxlora.memory.merge` builds the merged adapters of `--batch` questions in one vmapped
op, and `decode_stack` decodes them together (vmap over per-question adapters, KV cache). The
study's loop: per question, PEFT `add_weighted_adapter` over the routed adapters, `set_adapter`,
`generate`, `delete_adapter`. Both sides merge the same sources with the same type and decode
greedily for `--new-tokens` tokens; routing is not timed (the indices are given).

    python -m benchmarks.bench_memory --questions 256 --k 3 --combination ties --peft
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax
import numpy as np

import jaxlora
from benchmarks.common import peft_library, report, timed
from jaxlora import data as kdata
from jaxlora import lora
from jaxlora.config import DataSection, EvalSection
from jaxlora.evaluate import build_questions
from jaxlora.generate import DecodeSpec, decode_stack, eos_and_pad
from jaxlora.memory import merge


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--library", type=int, default=16, help="adapters in the library")
    p.add_argument("--questions", type=int, default=256)
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--combination", default="ties")
    p.add_argument("--batch", type=int, default=64, help="questions per merged decoding pass")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--peft", action="store_true", help="also time the study's PEFT loop")
    p.add_argument(
        "--peft-questions", type=int, default=32, help="questions the (slow) PEFT loop times"
    )
    args = p.parse_args()

    model = jaxlora.load_pretrained(args.model)
    L, Q, k, B = args.library, args.questions, args.k, args.batch
    stack = lora.init_adapters(model, [lora.LoRAConfig(rank=args.rank)] * L, list(range(L)))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(
        lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), stack.weights
    )
    stack = lora.AdapterStack(weights, stack.consts, stack.configs, stack.names)
    routes = np.stack([rng.choice(L, size=k, replace=False) for _ in range(Q)])
    merge_kw = dict(combination_type=args.combination, density=0.5, majority_sign_method="total")

    records = kdata.phonebook_records(model.tokenizer, size_rows=Q, seed=0)
    questions = build_questions(
        records, model.tokenizer, DataSection(max_length=128), EvalSection()
    )
    T = max(len(q.prompt) for q in questions)
    pad_id = model.tokenizer.pad_token_id
    ids = np.full((Q, T), pad_id, np.int32)
    mask = np.zeros((Q, T), bool)
    for n, q in enumerate(questions):
        ids[n, T - len(q.prompt) :] = q.prompt
        mask[n, T - len(q.prompt) :] = True
    eos, pad = eos_and_pad(model.tokenizer, model.config)
    spec = DecodeSpec(args.new_tokens, eos, pad)

    def batched():
        out = []
        for s in range(0, Q, B):
            rows = routes[s : s + B]
            merged = merge(model, stack, rows.tolist(), [[1.0] * k] * len(rows), **merge_kw)
            out.append(
                decode_stack(
                    model.graph(merged.placement),
                    model.params,
                    merged.weights,
                    merged.consts,
                    ids[s : s + B, None],
                    mask[s : s + B, None],
                    spec,
                )
            )
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    batched()
    compile_s = time.perf_counter() - t0
    t_batched = timed(batched)
    results = {
        "model": args.model,
        "library": L,
        "questions": Q,
        "k": k,
        "combination": args.combination,
        "batch": B,
        "rank": args.rank,
        "new_tokens": args.new_tokens,
        "jaxlora_seconds": round(t_batched, 3),
        "jaxlora_questions_per_s": round(Q / t_batched, 1),
        "jaxlora_first_call_seconds": round(compile_s, 2),
    }
    if args.peft:
        n = min(args.peft_questions, Q)
        t = _peft_loop(model, stack, routes[:n], ids[:n], mask[:n], args)
        results.update(
            {
                "peft_questions_timed": n,
                "peft_seconds": round(t, 3),
                "peft_questions_per_s": round(n / t, 2),
                "speedup_jaxlora_vs_peft": round((Q / t_batched) / (n / t), 1),
            }
        )
    report("memory: batched composed evaluation vs the study's per-question loop", results)


def _peft_loop(model, stack, routes, ids, mask, args) -> float:
    """PEFT add_weighted_adapter + generate + delete_adapter, one question at a time."""
    import torch

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peft_model = peft_library(model, stack, tmp)
        pad = model.tokenizer.pad_token_id

        def loop():
            with torch.no_grad():
                for q, row in enumerate(routes):
                    peft_model.add_weighted_adapter(
                        [f"a{a}" for a in row],
                        [1.0] * len(row),
                        "merged",
                        combination_type=args.combination,
                        density=0.5,
                        majority_sign_method="total",
                    )
                    peft_model.set_adapter("merged")
                    prompt = ids[q][mask[q]]
                    peft_model.generate(
                        input_ids=torch.tensor(prompt[None], dtype=torch.long),
                        max_new_tokens=args.new_tokens,
                        do_sample=False,
                        pad_token_id=pad,
                        eos_token_id=model.tokenizer.eos_token_id,
                    )
                    peft_model.delete_adapter("merged")

        return timed(loop, repeat=1)


if __name__ == "__main__":
    main()
