"""Settings of the seed systems, and seed 000's model aliases with per-provider keys."""

from __future__ import annotations

import sys

import pytest

from bridge.errors import ConfigError
from bridge.providers.openai import OpenAIProvider
from bridge.providers.registry import ProviderRegistry
from bridge.settings import ModelRoute, Settings


def test_defaults_follow_the_seeds() -> None:
    """Seed names and knobs: the three streams, batches of 4, three attempts, a 1 h TTL."""
    settings = Settings.from_env({})
    assert (settings.summary_stream, settings.question_stream, settings.results_stream) == (
        "summary_requests",
        "question_requests",
        "llm_results",
    )
    assert settings.seed_streams is True
    assert settings.batch_size == 4
    assert settings.job_max_attempts == 3
    assert settings.job_result_ttl_s == 3600
    assert settings.batch_command == ()


def test_seed_knobs_come_from_the_environment() -> None:
    """Every knob is a BRIDGE_* variable; the batch command is split like a shell would."""
    settings = Settings.from_env(
        {
            "BRIDGE_SEED_STREAMS": "off",
            "BRIDGE_RESULTS_STREAM": "out",
            "BRIDGE_BATCH_SIZE": "8",
            "BRIDGE_BATCH_WINDOW_MS": "50",
            "BRIDGE_BATCH_COMMAND": f"{sys.executable} -m my_model --flag 'two words'",
            "BRIDGE_JOB_MAX_ATTEMPTS": "5",
        }
    )
    assert settings.seed_streams is False
    assert settings.results_stream == "out"
    assert (settings.batch_size, settings.batch_window_ms) == (8, 50.0)
    assert settings.batch_command == (sys.executable, "-m", "my_model", "--flag", "two words")
    assert settings.job_max_attempts == 5


def test_a_bad_flag_names_its_variable() -> None:
    """`BRIDGE_SEED_STREAMS=maybe` is a configuration error naming the variable."""
    with pytest.raises(ConfigError, match="BRIDGE_SEED_STREAMS"):
        Settings.from_env({"BRIDGE_SEED_STREAMS": "maybe"})


def route(settings: Settings, alias: str) -> ModelRoute:
    return next(r for r in settings.models if r.alias == alias)


def test_seed_aliases_go_to_their_provider_when_its_key_is_set() -> None:
    """With ANTHROPIC_API_KEY set, `claude` is Anthropic's model with that key; aliases of
    providers without a key keep the default provider."""
    env = {"ANTHROPIC_API_KEY": "sk-ant", "DEEPSEEK_BASE_URL": "http://gateway/v1/"}
    settings = Settings.from_env(env)
    assert route(settings, "claude") == ModelRoute("claude", "anthropic", "claude-3-opus-20240229")
    assert route(settings, "grok") == ModelRoute("grok", None, "xai.grok-1")
    assert settings.endpoints["deepseek"].base_url == "http://gateway/v1"
    providers = ProviderRegistry.from_settings(settings)
    provider, upstream = providers.resolve("claude")
    assert isinstance(provider, OpenAIProvider)
    assert upstream == "claude-3-opus-20240229"
    assert provider._headers["Authorization"] == "Bearer sk-ant"
    assert providers.resolve("grok")[0].name == "mock"


def test_a_route_to_a_provider_without_its_key_fails_at_start_up() -> None:
    """`BRIDGE_MODELS=claude=anthropic:...` without ANTHROPIC_API_KEY names the variable."""
    settings = Settings.from_env({"BRIDGE_MODELS": "claude=anthropic:claude-3-5-sonnet"})
    with pytest.raises(ConfigError, match="ANTHROPIC_API_KEY is not set"):
        ProviderRegistry.from_settings(settings)
