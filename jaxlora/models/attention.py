"""Attention kernels: one function, `attend`, computed four ways, picked per call by
`choose_attention` from the traced program's platform (`sharding.target_platform`: the mesh's
devices, not the host's) and static shapes.

`full` (all [T, S] logits at once: the reference, fastest for short sequences), `blocked`
(online softmax over key blocks, for long prefill on CPU/TPU: memory linear in T), `cudnn`
(`jax.nn.dot_product_attention`'s cuDNN flash attention on GPU) and, for packed rows, `_local`
(each query chunk attends over the band of keys its rows can reach). They compute the same
function (tests/test_attention.py). Masks are by storage slot (`AttentionMask`; the rule is in
jaxlora/models/transformer.py's docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp

from jaxlora.sharding import target_platform

Array = jax.Array

# Key length from which CPU/TPU prefill takes the blocked path: below it the full [T, S] logits
# are small (2048^2 float32 = 16 MiB per head) and one fused softmax is faster than a scan.
LONG_CONTEXT = 2048
KEY_BLOCK = 512  # keys per step of the blocked path: [T, 512] logits per head at a time
PACK_CHUNK = 8  # queries per chunk of the packed (local) path: measured fastest of 8-56 on CPU
AttentionImpl = Literal["auto", "full", "blocked", "cudnn"]
ATTENTION_IMPLS: tuple[str, ...] = ("auto", "full", "blocked", "cudnn")


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class AttentionMask:
    """Which key slots each query slot may attend to, without materialising [B, T, S].

    Query slot t sees key slot s when s <= q_slot[t] (causal by storage slot), slot s holds a
    real token (`valid`), and, for packed rows, both carry the same segment id. Kernels build
    only the [B, T, block] piece they need (`block`), so the blocked path never holds [T, S].
    `impl` (the kernel) and `window` (packed: the longest segment) are static.
    """

    q_slot: Array  # [T] int32
    valid: Array  # [B, S] bool
    q_seg: Array | None = None  # [B, T] int32: segment ids (0 = padding), packed rows only
    k_seg: Array | None = None  # [B, S] int32
    impl: str = dataclasses.field(default="full", metadata=dict(static=True))
    window: int = dataclasses.field(default=0, metadata=dict(static=True))

    def block(self, k0, size: int) -> Array:
        """[B, T, size] bool: the mask of key slots k0 .. k0 + size - 1 (k0 may be traced)."""
        B = self.valid.shape[0]
        k_slot = k0 + jnp.arange(size)
        out = k_slot[None, None, :] <= self.q_slot[None, :, None]
        out = out & jax.lax.dynamic_slice(self.valid, (0, k0), (B, size))[:, None, :]
        if self.q_seg is not None:
            k_seg = jax.lax.dynamic_slice(self.k_seg, (0, k0), (B, size))
            out = out & (self.q_seg[:, :, None] == k_seg[:, None, :])
        return out

    def dense(self) -> Array:
        return self.block(0, self.valid.shape[1])


def choose_attention(impl: str, *, T: int, S: int, cached: bool, dtype, head_dim: int) -> str:
    """The kernel for one call, from the backend and static shapes (`impl` other than auto wins).

    GPU: cuDNN flash attention where it applies (no KV cache, 16-bit, head dim <= 128; its
    mask is passed as a bias, so it is for training and short prefill); otherwise, or
    elsewhere, the full logits up to LONG_CONTEXT keys and the blocked scan beyond, so that a
    long prefill holds [T, KEY_BLOCK] logits per head instead of [T, S]. Decoding steps (T = 1)
    stay full: their logits are [1, S] already."""
    if impl != "auto":
        return impl
    gpu = target_platform() == "gpu"  # the traced program's devices, not the host's
    half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
    if gpu and not cached and half and head_dim <= 128 and head_dim % 8 == 0 and S < LONG_CONTEXT:
        return "cudnn"
    return "blocked" if T > 1 and S >= LONG_CONTEXT else "full"


def attend(q_BTNH: Array, k_BKSH: Array, v_BKSH: Array, mask: AttentionMask, dtype) -> Array:
    """softmax(q k^T / sqrt(H) masked) v: [B, T, N * H], by the kernel `mask.impl` names.

    Logits and softmax in float32, probabilities cast to `dtype` for the value product (as
    the reference `full` path always did). A query slot with no visible key (a left-padding
    slot) gets an arbitrary finite output that nothing reads."""
    if mask.window:
        return _local(q_BTNH, k_BKSH, v_BKSH, mask, dtype)
    if mask.impl == "blocked":
        return _blocked(q_BTNH, k_BKSH, v_BKSH, mask, dtype)
    if mask.impl == "cudnn":
        B, T, N, H = q_BTNH.shape
        out = jax.nn.dot_product_attention(
            q_BTNH.astype(dtype),
            jnp.swapaxes(k_BKSH, 1, 2).astype(dtype),
            jnp.swapaxes(v_BKSH, 1, 2).astype(dtype),
            mask=mask.dense()[:, None],
            implementation="cudnn",
        )
        return out.reshape(B, T, N * H)
    if mask.impl != "full":
        raise ValueError(f"unknown attention kernel {mask.impl!r}: use one of {ATTENTION_IMPLS}")
    return _full(q_BTNH, k_BKSH, v_BKSH, mask.dense(), dtype)


def _groups(q_BTNH: Array, K: int) -> Array:
    B, T, N, H = q_BTNH.shape
    return q_BTNH.reshape(B, T, K, N // K, H).transpose(0, 2, 3, 1, 4)  # [B, K, G, T, H]


def _full(q_BTNH, k_BKSH, v_BKSH, mask_BTS, dtype) -> Array:
    """The reference: every [T, S] logit at once."""
    B, T, N, H = q_BTNH.shape
    q_BKGTH = _groups(q_BTNH, k_BKSH.shape[1])
    logits = jnp.einsum("BKGTH,BKSH->BKGTS", q_BKGTH, k_BKSH.astype(dtype))
    logits = logits.astype(jnp.float32) * H**-0.5
    logits = jnp.where(mask_BTS[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("BKGTS,BKSH->BTKGH", probs, v_BKSH.astype(dtype))
    return out.reshape(B, T, N * H)


def _blocked(q_BTNH, k_BKSH, v_BKSH, mask: AttentionMask, dtype, block: int = KEY_BLOCK) -> Array:
    """Online softmax over key blocks (flash attention's recurrence, as a `lax.scan`): per
    query a running max m, normaliser `norm` and weighted sum `acc`, rescaled by exp(m_old - m_new)
    whenever a block raises the max. Live memory is [T, block] logits per head, so a prefill
    grows linearly with its length. Masked logits are float32's min as in `_full`, so a block
    with nothing visible adds exp(min - m) = 0 once any real key has been seen."""
    B, T, N, H = q_BTNH.shape
    K, S = k_BKSH.shape[1], k_BKSH.shape[2]
    block = min(block, S)
    n = -(-S // block)
    pad = n * block - S
    if pad:  # padded key slots are invalid, so they never count
        k_BKSH = jnp.pad(k_BKSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
        v_BKSH = jnp.pad(v_BKSH, ((0, 0), (0, 0), (0, pad), (0, 0)))
        mask = dataclasses.replace(
            mask,
            valid=jnp.pad(mask.valid, ((0, 0), (0, pad))),
            k_seg=None if mask.k_seg is None else jnp.pad(mask.k_seg, ((0, 0), (0, pad))),
        )
    q_BKGTH = _groups(q_BTNH, K)
    G = N // K
    k_nBKbH = jnp.moveaxis(k_BKSH.reshape(B, K, n, block, H), 2, 0)
    v_nBKbH = jnp.moveaxis(v_BKSH.reshape(B, K, n, block, H), 2, 0)
    floor = jnp.finfo(jnp.float32).min

    def step(carry, xs):
        m, norm, acc = carry
        k_b, v_b, i = xs
        s = jnp.einsum("BKGTH,BKbH->BKGTb", q_BKGTH, k_b.astype(dtype))
        s = s.astype(jnp.float32) * H**-0.5
        s = jnp.where(mask.block(i * block, block)[:, None, None], s, floor)
        m_new = jnp.maximum(m, s.max(axis=-1))
        p = jnp.exp(s - m_new[..., None])
        fix = jnp.exp(m - m_new)
        norm = norm * fix + p.sum(axis=-1)
        pv = jnp.einsum("BKGTb,BKbH->BKGTH", p.astype(dtype), v_b.astype(dtype))
        return (m_new, norm, acc * fix[..., None] + pv.astype(jnp.float32)), None

    init = (
        jnp.full((B, K, G, T), floor, jnp.float32),
        jnp.zeros((B, K, G, T), jnp.float32),
        jnp.zeros((B, K, G, T, H), jnp.float32),
    )
    (_, norm, acc), _ = jax.lax.scan(step, init, (k_nBKbH, v_nBKbH, jnp.arange(n)))
    out = (acc / norm[..., None]).astype(dtype)  # norm >= 1: the max's own term is exp(0)
    return out.transpose(0, 3, 1, 2, 4).reshape(B, T, N * H)


def _local(q_BTNH, k_BKSH, v_BKSH, mask: AttentionMask, dtype, chunk: int = PACK_CHUNK) -> Array:
    """Packed rows: a query sees only its own row, at most `mask.window` tokens long, so chunk
    c of `chunk` queries needs only the keys from window - 1 before the chunk to its end.
    Each chunk attends over that fixed band of (m + 1) chunks of keys, gathered by m + 1
    shifted views, and the cost per query is ~window + chunk keys, not the packed length.
    Exact: every key a query may see lies in its band, and the mask removes the rest."""
    B, T, N, H = q_BTNH.shape
    K = k_BKSH.shape[1]
    if k_BKSH.shape[2] != T or mask.q_seg is None:
        raise ValueError("packed attention needs segment ids and no KV cache")
    # Small chunks keep the band tight (window + chunk keys); a long window takes ~8 bigger ones,
    # since each chunk is one more shifted copy of the keys.
    chunk = max(chunk, -(-mask.window // 64) * 8)
    n = -(-T // chunk)
    m = -(-(mask.window - 1) // chunk)  # chunks of keys before the query's own chunk
    tail = n * chunk - T

    def pad_t(x, axis, value=0):  # m chunks in front (the band of chunk 0), `tail` behind
        widths = [(0, 0)] * x.ndim
        widths[axis] = (m * chunk, tail)
        return jnp.pad(x, widths, constant_values=value)

    def bands(x, axis):  # [..., (n + m) chunk, ...] -> [..., n, (m + 1) chunk, ...]
        views = [
            jax.lax.slice_in_dim(x, j * chunk, (j + n) * chunk, axis=axis) for j in range(m + 1)
        ]
        shape = (*x.shape[:axis], n, chunk, *x.shape[axis + 1 :])
        return jnp.concatenate([v.reshape(shape) for v in views], axis=axis + 1)

    k_BKnwH = bands(pad_t(k_BKSH, 2), 2).astype(dtype)
    v_BKnwH = bands(pad_t(v_BKSH, 2), 2).astype(dtype)
    k_seg = bands(pad_t(jnp.where(mask.valid, mask.k_seg, 0), 1), 1)  # [B, n, w]; 0: none
    k_slot = bands(pad_t(jnp.arange(T), 0, -1), 0)  # [n, w]
    q_seg = jnp.pad(mask.q_seg, ((0, 0), (0, tail))).reshape(B, n, chunk)
    q_slot = jnp.pad(mask.q_slot, (0, tail)).reshape(n, chunk)
    visible = (
        (k_seg[:, :, None, :] == q_seg[..., None])
        & (k_seg[:, :, None, :] > 0)
        & (k_slot[None, :, None, :] <= q_slot[None, :, :, None])
    )  # [B, n, c, w]

    q = jnp.pad(q_BTNH, ((0, 0), (0, tail), (0, 0), (0, 0)))
    q_BKGncH = _groups(q, K).reshape(B, K, N // K, n, chunk, H)
    logits = jnp.einsum("BKGncH,BKnwH->BKGncw", q_BKGncH, k_BKnwH)
    logits = logits.astype(jnp.float32) * H**-0.5
    logits = jnp.where(visible[:, None, None], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(dtype)
    out = jnp.einsum("BKGncw,BKnwH->BncKGH", probs, v_BKnwH)
    return out.reshape(B, n * chunk, N * H)[:, :T]
