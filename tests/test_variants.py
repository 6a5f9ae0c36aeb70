"""LoRA variants (LoRA+, PiSSA, OLoRA, DoRA) against PEFT, the library whose semantics they
take: the same base, data and steps trained by jaxlora and by PEFT + torch give the same losses
and the same adapters to rounding."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file

import jaxlora
from jaxlora.cells import JobData, plan_cells
from jaxlora.config import load_config
from jaxlora.sweep import SweepJob
from tests.runs import assert_equal_to_rounding, rounding_bound, write_config

STEPS = 10
LR, WD = 3.0e-3, 0.01


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("base") / "tiny"
    jaxlora.load_pretrained("tiny-llama").save_hf(path)
    return path


def train_both(
    tmp_path: Path,
    base_dir: Path,
    lora: dict,
    peft_model: Callable,
    optimizer: Callable | None = None,
):
    """`STEPS` steps of one adapter (`lora.*` settings) in jaxlora, and of `peft_model(hf,
    initial_dir)` under `optimizer(peft_model)` (default torch AdamW) with the same batches.
    Returns (our losses, PEFT's losses, our exported adapter dir, the PEFT model, bound)."""
    from transformers import AutoModelForCausalLM

    cfg = write_config(
        tmp_path / "variant.yaml",
        **{
            "model.path": str(base_dir),
            "lora.dropout": 0.0,
            "lora.rank": 4,
            **{f"lora.{k}": v for k, v in lora.items()},
            "training.steps": STEPS,
            "training.lr": LR,
            "training.weight_decay": WD,
            "training.clip_norm": 1.0,
            "training.schedule": "constant",
            "training.warmup_ratio": 0.0,
            "data.size_tokens": 300,
        },
    )
    config = load_config(cfg)
    out = tmp_path / "run"
    job = SweepJob(config, out, progress=False, devices=jax.devices()[:1])
    (plan,) = job.plans
    initial = jaxlora.init_adapters(job.model, [plan.lora], [plan.init_seed])
    jaxlora.save_peft(job.model, initial, 0, tmp_path / "initial")
    job.run()
    ours = [
        json.loads(x)["loss"][plan.name] for x in (out / "metrics.jsonl").read_text().splitlines()
    ]

    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    model = peft_model(hf, tmp_path / "initial")
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = (
        optimizer(model)
        if optimizer
        else torch.optim.AdamW(params, lr=LR, weight_decay=WD, betas=(0.9, 0.999), eps=1e-8)
    )
    data = JobData(plan_cells(config, job.model.config), job.model.tokenizer, 4)
    data.prepare([0])
    ref = []
    for step in range(STEPS):
        tokens, valid, loss = data.batch(data.plans[0], step)
        out_t = model(
            input_ids=torch.tensor(tokens, dtype=torch.long),
            attention_mask=torch.tensor(valid, dtype=torch.long),
            labels=torch.tensor(np.where(loss, tokens, -100), dtype=torch.long),
        )
        out_t.loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad()
        ref.append(out_t.loss.item())
    return ours, ref, out / "adapters" / plan.name, model, rounding_bound(config)


def loraplus(ratio: float) -> Callable:
    """PEFT's LoRA+ optimizer (torch AdamW, B's group at lr x `ratio`) for `train_both`."""

    def make(model):
        from peft.optimizers import create_loraplus_optimizer

        return create_loraplus_optimizer(
            model,
            torch.optim.AdamW,
            lr=LR,
            loraplus_lr_ratio=ratio,
            loraplus_weight_decay=WD,
            betas=(0.9, 0.999),
            eps=1e-8,
        )

    return make


def from_initial(hf, initial: Path):
    from peft import PeftModel

    return PeftModel.from_pretrained(hf, initial, is_trainable=True)


def test_lora_plus_matches_pefts_loraplus_optimizer(tmp_path, base_dir):
    """`lora.lr_ratio` against PEFT's `create_loraplus_optimizer` (B at lr x ratio)."""
    ratio = 16.0
    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"lr_ratio": ratio}, from_initial, loraplus(ratio)
    )
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(tmp_path / "peft_final")
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)


@pytest.mark.parametrize(("init", "dora"), [("pissa", False), ("olora", False), ("pissa", True)])
def test_pissa_and_olora_train_and_export_as_peft_does(tmp_path, base_dir, init, dora):
    """PEFT's `init_lora_weights="pissa"/"olora"` (it rewrites the base to the residual) against
    jaxlora's (each adapter carries its frozen correction, the base is shared): the initial
    B @ A per module, the losses of training, and the export, which PEFT loads on the original
    base and which equals PEFT's own conversion (`path_initial_model_for_weight_conversion`).
    With DoRA too: PEFT's conversion keeps A and B and drops the magnitudes, jaxlora's keeps
    them, and only it gives the trained model's logits on the original base."""
    from peft import LoraConfig, PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM

    def residual_model(hf, _initial):
        config = LoraConfig(
            r=4,
            lora_alpha=4,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights=init,
            use_dora=dora,
        )
        model = get_peft_model(hf, config)
        model.peft_config["default"].init_lora_weights = True  # as PEFT's docs save the start
        model.save_pretrained(tmp_path / "peft_initial")
        model.peft_config["default"].init_lora_weights = init
        return model

    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"init": init, "use_dora": dora}, residual_model
    )
    # The starts: B A of every module, PEFT's (float32 SVD/QR) against ours (float64, then
    # float32). Both are exact factorisations; the tiny model's weights are N(0, 0.02), so
    # entries of B A are below 0.1 and float32 rounding moves them by ~1e-8. The wrong
    # factorisation (olora for pissa) misses by 0.05.
    start_ours = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    start_peft = load_file(tmp_path / "peft_initial" / "adapter_model.safetensors")
    for name, a in start_peft.items():
        if name.endswith("lora_A.weight"):
            b = start_peft[name.replace("lora_A", "lora_B")]
            a2 = start_ours[name][:4]  # the trained half of the converted start (= the start)
            b2 = start_ours[name.replace("lora_A", "lora_B")][:, :4]
            np.testing.assert_allclose(b2 @ a2, b @ a, atol=1e-5, err_msg=name)
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(
        tmp_path / "peft_final", path_initial_model_for_weight_conversion=tmp_path / "peft_initial"
    )
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    factors = {k: v.shape for k, v in mine.items() if "magnitude" not in k}
    assert factors == {k: v.shape for k, v in theirs.items()}
    assert len(mine) - len(factors) == (len(factors) // 2 if dora else 0)
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)
    assert json.loads((adapter_dir / "adapter_config.json").read_text())["r"] == 8

    # PEFT loads jaxlora's export on the unmodified base and computes what PEFT's trained
    # residual model computes.
    hf = AutoModelForCausalLM.from_pretrained(
        base_dir, dtype=torch.float32, attn_implementation="eager"
    )
    loaded = PeftModel.from_pretrained(hf, adapter_dir).eval()
    model.eval()
    ids = torch.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        got, want = loaded(input_ids=ids).logits, model(input_ids=ids).logits
    # The trained adapters differ by `bound` of their delta; logits of unit scale move by less.
    np.testing.assert_allclose(got.numpy(), want.numpy(), atol=bound)


# PiSSA from a randomised SVD (`pissa_niter_N`, PEFT's `torch.svd_lowrank(W, q=r, niter=N)`).
# Randomised subspace iteration turns its r test vectors towards the top-r singular subspace by
# at least (s_{r+1} / s_r)^2 per power iteration (Halko et al. 2011, section 4.5): on the tiny
# model's N(0, 0.02) weights the singular values have no gap and nothing converges, so these
# tests give every projection a spectrum with gaps after the 2nd and the 4th value.
def decaying_spectrum(n: int) -> np.ndarray:
    """0.3 x [1, 0.9, 0.1, 0.09, 0.005 x 0.9^k...]: gaps 0.11 after s_2, 0.056 after s_4."""
    tail = 0.005 * 0.9 ** np.arange(n - 4)
    return 0.3 * np.concatenate([[1.0, 0.9, 0.1, 0.09], tail])


def with_spectrum(shape: tuple[int, int], spectrum: np.ndarray, rng) -> np.ndarray:
    """A random [out, in] matrix with the given singular values (random singular vectors)."""
    n = min(shape)
    u, _ = np.linalg.qr(rng.standard_normal((shape[0], n)))
    v, _ = np.linalg.qr(rng.standard_normal((shape[1], n)))
    return (u * spectrum[:n]) @ v.T


@pytest.fixture(scope="module")
def decaying_dir(base_dir, tmp_path_factory) -> Path:
    """The tiny checkpoint with every projection's spectrum replaced by `decaying_spectrum`."""
    import shutil

    from transformers import AutoModelForCausalLM

    path = tmp_path_factory.mktemp("decaying") / "tiny"
    shutil.copytree(base_dir, path)
    hf = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    rng = np.random.default_rng(0)
    with torch.no_grad():
        for name, module in hf.named_modules():
            if name.endswith("_proj"):
                shape = tuple(module.weight.shape)
                w = with_spectrum(shape, decaying_spectrum(min(shape)), rng)
                module.weight.copy_(torch.from_numpy(w))
    hf.save_pretrained(path)
    return path


def tan_angle(exact: np.ndarray, approx: np.ndarray) -> float:
    """tan of the largest principal angle between two r-dimensional subspaces (orthonormal
    columns): sin from the part of `approx` outside `exact`, cos from their overlap."""
    sin = np.linalg.norm(approx - exact @ (exact.T @ approx), 2)
    cos = np.linalg.svd(exact.T @ approx, compute_uv=False).min()
    return sin / cos


def residual_starts(model, configs) -> list[dict[tuple, np.ndarray]]:
    """Each adapter's s B0 A0 [out, in] per projection, at its own rank, from one stack."""
    stack = jaxlora.init_adapters(model, configs, list(range(len(configs))))
    consts = dict(nnx.to_flat_state(stack.consts))
    starts = [{} for _ in configs]
    for path, var in consts.items():
        if path[-1] == "lora_a0":
            for i, c in enumerate(configs):
                a0 = np.asarray(var.get_value()[i], np.float64)[:, : c.rank]
                b0 = np.asarray(consts[(*path[:-1], "lora_b0")].get_value()[i], np.float64)
                starts[i][path[:-1]] = c.scale * (a0 @ b0[: c.rank]).T
    return starts


def test_pissa_niter_converges_to_the_exact_pissa_start(decaying_dir):
    """`lora.init: pissa_niter_N`: (1) the randomised SVD's singular subspaces approach the
    exact top-r ones by the guaranteed factor (s_{r+1} / s_r)^2 per power iteration, for a tall
    and a wide matrix (the same test matrix for every N); (2) every projection's s B0 A0 equals
    exact PiSSA's, at each adapter's own rank, in one stack of ranks 2 and 4."""
    from jaxlora.svd import randomized_svd

    rng = np.random.default_rng(1)
    spectrum = 0.5 ** np.arange(24)  # gap 0.5 after every value: each iteration counts
    r, g = 4, 0.5
    for shape in [(40, 24), (24, 40)]:
        w = with_spectrum(shape, spectrum, rng)
        u, _, vh = np.linalg.svd(w)
        tans = {}
        for niter in (1, 8):
            ur, sr, vhr = randomized_svd(w, r, niter)
            assert ur.shape == (shape[0], r) and sr.shape == (r,) and vhr.shape == (r, shape[1])
            tans[niter] = max(tan_angle(u[:, :r], ur), tan_angle(vh[:r].T, vhr.T))
        # tan(theta) after 8 iterations <= g^(2 x 7) of it after 1, in exact arithmetic; float64
        # rounding adds ~1e-15 to angles whose guaranteed bound here is ~1e-5 (an
        # implementation that ignored N would sit at the bound / g^14, 16000 times over).
        assert tans[8] <= g**14 * tans[1] * (1 + 1e-9) + 1e-13, (shape, tans)

    model = jaxlora.load_pretrained(str(decaying_dir))
    configs = [
        jaxlora.LoRAConfig(rank=rank, alpha=8.0, init=init)
        for init in ("pissa", "pissa_niter_4")
        for rank in (2, 4)
    ]
    exact2, exact4, fast2, fast4 = residual_starts(model, configs)
    # s B A - s B0 A0 = (P - P_r) W: every entry is below its norm, sin(theta) s_1 with
    # tan(theta) <= g^9 ||Omega_2 Omega_1^-1|| (g = 0.11 at r = 2, 0.056 at r = 4; s_1 = 0.3):
    # under 2e-6 unless the Gaussian factor exceeds ~2500; float32's rounding of A and B adds
    # ~1e-9 to entries of ~5e-3. Power iterations are what gets there: with N = 0 entries
    # miss by up to 1e-2, with N = 1 by 2e-4; a rank-4 start sliced from the rank-2
    # factorisation misses the 3rd and 4th directions by 4e-3.
    worst = 0.0
    for exact, fast in [(exact2, fast2), (exact4, fast4)]:
        assert exact.keys() == fast.keys() and len(exact) == 14
        for path, want in exact.items():
            np.testing.assert_allclose(fast[path], want, atol=2e-6, err_msg=str(path))
            worst = max(worst, np.abs(fast[path] - want).max())
    print(f"pissa_niter_4 vs pissa: max |s B A| difference {worst:.2e}; tan {tans}")


def test_pissa_niter_starts_as_pefts_and_keeps_the_base_logits(decaying_dir, tmp_path):
    """PEFT's `init_lora_weights="pissa_niter_4"` (torch's randomised SVD, its own random test
    matrix) against jaxlora's `pissa_niter_4` on the same checkpoint: the same s B A per module,
    since both converge to the same top-r part; the residual model (PEFT: W - s B A + s B A;
    jaxlora: W - s B0 A0 + s B A) gives the base logits at init; the export is rank 2r."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    def hf():
        return AutoModelForCausalLM.from_pretrained(
            decaying_dir, dtype=torch.float32, attn_implementation="eager"
        ).eval()

    torch.manual_seed(0)
    peft = get_peft_model(
        hf(),
        LoraConfig(
            r=4,
            lora_alpha=8,
            lora_dropout=0.0,
            target_modules="all-linear",
            init_lora_weights="pissa_niter_4",
        ),
    ).eval()
    ids = np.arange(3, 40).reshape(1, -1)
    with torch.no_grad():
        base_t = hf()(input_ids=torch.tensor(ids)).logits.numpy()
        residual_t = peft(input_ids=torch.tensor(ids)).logits.numpy()

    model = jaxlora.load_pretrained(str(decaying_dir))
    config = jaxlora.LoRAConfig(rank=4, alpha=8.0, init="pissa_niter_4")
    (ours,) = residual_starts(model, [config])
    state = {k: v.numpy().astype(np.float64) for k, v in peft.state_dict().items()}
    worst = 0.0
    for name, a in state.items():
        if "lora_A" in name:
            b = state[name.replace("lora_A", "lora_B")]
            parts = name.split(".")
            i = parts.index("layers")
            path = ("layers", int(parts[i + 1]), parts[i + 2], parts[i + 3])
            # Each is within 2e-6 of the exact s B A (the bound in the test above, whatever the
            # test matrix); torch's float32 QR and SVD add ~eps32 s_1 / (s_4 - s_5) = 7e-7:
            # 1e-5 admits both, while a start without power iterations (N = 0) or from
            # another rank's subspace misses by 1e-3 to 1e-2.
            np.testing.assert_allclose(ours[path], config.scale * b @ a, atol=1e-5, err_msg=name)
            worst = max(worst, np.abs(ours[path] - config.scale * b @ a).max())
    assert len(ours) == 14

    stack = jaxlora.init_adapters(model, [config], [0])
    base = np.asarray(model(ids))
    residual = np.asarray(model(ids[None], adapters=stack))[0]
    # Logits of size ~1: float32 rounding of W - s B A (PEFT) or of the two opposite LoRA
    # terms (jaxlora) moves them by ~1e-6; a start that forgot the correction adds the whole
    # principal part of every weight (most of it) and moves them by ~1.
    np.testing.assert_allclose(residual_t, base_t, atol=1e-4)
    np.testing.assert_allclose(residual, base, atol=1e-4)
    print(
        f"PEFT vs jaxlora pissa_niter_4: max |s B A| difference {worst:.2e}; logits: "
        f"PEFT {np.abs(residual_t - base_t).max():.1e}, jaxlora {np.abs(residual - base).max():.1e}"
    )
    jaxlora.save_peft(model, stack, 0, tmp_path / "export")
    exported = json.loads((tmp_path / "export" / "adapter_config.json").read_text())
    assert exported["r"] == 8 and exported["init_lora_weights"] is True


def test_pissa_niter_config_loads_and_bad_counts_are_refused():
    """`lora.init: pissa_niter_N` loads as a residual init; N = 0, a non-number or a missing
    `_` are refused with one line, by the config and by `LoRAConfig`."""
    from jaxlora.errors import ConfigError, LoRAError
    from jaxlora.models.model import model_config

    config = load_config("configs/quickstart.yaml", ["lora.init=pissa_niter_4"])
    assert config.lora.init == "pissa_niter_4"
    lora = jaxlora.LoRAConfig(rank=2, init=config.lora.init)
    assert lora.residual and lora.validate(model_config(config.model.path)) is lora
    for bad in ("pissa_niter_0", "pissa_niter_x", "pissa_niterx", "pissa_niter_-1"):
        with pytest.raises(ConfigError, match=r"lora\.init: expected one of .*pissa_niter_N") as e:
            load_config("configs/quickstart.yaml", [f"lora.init={bad}"])
        assert "\n" not in str(e.value)
        with pytest.raises(LoRAError, match=r"pissa_niter_N") as e:
            jaxlora.LoRAConfig(rank=2, init=bad).validate(model_config(config.model.path))
        assert "\n" not in str(e.value)
        assert not jaxlora.LoRAConfig(rank=2, init=bad).residual


def dora_adapter(path: Path, out_dir: Path, seed: int = 0, **kw):
    """A PEFT DoRA adapter with random non-zero A, B and magnitudes away from ||W + s B A||
    (PEFT starts them there, where DoRA equals LoRA), saved to out_dir."""
    from peft import LoraConfig, get_peft_model

    from tests.hf_factory import load_hf_model

    torch.manual_seed(seed)
    config = LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, use_dora=True, **kw)
    model = get_peft_model(load_hf_model(path), config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_magnitude_vector" in name:
                p.mul_(torch.empty_like(p).uniform_(0.5, 1.5))
    model.eval()
    model.save_pretrained(out_dir)
    return model


@pytest.mark.parametrize(
    ("family", "kw"),
    [
        ("llama", dict(target_modules="all-linear")),
        # Qwen2's q/k/v carry a bias, which DoRA's column scaling must leave out.
        ("qwen2", dict(target_modules=["q_proj", "v_proj", "down_proj"], layers_to_transform=[1])),
    ],
)
def test_a_peft_dora_adapter_gives_pefts_logits(hf_checkpoint, tmp_path, family, kw):
    from tests.test_lora import peft_logits
    from tests.test_model_parity import padded_batch

    path = hf_checkpoint(family)
    peft_model = dora_adapter(path, tmp_path / "dora", **kw)
    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, [tmp_path / "dora"])
    ids, mask = padded_batch("right")
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=stack))[0]
    ref = peft_logits(peft_model, ids, mask)
    valid = mask.astype(bool)
    # float32 forward, torch's reduction order vs XLA's: logits of size ~1-10 through 2 layers
    # of <= 128-term sums agree to ~1e-6; DoRA read as plain LoRA misses by > 1e-2 (below).
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    # The same factors with DoRA switched off (`lora_dora` 0): plain LoRA, far from PEFT's.
    consts = nnx.map_state(
        lambda p, v: v.replace(v.get_value() * 0) if p[-1] == "lora_dora" else v, stack.consts
    )
    as_lora = dataclasses.replace(stack, consts=consts)
    lora_only = np.asarray(model(ids[None], attention_mask=mask[None], adapters=as_lora))[0]
    assert np.abs(lora_only[valid] - ref[valid]).max() > 1e-2

    # Written back, PEFT's tensors and config come out unchanged.
    jaxlora.save_peft(model, stack, 0, tmp_path / "again")
    before = load_file(tmp_path / "dora" / "adapter_model.safetensors")
    after = load_file(tmp_path / "again" / "adapter_model.safetensors")
    assert before.keys() == after.keys()
    for key in before:
        np.testing.assert_array_equal(after[key], before[key], err_msg=key)
    assert json.loads((tmp_path / "again" / "adapter_config.json").read_text())["use_dora"]


@pytest.mark.parametrize("ratio", [1.0, 4.0])
def test_dora_trains_as_peft_does(tmp_path, base_dir, ratio):
    """`lora.use_dora` from jaxlora's start (magnitudes ||W||, exported and loaded by PEFT):
    the losses, B A and the magnitudes after training equal PEFT's; with LoRA+ the magnitudes
    (1-D) train at B's rate, as PEFT's create_loraplus_optimizer groups them."""
    ours, ref, adapter_dir, model, bound = train_both(
        tmp_path, base_dir, {"use_dora": True, "lr_ratio": ratio}, from_initial, loraplus(ratio)
    )
    # torch and XLA order their float32 reductions differently: equal to rounding (runs.py).
    np.testing.assert_allclose(ours, ref, rtol=bound)
    model.save_pretrained(tmp_path / "peft_final")
    theirs = load_file(tmp_path / "peft_final" / "adapter_model.safetensors")
    mine = load_file(adapter_dir / "adapter_model.safetensors")
    assert mine.keys() == theirs.keys()
    assert_equal_to_rounding({"a": mine}, {"a": theirs}, bound)
    start = load_file(tmp_path / "initial" / "adapter_model.safetensors")
    for key in (k for k in mine if k.endswith("lora_magnitude_vector")):
        moved = np.linalg.norm(theirs[key] - start[key])
        assert moved > 0  # the magnitudes trained
        # Their training moves by `moved`; the reduction order changes that by `bound` of it.
        assert np.linalg.norm(mine[key] - theirs[key]) <= bound * moved, key


def test_variants_sweep_as_one_job_equal_to_each_alone(tmp_path):
    """`sweep: {lora.use_dora: [false, true], lora.init: [default, pissa]}` (dropout 0.1, LoRA+
    ratio 4) trains as one job, and each adapter equals its cell trained alone to rounding: in a
    stack, plain adapters hold zero corrections and switched-off magnitudes."""
    from tests.runs import adapters, run

    sweep = {"lora.use_dora": [False, True], "lora.init": ["default", "pissa"]}
    sets = {"lora.lr_ratio": 4.0, "training.lr": 3.0e-3}
    config = load_config(write_config(tmp_path / "grid.yaml", sweep=sweep, **sets))
    assert len(config.cells()) == 4
    run(config, tmp_path / "grid")
    grid = adapters(tmp_path / "grid")
    base_file = write_config(tmp_path / "one.yaml", **sets)
    for cell in config.cells():
        alone = load_config(base_file, [f"{k}={v}" for k, v in cell.values])
        run(alone, tmp_path / cell.name)
        (single,) = adapters(tmp_path / cell.name).values()
        # XLA compiles a stack of 4 and a stack of 1 to different kernels (runs.py).
        bound = rounding_bound(alone)
        assert single.keys() == grid[cell.name].keys()
        assert_equal_to_rounding({cell.name: single}, {cell.name: grid[cell.name]}, bound)
        for key in (k for k in single if "magnitude" in k):
            gap = np.linalg.norm(single[key] - grid[cell.name][key])
            assert gap <= bound * np.linalg.norm(single[key]), key


@pytest.mark.parametrize("combination_type", ["linear", "cat"])
def test_merged_dora_adapters_match_peft_add_weighted_adapter(
    hf_checkpoint, tmp_path, combination_type
):
    """Two DoRA adapters merged by `jaxlora.memory.merge` and by PEFT's add_weighted_adapter
    (A and B merged, the first source's use_dora, fresh magnitudes ||W||) give the same
    logits; a PiSSA source with its residual correction is refused with one line."""
    from peft import PeftModel

    from jaxlora.memory.merging import MergeError, merge
    from tests.hf_factory import load_hf_model
    from tests.test_lora import peft_logits
    from tests.test_model_parity import padded_batch

    path = hf_checkpoint("llama")
    for seed in (0, 1):
        dora_adapter(path, tmp_path / f"d{seed}", seed=seed, target_modules="all-linear")
        # As trained adapters are saved: PEFT creates the merged adapter with its first
        # source's init, and only from B = 0 (the default init) are its magnitudes ||W||; from
        # init_lora_weights=False they would come from torch's global RNG.
        config = tmp_path / f"d{seed}" / "adapter_config.json"
        config.write_text(json.dumps({**json.loads(config.read_text()), "init_lora_weights": True}))
    peft_model = PeftModel.from_pretrained(load_hf_model(path), tmp_path / "d0")
    peft_model.load_adapter(tmp_path / "d1", adapter_name="d1")
    peft_model.add_weighted_adapter(["default", "d1"], [0.7, 0.5], "m", combination_type)
    peft_model.set_adapter("m")
    ids, mask = padded_batch("right")
    ref = peft_logits(peft_model, ids, mask)

    model = jaxlora.load_pretrained(path)
    stack = jaxlora.load_peft(model, [tmp_path / "d0", tmp_path / "d1"])
    merged = merge(model, stack, [[0, 1]], [[0.7, 0.5]], combination_type)
    assert merged.configs[0].use_dora
    ours = np.asarray(model(ids[None], attention_mask=mask[None], adapters=merged))[0]
    base = np.asarray(model(ids, mask))
    valid = mask.astype(bool)
    # float32 forwards in torch and XLA (different sum orders): logits of size ~5 agree to
    # ~2e-5; a merge that kept the sources' magnitudes or dropped DoRA moves them by > 1e-2.
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-4
    assert np.abs(ref[valid] - base[valid]).max() > 1e-2

    pissa = jaxlora.init_adapters(model, [jaxlora.LoRAConfig(rank=2, init="pissa")], [0])
    with pytest.raises(MergeError, match="merge its PEFT export instead") as e:
        merge(model, pissa, [[0]], [[1.0]], "linear")
    assert "\n" not in str(e.value)


def test_variant_settings_at_their_defaults_keep_the_seeds_of_before():
    """An adapter's seeds hash its `lora:` section. The variant keys came later: at their
    defaults they stay out of the hash, so a config that does not use them trains exactly the
    adapters it trained before they existed (the hash of the seven original fields)."""
    from jaxlora.cells import stable_seed
    from jaxlora.models.model import model_config

    config = load_config("configs/quickstart.yaml")
    plans = plan_cells(config, model_config(config.model.path))
    original = ("rank", "alpha", "targets", "layers", "dropout", "use_rslora", "init")
    for plan in plans:
        lora = plan.cell.config.lora
        before = {k: getattr(lora, k) for k in original}
        seed = plan.cell.config.training.seed
        assert plan.init_seed == stable_seed(seed, "init", before)
    dora = load_config("configs/quickstart.yaml", ["lora.use_dora=true"])
    assert plan_cells(dora, model_config(dora.model.path))[0].init_seed != plans[0].init_seed


def test_plan_counts_doras_magnitudes_and_the_residual_corrections():
    """`jaxlora plan`'s adapter rows: DoRA adds a float32 magnitude per output of every adapted
    module (weights; moments and gradients follow them), PiSSA/OLoRA a frozen A0, B0 as large
    as the adapter's A, B."""
    from jaxlora.lora import module_dims
    from jaxlora.models.model import model_config
    from jaxlora.plan import make_plan

    def rows(**sets):
        config = load_config("configs/quickstart.yaml", [f"{k}={v}" for k, v in sets.items()])
        return dict(make_plan(config, 1, 80, 989, 0.4).rows), config

    plain, config = rows()
    dora, _ = rows(**{"lora.use_dora": "true"})
    pissa, _ = rows(**{"lora.init": "pissa"})
    fast, _ = rows(**{"lora.init": "pissa_niter_2"})
    c = model_config(config.model.path)
    outs = sum(module_dims(c, m)[1] for m in ("q_proj", "k_proj", "v_proj", "o_proj"))
    outs += sum(module_dims(c, m)[1] for m in ("gate_proj", "up_proj", "down_proj"))
    magnitudes = 4 * len(config.cells()) * c.num_layers * outs
    key = "adapter weights (float32)"
    assert dora[key] - plain[key] == magnitudes
    assert "residual corrections (float32)" not in plain
    assert pissa["residual corrections (float32)"] == plain[key]
    assert fast["residual corrections (float32)"] == plain[key]
