"""The OpenAI-compatible HTTP face of an `EngineRunner`: `POST /v1/chat/completions` (JSON or a server-sent event
stream), `GET /v1/models`, `GET /health` and `GET /metrics` (Prometheus text).

Every bad request gets a 4xx with OpenAI's error object and a message that says what was wrong; nothing a client
sends reaches the engine unchecked, so one client cannot fail another's request. A client that disconnects cancels
its request. With an API key, every route but /health needs `Authorization: Bearer KEY`."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException

from leanvlm.config import IMAGE_TOKEN
from leanvlm.data.templates import with_image_placeholders
from leanvlm.inference.engine import ImageInput
from leanvlm.inference.runner import EngineRunner, QueueFull
from leanvlm.serve.images import ImageSources, image_bytes
from leanvlm.serve.protocol import ChatCompletionRequest, completion_id, error_body, now

log = logging.getLogger(__name__)


class BadRequest(Exception):
    def __init__(self, message: str, status: int = 400, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code


def create_app(runner: EngineRunner, model_name: str, *, api_key: str | None = None, max_images: int = 4,
               max_body_bytes: int = 32 << 20, image_sources: ImageSources = ImageSources()) -> FastAPI:
    """The app; the engine thread starts with the app and stops with it."""

    @asynccontextmanager
    async def lifespan(app):
        runner.start()
        yield
        runner.stop()

    app = FastAPI(title="leanvlm", lifespan=lifespan)
    app.add_middleware(BodyLimit, max_bytes=max_body_bytes)
    if api_key is not None:
        app.add_middleware(ApiKey, key=api_key)

    @app.exception_handler(BadRequest)
    async def bad_request(request, exc: BadRequest):
        return error(exc.status, str(exc), exc.kind, exc.code)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, exc: RequestValidationError):
        return error(400, "; ".join(_describe(e) for e in exc.errors()[:5]))

    @app.exception_handler(HTTPException)
    async def http_error(request, exc: HTTPException):
        return error(exc.status_code, str(exc.detail), "not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.exception_handler(Exception)
    async def crashed(request, exc: Exception):
        log.exception("Unhandled error in %s", request.url.path)
        return error(500, "The server failed on this request; see its log.", "server_error")

    @app.get("/health")
    async def health():
        if not runner.alive():
            return error(503, "The engine thread has stopped; restart the server.", "server_error")
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": 0,
                                            "owned_by": "leanvlm"}]}

    @app.get("/metrics")
    async def metrics():
        engine = runner.engine
        return PlainTextResponse(engine.metrics.prometheus(engine.image_cache),
                                 media_type="text/plain; version=0.0.4")

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        if body.model != model_name:
            raise BadRequest(f"Unknown model {body.model!r}; this server serves {model_name!r} (GET /v1/models).",
                             404, "not_found_error", "model_not_found")
        problem = body.unsupported()
        if problem:
            raise BadRequest(problem)
        engine_request = await _engine_request(runner, body, max_images, image_sources)
        outputs = runner.generate(engine_request)
        try:
            first = await _unless_disconnected(anext(outputs), request)
        except QueueFull as exc:
            raise BadRequest(str(exc), 429, "rate_limit_error") from exc
        if first is None:  # the client left while its request waited or was prefilled
            await outputs.aclose()
            return error(499, "The client closed the request.")
        reply = dict(id=completion_id(), created=now(), model=model_name)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(first, outputs, reply, include_usage), media_type="text/event-stream")
        return await _whole(first, outputs, reply, request)

    return app


def error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, kind, code=code), status_code=status)


def _describe(problem: dict) -> str:
    where = ".".join(str(part) for part in problem.get("loc", ()) if part != "body")
    if problem.get("type") == "json_invalid":
        return "The request body is not valid JSON."
    return f"{where or 'body'}: {problem.get('msg', 'invalid')}"


async def _engine_request(runner: EngineRunner, body: ChatCompletionRequest, max_images: int,
                          sources: ImageSources):
    """The chat as the engine's request: images resolved and decoded (off the event loop), the model's template
    applied, sampling parameters checked. Every problem is a BadRequest."""
    messages, urls = [], []
    for index, message in enumerate(body.messages):
        parts = [message.content or ""] if not isinstance(message.content, list) else message.content
        texts = [p if isinstance(p, str) else p.text for p in parts if isinstance(p, str) or p.type == "text"]
        images = [p.image_url.url for p in parts if not isinstance(p, str) and p.type == "image_url"]
        if any(IMAGE_TOKEN in text for text in texts):
            raise BadRequest(f"messages.{index}: the text may not contain {IMAGE_TOKEN}; send images as image_url "
                             "parts.")
        if images and message.role != "user":
            raise BadRequest(f"messages.{index}: only user messages may carry images.")
        urls += images
        role = "system" if message.role == "developer" else message.role
        messages.append({"role": role, "content": with_image_placeholders(texts, len(images))})
    if messages[-1]["role"] != "user":
        raise BadRequest("The last message must be the user's.")
    if len(urls) > max_images:
        raise BadRequest(f"{len(urls)} images in one request; this server takes at most {max_images}.")
    try:
        images = [await asyncio.to_thread(_decoded, url, sources) for url in urls]
        engine = runner.engine
        try:  # on the event loop: one thread uses the processor's tokenizer
            prompt = engine.chat_prompt(messages)
        except Exception as exc:  # the model's chat template refuses this conversation (jinja2 errors)
            raise BadRequest(f"The model's chat template refuses these messages: {exc}") from exc
        greedy = body.temperature is not None and body.temperature == 0
        return engine.request(
            prompt, images, max_new_tokens=body.max_completion_tokens or body.max_tokens,
            do_sample=not greedy, temperature=1.0 if body.temperature is None or greedy else body.temperature,
            top_p=body.top_p, top_k=body.top_k if body.top_k and body.top_k > 0 else None, seed=body.seed,
            stop=tuple(body.stop_strings()),
            stop_token_ids=tuple(body.stop_token_ids or ()), ignore_eos=body.ignore_eos)
    except ValueError as exc:
        raise BadRequest(str(exc)) from exc


async def _unless_disconnected(awaitable, request: Request):
    """The awaitable's result, or None once the client has disconnected (the awaitable is then cancelled, which
    cancels the engine request)."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.1)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            return None


def _decoded(url: str, sources: ImageSources) -> ImageInput:
    return ImageInput.from_bytes(image_bytes(url, sources))


async def _whole(first, outputs, reply: dict, request: Request) -> JSONResponse:
    """Collect the answer; stop (and cancel it) if the client goes away."""

    async def collect():
        pieces, last = [first.text], first
        async for output in outputs:
            pieces.append(output.text)
            last = output
        return "".join(pieces), last

    if first.finish_reason is not None:
        text, last = first.text, first
    else:
        collected = await _unless_disconnected(collect(), request)
        if collected is None:
            return error(499, "The client closed the request.")
        text, last = collected
    _check_engine(last)
    return JSONResponse({
        **reply, "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                     "finish_reason": last.finish_reason, "logprobs": None}],
        "usage": _usage(last),
    })


async def _stream(first, outputs, reply: dict, include_usage: bool):
    """Server-sent events: the role, the text as it comes, the finish reason, optionally the usage, [DONE]."""

    def event(choices: list, **extra) -> str:
        return f"data: {json.dumps({**reply, 'object': 'chat.completion.chunk', 'choices': choices, **extra})}\n\n"

    try:
        yield event([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        output = first
        while True:
            if output.finish_reason == "error":
                yield f"data: {json.dumps(error_body('The engine failed on this request.', 'server_error'))}\n\n"
                break
            if output.text:
                yield event([{"index": 0, "delta": {"content": output.text}, "finish_reason": None}])
            if output.finish_reason is not None:
                yield event([{"index": 0, "delta": {}, "finish_reason": output.finish_reason}])
                if include_usage:
                    yield event([], usage=_usage(output))
                break
            output = await anext(outputs)
        yield "data: [DONE]\n\n"
    finally:
        await outputs.aclose()  # a client that left early cancels the request here


def _check_engine(last) -> None:
    if last.finish_reason == "error":
        raise BadRequest("The engine failed on this request; see the server log.", 500, "server_error")


def _usage(output) -> dict:
    return {"prompt_tokens": output.prompt_tokens, "completion_tokens": output.completion_tokens,
            "total_tokens": output.prompt_tokens + output.completion_tokens}


class ApiKey:
    """Refuses (401) every request but /health without `Authorization: Bearer KEY`. Plain ASGI, like `BodyLimit`:
    Starlette's function middleware would hide a client's disconnect from the route."""

    def __init__(self, app, key: str):
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers") or []).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await error(401, "Missing or wrong API key: send the header 'Authorization: Bearer KEY'.",
                                   "authentication_error", "invalid_api_key")(scope, receive, send)
        return await self.app(scope, receive, send)


class BodyLimit:
    """Refuses request bodies over `max_bytes` (413), by their declared length or as they stream in."""

    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error(413, self._message())(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:  # an HTTPException: FastAPI turns others raised here into a 400
                    raise HTTPException(413, self._message())
            return message

        return await self.app(scope, counted, send)

    def _message(self) -> str:
        return f"The request body is larger than the server's limit of {self.max_bytes} bytes."
