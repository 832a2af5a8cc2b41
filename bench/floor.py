"""P3's floor: `streams` answers of an OpenAI-format upstream read by one gevent process with no
server in front (no client connections, no Flask, no gunicorn), every stream started at once.

`python -m bench.floor URL STREAMS CLIENT` prints JSON: each stream's seconds from the common
start to its first content token (null if none) and to its end, its tokens and error, and the
process's CPU seconds over the run. CLIENT is one of `CLIENTS`:

- `sdk create`: the official SDK as its documentation shows it (`chat.completions.create(...,
  stream=True)`, typed chunks, the SDK's default HTTP client);
- `provider`: this service's OpenAI provider (`streaming.providers.openai`), read as the engine
  reads it: what the service does for an answer without the service around it;
- `httpx`: httpx's client alone (`stream("POST", ...)`, `iter_lines()`), no SDK.

What no relay on one worker can beat with that client: each relayed request costs at least this
much CPU, and the last of `streams` requests made together waits for all those before it.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from collections.abc import Callable, Iterator

MESSAGES = [{"role": "user", "content": "bench"}]


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def sdk_create(url: str) -> Callable[[], Iterator[str]]:
    import openai

    client = openai.OpenAI(api_key="bench", base_url=url + "/v1", max_retries=0)

    def answer() -> Iterator[str]:
        for chunk in client.chat.completions.create(model="bench", messages=MESSAGES, stream=True):
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    return answer


def provider(url: str) -> Callable[[], Iterator[str]]:
    from streaming.config import Settings
    from streaming.providers.openai import OpenAIProvider

    relay = OpenAIProvider(Settings(llm_provider="openai", openai_base_url=url + "/v1", openai_api_key="bench"))

    def answer() -> Iterator[str]:
        reply = relay.stream(MESSAGES, {"model": "bench"})
        try:
            yield from (item for item in reply if isinstance(item, str))
        finally:
            reply.close()
    return answer


def httpx(url: str) -> Callable[[], Iterator[str]]:
    import httpx2

    client = httpx2.Client(base_url=url, limits=httpx2.Limits(max_connections=1000, max_keepalive_connections=1000),
                           timeout=60)
    body = {"model": "bench", "stream": True, "messages": MESSAGES}

    def answer() -> Iterator[str]:
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choices = json.loads(line[6:])["choices"]
                    if choices and choices[0]["delta"].get("content"):
                        yield choices[0]["delta"]["content"]
    return answer


CLIENTS = {"sdk create": sdk_create, "provider": provider, "httpx": httpx}


def run(answer: Callable[[], Iterator[str]], streams: int) -> dict:
    import gevent

    results: list[dict] = [{"ttft": None, "end": None, "tokens": 0, "error": None} for _ in range(streams)]

    def one(result: dict, start: float) -> None:
        try:
            for _ in answer():
                if result["ttft"] is None:
                    result["ttft"] = time.perf_counter() - start
                result["tokens"] += 1
        except Exception as exc:  # reported, not raised: the run goes on
            result["error"] = type(exc).__name__
        result["end"] = time.perf_counter() - start

    cpu = _cpu()
    start = time.perf_counter()
    gevent.joinall([gevent.spawn(one, result, start) for result in results])
    return {"cpu_s": _cpu() - cpu, "streams": results}


def main() -> None:
    from gevent import monkey

    monkey.patch_all()  # before the clients import httpx
    url, streams, client = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    answer = CLIENTS[client](url)
    run(answer, streams)  # warm up, as the relays are: the pool's connections, the SDK's platform headers
    print(json.dumps(run(answer, streams)))


if __name__ == "__main__":
    main()
