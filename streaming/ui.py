"""The chat page: one HTML page that talks to the API like any other client.

The page is `templates/streaming/index.html` with `static/app.js` and `static/style.css`, served
from the `streaming` blueprint's folders (see `extension`), under the prefix the API is mounted
at, which the page tells its script: no build step and nothing from a CDN. The page's
Content-Security-Policy allows scripts, styles and connections to this origin only, and no
inline script or style at all, so that even text that slipped into the page as markup could not
run.
"""

from __future__ import annotations

from flask import Blueprint, Response, render_template, url_for

bp = Blueprint("ui", __name__)

CSP = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        "connect-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)


@bp.get("/")
def index():
    return render_template("streaming/index.html", base=url_for(".index").rstrip("/"))


@bp.after_request
def security_headers(response: Response) -> Response:
    """Only this blueprint's responses: the API's JSON and streams are not documents."""
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response
