"""An OpenAI-compatible HTTP API over the engine (FastAPI).

    POST /v1/completions        {"model", "prompt", "max_tokens", "temperature", "top_p", "stop", "seed",
                                 "stream", "stream_options" (include_usage), + extensions "top_k",
                                 "repetition_penalty"}
    POST /v1/chat/completions   {"model", "messages", ...same}
    GET  /v1/models, GET /health

One worker thread owns the model (torch is not re-entrant over one cache): it takes every request waiting
at that moment (up to `max_batch`) and decodes them as one batch, sending each one's text back to the event
loop as it is decided. At most `max_queue` requests are in flight (waiting or running); past that a request
gets 429 at once. A streaming client that goes away cancels its request and frees its slot.

Errors follow OpenAI's shape, {"error": {"message", "type", "param", "code"}}; a bad request is a 4xx
with a message naming the field, never a 5xx.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import math
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from longctx.errors import LongctxError
from longctx.infer.chat import ROLES, ChatTemplate, template_for
from longctx.infer.engine import Completion, Engine, EngineSpec
from longctx.infer.engine import Request as EngineRequest
from longctx.infer.sampling import SamplingParams

DISCONNECT_POLL_S = 0.25  # how often a waiting handler checks whether its client is still there
DEFAULT_MAX_BODY = 8 * 2**20  # bytes: a 2M-token prompt as JSON text; bigger bodies get 413 at once


class APIError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type_: str = "invalid_request_error",
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, param=self.param, code=self.code, type_=self.type)


def error_response(
    status: int, message: str, *, param=None, code=None, type_: str = "invalid_request_error"
) -> JSONResponse:
    return JSONResponse(
        {"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status
    )


# -- request parsing -----------------------------------------------------------------------------------
_MISSING = object()


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any = _MISSING) -> Any:
    """body[name] checked against JSON types; bool is never accepted as a number."""
    value = body.get(name, _MISSING)
    if value is _MISSING or value is None:
        if default is _MISSING:
            raise APIError(400, f"'{name}' is required", param=name, code="missing_required_parameter")
        return default
    numeric = {int, float} & set(kinds)
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        words = {
            int: "integer",
            float: "number",
            str: "string",
            bool: "boolean",
            list: "array",
            dict: "object",
        }
        names = "number" if numeric == {int, float} else " or ".join(words[k] for k in kinds)
        raise APIError(
            400,
            f"'{name}' must be of type {names}, got {json.dumps(value)[:60]}",
            param=name,
            code="invalid_type",
        )
    if numeric == {int, float} and float in kinds:
        try:
            value = float(value)  # an integer too large for a float (10**400) overflows here
        except OverflowError:
            raise APIError(400, f"'{name}' is out of range, got a {len(str(value))}-digit number", param=name,
                           code="out_of_range") from None  # fmt: skip
        if not math.isfinite(value):
            raise APIError(
                400, f"'{name}' must be a finite number, got {value}", param=name, code="out_of_range"
            )
    return value


def _text(value: str, name: str) -> str:
    """A string the tokenizer can take: UTF-8 encodable (JSON may carry lone surrogates like "\\ud800")."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise APIError(
            400, f"'{name}' is not valid Unicode text (lone surrogate at position {e.start})", param=name,
            code="invalid_text",
        ) from None  # fmt: skip
    return value


def _in_range(name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    if not (lo <= value <= hi) or (lo_open and value == lo):
        low = f"({lo}" if lo_open else f"[{lo}"
        raise APIError(400, f"'{name}' must be in {low}, {hi}], got {value}", param=name, code="out_of_range")


def _stop_list(body: dict) -> list[str]:
    stop = _get(body, "stop", (str, list), [])
    stop = [stop] if isinstance(stop, str) else stop
    if len(stop) > 8 or not all(isinstance(s, str) and s for s in stop):
        raise APIError(
            400, "'stop' must be a non-empty string or a list of at most 8 non-empty strings", param="stop"
        )
    return [_text(s, "stop") for s in stop]


@dataclass
class Parsed:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    model: str
    include_usage: bool = False  # stream_options.include_usage: a last chunk with the usage


# -- the worker ----------------------------------------------------------------------------------------
@dataclass
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    loop: asyncio.AbstractEventLoop
    on_release: Callable[[], None]  # frees the request's queue slot; runs on the event loop
    # ("delta", str) | ("done", Completion) | ("error", str)
    events: asyncio.Queue = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)
    released: bool = False

    def send(self, kind: str, payload: Any) -> None:
        """From the worker thread. A final event also frees the slot: a streaming response whose client left
        before it started never runs its generator's `finally`, and its slot must not leak."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, (kind, payload))
            if kind != "delta":
                self.loop.call_soon_threadsafe(self.release)
        except RuntimeError:  # the event loop has closed (server shutting down): nobody to tell
            pass

    def release(self) -> None:
        """Free the slot once, whoever gets here first (handler or worker; both on the event loop)."""
        if not self.released:
            self.released = True
            self.on_release()


class Worker:
    """The one thread that runs the model, one batch of waiting jobs at a time."""

    def __init__(self, engine: Engine, max_batch: int):
        self.engine, self.max_batch = engine, max_batch
        self.jobs: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._loop, name="longctx-serve-worker", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        self.jobs.put(job)

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join(timeout=10)

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            batch = [job]
            while len(batch) < self.max_batch:
                try:
                    nxt = self.jobs.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    self.jobs.put(None)  # handle the stop after this batch
                    break
                batch.append(nxt)
            batch = [j for j in batch if not j.cancelled.is_set()]
            if batch:
                self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        """Decode `batch` together. A row that fails alone ends alone (the engine isolates it); a failure of
        the shared forward is retried request by request for those that have streamed nothing yet, so one
        request's trouble never fails the others."""
        sent = {id(j): False for j in batch}

        def on_delta(j: Job):
            def say(d: str) -> None:
                sent[id(j)] = True
                j.send("delta", d)

            return say

        requests = [EngineRequest(j.prompt_ids, j.params, on_delta=on_delta(j), cancelled=j.cancelled.is_set)
                    for j in batch]  # fmt: skip
        try:
            outs = self.engine.run(requests)
        except Exception as e:  # noqa: BLE001 - report to the clients, keep the worker alive
            if len(batch) > 1:
                for j in batch:
                    if sent[id(j)]:
                        j.send("error", _message(e))
                    else:
                        self._run([j])
                return
            batch[0].send("error", _message(e))
            return
        for j, out in zip(batch, outs):
            j.send("error", out.error) if out.finish_reason == "error" else j.send("done", out)


def _message(e: Exception) -> str:
    return str(e) if isinstance(e, LongctxError) else f"internal error: {type(e).__name__}: {e}"


# -- the app -------------------------------------------------------------------------------------------
@dataclass
class ServerState:
    engine: Engine
    model_id: str
    template: ChatTemplate
    api_key: str | None
    max_queue: int
    max_batch: int
    context: int
    max_body_bytes: int = DEFAULT_MAX_BODY
    inflight: int = 0
    created: int = field(default_factory=lambda: int(time.time()))
    worker: Worker | None = None

    def release_slot(self) -> None:
        self.inflight -= 1


def create_app(
    engine: Engine,
    *,
    model_id: str,
    api_key: str | None = None,
    max_queue: int = 64,
    template: ChatTemplate | None = None,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    if engine.tokenizer is None:
        raise LongctxError("the server needs an engine with a tokenizer")
    state = ServerState(
        engine=engine,
        model_id=model_id,
        template=template or template_for(engine.config.extra, engine.tokenizer),
        api_key=api_key,
        max_queue=max_queue,
        max_batch=engine.max_batch,
        context=engine.config.context_length,
        max_body_bytes=max_body_bytes,
    )

    async def lifespan(app: FastAPI):
        state.worker = Worker(engine, engine.max_batch)
        yield
        state.worker.stop()

    app = FastAPI(title="longctx", lifespan=lifespan)
    app.state.longctx = state

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        return error_response(400, f"invalid request: {exc.errors()[:2]}")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), code=str(exc.status_code))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        return error_response(500, f"internal error: {type(exc).__name__}: {exc}", type_="server_error")

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if state.api_key and request.url.path.startswith("/v1"):
            header = request.headers.get("authorization", "")
            token = header[7:] if header.lower().startswith("bearer ") else ""
            if not hmac.compare_digest(token.encode(), state.api_key.encode()):
                return error_response(
                    401,
                    "missing or wrong API key: send 'Authorization: Bearer <key>'",
                    code="invalid_api_key",
                    type_="authentication_error",
                )
        return await call_next(request)

    @app.get("/health")
    async def health():
        return {
            "status": "ok",
            "model": state.model_id,
            "in_flight": state.inflight,
            "max_queue": state.max_queue,
            "prompt_cache": state.engine.prompt_cache_stats(),  # None when off
        }

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": state.model_id,
                    "object": "model",
                    "created": state.created,
                    "owned_by": "longctx",
                    "context_length": state.context,
                }
            ],
        }

    @app.post("/v1/completions")
    async def completions(request: Request):
        body = await _json_body(request)
        prompt = _get(body, "prompt", (str, list))
        if isinstance(prompt, str):
            prompt = _text(prompt, "prompt")
        if isinstance(prompt, list):
            if len(prompt) == 1 and isinstance(prompt[0], str):
                prompt = _text(prompt[0], "prompt")
            elif not all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
                raise APIError(
                    400,
                    "'prompt' must be a string, a list of one string, or a list of token ids "
                    "(one prompt per request)",
                    param="prompt",
                )
        parsed = _parse_common(state, body, prompt, default_max=16, extra_stop=[])
        return await _respond(state, request, parsed, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = await _json_body(request)
        messages = _messages(body)
        try:
            prompt = state.template.render(messages)
        except LongctxError as e:
            raise APIError(400, str(e), param="messages") from None
        parsed = _parse_common(state, body, prompt, default_max=None, extra_stop=state.template.default_stop)
        return await _respond(state, request, parsed, chat=True)

    return app


async def _json_body(request: Request) -> dict:
    limit = request.app.state.longctx.max_body_bytes
    declared = request.headers.get("content-length")
    if declared is not None and (not declared.isdigit() or int(declared) > limit):
        raise APIError(
            413, f"the request body is over {limit} bytes (--max-body-bytes)", code="body_too_large"
        )
    chunks, size = [], 0
    async for chunk in request.stream():  # a body without a length is counted as it arrives
        size += len(chunk)
        if size > limit:
            raise APIError(
                413, f"the request body is over {limit} bytes (--max-body-bytes)", code="body_too_large"
            )
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks))
    except (ValueError, RecursionError) as e:  # bad JSON or UTF-8, a >4300-digit integer, "[[[[..." nesting
        raise APIError(
            400, f"the request body is not valid JSON ({str(e)[:120]})", code="invalid_json"
        ) from None
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_json")
    return body


def _messages(body: dict) -> list[dict[str, str]]:
    messages = _get(body, "messages", (list,))
    if not messages:
        raise APIError(400, "'messages' must be a non-empty array", param="messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ROLES:
            raise APIError(400, f"messages[{i}] needs a 'role' among {', '.join(ROLES)}", param="messages")
        content = m.get("content", "")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            if not all(
                isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                for p in content
            ):
                raise APIError(400, f"messages[{i}].content: only text parts are supported", param="messages")
            content = "".join(p["text"] for p in content)
        if not isinstance(content, str):
            raise APIError(400, f"messages[{i}].content must be a string", param="messages")
        out.append({"role": m["role"], "content": _text(content, f"messages[{i}].content")})
    return out


def _parse_common(
    state: ServerState, body: dict, prompt: str | list[int], *, default_max: int | None, extra_stop: list[str]
) -> Parsed:
    model = _get(body, "model", (str,), state.model_id)
    if model != state.model_id:
        raise APIError(
            404,
            f"unknown model '{model}'; this server serves '{state.model_id}' (GET /v1/models)",
            param="model",
            code="model_not_found",
        )
    n = _get(body, "n", (int,), 1)
    if n != 1:
        raise APIError(400, f"'n' must be 1 (one completion per request), got {n}", param="n")
    if _get(body, "logprobs", (bool, int), False):
        raise APIError(400, "'logprobs' is not supported", param="logprobs")
    engine = state.engine
    try:
        ids = engine.encode(prompt)
    except LongctxError as e:
        raise APIError(400, str(e), param="prompt") from None
    if any(not 0 <= t < engine.config.vocab_size for t in ids):
        raise APIError(400, f"prompt token ids must be in [0, {engine.config.vocab_size})", param="prompt")
    ctx = state.context
    if len(ids) > ctx:
        raise APIError(
            400,
            f"the prompt is {len(ids)} tokens, longer than the model's context of {ctx} tokens",
            param="prompt",
            code="context_length_exceeded",
        )
    room = ctx - len(ids)
    key = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _get(body, key, (int,), min(default_max or 256, room))
    if max_tokens < 1 or max_tokens > room:
        raise APIError(
            400,
            f"'{key}' must be in [1, {room}]: the prompt is {len(ids)} tokens and the model's "
            f"context is {ctx} tokens, got {max_tokens}",
            param=key,
            code="out_of_range",
        )
    temperature = _get(body, "temperature", (int, float), 1.0)
    _in_range("temperature", temperature, 0.0, 2.0)
    top_p = _get(body, "top_p", (int, float), 1.0)
    _in_range("top_p", top_p, 0.0, 1.0, lo_open=True)
    top_k = _get(body, "top_k", (int,), 0)
    _in_range("top_k", top_k, 0, engine.config.vocab_size)
    penalty = _get(body, "repetition_penalty", (int, float), 1.0)
    _in_range("repetition_penalty", penalty, 0.0, 10.0, lo_open=True)
    seed = _get(body, "seed", (int,), None)
    if seed is not None:
        _in_range("seed", seed, -(2**63), 2**64 - 1)  # what a torch.Generator accepts
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), {})
    if options and not stream:
        raise APIError(400, "'stream_options' is only allowed when 'stream' is true", param="stream_options")
    include_usage = _get(options, "include_usage", (bool,), False)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=penalty,
        stop=_stop_list(body) + extra_stop,
        seed=seed,
    )
    return Parsed(ids, params, stream, model, include_usage)


async def _respond(state: ServerState, request: Request, parsed: Parsed, *, chat: bool):
    if state.inflight >= state.max_queue:
        raise APIError(
            429,
            f"the server is busy: {state.inflight} requests in flight (--max-queue "
            f"{state.max_queue}); retry later",
            code="rate_limit_exceeded",
            type_="rate_limit_error",
        )
    state.inflight += 1  # the event loop is single-threaded: check-and-increment cannot race
    job = Job(parsed.prompt_ids, parsed.params, asyncio.get_running_loop(), on_release=state.release_slot)
    state.worker.submit(job)
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    meta = {"id": rid, "created": int(time.time()), "model": parsed.model}
    if parsed.stream:
        return StreamingResponse(
            _sse(state, request, job, meta, chat, parsed.include_usage),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache"},
        )
    done = None
    async for kind, payload in _events(state, request, job):
        if kind != "delta":
            done = payload
    if not isinstance(done, Completion):  # an engine error, or the client left (nobody reads this then)
        return error_response(500, done or "the request was cancelled", type_="server_error")
    return JSONResponse(_final_body(meta, done, chat))


async def _events(state: ServerState, request: Request, job: Job) -> AsyncIterator[tuple[str, Any]]:
    """The job's events until it is done; the slot is freed (and the job cancelled) however this ends."""
    try:
        while True:
            try:
                kind, payload = await asyncio.wait_for(job.events.get(), DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                if await request.is_disconnected():
                    return
                continue
            yield kind, payload
            if kind != "delta":
                return
            if job.events.empty() and await request.is_disconnected():
                return
    finally:
        job.cancelled.set()  # no-op when it finished; stops the worker from decoding for nobody otherwise
        job.release()


async def _sse(
    state: ServerState, request: Request, job: Job, meta: dict, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    obj = "chat.completion.chunk" if chat else "text_completion"

    def event(body: dict) -> str:
        return f"data: {json.dumps(body)}\n\n"

    def chunk(choice: dict) -> str:
        return event({**meta, "object": obj, "choices": [{"index": 0, **choice}]})

    if chat:
        yield chunk({"delta": {"role": "assistant", "content": ""}, "finish_reason": None})
    async for kind, payload in _events(state, request, job):
        if kind == "delta":
            yield chunk(
                {"delta": {"content": payload}, "finish_reason": None}
                if chat
                else {"text": payload, "logprobs": None, "finish_reason": None}
            )
        elif kind == "done":
            reason = _finish_reason(payload)
            yield chunk(
                {"delta": {}, "finish_reason": reason}
                if chat
                else {"text": "", "logprobs": None, "finish_reason": reason}
            )
            if include_usage:  # OpenAI's form: one more chunk, no choices, the usage
                yield event({**meta, "object": obj, "choices": [], "usage": _usage(payload)})
        else:
            yield event({"error": {"message": payload, "type": "server_error"}})
    yield "data: [DONE]\n\n"


def _finish_reason(done: Completion) -> str:
    return "length" if done.finish_reason == "length" else "stop"


def _usage(done: Completion) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": len(done.token_ids),
        "total_tokens": done.prompt_tokens + len(done.token_ids),
        # OpenAI's field for prompt tokens served from a cache (here: the engine's prompt cache)
        "prompt_tokens_details": {"cached_tokens": done.cached_tokens},
    }


def _final_body(meta: dict, done: Completion, chat: bool) -> dict:
    reason, usage = _finish_reason(done), _usage(done)
    if chat:
        choice = {"index": 0, "message": {"role": "assistant", "content": done.text}, "finish_reason": reason}
        return {**meta, "object": "chat.completion", "choices": [choice], "usage": usage}
    choice = {"index": 0, "text": done.text, "logprobs": None, "finish_reason": reason}
    return {**meta, "object": "text_completion", "choices": [choice], "usage": usage}


def load_app(
    ckpt: str,
    spec: EngineSpec | None = None,
    *,
    device: str = "cpu",
    model_id: str | None = None,
    api_key: str | None = None,
    max_queue: int = 64,
    max_body_bytes: int = DEFAULT_MAX_BODY,
) -> FastAPI:
    """The app for a checkpoint (what `longctx serve` runs): its engine configured by `spec`."""
    from pathlib import Path

    from longctx.infer.engine import load_engine

    return create_app(
        load_engine(ckpt, spec, device),
        model_id=model_id or Path(ckpt).resolve().name,
        api_key=api_key,
        max_queue=max_queue,
        max_body_bytes=max_body_bytes,
    )
