"""Stream access tokens: who may read a session.

Session ids are chosen by clients and guessable, so reading one needs the token `chat/start`
returned: `<expiry>.<HMAC-SHA256(secret, "<session>.<expiry>")>`, base64url. The first secret
signs; every configured secret verifies, so secrets rotate without cutting live readers off.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time

from bridge.errors import AccessDenied


class StreamTokens:
    """Issues and verifies session-bound, expiring stream tokens."""

    def __init__(self, secrets: list[bytes], ttl_s: int) -> None:
        if not secrets:
            raise ValueError("at least one secret is required")
        self._secrets = secrets
        self._ttl_s = ttl_s

    def issue(self, session: str, *, now: float | None = None) -> str:
        expiry = int(now if now is not None else time.time()) + self._ttl_s
        return f"{expiry}.{_sign(self._secrets[0], session, expiry)}"

    def verify(self, session: str, token: str | None, *, now: float | None = None) -> None:
        """Raise AccessDenied unless `token` grants reading `session` now.

        The error never says whether the session exists.
        """
        if not token:
            raise AccessDenied("a stream token is required", status_code=401)
        expiry_text, _, signature = token.partition(".")
        well_formed = expiry_text.isascii() and expiry_text.isdigit() and len(expiry_text) <= 12
        if not well_formed or not signature or not signature.isascii():
            raise AccessDenied("invalid stream token")
        expiry = int(expiry_text)
        valid = False
        for secret in self._secrets:  # check all, so timing does not tell which one matched
            valid |= hmac.compare_digest(_sign(secret, session, expiry), signature)
        if not valid:
            raise AccessDenied("invalid stream token")
        if expiry < (now if now is not None else time.time()):
            raise AccessDenied("stream token expired", status_code=401)


def _sign(secret: bytes, session: str, expiry: int) -> str:
    digest = hmac.new(secret, f"{session}.{expiry}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()
