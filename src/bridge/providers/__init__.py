"""LLM providers: the protocol, the mock and OpenAI-compatible backends, and their registry."""

from bridge.providers.base import Delta, Finish, Message, Provider, ProviderRequest, Usage
from bridge.providers.mock import MockProvider, mock_answer
from bridge.providers.openai import OpenAIProvider
from bridge.providers.registry import ProviderRegistry

__all__ = [
    "Delta",
    "Finish",
    "Message",
    "MockProvider",
    "OpenAIProvider",
    "Provider",
    "ProviderRegistry",
    "ProviderRequest",
    "Usage",
    "mock_answer",
]
