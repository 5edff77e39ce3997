"""OpenAI-compatible providers bridge knows by name, and where their keys come from.

Seed 000 maps friendly model names to models of several providers, each with its own API
key from the environment. Each provider here is reached through its OpenAI-compatible
endpoint; `<NAME>_API_KEY` holds its key and `<NAME>_BASE_URL` overrides its URL (for a
proxy or a gateway). A route names one as `alias=provider:model` in BRIDGE_MODELS.
"""

from __future__ import annotations

from collections.abc import Mapping

import msgspec


class Endpoint(msgspec.Struct, frozen=True):
    """Where one provider answers, and the key it takes (None: no Authorization header)."""

    base_url: str
    api_key: str | None = None


#: name -> default base URL; the key is read from `<NAME>_API_KEY`.
PROVIDERS: dict[str, str] = {
    "openai": "https://api.openai.com/v1",
    "anthropic": "https://api.anthropic.com/v1",
    "xai": "https://api.x.ai/v1",
    "gemini": "https://generativelanguage.googleapis.com/v1beta/openai",
    "deepseek": "https://api.deepseek.com/v1",
}

#: Seed 000's aliases and the provider and model each means when that provider has a key.
SEED_ALIASES: dict[str, tuple[str, str]] = {
    "chatgpt": ("openai", "gpt-4o"),
    "claude": ("anthropic", "claude-3-opus-20240229"),
    "grok": ("xai", "grok-1"),
    "gemini": ("gemini", "gemini-1.5-flash"),
    "deepseek": ("deepseek", "deepseek-chat"),
}


def key_variable(provider: str) -> str:
    """The environment variable holding `provider`'s API key."""
    return f"{provider.upper()}_API_KEY"


def endpoints_from(env: Mapping[str, str]) -> dict[str, Endpoint]:
    """Every catalog provider's endpoint, with its key and URL override from `env`."""
    return {
        name: Endpoint(
            (env.get(f"{name.upper()}_BASE_URL") or default).rstrip("/"),
            env.get(key_variable(name)) or None,
        )
        for name, default in PROVIDERS.items()
    }
