"""The OpenAI SDK's published request types as pydantic validators: what /v1 checks requests against.

Importing them takes half a second (and `ssl`, which gevent must have patched first), so it
happens on the first request that needs them rather than at every start: a service that never
answers /v1 would pay it for nothing."""

from __future__ import annotations

import functools
import importlib

from pydantic import TypeAdapter


@functools.cache
def request_types(module: str, name: str) -> tuple[frozenset[str], TypeAdapter, TypeAdapter]:
    """The field names of `openai.types.<module>.<name>Streaming`, and validators for it and for
    `<name>NonStreaming` (the same fields, `stream` apart): made once per process."""
    types = importlib.import_module(f"openai.types.{module}")
    streamed, whole = getattr(types, f"{name}Streaming"), getattr(types, f"{name}NonStreaming")
    return frozenset(streamed.__required_keys__ | streamed.__optional_keys__), TypeAdapter(streamed), TypeAdapter(whole)
