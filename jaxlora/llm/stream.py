"""Streamed text: incremental detokenisation of a row's tokens as the decoder draws them.

`TextStream.push(token)` returns the text that token makes final, in constant work per token
(never a re-decode of the whole prefix). It decodes a small window, the tokens since the last
emitted text plus the group before them as context (a SentencePiece tokenizer drops a leading
space at the start of a decode; the context keeps it), as text-generation-inference does, and
holds text back while it is not yet final:

- a window whose text ends in U+FFFD (a token ending inside a multi-byte character) waits for
  the next token;
- text that could be the start of a `stop` string waits until it is not (or is cut there);
- once a stop string appears the row emits nothing more.

`TextStream.finish(text)` gives what is left of the row's final text (`Engine._finish`: the
whole decode up to EOS and `max_tokens`, cut before the first stop string), so the pieces of a
row always concatenate to exactly its non-streamed text.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from concurrent.futures import Future

from jaxlora.llm.requests import APIError

log = logging.getLogger(__name__)


class TextStream:
    """One row's generated tokens -> the pieces of its text, as they become final."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str] = ()):
        self.decode = decode
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.prefix = 0  # ids[prefix:read]: context for the window (already in `text`)
        self.read = 0  # ids[read:]: not yet in `text`
        self.text = ""  # decoded so far (sent, then held back for the stop strings)
        self.sent = 0  # characters of `text` already emitted
        self.stopped = False  # a stop string appeared: nothing more is emitted

    def push(self, token: int) -> str:
        """The text `token` makes final ("" while it is held back)."""
        self.ids.append(int(token))
        if self.stopped:
            return ""
        before = self.decode(self.ids[self.prefix : self.read])
        after = self.decode(self.ids[self.prefix :])
        if len(after) > len(before) and not after.endswith("\ufffd") and after.startswith(before):
            self.text += after[len(before) :]
            self.prefix, self.read = self.read, len(self.ids)
        return self._release()

    def _release(self) -> str:
        text, start = self.text, self.sent
        # The earliest stop string in what is unsent (none can start before `sent`: text that
        # could begin one is never sent).
        cut = min((i for s in self.stop if (i := text.find(s, start)) >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            end = cut
        else:  # hold back the longest tail that is the start of a stop string
            held = max(
                (k for s in self.stop for k in range(1, len(s)) if text.endswith(s[:k])), default=0
            )
            end = max(start, len(text) - held)
        self.sent = end
        return text[start:end]

    def finish(self, final: str) -> str:
        """The rest of the row's final text after what was emitted."""
        sent = self.text[: self.sent]
        if not final.startswith(sent):  # a tokenizer whose windows decode differently
            log.warning("streamed text %r is not a prefix of the final text %r", sent, final)
        return final[len(sent) :]


def sse(payload: dict | str) -> str:
    """One server-sent event."""
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n"


def chunk(common: dict, chat: bool, i: int, piece: str | None, finish: str | None) -> str:
    """An OpenAI streaming chunk of choice `i`: a text piece, or its finish reason; for chat a
    None piece without a finish reason opens the assistant's message."""
    if chat:
        delta = {"content": piece} if piece is not None else {}
        if piece is None and finish is None:
            delta = {"role": "assistant", "content": ""}
        choice = {"index": i, "delta": delta, "logprobs": None, "finish_reason": finish}
        kind = "chat.completion.chunk"
    else:
        choice = {"index": i, "text": piece or "", "logprobs": None, "finish_reason": finish}
        kind = "text_completion"
    return sse({**common, "object": kind, "choices": [choice]})


def feeder(pieces: asyncio.Queue) -> Callable[[int, str], None]:
    """A streamed request's `emit(j, piece)`: called on the decoder's side, it queues the piece
    of its row j for the event loop (dropped once the loop has closed, at shutdown)."""
    loop = asyncio.get_running_loop()

    def emit(j: int, piece: str | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed
            loop.call_soon_threadsafe(pieces.put_nowait, (j, piece))

    return emit


async def sse_events(
    future: Future, n: int, pieces: asyncio.Queue, common: dict, chat: bool, timeout_s: float
) -> AsyncIterator[str]:
    """Server-sent events of a request's n choices in OpenAI's chunk format as the decoder
    produces their text (`feeder`), then each one's finish reason (its `future` gives the
    outputs) and `data: [DONE]`; an `error` event instead if decoding fails or times out."""
    loop = asyncio.get_running_loop()
    # Queued after every piece: the decoder settles the future once it has emitted them all.
    future.add_done_callback(lambda _: feeder_done(loop, pieces))
    deadline = loop.time() + timeout_s
    try:
        if chat:
            for i in range(n):
                yield chunk(common, chat, i, None, None)
        ended = False
        while not ended:
            items = [await asyncio.wait_for(pieces.get(), deadline - loop.time())]
            while not pieces.empty():  # what arrived meanwhile leaves as one chunk per choice
                items.append(pieces.get_nowait())
            texts: dict[int, str] = {}
            for item in items:
                if item is None:  # the last item
                    ended = True
                else:
                    texts[item[0]] = texts.get(item[0], "") + item[1]
            for i, text in texts.items():
                yield chunk(common, chat, i, text, None)
        for i, out in enumerate(future.result()):
            yield chunk(common, chat, i, None, out.finish_reason)
        yield sse("[DONE]")
    except TimeoutError:
        yield sse(APIError(504, f"decoding did not finish within {timeout_s:g} s").body())
    except Exception as e:
        log.exception("streamed decoding failed")
        yield sse(APIError(500, f"decoding failed: {type(e).__name__}: {e}").body())
    finally:  # a client that has gone: the decoder skips the request if it has not begun it
        future.cancel()


def feeder_done(loop: asyncio.AbstractEventLoop, pieces: asyncio.Queue) -> None:
    with contextlib.suppress(RuntimeError):
        loop.call_soon_threadsafe(pieces.put_nowait, None)
