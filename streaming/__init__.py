"""Stream LLM answers out of a Flask app, token by token, under gunicorn.

Importing the package configures nothing: `create_app()` makes the service's own app (and sets
up its logging), `LLMStreaming` mounts the service in a host app, `stream_response()` streams
any generator from a host app's view."""

from __future__ import annotations

import logging

from flask import Flask

from . import errors
from .config import Settings
from .extension import LLMStreaming
from .respond import stream_response
from .threads import under_gevent
from .turns import log_streams_to_stdout

__all__ = ["LLMStreaming", "create_app", "stream_response"]


def create_app(settings: Settings | None = None) -> Flask:
    """The service on its own: the extension mounted at the root of an app whose settings come
    from the environment (or `settings`), with JSON errors for every path."""
    app = Flask(__name__, instance_relative_config=True, static_folder=None)
    if not logging.getLogger().handlers:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        # A record finds the source line that made it by walking the stack, for every stream's log
        # line: no format here shows it (the Logging HOWTO's "Optimization" turns that off so).
        logging._srcfile = None
        # httpx logs every request's URL at INFO: OPENAI_BASE_URL, with any credentials in it.
        for name in ("httpx", "httpx2"):
            logging.getLogger(name).setLevel(logging.WARNING)
    log_streams_to_stdout()
    if under_gevent():  # a log record names its thread: a dummy Thread object made for each greenlet
        logging.logThreads = False
    if settings is not None:  # read back by the extension, as a host app's config would be
        app.config.from_mapping({field.upper(): value for field, value in vars(settings).items()})
    errors.init_app(app)  # an unknown path or method, which no blueprint sees, is a JSON error too
    LLMStreaming(app)
    return app
