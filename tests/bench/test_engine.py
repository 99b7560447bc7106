"""The engine client against an HTTP server speaking the OpenAI streaming protocol (vLLM's own server is started
for real by `scripts/benchmark.sh`; it takes minutes to compile, which CI cannot afford)."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from draftapprox.bench import engine
from draftapprox.errors import InputError


class _Streaming(BaseHTTPRequestHandler):
    count_offset = 0

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.server.seen.append(body)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.end_headers()
        for i in range(body["max_tokens"]):
            time.sleep(0.05 if i == 0 else 0.01)
            chunk = {"choices": [{"index": 0, "text": f"t{i}"}]}
            self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
            self.wfile.flush()
        usage = {"prompt_tokens": len(body["prompt"]) + self.count_offset, "completion_tokens": body["max_tokens"]}
        self.wfile.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\ndata: [DONE]\n\n".encode())

    def log_message(self, *args):
        pass


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Streaming)
    httpd.seen = []
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()


def test_stream_once_times_the_first_token_and_the_rest(server):
    url = f"http://127.0.0.1:{server.server_address[1]}"
    measured = engine.stream_once(url, [1, 2, 3, 4], 5)
    assert measured["new_tokens"] == 5
    assert 0.04 <= measured["first_token"] < 1.0
    assert 0.005 <= measured["decode_per_token"] < 0.2
    sent = server.seen[0]
    assert sent["prompt"] == [1, 2, 3, 4] and sent["ignore_eos"] and sent["stream"] and sent["temperature"] == 0


def test_an_engine_that_miscounts_the_prompt_is_refused(server, monkeypatch):
    monkeypatch.setattr(_Streaming, "count_offset", 1)
    url = f"http://127.0.0.1:{server.server_address[1]}"
    with pytest.raises(InputError, match="counted 5 prompt tokens, we sent 4"):
        engine.stream_once(url, [1, 2, 3, 4], 2)


def test_a_missing_environment_is_named(tmp_path):
    with pytest.raises(InputError, match="setup-peer vllm"), engine.serving(tmp_path, "float32", tmp_path / "log",
                                                                            cache=tmp_path):
        pass
