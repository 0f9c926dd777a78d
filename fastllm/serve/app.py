"""The HTTP application: OpenAI-compatible and Triton/KServe v2 routes over one model's engine, with the hardening a
server on a network needs.

- Bounded admission: a request that would exceed the running + queued completions the server admits is answered 503
  with Retry-After, at once (serve/engine.py).
- Bounded bodies: a body over `max_body_bytes` is refused with 413 before it is read whole.
- With an API key, every route but the health checks needs `Authorization: Bearer <key>` (compared in constant time).
- Errors are JSON in OpenAI's shape, 4xx for what the client sent, 500 (with a clean message, the server going on)
  when a model step failed; a client that disconnects has its request aborted and its KV blocks freed.
"""

from __future__ import annotations

import contextlib
import hmac
import time

from fastapi import FastAPI, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from fastllm.serve import openai_api, triton_api
from fastllm.serve.engine import EngineFault, Overloaded, ServingEngine
from fastllm.serve.metrics import ServerMetrics
from fastllm.serve.protocol import error_body
from fastllm.serve.server_state import ClientGone, ServerState

# A request body larger than this is refused (413): a long prompt of 32k tokens is ~200 KB of JSON.
MAX_BODY_BYTES = 8 * 2**20
# Routes that answer without an API key (load balancers probe them).
PUBLIC_ROUTES = frozenset({"/health", "/v2/health/live", "/v2/health/ready"})


def build_app(serving: ServingEngine, model_name: str, *, api_key: str | None = None,
              aliases: tuple[str, ...] = ("ensemble",), max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The server's ASGI app for `serving`'s model, served under `model_name` (and `aliases`, e.g. Triton's
    "ensemble")."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        serving.shutdown()  # graceful: the step thread stops, unfinished requests end with "abort"

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
            response = JSONResponse(error_body("missing or wrong API key (send `Authorization: Bearer <key>`)",
                                               "authentication_error", code="invalid_api_key"), status_code=401)
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        state.metrics.observe(getattr(route, "path", "unmatched"), response.status_code, time.perf_counter() - start)
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    return BodyLimit(app, max_body_bytes)


def _authorized(request: Request, api_key: str) -> bool:
    given = request.headers.get("authorization", "")
    scheme, _, token = given.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), api_key.encode())


def _add_errors(app: FastAPI) -> None:
    def respond(status: int, message: str, kind: str, headers: dict | None = None) -> JSONResponse:
        return JSONResponse(error_body(message, kind), status_code=status, headers=headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, error: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}"
                             for e in error.errors()[:5])
        return respond(400, f"invalid request: {problems}", "invalid_request_error")

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return respond(error.status_code, str(error.detail), kind)

    @app.exception_handler(ValueError)
    async def bad_value(request: Request, error: ValueError):
        return respond(400, str(error), "invalid_request_error")

    @app.exception_handler(Overloaded)
    async def overloaded(request: Request, error: Overloaded):
        return respond(503, str(error), "overloaded_error", headers={"Retry-After": "1"})

    @app.exception_handler(EngineFault)
    async def fault(request: Request, error: EngineFault):
        return respond(500, f"the request failed in the engine and was ended ({error}); the server goes on",
                       "engine_error")

    @app.exception_handler(ClientGone)
    async def gone(request: Request, error: ClientGone):
        return respond(499, str(error), "client_closed_request")


class BodyLimit:
    """Refuse bodies over `max_bytes` with 413: by Content-Length up front, or as the chunks arrive."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app, self.max_bytes = app, max_bytes

    def __getattr__(self, name):  # the wrapped FastAPI app's attributes (state, routes, openapi, ...)
        return getattr(self.app, name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or {}).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            await _reply_413(send, self.max_bytes)
            return
        seen = 0

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await _reply_413(send, self.max_bytes)


class _TooLarge(Exception):
    pass


async def _reply_413(send: Send, max_bytes: int) -> None:
    import json

    body = json.dumps(error_body(f"request body larger than {max_bytes} bytes", "invalid_request_error")).encode()
    await send({"type": "http.response.start", "status": 413,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})
