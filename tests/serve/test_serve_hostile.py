"""The server under hostile input: every malformed request class is a 4xx naming the field (never a 5xx),
valid requests batched with bad ones all succeed with the answers they get alone, the keep-alive
connection survives errors, and an over-large body is refused at once while /health keeps answering."""

from __future__ import annotations

import concurrent.futures as futures
import json
import socket
import time

import httpx
import pytest
from serve_helpers import TIMEOUT, ControlledEngine, _model, _Server

from longctx.data.tokenizer import ByteTokenizer
from longctx.infer.engine import Engine
from longctx.infer.sampling import SamplingParams
from longctx.serve.app import create_app

LIMIT = 64 * 1024
OK = {"model": "tiny", "prompt": "Hello", "max_tokens": 6, "temperature": 0}


@pytest.fixture(scope="module")
def server():
    engine = ControlledEngine(_model(), ByteTokenizer(), max_batch=16)
    s = _Server(create_app(engine, model_id="tiny", max_queue=64, max_body_bytes=LIMIT))
    yield s, engine
    s.stop()


def _raw(field: str, text: str, path: str = "completions", base=None) -> bytes:
    body = dict(base or OK)
    body.pop(field, None)
    return (json.dumps(body)[:-1] + f', "{field}": {text}}}').encode()


BIG = "9" * 5000
# (endpoint, raw JSON body, the field or words the message must name)
COMPLETIONS = [
    (_raw("temperature", "NaN"), "temperature"),
    (_raw("top_p", "NaN"), "top_p"),
    (_raw("repetition_penalty", "NaN"), "repetition_penalty"),
    (_raw("temperature", "Infinity"), "temperature"),
    (_raw("temperature", "-Infinity"), "temperature"),
    (_raw("temperature", "1" + "0" * 400), "temperature"),  # an integer too large for a float
    (_raw("temperature", "1e400"), "temperature"),
    (_raw("seed", str(2**64)), "seed"),
    (_raw("seed", str(-(2**70))), "seed"),
    (_raw("seed", "10" + "0" * 29), "seed"),
    (_raw("seed", "1.5"), "seed"),
    (_raw("max_tokens", BIG), "JSON"),  # past Python's 4300-digit integer limit
    (_raw("max_tokens", "9" * 4000), "max_tokens"),
    (_raw("max_tokens", "0"), "max_tokens"),
    (_raw("max_tokens", "-3"), "max_tokens"),
    (_raw("max_tokens", "true"), "max_tokens"),
    (_raw("top_k", "-1"), "top_k"),
    (_raw("top_k", str(10**30)), "top_k"),
    (_raw("prompt", '"ab\\ud800cd"'), "prompt"),  # a lone surrogate
    (_raw("prompt", '["ab\\udfffcd"]'), "prompt"),
    (_raw("prompt", "[-1]"), "prompt"),
    (_raw("prompt", "[1.5]"), "prompt"),
    (_raw("prompt", "{}"), "prompt"),
    (_raw("prompt", "null"), "prompt"),
    (_raw("stop", '"x\\ud800"'), "stop"),
    (_raw("stop", '[""]'), "stop"),
    (_raw("stop", "[" + ",".join(['"a"'] * 9) + "]"), "stop"),
    (_raw("stream", "1"), "stream"),
    (_raw("stream", "NaN"), "stream"),
    (_raw("model", "5"), "model"),
    (_raw("n", "3"), "n"),
    (_raw("logprobs", "5"), "logprobs"),
    (b"[" * 60_000, "JSON"),  # a nesting bomb (under the body limit, far past any recursion limit)
    (b"{" * 50_000, "JSON"),
    (b'{"model": "tiny", "prompt": "Hi"', "JSON"),
    (b"\xff\xfe\x00garbage", "JSON"),
    (b"[1, 2, 3]", "object"),
    (b'"just a string"', "object"),
    (b"", "JSON"),
]
CHAT_BASE = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
CHAT = [
    (_raw("messages", '[{"role": "user", "content": "ab\\ud800cd"}]', base=CHAT_BASE), "messages[0].content"),
    (
        _raw("messages", '[{"role": "user", "content": [{"type": "text", "text": 5}]}]', base=CHAT_BASE),
        "messages",
    ),
    (_raw("messages", '[{"role": "user"}, 5]', base=CHAT_BASE), "messages"),
    (_raw("messages", '[{"content": "x"}]', base=CHAT_BASE), "role"),
    (_raw("temperature", "NaN", base=CHAT_BASE), "temperature"),
    (_raw("messages", "[" * 60_000, base=CHAT_BASE), "JSON"),
]


def _post(url: str, body: bytes, client=None) -> httpx.Response:
    post = client.post if client is not None else httpx.post
    return post(url, content=body, headers={"Content-Type": "application/json"}, timeout=TIMEOUT)


@pytest.mark.parametrize(("body", "needle"), COMPLETIONS, ids=range(len(COMPLETIONS)))
def test_malformed_completion_requests_are_4xx(server, body, needle):
    r = _post(server[0].url + "/v1/completions", body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert needle in r.json()["error"]["message"], r.text


@pytest.mark.parametrize(("body", "needle"), CHAT, ids=range(len(CHAT)))
def test_malformed_chat_requests_are_4xx(server, body, needle):
    r = _post(server[0].url + "/v1/chat/completions", body)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert needle in r.json()["error"]["message"], r.text


def test_a_bad_stream_request_is_a_400_not_a_200_with_an_error_event(server):
    body = _raw("temperature", "NaN", base={**OK, "stream": True})
    r = _post(server[0].url + "/v1/completions", body)
    assert r.status_code == 400 and "temperature" in r.json()["error"]["message"]


def test_valid_requests_batched_with_bad_ones_all_succeed(server):
    """8 valid requests (different prompts and seeds) and the bad classes, sent together while the engine
    is held, so they queue up and decode as batches: every valid one gets exactly its solo answer."""
    url, engine = server[0].url, server[1]
    reference = Engine(_model(), ByteTokenizer())
    valid = [{**OK, "prompt": f"Item {i}:", "temperature": 0.8, "seed": i, "max_tokens": 8} for i in range(8)]
    want = [reference.generate(v["prompt"], SamplingParams(max_tokens=8, temperature=0.8, seed=v["seed"])).text
            for v in valid]  # fmt: skip
    bodies = [json.dumps(v).encode() for v in valid] + [b for b, _ in COMPLETIONS[:12]]
    engine.gate.clear()
    try:
        with futures.ThreadPoolExecutor(len(bodies)) as pool:
            jobs = [pool.submit(_post, url + "/v1/completions", b) for b in bodies]
            time.sleep(0.5)  # all of them queued behind the gate
            engine.gate.set()
            results = [j.result() for j in jobs]
    finally:
        engine.gate.set()
    for r, w in zip(results[: len(valid)], want):
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["text"] == w
    assert all(400 <= r.status_code < 500 for r in results[len(valid) :])
    assert server[0].health()["in_flight"] == 0


def test_the_keep_alive_connection_survives_errors(server):
    with httpx.Client(timeout=TIMEOUT) as client:
        for body, _ in COMPLETIONS[:10]:
            assert _post(server[0].url + "/v1/completions", body, client).status_code < 500
            good = _post(server[0].url + "/v1/completions", json.dumps(OK).encode(), client)
            assert good.status_code == 200, good.text


def test_an_over_large_body_is_refused_at_once_and_health_answers(server):
    url = server[0].url
    big = b'{"prompt": "' + b"x" * (2 * LIMIT) + b'"}'
    r = _post(url + "/v1/completions", big)
    assert r.status_code == 413 and "--max-body-bytes" in r.json()["error"]["message"]
    # a body that announces no length, sent slowly: refused once it passes the limit; health meanwhile
    host, port = "127.0.0.1", int(url.rsplit(":", 1)[1])
    with socket.create_connection((host, port), timeout=TIMEOUT) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                     b"Content-Type: application/json\r\n\r\n")  # fmt: skip
        chunk = b"x" * 8192
        t0 = time.monotonic()
        assert httpx.get(url + "/health", timeout=TIMEOUT).json()["status"] == "ok"
        assert time.monotonic() - t0 < 2.0
        for _ in range(2 * LIMIT // len(chunk)):
            sock.sendall(b"%x\r\n" % len(chunk) + chunk + b"\r\n")
        reply = sock.recv(4096)
    assert reply.startswith(b"HTTP/1.1 413"), reply[:200]
