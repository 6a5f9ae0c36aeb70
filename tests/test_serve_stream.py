"""Real streaming in `jaxlora serve`: chunks leave as the decoder draws tokens, their text is
exactly the non-streamed text (stop strings and max_tokens included, base and adapters,
completions and chat), the detokeniser is incremental and never splits a character, prompts
are tokenized off the event loop, and a client leaving mid-stream leaves the server serving."""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import http.client
import json
import random
import threading
import time
import urllib.parse

import jax.numpy as jnp
import numpy as np
import openai
import pytest

import jaxlora
from jaxlora.generate import DecodeSpec, decode_stack, eos_and_pad, streaming
from jaxlora.llm.engine import Engine, Row
from jaxlora.llm.serve import Service
from jaxlora.llm.stream import TextStream
from tests.llm_servers import API_KEY, Server, make_adapters

PROMPT = "Once upon a time there"
CHAT = [{"role": "user", "content": "Tell me a story."}]
MODELS = ["tiny-llama", "fact-a"]


@pytest.fixture(scope="module")
def model():
    return jaxlora.load_pretrained("tiny-llama")


@pytest.fixture(scope="module")
def served(model, tmp_path_factory):
    dirs = make_adapters(model, tmp_path_factory.mktemp("adapters"))
    adapters = [f"{name}={path}" for name, path in dirs.items()]
    server = Server(["tiny-llama", "--adapters", *adapters, "--api-key", API_KEY])
    yield model, dirs, server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2].url, api_key=API_KEY, max_retries=0, timeout=120)


# --------------------------------------------------------------------------- the detokeniser


def pieces_of(stream: TextStream, ids, final: str) -> list[str]:
    pieces = [p for t in ids if (p := stream.push(t))]
    return [*pieces, rest] if (rest := stream.finish(final)) else pieces


@pytest.mark.parametrize("seed", range(20))
def test_pieces_are_the_final_text_never_split_inside_a_character_nor_past_a_stop(seed):
    """Bytes as tokens (UTF-8 characters of 1-4 bytes): pieces never end inside a character,
    never show a stop string or its start before it is known not to be one, and concatenate
    to the text cut before the first stop string."""
    rng = random.Random(seed)
    alphabet = "ab c.\né€😀"
    text = "".join(rng.choice(alphabet) for _ in range(60))
    stops = ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 3))) for _ in range(2)]
    ids = list(text.encode())
    final = text[: min((i for s in stops if (i := text.find(s)) >= 0), default=len(text))]

    def decode(window):
        return bytes(window).decode("utf-8", errors="replace")

    pieces = pieces_of(TextStream(decode, stops), ids, final)
    assert "".join(pieces) == final
    assert not any("\ufffd" in p for p in pieces)


def test_the_real_tokenizer_streams_multibyte_text_exactly(model):
    """The tiny model's byte-level BPE splits é, € and emoji over several tokens."""
    tok = model.tokenizer
    text = " héllo wörld — 10 € 😀 and,   spaces. Done!"
    ids = tok(text, add_special_tokens=False)["input_ids"]

    def decode(window):
        return tok.decode(window, skip_special_tokens=True)

    final = decode(ids)
    pieces = pieces_of(TextStream(decode), ids, final)
    assert "".join(pieces) == final and not any("\ufffd" in p for p in pieces)
    assert len(pieces) > len(ids) // 2  # incremental: not held back to the end


def test_engine_streams_base_and_routed_rows_as_their_texts(model, served):
    """`Engine.run(on_text=...)`: base-only passes and routed passes (mixed adapters) stream
    pieces that concatenate to each row's output text, with max_tokens, stop strings,
    sampling, and rows that do not stream in the same pass."""
    _, dirs, _ = served
    engine = Engine(model, jaxlora.load_peft(model, list(dirs.values()), list(dirs)), max_batch=4)
    prompt = engine.encode(PROMPT)
    plain = engine.run([Row(prompt, 1, max_tokens=24)])[0].text
    rows = [
        Row(prompt, 0, max_tokens=24, stream=True),
        Row(prompt, 1, max_tokens=5, stream=True),
        Row(prompt, 1, max_tokens=24, stop=(plain[6:9],), stream=True),
        Row(prompt, 2, max_tokens=24, temperature=1.0, seed=3, stream=True),
        Row(prompt, 2, max_tokens=24),
    ]
    for batch in (rows[:1], rows):  # the base program, then the routed one
        got = collections.defaultdict(list)
        outputs = engine.run(batch, on_text=lambda i, piece: got[i].append(piece))  # noqa: B023
        plain = engine.run([dataclasses.replace(r, stream=False) for r in batch])
        for i, (row, out) in enumerate(zip(batch, outputs, strict=True)):
            assert out.text == plain[i].text
            assert "".join(got[i]) == (out.text if row.stream else "")
    assert outputs[2].finish_reason == "stop" and len(outputs[1].tokens) == 5


def test_a_stack_decode_streams_its_steps_in_order(model, served):
    """`decode_stack` (the loop outside the vmap over adapters), a callback every 3 steps: the
    sink sees the first token at once, then steps 3, 6, ... and the last, in order, each time
    with the tokens [A, B, N] the decode returns up to that step."""
    stack = jaxlora.load_peft(model, list(served[1].values()), list(served[1]))
    ids = model.tokenizer(PROMPT)["input_ids"]
    tokens = jnp.asarray(np.tile(np.asarray(ids, np.int32), (2, 1, 1)))  # [A=2, B=1, T]
    eos, pad = eos_and_pad(model.tokenizer, model.config)
    got = []
    with streaming(lambda step, t: got.append((step, t.copy()))):
        out = decode_stack(
            model.graph(stack.placement),
            model.params,
            stack.weights,
            stack.consts,
            tokens,
            jnp.ones(tokens.shape, bool),
            DecodeSpec(12, eos, pad, stream=3),
        )
    out, steps = np.asarray(out), [s for s, _ in got]
    assert steps[:-1] == list(range(0, steps[-1], 3)) and steps[-1] >= 9, steps
    for step, seen in got:
        np.testing.assert_array_equal(seen[..., : step + 1], out[..., : step + 1])


def test_prompts_are_tokenized_on_the_tokenizer_thread(model):
    service = Service(Engine(model), "tiny-llama", None, 0.0)
    threads = []
    encode = service.engine.encode

    def spy(text):
        threads.append(threading.current_thread().name)
        return encode(text)

    service.engine.encode = spy
    body = {"model": "tiny-llama", "prompt": ["a", "b"], "max_tokens": 2}
    work, _ = asyncio.run(service.start(body, chat=False))
    service.tokenizer.shutdown()
    assert len(work.rows) == 2 and len(threads) == 2
    assert all(t.startswith("jaxlora-tokenizer") for t in threads), threads


# --------------------------------------------------------------------------- the server


def streamed(client, chat: bool, **kw) -> tuple[str, str, int]:
    """(text, finish reason, content chunks) of a streamed request."""
    if chat:
        chunks = list(client.chat.completions.create(messages=CHAT, stream=True, **kw))
        text = [c.choices[0].delta.content or "" for c in chunks]
    else:
        chunks = list(client.completions.create(prompt=PROMPT, stream=True, **kw))
        text = [c.choices[0].text for c in chunks]
    return "".join(text), chunks[-1].choices[0].finish_reason, sum(map(bool, text))


def whole(client, chat: bool, **kw) -> tuple[str, str]:
    if chat:
        c = client.chat.completions.create(messages=CHAT, **kw).choices[0]
        return c.message.content, c.finish_reason
    c = client.completions.create(prompt=PROMPT, **kw).choices[0]
    return c.text, c.finish_reason


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
@pytest.mark.parametrize("name", MODELS)
def test_streamed_text_is_the_non_streamed_text(client, name, chat):
    """Greedy and seeded sampling, cut by max_tokens and by a stop string."""
    base = dict(model=name, max_tokens=40, temperature=0)
    full, reason = whole(client, chat, **base)
    assert reason == "length" and len(full) > 12
    stop = full[8:11]  # a stop string the text meets after a few tokens
    for kw in (
        base,
        {**base, "max_tokens": 7},
        {**base, "stop": [stop, "never there"]},
        {**base, "temperature": 1.0, "seed": 5},
    ):
        text, reason = whole(client, chat, **kw)
        streamed_text, streamed_reason, n = streamed(client, chat, **kw)
        assert (streamed_text, streamed_reason) == (text, reason), kw
        assert (n > 0) == bool(text)
    assert whole(client, chat, **base, stop=[stop])[0] == full[: full.index(stop)]


def test_the_first_chunk_arrives_long_before_the_last(client):
    """A 400-token completion: its first content chunk arrives within the first half of the
    time to its last. Chunks sent at the end of the pass (the old behaviour) arrive together,
    at > 90% of it; streamed, the first comes after the prefill and one step, ~1/400 of the
    decoding (plus a request's fixed HTTP cost, a few ms, against ~100+ ms of decoding on the
    tiny model). A loaded machine slows both ends alike; a one-off stall before the first
    chunk is what could break the bound, so the best of three tries counts."""
    kw = dict(model="tiny-llama", prompt=PROMPT, max_tokens=400, temperature=0)
    assert client.completions.create(**kw).usage.completion_tokens >= 300  # no early EOS
    ratios = []
    for _ in range(4):  # the first try compiles the streamed program: not counted
        start, arrivals = time.perf_counter(), []
        for c in client.completions.create(stream=True, **kw):
            if c.choices[0].text:
                arrivals.append(time.perf_counter() - start)
        ratios.append(arrivals[0] / arrivals[-1])
    assert min(ratios[1:]) < 0.5, ratios


def test_a_client_leaving_mid_stream_leaves_the_server_serving(served, client):
    url = urllib.parse.urlsplit(served[2].url)
    body = {"model": "fact-a", "prompt": PROMPT, "max_tokens": 400, "stream": True}
    for _ in range(2):
        conn = http.client.HTTPConnection(url.hostname, url.port, timeout=60)
        headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
        conn.request("POST", url.path + "/completions", json.dumps(body), headers)
        response = conn.getresponse()
        assert response.status == 200
        assert response.readline().startswith(b"data: ")  # the stream has begun
        conn.close()  # gone mid-stream
    text, reason, _ = streamed(client, False, model="fact-a", max_tokens=8, temperature=0)
    assert (text, reason) == whole(client, False, model="fact-a", max_tokens=8, temperature=0)
    assert served[2].proc.poll() is None
