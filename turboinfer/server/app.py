"""The FastAPI app: routes, API-key check, and errors in OpenAI's shape.

User input never causes a 500: malformed JSON, wrong types, unknown or unsupported parameters and
out-of-range values are 400s that name the parameter. A 500 means a bug; it is still answered in
OpenAI's shape and logged with its traceback."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import HTMLResponse, Response

from turboinfer.server.metrics import ServerMetrics
from turboinfer.server.protocol import APIError, ChatCompletionRequest, CompletionRequest
from turboinfer.server.serving import OpenAIServing, json_response

logger = logging.getLogger("turboinfer.server")
STATIC = Path(__file__).parent / "static"
TYPE_TAGS = {"str", "int", "float", "bool", "dict", "list", "none"}  # pydantic's union-member loc entries


def build_app(async_engine, served_model_name: str, api_key: str | None = None, max_waiting: int | None = None,
              *, max_tokens_limit: int | None = None, model_aliases: tuple[str, ...] = (),
              shutdown_engine: bool = True) -> FastAPI:
    """An app serving `async_engine`. When `shutdown_engine`, the app's shutdown (uvicorn's, on SIGTERM,
    after in-flight responses finished or were cancelled) aborts what is left and stops the engine thread."""

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        yield
        if shutdown_engine:
            await asyncio.to_thread(async_engine.shutdown, True)

    app = FastAPI(title="turboinfer", version="0.1.0", lifespan=lifespan,
                  description="OpenAI-compatible completions and chat completions.")
    metrics = ServerMetrics(async_engine)
    serving = OpenAIServing(async_engine, served_model_name, metrics, model_aliases=model_aliases,
                            max_waiting=max_waiting, max_tokens_limit=max_tokens_limit)
    created = int(time.time())
    app.state.async_engine = async_engine
    app.state.metrics = metrics
    if api_key:
        app.add_middleware(_APIKeyMiddleware, api_key=api_key)
    _install_error_handlers(app)

    @app.get("/", include_in_schema=False)
    async def chat_page() -> Response:
        page = STATIC / "index.html"
        if not page.is_file():  # an install that left out the package data
            raise APIError(f"the chat page is not installed ({page} is missing)", status=404)
        return HTMLResponse(page.read_text(encoding="utf-8"), headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> Response:
        if not async_engine.is_running():
            return json_response({"status": "unavailable"}, status=503)
        return json_response({"status": "ok"})

    @app.get("/metrics", include_in_schema=False)
    async def prometheus() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models() -> Response:
        return json_response({"object": "list", "data": [{
            "id": served_model_name, "object": "model", "created": created, "owned_by": "turboinfer",
            "max_model_len": async_engine.max_model_len}]})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request) -> Response:
        return await serving.completions(body, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request) -> Response:
        return await serving.chat(body, request)

    app.openapi = lambda: _openapi(app)
    return app


def _openapi(app: FastAPI) -> dict:
    """FastAPI's schema, with the 400 (OpenAI error object) this app answers where FastAPI documents a 422."""
    if app.openapi_schema is None:
        from fastapi.openapi.utils import get_openapi

        schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
        error = {"description": "OpenAI-style error", "content": {"application/json": {"schema": {
            "type": "object", "required": ["error"], "properties": {"error": {
                "type": "object", "required": ["message", "type", "param", "code"], "properties": {
                    "message": {"type": "string"}, "type": {"type": "string"},
                    "param": {"type": ["string", "null"]}, "code": {"type": ["string", "null"]}}}}}}}}
        for ops in schema.get("paths", {}).values():
            for op in ops.values():
                responses = op.get("responses", {})
                if responses.pop("422", None) is not None:
                    responses["400"] = error
        schema.get("components", {}).get("schemas", {}).pop("HTTPValidationError", None)
        schema.get("components", {}).get("schemas", {}).pop("ValidationError", None)
        app.openapi_schema = schema
    return app.openapi_schema


class _APIKeyMiddleware:
    """`Authorization: Bearer <key>` on every /v1 route, checked before the body is even read."""

    def __init__(self, app, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1"):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                error = APIError("missing or wrong API key: send 'Authorization: Bearer <key>'", status=401,
                                 code="invalid_api_key", type="authentication_error")
                response = json_response(error.body(), 401, {"WWW-Authenticate": "Bearer"})
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError) -> Response:
        return json_response(e.body(), e.status, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, e: RequestValidationError) -> Response:
        message, param = validation_message(e.errors())
        code = "unsupported_parameter" if message.startswith("unrecognized") else None
        return json_response(APIError(message, param=param, code=code).body(), 400)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> Response:
        return json_response(APIError(str(e.detail), status=e.status_code).body(), e.status_code,
                             getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def bug(request: Request, e: Exception) -> Response:
        logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=e)
        return json_response(APIError("internal server error", status=500, code="internal_error").body(), 500)


def validation_message(errors) -> tuple[str, str | None]:
    """pydantic/FastAPI errors -> one readable sentence and the first offending parameter."""
    extra: list[str] = []
    by_path: dict[str, list[str]] = {}
    for err in errors:
        kind = err.get("type", "")
        loc = [x for x in err.get("loc", ()) if x != "body"]
        if kind == "json_invalid":
            return f"the body is not valid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}", None
        path = _path(loc)
        if not path and kind in ("model_attributes_type", "dict_type", "missing"):
            return "the request body must be a JSON object", None
        if kind == "extra_forbidden":
            extra.append(path)
            continue
        msgs = by_path.setdefault(path, [])
        msg = str(err.get("msg", "invalid value"))
        if msg not in msgs:
            msgs.append(msg)
    if extra:
        return f"unrecognized request argument(s): {', '.join(extra[:10])}", extra[0]
    if not by_path:
        return "invalid request", None
    parts = [f"{path or 'body'}: {' or '.join(m[:3])}" for path, m in list(by_path.items())[:5]]
    return "invalid request: " + "; ".join(parts), next(iter(by_path)) or None


def _path(loc) -> str:
    out = ""
    for x in loc:
        if isinstance(x, int):
            out += f"[{x}]"
        elif isinstance(x, str) and (x in TYPE_TAGS or "[" in x):
            continue  # which union member pydantic tried: not part of the parameter's name
        else:
            out += ("." if out else "") + str(x)
    return out
