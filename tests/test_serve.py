"""`jaxlora serve` for real: the official `openai` client against the server started as a
subprocess on 127.0.0.1 (tiny model, two adapters). Greedy completions and chats equal local
generation for the base and each adapter, streaming yields the same text, errors are OpenAI's
JSON with the documented statuses, 32 concurrent requests are all answered correctly, and
SIGTERM lets in-flight requests finish and exits 0."""

from __future__ import annotations

import functools
import itertools
import json
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import openai
import pytest

import jaxlora
from jaxlora.generate import eos_and_pad, generate, generate_routed, until_eos
from tests.llm_servers import API_KEY, Server, make_adapters

PROMPTS = ["Question: What is the phone number of", "The capital of", "Once upon a time there"]
CHAT = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Who?"}]
NEW = 16
WIDTH = 48


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model = jaxlora.load_pretrained("tiny-llama")
    dirs = make_adapters(model, tmp_path_factory.mktemp("adapters"))
    adapters = [f"{name}={path}" for name, path in dirs.items()]
    server = Server(["tiny-llama", "--adapters", *adapters, "--api-key", API_KEY])
    stack = jaxlora.load_peft(model, list(dirs.values()), list(dirs))
    yield model, stack, server
    server.stop()


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served[2].url, api_key=API_KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def local(served):
    """expected(model_name, prompt_ids) -> (text, n_tokens): local greedy generation."""
    model, stack, _ = served
    eos, _ = eos_and_pad(model.tokenizer, model.config)

    @functools.cache
    def tokens(name: str, ids: tuple[int, ...]) -> tuple[int, ...]:
        # one width for every prompt (left padding changes no logit): one compile per path
        row, mask = np.zeros((1, WIDTH), np.int32), np.zeros((1, WIDTH), bool)
        row[0, WIDTH - len(ids) :], mask[0, WIDTH - len(ids) :] = ids, True
        if name == "tiny-llama":
            out = generate(model, row, mask, max_new_tokens=NEW)[0]
        else:
            slot = [stack.names.index(name)]
            out = generate_routed(model, stack, slot, row, mask, max_new_tokens=NEW)[0]
        return tuple(int(t) for t in until_eos(out, eos))

    def expected(name: str, ids: tuple[int, ...]) -> tuple[str, int]:
        kept = tokens(name, ids)
        return model.tokenizer.decode(kept, skip_special_tokens=True), len(kept)

    expected.tokens = tokens  # the generated ids themselves, for the streamed pieces
    return expected


def token_pieces(model, tokens: tuple[int, ...]) -> list[str]:
    """The text each generated token adds, token by token (the streamed deltas, one per token
    whose text is whole; the tiny tokenizer's pieces are ASCII, so none waits for the next)."""
    texts = [
        model.tokenizer.decode(tokens[:k], skip_special_tokens=True) for k in range(1 + len(tokens))
    ]
    return [b[len(a) :] for a, b in itertools.pairwise(texts) if b != a]


def encode(model, prompt: str) -> tuple[int, ...]:
    return tuple(model.tokenizer(prompt)["input_ids"])


def encode_chat(model, messages) -> tuple[int, ...]:
    text = model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tuple(model.tokenizer(text, add_special_tokens=False)["input_ids"])


MODELS = ["tiny-llama", "fact-a", "fact-b"]


def test_models_lists_the_base_and_the_adapters(client):
    assert [m.id for m in client.models.list().data] == MODELS


@pytest.mark.parametrize("name", MODELS)
def test_greedy_completions_equal_local_generation(served, client, local, name):
    model = served[0]
    outputs = set()
    for prompt in PROMPTS:
        r = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0)
        text, n = local(name, encode(model, prompt))
        assert r.choices[0].text == text
        assert r.usage.completion_tokens == n
        assert r.usage.prompt_tokens == len(encode(model, prompt))
        assert r.choices[0].finish_reason == ("length" if n == NEW else "stop")
        outputs.add(text)
    # token ids as the prompt give the same text
    ids = list(encode(model, PROMPTS[0]))
    r = client.completions.create(model=name, prompt=ids, max_tokens=NEW, temperature=0)
    assert r.choices[0].text == local(name, tuple(ids))[0]


def test_the_adapters_change_the_output(served, local):
    model = served[0]
    ids = encode(model, PROMPTS[0])
    assert len({local(name, ids)[0] for name in MODELS}) == 3


@pytest.mark.parametrize("name", MODELS)
def test_greedy_chat_equals_local_generation_and_streams_the_same_text(served, client, local, name):
    model = served[0]
    text, _ = local(name, encode_chat(model, CHAT))
    r = client.chat.completions.create(model=name, messages=CHAT, max_tokens=NEW, temperature=0)
    assert r.choices[0].message.content == text
    assert r.choices[0].message.role == "assistant"

    # Streamed: one event that opens the assistant's message, then the tokens' texts (one
    # chunk per token, or per few when they arrive together: the server coalesces what is
    # queued), one that closes with the finish reason; counted against the tokens.
    pieces = token_pieces(model, local.tokens(name, encode_chat(model, CHAT)))
    assert len(pieces) == r.usage.completion_tokens > 0  # every token adds text here
    chunks = list(
        client.chat.completions.create(
            model=name, messages=CHAT, max_tokens=NEW, temperature=0, stream=True
        )
    )
    first, *middle, last = (c.choices[0] for c in chunks)
    assert (first.delta.role, first.delta.content, first.finish_reason) == ("assistant", "", None)
    assert "".join(c.delta.content for c in middle) == "".join(pieces)
    assert 0 < len(middle) <= len(pieces) and all(c.delta.content for c in middle)
    assert all(c.finish_reason is None for c in middle)
    assert last.delta.content is None and last.finish_reason == r.choices[0].finish_reason
    assert "".join(pieces) == text

    ids = encode(model, PROMPTS[1])
    whole = client.completions.create(model=name, prompt=PROMPTS[1], max_tokens=NEW, temperature=0)
    pieces = token_pieces(model, local.tokens(name, ids))
    assert len(pieces) == whole.usage.completion_tokens > 0
    stream = client.completions.create(
        model=name, prompt=PROMPTS[1], max_tokens=NEW, temperature=0, stream=True
    )
    *middle, last = (c.choices[0] for c in stream)
    assert "".join(c.text for c in middle) == "".join(pieces) == local(name, ids)[0]
    assert 0 < len(middle) <= len(pieces) and all(c.text for c in middle)
    assert last.text == "" and last.finish_reason == whole.choices[0].finish_reason


def test_stop_strings_cut_the_text(served, client, local):
    full, _ = local("fact-a", encode(served[0], PROMPTS[0]))
    stop = full[3:5]
    r = client.completions.create(
        model="fact-a", prompt=PROMPTS[0], max_tokens=NEW, temperature=0, stop=[stop]
    )
    assert r.choices[0].text == full[: full.index(stop)]
    assert r.choices[0].finish_reason == "stop"


def test_sampling_is_seeded(client):
    def sample(seed):
        r = client.completions.create(
            model="fact-b", prompt=PROMPTS[2], max_tokens=NEW, temperature=1.0, seed=seed
        )
        return r.choices[0].text

    assert sample(1) == sample(1)
    assert len({sample(s) for s in range(4)}) > 1


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as e:
        client.completions.create(model="nope", prompt="hi", max_tokens=4)
    assert e.value.status_code == 404
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["code"] == "model_not_found"
    assert e.value.body["param"] == "model"
    assert "nope" in e.value.body["message"]


@pytest.mark.parametrize(
    "kwargs, param",
    [
        (dict(max_tokens=-1), "max_tokens"),
        (dict(temperature=2.5), "temperature"),
        (dict(top_p=0.0), "top_p"),
        (dict(n=2), "n"),
        (dict(prompt="word " * 600), "prompt"),
        (dict(max_tokens=600), "prompt"),
    ],
)
def test_bad_parameters_are_400(client, kwargs, param):
    kwargs = {"model": "fact-a", "prompt": "hi", "max_tokens": 4, **kwargs}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**kwargs)
    assert e.value.status_code == 400
    assert set(e.value.body) == {"message", "type", "param", "code"}
    assert e.value.body["type"] == "invalid_request_error"
    assert e.value.body["param"] == param


def test_wrong_key_is_401_and_malformed_json_is_400(served):
    bad = openai.OpenAI(base_url=served[2].url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as e:
        bad.models.list()
    assert e.value.body["type"] == "authentication_error"
    request = urllib.request.Request(
        served[2].url + "/completions",
        data=b"{not json",
        headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"},
    )
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(request, timeout=30)
    assert e.value.code == 400
    assert json.loads(e.value.read())["error"]["type"] == "invalid_request_error"


def test_32_concurrent_requests_are_all_answered_correctly(served, client, local):
    model = served[0]
    jobs = [(MODELS[i % 3], PROMPTS[(i // 3) % 3]) for i in range(32)]

    def ask(job):
        name, prompt = job
        r = client.completions.create(model=name, prompt=prompt, max_tokens=NEW, temperature=0)
        return r.choices[0].text

    with ThreadPoolExecutor(32) as pool:
        answers = list(pool.map(ask, jobs))
    assert answers == [local(name, encode(model, prompt))[0] for name, prompt in jobs]


def test_sigterm_finishes_in_flight_requests_and_exits_0(served, client):
    """Last in the module: it stops the server."""
    server = served[2]
    results: list = []
    started = threading.Barrier(9)

    def ask(i):
        started.wait()
        # a new number of new tokens: a program still to compile keeps the request in flight
        r = client.completions.create(
            model=MODELS[i % 3], prompt=PROMPTS[i % 3], max_tokens=100, temperature=0
        )
        results.append(r.choices[0].finish_reason)

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    started.wait()
    import time

    time.sleep(0.5)  # the requests reach the server
    assert server.stop() == 0
    for t in threads:
        t.join()
    assert len(results) == 8
    with pytest.raises(openai.APIConnectionError):
        client.models.list()


def test_memory_hook_routes_each_question_to_its_adapter_and_context(served, local):
    """In process: `serve(..., memory=fn)` answers model `memory` by fn's per-question route
    (here: 'phone' questions to fact-a with a context line, the rest to fact-b)."""
    import asyncio

    from jaxlora.llm.engine import Engine
    from jaxlora.llm.serve import MemoryRoute, Service

    model, stack, _ = served
    context = "Context: numbers. "
    asked = []

    def memory(questions):
        asked.append(list(questions))
        return [
            MemoryRoute(stack.select([0]), context)
            if "phone" in q
            else MemoryRoute(stack.select([1]))
            for q in questions
        ]

    service = Service(Engine(model, stack), "tiny-llama", memory, wait_s=0.0)
    assert service.model_names == [*MODELS, "memory"]
    service.batcher.start()
    try:

        async def ask(prompt):
            body = {"model": "memory", "prompt": prompt, "max_tokens": NEW, "temperature": 0}
            outputs, _ = await service.generate(body, chat=False)
            return outputs[0].text

        async def both():
            return await asyncio.gather(ask(PROMPTS[0]), ask(PROMPTS[1]))

        answers = asyncio.run(both())
    finally:
        service.batcher.stop()
    assert sorted(q for batch in asked for q in batch) == sorted(PROMPTS[:2])
    assert answers[0] == local("fact-a", encode(model, context + PROMPTS[0]))[0]
    assert answers[1] == local("fact-b", encode(model, PROMPTS[1]))[0]
