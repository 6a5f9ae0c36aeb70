"""Building blocks shared by every decoder family: RMSNorm, rotary embeddings, and the linear
projection that can carry a LoRA adapter.

Every parameter is declared once, with its logical axis names in the variable's `axes`
metadata; `jaxlora.sharding` maps those names onto mesh axes through one rules table.

LoRA weights are their own variable types so that `nnx.split(model, LoRAWeight, LoRAConst,
nnx.Param)` separates the trainable adapter (`LoRAWeight`: A and B), the adapter's constants
(`LoRAConst`: scaling and dropout rate, per adapter so that alpha or dropout can be swept in
one job) and the frozen base (`nnx.Param`). The graph definition depends only on *which*
projections carry an adapter, never on its rank, so every rank shares one compiled function
body; zero-padding A and B to a larger rank leaves the layer's output, gradients and AdamW
updates of the real entries unchanged (the padded entries receive exactly zero gradient).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxlora.models import arrow as arrow_math
from jaxlora.models import grouped
from jaxlora.models.arrow import ArrowSpec
from jaxlora.models.config import ModelConfig
from jaxlora.sharding import target_platform

Array = jax.Array


def _mix32(h: Array) -> Array:
    """murmur3's 32-bit finaliser, a bijection in which every input bit flips every output bit
    with probability about 1/2."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _dropout(rng: Array, rate: Array, x: Array) -> Array:
    """Inverted dropout at a (traced) `rate`, each element kept with probability
    round((1 - rate) * 2^16) / 2^16 and rescaled by its inverse (so the expectation is x).

    The key (from `jax.random`, whose threefry derives one per adapter, step, layer and
    projection) seeds a counter-based hash: word i of a [ceil(M/2), D] array (x as M rows of D
    features) is two murmur3 finalisers of i, keyed by the key's two 32-bit halves, and gives
    two 16-bit draws: a few integer operations per element where a threefry hash takes ~80
    (its cost on a CPU step: benchmarks/README.md). The low halves draw the first ceil(M/2)
    rows, the high halves the rest (shifts, masks and a concatenate along the rows): every
    array keeps x's trailing dimension. Splitting each word into a trailing uint16 pair (a
    bitcast) gave a trailing dimension of 2, which TPU tiles as (8, 128), 64x its size (4-7 GiB
    per buffer for an 8B step); and on a CPU the concatenate along the rows is the faster one
    (benchmarks/README.md)."""
    D = x.shape[-1]
    M = math.prod(x.shape[:-1])
    half = (M + 1) // 2
    key = jax.random.key_data(rng)
    k0, k1 = key[..., 0], key[..., 1]
    row = jax.lax.broadcasted_iota(jnp.uint32, (half, D), 0)
    words = row * jnp.uint32(D) + jax.lax.broadcasted_iota(jnp.uint32, (half, D), 1)
    bits = _mix32(_mix32(words * jnp.uint32(0x9E3779B1) ^ k0) ^ k1)
    draws = jnp.concatenate([bits & jnp.uint32(0xFFFF), bits >> 16], axis=0)[:M]
    threshold = jnp.round((1.0 - rate) * 65536.0).astype(jnp.uint32)
    scale = (65536.0 / jnp.maximum(threshold, 1).astype(jnp.float32)).astype(x.dtype)
    return jnp.where(draws.reshape(x.shape) < threshold, x * scale, 0).astype(x.dtype)


@jax.custom_vjp
def _factor_product(x: Array, w: Array) -> Array:
    """x [..., in] @ w [in, out] in x's dtype, for a LoRA factor `w` (A or B, float32 in
    training). Its gradient is summed in w's dtype, as PEFT's float32 adapters do, and written
    with the wider of in and out as its minor dimension: XLA:CPU's kernels write a product of
    r = 2-16 columns 4-6x slower (benchmarks/README.md). So A's [in, r] gradient is summed as
    [r, in] and transposed after; on a CPU a barrier stops XLA from folding the transpose
    back into the product, elsewhere the layout is the compiler's to choose (the CPU is the
    traced program's, `sharding.target_platform`, not the host's)."""
    return jnp.einsum("...i,io->...o", x, w.astype(x.dtype))


def _factor_product_fwd(x, w):
    return _factor_product(x, w), (x, w)


def _factor_product_bwd(res, g):
    x, w = res
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    dx = jnp.einsum("...o,io->...i", g, w.astype(g.dtype))
    if w.shape[1] >= w.shape[0]:
        return dx, jnp.einsum("ti,to->io", x2, g2, preferred_element_type=w.dtype)
    dw_oi = jnp.einsum("to,ti->oi", g2, x2, preferred_element_type=w.dtype)
    if target_platform() == "cpu":
        dw_oi = jax.lax.optimization_barrier(dw_oi)
    return dx, dw_oi.T


_factor_product.defvjp(_factor_product_fwd, _factor_product_bwd)


def dense(x: Array, w: Array) -> Array:
    """x [..., in] @ w [in, out] in x's dtype, summed in float32.

    What an accelerator's bfloat16 product does anyway. XLA:CPU computes a bfloat16 product
    that returns bfloat16 by converting both operands to float32; asked for a float32 result
    (`preferred_element_type`), it runs the bfloat16 matmul kernels instead (AMX on recent
    Xeons: 4x faster, benchmarks/README.md). `_summed_in_f32` asks so for the forward and
    backward products: on a CPU and below float32 only, elsewhere the plain product. The CPU
    is the traced program's (`sharding.target_platform`), not the host's."""
    if x.dtype == jnp.float32 or target_platform() != "cpu":
        return jnp.einsum("...i,io->...o", x, w)
    return _summed_in_f32(x, w)


@jax.custom_vjp
def _summed_in_f32(x: Array, w: Array) -> Array:
    return jnp.einsum("...i,io->...o", x, w, preferred_element_type=jnp.float32).astype(x.dtype)


def _summed_in_f32_fwd(x, w):
    return _summed_in_f32(x, w), (x, w)


def _summed_in_f32_bwd(res, g):
    x, w = res
    f32 = dict(preferred_element_type=jnp.float32)
    dx = jnp.einsum("...o,io->...i", g, w, **f32).astype(x.dtype)
    x2, g2 = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
    return dx, jnp.einsum("ti,to->io", x2, g2, **f32).astype(w.dtype)


_summed_in_f32.defvjp(_summed_in_f32_fwd, _summed_in_f32_bwd)


class LoRAWeight(nnx.Variable):
    """Trainable LoRA factors: `lora_a` [in, R] and `lora_b` [R, out], and DoRA's magnitude
    vector `lora_magnitude` [out]."""


class LoRAConst(nnx.Variable):
    """Per-adapter constants of a LoRA layer: `lora_scale` (alpha/r) and `lora_dropout`, and
    with a residual correction the frozen initial factors `lora_a0` [in, R], `lora_b0` [R, out];
    with DoRA `lora_dora` (1: this adapter is a DoRA adapter here, 0: a plain one); with Arrow
    the experts' prototypes `lora_proto` [E, in]; with a grouped library the rows of the batch
    per adapter, `lora_rows` [G]."""


def random_normal(rngs: nnx.Rngs | None, shape: tuple[int, ...], dtype, stddev: float = 0.02):
    """normal(0, stddev) weights, or zeros when `rngs` is None (abstract shapes need no RNG)."""
    if rngs is None:
        return jnp.zeros(shape, dtype)
    return jax.nn.initializers.normal(stddev)(rngs.params(), shape, dtype)


class LoRALinear(nnx.Module):
    """y = x W + b + s * dropout(x) A B, with W frozen and (A, B) the adapter.

    `rank == 0` builds a plain linear layer. Dropout is applied only when a key is given, so
    evaluation is deterministic.

    `residual`: y = x W + b - s x A0 B0 + s * dropout(x) A B, with (A0, B0) an adapter's frozen
    initial factors. PiSSA and OLoRA start an adapter from the base weight's principal (SVD) or
    QR directions and train on the residual W - s A0 B0 (PEFT rewrites the base so); here every
    adapter carries its own correction and the shared base stays as it is. An adapter that
    starts at B = 0 has A0 = B0 = 0.

    `dora`: DoRA (PEFT's `use_dora`), a learned magnitude per output over the direction of
    W + s A B (`_dora`); an adapter of the stack that is not a DoRA adapter is plain LoRA.

    `arrow`: Arrow routing (`jaxlora.models.arrow`): the layer holds a library of E experts,
    `lora_a` [E, in, R], `lora_b` [E, R, out], `lora_scale` [E] and prototypes `lora_proto`
    [E, in], and adds each token's mixture of them; training-free, so no dropout.

    `groups`: the layer holds a library of G adapters as a stack lays them out (`lora_a`
    [G, in, R], `lora_b` [G, R, out], `lora_scale` [G], residual factors likewise) and row b
    of the batch goes through its own adapter (`jaxlora.models.grouped`): the rows are sorted
    by adapter and `lora_rows` [G] counts each adapter's rows. For decoding and scoring many
    adapters in one batch; no dropout, no DoRA.
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        axes: tuple[str | None, str | None],
        *,
        use_bias: bool = False,
        rank: int = 0,
        residual: bool = False,
        dora: bool = False,
        arrow: ArrowSpec | None = None,
        groups: int | None = None,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        rngs: nnx.Rngs | None,
    ):
        self.dtype = dtype
        self.kernel = nnx.Param(
            random_normal(rngs, (in_features, out_features), param_dtype), axes=axes
        )
        self.bias = (
            nnx.Param(jnp.zeros((out_features,), param_dtype), axes=(axes[1],))
            if use_bias
            else None
        )
        self.arrow = arrow if rank else None
        self.groups = groups if rank else None
        # A library of G adapters (`groups`) puts a leading axis on every adapter variable.
        lead, lead_axes = ((groups,), (None,)) if self.groups else ((), ())

        def factor(shape, names, kind=LoRAWeight):
            return kind(jnp.zeros((*lead, *shape), jnp.float32), axes=(*lead_axes, *names))

        if rank and arrow is not None:
            self._init_arrow(in_features, out_features, axes, rank, arrow.experts)
        elif rank:
            self.lora_a = factor((in_features, rank), (axes[0], "rank"))
            self.lora_b = factor((rank, out_features), ("rank", axes[1]))
            self.lora_scale = LoRAConst(jnp.ones(lead, jnp.float32), axes=lead_axes)
            self.lora_dropout = LoRAConst(jnp.zeros(lead, jnp.float32), axes=lead_axes)
        else:
            self.lora_a = self.lora_b = self.lora_scale = self.lora_dropout = None
        self.lora_rows = (
            LoRAConst(jnp.zeros(lead, jnp.int32), axes=lead_axes) if self.groups else None
        )
        if rank and residual and arrow is None:
            self.lora_a0 = factor((in_features, rank), (axes[0], "rank"), LoRAConst)
            self.lora_b0 = factor((rank, out_features), ("rank", axes[1]), LoRAConst)
        else:
            self.lora_a0 = self.lora_b0 = None
        if rank and dora and arrow is None:
            self.lora_magnitude = LoRAWeight(jnp.zeros((out_features,), jnp.float32), axes=axes[1:])
            self.lora_dora = LoRAConst(jnp.zeros((), jnp.float32), axes=())
        else:
            self.lora_magnitude = self.lora_dora = None

    def _init_arrow(self, d_in: int, d_out: int, axes, rank: int, experts: int) -> None:
        E = experts
        self.lora_a = LoRAWeight(
            jnp.zeros((E, d_in, rank), jnp.float32), axes=(None, axes[0], "rank")
        )
        self.lora_b = LoRAWeight(
            jnp.zeros((E, rank, d_out), jnp.float32), axes=(None, "rank", axes[1])
        )
        self.lora_scale = LoRAConst(jnp.zeros((E,), jnp.float32), axes=(None,))
        self.lora_dropout = None
        self.lora_proto = LoRAConst(jnp.zeros((E, d_in), jnp.float32), axes=(None, axes[0]))

    @property
    def has_lora(self) -> bool:
        return self.lora_a is not None

    def __call__(self, x: Array, rng: Array | None = None) -> Array:
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        y = dense(x, kernel)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if not self.has_lora:
            return y
        if self.arrow is not None:
            with jax.named_scope("arrow"):
                spec = self.arrow
                coeff = arrow_math.coefficients(
                    x, self.lora_proto[...], spec.top_k, spec.temperature
                )
                a, b, s = self.lora_a[...], self.lora_b[...], self.lora_scale[...]
                return y + arrow_math.mixture(x, a, b, s, coeff)
        if self.groups is not None:
            with jax.named_scope("lora_grouped"):
                s, rows = self.lora_scale[...], self.lora_rows[...]
                lora = grouped.product(x, self.lora_a[...], self.lora_b[...], s, rows)
                if self.lora_a0 is not None:  # the residual base W - s A0 B0
                    lora = lora - grouped.product(x, self.lora_a0[...], self.lora_b0[...], s, rows)
                return y + lora
        with jax.named_scope("lora"):
            h = x
            if rng is not None:
                h = _dropout(rng, self.lora_dropout[...], x)
            # Scaling the rank-r intermediate rather than the output keeps the backward pass
            # free of an elementwise pass over the [..., out] cotangent.
            scale = self.lora_scale[...].astype(self.dtype)
            u = _factor_product(h, self.lora_a[...]) * scale
            lora = _factor_product(u, self.lora_b[...])
            a, b = self.lora_a[...], self.lora_b[...]
            if self.lora_a0 is not None:  # the residual base W - s A0 B0
                a0, b0 = (f[...].astype(self.dtype) for f in (self.lora_a0, self.lora_b0))

                def residual(z):
                    return jnp.einsum(
                        "...r,ro->...o", jnp.einsum("...i,ir->...r", z, a0) * scale, b0
                    )

                y = y - residual(x)  # on x undropped, as PEFT's base layer sees it
                # DoRA's W + s A B is then W - s A0 B0 + s A B: rank-2r factors [A, A0], [B; -B0]
                a, b = jnp.concatenate([a, a0], 1), jnp.concatenate([b, -b0], 0)
            if self.lora_magnitude is not None:
                # On an undropped x, h W is y less its bias (PEFT reuses its base result so).
                if rng is None:
                    base = y if self.bias is None else y - self.bias[...].astype(self.dtype)
                else:
                    base = dense(h, kernel)
                    if self.lora_a0 is not None:
                        base = base - residual(h)
                lora = self._dora(kernel, a, b, base, lora)
            y = y + lora
        return y

    def _dora(self, kernel: Array, a: Array, b: Array, base: Array, lora: Array) -> Array:
        """DoRA's change to the output, as PEFT computes it: (g - 1) h W + g s h A B with
        g = m / ||W + s A B||, the norm over each output's column (the input dimension) and
        outside the gradient (the paper's section 4.3). `base` is h W, `lora` is s h A B; with
        a residual correction W is W - s A0 B0 and (a, b) are [A, A0] and [B; -B0].

        The norm is expanded, ||w + s A b||^2 = ||w||^2 + 2 s b . (A^T w) + s^2 b^T (A^T A) b,
        so that no [in, out] matrix is formed per adapter: the products are [r, out] and [r, r].
        An adapter that is not a DoRA adapter here (`lora_dora` 0) gets g = 1, plain LoRA."""
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        s = self.lora_scale[...]
        w = kernel.astype(jnp.float32)
        at_w = jnp.einsum("ir,io->ro", a, w)
        squared = (
            jnp.sum(w * w, axis=0)
            + 2 * s * jnp.sum(b * at_w, axis=0)
            + s * s * jnp.einsum("ro,rq,qo->o", b, a.T @ a, b)
        )
        norm = jax.lax.stop_gradient(jnp.sqrt(jnp.maximum(squared, 0.0)))
        dora = self.lora_dora[...] > 0
        g = jnp.where(dora, self.lora_magnitude[...] / jnp.where(dora, norm, 1.0), 1.0)
        g = g.astype(base.dtype)
        return (g - 1) * base + g * lora


class RMSNorm(nnx.Module):
    """RMSNorm computed in float32 and cast back, as transformers does."""

    def __init__(
        self,
        dim: int,
        eps: float,
        *,
        axis_name: str | None,
        dtype,
        param_dtype,
        rngs: nnx.Rngs | None,
    ):
        del rngs
        self.eps = eps
        self.dtype = dtype
        self.weight = nnx.Param(jnp.ones((dim,), param_dtype), axes=(axis_name,))

    def __call__(self, x: Array) -> Array:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...].astype(self.dtype) * normed.astype(self.dtype)


def rope_inv_freq(config: ModelConfig) -> np.ndarray:
    """Inverse rotary frequencies [H/2], with Llama 3 scaling when the config asks for it."""
    dim = config.head_dim
    inv_freq = 1.0 / (config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    scaling = config.rope_scaling
    if scaling is None:
        return inv_freq.astype(np.float32)
    old_len = scaling.original_max_position_embeddings
    low_freq_wavelen = old_len / scaling.low_freq_factor
    high_freq_wavelen = old_len / scaling.high_freq_factor
    wavelen = 2 * np.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (old_len / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return np.where(medium, smoothed, scaled).astype(np.float32)


def rope_sin_cos(positions_BT: Array, inv_freq: np.ndarray, dtype) -> tuple[Array, Array]:
    """sin and cos [B, T, H/2] of the rotary angles, computed in float32."""
    angles = positions_BT.astype(jnp.float32)[..., None] * jnp.asarray(inv_freq)
    return jnp.sin(angles).astype(dtype), jnp.cos(angles).astype(dtype)


def apply_rope(x_BTNH: Array, sin_BTh: Array, cos_BTh: Array) -> Array:
    """Rotate the two halves of the head dim (the `rotate_half` convention of transformers)."""
    x1, x2 = jnp.split(x_BTNH, 2, axis=-1)
    sin, cos = sin_BTh[:, :, None, :], cos_BTh[:, :, None, :]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
