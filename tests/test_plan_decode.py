"""`jaxlora plan` for evaluation's decoding (`plan_decode.decode_rows`): each device's prompts, its
KV cache and its share of the weights, by hand arithmetic; `plan --aot` checks the total
against the TPU compiler (docs/aot.md)."""

from __future__ import annotations

from jaxlora.config import load_config
from jaxlora.plan import GIB, make_plan

CONFIG = "configs/phonebook_memory_llama3_8b.yaml"


def _plan(adapter: int, fsdp: int, batch: int):
    config = load_config(
        CONFIG,
        [
            "model.path=llama-3.1-8b-shape",
            f"mesh.adapter={adapter}",
            f"mesh.fsdp={fsdp}",
            f"eval.batch_size={batch}",
        ],
    )
    return make_plan(config, 8, 16, 197, 0.4)


def test_each_device_decodes_its_adapters_prompts_split_over_fsdp():
    plan = _plan(2, 4, 16)
    (rows,) = plan.decoding  # 16 rank-64 adapters: one group
    got = dict(rows)
    # 8 adapters per device x 16 prompts / fsdp 4 = 32 rows; Llama-3.1-8B: 32 layers, 8 kv
    # heads of 128, k and v, 128 + 50 positions, bf16
    assert got["KV cache (32 rows x 178)"] == 2 * 32 * 8 * 128 * 178 * 32 * 2
    # the weights as the step holds them: base over fsdp, adapters over adapter and fsdp
    assert got["base weights"] == dict(plan.rows)["base weights"]
    assert got["adapter weights (float32)"] == dict(plan.rows)["adapter weights (float32)"]
    # the vocabulary table gathered whole, twice: 128256 x 4096 bf16 = 0.98 GiB each
    assert got["vocab table gathered (2 copies)"] == 2 * 128256 * 4096 * 2
    assert "evaluation decoding" in plan.render()


def test_more_fsdp_or_fewer_prompts_shrink_the_per_device_cache():
    def cache(plan):
        return next(b for k, b in plan.decoding[0] if k.startswith("KV cache"))

    base = cache(_plan(2, 4, 64))
    assert cache(_plan(1, 8, 64)) == base  # 16 adapters x 8 rows = 8 adapters x 16 rows
    assert cache(_plan(2, 4, 16)) == base / 4
    # 8B on 2/4/1 with 64 prompts per adapter: a 2.78 GiB cache (the compiler's buffers)
    assert round(base / GIB, 2) == 2.78


def test_a_long_prompt_counts_the_blocked_attention_not_full_logits():
    """Past LONG_CONTEXT keys the prefill attends in KEY_BLOCK-key blocks (models/attention.py):
    a block's [N, T, 512] probabilities in the model dtype and an [N, T, H] float32 accumulator
    per row, not the [N, T, S] float32 pair (which at 25,600 tokens would be 168 GB a row).
    Below it, the full pair."""
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import decode_rows

    c = model_config("llama-3.1-8b-shape")
    sizes = {"adapter": 1, "fsdp": 1, "tensor": 1}
    N, H = 32, 128
    long = dict(decode_rows(c, sizes, 2, 25600, 50, 2, 0, 0))
    assert long["prefill: attention"] == 2 * N * 25600 * (512 * 2 + H * 4)
    short = dict(decode_rows(c, sizes, 2, 128, 50, 2, 0, 0))
    assert short["prefill: attention"] == 2 * 2 * N * 128 * 178 * 4


def test_rows_that_do_not_split_over_fsdp_gather_no_weights():
    """On an fsdp mesh, rows split over it gather each weight whole where it is used (the
    vocabulary table, a few layers ahead); one row that cannot split leaves the weights split
    (the TPU compiler moves its activations instead), so nothing of the weights is gathered,
    and all else is the same."""
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import DECODE_LAYERS_AHEAD, decode_rows

    c = model_config("llama-3.1-8b-shape")
    sizes = {"adapter": 1, "fsdp": 8, "tensor": 1}
    split = dict(decode_rows(c, sizes, 1, 25600, 50, 2, 1.0, 0))
    whole = dict(decode_rows(c, sizes, 1, 25600, 50, 2, 1.0, 0, rows_split=False))
    gathered = {k for k in split if "gathered" in k}
    assert gathered == {
        "vocab table gathered (2 copies)",
        f"layers gathered ahead ({DECODE_LAYERS_AHEAD} of 32)",
    }
    assert whole == {k: v for k, v in split.items() if k not in gathered}


def test_split_rows_gather_layers_ahead_into_what_the_device_leaves():
    """The TPU compiler prefetches a decoding's weight gathers into whatever memory is left
    (the 8B's decoding held 14.9-16.8 GiB a 16 GiB v5e chip whatever its prompts): with the
    device's memory given, plan counts as many layers ahead as fit in what the rest leaves, at
    least DECODE_LAYERS_AHEAD and at most every layer."""
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import DECODE_LAYERS_AHEAD, decode_rows

    c = model_config("llama-3.1-8b-shape")
    sizes = {"adapter": 1, "fsdp": 8, "tensor": 1}

    def ahead(hbm: float) -> tuple[str, float, float]:
        rows = decode_rows(c, sizes, 2, 256, 50, 2, 2.0 * GIB, 0, hbm=hbm)
        (label, b), rest = rows[-1], sum(b for _, b in rows[:-1])
        assert label.startswith("layers gathered ahead")
        return label, b, rest

    label, fill, rest = ahead(16 * GIB)
    layer = fill / int(label.split("(")[1].split()[0])
    assert DECODE_LAYERS_AHEAD < fill / layer < 32
    assert 16 * GIB - layer < rest + fill <= 16 * GIB  # as many whole layers as fit
    assert ahead(1 * GIB)[0] == f"layers gathered ahead ({DECODE_LAYERS_AHEAD} of 32)"
    assert ahead(1000 * GIB)[0] == "layers gathered ahead (32 of 32)"
    assert ahead(0.0)[0] == f"layers gathered ahead ({DECODE_LAYERS_AHEAD} of 32)"  # unknown


def test_float32_adapters_decode_from_a_copy_in_the_model_dtype():
    """The compiler casts every layer's float32 factors to the model dtype once, before the
    token loop (the 8B's rank-192 decoding holds that copy: 1.87 GiB a chip), so a bf16 model
    counts half the adapters' bytes again; a float32 one decodes from them as they are."""
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import decode_rows

    c = model_config("llama-3.1-8b-shape")
    sizes = {"adapter": 1, "fsdp": 8, "tensor": 1}
    bf16 = dict(decode_rows(c, sizes, 2, 256, 50, 2, 1.0, 4e9, rows_split=False))
    assert bf16["adapters cast to the model dtype"] == 2e9
    f32 = dict(decode_rows(c, sizes, 2, 256, 50, 4, 1.0, 4e9, rows_split=False))
    assert "adapters cast to the model dtype" not in f32
    base = dict(decode_rows(c, sizes, 2, 256, 50, 2, 1.0, 0, rows_split=False))
    assert "adapters cast to the model dtype" not in base


def test_a_scoring_pass_holds_the_larger_of_a_layer_and_the_head_not_both():
    """A teacher-forced scoring pass (QuALITY's options) keeps no KV cache and has no token
    loop: its temporaries are a layer's working set or the scored positions' logits, whichever
    is larger, since the two are never live together (the 8B's option scoring on v5p)."""
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import score_rows

    c = model_config("llama-3.1-8b-shape")
    sizes = {"adapter": 4, "fsdp": 1, "tensor": 1}

    def stage(width: int, scored: int) -> tuple[str, float]:
        rows = score_rows(c, sizes, 32, width, scored, 2, 1.0, 0.0)
        assert [k for k, _ in rows[:2]] == ["base weights", "adapter weights (float32)"]
        assert not any(k.startswith(("KV cache", "adapters cast", "vocab")) for k, _ in rows)
        ((label, b),) = rows[2:]
        return label, b

    # 32 rows x 512 tokens: 128 scored positions' logits, bf16 and their float32 copy, are
    # 32 x 128 x 128256 x 6 bytes = 2.9 GiB, more than a layer's
    label, head = stage(512, 128)
    assert label.startswith("logits of the 128 scored positions")
    assert head == 32 * 128 * 128256 * (2 + 4)
    # 3,072 tokens a row: a layer's working set, whatever few positions are scored
    long_label, layer = stage(3072, 128)
    assert long_label.startswith("a layer's working set")
    assert stage(3072, 8) == (long_label, layer)
    assert layer > head


def test_a_scoring_pass_with_adapters_counts_their_products_and_gathers_only_split_rows():
    from jaxlora.models.model import model_config
    from jaxlora.plan_decode import score_rows

    c = model_config("llama-3.1-8b-shape")
    one = {"adapter": 4, "fsdp": 1, "tensor": 1}
    base = dict(score_rows(c, one, 32, 3072, 128, 2, 1.0, 0.0))
    lora = dict(score_rows(c, one, 32, 3072, 128, 2, 1.0, 2e8, rows_adapter_bytes=32e8))
    # the base's widest half is attention's; with adapters it is the MLP's, which holds one
    # more [T, F] bf16 product (the adapter's beside the base's): residual, norm, gate, up and
    # that product, 32 rows x 3,072 tokens
    key = next(k for k in base if k.startswith("a layer's"))
    assert base[key] < lora[key] == 32 * 3072 * (2 * 4096 + 3 * 14336) * 2
    assert lora["the rows' copies of a layer's adapters"] == 32e8 / 32  # a layer of 32
    fsdp = {"adapter": 1, "fsdp": 4, "tensor": 1}
    split = dict(score_rows(c, fsdp, 8, 512, 128, 2, 1.0, 0.0, rows_split=True))
    whole = dict(score_rows(c, fsdp, 32, 512, 128, 2, 1.0, 0.0, rows_split=False))
    assert split["vocab table gathered (2 copies)"] == 2 * 128256 * 4096 * 2
    assert any(k.startswith("layers gathered ahead") for k in split)
    assert not any(k.startswith(("vocab", "layers gathered")) for k in whole)
