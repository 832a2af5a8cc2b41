"""API keys (`API_KEYS`) and request ids.

With keys configured, every endpoint but the public ones wants `Authorization: Bearer <key>`.
Keys are compared in constant time and never logged: logs and the store know a key by its id,
the first characters of its SHA-256. Without keys the service is open, for local use.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import uuid

from flask import Flask, g, request

from .errors import ApiError

PUBLIC_ENDPOINTS = {"healthz", "static"}
PUBLIC_BLUEPRINTS = {"ui"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def bearer_key(allowed: list[bytes]) -> bytes:
    """The request's key, one of `allowed`; a 401 otherwise."""
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        raise ApiError(401, "unauthorized", "an API key is required: send 'Authorization: Bearer <key>'")
    given = token.strip().encode()
    matched = [key for key in allowed if hmac.compare_digest(given, key)]  # every key, every time
    if not matched:
        raise ApiError(401, "unauthorized", "the API key is not valid")
    return matched[0]


def init_app(app: Flask, api_keys: str, metrics_key: str = "") -> None:
    """With keys, `/metrics` wants one of them or METRICS_KEY (a key for monitoring alone), and
    `/healthz` tells its details (provider, store, streams in flight) only to such a key: anyone
    may ask whether the service is alive, and whether it wants keys (the page asks that)."""
    keys = [key.strip().encode() for key in api_keys.split(",") if key.strip()]
    monitors = keys + ([metrics_key.strip().encode()] if metrics_key.strip() else [])
    app.config["AUTH"] = "api_key" if keys else "open"

    @app.before_request
    def identify() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        g.key_id = ""
        g.may_inspect = not keys
        if request.endpoint == "metrics" and monitors:
            bearer_key(monitors)
            return
        if request.endpoint == "healthz" and keys and "Authorization" in request.headers:
            try:
                g.may_inspect = bool(bearer_key(monitors))
            except ApiError:  # a wrong key gets what anyone gets
                pass
            return
        if not keys or request.endpoint is None or request.endpoint in PUBLIC_ENDPOINTS:
            return
        if request.blueprint in PUBLIC_BLUEPRINTS:
            return
        g.key_id = key_id(bearer_key(keys).decode())

    @app.after_request
    def tag(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response
