"""Naive Flask baseline: `stream_with_context`, one `data:` frame per token, time.sleep pacing.

`gunicorn -k gevent bench.baselines.flask_app:app`; pace from DEMO_TTFT_MS, DEMO_TOKENS_PER_S, DEMO_TOKENS.
"""

import json
import os
import time

from flask import Flask, Response, request, stream_with_context

TTFT_S = float(os.environ.get("DEMO_TTFT_MS", "0")) / 1000
RATE = float(os.environ.get("DEMO_TOKENS_PER_S", "0"))
TOKENS = int(os.environ.get("DEMO_TOKENS", "60"))
WORDS = "streaming tokens flow from the model through the engine to the socket".split()

app = Flask(__name__)


@app.get("/chat/sse")
def chat_sse():
    request.args.get("prompt")

    def generate():
        if TTFT_S > 0:
            time.sleep(TTFT_S)
        for i in range(TOKENS):
            yield f"data: {json.dumps({'content': ' ' + WORDS[i % len(WORDS)]})}\n\n"
            if RATE > 0:  # like the demo: no pause at full speed
                time.sleep(1 / RATE)
        yield "data: [DONE]\n\n"

    return Response(stream_with_context(generate()), mimetype="text/event-stream")


@app.get("/healthz")
def healthz():
    return {"status": "ok"}
