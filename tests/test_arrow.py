"""Arrow routing (jaxlora.arrow) against PEFT's own Arrow (`create_arrow_model`) on a tiny
library of random PEFT adapters: (a) every module's prototypes and routing coefficients per
token, (b) the logits."""

from __future__ import annotations

import dataclasses
import re

import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from peft import ArrowConfig, create_arrow_model, get_peft_model
from peft import LoraConfig as PeftLoraConfig
from peft.tuners.lora import arrow as peft_arrow

import jaxlora
from jaxlora.arrow import ArrowLibrary, arrow_library, arrow_logits, generate_arrow
from jaxlora.errors import LoRAError
from jaxlora.models import arrow as arrow_math
from tests.hf_factory import load_hf_model
from tests.test_lora import peft_logits
from tests.test_model_parity import padded_batch

EXPERTS, TOP_K, TEMPERATURE = 4, 2, 0.5
# PEFT finds each prototype by power iteration on dW^T dW, whose error shrinks as
# (s2/s1)^(2n) with s1 > s2 dW's top singular values. With the dominant direction these
# adapters are given (`arrow_adapter`: s2/s1 < 0.8, asserted below), 200 iterations leave
# < 0.8^400 ~ 1e-39: PEFT's iteration at its limit, the exact singular vector jaxlora computes.
# (Its default 15 leave ~1e-3.)
POWER_ITERATIONS = 200
# Trained adapters have a decaying spectrum; PEFT's random factors (init_lora_weights=False)
# have a nearly flat one (s2/s1 up to 0.99 here), whose top singular vector is barely defined.
# Scaling A's first rank component gives every module of every adapter a leading direction.
LEADING = 3.0


@pytest.fixture(scope="module")
def library(hf_checkpoint, tmp_path_factory):
    """(checkpoint, task adapter dirs, general adapter dirs): random PEFT adapters
    (init_lora_weights=False: A and B both non-zero) of rank 4 on every linear module."""
    path = hf_checkpoint("llama")
    tmp = tmp_path_factory.mktemp("arrow")
    tasks = [tmp / f"task{i}" for i in range(EXPERTS)]
    general = [tmp / f"general{i}" for i in range(2)]
    for seed, d in enumerate(tasks):
        arrow_adapter(path, d, seed)
    for seed, d in enumerate(general, len(tasks)):  # no leading direction: GKS keeps the tasks'
        arrow_adapter(path, d, seed, leading=1.0)
    return path, tasks, general


def arrow_adapter(path, out_dir, seed: int, leading: float = LEADING) -> None:
    """A random rank-4 PEFT adapter on every linear module, A's first row scaled by `leading`."""
    torch.manual_seed(seed)
    config = PeftLoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules="all-linear")
    peft_model = get_peft_model(load_hf_model(path), config)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_A" in name:
                p[0] *= leading
    peft_model.save_pretrained(out_dir)


def peft_arrow_model(path, tasks, general=None, monkeypatch=None, **config):
    """PEFT's Arrow model over `tasks` (with GenKnowSub over `general`), its power iteration
    run to convergence."""
    defaults = peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA.__defaults__
    monkeypatch.setattr(
        peft_arrow.ArrowLoraLinearLayer.top_right_singular_vec_from_BA,
        "__defaults__",
        (POWER_ITERATIONS, *defaults[1:]),
    )
    arrow_config = ArrowConfig(
        top_k=config.get("top_k", TOP_K),
        router_temperature=config.get("temperature", TEMPERATURE),
        use_gks=general is not None,
        rng_seed=0,
    )
    model = create_arrow_model(
        load_hf_model(path),
        [str(d) for d in tasks],
        arrow_config,
        general_adapter_paths=None if general is None else [str(d) for d in general],
    )
    return model.eval()


class _SoftmaxRecorder:
    """Stands in for `torch` inside peft.tuners.lora.arrow: records every softmax it computes
    (the routing coefficients [tokens, E], one call per Arrow layer and forward)."""

    def __init__(self):
        self.calls: list[torch.Tensor] = []

    def __getattr__(self, name):
        return getattr(torch, name)

    def softmax(self, *args, **kwargs):
        out = torch.softmax(*args, **kwargs)
        self.calls.append(out.detach().clone())
        return out


def _module_key(name: str) -> tuple:
    """('layers', i, parent, module) of a PEFT module name."""
    m = re.search(r"layers\.(\d+)\.(self_attn|mlp)\.(\w+_proj)", name)
    return ("layers", int(m[1]), m[2], m[3])


def peft_forward(peft_model, ids, mask, monkeypatch):
    """PEFT's logits, and each Arrow layer's (module key, input tokens [t, in], coefficients
    [t, E], prototypes [E, in]) in call order."""
    recorder = _SoftmaxRecorder()
    monkeypatch.setattr(peft_arrow, "torch", recorder)
    inputs: list[tuple[tuple, np.ndarray]] = []

    def record(key):
        return lambda mod, args: inputs.append((key, args[0].numpy()))

    layers = {
        _module_key(name): module
        for name, module in peft_model.named_modules()
        if isinstance(module, peft_arrow.ArrowLoraLinearLayer)
    }
    hooks = [module.register_forward_pre_hook(record(key)) for key, module in layers.items()]
    logits = peft_logits(peft_model, ids, mask)
    for h in hooks:
        h.remove()
    monkeypatch.setattr(peft_arrow, "torch", torch)
    assert len(inputs) == len(recorder.calls) == 2 * 7  # 2 layers x 7 projections
    return logits, [
        (key, x.reshape(-1, x.shape[-1]), c.numpy(), layers[key].prototypes.numpy())
        for (key, x), c in zip(inputs, recorder.calls, strict=True)
    ]


def with_prototypes(lib: ArrowLibrary, protos: dict[tuple, np.ndarray]) -> ArrowLibrary:
    """`lib` with the given prototypes [E, in] by module key."""

    def put(path, var):
        if path[-1] != "lora_proto":
            return var
        return var.replace(jnp.asarray(protos[path[:-1]])[None])

    return dataclasses.replace(lib, consts=nnx.map_state(put, lib.consts))


def compare_with_peft(model, lib, peft_model, monkeypatch) -> np.ndarray:
    """Checks (a) and (b) of the module docstring; returns PEFT's logits at real tokens."""
    ids, mask = padded_batch("right")
    valid = mask.astype(bool)
    ref, layers = peft_forward(peft_model, ids, mask, monkeypatch)
    protos = {
        p[:-1]: np.asarray(v.get_value()[0])
        for p, v in nnx.to_flat_state(lib.consts)
        if p[-1] == "lora_proto"
    }
    factors = dict(nnx.to_flat_state(lib.weights))
    worst_proto = worst_coeff = 0.0
    for key, tok, theirs, peft_protos in layers:
        # (a1) prototypes up to sign. The gap s2/s1 < 0.8 makes PEFT's iterations exact (see
        # POWER_ITERATIONS); float32 QR/SVD and iteration leave ~1e-7 per entry of a unit
        # vector, a wrong vector (another singular vector, B A's left one) is O(0.1-1) away.
        a = np.asarray(factors[(*key, "lora_a")].get_value()[0])
        b = np.asarray(factors[(*key, "lora_b")].get_value()[0])
        s = np.linalg.svd(a @ b, compute_uv=False)
        assert (s[:, 1] / s[:, 0]).max() < 0.8
        ours = protos[key]
        signs = np.sign(np.sum(ours * peft_protos, axis=1, keepdims=True))
        worst_proto = max(worst_proto, np.abs(signs * ours - peft_protos).max())
        # (a2) every token's coefficients, from PEFT's own input to the layer: the same top-k
        # experts (exact zeros elsewhere), softmax weights equal to the float32 rounding of
        # scores |x . p| ~ 0.1-10 (measured ~1e-6; the bound is 100x that).
        mine = np.asarray(arrow_math.coefficients(jnp.asarray(tok), ours, TOP_K, TEMPERATURE))
        np.testing.assert_array_equal(mine == 0, theirs == 0)
        assert ((theirs > 0).sum(axis=1) == TOP_K).all()
        worst_coeff = max(worst_coeff, np.abs(mine - theirs).max())
    assert worst_proto < 1e-6, worst_proto
    assert worst_coeff < 1e-4, worst_coeff

    # (b) logits of the whole forward, float32 on both sides in torch's and XLA's summation
    # orders. With PEFT's own prototypes: logits ~1-10 after 2 layers of <= 128-term sums agree
    # to ~3e-5 (the plain LoRA test's bound, tests/test_lora.py, is 1e-4). With jaxlora's (exact)
    # prototypes the ~1e-7 by which two float32 unit vectors differ moves the scores by
    # |x| * 1e-7 * sqrt(in) and the mixture by that / T times |s x A B| ~ 10-100 here: measured
    # 5e-5 (plain) and 2e-4 (GenKnowSub) -- PEFT's own float32 logits are 5e-5 from its float64
    # run -- so 5e-4 bounds it, still 2x below what routing by one wrong expert moves (> 1e-3).
    peft_protos = {key: p for key, _, _, p in layers}
    same = np.asarray(arrow_logits(model, with_prototypes(lib, peft_protos), ids, mask))
    assert np.abs(same[valid] - ref[valid]).max() < 1e-4
    ours = np.asarray(arrow_logits(model, lib, ids, mask))
    assert np.abs(ours[valid] - ref[valid]).max() < 5e-4
    return ref[valid]


def test_routing_and_logits_equal_pefts_arrow(library, monkeypatch):
    path, tasks, _ = library
    peft_model = peft_arrow_model(path, tasks, monkeypatch=monkeypatch)
    model = jaxlora.load_pretrained(path)
    lib = arrow_library(model, jaxlora.load_peft(model, tasks), TOP_K, TEMPERATURE)
    ref = compare_with_peft(model, lib, peft_model, monkeypatch)
    # The comparison can fail: the prototypes of experts 0 and 1 exchanged route tokens to the
    # wrong experts; no library at all is the base model.
    ids, mask = padded_batch("right")
    valid = mask.astype(bool)
    swapped = {
        p[:-1]: np.asarray(v.get_value()[0])[[1, 0, 2, 3]]
        for p, v in nnx.to_flat_state(lib.consts)
        if p[-1] == "lora_proto"
    }
    other = np.asarray(arrow_logits(model, with_prototypes(lib, swapped), ids, mask))
    assert np.abs(other[valid] - ref).max() > 1e-3
    base = np.asarray(model(ids, mask))
    assert np.abs(base[valid] - ref).max() > 1e-2


def test_gks_routing_and_logits_equal_pefts(library, monkeypatch):
    """GenKnowSub: the general adapters' mean A and B subtracted from every expert first."""
    path, tasks, general = library
    peft_model = peft_arrow_model(path, tasks, general, monkeypatch=monkeypatch)
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, tasks)
    gks = jaxlora.load_peft(model, general)
    lib = arrow_library(model, stack, TOP_K, TEMPERATURE, general=gks)
    ref = compare_with_peft(model, lib, peft_model, monkeypatch)
    ids, mask = padded_batch("right")
    plain = np.asarray(arrow_logits(model, arrow_library(model, stack, TOP_K), ids, mask))
    assert np.abs(plain[mask.astype(bool)] - ref).max() > 1e-3  # the subtraction matters


def test_decoding_continues_the_arrow_forward(library):
    """Greedy decoding with the KV cache picks, at every step, the argmax of the full
    (uncached) Arrow forward over the prompt and what was generated so far."""
    path, tasks, _ = library
    model = jaxlora.load_pretrained(path)
    lib = arrow_library(model, jaxlora.load_peft(model, tasks), TOP_K, TEMPERATURE)
    ids = np.random.default_rng(0).integers(10, 500, (2, 5))
    out = generate_arrow(model, lib, ids, max_new_tokens=4, eos_token_ids=[])
    # One causal forward over prompt + output: position 4 + t predicts output token t.
    logits = np.asarray(arrow_logits(model, lib, np.concatenate([ids, out[:, :3]], axis=1)))
    np.testing.assert_array_equal(out, logits[:, 4:].argmax(-1))


def test_a_library_of_one_is_its_adapter(library):
    """E = 1, top_k = 1: every coefficient is exactly 1 (a softmax over one score), so the Arrow
    forward is the plain adapter's: the same float32 products on XLA (measured equal; 1e-5
    allows another fusion's summation order on logits ~1-10), while the base is > 1e-2 off.
    """
    path, tasks, _ = library
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, tasks[:1])
    ids, mask = padded_batch("right")
    valid = mask.astype(bool)
    plain = np.asarray(model(ids[None], attention_mask=mask[None], adapters=stack))[0]
    ours = np.asarray(arrow_logits(model, arrow_library(model, stack, 1), ids, mask))
    assert np.abs(ours[valid] - plain[valid]).max() < 1e-5
    assert np.abs(np.asarray(model(ids, mask))[valid] - plain[valid]).max() > 1e-2


def test_bad_libraries_are_refused(library):
    path, tasks, _ = library
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, tasks[:2])
    with pytest.raises(LoRAError, match=r"top_k must be in 1\.\.2"):
        arrow_library(model, stack, 3)
    with pytest.raises(LoRAError, match="temperature must be > 0"):
        arrow_library(model, stack, 1, 0.0)
    with pytest.raises(LoRAError, match="empty"):
        arrow_library(model, jaxlora.AdapterStack(stack.weights, stack.consts, (), ()), 1)
    dora = jaxlora.init_adapters(model, [jaxlora.LoRAConfig(4, use_dora=True)], [0])
    with pytest.raises(LoRAError, match="plain LoRA adapters"):
        arrow_library(model, dora, 1)


def test_memory_arrow_method_decodes_with_the_arrow_library(memory_run):
    """`arrow@2` in the memory grammar: every question answered by the whole library routed
    per token (its batched, padded passes equal `generate_arrow` on all prompts at once), not
    the base model's answers; and the grammar's one-line refusals."""
    import jax

    from jaxlora.config import MemorySection, load_config
    from jaxlora.generate import eos_and_pad, until_eos
    from jaxlora.job import Job
    from jaxlora.memory.compose import MethodError, parse_method
    from jaxlora.memory.evaluate import MemoryEvaluator
    from jaxlora.memory.library import load_libraries

    method = parse_method("arrow@2")
    assert (method.router, method.k, method.combiner, method.routes_questions) == (
        "arrow",
        2,
        "arrow",
        False,
    )
    assert parse_method("arrow@2+rag").context_router("bm25") == "bm25"
    with pytest.raises(MethodError, match="takes no combiner"):
        parse_method("arrow@2/ties")

    job = Job(load_config(memory_run / "config.yaml"), jax.devices()[:1])
    (library,) = load_libraries(job, memory_run)
    section = MemorySection(max_new_tokens=6, batch_size=4, arrow_temperature=0.5)
    ev = MemoryEvaluator(job, section, library, memory_run)
    rows, _ = ev.run([method, parse_method("base")], progress=False)
    assert (rows[0]["router"], rows[0]["k"], rows[0]["combiner"]) == ("arrow", 2, "arrow")

    class Bar:
        def update(self, n):
            pass

    prompts = ev.prompts([None] * len(ev.questions))
    ours = ev.decode(method, prompts, Bar())
    base = ev.decode(parse_method("base"), prompts, Bar())
    model = job.model
    lib = arrow_library(model, library.stack, 2, 0.5)
    T = max(map(len, prompts))
    ids = np.zeros((len(prompts), T), np.int32)
    mask = np.zeros((len(prompts), T), bool)
    for i, p in enumerate(prompts):
        ids[i, T - len(p) :], mask[i, T - len(p) :] = p, True
    eos, _ = eos_and_pad(model.tokenizer, model.config)
    whole = generate_arrow(model, lib, ids, mask, max_new_tokens=6)
    assert ours == [until_eos(row, eos) for row in whole]
    assert ours != base  # the library changes the answers

    # QuALITY's option scoring: every row runs the one library; log-probabilities of each
    # row's last L tokens equal the Arrow forward's (float32 on both sides, the same XLA
    # program pieces: 1e-5 covers a different fusion's rounding of log-probs ~ -1 to -10).
    from jaxlora.memory.loglik import continuation_logprobs

    graph, w, c, rows_ids = ev._option_adapters(method, None, [0, 1], 2)
    assert rows_ids is None
    lp = np.asarray(continuation_logprobs(graph, model.params, w, c, None, ids, mask, 3))
    logp = jax.nn.log_softmax(arrow_logits(model, lib, ids, mask), axis=-1)
    want = np.take_along_axis(np.asarray(logp)[:, -4:-1], ids[:, -3:, None], axis=-1)[..., 0]
    assert np.abs(lp - want).max() < 1e-5
