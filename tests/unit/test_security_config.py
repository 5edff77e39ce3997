"""API key configuration and checks, the `bridge hash-key` helper, and the security settings."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest

from bridge.auth import ApiKeys, generate_key, hash_key, parse_api_keys
from bridge.cli import hash_key_command
from bridge.errors import AccessDenied, ConfigError
from bridge.settings import Settings

KEY_A = "bk_alpha-secret-key"
KEY_A2 = "bk_alpha-rotated-key"
KEY_B = "bk_beta-secret-key"


def keys() -> ApiKeys:
    spec = f"alpha:{hash_key(KEY_A)}, alpha:{hash_key(KEY_A2)},beta:{hash_key(KEY_B).upper()}"
    return ApiKeys(parse_api_keys(spec))


def test_a_key_maps_to_its_tenant_and_several_keys_may_share_one() -> None:
    """Each configured key authenticates as its tenant; two keys of one tenant both work."""
    api_keys = keys()
    assert api_keys.enabled
    assert api_keys.tenant_of(KEY_A) == "alpha"
    assert api_keys.tenant_of(KEY_A2) == "alpha"
    assert api_keys.tenant_of(KEY_B) == "beta"


@pytest.mark.parametrize(
    "presented", [None, "", "bk_unknown", KEY_A + " ", KEY_A.upper(), "é\u0000\ud800", "x" * 10_000]
)
def test_missing_or_unknown_keys_get_401(presented: str | None) -> None:
    """Missing, unknown, altered and hostile (non-ASCII, NUL, surrogate, huge) keys are refused."""
    with pytest.raises(AccessDenied) as refused:
        keys().tenant_of(presented)
    assert refused.value.status_code == 401


def test_no_keys_means_open() -> None:
    """With no keys configured the checker says so (the app then runs open and warns)."""
    assert not ApiKeys(()).enabled
    assert Settings.from_env({}).api_keys == ()


@pytest.mark.parametrize(
    "spec",
    [
        "alpha:" + KEY_A,  # a raw key where its hash belongs
        "alpha",
        f":{hash_key(KEY_A)}",
        f"al:pha:{hash_key(KEY_A)}",
        f"alpha:{hash_key(KEY_A)[:-1]}",
        f"al pha:{hash_key(KEY_A)}",
    ],
)
def test_bad_key_configuration_is_refused_without_echoing_it(spec: str) -> None:
    """A malformed BRIDGE_API_KEYS entry stops start-up; the message never repeats the value."""
    with pytest.raises(ConfigError) as refused:
        Settings.from_env({"BRIDGE_API_KEYS": spec})
    assert KEY_A not in str(refused.value)
    assert spec not in str(refused.value)
    assert "bridge hash-key" in str(refused.value)


def test_generated_keys_are_long_random_and_prefixed() -> None:
    """`generate_key` makes distinct keys with a recognisable prefix and 256 random bits."""
    first, second = generate_key(), generate_key()
    assert first != second
    assert first.startswith("bk_")
    assert len(first) >= 40


def test_hash_key_reads_the_key_from_stdin_and_prints_an_entry(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`bridge hash-key --tenant t` prints `t:<sha256>`, which configuration accepts."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(KEY_A + "\n"))
    assert hash_key_command("alpha", generate=False) == 0
    entry = capsys.readouterr().out.strip()
    assert entry == f"alpha:{hash_key(KEY_A)}"
    assert ApiKeys(parse_api_keys(entry)).tenant_of(KEY_A) == "alpha"


def test_hash_key_generate_prints_the_key_apart_from_the_entry(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """`--generate` prints the new key on stderr and only its entry on stdout."""
    assert hash_key_command("alpha", generate=True) == 0
    out, err = capsys.readouterr()
    key = err.strip().removeprefix("key: ")
    assert out.strip() == f"alpha:{hash_key(key)}"
    assert key not in out


def test_hash_key_refuses_an_empty_key_and_a_bad_tenant(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """No key on stdin, or a tenant that is not a safe id, exits 2 with a message."""
    monkeypatch.setattr(sys, "stdin", io.StringIO(""))
    assert hash_key_command(None, generate=False) == 2
    monkeypatch.setattr(sys, "stdin", io.StringIO(KEY_A))
    assert hash_key_command("bad tenant", generate=False) == 2
    assert "bridge:" in capsys.readouterr().err


def test_hash_key_command_line() -> None:
    """The console entry point works without any BRIDGE_* environment (no Redis needed)."""
    done = subprocess.run(
        [sys.executable, "-m", "bridge.cli", "hash-key"],
        input=KEY_B + "\n",
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={"BRIDGE_STREAM_MAXLEN": "1", "PATH": "", "PYTHONPATH": ":".join(sys.path)},
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == hash_key(KEY_B)


def test_security_settings_from_the_environment() -> None:
    """Every limit and the CORS origins are read from BRIDGE_* variables."""
    settings = Settings.from_env(
        {
            "BRIDGE_CORS_ORIGINS": "https://a.example, https://b.example",
            "BRIDGE_RATE_KEY_RPM": "5",
            "BRIDGE_RATE_KEY_TPM": "6",
            "BRIDGE_RATE_SESSION_RPM": "7",
            "BRIDGE_RATE_SESSION_TPM": "8",
            "BRIDGE_MAX_GENERATIONS_PER_SESSION": "9",
            "BRIDGE_MAX_SSE_PER_SESSION": "10",
            "BRIDGE_MAX_SSE_PER_ADDRESS": "11",
            "BRIDGE_MAX_HEADER_BYTES": "12",
            "BRIDGE_WS_MAX_MESSAGE_BYTES": "13",
            "BRIDGE_WS_MESSAGES_PER_S": "1.5",
            "BRIDGE_WS_MESSAGE_BURST": "14",
        }
    )
    assert settings.cors_origins == ("https://a.example", "https://b.example")
    assert (settings.rate_key_rpm, settings.rate_key_tpm) == (5, 6)
    assert (settings.rate_session_rpm, settings.rate_session_tpm) == (7, 8)
    assert settings.max_generations_per_session == 9
    assert (settings.max_sse_per_session, settings.max_sse_per_address) == (10, 11)
    assert settings.max_header_bytes == 12
    assert (settings.ws_max_message_bytes, settings.ws_messages_per_s) == (13, 1.5)
    assert settings.ws_message_burst == 14
    assert Settings.from_env({}).cors_origins == ()  # default: same origin only
