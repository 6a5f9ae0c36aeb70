"""Multiple choice by log-likelihood (QuALITY with `memory.loglik`): every option of a question
scored as the answer after the same prompt, under the same base / top-1 adapter / merge /
mixture the method decodes with.

`OptionScoring` is that part of `MemoryEvaluator` (jaxlora/memory/evaluate.py), which it is
mixed into: it reads the evaluator's model, tokenizer, data section, questions, routes, merges
and left-padded packing. Each pass puts [question x option] rows through one
teacher-forced forward (`continuation_logprobs`) that takes only the last positions, where
the options are, to the output head.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from jaxlora.memory.compose import Method, MethodError
from jaxlora.memory.routers import Route
from jaxlora.sharding import compiling_for


class OptionScoring:
    """Scores a multiple-choice question's options by their summed log-probabilities."""

    @property
    def scores_options(self) -> bool:
        """Whether every question is multiple choice and scored by its options' likelihoods."""
        return (
            self.m.loglik
            and self.data.dataset == "quality"
            and bool(self.questions)
            and all(q.source is not None and q.source.options for q in self.questions)
        )

    def option_ids(self) -> list[list[tuple[int, ...]]]:
        """Each question's options as answer tokens: the option's text as the assistant turn
        after a chat prompt, or after a space following a plain one (as `data.encode` writes
        an answer), without the end of turn: the text is scored, not where the answer stops."""
        lead = "" if self.data.chat_template else " "
        return [
            [
                tuple(self.tok(lead + o, add_special_tokens=False)["input_ids"])
                for o in q.source.options
            ]
            for q in self.questions
        ]

    def option_logprobs(
        self, method: Method, prompts: Sequence[tuple[int, ...]]
    ) -> list[list[float]]:
        """Per question, the summed log-probability of each option's tokens after its prompt
        under `method`: the base model, its top-1 adapter, its merge, or its mixture (the
        members' next-token probabilities averaged at each token, as `decode_mixture` decodes).
        Every [question x option] row of a pass is one teacher-forced forward; an empty
        option scores -inf (it never wins)."""
        options = self.option_ids()
        n, n_opt = len(prompts), max(len(o) for o in options)
        longest = max(
            len(p) + len(o) for p, opts in zip(prompts, options, strict=True) for o in opts
        )
        positions = self.model.config.max_position_embeddings
        if longest > positions:
            raise MethodError(
                f"a prompt with an option ({longest:,} tokens) exceeds the model's "
                f"{positions:,} positions; lower memory.context_tokens or set memory.loglik: false"
            )
        W = prompt_width(longest)
        # The last L positions of every row hold its option (rows are right-aligned); a few
        # distinct L keep the compiled shapes few.
        L = min(
            W - 1, max(8, 1 << (max(len(o) for opts in options for o in opts) - 1).bit_length())
        )
        route = self.route(method.router, method.k) if method.routes_questions else None
        K = method.k if method.combiner == "mixture" else 1
        Q = questions_per_pass(self.m.batch_size, self.m.max_batch_tokens, W, K, n_opt)
        out: list[list[float]] = []
        for start in range(0, n, Q):
            qs = list(range(start, min(start + Q, n)))
            qs += [qs[0]] * (Q - len(qs))  # a full pass: one compile per width
            rows = [(q, min(o, len(options[q]) - 1)) for q in qs for o in range(n_opt)]
            tokens, mask = self._pack([prompts[q] + options[q][o] for q, o in rows], W)
            graphdef, weights, consts, ids = self._option_adapters(method, route, qs, n_opt)
            lp = np.asarray(
                continuation_logprobs(
                    graphdef, self.model.params, weights, consts, ids, tokens, mask, L, self.mesh
                )
            )
            for j, q in enumerate(qs[: min(Q, n - start)]):
                sums = []
                for o, opt in enumerate(options[q]):
                    row = lp[j * n_opt + o]
                    sums.append(float(row[L - len(opt) :].sum()) if opt else float("-inf"))
                out.append(sums)
        return out

    def _option_adapters(self, method: Method, route: Route | None, qs: list[int], n_opt: int):
        """(graphdef, weights, consts, ids [rows, K]) of a pass over `qs` x `n_opt` options: the
        adapters row r runs with are ids[r] of the stack (None: the base model)."""
        if method.router == "arrow":  # every row runs the one Arrow library (ids None)
            lib = self.arrow(method.k)
            w, c = (jax.tree.map(lambda x: x[0], s) for s in (lib.weights, lib.consts))
            return self.model.graph(lib.placement), w, c, None
        if route is None:
            return self.model.graph(), None, None, None
        stack = self.lib.stack
        if method.combiner == "mixture":
            ids = np.repeat(route.indices[qs, : method.k], n_opt, axis=0)
        elif method.combiner == "one":
            ids = np.repeat(route.indices[qs, :1], n_opt, axis=0)
        else:  # one merge per question of the pass
            stack = self._merged(method, route.indices[qs, : method.k])
            ids = np.repeat(np.arange(len(qs))[:, None], n_opt, axis=0)
        graphdef = self.model.graph(stack.placement)
        return graphdef, stack.weights, stack.consts, jnp.asarray(ids, jnp.int32)


@functools.partial(jax.jit, static_argnames=("graphdef", "L", "mesh"))
def continuation_logprobs(
    graphdef, base, weights, consts, ids_RK, tokens_RT, mask_RT, L: int, mesh: Mesh | None = None
):
    """[R, L] log-probabilities of each row's last L tokens, each given the tokens before it.
    Row r runs with adapters `ids_RK[r]` of the stack (`weights` None: the base model; `ids_RK`
    None: every row with the one adapter `weights`, unstacked: an Arrow library); with
    K > 1 each token's probability is the mean of the K adapters' (a per-token mixture).
    Traced for `mesh` (`sharding.compiling_for`; None: no constraints).

    Only the last L positions reach the output head: the full [T, V] logits of a long ICL
    prompt would not fit (24K tokens x 128K vocabulary x 4 bytes is 12 GB per row)."""
    with compiling_for(mesh):
        return _continuation_logprobs(
            graphdef, base, weights, consts, ids_RK, tokens_RT, mask_RT, L
        )


def _continuation_logprobs(graphdef, base, weights, consts, ids_RK, tokens_RT, mask_RT, L):

    def one(w, c, t, m):
        module = nnx.merge(graphdef, w, c, base)
        h = module(t, m, return_hidden=True)[0][:, -L - 1 : -1]  # [B, L, D]: predicts t[-L:]
        if module.lm_head is None:  # tied embeddings, as the decoder's own head
            logits = jnp.einsum("BTD,VD->BTV", h, module.embed_tokens[...].astype(module.dtype))
        else:
            logits = module.lm_head(h)
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, t[:, -L:, None], axis=-1)[..., 0]

    if ids_RK is None:  # every row alike: the base model (no weights) or one adapter's
        if weights is None:
            return one(nnx.State({}), nnx.State({}), tokens_RT, mask_RT)
        return one(weights, consts, tokens_RT, mask_RT)
    R, K = ids_RK.shape
    flat = ids_RK.reshape(-1)
    w = jax.tree.map(lambda x: x[flat], weights)
    c = jax.tree.map(lambda x: x[flat], consts)
    t = jnp.repeat(tokens_RT, K, axis=0)[:, None]  # [R*K, 1, T]: one row per member
    m = jnp.repeat(mask_RT, K, axis=0)[:, None]
    lp = jax.vmap(one)(w, c, t, m)[:, 0].reshape(R, K, L)
    return jax.nn.logsumexp(lp, axis=1) - jnp.log(K)


def questions_per_pass(batch_size: int, max_batch_tokens: int, width: int, k: int, options: int):
    """Questions per option-scoring pass: `batch_size` rows, fewer for long prompts
    (`max_batch_tokens` over k adapters a row), each question taking a row per option; a power
    of two, as in decoding."""
    fit = max(1, min(batch_size, max_batch_tokens // (width * k)) // options)
    return 1 << (fit.bit_length() - 1)


def prompt_width(longest: int) -> int:
    """A prompt width of few distinct values: powers of two up to 1024, then multiples of 1024
    (a power of two would nearly double a long ICL prompt)."""
    if longest <= 1024:
        return max(16, 1 << (longest - 1).bit_length())
    return -(-longest // 1024) * 1024
