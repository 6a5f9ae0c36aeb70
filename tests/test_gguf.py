"""GGUF checkpoints: tiny files written by gguf's own writer (Llama, Qwen2, Qwen3; float and
quantised), read by jaxlora and, as the reference, by transformers' GGUF loader."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

import jaxlora
from jaxlora.models.config import ModelConfig, RopeScaling
from jaxlora.models.gguf import GGUFFile, llama3_scaling_from_factors, unpermute_qk
from tests.gguf_factory import llama_cpp_permute, write_gguf
from tests.hf_factory import load_hf_model

CASES = [
    ("llama", dict(rope_scaling=False)),
    ("qwen2", {}),
    ("qwen3", dict(tie=True)),
]
QTYPES = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1"]
IDS = np.random.default_rng(0).integers(10, 500, (2, 12))


@pytest.fixture(scope="module")
def gguf_file(hf_checkpoint, tmp_path_factory):
    made = {}

    def make(family: str, qtype: str):
        if (family, qtype) not in made:
            kw = dict(CASES)[family]
            out = tmp_path_factory.mktemp("gguf") / f"{family}-{qtype}.gguf"
            made[family, qtype] = write_gguf(hf_checkpoint(family, **kw), out, qtype)
        return made[family, qtype]

    return make


def torch_logits(model) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(IDS)).logits.numpy()


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("family", [f for f, _ in CASES])
def test_gguf_logits_match_transformers_gguf_loader(hf_checkpoint, gguf_file, family, qtype):
    path = gguf_file(family, qtype)
    ours = np.asarray(jaxlora.load_pretrained(path)(IDS))
    # transformers' GGUF loader reads the tensors (dequantised by the same gguf kernels, its
    # own renaming and un-permuting); the architecture comes from the checkpoint's config.json
    # because transformers' qwen3 GGUF mapping ignores attention.key_length.
    hf_dir = hf_checkpoint(family, **dict(CASES)[family])
    ref = AutoModelForCausalLM.from_pretrained(
        path.parent,
        gguf_file=path.name,
        config=AutoConfig.from_pretrained(hf_dir),
        dtype=torch.float32,
    ).eval()
    # Both sides run float32 on the same dequantised weights: reduction order only (~2e-6
    # measured on logits of size ~3); a wrong name, permutation or transpose moves them by > 0.1.
    assert np.abs(ours - torch_logits(ref)).max() < 1e-4


@pytest.mark.parametrize("family", [f for f, _ in CASES])
def test_float32_gguf_is_the_original_checkpoint(hf_checkpoint, gguf_file, family):
    """Unquantised, the file holds the checkpoint's own weights: the same logits as
    transformers on the original safetensors, and the same architecture as its config.json."""
    hf_dir = hf_checkpoint(family, **dict(CASES)[family])
    path = gguf_file(family, "F32")
    model = jaxlora.load_pretrained(path)
    # float32 reduction order only, as above
    assert np.abs(np.asarray(model(IDS)) - torch_logits(load_hf_model(hf_dir))).max() < 1e-4
    expected = ModelConfig.from_file(hf_dir / "config.json")
    # the GGUF carries no special-token ids here (no tokenizer metadata written)
    ignore = dict(name_or_path="", bos_token_id=None, eos_token_ids=(), pad_token_id=None)
    got = dataclasses.replace(model.config, **ignore)
    want = dataclasses.replace(
        expected, **ignore, max_position_embeddings=got.max_position_embeddings
    )
    assert got == want


def test_quantised_weights_are_dequantised_not_reinterpreted(gguf_file):
    """Q4_1 stores 4-bit codes: reading them as anything but gguf's dequantisation gives logits
    far from the float32 file's. Its own error is small but not zero (a real quantisation)."""
    f32 = np.asarray(jaxlora.load_pretrained(gguf_file("llama", "F32"))(IDS))
    q4 = np.asarray(jaxlora.load_pretrained(gguf_file("llama", "Q4_1"))(IDS))
    diff = np.abs(f32 - q4).max()
    # 4-bit blocks of 32 perturb each weight by ~3% of its block's range: logits of size ~3
    # move by ~0.1-1 (1.0 measured), never by a factor (which a misread block would give).
    assert 1e-3 < diff < 0.5 * np.abs(f32).max()


def test_llama_qk_permutation_is_undone():
    w = np.arange(8 * 3, dtype=np.float32).reshape(8, 3)  # 2 heads of dim 4, 3 inputs
    assert np.array_equal(unpermute_qk(llama_cpp_permute(w, 2), 2), w)
    assert not np.array_equal(llama_cpp_permute(w, 2), w)


def _llama_cpp_rope_factors(theta, head_dim, factor, low, high, context):
    """llama.cpp's converter's `rope_freqs` for Llama 3 scaling, written from its definition."""
    out = []
    for i in range(0, head_dim, 2):
        wavelen = 2 * math.pi * theta ** (i / head_dim)
        if wavelen < context / high:
            out.append(1.0)
        elif wavelen > context / low:
            out.append(factor)
        else:
            smooth = (context / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_scaling_is_read_back_from_rope_freqs(factor):
    factors = _llama_cpp_rope_factors(500000.0, 128, factor, 1.0, 4.0, 8192)
    got = llama3_scaling_from_factors(factors, 500000.0, 128)
    assert got == RopeScaling(factor, 1.0, 4.0, 8192)
    other = _llama_cpp_rope_factors(500000.0, 128, factor, 2.0, 4.0, 8192)
    assert llama3_scaling_from_factors(other, 500000.0, 128) is None


def _jaxlora(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "jaxlora.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_bad_gguf_files_give_one_line_and_exit_2(gguf_file, tmp_path):
    good = gguf_file("llama", "Q8_0").read_bytes()
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(good[: len(good) * 2 // 3])
    garbage = tmp_path / "garbage.gguf"
    garbage.write_bytes(b"not a gguf file at all")
    for path, words in [(truncated, "truncated"), (garbage, "not a readable GGUF")]:
        r = _jaxlora("convert", str(path), str(tmp_path / "out"), cwd=tmp_path)
        assert r.returncode == 2, r.stderr
        assert words in r.stderr and len(r.stderr.strip().splitlines()) == 1, r.stderr
        assert not (tmp_path / "out").exists()


def test_unknown_architecture_and_quantisation_are_refused(tmp_path):
    import gguf

    w = gguf.GGUFWriter(str(tmp_path / "phi.gguf"), "phi3")
    w.add_block_count(1)
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(jaxlora.CheckpointError, match="architecture 'phi3' is not supported"):
        GGUFFile(tmp_path / "phi.gguf")
    # a type gguf reads but cannot dequantise in numpy
    w = gguf.GGUFWriter(str(tmp_path / "q.gguf"), "llama")
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    _, block_bytes = gguf.GGML_QUANT_SIZES[q8_1]
    raw = np.zeros((4, block_bytes), np.uint8)  # 4 rows of one block each
    w.add_tensor("token_embd.weight", raw, raw_dtype=q8_1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(jaxlora.CheckpointError, match="quantisation Q8_1 cannot be dequantised"):
        GGUFFile(tmp_path / "q.gguf")


def test_convert_writes_a_directory_that_loads_like_the_file(gguf_file, tmp_path):
    path = gguf_file("qwen2", "Q4_1")
    r = _jaxlora("convert", str(path), str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    direct = np.asarray(jaxlora.load_pretrained(path)(IDS))
    converted = np.asarray(jaxlora.load_pretrained(tmp_path / "out")(IDS))
    # the same float32 weights through Orbax: bit-identical forward
    assert np.array_equal(direct, converted)
