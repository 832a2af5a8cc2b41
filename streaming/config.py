"""Settings, read once from the environment (12-factor): one place for every name and default.

This module imports nothing but the standard library, so that `gunicorn.conf.py` can use it in
the master process without importing anything that gevent must patch first.
"""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields


@dataclass(frozen=True)
class Settings:
    llm_provider: str = "demo"
    llm_model: str = ""
    openai_api_key: str = ""
    openai_base_url: str = ""
    anthropic_api_key: str = ""
    anthropic_base_url: str = ""
    anthropic_max_tokens: int = 4096  # the Messages API wants a limit: this one when a request sets none
    anthropic_thinking_tokens: int = 0  # extended thinking's budget (reasoning events); 0: off
    database_url: str = ""
    database_pool_size: int = 4  # PostgreSQL connections per worker process
    redis_url: str = ""  # live answers, stops and rate limits shared by every host through Redis
    redis_pool_size: int = 8  # Redis connections per worker process (its pubsub and XREAD take one more each)
    redis_verify_tls: int = 1  # 0: accept a rediss:// server's self-signed certificate (Heroku Redis)
    redis_stream_ttl_s: float = 600.0  # how long an ended answer's Redis Stream is kept for reconnects
    rate_limit_per_min: int = 0  # requests per minute per API key; 0: off
    lease_s: float = 15.0  # a streaming turn whose worker has not renewed it for this long is lost
    first_token_timeout_s: float = 60.0
    idle_timeout_s: float = 60.0
    max_stream_s: float = 600.0
    heartbeat_s: float = 15.0
    resume_grace_s: float | None = None  # unset: twice SSE_RETRY_MS, so that a blip resumes the answer
    sse_retry_ms: int = 3000
    max_prompt_chars: int = 32_000
    max_body_bytes: int = 1_000_000
    history_chars: int = 100_000
    max_batch: int = 16
    max_batch_concurrency: int = 8
    api_keys: str = ""  # comma-separated; empty: open, for local use
    metrics_key: str = ""  # a key for /metrics alone (any API key also reads it)
    allow_open: int = 0  # 1: a real model may serve beyond loopback with no API_KEYS
    host: str = ""  # unset: loopback, or every interface on a platform (PORT set)
    port: int = 0  # set by the platform (Heroku); unset: 8000
    control_socket: str = ""  # gunicorn's control socket, off unless this names a path
    max_streams_per_key: int = 32  # 0: no limit (nor its count, a read of every streaming row)
    max_streams_per_worker: int = 1000  # 0: no limit
    graceful_timeout_s: float = 30.0
    demo_ttft_ms: float = 200.0
    demo_tokens_per_s: float = 30.0
    demo_tokens: int = 60
    demo_fail_after: int | None = None
    demo_hang_after: int | None = None
    demo_models: str = ""  # comma-separated names the demo also answers to (names that tools hard-code)
    worker_class: str = "gevent"

    def __post_init__(self) -> None:
        if self.resume_grace_s is None:  # an EventSource waits `retry` before it reconnects
            object.__setattr__(self, "resume_grace_s", 2 * self.sse_retry_ms / 1000)

    @property
    def bind(self) -> str:
        """gunicorn's `bind`. A platform sets PORT and routes to every interface; a run without
        it is someone's own machine, where only this machine should reach the service."""
        host = self.host or ("0.0.0.0" if self.port else "127.0.0.1")
        if ":" in host and not host.startswith("["):  # an IPv6 address
            host = f"[{host}]"
        return f"{host}:{self.port or 8000}"

    def access(self, hosts: list[str]) -> str:
        """Who may use the service listening on `hosts`, for the start-up log."""
        if self.api_keys.strip():
            return "API keys required"
        if all(is_loopback(host) for host in hosts):
            return "open to this machine only (no API_KEYS)"
        return "open to anyone who reaches it (no API_KEYS)"

    def refusal(self, hosts: list[str]) -> str | None:
        """Why the service must not start listening on `hosts`, or None: a real model with no
        API_KEYS beyond loopback lets anyone who reaches the port spend its key."""
        exposed = [host for host in hosts if not is_loopback(host)]
        if self.llm_provider == "demo" or self.api_keys.strip() or self.allow_open or not exposed:
            return None
        return (f"refusing to start: LLM_PROVIDER={self.llm_provider} with no API_KEYS would be open to anyone who"
                f" reaches {', '.join(exposed)}; set API_KEYS, listen on loopback (HOST=127.0.0.1),"
                " or set ALLOW_OPEN=1 if it is meant to be open")

    @classmethod
    def from_config(cls, config: Mapping, environ: os._Environ | dict | None = None) -> Settings:
        """Each field from a Flask app's config (the same upper-case names, any value that reads
        back as the field's type), else from the environment."""
        environ = os.environ if environ is None else environ
        names = {field.name.upper() for field in fields(cls)}
        given = {name: str(value) for name, value in config.items() if name in names and value is not None}
        return cls.from_env({**environ, **given})

    @classmethod
    def from_env(cls, environ: os._Environ | dict | None = None) -> Settings:
        """Each field from the upper-cased variable of the same name, when it is set and not empty."""
        environ = os.environ if environ is None else environ
        values = {}
        for field in fields(cls):
            raw = environ.get(field.name.upper(), "").strip()
            if not raw:
                continue
            kind = field.type.split(" |")[0]
            try:
                values[field.name] = {"int": int, "float": float}.get(kind, str)(raw)
            except ValueError:
                raise ValueError(f"{field.name.upper()} must be a {kind}, not {raw!r}") from None
        return cls(**values)


def is_loopback(host: str) -> bool:
    """Whether only this machine can reach `host`. A name other than localhost may resolve to
    anything, so it counts as reachable from outside."""
    host = host.strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
