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

The KV cache is an explicit pytree passed in and returned; the module holds no mutable state.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import nnx

from jaxlora.models.config import ModelConfig
from jaxlora.models.layers import (
    LoRALinear,
    RMSNorm,
    apply_rope,
    random_normal,
    rope_inv_freq,
    rope_sin_cos,
)

Array = jax.Array

ATTENTION_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj")
MLP_MODULES = ("gate_proj", "up_proj", "down_proj")
LINEAR_MODULES = ATTENTION_MODULES + MLP_MODULES
Remat = Literal["none", "block"]


@dataclasses.dataclass(frozen=True)
class LoRAPlacement:
    """Which projections carry an adapter, and its (stack-wide maximum) rank."""

    rank: int
    modules: frozenset[str]
    layers: frozenset[int] | None = None  # None: every layer

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
            rank = lora.rank_for(layer, name) if lora else 0
            return LoRALinear(
                d_in,
                d_out,
                axes,
                use_bias=bias,
                rank=rank,
                dtype=dtype,
                param_dtype=param_dtype,
                rngs=rngs,
            )

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

    def __call__(self, x_BTD, sin, cos, mask_BTS, kv, rngs):
        c = self.config
        B, T, _ = x_BTD.shape
        q = self.q_proj(x_BTD, rngs[0]).reshape(B, T, c.num_heads, c.head_dim)
        k = self.k_proj(x_BTD, rngs[1]).reshape(B, T, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x_BTD, rngs[2]).reshape(B, T, c.num_kv_heads, c.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q_BTNH, k_BTKH = apply_rope(q, sin, cos), apply_rope(k, sin, cos)
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
        q_BKGTH = q_BTNH.reshape(B, T, c.num_kv_heads, c.kv_groups, c.head_dim).transpose(
            0, 2, 3, 1, 4
        )
        logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, keys.astype(self.dtype))
        logits = logits.astype(jnp.float32) * c.head_dim**-0.5
        logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(self.dtype)
        out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, values.astype(self.dtype))
        out = self.o_proj(out.reshape(B, T, c.num_heads * c.head_dim), rngs[3])
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
            rank = lora.rank_for(layer, name) if lora else 0
            return LoRALinear(
                d_in, d_out, axes, rank=rank, dtype=dtype, param_dtype=param_dtype, rngs=rngs
            )

        D, F = config.hidden_size, config.intermediate_size
        self.gate_proj = linear("gate_proj", D, F, ("embed", "mlp"))
        self.up_proj = linear("up_proj", D, F, ("embed", "mlp"))
        self.down_proj = linear("down_proj", F, D, ("mlp", "embed"))

    def __call__(self, x_BTD, rngs):
        h_BTF = jax.nn.silu(self.gate_proj(x_BTD, rngs[0])) * self.up_proj(x_BTD, rngs[1])
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

    def __call__(self, x_BTD, sin, cos, mask_BTS, kv, rng):
        rngs = [None] * 7 if rng is None else list(jax.random.split(rng, 7))
        with jax.named_scope("attention"):
            h, kv = self.self_attn(self.input_layernorm(x_BTD), sin, cos, mask_BTS, kv, rngs[:4])
        x_BTD = x_BTD + h
        with jax.named_scope("mlp"):
            x_BTD = x_BTD + self.mlp(self.post_attention_layernorm(x_BTD), rngs[4:])
        return x_BTD, kv


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
        rngs: nnx.Rngs | None,
    ):
        c = config
        self.config = c
        self.dtype = dtype
        self.remat = remat
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
    ) -> tuple[Array, KVCache | None]:
        """Run the decoder.

        mask_BT marks real tokens (1) and padding (0). Without positions, each row's
        positions count its real tokens, continuing from `cache.next_pos` when a cache is
        given. `rng` enables LoRA dropout. `last_only` computes the logits of the last position only
        ([B, 1, V], what decoding needs). With `return_hidden`, the final-norm hidden states
        [B, T, D] are returned in place of the logits.
        """
        B, T = tokens_BT.shape
        mask_BT = jnp.ones((B, T), bool) if mask_BT is None else mask_BT.astype(bool)
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
        key_slots = jnp.arange(valid_BS.shape[1])
        mask_BTS = (key_slots[None, None, :] <= query_slots[None, :, None]) & valid_BS[:, None, :]

        x = jnp.take(self.embed_tokens[...], tokens_BT, axis=0).astype(self.dtype)
        layer_rngs = (
            [None] * len(self.layers) if rng is None else jax.random.split(rng, len(self.layers))
        )
        new_k, new_v = [], []
        for i, block in enumerate(self.layers):
            kv = None if cache is None else (cache.k[i], cache.v[i], cache.end)
            with jax.named_scope(f"layer_{i}"):
                call = block if self.remat == "none" else jax.checkpoint(block.__call__)
                x, (k_BKSH, v_BKSH) = call(x, sin, cos, mask_BTS, kv, layer_rngs[i])
            new_k.append(k_BKSH)
            new_v.append(v_BKSH)
        x = self.norm(x)

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
        if last_only:
            x = x[:, -1:]
        if self.lm_head is None:
            logits = jnp.einsum("BTD,VD->BTV", x, self.embed_tokens[...].astype(self.dtype))
        else:
            logits = self.lm_head(x)
        return logits.astype(jnp.float32), cache
