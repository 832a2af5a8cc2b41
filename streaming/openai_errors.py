"""Errors in OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`, with the status
that the SDK maps to its exception classes; `code` is this service's stable code. Shared by the
`/v1` blueprints (Chat Completions, Responses): `init_app(bp)` makes them a blueprint's errors."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

from flask import Blueprint, Response, jsonify
from werkzeug.exceptions import HTTPException

from .errors import ApiError, http_error_fields, store_unavailable
from .params import invalid
from .providers.base import ProviderError
from .store import StoreUnavailable

log = logging.getLogger(__name__)

_TYPES = {401: "authentication_error", 403: "permission_error", 429: "rate_limit_error"}


def openai_error(
    status: int, code: str, message: str, param: str | None = None, headers: dict | None = None
) -> Response:
    if code == "model_not_found":  # OpenAI's status for it; the service's own endpoints answer 400
        status = 404
    error_type = _TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    response = jsonify(error={"message": message, "type": error_type, "param": param, "code": code})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def bad(param: str, message: str) -> ApiError:
    """A 400 about the request field `param`."""
    exc = invalid(message)
    exc.param = param
    return exc


@contextmanager
def about(param: str) -> Iterator[None]:
    """Name the request field that an `ApiError` raised inside is about (OpenAI's `param`)."""
    try:
        yield
    except ApiError as exc:
        exc.param = getattr(exc, "param", None) or param
        raise


def api_error(exc: ApiError) -> Response:
    return openai_error(exc.status, exc.code, exc.message, getattr(exc, "param", None), exc.headers)


def provider_error(exc: ProviderError) -> Response:
    return openai_error(exc.status, exc.code, exc.message)


def store_error(exc: StoreUnavailable) -> Response:
    return api_error(store_unavailable(exc))


def http_error(exc: HTTPException) -> Response:
    status, code, message, headers = http_error_fields(exc)
    return openai_error(status, code, message, headers=headers)


def unexpected(exc: Exception) -> Response:
    log.exception("unhandled error")
    return openai_error(500, "internal_error", "the server failed to answer; see its log")


def init_app(bp: Blueprint) -> None:
    """Answer every error of `bp`'s views in OpenAI's shape."""
    for kind, handler in ((ApiError, api_error), (ProviderError, provider_error), (StoreUnavailable, store_error),
                          (HTTPException, http_error), (Exception, unexpected)):
        bp.register_error_handler(kind, handler)
