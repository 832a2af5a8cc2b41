"""Errors before a stream starts: always JSON `{"error": {"code", "message"}}` with a 4xx/5xx.

(Failures after a stream started are events; see `engine`.)
"""

from __future__ import annotations

import logging

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from .providers.base import ProviderError
from .store import StoreUnavailable

log = logging.getLogger(__name__)

HTTP_CODES = {404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}


def error_response(status: int, code: str, message: str, headers: dict | None = None):
    response = jsonify(error={"code": code, "message": message})
    response.status_code = status
    response.headers.update(headers or {})
    return response


def http_error_fields(exc: HTTPException) -> tuple[int, str, str, dict]:
    """Status, code, message and headers (a 405's `Allow`) for one of Werkzeug's HTTP errors."""
    status = exc.code or 500
    code = HTTP_CODES.get(status, "invalid_request" if status < 500 else "internal_error")
    headers = {name: value for name, value in exc.get_headers() if name == "Allow"}
    return status, code, exc.description or exc.name, headers


def store_unavailable(exc: StoreUnavailable) -> ApiError:
    return ApiError(503, "store_unavailable", "the conversation store is unavailable; please retry",
                    {"Retry-After": "2"})


def init_app(app: Flask) -> None:
    @app.errorhandler(ApiError)
    def api_error(exc: ApiError):
        return error_response(exc.status, exc.code, exc.message, exc.headers)

    @app.errorhandler(ProviderError)
    def provider_error(exc: ProviderError):
        return error_response(exc.status, exc.code, exc.message)

    @app.errorhandler(StoreUnavailable)
    def store_error(exc: StoreUnavailable):
        return api_error(store_unavailable(exc))

    @app.errorhandler(HTTPException)
    def http_error(exc: HTTPException):
        return error_response(*http_error_fields(exc))

    @app.errorhandler(Exception)
    def unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, "internal_error", "the server failed to answer; see its log")
