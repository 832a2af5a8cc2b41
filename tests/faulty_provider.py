"""A provider whose own code fails when asked to (`LLM_PROVIDER=tests.faulty_provider:FaultyProvider`):
the prompt "fault" makes `stream()` raise what no provider is meant to (not a ProviderError)."""

from examples.echo_provider import EchoProvider


class FaultyProvider(EchoProvider):
    name = "faulty"

    def stream(self, messages, params):
        if messages[-1]["content"] == "fault":
            raise RuntimeError("a bug in the provider")
        return super().stream(messages, params)
