"""Arrow routing (PEFT's `ArrowConfig`; Ostapenko et al. 2024, arXiv 2405.11157): a
training-free, per-token mixture over a library of E LoRA adapters.

In every adapted projection each adapter (expert) e has a prototype p_e, the top right singular
vector of its change to the weight dW_e = B_e A_e (PEFT's [out, in] orientation; here the top
left singular vector of A_e B_e, A [in, R], B [R, out]). A token x (the projection's input)
scores |x . p_e| against every expert (the absolute value: a singular vector has no sign); the
top_k experts keep their scores, the others get -inf, and coefficients c = softmax(scores / T)
mix the experts' LoRA outputs: sum_e c_e s_e x A_e B_e. PEFT finds p_e by 15 power iterations
from a random start; here it is exact (`prototypes`: a QR of A and an SVD of an [R, out]
matrix, no [in, out] matrix formed), which is where PEFT's iteration converges.

The layer holding the experts is `LoRALinear` with an `ArrowSpec`; building the library from an
adapter stack is `jaxlora.arrow`'s (this module knows arrays, not stacks).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jaxlora.errors import LoRAError

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class ArrowSpec:
    """How a projection's E experts are mixed: the `top_k` experts of every token by prototype
    score, softmax at `temperature` (PEFT's `top_k` and `router_temperature`)."""

    experts: int
    top_k: int
    temperature: float = 1.0

    def __post_init__(self) -> None:
        if self.experts < 1:
            raise LoRAError("Arrow needs a library of at least one adapter; it is empty")
        if not 1 <= self.top_k <= self.experts:
            raise LoRAError(
                f"Arrow top_k must be in 1..{self.experts} (the library's size), got {self.top_k}"
            )
        if not self.temperature > 0:
            raise LoRAError(f"Arrow temperature must be > 0, got {self.temperature}")


def prototypes(a_EIR: Array, b_ERO: Array) -> Array:
    """Each expert's prototype [E, in]: the top left singular vector of A B (the top right one of
    PEFT's dW = B A), in float32. With A = Q R (QR, Q [in, R] orthonormal), A B = Q (R B) and
    the SVD of the small R B = U S V^T gives it as Q U[:, 0]. An expert without a change here
    (A B = 0: a module it does not adapt) gets a zero prototype: it scores 0 on every token
    (and, if still among the top_k, adds nothing)."""
    a, b = a_EIR.astype(jnp.float32), b_ERO.astype(jnp.float32)
    q, r = jnp.linalg.qr(a)
    u, s, _ = jnp.linalg.svd(r @ b, full_matrices=False)
    p = jnp.einsum("eir,er->ei", q, u[..., 0])
    return jnp.where(s[:, :1] > 0, p, 0.0)


def coefficients(x: Array, protos_EI: Array, top_k: int, temperature: float) -> Array:
    """Routing coefficients [..., E] of tokens x [..., in] in float32: softmax over the top_k
    scores |x . p_e| / temperature, exactly 0 for the other experts (PEFT's -inf)."""
    scores = jnp.abs(jnp.einsum("...i,ei->...e", x.astype(jnp.float32), protos_EI))
    _, idx = jax.lax.top_k(scores, top_k)
    keep = jnp.any(jax.nn.one_hot(idx, scores.shape[-1], dtype=bool), axis=-2)
    return jax.nn.softmax(jnp.where(keep, scores, -jnp.inf) / temperature, axis=-1)


def mixture(x: Array, a_EIR: Array, b_ERO: Array, scale_E: Array, coeff: Array) -> Array:
    """sum_e coeff[..., e] s_e x A_e B_e [..., out], in x's dtype. The coefficients scale the
    rank-R intermediates [..., E, R], so no [..., E, out] array is formed; the second product
    contracts over experts and rank together."""
    z = jnp.einsum("...i,eir->...er", x, a_EIR.astype(x.dtype))
    z = z * (coeff * scale_E).astype(x.dtype)[..., None]
    return jnp.einsum("...er,ero->...o", z, b_ERO.astype(x.dtype))
