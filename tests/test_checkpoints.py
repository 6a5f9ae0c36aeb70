"""Loading, converting and sizing checkpoints; errors for checkpoints jaxlora cannot read."""

from __future__ import annotations

import json
import shutil

import jax
import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import jaxlora
from jaxlora.cli import main as cli
from jaxlora.models.config import ModelConfig
from jaxlora.models.model import abstract_module, count_params
from jaxlora.sharding import make_mesh
from tests.test_model_parity import padded_batch

# config.json fields of the published checkpoints (written out here: nothing is downloaded).
REAL_CONFIGS = {
    "Llama-3.1-8B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 4096,
        "intermediate_size": 14336,
        "num_hidden_layers": 32,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "rope_scaling": {
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "Llama-3.2-1B": {
        "model_type": "llama",
        "vocab_size": 128256,
        "hidden_size": 2048,
        "intermediate_size": 8192,
        "num_hidden_layers": 16,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 64,
        "rms_norm_eps": 1e-05,
        "rope_theta": 500000.0,
        "max_position_embeddings": 131072,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "rope_scaling": {
            "factor": 32.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 8192,
            "rope_type": "llama3",
        },
        "bos_token_id": 128000,
        "eos_token_id": [128001, 128008, 128009],
    },
    "Qwen3-0.6B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 1024,
        "intermediate_size": 3072,
        "num_hidden_layers": 28,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": True,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
    "Qwen3-8B": {
        "model_type": "qwen3",
        "vocab_size": 151936,
        "hidden_size": 4096,
        "intermediate_size": 12288,
        "num_hidden_layers": 36,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "rms_norm_eps": 1e-06,
        "rope_theta": 1000000,
        "max_position_embeddings": 40960,
        "tie_word_embeddings": False,
        "hidden_act": "silu",
        "attention_bias": False,
        "use_sliding_window": False,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
    },
}


@pytest.mark.parametrize("name", list(REAL_CONFIGS))
def test_abstract_parameter_count_equals_transformers(tmp_path, name):
    (tmp_path / "config.json").write_text(json.dumps(REAL_CONFIGS[name]))
    config = ModelConfig.from_file(tmp_path / "config.json")
    *_, abstract = abstract_module(config)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(abstract))
    hf_config = AutoConfig.from_pretrained(tmp_path)
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(hf_config)
    assert count_params(abstract) == sum(p.numel() for p in hf.parameters())


def test_presets_match_their_real_config(tmp_path):
    for preset, real in [
        ("llama-3.1-8b-shape", "Llama-3.1-8B"),
        ("qwen3-8b-shape", "Qwen3-8B"),
        ("llama-3.2-1b-shape", "Llama-3.2-1B"),
        ("qwen3-0.6b-shape", "Qwen3-0.6B"),
    ]:
        ours = jaxlora.PRESETS[preset].config
        ref = ModelConfig.from_hf(REAL_CONFIGS[real])
        fields = (
            "vocab_size",
            "hidden_size",
            "intermediate_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "tie_word_embeddings",
            "rope_scaling",
            "qk_norm",
        )
        assert {f: getattr(ours, f) for f in fields} == {f: getattr(ref, f) for f in fields}


def test_convert_round_trip_gives_identical_logits(hf_checkpoint, tmp_path):
    src = hf_checkpoint("qwen2", num_heads=4, num_kv_heads=2)
    out = tmp_path / "converted"
    assert cli(["convert", str(src), str(out)]) == 0
    ids, mask = padded_batch("left")
    a = np.asarray(jaxlora.load_pretrained(src)(ids, mask))
    converted = jaxlora.load_pretrained(out)
    np.testing.assert_array_equal(np.asarray(converted(ids, mask)), a)
    assert converted.tokenizer is not None and converted.config.qkv_bias


def test_converted_checkpoint_loads_into_a_sharded_layout(hf_checkpoint, tmp_path):
    src = hf_checkpoint("llama", num_heads=4, num_kv_heads=2)
    out = tmp_path / "converted"
    assert cli(["convert", str(src), str(out)]) == 0
    mesh = make_mesh(adapter=2, fsdp=2, tensor=2)
    sharded = jaxlora.load_pretrained(out, mesh=mesh)
    q = sharded.params["layers"][0]["self_attn"]["q_proj"]["kernel"].get_value()
    assert q.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    assert len(q.addressable_shards) == 8 and q.addressable_shards[0].data.shape == (32, 32)
    ids, mask = padded_batch("right")
    ref = np.asarray(jaxlora.load_pretrained(src)(ids, mask))
    # one forward; tensor=2 splits 64- and 128-term sums in two: a few ulps of logits ~10
    np.testing.assert_allclose(np.asarray(sharded(ids, mask)), ref, atol=1e-5)


def test_sharded_safetensors_checkpoint_loads(tmp_path, hf_checkpoint):
    from tests.hf_factory import make_hf_checkpoint

    sharded = make_hf_checkpoint(tmp_path / "sharded", "llama", max_shard_size="100KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) > 1
    single = hf_checkpoint("llama")
    ids, mask = padded_batch("right")
    np.testing.assert_array_equal(
        np.asarray(jaxlora.load_pretrained(sharded)(ids, mask)),
        np.asarray(jaxlora.load_pretrained(single)(ids, mask)),
    )


def test_save_hf_is_loadable_by_transformers(tmp_path):
    model = jaxlora.load_pretrained("tiny-qwen3")
    model.save_hf(tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    ids, mask = padded_batch("right")
    with torch.no_grad():
        ref = hf(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask)).logits.numpy()
    valid = mask.astype(bool)
    # torch vs XLA rounding of one float32 forward (see test_model_parity)
    assert np.abs(np.asarray(model(ids, mask))[valid] - ref[valid]).max() < 1e-4


# ---------------------------------------------------------------------------------------------
# errors: one line naming the problem


def _copy(src, dst):
    shutil.copytree(src, dst)
    return dst


def _one_line_error(excinfo, *needles):
    message = str(excinfo.value)
    assert "\n" not in message
    for needle in needles:
        assert needle in message, message


def test_unsupported_model_type(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2"}))
    with pytest.raises(jaxlora.ConfigError) as e:
        jaxlora.load_pretrained(path)
    _one_line_error(e, "unsupported model_type 'gpt2'", "llama")


def test_missing_weights_file(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    with pytest.raises(jaxlora.CheckpointError) as e:
        jaxlora.load_pretrained(path)
    _one_line_error(e, "no model.safetensors")


def test_missing_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(jaxlora.CheckpointError) as e:
        jaxlora.load_pretrained(tmp_path / "empty")
    _one_line_error(e, "no config.json")


def test_shape_mismatch(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 96}))
    with pytest.raises(jaxlora.CheckpointError) as e:
        jaxlora.load_pretrained(path)
    _one_line_error(e, "mlp.", "has shape", "config.json implies", "96")


def test_unsupported_rope_type(hf_checkpoint, tmp_path):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    cfg = json.loads((path / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0}
    (path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(jaxlora.ConfigError) as e:
        jaxlora.load_pretrained(path)
    _one_line_error(e, "rope_type 'yarn'")


def test_cli_error_is_one_line_and_writes_nothing(hf_checkpoint, tmp_path, capsys):
    path = _copy(hf_checkpoint("llama"), tmp_path / "m")
    (path / "model.safetensors").unlink()
    out = tmp_path / "out"
    assert cli(["convert", str(path), str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("jaxlora: error:") and "\n" not in err
    assert not out.exists() and not list(tmp_path.glob(".out*"))


def test_convert_refuses_to_overwrite(hf_checkpoint, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert cli(["convert", str(hf_checkpoint("llama")), str(out)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"
