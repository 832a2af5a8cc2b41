"""Stream LLM answers out of a Flask app, token by token, under gunicorn."""

from __future__ import annotations

import logging

from flask import Flask, jsonify

from . import auth, batch, chat, conversations, errors, limits, metrics, openai_api, ui
from .config import Settings
from .live import open_live_log
from .providers import load_provider
from .respond import stream_response
from .store import StoreUnavailable, open_store
from .threads import under_gevent
from .turns import Service, log_streams_to_stdout, service

__all__ = ["create_app", "stream_response"]


def create_app(settings: Settings | None = None) -> Flask:
    settings = settings or Settings.from_env()
    app = Flask(__name__, instance_relative_config=True)
    app.config["MAX_CONTENT_LENGTH"] = settings.max_body_bytes
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # httpx logs every request's URL at INFO: OPENAI_BASE_URL, with any credentials in it.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log_streams_to_stdout()
    if under_gevent():  # a log record names its thread: a dummy Thread object made for each greenlet
        logging.logThreads = False
    store = open_store(settings, app.instance_path)
    app.extensions["streaming"] = Service(
        settings=settings, provider=load_provider(settings), store=store, live_log=open_live_log(settings, store)
    )
    errors.init_app(app)
    auth.init_app(app, settings.api_keys)
    limits.init_app(app, settings)
    metrics.init_app(app)
    app.register_blueprint(chat.bp)
    app.register_blueprint(conversations.bp)
    app.register_blueprint(batch.bp)
    app.register_blueprint(openai_api.bp)
    app.register_blueprint(ui.bp)

    @app.before_request
    def leases() -> None:
        service().ensure_running()

    @app.get("/healthz")
    def healthz():
        svc = service()
        store = {"name": svc.store.name, "reachable": True, "writable": True}
        try:
            svc.store.check(svc.worker)
        except StoreUnavailable as exc:
            store.update(reachable=False, writable=False, error=str(exc))
        response = jsonify(
            status="ok" if store["writable"] else "unavailable",
            auth=app.config["AUTH"],
            provider=svc.provider.name,
            model=svc.provider.default_model,
            store=store,
            **svc.live_log.check(),
            worker_class=settings.worker_class,
            streams_in_flight=len(svc.live),
        )
        return response, 200 if store["writable"] else 503

    return app
