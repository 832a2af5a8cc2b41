"""Seed-style FastAPI baseline: an async generator, one `data:` frame per token, asyncio.sleep pacing.

`uvicorn bench.baselines.fastapi_app:app`; pace from DEMO_TTFT_MS, DEMO_TOKENS_PER_S, DEMO_TOKENS.
"""

import asyncio
import json
import os

from fastapi import FastAPI
from fastapi.responses import StreamingResponse

TTFT_S = float(os.environ.get("DEMO_TTFT_MS", "0")) / 1000
RATE = float(os.environ.get("DEMO_TOKENS_PER_S", "0"))
TOKENS = int(os.environ.get("DEMO_TOKENS", "60"))
WORDS = "streaming tokens flow from the model through the engine to the socket".split()

app = FastAPI()


@app.get("/chat/sse")
async def chat_sse(prompt: str):
    async def generate():
        if TTFT_S > 0:
            await asyncio.sleep(TTFT_S)
        for i in range(TOKENS):
            yield f"data: {json.dumps({'content': ' ' + WORDS[i % len(WORDS)]})}\n\n"
            if RATE > 0:  # like the demo: no pause at full speed
                await asyncio.sleep(1 / RATE)
        yield "data: [DONE]\n\n"

    return StreamingResponse(generate(), media_type="text/event-stream")


@app.get("/healthz")
async def healthz():
    return {"status": "ok"}
