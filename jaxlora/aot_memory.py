"""The memory's decoding programs for `jaxlora plan CONFIG --aot TOPOLOGY` (`jaxlora.aot`).

`memory.MemoryEvaluator` decodes every method of `memory.methods` greedily, a pass of rows at a
time: the base model alone for `base[+CONTEXT]` (`generate._generate_base`; ICL and RAG put a
long context in front of the question), one adapter per row for a top-1 route
(`generate.decode_stack`), a merged adapter per row for a top-k merge (the merge's rank: the
sources' for linear/TIES, their sum for cat), and k adapters per row whose softmaxes are mixed
for `/mixture` (`compose.decode_mixture`); a merge is its own program before its decoding
(`merging._merge_rows`: a pass's questions' top-k adapters merged in one call, `merge_program`).
Each distinct program is built here over abstract
inputs at its bound: prompts of the widest width the method can take, rows per pass as the
evaluator picks them (`memory.batch_size`, fewer under `memory.max_batch_tokens`). ICL over
the whole book (`+icl`) starts every prompt of a pass with the same book, which the evaluator
prefills once per pass (`_generate_base`'s prefix): that program, with the prompt's bound as the
prefix and QUESTION_TOKENS after it. (`+icl_doc` shares one only when a pass's questions ask of
one document: its bound is the program without a prefix.)

The widths come from data the plan does not read, so they are bounds: a prompt with a context
is `memory.context_tokens` of context plus QUESTION_TOKENS (RAG over chunks: `rag_k` chunks of
`data.unit_tokens`), a prompt without one QUESTION_TOKENS, each rounded up as the evaluator
rounds (`loglik.prompt_width`)."""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxlora.aot import Program, _adapter_stack, _variables
from jaxlora.cells import plan_cells
from jaxlora.config import Config
from jaxlora.generate import DecodeSpec, _generate_base, decode_stack_for
from jaxlora.lora import AdapterStack, LoRAConfig, union_placement
from jaxlora.memory.compose import decode_mixture
from jaxlora.memory.grammar import parse_method
from jaxlora.memory.loglik import continuation_logprobs, prompt_width, questions_per_pass
from jaxlora.memory.merging import CONCAT_TYPES, _merge_rows, merge_call
from jaxlora.models.config import ModelConfig
from jaxlora.models.model import abstract_module, model_config, parse_dtype
from jaxlora.plan import Plan, shard_bytes
from jaxlora.plan_decode import decode_rows, rows_per_device, score_rows

# A question with its chat template and the study's template words, in tokens: the study's
# questions are one or two sentences (PhoneBook's "Question: ... Answer:" row is under 128
# tokens); the width rounds up to 1024s past 1024, so 256 only decides a short prompt's width.
QUESTION_TOKENS = 256
# A QuALITY option scored as the answer (`loglik.OptionScoring`): a phrase or a sentence of the
# dataset's; the positions scored are its length rounded up to a power of two, so 128 of them.
OPTION_TOKENS = 128
QUALITY_OPTIONS = 4


def prompts(shape: tuple[int, ...], mesh: Mesh) -> tuple[jax.ShapeDtypeStruct, ...]:
    """Abstract token ids and mask of `shape`, whole on every device of `mesh` (as
    `MemoryEvaluator._pack` places them)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return tuple(jax.ShapeDtypeStruct(shape, t, sharding=replicated) for t in (jnp.int32, bool))


def rows_per_pass(batch_size: int, max_batch_tokens: int, width: int, new_tokens: int) -> int:
    """Rows of one decoding pass as `MemoryEvaluator.decode` picks them: `batch_size`, fewer
    for long prompts (`max_batch_tokens`), a power of two."""
    fit = max(1, max_batch_tokens // (width + new_tokens))
    return 1 << (min(batch_size, fit).bit_length() - 1)


def width(config: Config, method, positions: int, answer: int | None = None) -> int:
    """The widest prompt (tokens, as the evaluator pads it) of a memory method; the evaluator
    refuses a prompt that leaves the model's `positions` no room for the new tokens. With
    `answer`: a prompt followed by that many answer tokens, as QuALITY's options are scored."""
    m, d = config.memory, config.data
    longest = QUESTION_TOKENS
    if method.context != "none":
        context = m.context_tokens
        if method.context == "rag" and d.units == "chunks" and d.unit_tokens:
            context = min(context, method.rag_k * d.unit_tokens)
        longest += context
    if answer is not None:
        return prompt_width(min(longest + answer, positions))
    return prompt_width(min(longest, positions - m.max_new_tokens))


def memory_programs(config: Config, mesh: Mesh, plan: Plan) -> list[Program]:
    """Each distinct decoding program of `memory.methods`, widest prompts first; none without a
    `memory:` section. Prompts are placed on the job's mesh (replicated) and every program is
    traced for it: the model's activation constraints and its platform's paths apply."""
    if config.memory is None:
        return []
    m = config.memory
    c = model_config(config.model.path)
    dtype = parse_dtype(config.model.dtype)
    param_dtype = parse_dtype(config.model.param_dtype or config.model.dtype)
    dtype_bytes = jnp.dtype(dtype).itemsize
    sizes = dict(mesh.shape)
    graph0, *_, base = abstract_module(c, None, dtype, param_dtype)
    base_abs = _variables(base, mesh)
    base_bytes = plan.rows[0][1]
    # The largest rank of the job's libraries (one per sweep cell): the worst case of each.
    cells = plan_cells(plan.config, c)  # one adapter per unit where the plan cut them
    lora = max((p.lora for p in cells), key=lambda lo: lo.rank)
    library = [p.lora for p in cells if p.lora.rank == lora.rank]
    spec = DecodeSpec(m.max_new_tokens, tuple(c.eos_token_ids) or (0,), c.pad_token_id)

    seen: dict[tuple, Program] = {}
    methods: dict[tuple, list[str]] = {}  # the methods each program decodes
    scores_options = m.loglik and config.data.dataset == "quality"
    for text in m.methods:
        method = parse_method(text)
        if scores_options and method.router != "arrow":
            key, program = option_program(config, c, mesh, plan, method, library)
            methods.setdefault(key, []).append(text)
            seen.setdefault(key, program)
        W = width(config, method, c.max_position_embeddings)
        B = rows_per_pass(m.batch_size, m.max_batch_tokens, W, m.max_new_tokens)
        tokens = f"{B} x {W} + {m.max_new_tokens} tokens"
        if not method.uses_adapters:
            key = ("base", W, B, method.context == "icl")
            methods.setdefault(key, []).append(text)
            if key in seen:
                continue
            local, split = rows_per_device(B, sizes["fsdp"])
            if method.context == "icl" and B > 1:  # the book, shared: prefilled once per pass
                P, S = W, prompt_width(QUESTION_TOKENS)
                tokens = f"{B} x {S} + {m.max_new_tokens} tokens after a shared {P}-token prefix"
                args = (*prompts((B, S), mesh), spec, None, None, None, mesh, prompts((P,), mesh))
            else:
                P, S = 0, W
                args = (*prompts((B, W), mesh), spec, None, None, None, mesh)
            rows = decode_rows(
                c,
                sizes,
                local,
                S,
                m.max_new_tokens,
                dtype_bytes,
                base_bytes,
                0,
                prefix=P,
                rows_split=split,
                hbm=plan.device_memory,
            )
            seen[key] = Program(
                f"memory_base[{{}}: {tokens}]",
                _generate_base,
                (graph0, base_abs, *args),
                sum(b for _, b in rows),
                0.0,
                mesh,
            )
            continue
        k, combiner = method.k, method.combiner
        if combiner == "mixture":
            n, rank = B * k, lora.rank  # k adapters per row, the library's own
        else:
            n, rank = B, lora.rank * (k if combiner in CONCAT_TYPES else 1)
        if method.router != "arrow" and combiner not in ("one", "mixture"):
            merge_key = ("merge", combiner, k, B)
            methods.setdefault(merge_key, []).append(text)
            if merge_key not in seen:
                seen[merge_key] = merge_program(config, c, mesh, library, method, B)
        key = (combiner == "mixture", W, B, n, rank)
        methods.setdefault(key, []).append(text)
        if key in seen:
            continue
        placement = union_placement([dataclasses.replace(lora, rank=rank)])
        graph, w_abs, c_abs, _ = abstract_module(c, placement, dtype, param_dtype)
        weights, consts = _adapter_stack(w_abs, c_abs, n, mesh)
        adapter_bytes = shard_bytes(w_abs, sizes, leading=(("adapter", n),), dtype_bytes=4)
        local = math.ceil(n / sizes["adapter"])
        # A stack's rows are its adapters (a mixture's: each question's k), each with one
        # prompt: they never split over fsdp, and the compiler moves activations, not weights
        # (no weight all-gather in the 8B's cat and mixture programs).
        rows = decode_rows(
            c,
            sizes,
            local,
            W,
            m.max_new_tokens,
            dtype_bytes,
            base_bytes,
            adapter_bytes,
            rows_split=False,
        )
        if combiner == "mixture":
            name = f"memory_mixture[{{}}: {tokens}, {k} rank-{rank} adapters per row]"
            args = (graph, base_abs, weights, consts, *prompts((B, W), mesh), spec, k, mesh)
            fn = decode_mixture
        else:
            name = f"memory_adapters[{{}}: {tokens}, a rank-{rank} adapter per row]"
            args = (graph, base_abs, weights, consts, *prompts((B, 1, W), mesh), spec, None, mesh)
            fn = decode_stack_for
        seen[key] = Program(name, fn, args, sum(b for _, b in rows), 0.0, mesh)
    for key, p in seen.items():
        p.name = p.name.format(", ".join(methods[key]))
    return sorted(seen.values(), key=lambda p: -p.estimated_bytes)


def merge_program(
    config: Config, c: ModelConfig, mesh: Mesh, library: list[LoRAConfig], method, B: int
) -> Program:
    """The merge of a pass's routed adapters (`merging._merge_rows`, one call per pass of B
    questions, each merging its top k): the library's adapters split over `adapter` as the job
    holds them, every question's k sources gathered, B merged adapters out. `library` bounds
    the evaluator's: every adapter of the job at the largest rank.

    Plan's estimate: the device's share of the library, every source gathered (B x k adapters,
    each split as its factors are) and the B merged ones (the lax.map over projections holds
    one projection's working set at a time; not counted)."""
    m = config.memory
    dtype = parse_dtype(config.model.dtype)
    param_dtype = parse_dtype(config.model.param_dtype or config.model.dtype)
    n, k, rank = len(library), method.k, library[0].rank
    _, w_abs, c_abs, _ = abstract_module(c, union_placement(library), dtype, param_dtype)
    weights, consts = _adapter_stack(w_abs, c_abs, n, mesh)
    stack = AdapterStack(weights, consts, tuple(library), tuple(f"unit{i}" for i in range(n)))
    call = merge_call(
        c,
        stack,
        np.arange(B * k).reshape(B, k) % n,  # which adapters is data: any valid indices
        np.ones((B, k)),
        method.combiner,
        density=m.density,
        majority_sign_method=m.majority_sign_method,
    )
    replicated = NamedSharding(mesh, PartitionSpec())
    arrays, seed = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(np.shape(x), np.asarray(x).dtype, sharding=replicated),
        (call.arrays, call.seed),
    )
    sizes = dict(mesh.shape)
    # a gathered source keeps its factors' own split (fsdp, tensor), not the library's adapter one
    one = shard_bytes(w_abs, {**sizes, "adapter": 1}, dtype_bytes=4)
    merged_rank = call.plan.rank
    estimate = (
        shard_bytes(w_abs, sizes, leading=(("adapter", n),), dtype_bytes=4)
        + B * k * one
        + B * one * merged_rank / rank
    )
    name = f"memory_merge[{{}}: {B} rows x {k} rank-{rank} sources -> rank-{merged_rank}]"
    args = (call.plan, call.paths, call.sources, arrays, seed, call.layouts, call.mesh)
    return Program(name, _merge_rows, args, estimate, 0.0, mesh)


def option_program(
    config: Config, c: ModelConfig, mesh: Mesh, plan: Plan, method, library: list[LoRAConfig]
) -> tuple[tuple, Program]:
    """QuALITY's option scoring under a method (`loglik.continuation_logprobs`, as
    `OptionScoring.option_logprobs` runs it): a pass of Q questions x 4 options, each row its
    prompt and one option teacher-forced (OPTION_TOKENS after the method's widest prompt), the
    last L positions scored; under the base, a top-1 adapter, a merge (one per question) or the
    k adapters of a mixture per row. With its key: methods that run the same program share it.

    Plan's estimate: `plan_decode.score_rows`."""
    m = config.memory
    dtype = parse_dtype(config.model.dtype)
    param_dtype = parse_dtype(config.model.param_dtype or config.model.dtype)
    sizes = dict(mesh.shape)
    W = width(config, method, c.max_position_embeddings, answer=OPTION_TOKENS)
    L = min(W - 1, OPTION_TOKENS)
    K = method.k if method.combiner == "mixture" else 1
    Q = questions_per_pass(m.batch_size, m.max_batch_tokens, W, K, QUALITY_OPTIONS)
    R = Q * QUALITY_OPTIONS
    replicated = NamedSharding(mesh, PartitionSpec())
    rows, mask = prompts((R, W), mesh)
    rank = 0
    if not method.uses_adapters:
        graph, *_, base = abstract_module(c, None, dtype, param_dtype)
        weights = consts = ids = None
        adapter_bytes = rows_adapter_bytes = 0.0
    else:
        lora = library[0]
        merged = method.combiner not in ("one", "mixture")
        rank = lora.rank * (method.k if method.combiner in CONCAT_TYPES else 1)
        n = Q if merged else len(library)  # a merge per question, or the library itself
        placement = union_placement([dataclasses.replace(lora, rank=rank)])
        graph, w_abs, c_abs, base = abstract_module(c, placement, dtype, param_dtype)
        weights, consts = _adapter_stack(w_abs, c_abs, n, mesh)
        ids = jax.ShapeDtypeStruct((R, K), jnp.int32, sharding=replicated)
        adapter_bytes = shard_bytes(w_abs, sizes, leading=(("adapter", n),), dtype_bytes=4)
        rows_adapter_bytes = R * K * shard_bytes(w_abs, {**sizes, "adapter": 1}, dtype_bytes=4)
    local, split = rows_per_device(R * K, sizes["fsdp"])
    dtype_bytes = jnp.dtype(dtype).itemsize
    parts = score_rows(
        c,
        sizes,
        local,
        W,
        L,
        dtype_bytes,
        plan.rows[0][1],
        adapter_bytes,
        rows_adapter_bytes,
        rows_split=split,
        hbm=plan.device_memory,
    )
    estimate = sum(b for _, b in parts)
    args = (graph, _variables(base, mesh), weights, consts, ids, rows, mask, L, mesh)
    what = f"rank-{rank} adapter{'s' if K > 1 else ''}" if rank else "the base"
    name = f"memory_options[{{}}: {Q} questions x {QUALITY_OPTIONS} options x {W} tokens, {what}"
    name += f", {K} per row]" if K > 1 else "]"
    key = ("options", W, Q, K, rank, method.uses_adapters and method.combiner == "one")
    return key, Program(name, continuation_logprobs, args, estimate, 0.0, mesh)
