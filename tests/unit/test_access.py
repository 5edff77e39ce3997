"""Stream access tokens: issue, verify, expiry, rotation, and errors that reveal nothing."""

from __future__ import annotations

import pytest

from bridge.access import StreamTokens
from bridge.errors import AccessDenied

NOW = 1_700_000_000.0
TTL = 3600
SESSION = "user_123.tab-7"


def _tokens(*secrets: bytes) -> StreamTokens:
    return StreamTokens(list(secrets or (b"secret-a",)), ttl_s=TTL)


def _denied(tokens: StreamTokens, session: str, token: str | None, now: float) -> AccessDenied:
    with pytest.raises(AccessDenied) as info:
        tokens.verify(session, token, now=now)
    assert SESSION not in info.value.detail
    assert SESSION not in str(info.value)
    return info.value


def test_issued_token_verifies_for_its_session() -> None:
    """A token issued for a session verifies for that session until it expires."""
    tokens = _tokens()
    token = tokens.issue(SESSION, now=NOW)
    tokens.verify(SESSION, token, now=NOW)
    tokens.verify(SESSION, token, now=NOW + TTL)  # the expiry second itself is still valid


def test_token_shape_is_expiry_dot_base64url() -> None:
    """A token is `<expiry>.<base64url signature>`, safe in a query string without escaping."""
    token = _tokens().issue(SESSION, now=NOW)
    expiry, dot, signature = token.partition(".")
    assert dot == "."
    assert int(expiry) == int(NOW) + TTL
    assert signature
    assert set(signature) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def test_missing_token_is_401() -> None:
    """No token (None or empty) is AccessDenied with status 401."""
    tokens = _tokens()
    for missing in (None, ""):
        assert _denied(tokens, SESSION, missing, NOW).status_code == 401


def test_tampered_signature_is_403() -> None:
    """Changing one character of the signature makes the token invalid (403)."""
    tokens = _tokens()
    token = tokens.issue(SESSION, now=NOW)
    last = token[-1]
    tampered = token[:-1] + ("A" if last != "A" else "B")
    assert _denied(tokens, SESSION, tampered, NOW).status_code == 403


def test_tampered_expiry_is_403() -> None:
    """Extending the expiry of a valid token invalidates its signature (403)."""
    tokens = _tokens()
    expiry, _, signature = tokens.issue(SESSION, now=NOW).partition(".")
    forged = f"{int(expiry) + 10_000}.{signature}"
    assert _denied(tokens, SESSION, forged, NOW).status_code == 403


@pytest.mark.parametrize(
    "token",
    [
        "garbage",
        ".",
        "123.",
        ".abc",
        "abc.def",
        "-5.abc",
        "1e9.abc",
        "1234567890123.abc",
        " 1700003600.abc",
        "1700003600",
    ],
)
def test_malformed_token_is_403(token: str) -> None:
    """A token that is not `<digits>.<signature>` is AccessDenied 403."""
    assert _denied(_tokens(), SESSION, token, NOW).status_code == 403


@pytest.mark.parametrize("token", ["\u00b2.abc", "1700003600.\u00e9", "1700003600.abc\u00e9"])
def test_malformed_non_ascii_token_is_403(token: str) -> None:
    """A token with non-ASCII digits or signature characters is AccessDenied 403, not a crash."""
    assert _denied(_tokens(), SESSION, token, NOW).status_code == 403


def test_token_of_another_session_is_403() -> None:
    """A valid token for one session does not open another session (403)."""
    tokens = _tokens()
    token = tokens.issue("other_session", now=NOW)
    assert _denied(tokens, SESSION, token, NOW).status_code == 403
    # a session whose name extends the other one's, or vice versa, is no better
    assert _denied(tokens, "other_session.x", token, NOW).status_code == 403
    assert _denied(tokens, "other", token, NOW).status_code == 403


def test_expired_token_is_401() -> None:
    """A correctly signed token past its expiry is AccessDenied 401."""
    tokens = _tokens()
    token = tokens.issue(SESSION, now=NOW)
    denied = _denied(tokens, SESSION, token, NOW + TTL + 1)
    assert denied.status_code == 401
    assert "expired" in denied.detail


def test_token_from_another_secret_is_403() -> None:
    """A token signed with a secret this server does not list is invalid (403)."""
    token = _tokens(b"someone-else").issue(SESSION, now=NOW)
    assert _denied(_tokens(b"secret-a"), SESSION, token, NOW).status_code == 403


def test_rotation_keeps_old_tokens_valid_while_the_old_secret_is_listed() -> None:
    """After rotation the new secret signs, and tokens of the old one verify while it is listed."""
    old_only = _tokens(b"old")
    old_token = old_only.issue(SESSION, now=NOW)
    rotated = _tokens(b"new", b"old")
    rotated.verify(SESSION, old_token, now=NOW)
    new_token = rotated.issue(SESSION, now=NOW)
    assert new_token != old_token
    _tokens(b"new").verify(SESSION, new_token, now=NOW)  # signed by the first secret
    with pytest.raises(AccessDenied):
        old_only.verify(SESSION, new_token, now=NOW)


def test_rotation_drops_old_tokens_once_the_old_secret_is_removed() -> None:
    """When the old secret is no longer listed, its tokens are invalid (403)."""
    old_token = _tokens(b"old").issue(SESSION, now=NOW)
    assert _denied(_tokens(b"new"), SESSION, old_token, NOW).status_code == 403


def test_no_secret_is_refused() -> None:
    """StreamTokens needs at least one secret."""
    with pytest.raises(ValueError, match="secret"):
        StreamTokens([], ttl_s=TTL)


def test_errors_never_name_the_session() -> None:
    """No denial (missing, malformed, forged, foreign, expired) mentions the session id."""
    tokens = _tokens()
    good = tokens.issue(SESSION, now=NOW)
    cases = [None, "junk", good[:-1] + "x", tokens.issue("other", now=NOW), good]
    times = [NOW, NOW, NOW, NOW, NOW + TTL + 5]
    pairs = zip(cases, times, strict=True)
    details = {_denied(tokens, SESSION, token, now).detail for token, now in pairs}
    assert len(details) >= 3  # missing, invalid and expired are told apart
