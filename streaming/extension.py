"""`LLMStreaming`: the service as a Flask extension, mounted in a host app under a prefix.

Everything is one blueprint made for each app (`streaming`, with the chat, batch,
conversations and `/v1` endpoints, `/healthz`, `/metrics` and the page nested in it), so that
its hooks and error handlers (API keys or `identify`, rate limits, JSON errors, the request body
limit) hold for its own requests only, never for the host's; and the app's `Service` (settings,
provider, store, answers in flight) lives in `app.extensions["streaming"]`, so that two apps in
one process keep theirs apart. `create_app()` is this extension mounted at the root of an app
of its own.
"""

from __future__ import annotations

from collections.abc import Callable

from flask import Blueprint, Flask, g, jsonify, request

from . import auth, batch, chat, conversations, errors, limits, metrics, openai_api, responses_api, ui
from .config import Settings
from .live import open_live_log
from .providers import load_provider
from .providers.base import Provider
from .store import Store, StoreUnavailable, open_store
from .turns import Service, service


class LLMStreaming:
    """Mount the chat API in `app` (now, or later with `init_app`).

    Settings come from `app.config` (the environment variables' names: `LLM_PROVIDER`,
    `DATABASE_URL`, `HEARTBEAT_S`, ...), then from the environment. `provider` and `store`, when
    given, are used instead of those that the settings name. `identify()`, called in each
    request, returns the owner of the request's conversations (the logged-in user's id), or
    None for nobody (a 401), in place of API keys. `page=False` leaves the chat page out."""

    def __init__(
        self,
        app: Flask | None = None,
        *,
        url_prefix: str = "",
        provider: Provider | None = None,
        store: Store | None = None,
        identify: Callable[[], object] | None = None,
        page: bool = True,
    ) -> None:
        self.url_prefix = url_prefix.rstrip("/")
        self.provider = provider
        self.store = store
        self.identify = identify
        self.page = page
        if app is not None:
            self.init_app(app)

    def init_app(self, app: Flask) -> None:
        settings = Settings.from_config(app.config)
        store = self.store or open_store(settings, app.instance_path)
        app.extensions["streaming"] = Service(
            settings=settings, provider=self.provider or load_provider(settings), store=store,
            live_log=open_live_log(settings, store), url_prefix=self.url_prefix,
        )
        app.register_blueprint(self.blueprint(settings), url_prefix=self.url_prefix or None)

    def blueprint(self, settings: Settings) -> Blueprint:
        bp = Blueprint("streaming", __name__, static_folder="static", template_folder="templates",
                       static_url_path="/static")
        errors.init_app(bp)
        auth_mode = auth.init_app(bp, settings.api_keys, self.identify, settings.metrics_key)
        limits.init_app(bp, settings)
        metrics.init_app(bp)
        children = (chat.bp, conversations.bp, batch.bp, openai_api.bp, responses_api.bp)
        for child in (*children, *([ui.bp] if self.page else [])):
            bp.register_blueprint(child)

        @bp.before_request
        def per_request() -> None:
            request.max_content_length = settings.max_body_bytes  # this blueprint's, not the host's
            service().ensure_running()

        @bp.get("/healthz")
        def healthz():
            svc = service()
            store = {"name": svc.store.name, "reachable": True, "writable": True}
            try:
                svc.store.check(svc.worker)
            except StoreUnavailable as exc:
                store.update(reachable=False, writable=False, error=str(exc))
            details = {}
            if g.may_inspect:  # not to anyone, with API_KEYS set: only whether it is alive and wants keys
                details = dict(
                    provider=svc.provider.name,
                    model=svc.provider.default_model,
                    store=store,
                    **svc.live_log.check(),
                    worker_class=settings.worker_class,
                    streams_in_flight=len(svc.live),
                )
            status = "ok" if store["writable"] else "unavailable"
            return jsonify(status=status, auth=auth_mode, **details), 200 if store["writable"] else 503

        return bp
