"""A scripted OpenAI-compatible judge server on 127.0.0.1, for tests and offline demos of ``posttrain filter``.

Its verdicts are a deterministic function of the prompt it receives: a pointwise score from the prompt's sha256,
and for pairwise rubrics the longer response wins (or, in ``always_first`` mode, whichever is shown first). It
counts requests per prompt on the server side and can be told to fail: return HTTP 500 for a number of requests
or always, send an unreadable body, answer with text that holds no verdict, or answer slowly. It is a real HTTP
server (``http.server`` in threads) but it is not a model: never point a real filter run at it.
"""

from __future__ import annotations

import argparse
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self

from posttrain.provenance import bytes_digest

_SECTION = re.compile(r"\[Response A\]\n(.*?)\n\n\[Response B\]\n(.*?)\n\nAnswer with", re.DOTALL)


def prompt_key(content: str) -> str:
    return bytes_digest(content)


def pointwise_score(content: str) -> int:
    """1..10 from the prompt's hash: the same prompt always gets the same score."""
    return int(prompt_key(content)[:8], 16) % 10 + 1


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        if isinstance(sys.exc_info()[1], ConnectionError):  # a client killed mid-request (the resume test does that)
            return
        super().handle_error(request, client_address)


class ScriptedJudgeServer:
    """Serves inside a ``with`` block; set the public attributes to script failures; read the counters to check
    clients."""

    def __init__(self, port: int = 0) -> None:
        self.lock = threading.Lock()
        self.delay_s = 0.0  # sleep before answering
        self.fail_next = 0  # answer this many requests with HTTP 500, then recover
        self.always_fail = False
        self.fail_status = 500  # the status of scripted failures (429 comes with Retry-After: 0)
        self.garbage_body = False  # HTTP 200 with a body that is not JSON
        self.garbage_verdict = False  # valid API response whose text holds no verdict
        self.always_first = False  # pairwise: always prefer the response shown first
        self.requests: Counter[str] = Counter()  # prompt key -> requests received
        self.answered: Counter[str] = Counter()  # prompt key -> verdicts sent back
        self.in_flight = 0
        self.max_in_flight = 0
        server = self

        class Handler(BaseHTTPRequestHandler):
            disable_nagle_algorithm = True  # headers and body are two writes: the body must not wait for an ACK

            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, status: int, body: bytes, content_type: str = "application/json") -> None:
                self.send_response(status)
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                self.wfile.flush()

            def do_GET(self) -> None:
                if self.path.rstrip("/") == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted-judge",
                                                                             "object": "model"}]}).encode())
                else:
                    self._send(404, b'{"error": "not found"}')

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                try:
                    body = json.loads(self.rfile.read(length))
                    content = body["messages"][-1]["content"]
                except (ValueError, KeyError, IndexError, TypeError):
                    self._send(400, b'{"error": "bad request"}')
                    return
                if self.path.rstrip("/") != "/v1/chat/completions":
                    self._send(404, b'{"error": "not found"}')
                    return
                key = prompt_key(content)
                with server.lock:
                    server.requests[key] += 1
                    server.in_flight += 1
                    server.max_in_flight = max(server.max_in_flight, server.in_flight)
                    fail = server.always_fail or server.fail_next > 0
                    if server.fail_next > 0:
                        server.fail_next -= 1
                try:
                    if server.delay_s:
                        time.sleep(server.delay_s)
                    if fail:
                        self._send(server.fail_status, b'{"error": "scripted failure"}')
                        return
                    if server.garbage_body:
                        self._send(200, b'{"choices": [{"message": {"content": "unterminated')
                        return
                    text = server.verdict(content)
                    reply = {"id": "scripted", "object": "chat.completion", "model": body.get("model", ""),
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": text}}]}
                    self._send(200, json.dumps(reply).encode())
                    with server.lock:
                        server.answered[key] += 1
                finally:
                    with server.lock:
                        server.in_flight -= 1

        self.httpd = _QuietServer(("127.0.0.1", port), Handler)
        self.httpd.daemon_threads = True
        self.port = self.httpd.server_address[1]
        self.base_url = f"http://127.0.0.1:{self.port}/v1"

    def verdict(self, content: str) -> str:
        if self.garbage_verdict:
            return "I would rather not say."
        match = _SECTION.search(content)
        if match:
            if self.always_first:
                return json.dumps({"winner": "A", "rationale": "the first response is better"})
            a, b = match.group(1), match.group(2)
            winner = "A" if len(a) > len(b) else "B" if len(b) > len(a) else "tie"
            return json.dumps({"winner": winner, "rationale": "the longer response is more complete"})
        score = pointwise_score(content)
        return json.dumps({"score": score, "rationale": f"scripted score {score}"})

    def __enter__(self) -> Self:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--delay-s", type=float, default=0.0)
    args = parser.parse_args()
    server = ScriptedJudgeServer(args.port)
    server.delay_s = args.delay_s
    print(server.base_url, flush=True)
    server.httpd.serve_forever()


if __name__ == "__main__":
    main()
