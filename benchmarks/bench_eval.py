"""Batched greedy evaluation of A adapters vs asking one question at a time.

Both sides run jaxlora's own compiled decoding (KV cache, greedy, stop on EOS) on the same
model, adapters and PhoneBook questions; the only difference is batching: one call decodes every
adapter's questions (vmap over adapters, `--questions` rows each), versus one call per
(adapter, question). `--transformers` adds the same one-question-at-a-time loop in PyTorch with
PEFT (switching the active adapter), the way the original study evaluated.

    python benchmarks/bench_eval.py --adapters 16 --questions 64
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
from jaxlora.generate import DecodeSpec, decode_stack, eos_and_pad, left_align


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--adapters", type=int, default=16)
    p.add_argument("--questions", type=int, default=64)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--transformers", action="store_true", help="also time a PyTorch + PEFT loop")
    args = p.parse_args()

    model = jaxlora.load_pretrained(args.model)
    A, Q = args.adapters, args.questions
    stack = lora.init_adapters(model, [lora.LoRAConfig(rank=args.rank)] * A, list(range(A)))
    rng = np.random.default_rng(0)
    weights = jax.tree.map(
        lambda x: x + 0.02 * rng.standard_normal(x.shape).astype(np.float32), stack.weights
    )
    stack = lora.AdapterStack(weights, stack.consts, stack.configs, stack.names)

    records = kdata.phonebook_records(model.tokenizer, size_rows=A * Q, seed=0)
    questions = build_questions(
        records, model.tokenizer, DataSection(max_length=128), EvalSection()
    )
    T = max(len(q.prompt) for q in questions)
    ids = np.full((A, Q, T), model.tokenizer.pad_token_id, np.int32)
    mask = np.zeros((A, Q, T), bool)
    for n, q in enumerate(questions):
        a, k = divmod(n, Q)
        ids[a, k, T - len(q.prompt) :] = q.prompt
        mask[a, k, T - len(q.prompt) :] = True
    ids, mask = left_align(ids, mask)
    eos, pad = eos_and_pad(model.tokenizer, model.config)
    spec = DecodeSpec(args.new_tokens, eos, pad)
    graph = model.graph(stack.placement)

    def batched():
        return jax.block_until_ready(
            decode_stack(graph, model.params, stack.weights, stack.consts, ids, mask, spec)
        )

    singles = [stack.select([a]) for a in range(A)]

    def one_at_a_time():
        out = None
        for a in range(A):
            s = singles[a]
            for k in range(Q):
                out = decode_stack(
                    graph,
                    model.params,
                    s.weights,
                    s.consts,
                    ids[a : a + 1, k : k + 1],
                    mask[a : a + 1, k : k + 1],
                    spec,
                )
        return jax.block_until_ready(out)

    t0 = time.perf_counter()
    reference = np.asarray(batched())
    compile_batched = time.perf_counter() - t0
    t0 = time.perf_counter()
    decode_stack(
        graph, model.params, singles[0].weights, singles[0].consts, ids[:1, :1], mask[:1, :1], spec
    )
    compile_single = time.perf_counter() - t0
    # The two paths agree token for token (a spot check of the first adapter's first questions).
    for k in range(4):
        single = decode_stack(
            graph,
            model.params,
            singles[0].weights,
            singles[0].consts,
            ids[:1, k : k + 1],
            mask[:1, k : k + 1],
            spec,
        )
        assert (np.asarray(single)[0, 0] == reference[0, k]).all()

    t_batched = timed(batched)
    t_single = timed(one_at_a_time, repeat=1)
    n = A * Q
    results = {
        "model": args.model,
        "adapters": A,
        "questions_per_adapter": Q,
        "rank": args.rank,
        "new_tokens": args.new_tokens,
        "batched_seconds": round(t_batched, 3),
        "batched_questions_per_s": round(n / t_batched, 1),
        "one_at_a_time_seconds": round(t_single, 3),
        "one_at_a_time_questions_per_s": round(n / t_single, 1),
        "speedup_batched_vs_one_at_a_time": round(t_single / t_batched, 1),
        "compile_seconds_batched": round(compile_batched, 2),
        "compile_seconds_single": round(compile_single, 2),
    }
    if args.transformers:
        results.update(_transformers_loop(model, stack, ids, mask, args.new_tokens, n, t_batched))
    report("eval: batched vs one question at a time", results)


def _transformers_loop(model, stack, ids, mask, new_tokens, n, t_batched) -> dict:
    """The study's way: PyTorch + PEFT, one adapter active at a time, one question per call."""
    import torch

    torch.set_num_threads(max(1, torch.get_num_threads()))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        peft_model = peft_library(model, stack, tmp)
        pad = model.tokenizer.pad_token_id

        def loop():
            with torch.no_grad():
                for a in range(ids.shape[0]):
                    peft_model.set_adapter(f"a{a}")
                    for k in range(ids.shape[1]):
                        row = ids[a, k][mask[a, k]]
                        peft_model.generate(
                            input_ids=torch.tensor(row[None], dtype=torch.long),
                            max_new_tokens=new_tokens,
                            do_sample=False,
                            pad_token_id=pad,
                            eos_token_id=model.tokenizer.eos_token_id,
                        )

        t = timed(loop, repeat=1)
    return {
        "transformers_one_at_a_time_seconds": round(t, 3),
        "transformers_questions_per_s": round(n / t, 1),
        "speedup_batched_vs_transformers": round(t / t_batched, 1),
    }


if __name__ == "__main__":
    main()
