"""`jaxlora serve`'s access log: one line per request on stderr, written when its response
has been sent (a stream's last event included), so that a streamed request shows its
completion tokens and its whole time.

    jaxlora: 127.0.0.1 "POST /v1/completions" 200 model=a prompt_tokens=4 completion_tokens=16 12 ms

Handlers record the model and the token counts on `request.state` (`model`, `tokens`: a
(prompt, completion) pair, "-" where unknown); a streamed request's completion count is set
when its decoding ends.
"""

from __future__ import annotations

import sys
import time

from fastapi import FastAPI, Request


def add_access_log(app: FastAPI) -> None:
    @app.middleware("http")
    async def access_log(request: Request, call_next):
        start = time.monotonic()
        request.state.model, request.state.tokens = "-", ("-", "-")
        response = await call_next(request)
        body = response.body_iterator

        async def logged():
            try:
                async for part in body:
                    yield part
            finally:
                prompt, completion = request.state.tokens
                client = request.client.host if request.client else "-"
                print(
                    f'jaxlora: {client} "{request.method} {request.url.path}" '
                    f"{response.status_code} model={request.state.model} "
                    f"prompt_tokens={prompt} completion_tokens={completion} "
                    f"{1e3 * (time.monotonic() - start):.0f} ms",
                    file=sys.stderr,
                    flush=True,
                )

        response.body_iterator = logged()
        return response
