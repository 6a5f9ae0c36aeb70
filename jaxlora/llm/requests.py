"""The requests `jaxlora serve` accepts: OpenAI's completions and chat bodies, checked field by
field before anything is tokenized or decoded. Every field has its JSON type exactly (a boolean
is `true`/`false`, never `"yes"` or `1`; an integer is never `1.0` or `true`), token ids lie in
the vocabulary, and a violation is a 400 in OpenAI's error JSON naming the field."""

from __future__ import annotations

import secrets
from typing import Any

# OpenAI's error types: an unknown model is an invalid request (code model_not_found).
_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "invalid_request_error",
}


class APIError(Exception):
    """An error answered as OpenAI's JSON."""

    def __init__(
        self, status: int, message: str, param: str | None = None, code: str | None = None
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    def body(self) -> dict:
        kind = _ERROR_TYPES.get(self.status, "server_error")
        return {
            "error": {"message": self.message, "type": kind, "param": self.param, "code": self.code}
        }


def _same(value: Any, allowed: Any) -> bool:
    """`value == allowed` with its JSON type too: `true` is not 1, `1.0` is not 1."""
    return value is allowed or (type(value) is type(allowed) and value == allowed)


def flag(body: dict, key: str, default: bool = False) -> bool:
    """A boolean field: `true` or `false` (absent or null: `default`)."""
    value = body.get(key)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise APIError(400, f"{key} must be true or false, got {value!r}", key)
    return value


def _integer(body: dict, key: str, default: int | None) -> int | None:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise APIError(400, f"{key} must be an integer, got {value!r}", key)
    return value


def _number(body: dict, key: str, default: float, low: float, high: float, *, low_open=False):
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise APIError(400, f"{key} must be a number, got {value!r}", key)
    if value < low or value > high or (low_open and value == low):
        bound = f"({low}, {high}]" if low_open else f"[{low}, {high}]"
        raise APIError(400, f"{key} must be in {bound}, got {value}", key)
    return float(value)


def _logprobs(body: dict, chat: bool) -> tuple[int | None, bool]:
    """(top alternatives per token or None for no log-probabilities, echo) as OpenAI defines
    them: completions `logprobs: N` (0-5) and `echo`; chat `logprobs: true` and
    `top_logprobs: N` (0-20)."""
    if chat:
        top = _integer(body, "top_logprobs", None)
        if top is not None and not 0 <= top <= 20:
            raise APIError(400, f"top_logprobs must be in [0, 20], got {top}", "top_logprobs")
        if not flag(body, "logprobs"):
            if top is not None:
                raise APIError(400, "top_logprobs needs logprobs: true", "top_logprobs")
            return None, False
        return top or 0, False
    top = _integer(body, "logprobs", None)
    if top is not None and not 0 <= top <= 5:
        raise APIError(400, f"logprobs must be in [0, 5], got {top}", "logprobs")
    return top, flag(body, "echo")


def sampling(body: dict, default_max: int, chat: bool = False) -> dict[str, Any]:
    """The per-row settings of a request body (shared by both routes), validated."""
    n = _integer(body, "n", 1)
    if n != 1:
        raise APIError(400, f"n={n} is not supported: send one request per sample", "n")
    logprobs, echo = _logprobs(body, chat)
    if (logprobs is not None or echo) and flag(body, "stream"):
        key = "logprobs" if logprobs is not None else "echo"
        raise APIError(400, f"{key} is not streamed: send stream: false", key)
    for key, off in (
        ("suffix", (None,)),
        ("best_of", (None, 1)),
        ("tools", (None, [])),
        ("logit_bias", (None, {})),
        ("presence_penalty", (None, 0)),
        ("frequency_penalty", (None, 0)),
    ):
        if not any(_same(body.get(key), o) for o in off):
            raise APIError(400, f"{key} is not supported by jaxlora serve", key)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _integer(body, key, default_max)
    if max_tokens < (0 if echo else 1):
        least = "0 (with echo)" if echo else "1"
        raise APIError(400, f"{key} must be an integer >= {least}, got {max_tokens}", "max_tokens")
    stop = body.get("stop") or ()
    stop = (stop,) if isinstance(stop, str) else stop
    if not isinstance(stop, list | tuple) or not all(isinstance(s, str) for s in stop):
        raise APIError(400, "stop must be a string or a list of strings", "stop")
    if len(stop) > 4:
        raise APIError(400, f"stop takes at most 4 strings, got {len(stop)}", "stop")
    seed = _integer(body, "seed", None)
    if seed is None:
        seed = secrets.randbits(31)
    return dict(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        seed=int(seed) % 2**63,
        stop=tuple(stop),
        logprobs=logprobs,
        echo=echo,
    )


def prompts(body: dict, vocab_size: int) -> list[tuple[int, ...]] | list[str]:
    """A completion's prompts: strings, or token ids in [0, vocab_size)."""
    ids = _prompts(body)
    for p in ids:
        bad = [t for t in p if not 0 <= t < vocab_size] if isinstance(p, tuple) else []
        if bad:
            raise APIError(
                400,
                f"prompt token id {bad[0]} is outside the vocabulary [0, {vocab_size})",
                "prompt",
            )
    return ids


def _prompts(body: dict) -> list[tuple[int, ...]] | list[str]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        return list(prompt)
    if isinstance(prompt, list) and prompt and all(type(t) is int for t in prompt):
        return [tuple(prompt)]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, list) and p and all(type(t) is int for t in p) for p in prompt)
    ):
        return [tuple(p) for p in prompt]
    raise APIError(400, "prompt must be a string, a list of strings or token ids", "prompt")


def messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise APIError(400, "messages must be a non-empty list", "messages")
    out = []
    for i, m in enumerate(messages):
        role, content = (m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None)
        if role not in ("system", "user", "assistant"):
            raise APIError(400, f"messages[{i}].role must be system, user or assistant", "messages")
        if isinstance(content, list):  # content parts: only text ones
            if not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
                raise APIError(400, f"messages[{i}]: only text content is supported", "messages")
            content = "".join(str(p.get("text", "")) for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", "messages")
        out.append({"role": role, "content": content})
    fmt = body.get("response_format")
    if fmt is not None and (
        not isinstance(fmt, dict) or fmt.get("type") not in ("text", "json_object")
    ):
        raise APIError(
            400, "response_format must be {'type': 'text' | 'json_object'}", "response_format"
        )
    return out
