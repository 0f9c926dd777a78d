"""The HTTP application: OpenAI-compatible and Triton/KServe v2 routes over one model's engine, with the hardening a
server on a network needs.

- Bounded admission: a request that would exceed the running + queued completions the server admits is answered 503
  with Retry-After, at once (serve/engine.py).
- Bounded bodies: a body over `max_body_bytes` is refused with 413 before it is read whole; more than MAX_HEADERS
  header fields or MAX_HEADER_BYTES of them are refused with 431.
- With an API key, every route but the health checks needs `Authorization: Bearer <key>` (compared in constant time).
- Errors are JSON in OpenAI's shape, 4xx for what the client sent, 500 (with a clean message, the server going on)
  when a model step failed or a bug was hit; a client that disconnects has its request aborted and its KV blocks
  freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastllm._log import logger
from fastllm.serve import openai_api, triton_api
from fastllm.serve.engine import EngineFault, Overloaded, ServingEngine
from fastllm.serve.metrics import ServerMetrics
from fastllm.serve.protocol import error_body
from fastllm.serve.server_state import ClientGone, ServerState

# A request body larger than this is refused (413): a long prompt of 32k tokens is ~200 KB of JSON.
MAX_BODY_BYTES = 8 * 2**20
# Header limits (431 beyond them). h11 only bounds the bytes of a header block that arrives in several reads (16 KiB),
# so a block of 10,000 fields sent in one write was accepted whole; these make the limit the same however it arrives.
MAX_HEADERS = 100
MAX_HEADER_BYTES = 16 * 2**10
# Routes that answer without an API key (load balancers probe them).
PUBLIC_ROUTES = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})


def build_app(serving: ServingEngine, model_name: str, *, api_key: str | None = None,
              aliases: tuple[str, ...] = ("ensemble",), max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server's ASGI app for `serving`'s model, served under `model_name` (and `aliases`, e.g. Triton's
    "ensemble")."""
    check_api_key(api_key)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.shutdown()  # graceful: the engine (its process, or step thread) stops; unfinished requests end

    app = FastAPI(title="fastllm", lifespan=lifespan)
    state = ServerState(serving, model_name, tuple(a for a in aliases if a != model_name))
    state.metrics = ServerMetrics(serving)
    app.state.fastllm = state
    app.include_router(openai_api.router)
    app.include_router(triton_api.router)
    _add_errors(app)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        start = time.perf_counter()
        if api_key is not None and request.url.path not in PUBLIC_ROUTES and not _authorized(request, api_key):
            message = "missing or wrong API key (send `Authorization: Bearer <key>`)"
            body = protocol_error(request.url.path, message, "authentication_error", code="invalid_api_key")
            response = JSONResponse(body, status_code=401)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.observe(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        # Unhealthy once the engine is gone (its process died, or it was shut down): a load balancer routes away.
        if not state.serving.ready:
            return JSONResponse({"status": "engine not running"}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        # Rendered on a worker thread: the engine's gauges take the core's lock, which a running step holds.
        return Response(await asyncio.to_thread(state.metrics.render), media_type="text/plain; version=0.0.4")

    return RequestLimits(app, max_body_bytes)


def check_api_key(api_key: str | None, name: str = "api_key") -> None:
    """ValueError unless `api_key` is None (no authentication) or a token a client can send: an empty key turned
    authentication on and let a bare "Authorization: Bearer" in; one with blanks at its ends matched no header (the
    token is stripped), so every client was locked out."""
    if api_key is not None and (not isinstance(api_key, str) or not api_key or api_key != api_key.strip()):
        raise ValueError(f"{name} must be a non-empty token without leading or trailing blanks (or unset for no "
                         f"authentication), got {api_key!r}")


def _authorized(request: Request, api_key: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def protocol_error(path: str, message: str, kind: str, code: str | None = None) -> dict:
    """An error body in the shape of the protocol `path` belongs to: Triton/KServe v2's clients show
    {"error": message}, OpenAI's read error.message (v2 paths answered a 404, 413 or 431 in OpenAI's shape)."""
    return {"error": message} if path.startswith("/v2") else error_body(message, kind, code=code)


def _add_errors(app: FastAPI) -> None:
    def respond(request: Request, status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(protocol_error(request.url.path, message, kind), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        return respond(request, 400, f"invalid request: {_describe(error.errors())}", "invalid_request_error")

    # Starlette's own HTTPException too: FastAPI raises it for an unknown route (404), a wrong method (405) and a body
    # it cannot decode (400), which would otherwise answer `{"detail": ...}` instead of OpenAI's shape.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        message = str(error.detail)
        if isinstance(error.__cause__, UnicodeDecodeError):
            message = f"the request body is not UTF-8 ({error.__cause__.reason} at byte {error.__cause__.start})"
        return respond(request, error.status_code, message, kind, headers=getattr(error, "headers", None))

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError):
        return respond(request, 400, str(error), "invalid_request_error")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded):
        return respond(request, 503, str(error), "overloaded_error", headers={"Retry-After": "1"})

    @app.exception_handler(EngineFault)
    async def fault(request: Request, error: EngineFault):
        logger.error("fastllm serve: %s %s: %s", request.method, request.url.path, error)
        return respond(request, 500, error.client_message(), "engine_error")

    @app.exception_handler(ClientGone)
    async def gone(request: Request, error: ClientGone):
        return respond(request, 499, str(error), "client_closed_request")

    # Anything else is a bug of the server: still an answer in OpenAI's shape (Starlette's default is a bare text
    # "Internal Server Error"), and the traceback in the log (a route's exception handled here is not re-raised to
    # uvicorn, which would log it).
    @app.exception_handler(Exception)
    async def bug(request: Request, error: Exception):
        logger.error("fastllm serve: %s %s failed", request.method, request.url.path, exc_info=error)
        return respond(request, 500, f"internal server error ({type(error).__name__}); the server goes on",
                       "server_error")


_VALIDATOR_IN_LOC = re.compile(r"function-\w+\[\w+\(\), (.+)\]")


def _describe(errors: list[dict]) -> str:
    """Pydantic's validation errors as one line naming each field (the first five)."""
    problems = []
    for e in errors[:5]:
        if e["type"] == "json_invalid":  # loc is ("body", character offset)
            problems.append(f"the body is not valid JSON: {e.get('ctx', {}).get('error', e['msg'])} at character "
                            f"{e['loc'][-1]}")
        else:  # a union member's loc part names its validator ("function-after[unicode_text(), str]"): keep "str"
            where = ".".join(_VALIDATOR_IN_LOC.sub(r"\1", str(p)) for p in e["loc"][1:])
            problems.append(f"{where or 'body'}: {e['msg']}")
    return "; ".join(problems)


class RequestLimits:
    """Refuse too many or too large header fields (431), and bodies over `max_bytes` (413): by Content-Length up
    front, or as the chunks arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def __getattr__(self, name):  # the wrapped FastAPI app's attributes (state, routes, openapi, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = scope.get("headers") or []
        header_bytes = sum(len(name) + len(value) for name, value in headers)
        if len(headers) > MAX_HEADERS or header_bytes > MAX_HEADER_BYTES:
            await _reply(scope, send, 431, f"request headers too large: {len(headers)} fields, {header_bytes} bytes "
                                           f"(at most {MAX_HEADERS} fields, {MAX_HEADER_BYTES} bytes)")
            return
        declared = dict(headers).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _reply(scope, send, 413, f"request body larger than {self.max_bytes} bytes")
            return
        seen, started, refused = 0, False, False

        async def limited() -> Message:
            # Past the limit, answer 413 here and tell the app the client left: an exception raised through the app
            # would reach its error handlers first (FastAPI turns it into "There was an error parsing the body").
            nonlocal seen, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    refused = True
                    if not started:
                        await _reply(scope, send, 413, f"request body larger than {self.max_bytes} bytes")
                    return {"type": "http.disconnect"}
            return message

        async def send_unless_refused(message: Message) -> None:
            nonlocal started
            if not refused:
                started = True
                await send(message)

        await self.app(scope, limited, send_unless_refused)


async def _reply(scope: Scope, send: Send, status: int, message: str) -> None:
    body = json.dumps(protocol_error(scope.get("path", ""), message, "invalid_request_error")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
