"""Model providers: small classes whose `stream(messages, params)` returns a `Reply`.

A reply iterates over plain values (see `base`) and can be closed from any thread. Providers know
nothing of HTTP; the engine turns their values into events.
"""

from __future__ import annotations

import importlib

from ..config import Settings
from .base import Provider


def load_provider(settings: Settings) -> Provider:
    """The provider that `LLM_PROVIDER` names: `demo`, `openai`, `anthropic`, or a class of your own
    as `package.module:ClassName`, made with the settings (see docs/providers.md). Imported here,
    in the worker, so that gevent has patched the standard library before an SDK is imported."""
    name = settings.llm_provider
    if name == "demo":
        from .demo import DemoProvider

        return DemoProvider(settings)
    if name == "openai":
        from .openai import OpenAIProvider

        return OpenAIProvider(settings)
    if name == "anthropic":
        from .anthropic import AnthropicProvider

        return AnthropicProvider(settings)
    module, _, cls = name.partition(":")
    if not (module and cls):
        raise ValueError(f"LLM_PROVIDER must be demo, openai, anthropic or package.module:ClassName, not {name!r}")
    return getattr(importlib.import_module(module), cls)(settings)
