"""`jaxlora serve`'s strict requests and operations: fields of the wrong JSON type and token ids
outside the vocabulary are 400s, a request whose client has gone never reaches the decoder's
state, a request past its timeout is a 504, every request leaves one access-log line, and the
CLI shows its version and every default."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import time
from concurrent.futures import Future

import openai
import pytest

import jaxlora
from jaxlora.llm.engine import Engine, Row
from jaxlora.llm.serve import Batcher, _Work
from tests.llm_servers import API_KEY, Server


@pytest.fixture(scope="module")
def server():
    server = Server(["tiny-llama", "--api-key", API_KEY])
    yield server
    server.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url, api_key=API_KEY, max_retries=0, timeout=120)


VOCAB = jaxlora.load_pretrained("tiny-llama").config.vocab_size


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"prompt": [1, 2, VOCAB]}, "prompt"),
        ({"prompt": [1, -1]}, "prompt"),
        ({"prompt": [[1, 2], [3, 2**40]]}, "prompt"),
        ({"stream": "yes"}, "stream"),
        ({"stream": 1}, "stream"),
        ({"stream": "true"}, "stream"),
        ({"n": True}, "n"),
        ({"n": 1.0}, "n"),
        ({"max_tokens": 4.0}, "max_tokens"),
        ({"seed": "7"}, "seed"),
        ({"echo": 0}, "echo"),
        ({"best_of": True}, "best_of"),
    ],
)
def test_mistyped_fields_and_ids_outside_the_vocabulary_are_400(client, extra, param):
    body = {"model": "tiny-llama", "prompt": "hi", "max_tokens": 4, **extra}
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(**body)
    assert e.value.status_code == 400
    assert e.value.body["param"] == param
    assert e.value.body["type"] == "invalid_request_error"


def test_every_request_leaves_one_access_log_line(server, client):
    ids = [1, 5, 9, 12]
    r = client.completions.create(model="tiny-llama", prompt=ids, max_tokens=3, temperature=0)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="hi", max_tokens=3)
    deadline = time.monotonic() + 10
    want_ok = (
        f'"POST /v1/completions" 200 model=tiny-llama prompt_tokens=4 '
        f"completion_tokens={r.usage.completion_tokens} "
    )
    want_404 = '"POST /v1/completions" 404 model=nope prompt_tokens=- completion_tokens=- '
    while time.monotonic() < deadline:
        lines = list(server.lines)
        if any(want_ok in x for x in lines) and any(want_404 in x for x in lines):
            break
        time.sleep(0.1)
    assert sum(want_ok in x for x in lines) == 1, "".join(lines[-5:])
    assert sum(want_404 in x for x in lines) == 1, "".join(lines[-5:])
    assert all(x.rstrip().endswith(" ms") for x in lines if '"POST ' in x)


def test_a_request_past_its_timeout_is_504():
    server = Server(["tiny-llama", "--request-timeout", "0.001"])
    try:
        client = openai.OpenAI(base_url=server.url, api_key="-", max_retries=0, timeout=120)
        with pytest.raises(openai.APIStatusError) as e:
            client.completions.create(model="tiny-llama", prompt="hi", max_tokens=4)
        assert e.value.status_code == 504
        assert "0.001 s" in e.value.body["message"]
    finally:
        assert server.stop() == 0  # the decoder thread skipped the abandoned request and stopped


def test_a_request_cancelled_mid_decode_leaves_the_decoder_serving():
    """The client of the first request goes away while its pass decodes (its future cancelled
    after the decoder took it); the decoder finishes the pass, answers nobody, and serves the
    next request. Delivering into the cancelled future used to kill the decoder thread, and the
    next request then waited forever."""
    model = jaxlora.load_pretrained("tiny-llama")
    engine = Engine(model, max_batch=4)
    batcher = Batcher(engine, None, wait_s=0.0)
    batcher.start()
    try:
        ids = tuple(engine.encode("The capital of"))
        first = batcher.submit(_Work([Row(ids, max_tokens=32)], Future()))
        deadline = time.monotonic() + 60
        while not batcher.queue.empty() and time.monotonic() < deadline:
            time.sleep(0.001)  # wait until the decoder has taken it
        assert first.cancel()  # the client has gone; the pass is decoding (its compile alone
        # takes seconds)
        second = batcher.submit(_Work([Row(ids, max_tokens=4)], Future()))
        (out,) = second.result(timeout=120)
        assert len(out.tokens) <= 4 and batcher.thread.is_alive()
    finally:
        batcher.stop()


def test_version_and_every_default_in_serves_help():
    run = [sys.executable, "-m", "jaxlora.cli"]
    version = subprocess.run([*run, "--version"], capture_output=True, text=True, check=True)
    assert version.stdout.strip() == f"jaxlora {importlib.metadata.version('jaxlora')}"
    text = subprocess.run([*run, "serve", "--help"], capture_output=True, text=True, check=True)
    flat = " ".join(text.stdout.split())
    for default in ("(default: 8000)", "(default: 32)", "(default: 2.0)", "(default: 600.0)"):
        assert default in flat
    assert "(default: None, the run's or the checkpoint's)" in flat  # --dtype
