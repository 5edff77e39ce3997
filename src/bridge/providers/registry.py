"""Which provider serves which public model name, and the provider instances themselves."""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from types import MappingProxyType

from bridge.errors import BadRequest, ConfigError, UnknownModel
from bridge.provider_catalog import PROVIDERS, Endpoint, key_variable
from bridge.providers.base import Provider
from bridge.providers.mock import MockProvider
from bridge.providers.openai import OpenAIProvider
from bridge.settings import Settings

_PROVIDERS = ("mock", *PROVIDERS)


class ProviderRegistry:
    """Owns one instance per provider in use and resolves public model names to them.

    `routes` maps each public model name to a provider name and the upstream model name;
    every provider a route names must be in `providers`.
    """

    def __init__(
        self, providers: Mapping[str, Provider], routes: Mapping[str, tuple[str, str]]
    ) -> None:
        missing = {name for name, _ in routes.values()} - set(providers)
        if missing:
            raise ConfigError(f"no provider instance for {', '.join(sorted(missing))}")
        self._providers = dict(providers)
        self._routes = dict(routes)

    @classmethod
    def from_settings(cls, settings: Settings) -> ProviderRegistry:
        """Route every configured model; a route without a provider uses `settings.provider`.

        The mock provider always exists; the OpenAI one only when some route needs it, so
        a mock-only deployment opens no HTTP client.
        """
        routes: dict[str, tuple[str, str]] = {}
        for route in settings.models:
            provider = route.provider or settings.provider
            if provider not in _PROVIDERS:
                raise ConfigError(
                    f"model {route.alias!r} uses unknown provider {provider!r}; "
                    f"known providers: {', '.join(_PROVIDERS)}"
                )
            routes[route.alias] = (provider, route.upstream)
        providers: dict[str, Provider] = {
            "mock": MockProvider(tokens=settings.mock_tokens, delay_ms=settings.mock_delay_ms)
        }
        for name in sorted({provider for provider, _ in routes.values()} - {"mock"}):
            if name == "openai":
                endpoint = Endpoint(settings.openai_base_url, settings.openai_api_key)
            else:
                endpoint = settings.endpoints.get(name) or Endpoint(PROVIDERS[name])
                if endpoint.api_key is None:  # seed 000: each provider has its own key
                    users = [alias for alias, (p, _) in routes.items() if p == name]
                    raise ConfigError(
                        f"model {users[0]!r} uses provider {name!r}, "
                        f"but {key_variable(name)} is not set"
                    )
            providers[name] = OpenAIProvider(
                endpoint.base_url,
                endpoint.api_key,
                connect_timeout_s=settings.provider_connect_timeout_s,
                read_timeout_s=settings.provider_read_timeout_s,
                # one connection per concurrent generation, never a pool timeout
                max_connections=max(256, settings.worker_concurrency),
            )
        return cls(providers, routes)

    @property
    def known_models(self) -> tuple[str, ...]:
        """Public model names, in configuration order."""
        return tuple(self._routes)

    @property
    def providers(self) -> Mapping[str, Provider]:
        """The provider instances by name (a read-only view)."""
        return MappingProxyType(self._providers)

    def resolve(self, model_id: str) -> tuple[Provider, str]:
        """The provider serving `model_id` and the model name to send it.

        Raises `UnknownModel` (a 400 naming the known models) for names not configured.
        """
        try:
            provider_name, upstream = self._routes[model_id]
        except KeyError:
            raise UnknownModel(model_id, self.known_models) from None
        return self._providers[provider_name], upstream

    def alias_for(self, provider: str, model: str) -> str:
        """The public model name that `provider` serves as `model` (seed 001's templates).

        `model` may be a public name routed to `provider`, or the upstream name of one. Only
        configured routes are reachable, so a client cannot pick an arbitrary upstream model.
        """
        in_use = sorted({name for name, _ in self._routes.values()})
        if provider not in in_use:
            raise BadRequest(f"unknown provider {provider!r}; known providers: {', '.join(in_use)}")
        route = self._routes.get(model)
        if route is not None and route[0] == provider:
            return model
        for alias, (name, upstream) in self._routes.items():
            if name == provider and upstream == model:
                return alias
        served = tuple(alias for alias, (name, _) in self._routes.items() if name == provider)
        raise UnknownModel(model, served)

    async def aclose(self) -> None:
        """Close every provider, even when closing one of them fails."""
        async with contextlib.AsyncExitStack() as stack:
            for provider in self._providers.values():
                stack.push_async_callback(provider.aclose)
