"""Per-device memory of the passes that run the model forward without training it: a long
prefill (`prefill_rows`), a stack's batched decoding (`decode_rows`) and a teacher-forced
scoring pass (`score_rows`), for `jaxlora plan` and `plan --aot`'s programs.

Each is a list of (what, bytes) rows per device, from the model's shapes alone. The rules were
read from the TPU compiler's buffer reports of the 8B shape (benchmarks/README.md, "TPU,
compiled without a TPU"); GPU compilers are not measured."""

from __future__ import annotations

from collections.abc import Mapping

from jaxlora.models.attention import KEY_BLOCK, LONG_CONTEXT
from jaxlora.models.config import ModelConfig


def dims(c: ModelConfig) -> tuple[int, ...]:
    """(D, F, N, K, H, L, V) of a model, in the dimension letters of the docstrings."""
    return (
        c.hidden_size,
        c.intermediate_size,
        c.num_heads,
        c.num_kv_heads,
        c.head_dim,
        c.num_layers,
        c.vocab_size,
    )


def layer_bytes(c: ModelConfig, dtype_bytes: int, tensor: int) -> float:
    """One decoder layer's projection kernels on a device (q, k, v, o and the MLP's three), in
    the model dtype, split over `tensor`: what a layer's use holds whole."""
    D, F, N, K, H, _, _ = dims(c)
    return (2 * D * N * H + 2 * D * K * H + 3 * D * F) * dtype_bytes / tensor


def prefill_rows(
    c: ModelConfig, context: int, dtype_bytes: int, sizes: Mapping[str, int], base_bytes: float
) -> tuple[list[tuple[str, float]], float]:
    """Per-device memory of one long-context prefill, and the bytes full attention would add
    (batch 1, `context` tokens into a KV cache of that length, logits of the last position
    only), as the decoders run it (jaxlora/generate.py: an ICL prompt of the memory, a served
    request).

    KV cache: 2 x L x K x H x context in the model dtype (split over `tensor` with the kv heads).
    Working set of one layer at a time (the previous layer's are freed): the hidden states and
    their norm, residual and attention output (4D), q, k, v (NH + 2KH) and the MLP's gate, up
    and product (3F), per token. Attention: the blocked kernel (or cuDNN's flash attention on
    GPU) holds a block's probabilities and a float32 accumulator (`blocked_attention_bytes`) --
    linear in the context; the full kernel would hold [N, context, context] float32 logits and
    probabilities, shown for comparison and not counted."""
    D, F, N, K, H, L, _ = dims(c)
    t = sizes["tensor"]
    cache = 2 * L * (K // t if K % t == 0 else K) * H * context * dtype_bytes
    per_token = (4 * D + N * H + 2 * K * H + 3 * F) * dtype_bytes
    attention = blocked_attention_bytes(N, H, context, context, dtype_bytes)
    full = 2 * N * context * context * 4
    return [
        ("base weights", base_bytes),
        (f"KV cache ({context:,} tokens)", cache),
        ("one layer's activations", context * per_token),
        (f"attention ({KEY_BLOCK}-key blocks)", attention),
        ("logits of the last position", c.vocab_size * 4),
    ], full


def decode_rows(
    c: ModelConfig,
    sizes: Mapping[str, int],
    rows: int,
    prompt: int,
    new_tokens: int,
    dtype_bytes: int,
    base_bytes: float,
    adapter_bytes: float,
    prefix: int = 0,
    rows_split: bool = True,
    hbm: float = 0.0,
) -> list[tuple[str, float]]:
    """Per-device memory of a stack's batched decoding (`generate.decode_stack` as evaluation
    runs it: `rows` prompts per device -- its adapters x their prompts over `fsdp` -- of
    `prompt` tokens, `new_tokens` more). `prefix` tokens that every row starts with
    (`generate._generate_base`'s prefix) are prefilled once, as one row, before the rows' own
    `prompt` tokens; every row's cache holds them.

    KV cache: 2 x L x K x H x (prompt + new_tokens) per row, in the model dtype (kv heads split
    over `tensor`). The prefill's working set is one layer's, as `prefill_rows` counts it, with
    the attention's working set (`_attention_bytes`: full logits and probabilities of a short
    prompt, the blocked kernel's of a long one, per row). The weights live split over `fsdp`.
    Where the rows split over it too (`rows_split`), the program all-gathers each weight whole
    where it is used: the largest, the vocabulary table of the logits (V x D), twice over (the
    gathered table and its copy for the product), and the layers' projections, which the
    compiler gathers ahead of their use: at least DECODE_LAYERS_AHEAD layers, and with the
    device's memory `hbm` given, as many more as it leaves room for, up to every layer (the
    TPU compiler prefetches the gathers into what HBM is left: the 8B's decoding held 14.9-16.8
    GiB a v5e chip whatever its prompts, 2026-12-06).
    Where they do not (one long ICL row on an 8-way fsdp mesh), the TPU compiler keeps the
    weights split and moves the activations instead, each layer's whole ([T, D] gathered,
    [T, F] summed), which the per-token working set already counts: no weight is gathered.
    The float32 adapters are cast to the model dtype once, every layer's before the token
    loop (the compiler hoists the casts out of it), and that copy lives through the loop."""
    D, F, N, K, H, L, V = dims(c)
    t = sizes["tensor"]
    kv = K // t if K % t == 0 else K
    cache = prefix + prompt + new_tokens
    per_token = (4 * D + N * H + 2 * K * H + 3 * F) * dtype_bytes
    row_cache = 2 * L * kv * H * cache * dtype_bytes
    # The prefix's prefill (one row) and the rows' own come one after the other.
    attention = max(
        _attention_bytes(N, H, prefix, cache, dtype_bytes),
        rows * _attention_bytes(N, H, prompt, cache, dtype_bytes),
    )
    gathers = sizes["fsdp"] == 1 or rows_split
    out = [
        ("base weights", base_bytes),
        ("adapter weights (float32)", adapter_bytes),
        (f"KV cache ({rows} rows x {cache})", row_cache * rows),
        ("prefill: a layer's activations", max(prefix, rows * prompt) * per_token),
        ("prefill: attention", attention),
    ]
    if adapter_bytes and dtype_bytes < 4:
        out.append(("adapters cast to the model dtype", adapter_bytes * dtype_bytes / 4))
    if gathers:
        out.append(("vocab table gathered (2 copies)", 2 * V * D * dtype_bytes / t))
    if prefix:
        out.append(("the prefix's cache (1 row, before its copies)", row_cache))
    if sizes["fsdp"] > 1 and gathers:
        out.append(_layers_ahead(c, sizes, dtype_bytes, sum(b for _, b in out), hbm))
    return out


def score_rows(
    c: ModelConfig,
    sizes: Mapping[str, int],
    rows: int,
    width: int,
    scored: int,
    dtype_bytes: int,
    base_bytes: float,
    adapter_bytes: float,
    rows_adapter_bytes: float = 0.0,
    rows_split: bool = True,
    hbm: float = 0.0,
) -> list[tuple[str, float]]:
    """Per-device memory of a teacher-forced scoring pass (`memory.loglik.continuation_logprobs`:
    `rows` rows per device of `width` tokens, the last `scored` positions through the output
    head), which has no KV cache and no token loop.

    Its temporaries are the larger of two stages, which are never live together (the TPU
    compiler's buffers of QuALITY's 8B option scoring, v5p 4/1/1, 2026-12-07):
    - the layers, one at a time, the larger of a layer's halves: attention holds the residual
      and its norm (2D), q and the attention's output (2NH), k and v (2KH) per token, and the
      attention's working set per row (`_attention_bytes`); the MLP holds the residual and its
      norm (2D) with the gate and up products (2F);
    - the output head: the scored positions' logits in the model dtype and their float32 copy
      for the log-softmax (each row's token is picked inside that fusion).
    With adapters, each half also holds an adapter's product beside the base's before they
    are summed: q's (NH) in attention, the gate's or up's (F) in the MLP (the rank-16 merges'
    RAG pass held 3.8 GiB more than the base's, about one more [T, F]).
    `rows_adapter_bytes`: every row's own copy of its adapters, of all layers; the compiler
    gathers them a layer at a time. Weights gathered over fsdp as `decode_rows` counts them."""
    D, F, N, K, H, L, V = dims(c)
    tokens = rows * width
    adapted = 1 if adapter_bytes else 0
    attention = tokens * (2 * D + (2 + adapted) * N * H + 2 * K * H) * dtype_bytes
    attention += rows * _attention_bytes(N, H, width, width, dtype_bytes)
    mlp = tokens * (2 * D + (2 + adapted) * F) * dtype_bytes
    head = rows * scored * V * (dtype_bytes + 4)
    stage = (
        ("a layer's working set (more than the head's logits)", max(attention, mlp))
        if max(attention, mlp) > head
        else (f"logits of the {scored} scored positions (more than a layer's)", head)
    )
    out = [
        ("base weights", base_bytes),
        ("adapter weights (float32)", adapter_bytes),
        stage,
    ]
    if rows_adapter_bytes:
        out.append(("the rows' copies of a layer's adapters", rows_adapter_bytes / L))
    if sizes["fsdp"] > 1 and rows_split:
        out.append(("vocab table gathered (2 copies)", 2 * V * D * dtype_bytes / sizes["tensor"]))
        out.append(_layers_ahead(c, sizes, dtype_bytes, sum(b for _, b in out), hbm))
    return out


def _layers_ahead(
    c: ModelConfig, sizes: Mapping[str, int], dtype_bytes: int, used: float, hbm: float
) -> tuple[str, float]:
    """The layers' projections an fsdp mesh gathers ahead of their use: DECODE_LAYERS_AHEAD,
    and with the device's memory `hbm` given, as many more as it leaves room for beyond `used`,
    up to every layer."""
    L = c.num_layers
    layer = layer_bytes(c, dtype_bytes, sizes["tensor"])
    room = int((hbm - used) // layer)
    ahead = max(DECODE_LAYERS_AHEAD, min(L, room)) if hbm else DECODE_LAYERS_AHEAD
    return f"layers gathered ahead ({ahead} of {L})", ahead * layer


def rows_per_device(rows: int, fsdp: int) -> tuple[int, bool]:
    """(rows each device holds, whether they split over fsdp): a pass's rows split over fsdp
    where it divides them; otherwise every device holds them all."""
    split = rows % fsdp == 0
    return (rows // fsdp if split else rows), split


def _attention_bytes(N: int, H: int, prompt: int, keys: int, dtype_bytes: int) -> int:
    """A prefill's attention working set per row (`models.attention.attend`): full [N, prompt,
    keys] float32 logits and probabilities below LONG_CONTEXT keys; from it the blocked
    kernel's, `blocked_attention_bytes`."""
    if keys < LONG_CONTEXT:
        return 2 * N * prompt * keys * 4
    return blocked_attention_bytes(N, H, prompt, keys, dtype_bytes)


def blocked_attention_bytes(N: int, H: int, queries: int, keys: int, dtype_bytes: int) -> int:
    """The blocked kernel's working set for `queries` queries of one row over `keys` keys
    (`models.attention._blocked`): a block's [N, queries, KEY_BLOCK] probabilities in the model
    dtype, as its value product takes them, and the float32 [N, queries, H] accumulator. Its
    float32 logits and probabilities fuse into those: the TPU compiler's buffers of the 8B's
    25,600-token prefill are bf16 [K, N/K, T, 512] blocks, none of them float32 (2026-12-06)."""
    return N * queries * (min(KEY_BLOCK, keys) * dtype_bytes + H * 4)


# Layers whose weights a decoding step's all-gathers hold at once on an fsdp mesh, at least:
# the TPU compiler's live ranges of the 8B decoding (2/4/1) hold 8 layers' MLP kernels.
DECODE_LAYERS_AHEAD = 8
