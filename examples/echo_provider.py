"""A provider of your own: LLM_PROVIDER=examples.echo_provider:EchoProvider (see docs/providers.md)."""

import threading

from streaming.providers.base import Finish, ProviderError, Usage


class EchoProvider:
    name = "echo"

    def __init__(self, settings):  # the service's Settings: LLM_MODEL, timeouts, ...
        self.default_model = settings.llm_model or "echo"

    def models(self):
        return [self.default_model]

    def accepts(self, model):  # a name it may not serve is refused before anything is stored
        return model in self.models()

    def stream(self, messages, params):
        if not messages[-1]["content"].strip():
            raise ProviderError("invalid_request", "nothing to echo", 400)  # before any token: a JSON 400
        return EchoReply(messages[-1]["content"].split())


class EchoReply:
    def __init__(self, words):
        self.words, self.closed = words, threading.Event()

    def __iter__(self):
        for i, word in enumerate(self.words):
            if self.closed.wait(0.05):  # a pause that close() cuts short
                return
            yield word if i == 0 else " " + word  # answer text
        yield Usage(prompt_tokens=len(self.words), completion_tokens=len(self.words))
        yield Finish("stop")

    def close(self):  # from any thread, maybe twice: stop soon, release the upstream
        self.closed.set()
