"""The provider registry: routing public model names to provider instances."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from bridge.errors import ConfigError, UnknownModel
from bridge.providers.base import Delta, Finish, Message, ProviderRequest
from bridge.providers.mock import MockProvider, mock_answer
from bridge.providers.openai import OpenAIProvider
from bridge.providers.registry import ProviderRegistry
from bridge.settings import ModelRoute, Settings
from tests.fakes.openai_upstream import FakeUpstream

MODELS = "chatgpt=gpt-4o,local=openai:llama3:8b,fast=mock:tiny,claude=anthropic.claude-3"


@pytest.fixture
async def registries() -> AsyncIterator[list[ProviderRegistry]]:
    """Registries created by a test, closed after it."""
    created: list[ProviderRegistry] = []
    yield created
    for registry in created:
        await registry.aclose()


def _registry(created: list[ProviderRegistry], **env: str) -> ProviderRegistry:
    registry = ProviderRegistry.from_settings(Settings.from_env({"BRIDGE_MODELS": MODELS, **env}))
    created.append(registry)
    return registry


async def test_mock_default_serves_every_route_without_explicit_provider(
    registries: list[ProviderRegistry],
) -> None:
    """With the mock default, unprefixed routes go to mock; openai: routes still get openai."""
    registry = _registry(registries, BRIDGE_PROVIDER="mock")
    chatgpt, upstream = registry.resolve("chatgpt")
    assert isinstance(chatgpt, MockProvider)
    assert upstream == "gpt-4o"
    local, upstream = registry.resolve("local")
    assert isinstance(local, OpenAIProvider)
    assert upstream == "llama3:8b"
    assert registry.resolve("claude")[0] is chatgpt


async def test_openai_default_sends_unprefixed_routes_to_one_openai_instance(
    registries: list[ProviderRegistry],
) -> None:
    """With the openai default, unprefixed routes share one OpenAI instance; mock: stays mock."""
    registry = _registry(registries, BRIDGE_PROVIDER="openai")
    chatgpt, upstream = registry.resolve("chatgpt")
    assert isinstance(chatgpt, OpenAIProvider)
    assert upstream == "gpt-4o"
    assert registry.resolve("claude") == (chatgpt, "anthropic.claude-3")
    assert registry.resolve("local")[0] is chatgpt
    fast, upstream = registry.resolve("fast")
    assert isinstance(fast, MockProvider)
    assert upstream == "tiny"


async def test_openai_is_created_only_when_a_route_needs_it(
    registries: list[ProviderRegistry],
) -> None:
    """A mock-only configuration has the mock provider and no OpenAI client."""
    registry = ProviderRegistry.from_settings(
        Settings.from_env({"BRIDGE_MODELS": "a=x,b=mock:y", "BRIDGE_PROVIDER": "mock"})
    )
    registries.append(registry)
    assert set(registry.providers) == {"mock"}
    assert set(_registry(registries, BRIDGE_PROVIDER="mock").providers) == {"mock", "openai"}


async def test_unknown_model_error_names_the_known_models(
    registries: list[ProviderRegistry],
) -> None:
    """Resolving a name that is not configured raises UnknownModel listing the known names."""
    registry = _registry(registries)
    assert registry.known_models == ("chatgpt", "local", "fast", "claude")
    with pytest.raises(UnknownModel) as caught:
        registry.resolve("gpt-5")
    assert caught.value.model == "gpt-5"
    assert caught.value.known == ("chatgpt", "local", "fast", "claude")
    assert "chatgpt, local, fast, claude" in caught.value.detail
    assert caught.value.status_code == 400


def test_unknown_provider_name_is_a_config_error() -> None:
    """A route whose provider is neither mock nor openai is rejected when building."""
    settings = Settings(provider="vertex", models=(ModelRoute("m", None, "gemini"),))
    with pytest.raises(ConfigError, match="vertex"):
        ProviderRegistry.from_settings(settings)


async def test_mock_route_streams_with_configured_tokens(
    registries: list[ProviderRegistry],
) -> None:
    """The mock instance is built from the mock_tokens setting."""
    registry = _registry(registries, BRIDGE_MOCK_TOKENS="4", BRIDGE_MOCK_DELAY_MS="0")
    provider, upstream = registry.resolve("fast")
    request = ProviderRequest(upstream, (Message("user", "hi"),))
    items = [item async for item in provider.stream(request)]
    assert "".join(item.text for item in items if isinstance(item, Delta)) == mock_answer(4)


async def test_openai_route_reaches_the_configured_upstream_with_the_key(
    registries: list[ProviderRegistry],
) -> None:
    """The OpenAI instance uses the configured base URL and key and the route's model name."""
    async with FakeUpstream(tokens=2) as upstream:
        registry = _registry(
            registries, OPENAI_BASE_URL=upstream.base_url, OPENAI_API_KEY="sk-registry"
        )
        provider, model = registry.resolve("chatgpt")
        request = ProviderRequest(model, (Message("user", "hi"),))
        items = [item async for item in provider.stream(request)]
        await registry.aclose()
    assert isinstance(items[-1], Finish)
    [received] = upstream.requests
    assert received.body["model"] == "gpt-4o"
    assert received.headers["authorization"] == "Bearer sk-registry"


async def test_aclose_closes_every_provider_even_if_one_fails() -> None:
    """A provider failing to close does not stop the others from being closed."""
    closed: list[str] = []

    class Broken(MockProvider):
        async def aclose(self) -> None:
            raise RuntimeError("cannot close")

    class Tracked(MockProvider):
        async def aclose(self) -> None:
            closed.append("tracked")

    # closed last to first, so the broken one fails before the tracked one is reached
    registry = ProviderRegistry(
        {"tracked": Tracked(1, 0), "broken": Broken(1, 0)},
        {"a": ("broken", "x"), "b": ("tracked", "y")},
    )
    with pytest.raises(RuntimeError, match="cannot close"):
        await registry.aclose()
    assert closed == ["tracked"]


def test_route_to_a_missing_provider_instance_is_rejected() -> None:
    """Building a registry whose route names a provider it was not given fails at once."""
    with pytest.raises(ConfigError, match="openai"):
        ProviderRegistry({"mock": MockProvider(1, 0)}, {"a": ("openai", "gpt")})
