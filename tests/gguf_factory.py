"""Tiny GGUF files written with the `gguf` package's own writer, from tiny transformers
checkpoints, the way llama.cpp's converter lays them out: llama.cpp's tensor names, Llama's q/k
rows permuted for its rotary pairing, weights quantised by gguf's quantisers, norms in F32.

transformers' own GGUF loader reads these files as the reference side of the parity tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

# transformers' tensor name suffix -> llama.cpp's, as llama.cpp's converter maps them
NAMES = {
    "input_layernorm.weight": "attn_norm.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.q_norm.weight": "attn_q_norm.weight",
    "self_attn.k_norm.weight": "attn_k_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def llama_cpp_permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter's permutation of Llama's q/k rows (pairs neighbours, not halves)."""
    return (
        w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)
    )


def write_gguf(hf_dir: Path, out: Path, qtype: str = "F32") -> Path:
    """A GGUF file of the transformers checkpoint in `hf_dir`, its 2-D weights stored as
    `qtype` (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q5_0, Q5_1)."""
    hf = json.loads((hf_dir / "config.json").read_text())
    arch = hf["model_type"]
    tensors = load_file(hf_dir / "model.safetensors")
    N, K = hf["num_attention_heads"], hf["num_key_value_heads"]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_block_count(hf["num_hidden_layers"])
    w.add_context_length(hf["max_position_embeddings"])
    w.add_embedding_length(hf["hidden_size"])
    w.add_feed_forward_length(hf["intermediate_size"])
    w.add_head_count(N)
    w.add_head_count_kv(K)
    head_dim = hf.get("head_dim") or hf["hidden_size"] // N
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_dimension_count(head_dim)
    w.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    w.add_rope_freq_base(hf.get("rope_theta", 10000.0))
    w.add_vocab_size(hf["vocab_size"])
    q = gguf.GGMLQuantizationType[qtype]
    for name, array in sorted(tensors.items()):
        if name == "model.embed_tokens.weight":
            target = "token_embd.weight"
        elif name == "model.norm.weight":
            target = "output_norm.weight"
        elif name == "lm_head.weight":
            target = "output.weight"
        else:
            _, _, layer, rest = name.split(".", 3)
            target = f"blk.{layer}.{NAMES[rest]}"
        array = np.asarray(array, np.float32)
        if arch == "llama" and target.endswith(("attn_q.weight", "attn_k.weight")):
            array = llama_cpp_permute(array, N if ".attn_q." in target else K)
        if array.ndim == 2 and q != gguf.GGMLQuantizationType.F32:
            w.add_tensor(target, gguf.quants.quantize(array, q), raw_dtype=q)
        else:
            w.add_tensor(target, array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
