"""The tutorial's generator, streamed: gunicorn -k gevent stream_app:app, then curl -N localhost:8000/story"""

import time

from flask import Flask

from streaming import stream_response

app = Flask(__name__)


@app.get("/story")
def story():
    def words():
        try:
            for word in ["Once", " upon", " a", " time", "..."]:
                time.sleep(1)  # a slow model
                yield word
        finally:
            print("the generator was closed", flush=True)  # runs even when the client leaves

    return stream_response(words(), heartbeat_s=0.5)
