"""API keys (`API_KEYS`), or the host app's own login (`identify`), and request ids.

With keys configured, every endpoint but the public ones wants `Authorization: Bearer <key>`.
Keys are compared in constant time and never logged: logs and the store know a key by its id,
the first characters of its SHA-256. Without keys the service is open, for local use. In a host
app, `identify()` names the owner of the request's conversations instead (a logged-in user's id):
no owner, no answer.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Callable

from flask import Blueprint, Flask, g, request

from .errors import ApiError

PUBLIC_ENDPOINTS = {"healthz", "metrics", "static"}
PUBLIC_BLUEPRINTS = {"ui"}
_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


def key_id(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def endpoint() -> str:
    """The request's endpoint within the `streaming` blueprint (whose hooks are the only ones
    that ask): `healthz`, `chat.chat_sse`, ..."""
    return (request.endpoint or "").removeprefix("streaming.")


def public() -> bool:
    """Whether the request is for an endpoint anyone may use."""
    if request.endpoint is None:
        return True
    last = endpoint().rsplit(".", 1)[-1]
    return last in PUBLIC_ENDPOINTS or (request.blueprint or "").rsplit(".", 1)[-1] in PUBLIC_BLUEPRINTS


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


def init_app(app: Flask | Blueprint, api_keys: str, identify: Callable[[], object] | None = None,
             metrics_key: str = "") -> str:
    """Check every request of `app` (the service's blueprint); return how: "api_key", "open" or
    "identify".

    With keys, `/metrics` wants one of them or METRICS_KEY (a key for monitoring alone), and
    `/healthz` tells its details (provider, store, streams in flight) only to such a key: anyone
    may ask whether the service is alive, and whether it wants keys (the page asks that)."""
    keys = [] if identify else [key.strip().encode() for key in api_keys.split(",") if key.strip()]
    monitors = keys + ([metrics_key.strip().encode()] if metrics_key.strip() else [])

    @app.before_request
    def authenticate() -> None:
        incoming = request.headers.get("X-Request-Id", "")
        g.request_id = incoming if _REQUEST_ID.fullmatch(incoming) else secrets.token_hex(16)
        g.key_id = ""
        g.may_inspect = not keys
        if identify is not None:
            owner = identify()
            if owner is None and not public():
                raise ApiError(401, "unauthorized", "sign in first")
            g.key_id = "" if owner is None else str(owner)
            return
        if not monitors:  # open, and no key for /metrics either: nothing to check
            return
        name = endpoint()
        if name == "metrics":
            bearer_key(monitors)
            return
        if name == "healthz" and keys and "Authorization" in request.headers:
            try:
                g.may_inspect = bool(bearer_key(monitors))
            except ApiError:  # a wrong key gets what anyone gets
                pass
            return
        if not keys or public():
            return
        g.key_id = key_id(bearer_key(keys).decode())

    @app.after_request
    def tag(response):
        response.headers["X-Request-Id"] = g.get("request_id", "")
        return response

    return "identify" if identify else "api_key" if keys else "open"
