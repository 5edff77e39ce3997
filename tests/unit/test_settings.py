"""Settings.from_env: defaults, every variable, errors naming the variable, and model routes."""

from __future__ import annotations

import math

import msgspec
import pytest

from bridge.errors import ConfigError
from bridge.settings import DEFAULT_MODELS, ModelRoute, Settings, parse_models


def test_empty_environ_gives_the_documented_defaults() -> None:
    """An empty environment yields the built-in defaults and the mock provider."""
    s = Settings.from_env({})
    assert s.redis_url is None
    assert s.key_prefix == "llm:"
    assert s.redis_timeout_s == 5.0
    assert s.redis_pool_size == 64
    assert s.stream_maxlen == 10_000
    assert s.stream_ttl_s == 3600
    assert s.generation_deadline_s == 600.0
    assert s.sse_heartbeat_s == 15.0
    assert s.sse_retry_ms == 3000
    assert s.send_queue_size == 2048
    assert s.fanout_block_ms == 5000
    assert s.max_body_bytes == 256 * 1024
    assert s.max_prompt_chars == 32_000
    assert s.max_messages == 256
    assert s.worker_concurrency == 64
    assert s.reclaim_idle_ms == 15_000
    assert s.max_deliveries == 3
    assert s.provider == "mock"
    assert s.openai_base_url == "https://api.openai.com/v1"
    assert s.openai_api_key is None
    assert s.provider_connect_timeout_s == 10.0
    assert s.provider_read_timeout_s == 60.0
    assert s.models == parse_models(DEFAULT_MODELS)
    assert s.mock_tokens == 24
    assert s.mock_delay_ms == 20.0
    assert s.stream_secret is None
    assert s.stream_token_ttl_s == 86_400
    assert s.log_format == "auto"
    assert s.log_level == "info"


def test_default_models_are_the_seed_aliases() -> None:
    """The default model list names the seed's aliases, in order, including gpt-4 and mock."""
    s = Settings.from_env({})
    assert s.known_models == ("chatgpt", "claude", "grok", "gemini", "deepseek", "gpt-4", "mock")


def test_from_env_equals_the_struct_defaults() -> None:
    """Settings() and Settings.from_env({}) agree except for models (filled from the env)."""
    from_env = Settings.from_env({})
    assert msgspec.structs.replace(from_env, models=()) == Settings()


_INTEGERS = [
    ("BRIDGE_REDIS_POOL_SIZE", "redis_pool_size"),
    ("BRIDGE_STREAM_MAXLEN", "stream_maxlen"),
    ("BRIDGE_STREAM_TTL_S", "stream_ttl_s"),
    ("BRIDGE_SSE_RETRY_MS", "sse_retry_ms"),
    ("BRIDGE_SEND_QUEUE_SIZE", "send_queue_size"),
    ("BRIDGE_FANOUT_BLOCK_MS", "fanout_block_ms"),
    ("BRIDGE_MAX_BODY_BYTES", "max_body_bytes"),
    ("BRIDGE_MAX_PROMPT_CHARS", "max_prompt_chars"),
    ("BRIDGE_MAX_MESSAGES", "max_messages"),
    ("BRIDGE_WORKER_CONCURRENCY", "worker_concurrency"),
    ("BRIDGE_RECLAIM_IDLE_MS", "reclaim_idle_ms"),
    ("BRIDGE_MAX_DELIVERIES", "max_deliveries"),
    ("BRIDGE_MOCK_TOKENS", "mock_tokens"),
    ("BRIDGE_STREAM_TOKEN_TTL_S", "stream_token_ttl_s"),
]
_NUMBERS = [
    ("BRIDGE_REDIS_TIMEOUT_S", "redis_timeout_s"),
    ("BRIDGE_GENERATION_DEADLINE_S", "generation_deadline_s"),
    ("BRIDGE_SSE_HEARTBEAT_S", "sse_heartbeat_s"),
    ("BRIDGE_PROVIDER_CONNECT_TIMEOUT_S", "provider_connect_timeout_s"),
    ("BRIDGE_PROVIDER_READ_TIMEOUT_S", "provider_read_timeout_s"),
    ("BRIDGE_MOCK_DELAY_MS", "mock_delay_ms"),
]
_CHOICES = [
    ("BRIDGE_PROVIDER", "provider", ("mock", "openai")),
    ("BRIDGE_LOG_FORMAT", "log_format", ("auto", "json", "console")),
    ("BRIDGE_LOG_LEVEL", "log_level", ("debug", "info", "warning", "error")),
]


@pytest.mark.parametrize(("var", "attr"), _INTEGERS)
def test_integer_variables_are_read(var: str, attr: str) -> None:
    """Each integer variable sets its setting."""
    assert getattr(Settings.from_env({var: "12345"}), attr) == 12345


@pytest.mark.parametrize(("var", "attr"), _NUMBERS)
def test_number_variables_are_read(var: str, attr: str) -> None:
    """Each number variable accepts integers and decimals."""
    assert getattr(Settings.from_env({var: "2.5"}), attr) == 2.5
    assert getattr(Settings.from_env({var: "7"}), attr) == 7.0
    assert getattr(Settings.from_env({var: "0"}), attr) == 0.0


@pytest.mark.parametrize(("var", "attr", "allowed"), _CHOICES)
def test_choice_variables_accept_each_choice_in_any_case(
    var: str, attr: str, allowed: tuple[str, ...]
) -> None:
    """Each choice variable accepts its allowed values, case-insensitively, stored lower-case."""
    for value in allowed:
        assert getattr(Settings.from_env({var: value.upper()}), attr) == value


def test_text_variables_are_read() -> None:
    """REDIS_URL, prefix, OpenAI settings and the stream secret come from their variables."""
    s = Settings.from_env(
        {
            "REDIS_URL": "redis://db:6380/2",
            "BRIDGE_KEY_PREFIX": "tenant1:",
            "OPENAI_BASE_URL": "http://localhost:11434/v1/",
            "OPENAI_API_KEY": "sk-test",
            "BRIDGE_STREAM_SECRET": "s3cret",
            "BRIDGE_MODELS": "a=gpt-4o",
        }
    )
    assert s.redis_url == "redis://db:6380/2"
    assert s.key_prefix == "tenant1:"
    assert s.openai_base_url == "http://localhost:11434/v1"
    assert s.openai_api_key == "sk-test"
    assert s.stream_secret == "s3cret"
    assert s.models == (ModelRoute(alias="a", provider=None, upstream="gpt-4o"),)


def test_empty_variables_mean_the_default() -> None:
    """A variable set to the empty string counts as unset."""
    env = {var: "" for var, _ in _INTEGERS + _NUMBERS}
    env.update({var: "" for var, _, _ in _CHOICES})
    env.update({"REDIS_URL": "", "OPENAI_API_KEY": "", "BRIDGE_STREAM_SECRET": ""})
    env.update({"BRIDGE_KEY_PREFIX": "", "BRIDGE_MODELS": ""})
    assert Settings.from_env(env) == Settings.from_env({})


@pytest.mark.parametrize(("var", "_attr"), _INTEGERS)
@pytest.mark.parametrize("raw", ["ten", "1.5", "1e3", "0x10", "-1", "-100"])
def test_integer_errors_name_the_variable(var: str, _attr: str, raw: str) -> None:
    """A non-integer or negative integer variable raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: raw})


@pytest.mark.parametrize(("var", "_attr"), _NUMBERS)
@pytest.mark.parametrize("raw", ["fast", "nan", "NaN", "-0.5", "-inf", "1,5"])
def test_number_errors_name_the_variable(var: str, _attr: str, raw: str) -> None:
    """A non-number, NaN or negative number variable raises ConfigError naming the variable."""
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: raw})


@pytest.mark.parametrize(("var", "_attr", "_allowed"), _CHOICES)
def test_choice_errors_name_the_variable(var: str, _attr: str, _allowed: tuple[str, ...]) -> None:
    """A value outside a choice variable's allowed set raises ConfigError naming it."""
    with pytest.raises(ConfigError, match=var):
        Settings.from_env({var: "bogus"})


def test_stream_maxlen_below_100_is_rejected() -> None:
    """BRIDGE_STREAM_MAXLEN under 100 raises ConfigError naming the variable; 100 is fine."""
    with pytest.raises(ConfigError, match="BRIDGE_STREAM_MAXLEN"):
        Settings.from_env({"BRIDGE_STREAM_MAXLEN": "99"})
    assert Settings.from_env({"BRIDGE_STREAM_MAXLEN": "100"}).stream_maxlen == 100


def test_number_accepts_no_nan_at_all() -> None:
    """No spelling of NaN gets through a number variable."""
    for raw in ("nan", "-nan", "+NaN", " nan "):
        with pytest.raises(ConfigError):
            Settings.from_env({"BRIDGE_SSE_HEARTBEAT_S": raw})
    assert not math.isnan(Settings.from_env({}).sse_heartbeat_s)


@pytest.mark.parametrize(
    "env",
    [
        {"OPENAI_API_KEY": "sk-x"},
        {"OPENAI_BASE_URL": "http://localhost:8000/v1"},
        {"OPENAI_API_KEY": "sk-x", "OPENAI_BASE_URL": "http://localhost:8000/v1"},
    ],
)
def test_provider_defaults_to_openai_when_openai_is_configured(env: dict[str, str]) -> None:
    """OPENAI_API_KEY or OPENAI_BASE_URL makes openai the default provider."""
    assert Settings.from_env(env).provider == "openai"


def test_explicit_provider_wins_over_openai_variables() -> None:
    """BRIDGE_PROVIDER=mock keeps the mock even when OpenAI variables are set."""
    env = {"OPENAI_API_KEY": "sk-x", "BRIDGE_PROVIDER": "mock"}
    assert Settings.from_env(env).provider == "mock"


def test_empty_openai_key_does_not_switch_provider() -> None:
    """An empty OPENAI_API_KEY is unset: the provider stays mock and the key None."""
    s = Settings.from_env({"OPENAI_API_KEY": ""})
    assert s.provider == "mock"
    assert s.openai_api_key is None


def test_parse_models_plain_alias() -> None:
    """`alias=model` routes to the default provider with that upstream name."""
    assert parse_models("fast=gpt-4o-mini") == (
        ModelRoute(alias="fast", provider=None, upstream="gpt-4o-mini"),
    )


def test_parse_models_with_provider() -> None:
    """`alias=provider:model` names the provider explicitly."""
    assert parse_models("m=mock:mock, o=openai:gpt-4o") == (
        ModelRoute(alias="m", provider="mock", upstream="mock"),
        ModelRoute(alias="o", provider="openai", upstream="gpt-4o"),
    )


def test_parse_models_keeps_upstream_colons() -> None:
    """`llama3:8b` keeps its colon, with or without a provider prefix."""
    assert parse_models("local=openai:llama3:8b,bare=llama3:8b") == (
        ModelRoute(alias="local", provider="openai", upstream="llama3:8b"),
        ModelRoute(alias="bare", provider=None, upstream="llama3:8b"),
    )


def test_parse_models_keeps_slashes_and_dots() -> None:
    """Upstream names such as `gemini/gemini-1.5-flash` pass through unchanged."""
    routes = parse_models("gemini=gemini/gemini-1.5-flash,claude=anthropic.claude-3-opus")
    assert [r.upstream for r in routes] == ["gemini/gemini-1.5-flash", "anthropic.claude-3-opus"]
    assert all(r.provider is None for r in routes)


def test_parse_models_tolerates_spaces_and_empty_items() -> None:
    """Spaces around parts and empty items between commas are ignored; order is kept."""
    routes = parse_models(" b = y ,, a=x ,")
    assert [(r.alias, r.upstream) for r in routes] == [("b", "y"), ("a", "x")]


def test_parse_models_rejects_duplicates() -> None:
    """An alias named twice raises ConfigError naming it."""
    with pytest.raises(ConfigError, match="'a'"):
        parse_models("a=x,b=y,a=z")


@pytest.mark.parametrize("spec", ["", " , ,", "a", "a=", "=x", " = ", "a=x,b", "a=x,=y"])
def test_parse_models_rejects_malformed_entries(spec: str) -> None:
    """Entries without `=`, alias or model, and an empty list, raise ConfigError."""
    with pytest.raises(ConfigError, match="BRIDGE_MODELS"):
        parse_models(spec)


def test_from_env_reports_bad_models_with_the_variable() -> None:
    """A malformed BRIDGE_MODELS fails Settings.from_env with ConfigError."""
    with pytest.raises(ConfigError, match="BRIDGE_MODELS"):
        Settings.from_env({"BRIDGE_MODELS": "nonsense"})


@pytest.mark.parametrize("spec", ["a=openai:", "a=mock:", "a=openai: "])
def test_parse_models_rejects_a_provider_without_a_model(spec: str) -> None:
    """`alias=provider:` names no upstream model and raises ConfigError."""
    with pytest.raises(ConfigError):
        parse_models(spec)


@pytest.mark.parametrize("spec", ["my model=gpt-4o", "a:b=gpt-4o", "a;b=x", "é=gpt-4o"])
def test_parse_models_rejects_aliases_no_request_can_name(spec: str) -> None:
    """An alias outside [A-Za-z0-9_.-]{1,128} could never be requested and raises ConfigError."""
    with pytest.raises(ConfigError):
        parse_models(spec)
