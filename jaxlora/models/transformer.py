"""One decoder for Llama 3.x, Qwen2/2.5 and Qwen3, written as Flax NNX modules.

The families differ in three switches of `ModelConfig`: `qkv_bias` (Qwen2), `qk_norm` (Qwen3,
RMSNorm over each head before RoPE) and `rope_scaling` (Llama 3.1+). Module and attribute
names follow transformers (`layers.3.self_attn.q_proj`) so checkpoint and PEFT names map
one to one.

Attention is masked by *storage slot*: query slot t may attend to key slot s when s <= t and
slot s holds a real token. This one rule covers no cache (slots = positions in the input),
prefill and one-token decode steps into a `KVCache`, and left or right padding. Positions for
RoPE are explicit: by default each row counts only its real tokens (`cumsum(mask) - 1`), so a
left-padded row gets the same positions as the unpadded sequence.

Packed rows (training): several rows share one sequence, told apart by segment ids; a token
attends only within its own row and positions restart per row, so a packed batch computes
what the unpadded rows would, without the padding.

Attention kernels (`attend`) are in jaxlora/models/attention.py, picked per call from the
traced program's platform and static shapes (`choose_attention`).

On a mesh (`sharding.compiling_for`, the training step's), activations are pinned at block
boundaries to the rules table's axes: batch over `fsdp`, heads and MLP over `tensor`
(`sharding.constrain`); with no mesh nothing changes.

The KV cache is an explicit pytree passed in and returned; the module holds no mutable state.

`scan_layers=True` runs the layers as one `lax.scan` (`_scan_blocks`) so a deep model compiles
one block; parameters stay stored per layer, and the result equals the unrolled loop's.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from jaxlora.errors import LoRAError
from jaxlora.models.arrow import ArrowSpec
from jaxlora.models.attention import (  # noqa: F401 (KEY_BLOCK, PACK_CHUNK, kernels: re-exported)
    ATTENTION_IMPLS,
    KEY_BLOCK,
    LONG_CONTEXT,
    PACK_CHUNK,
    AttentionImpl,
    AttentionMask,
    _blocked,
    _full,
    _local,
    attend,
    choose_attention,
)
from jaxlora.models.config import ModelConfig
from jaxlora.models.layers import (
    LoRAConst,
    LoRALinear,
    LoRAWeight,
    RMSNorm,
    apply_rope,
    dense,
    random_normal,
    rope_inv_freq,
    rope_sin_cos,
)
from jaxlora.sharding import constrain

Array = jax.Array

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
Remat = Literal["none", "block"]
# Activations' logical axes (`sharding.constrain`, on the traced mesh only): a block's input
# and output split by batch over fsdp, whole along the model dimension.
BTD = ("batch", "seq", None)


@dataclasses.dataclass(frozen=True)
class LoRAPlacement:
    """Which projections carry an adapter, its (stack-wide maximum) rank, and whether the
    layers hold a frozen residual correction (PiSSA/OLoRA adapters in the stack) or DoRA's
    magnitudes. With `arrow` each adapted projection holds a library of experts and routes
    every token among them (`jaxlora.models.arrow`; plain LoRA experts only). With `groups`
    each holds a library of that many adapters and each row takes its own
    (`jaxlora.models.grouped`; no DoRA)."""

    rank: int
    modules: frozenset[str]
    layers: frozenset[int] | None = None  # None: every layer
    residual: bool = False
    dora: bool = False  # DoRA adapters in the stack: the layers hold magnitude vectors
    arrow: ArrowSpec | None = None
    groups: int | None = None

    def __post_init__(self) -> None:
        if self.arrow is not None and (self.residual or self.dora or self.groups):
            raise LoRAError(
                "Arrow routes plain LoRA adapters; the library holds PiSSA/OLoRA or DoRA ones"
            )
        if self.groups is not None and self.dora:
            raise LoRAError("grouped (per-row) adapters cannot be DoRA adapters")

    def rank_for(self, layer: int, module: str) -> int:
        in_layer = self.layers is None or layer in self.layers
        return self.rank if in_layer and module in self.modules else 0


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    """Keys and values of every layer, written slot by slot.

    k, v: one [B, K, S, H] array per layer (separate buffers, so each layer's write is an
    in-place slice update); valid: [B, S] slots holding a real token; end: [] slots written so
    far (shared by the batch); next_pos: [B] RoPE position of each row's next token.
    """

    k: tuple[Array, ...]
    v: tuple[Array, ...]
    valid: Array
    end: Array
    next_pos: Array

    @classmethod
    def init(cls, config: ModelConfig, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (batch, config.num_kv_heads, max_len, config.head_dim)
        layers = range(config.num_layers)
        return cls(
            k=tuple(jnp.zeros(shape, dtype) for _ in layers),
            v=tuple(jnp.zeros(shape, dtype) for _ in layers),
            valid=jnp.zeros((batch, max_len), bool),
            end=jnp.zeros((), jnp.int32),
            next_pos=jnp.zeros((batch,), jnp.int32),
        )

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]


def lora_linear(
    lora: LoRAPlacement | None,
    layer: int,
    name: str,
    d_in: int,
    d_out: int,
    axes: tuple[str | None, str | None],
    bias: bool,
    dtype,
    param_dtype,
    rngs: nnx.Rngs | None,
) -> LoRALinear:
    """Projection `name` of a layer, carrying the placement's adapter where it has one (its
    rank, and the residual, DoRA or Arrow parts the stack needs)."""
    rank = lora.rank_for(layer, name) if lora else 0
    return LoRALinear(
        d_in,
        d_out,
        axes,
        use_bias=bias,
        rank=rank,
        residual=bool(rank) and lora.residual,
        dora=bool(rank) and lora.dora,
        arrow=lora.arrow if rank else None,
        groups=lora.groups if rank else None,
        dtype=dtype,
        param_dtype=param_dtype,
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        lora: LoRAPlacement | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs | None,
    ):
        c = config
        self.config = c
        self.dtype = dtype

        def linear(name, d_in, d_out, axes, bias=False):
            return lora_linear(lora, layer, name, d_in, d_out, axes, bias, dtype, param_dtype, rngs)

        self.q_proj = linear(
            "q_proj", c.hidden_size, c.num_heads * c.head_dim, ("embed", "heads"), c.qkv_bias
        )
        self.k_proj = linear(
            "k_proj", c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), c.qkv_bias
        )
        self.v_proj = linear(
            "v_proj", c.hidden_size, c.num_kv_heads * c.head_dim, ("embed", "kv_heads"), c.qkv_bias
        )
        self.o_proj = linear("o_proj", c.num_heads * c.head_dim, c.hidden_size, ("heads", "embed"))
        if c.qk_norm:
            norm = dict(axis_name=None, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, **norm)
        else:
            self.q_norm = self.k_norm = None

    def __call__(self, x_BTD, sin, cos, mask: AttentionMask, kv, rngs):
        c = self.config
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD, rngs[0]).reshape(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x_BTD, rngs[1]).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x_BTD, rngs[2]).reshape(B, T, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTNH, k_BTKH = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
        q_BTNH = constrain(q_BTNH, ("batch", "seq", "heads", None))
        k_BTKH, v = (constrain(y, ("batch", "seq", "kv_heads", None)) for y in (k_BTKH, v))
        # Keys and values as [B, K, S, H]: per kv head a plain [S, H] matrix, so both attention
        # contractions are matmuls batched over (B, K) also when T = 1 (decoding).
        k_BKTH, v_BKTH = jnp.swapaxes(k_BTKH, 1, 2), jnp.swapaxes(v, 1, 2)
        if kv is None:
            keys, values = k_BKTH, v_BKTH
        else:  # write this call's tokens into their slots, attend over the whole cache
            cache_k, cache_v, start = kv
            at = (0, 0, start, 0)
            keys = jax.lax.dynamic_update_slice(cache_k, k_BKTH.astype(cache_k.dtype), at)
            values = jax.lax.dynamic_update_slice(cache_v, v_BKTH.astype(cache_v.dtype), at)
        out = constrain(attend(q_BTNH, keys, values, mask, self.dtype), ("batch", "seq", "heads"))
        out = self.o_proj(out, rngs[3])
        return out, (keys, values)


class MLP(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        lora: LoRAPlacement | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs | None,
    ):
        def linear(name, d_in, d_out, axes):
            return lora_linear(
                lora, layer, name, d_in, d_out, axes, False, dtype, param_dtype, rngs
            )

        D, F = config.hidden_size, config.intermediate_size
        self.gate_proj = linear("gate_proj", D, F, ("embed", "mlp"))
        self.up_proj = linear("up_proj", D, F, ("embed", "mlp"))
        self.down_proj = linear("down_proj", F, D, ("mlp", "embed"))

    def __call__(self, x_BTD, rngs):
        h_BTF = jax.nn.silu(self.gate_proj(x_BTD, rngs[0])) * self.up_proj(x_BTD, rngs[1])
        h_BTF = constrain(h_BTF, ("batch", "seq", "mlp"))
        return self.down_proj(h_BTF, rngs[2])


class Block(nnx.Module):
    def __init__(
        self,
        config: ModelConfig,
        layer: int,
        lora: LoRAPlacement | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs | None,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.input_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, axis_name="embed", **kw
        )
        self.self_attn = Attention(config, layer, lora, **kw)
        self.post_attention_layernorm = RMSNorm(
            config.hidden_size, config.rms_norm_eps, axis_name="embed", **kw
        )
        self.mlp = MLP(config, layer, lora, **kw)

    def __call__(self, x_BTD, sin, cos, mask: AttentionMask, kv, rng):
        rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        with jax.named_scope("attention"):
            h, kv = self.self_attn(self.input_layernorm(x_BTD), sin, cos, mask, kv, rngs[:4])
        x_BTD = constrain(x_BTD + h, BTD)
        with jax.named_scope("mlp"):
            x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD), rngs[4:])
        return constrain(x_BTD, BTD), kv


# ---------------------------------------------------------------------------------------------
# the layers as one scan


def _fetch_policy(prim, *_, **params) -> bool:
    """Remat policy of an unrematerialised scanned block: save what plain autodiff saves,
    except the layer's base weights (the `cond` that fetches them, and their name), which the
    backward pass fetches again instead of keeping a copy of every layer's weights."""
    if prim.name == "cond":
        return False
    if prim.name == "name":
        return params.get("name") != "base_layer"
    return True


def path_keys(path) -> tuple:
    """A pytree path as plain keys: `('self_attn', 'q_proj', 'lora_a', 'value')`."""
    return tuple(getattr(k, "key", getattr(k, "name", None)) for k in path)


def _given_stacks(template, given: dict[tuple, Array] | None, depth: int):
    """`template` (one block's state) with each leaf taken from `given`, its layer stack keyed
    by the leaf's path; None unless `given` holds every leaf for all `depth` layers."""
    if given is None:
        return None
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    stacks = [given.get(path_keys(p)) for p, _ in leaves]
    shapes = [(depth, *x.shape) for _, x in leaves]
    if any(s is None or s.shape != shape for s, shape in zip(stacks, shapes, strict=True)):
        return None
    return jax.tree.unflatten(treedef, stacks)


def _scan_blocks(
    blocks,
    x_BTD,
    sin,
    cos,
    mask: AttentionMask,
    rngs,
    remat: Remat,
    outputs: bool,
    lora_stacks: dict[tuple, Array] | None = None,
):
    """The blocks as one `lax.scan` (`Transformer(scan_layers=True)`): the compiled program
    holds one block, whatever the depth. Returns x and, with `outputs`, every layer's output
    [L, B, T, D].

    Storage stays per layer (`layers.0...`, `layers.1...`: checkpoints, PEFT files, merging
    and sharding see the same tree). Inside the step the scan reads:
    - LoRA factors and constants stacked over layers (small: adapters, not the base): the
      caller's `lora_stacks` where they cover every layer (the training step keeps them so),
      else the layers' own, stacked here. A layer without an adapter (`lora.layers`) gets
      zero A, B and scale: it adds exactly 0 to its projections and its (discarded) factors
      get exactly zero gradient, so the scan computes what the unrolled stack does.
    - base weights fetched per layer by `lax.switch` on the layer index: one layer's copy at a
      time, never a stacked copy of the whole base (16 GB for an 8B model in bf16). The
      backward pass fetches again rather than keeping L copies (the remat policy).
    A KV cache is not scanned (the caller runs its layers unrolled): its per-layer buffers
    are updated in place, which a scan would turn into copies of the cache at every decoding
    step."""
    split = [nnx.split(b, LoRAWeight, LoRAConst, nnx.Param) for b in blocks]
    template = next((s for s in split if len(s[1]) or len(s[2])), split[0])
    graphdef, w_tpl, c_tpl, p_tpl = template
    zeros = lambda tree: jax.tree.map(jnp.zeros_like, tree)  # noqa: E731
    lora_w, lora_c = [], []
    for i, (_, w, c, p) in enumerate(split):
        if len(w) or len(c):
            same = jax.tree.structure((w, c, p)) == jax.tree.structure((w_tpl, c_tpl, p_tpl))
            if not same:
                raise ValueError(
                    f"scan_layers needs every layer with an adapter to carry it on the same "
                    f"projections; layer {i} differs from the others: use scan_layers=False"
                )
            lora_w.append(w)
            lora_c.append(c)
        else:  # no adapter in this layer: zero factors and scale, zero dropout
            lora_w.append(zeros(w_tpl))
            lora_c.append(zeros(c_tpl))

    def layer_stacks(template, own):
        given = _given_stacks(template, lora_stacks, len(blocks))
        return jax.tree.map(lambda *xs: jnp.stack(xs), *own) if given is None else given

    bases = tuple(p for _, _, _, p in split)
    fetchers = [lambda ps, i=i: ps[i] for i in range(len(bases))]

    def body(x_BTD, xs):
        i, w, c, rng = xs
        p = jax.tree.map(
            lambda v: checkpoint_name(v, "base_layer"), jax.lax.switch(i, fetchers, bases)
        )
        block = nnx.merge(graphdef, w, c, p)
        x_BTD, _ = block(x_BTD, sin, cos, mask, None, rng)
        return x_BTD, x_BTD if outputs else None

    policy = None if remat == "block" else _fetch_policy
    body = jax.checkpoint(body, policy=policy, prevent_cse=False)
    lora = layer_stacks(w_tpl, lora_w), layer_stacks(c_tpl, lora_c)
    xs = (jnp.arange(len(bases)), *lora, rngs)
    with jax.named_scope("layers"):
        return jax.lax.scan(body, x_BTD, xs)


class Transformer(nnx.Module):
    """The decoder. `__call__` maps tokens [B, T] to float32 logits [B, T, V] (and the cache)."""

    def __init__(
        self,
        config: ModelConfig,
        *,
        lora: LoRAPlacement | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        remat: Remat = "none",
        attention: AttentionImpl = "auto",
        scan_layers: bool = False,
        rngs: nnx.Rngs | None,
    ):
        c = config
        self.config = c
        self.dtype = dtype
        self.remat = remat
        self.scan_layers = scan_layers  # static: how the layers run, not how they are stored
        if attention not in ATTENTION_IMPLS:
            raise ValueError(f"attention must be one of {ATTENTION_IMPLS}, got {attention!r}")
        self.attention = attention  # static: part of the graph definition
        self.inv_freq = tuple(float(f) for f in rope_inv_freq(c))
        self.embed_tokens = nnx.Param(
            # std 1/sqrt(D): with tied embeddings, logits can reach ~sqrt(D), the confident
            # range of a trained model (std 0.02 would cap a 64-wide model near uniform).
            random_normal(rngs, (c.vocab_size, c.hidden_size), param_dtype, c.hidden_size**-0.5),
            axes=("vocab", "embed"),
        )
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.layers = nnx.List([Block(c, i, lora, **kw) for i in range(c.num_layers)])
        self.norm = RMSNorm(c.hidden_size, c.rms_norm_eps, axis_name="embed", **kw)
        self.lm_head = (
            None
            if c.tie_word_embeddings
            else LoRALinear(c.hidden_size, c.vocab_size, ("embed", "vocab"), **kw)
        )

    def logits(self, x_BTD: Array) -> Array:
        """float32 logits [B, T, V] of final-norm hidden states (`return_hidden`): the head."""
        tied = self.lm_head is None
        head = self.lm_head if not tied else self.embed_tokens[...].astype(self.dtype).T
        return (dense(x_BTD, head) if tied else head(x_BTD)).astype(jnp.float32)

    def __call__(
        self,
        tokens_BT: Array,
        mask_BT: Array | None = None,
        *,
        positions_BT: Array | None = None,
        cache: KVCache | None = None,
        rng: Array | None = None,
        return_hidden: bool = False,
        last_only: bool = False,
        segment_ids_BT: Array | None = None,
        segment_window: int = 0,
        hidden_layers: tuple[int, ...] = (),
        lora_stacks: dict[tuple, Array] | None = None,
    ) -> tuple[Array, KVCache | None] | tuple[Array, KVCache | None, Array]:
        """Run the decoder.

        mask_BT marks real tokens (1) and padding (0). Without positions, each row's
        positions count its real tokens, continuing from `cache.next_pos` when a cache is
        given. `rng` enables LoRA dropout. `last_only` computes the logits of the last position only
        ([B, 1, V], what decoding needs). With `return_hidden`, the final-norm hidden states
        [B, T, D] are returned in place of the logits.

        Packed rows: `segment_ids_BT` numbers the rows that share a sequence (1, 2, ...; 0 is
        padding); a token attends only within its row and positions restart at each row.
        `segment_window` (static) bounds a row's length, so attention looks only that far back
        (`_local`); it is required with segment ids, and packing takes no KV cache.

        `hidden_layers` (static) adds a third output, the hidden states [len, B, T, D] at those
        indices of transformers' `output_hidden_states`: 0 the embeddings, i the output of layer
        i, num_layers the final-norm output.

        `lora_stacks`: the layers' LoRA factors and constants as layer stacks [L, ...], keyed
        by their path within a layer (`path_keys`: `('self_attn', 'q_proj', 'lora_a',
        'value')`), from a caller that keeps them so (the training step). A scanned stack
        reads these where they cover every layer instead of stacking the layers' own, which
        it then leaves unread: no per-layer pieces cut from the caller's stacks and joined
        again, work that grew a deep model's compile with its depth. The unrolled stack and
        cached calls read the layers' own.
        """
        B, T = tokens_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
        if segment_ids_BT is not None:
            if cache is not None or segment_window <= 0:
                raise ValueError("segment ids need segment_window > 0 and no KV cache")
            mask_BT = mask_BT & (segment_ids_BT > 0)
            if positions_BT is None:  # slots since the row's first token
                t = jnp.arange(T)
                first = jnp.concatenate(
                    [jnp.ones((B, 1), bool), segment_ids_BT[:, 1:] != segment_ids_BT[:, :-1]], 1
                )
                positions_BT = t - jax.lax.cummax(jnp.where(first, t, 0), axis=1)
        if positions_BT is None:
            start_pos = 0 if cache is None else cache.next_pos[:, None]
            positions_BT = start_pos + jnp.maximum(jnp.cumsum(mask_BT, axis=1) - 1, 0)
        sin, cos = rope_sin_cos(positions_BT, self.inv_freq, self.dtype)

        if cache is None:
            query_slots = jnp.arange(T)
            valid_BS = mask_BT
        else:
            query_slots = cache.end + jnp.arange(T)
            valid_BS = jax.lax.dynamic_update_slice(cache.valid, mask_BT, (0, cache.end))
        c = self.config
        impl = choose_attention(
            self.attention,
            T=T,
            S=valid_BS.shape[1],
            cached=cache is not None,
            dtype=self.dtype,
            head_dim=c.head_dim,
        )
        mask = AttentionMask(
            query_slots,
            valid_BS,
            segment_ids_BT,
            segment_ids_BT,
            impl=impl,
            window=segment_window if segment_ids_BT is not None else 0,
        )

        x = constrain(jnp.take(self.embed_tokens[...], tokens_BT, axis=0).astype(self.dtype), BTD)
        layer_rngs = (
            [None] * len(self.layers) if rng is None else jax.random.split(rng, len(self.layers))
        )
        new_k, new_v, states = [], [], [x]
        if self.scan_layers and cache is None:
            x, outs_LBTD = _scan_blocks(
                self.layers,
                x,
                sin,
                cos,
                mask,
                None if rng is None else layer_rngs,
                self.remat,
                bool(hidden_layers),
                lora_stacks,
            )
            states += [None] * len(self.layers) if outs_LBTD is None else list(outs_LBTD)
        else:  # unrolled; also a scanned stack's cached calls (decoding: see `_scan_blocks`)
            for i, block in enumerate(self.layers):
                kv = None if cache is None else (cache.k[i], cache.v[i], cache.end)
                with jax.named_scope(f"layer_{i}"):
                    call = block if self.remat == "none" else jax.checkpoint(block.__call__)
                    x, (k_BKSH, v_BKSH) = call(x, sin, cos, mask, kv, layer_rngs[i])
                new_k.append(k_BKSH)
                new_v.append(v_BKSH)
                states.append(x)
        x = self.norm(x)
        states[-1] = x

        if cache is not None:
            cache = KVCache(
                k=tuple(new_k),
                v=tuple(new_v),
                valid=valid_BS,
                end=cache.end + T,
                next_pos=cache.next_pos + mask_BT.sum(axis=1, dtype=jnp.int32),
            )
        if return_hidden:
            return x, cache
        hidden = jnp.stack([states[i] for i in hidden_layers]) if hidden_layers else None
        if last_only:
            x = x[:, -1:]
        logits = self.logits(x)
        return (logits, cache) if hidden is None else (logits, cache, hidden)


@functools.lru_cache(maxsize=64)
def abstract_module(
    config: ModelConfig,
    lora: LoRAPlacement | None = None,
    dtype=jnp.float32,
    param_dtype=jnp.float32,
    remat: Remat = "none",
    scan_layers: bool = False,
):
    """(graphdef, abstract LoRA weights, abstract LoRA consts, abstract base) without allocating.

    The split order (LoRAWeight, LoRAConst, Param) is the calling convention of every merge.
    `remat` and `scan_layers` change the graph definition only, never the states.
    """
    module = nnx.eval_shape(
        lambda: Transformer(
            config,
            lora=lora,
            dtype=dtype,
            param_dtype=param_dtype,
            remat=remat,
            scan_layers=scan_layers,
            rngs=None,
        )
    )
    return nnx.split(module, LoRAWeight, LoRAConst, nnx.Param)
