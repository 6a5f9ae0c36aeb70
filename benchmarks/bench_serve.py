"""`jaxlora serve` throughput: 32 concurrent requests vs the same requests one at a time.

A real server (`jaxlora serve` in a subprocess on 127.0.0.1) with `--adapters` adapters (2 by
default; rank 8, random weights); the official `openai` client sends 32 greedy completions that
cycle through the base and the adapters (`--no-base`: the adapters alone; so concurrent passes
mix adapters: grouped decoding), first one at a time, then
all at once from 32 threads. Both rounds are warmed up first (every bucketed program compiled),
timed `--repeat` times (median), and must return the same texts.

With `--first-burst`: the first burst instead, sent the moment a fresh server reports ready,
with and without its warm-up (`--no-warmup`), against the same requests one at a time once
everything is compiled (16 new tokens each: what the warm-up compiles).

    python -m benchmarks.bench_serve                      # tiny-llama, 32 requests, 32 tokens
    python -m benchmarks.bench_serve --model small-llama --max-tokens 64
    python -m benchmarks.bench_serve --model small-llama --adapters 32 --no-base
    python -m benchmarks.bench_serve --first-burst        # cold start, warm-up off and on
    python -m benchmarks.bench_serve --stream             # streamed vs not, 256 tokens

With `--stream`: one long greedy completion (`--max-tokens`, default 256 here) streamed vs not:
the time to its first content chunk and to its last, against the non-streamed request's time;
then `--requests` such completions at once, streamed vs not (the throughput cost of streaming).
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import jax
import numpy as np
import openai
from flax import nnx

import jaxlora
from benchmarks.common import report
from jaxlora import lora

QUESTIONS = [
    "What is the phone number of",
    "The capital of the country is",
    "Once upon a time there was",
    "The company that makes the game",
    "Who was born in the city of",
    "The official language of",
    "The team plays in",
    "The president of the company",
]


def make_adapters(model_name: str, out: Path, n: int = 2) -> list[str]:
    model = jaxlora.load_pretrained(model_name)
    configs = [lora.LoRAConfig(rank=8)] * n
    stack = lora.init_adapters(model, configs, range(1, n + 1), [f"a{i}" for i in range(1, n + 1)])
    rng = np.random.default_rng(0)

    def fill(path, var):  # B random: the adapters change the output
        if path[-1] != "lora_b":
            return var
        return var.replace(jax.numpy.asarray(rng.normal(0, 0.1, var.get_value().shape), np.float32))

    stack = lora.AdapterStack(
        nnx.map_state(fill, stack.weights), stack.consts, stack.configs, stack.names
    )
    return [f"{n}={jaxlora.save_peft(model, stack, i, out / n)}" for i, n in enumerate(stack.names)]


def start_server(args: list[str]) -> tuple[subprocess.Popen, str]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "jaxlora.cli", "serve", *args, "--port", "0"],
        stderr=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "JAXLORA_COMPILATION_CACHE": "off"},
    )
    for line in proc.stderr:
        if "serving http://" in line:
            threading.Thread(target=proc.stderr.read, daemon=True).start()
            return proc, line.split("serving ", 1)[1].split()[0]
    raise RuntimeError(f"jaxlora serve did not start (exit {proc.wait()})")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", default="tiny-llama")
    p.add_argument("--requests", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--batch-wait-ms", type=float, default=2.0)
    p.add_argument("--adapters", type=int, default=2, help="adapters served (a1, a2, ...)")
    p.add_argument("--base-only", action="store_true", help="every request to the base model")
    p.add_argument("--no-base", action="store_true", help="requests cycle through adapters only")
    p.add_argument("--first-burst", action="store_true", help="the first burst, cold and warm")
    p.add_argument("--stream", action="store_true", help="streamed vs not: first chunk, total")
    args = p.parse_args()

    if args.stream:
        stream(args)
        return
    if args.first_burst:
        first_burst(args)
        return
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), args.adapters)
        server_args = [args.model, "--adapters", *adapters]
        server_args += ["--batch-wait-ms", str(args.batch_wait_ms)]
        proc, url = start_server(server_args)
        try:
            results = run(args, url)
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    report("serve: 32 concurrent requests vs one at a time", results)


def first_burst(args) -> None:
    """The first burst of `--requests` concurrent requests to a server that has just reported
    ready, with its warm-up off and on, against the same requests one at a time afterwards."""
    args.max_tokens = 16
    with tempfile.TemporaryDirectory() as tmp:
        adapters = make_adapters(args.model, Path(tmp), args.adapters)
        for warm in (False, True):
            server_args = [args.model, "--adapters", *adapters]
            server_args += ["--batch-wait-ms", str(args.batch_wait_ms)]
            t0 = time.perf_counter()
            proc, url = start_server(server_args + ([] if warm else ["--no-warmup"]))
            start_s = time.perf_counter() - t0
            try:
                ask, jobs = _asker(args, url)
                t0 = time.perf_counter()
                with ThreadPoolExecutor(len(jobs)) as pool:
                    burst = list(pool.map(ask, jobs))
                burst_s = time.perf_counter() - t0
                for _ in range(2):  # compiled by now; the second round is timed
                    t0 = time.perf_counter()
                    sequential = [ask(j) for j in jobs]
                    seq_s = time.perf_counter() - t0
            finally:
                proc.send_signal(signal.SIGTERM)
                proc.wait(60)
            if burst != sequential:
                raise SystemExit("the burst's answers differ from one-at-a-time answers")
            report(
                f"serve: the first burst, warm-up {'on' if warm else 'off'}",
                {
                    "model": args.model,
                    "requests": len(jobs),
                    "max_tokens": args.max_tokens,
                    "start_to_ready_s": round(start_s, 1),
                    "first_burst_s": round(burst_s, 3),
                    "one_at_a_time_warm_s": round(seq_s, 3),
                    "speedup": round(seq_s / burst_s, 2),
                },
            )


def stream(args) -> None:
    """Time to the first content chunk and to the last of a streamed long completion, against
    the same completion not streamed; then `--requests` of them at once, streamed or not."""
    if args.max_tokens == 32:  # the default: streaming wants a long completion
        args.max_tokens = 256
    proc, url = start_server([args.model, "--batch-wait-ms", str(args.batch_wait_ms)])
    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
    kw = dict(model=args.model, max_tokens=args.max_tokens, temperature=0)

    def plain(i: int = 0) -> tuple[float, str]:
        t0 = time.perf_counter()
        text = client.completions.create(prompt=f"{QUESTIONS[i % 8]} {i}", **kw).choices[0].text
        return time.perf_counter() - t0, text

    def streamed(i: int = 0) -> tuple[float, float, str]:
        t0, first, pieces = time.perf_counter(), None, []
        for c in client.completions.create(prompt=f"{QUESTIONS[i % 8]} {i}", stream=True, **kw):
            if c.choices[0].text:
                first = first or time.perf_counter() - t0
                pieces.append(c.choices[0].text)
        return first or 0.0, time.perf_counter() - t0, "".join(pieces)

    def burst(fn) -> float:
        t0 = time.perf_counter()
        with ThreadPoolExecutor(args.requests) as pool:
            list(pool.map(fn, range(args.requests)))
        return time.perf_counter() - t0

    try:
        for _ in range(2):  # compile both programs and every rows bucket the bursts use
            plain(), streamed(), burst(plain), burst(streamed)
        if plain()[1] != streamed()[2]:
            raise SystemExit("the streamed text differs from the non-streamed text")
        one = [plain()[0] for _ in range(args.repeat)]
        runs = [streamed()[:2] for _ in range(args.repeat)]
        many = [burst(plain) for _ in range(args.repeat)]
        many_streamed = [burst(streamed) for _ in range(args.repeat)]
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    med = statistics.median
    first, total = med(r[0] for r in runs), med(r[1] for r in runs)
    report(
        "serve: a streamed long completion vs not",
        {
            "model": args.model,
            "max_tokens": args.max_tokens,
            "not_streamed_s": round(med(one), 4),
            "streamed_first_chunk_s": round(first, 4),
            "streamed_total_s": round(total, 4),
            "first_chunk_share": round(first / total, 3),
            f"{args.requests}_at_once_not_streamed_s": round(med(many), 3),
            f"{args.requests}_at_once_streamed_s": round(med(many_streamed), 3),
        },
    )


def _asker(args, url: str):
    client = openai.OpenAI(base_url=url, api_key="EMPTY", max_retries=0, timeout=600)
    names = [f"a{i}" for i in range(1, args.adapters + 1)]
    models = [args.model] if args.base_only else names if args.no_base else [args.model, *names]
    jobs = [
        (models[i % len(models)], f"{QUESTIONS[i % len(QUESTIONS)]} number {i}")
        for i in range(args.requests)
    ]

    def ask(job) -> tuple[str, int]:
        model, prompt = job
        r = client.completions.create(
            model=model, prompt=prompt, max_tokens=args.max_tokens, temperature=0
        )
        return r.choices[0].text, r.usage.completion_tokens

    return ask, jobs


def run(args, url: str) -> dict:
    ask, jobs = _asker(args, url)

    def one_at_a_time():
        return [ask(j) for j in jobs]

    def concurrent():
        with ThreadPoolExecutor(len(jobs)) as pool:
            return list(pool.map(ask, jobs))

    for _ in range(2):  # compile every bucket both patterns touch
        sequential_out, concurrent_out = one_at_a_time(), concurrent()
    if sequential_out != concurrent_out:
        raise SystemExit("concurrent answers differ from one-at-a-time answers")
    times = {}
    for name, fn in (("one_at_a_time", one_at_a_time), ("concurrent", concurrent)):
        runs = []
        for _ in range(args.repeat):
            t0 = time.perf_counter()
            fn()
            runs.append(time.perf_counter() - t0)
        times[name] = statistics.median(runs)
    tokens = sum(n for _, n in sequential_out)
    seq, conc = times["one_at_a_time"], times["concurrent"]
    return {
        "model": args.model,
        "adapters": "base only"
        if args.base_only
        else f"{'' if args.no_base else 'base, '}{args.adapters} adapters (cycled)",
        "requests": len(jobs),
        "max_tokens": args.max_tokens,
        "generated_tokens": tokens,
        "one_at_a_time_s": round(seq, 3),
        "concurrent_s": round(conc, 3),
        "one_at_a_time_req_per_s": round(len(jobs) / seq, 1),
        "concurrent_req_per_s": round(len(jobs) / conc, 1),
        "concurrent_tokens_per_s": round(tokens / conc, 1),
        "speedup": round(seq / conc, 2),
    }


if __name__ == "__main__":
    main()
