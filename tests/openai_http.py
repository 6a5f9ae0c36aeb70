"""A real HTTP server on 127.0.0.1 that speaks the OpenAI chat-completions protocol and answers
each request by a rule (`reply(user_text) -> (status, text)`): the judge's and synth's HTTP path
(the official `openai` client, retries, error handling) is exercised over a socket, with replies
a capable model would give or the errors a real server returns (400 prompt too long, 429, 500),
without a model. It counts the requests it received."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

Reply = Callable[[str], tuple[int, str]]


class OpenAIHTTP:
    """`with OpenAIHTTP(reply) as server:` ... `server.url` is its /v1 base URL."""

    def __init__(self, reply: Reply):
        self.reply, self.requests = reply, 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # http.server calls it by this name
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with outer.lock:
                    outer.requests += 1
                user = "\n".join(m["content"] for m in body.get("messages", []))
                status, text = outer.reply(user)
                if status == 200:
                    payload = {
                        "id": "chatcmpl-0",
                        "object": "chat.completion",
                        "created": 0,
                        "model": body.get("model", "m"),
                        "choices": [
                            {
                                "index": 0,
                                "message": {"role": "assistant", "content": text},
                                "finish_reason": "stop",
                            }
                        ],
                        "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
                    }
                else:
                    payload = {"error": {"message": text, "type": "invalid_request_error"}}
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args) -> None:  # quiet: the tests read the counts
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def __enter__(self) -> OpenAIHTTP:
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def http_llm_args(url: str) -> list[str]:
    """`jaxlora synth|judge` flags for an OpenAI-compatible endpoint at `url`."""
    return ["--llm-backend", "openai", "--llm-model", "m", "--base-url", url, "--no-progress"]


class HangingUp:
    """A TCP server on 127.0.0.1 that accepts each connection and closes it unanswered (a
    crashed proxy, a server that is not HTTP): a network error other than a refusal."""

    def __init__(self):
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}/v1"
        self.connections = 0
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:  # closed by __exit__
                return
            self.connections += 1
            conn.close()

    def __enter__(self) -> HangingUp:
        return self

    def __exit__(self, *exc) -> None:
        self.sock.close()


def rubric_fields(user: str) -> tuple[str, str, str]:
    """(question, gold, candidate) as the judge's built-in rubric (prompts/judge.txt) quotes
    them, stripped (a field's line is left out when it is empty): what a judge server reads."""
    rest = user.split("[QUESTION]", 1)[1]
    question, rest = rest.split("[GOLD ANSWER]", 1)
    gold, rest = rest.split("[CANDIDATE ANSWER]", 1)
    candidate = rest.split("Reply with a JSON object", 1)[0]
    return question.strip(), gold.strip(), candidate.strip()
