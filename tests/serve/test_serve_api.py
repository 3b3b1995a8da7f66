"""The real server (uvicorn on a free 127.0.0.1 port) driven by the official `openai` client and raw httpx:
answers equal the engine's, streaming equals non-streaming, bad requests get 4xx, auth gets 401, the queue
bound gets 429, and a client leaving mid-stream frees its slot."""

import threading
import time

import httpx
import openai
import pytest
from serve_helpers import TIMEOUT, ControlledEngine, _model, _Server

from longctx.checkpoint import save_checkpoint
from longctx.data.tokenizer import ByteTokenizer
from longctx.infer.chat import ChatTemplate
from longctx.infer.engine import Engine
from longctx.infer.sampling import SamplingParams
from longctx.serve.app import create_app, load_app

KEY = "test-key"


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """The app as `longctx serve` builds it, from a checkpoint directory, with an API key."""
    path = save_checkpoint(tmp_path_factory.mktemp("serve") / "tiny", _model())
    server = _Server(load_app(str(path), api_key=KEY, max_queue=16))
    yield server
    server.stop()


@pytest.fixture(scope="module")
def reference():
    return Engine(_model(), ByteTokenizer())


@pytest.fixture(scope="module")
def client(served):
    return openai.OpenAI(base_url=served.url + "/v1", api_key=KEY, max_retries=0, timeout=TIMEOUT)


def test_completion_equals_engine(client, reference):
    out = client.completions.create(model="tiny", prompt="Hello", max_tokens=12, temperature=0)
    want = reference.generate("Hello", SamplingParams(max_tokens=12))
    assert out.choices[0].text == want.text
    assert out.choices[0].finish_reason == ("length" if want.finish_reason == "length" else "stop")
    assert out.usage.prompt_tokens == 5 and out.usage.completion_tokens == len(want.token_ids)
    seeded = dict(model="tiny", prompt="Hi", max_tokens=10, temperature=0.9, top_p=0.9, seed=4)
    want = reference.generate("Hi", SamplingParams(max_tokens=10, temperature=0.9, top_p=0.9, seed=4))
    assert client.completions.create(**seeded).choices[0].text == want.text


def test_streaming_usage_on_request(client, served):
    """stream_options.include_usage: the last chunk has no choices and the usage a non-streamed answer has;
    stream_options without stream is a 400."""
    kw = dict(model="tiny", prompt="Once upon", max_tokens=9, temperature=0)
    whole = client.completions.create(**kw)
    chunks = list(client.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens == 9
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])
    assert "".join(c.choices[0].text for c in chunks[:-1]) == whole.choices[0].text
    r = httpx.post(served.url + "/v1/completions", json={**kw, "stream_options": {"include_usage": True}},
                   headers={"Authorization": f"Bearer {KEY}"}, timeout=TIMEOUT)  # fmt: skip
    assert r.status_code == 400 and "stream_options" in r.json()["error"]["message"]


def test_streaming_equals_non_streaming(client):
    kw = dict(model="tiny", prompt="Once upon", max_tokens=20, temperature=0.7, seed=1)
    whole = client.completions.create(**kw).choices[0].text
    chunks = list(client.completions.create(**kw, stream=True))
    assert "".join(c.choices[0].text for c in chunks) == whole
    assert chunks[-1].choices[0].finish_reason in ("length", "stop")


def test_chat_uses_the_template(client, reference):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    out = client.chat.completions.create(model="tiny", messages=messages, max_tokens=15, temperature=0)
    prompt = ChatTemplate(None).render(messages)
    assert prompt == "<|system|>\nBe brief.\n<|user|>\nHi!\n<|assistant|>\n"
    want = reference.generate(prompt, SamplingParams(max_tokens=15, stop=["<|"]))
    assert out.choices[0].message.content == want.text
    assert out.choices[0].message.role == "assistant"
    stream = client.chat.completions.create(
        model="tiny", messages=messages, max_tokens=15, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream) == want.text


def test_models_health_and_auth(served, client):
    assert [m.id for m in client.models.list()] == ["tiny"]
    assert served.health()["status"] == "ok"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}):
        r = httpx.get(served.url + "/v1/models", headers=headers, timeout=TIMEOUT)
        assert r.status_code == 401 and "API key" in r.json()["error"]["message"]
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="nope", max_retries=0, timeout=TIMEOUT)
    with pytest.raises(openai.AuthenticationError):
        bad.completions.create(model="tiny", prompt="x", max_tokens=2)


@pytest.mark.parametrize(
    "body, status, needle",
    [
        (b'{"model": "tiny", "prompt": "Hel', 400, "not valid JSON"),
        (b"[1, 2]", 400, "JSON object"),
        ({"model": "gpt-4", "prompt": "Hi"}, 404, "unknown model 'gpt-4'"),
        ({"model": "tiny", "prompt": "x" * 200}, 400, "200 tokens, longer than the model's context of 128"),
        ({"model": "tiny", "prompt": "Hi", "max_tokens": 0}, 400, "'max_tokens' must be in [1, 126]"),
        ({"model": "tiny", "prompt": "Hi", "max_tokens": 127}, 400, "context is 128 tokens"),
        ({"model": "tiny", "prompt": "Hi", "max_tokens": "5"}, 400, "'max_tokens' must be of type integer"),
        ({"model": "tiny", "prompt": "Hi", "max_tokens": True}, 400, "integer"),
        (
            {"model": "tiny", "prompt": "Hi", "temperature": "hot"},
            400,
            "'temperature' must be of type number",
        ),
        ({"model": "tiny", "prompt": "Hi", "temperature": 3}, 400, "'temperature' must be in"),
        ({"model": "tiny", "prompt": "Hi", "top_p": 0}, 400, "'top_p'"),
        ({"model": "tiny", "prompt": "Hi", "stream": "yes"}, 400, "'stream'"),
        ({"model": "tiny", "prompt": "Hi", "stop": [1]}, 400, "'stop'"),
        ({"model": "tiny", "prompt": "Hi", "n": 2}, 400, "'n' must be 1"),
        ({"model": "tiny", "prompt": [1, "a"]}, 400, "'prompt'"),
        ({"model": "tiny", "prompt": [999]}, 400, "token ids must be in"),
        ({"model": "tiny"}, 400, "'prompt' is required"),
    ],
)
def test_bad_completion_requests_are_4xx(served, body, status, needle):
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    kw = {"content": body} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(served.url + "/v1/completions", headers=headers, timeout=TIMEOUT, **kw)
    assert r.status_code == status, r.text
    assert needle in r.json()["error"]["message"]


@pytest.mark.parametrize(
    "body, needle",
    [
        ({"model": "tiny", "messages": []}, "non-empty"),
        ({"model": "tiny", "messages": "hi"}, "'messages' must be of type array"),
        ({"model": "tiny", "messages": [{"role": "wizard", "content": "x"}]}, "role"),
        ({"model": "tiny", "messages": [{"role": "user", "content": 5}]}, "content"),
        ({"model": "tiny", "messages": [{"role": "user", "content": "x" * 300}]}, "longer than the model's"),
    ],
)
def test_bad_chat_requests_are_4xx(served, body, needle):
    r = httpx.post(
        served.url + "/v1/chat/completions",
        json=body,
        timeout=TIMEOUT,
        headers={"Authorization": f"Bearer {KEY}"},
    )
    assert r.status_code == 400, r.text
    assert needle in r.json()["error"]["message"]
    assert served.health()["status"] == "ok"


@pytest.fixture()
def controlled():
    engine = ControlledEngine(_model(), ByteTokenizer())
    server = _Server(create_app(engine, model_id="tiny", max_queue=2))
    yield server, engine
    engine.gate.set()
    server.stop()


def test_queue_bound_gives_429(controlled):
    server, engine = controlled
    engine.gate.clear()  # the worker takes the first request and waits; the second waits in the queue
    results = []

    def post():
        r = httpx.post(
            server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=TIMEOUT
        )
        results.append(r.status_code)

    threads = [threading.Thread(target=post) for _ in range(2)]
    for t in threads:
        t.start()
    server.wait_in_flight(2)
    r = httpx.post(server.url + "/v1/completions", json={"prompt": "Hi", "max_tokens": 3}, timeout=TIMEOUT)
    assert r.status_code == 429 and "busy" in r.json()["error"]["message"]
    engine.gate.set()
    for t in threads:
        t.join(TIMEOUT)
    assert results == [200, 200]
    server.wait_in_flight(0)


def test_disconnect_mid_stream_frees_the_slot(controlled):
    server, engine = controlled
    engine.step_delay = 0.02  # 120 tokens would take > 2 s: the client leaves long before
    body = {"prompt": "Hi", "max_tokens": 120, "stream": True}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=TIMEOUT) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))  # streaming has begun
    server.wait_in_flight(0)
    deadline = time.monotonic() + TIMEOUT
    while not engine.finished:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert engine.finished == ["cancelled"]  # the worker stopped decoding for nobody
