"""Every error the gateway returns uses OpenAI's envelope:
``{"error": {"message", "type", "param", "code"}}``, so OpenAI clients raise the usual
exception classes (they map by status code and read ``error.message``)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import grpc
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

RETRY_AFTER_S = 1


class APIError(Exception):
    def __init__(
        self,
        status_code: int,
        message: str,
        type: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        extra: Mapping[str, Any] | None = None,
    ):
        super().__init__(message)
        self.status_code = status_code
        self.message = message
        self.type = type
        self.param = param
        self.code = code
        self.headers = dict(headers or {})
        # Top-level keys next to "error" (e.g. /ready's "backends").
        self.extra = dict(extra or {})

    def body(self) -> dict[str, Any]:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": error, **self.extra}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)


def invalid_request(message: str, *, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, "invalid_request_error", param=param, code=code)


def authentication_error(message: str) -> APIError:
    return APIError(
        401,
        message,
        "authentication_error",
        code="invalid_api_key",
        headers={"WWW-Authenticate": "Bearer"},
    )


def namespace_forbidden(namespace: str) -> APIError:
    return APIError(
        403,
        f"This API key may not use namespace {namespace!r}.",
        "permission_error",
        param="namespace",
        code="namespace_forbidden",
    )


def request_too_large(message: str) -> APIError:
    return APIError(400, message, "invalid_request_error", code="request_too_large")


def model_not_found(model: str) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist.",
        "invalid_request_error",
        param="model",
        code="model_not_found",
    )


def rate_limited(message: str, retry_after_s: int = RETRY_AFTER_S) -> APIError:
    return APIError(
        429,
        message,
        "rate_limit_error",
        code="rate_limit_exceeded",
        headers={"Retry-After": str(retry_after_s)},
    )


def service_unavailable(message: str, *, extra: Mapping[str, Any] | None = None) -> APIError:
    return APIError(503, message, "service_unavailable_error", code="service_unavailable", extra=extra)


def error_from_grpc(err: grpc.aio.AioRpcError) -> APIError:
    """Map a failed verifier call to the HTTP error a client can act on."""
    code, details = err.code(), err.details() or err.code().name
    if code == grpc.StatusCode.INVALID_ARGUMENT:
        return invalid_request(details)
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        return rate_limited(details)
    if code == grpc.StatusCode.UNAVAILABLE:
        return service_unavailable(f"The model backend is unavailable: {details}")
    if code == grpc.StatusCode.DEADLINE_EXCEEDED:
        return APIError(504, "The model backend did not finish in time.", "timeout_error", code="timeout")
    log.error("verifier call failed: %s %r", code.name, details)
    return APIError(500, f"The model backend failed: {details}", "server_error", code="internal_error")


# The tags pydantic puts in an error's location after a list index, for a message of a
# tagged union (schemas.ChatMessage): not part of the path a client sent.
MESSAGE_ROLE_TAGS = {"system", "developer", "user", "assistant", "tool"}


def _field_path(loc: Sequence[str | int]) -> str | None:
    """("body", "messages", 0, "user", "content") -> "messages[0].content"."""
    fields = loc[1:] if loc and loc[0] == "body" else loc
    path = ""
    for previous, part in zip([None, *fields], fields, strict=False):
        if isinstance(part, int):
            path += f"[{part}]"
        elif isinstance(previous, int) and part in MESSAGE_ROLE_TAGS:
            continue
        else:
            path += f".{part}" if path else str(part)
    return path or None


def _location(error: dict[str, Any]) -> tuple[str | int, ...]:
    """Where an error is; for a tagged union's unknown tag, the tag's own field ("role")."""
    loc = tuple(error["loc"])
    if error["type"] in ("union_tag_invalid", "union_tag_not_found"):
        loc += (str(error.get("ctx", {}).get("discriminator", "")).strip("'"),)
    return loc


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if any(error["type"] == "json_invalid" for error in errors):
        return invalid_request("The request body is not valid JSON.")
    if any(tuple(error["loc"]) == ("body",) and isinstance(error.get("input"), bytes) for error in errors):
        # FastAPI parses a body as JSON only when the content type says JSON.
        return invalid_request("The request body must be JSON, sent with `Content-Type: application/json`.")
    described = []
    for error in errors:
        path = _field_path(_location(error))
        described.append(f"{path or 'request body'}: {error['msg']}")
    param = _field_path(_location(errors[0])) if errors else None
    return invalid_request("; ".join(described) or "Invalid request.", param=param)


# The envelope as JSON Schema, for the OpenAPI schema. Keys other than "error" appear
# next to it on some errors (/ready's "backends").
ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}


def _document_errors(app: FastAPI) -> None:
    """Make the app's OpenAPI schema say what the handlers make true: every 4xx and 5xx
    carries the envelope, and invalid requests are 400, not FastAPI's 422."""
    generate = app.openapi

    def error_response(description: str) -> dict[str, Any]:
        return {
            "description": description,
            "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
        }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = generate()  # and FastAPI keeps it as app.openapi_schema
            for path_item in schema["paths"].values():
                for operation in path_item.values():
                    operation["responses"].pop("422", None)
                    operation["responses"]["4XX"] = error_response(
                        "The request is invalid, unauthorised, or refused"
                    )
                    operation["responses"]["5XX"] = error_response("A backend is unavailable or failed")
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for unused in ("HTTPValidationError", "ValidationError"):
                components.pop(unused, None)
            components["Error"] = ERROR_SCHEMA
        return app.openapi_schema

    app.openapi = openapi


def install_error_handlers(app: FastAPI) -> None:
    _document_errors(app)

    async def on_api_error(_: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    async def on_validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    async def on_http_exception(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        # Starlette's own errors: unknown route (404), wrong method (405), ...
        error_type = "invalid_request_error" if exc.status_code < 500 else "server_error"
        return APIError(exc.status_code, str(exc.detail), error_type, headers=exc.headers).response()

    async def on_unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises the exception after this response, so the server logs it.
        return APIError(500, "Internal server error.", "server_error", code="internal_error").response()

    app.add_exception_handler(APIError, on_api_error)
    app.add_exception_handler(RequestValidationError, on_validation_error)
    app.add_exception_handler(StarletteHTTPException, on_http_exception)
    app.add_exception_handler(Exception, on_unexpected)
