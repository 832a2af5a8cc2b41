"""Model providers: small classes whose `stream(messages, params)` returns a `Reply`.

A reply iterates over plain values (see `base`) and can be closed from any thread. Providers know
nothing of HTTP; the engine turns their values into events.
"""

from __future__ import annotations

from ..config import Settings
from .base import Provider


def load_provider(settings: Settings) -> Provider:
    """The provider that `LLM_PROVIDER` names. Imported here, in the worker, so that gevent has
    patched the standard library before the OpenAI SDK is imported."""
    if settings.llm_provider == "demo":
        from .demo import DemoProvider

        return DemoProvider(settings)
    if settings.llm_provider == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(settings)
    raise ValueError(f"LLM_PROVIDER must be 'demo' or 'openai', not {settings.llm_provider!r}")
