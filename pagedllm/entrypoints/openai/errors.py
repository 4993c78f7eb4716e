"""OpenAI's error JSON for every failure, and the exception handlers that produce it.

    {"error": {"message": "...", "type": "invalid_request_error", "param": "max_tokens",
               "code": null}}

User mistakes (ValueError, pydantic validation, unknown route) become 4xx; an engine failure
becomes 500; a server still loading or draining answers 503. No traceback ever reaches a client.
"""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from pagedllm.engine.admission import QueueFullError
from pagedllm.engine.async_llm import (
    EngineDeadError,
    EngineNotReadyError,
    RequestAbortedError,
    StepFailedError,
)
from pagedllm.entrypoints.openai.protocol import ErrorInfo, ErrorResponse

logger = logging.getLogger(__name__)

# HTTP status -> OpenAI error type.
ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    404: "not_found_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable_error",
    504: "timeout_error",
}


class OpenAIError(Exception):
    """Raised anywhere in a handler to answer with this status and OpenAI's error JSON."""

    def __init__(
        self,
        message: str,
        status_code: int = 400,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.param = param
        self.code = code
        self.headers = headers


class RequestTimeoutError(RuntimeError):
    """The request did not finish before its deadline (--request-timeout, or the client's)."""


def error_body(
    message: str, status_code: int, param: str | None = None, code: str | None = None
) -> dict[str, Any]:
    error_type = ERROR_TYPES.get(status_code, "invalid_request_error")
    info = ErrorInfo(message=message, type=error_type, param=param, code=code)
    return ErrorResponse(error=info).model_dump()


def error_response(
    message: str,
    status_code: int = 400,
    param: str | None = None,
    code: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(message, status_code, param, code), status_code=status_code, headers=headers
    )


def to_openai_error(exc: BaseException) -> OpenAIError:
    """Map an exception raised while serving a request (streaming or not) to an OpenAIError."""
    if isinstance(exc, OpenAIError):
        return exc
    if isinstance(exc, ValueError):
        return OpenAIError(str(exc), 400)
    if isinstance(exc, QueueFullError):
        return OpenAIError(
            str(exc), 429, code="queue_full", headers={"Retry-After": str(exc.retry_after)}
        )
    if isinstance(exc, RequestTimeoutError):
        return OpenAIError(str(exc), 504, code="request_timeout")
    if isinstance(exc, RequestAbortedError):
        return OpenAIError(str(exc), 503, code="shutting_down")
    if isinstance(exc, EngineNotReadyError):
        return OpenAIError(str(exc), 503, code="model_loading")
    if isinstance(exc, StepFailedError):
        return OpenAIError(str(exc), 500, code="step_failed")
    if isinstance(exc, EngineDeadError):
        return OpenAIError(str(exc), 500, code="engine_dead")
    logger.error("internal error while serving a request", exc_info=exc)
    return OpenAIError("internal server error", 500)


def validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """-> (message, param) for the first pydantic / JSON error of a request body."""
    errors = exc.errors()
    if not errors:
        return "invalid request", None
    err = errors[0]
    loc = [str(x) for x in err.get("loc", ()) if x != "body"]
    if err.get("type") == "json_invalid":
        detail = (err.get("ctx") or {}).get("error", "")
        return f"request body is not valid JSON: {detail}".rstrip(": "), None
    if not loc:
        if err.get("type") == "missing":
            return "request body must be a JSON object", None
        return f"request body: {err.get('msg')}", None
    # Union branches show up in the location as type names ("list[int]"); drop them.
    path = [x for x in loc if not _is_type_tag(x)]
    param = ".".join(path) or None
    message = f"{param}: {err.get('msg')}" if param else str(err.get("msg"))
    if len(path) < len(loc):
        message = f"{param}: matches none of the accepted types (e.g. {err.get('msg')})"
    elif len(errors) > 1:
        message += f" (and {len(errors) - 1} more error{'s' if len(errors) > 2 else ''})"
    return message, param


def _is_type_tag(loc_part: str) -> bool:
    return any(c in loc_part for c in "[]|") or loc_part in ("str", "int", "float", "bool")


def install_error_handlers(app: FastAPI) -> None:
    async def on_openai_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, OpenAIError)
        return error_response(exc.message, exc.status_code, exc.param, exc.code, exc.headers)

    async def on_validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        message, param = validation_message(exc)
        return error_response(message, 400, param)

    async def on_http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, StarletteHTTPException)
        messages = {
            404: f"route {request.method} {request.url.path} not found",
            405: f"method {request.method} not allowed for {request.url.path}",
        }
        message = messages.get(exc.status_code, str(exc.detail))
        codes = {408: "request_timeout", 413: "request_too_large", 503: "shutting_down"}
        code = codes.get(exc.status_code)
        return error_response(message, exc.status_code, code=code, headers=exc.headers)

    async def on_other_error(request: Request, exc: Exception) -> JSONResponse:
        err = to_openai_error(exc)
        return error_response(err.message, err.status_code, err.param, err.code, err.headers)

    app.add_exception_handler(OpenAIError, on_openai_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_error)
    for exc_type in (
        ValueError,
        QueueFullError,
        RequestTimeoutError,
        EngineNotReadyError,
        EngineDeadError,
        RequestAbortedError,
        Exception,
    ):
        app.add_exception_handler(exc_type, on_other_error)
