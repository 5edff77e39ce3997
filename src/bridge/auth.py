"""API keys for producers: who may start, cancel and submit work, and under which tenant.

Configuration holds only SHA-256 digests (`BRIDGE_API_KEYS="tenant:<hex>,..."`; `bridge hash-key`
prints one), so a leaked configuration leaks no key, and keys are never logged. A presented key
is hashed and compared with every configured digest in constant time. Several keys may map to
one tenant (rotation: add the new key, move clients, remove the old one).

Routes opt out of API keys through their `opt["auth"]`: `public` (health, schema, metrics),
`stream_token` (session reads: the handler checks the stream token), `capability` (reads by an
id the server minted at random). Every other route requires a key once keys are configured, so
a route added later is closed by default.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from typing import TYPE_CHECKING, Any

import msgspec

from bridge.errors import AccessDenied, ConfigError
from bridge.streams.keys import ID_PATTERN

if TYPE_CHECKING:
    from litestar.connection import ASGIConnection
    from litestar.handlers.base import BaseRouteHandler

OPEN_AUTH = frozenset({"public", "stream_token", "capability"})
KEY_PREFIX = "bk_"
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_TENANT = re.compile(ID_PATTERN)


class ApiKeyEntry(msgspec.Struct, frozen=True):
    """One configured key: its tenant and the SHA-256 digest of the key (hex)."""

    tenant: str
    digest: str


def hash_key(key: str) -> str:
    """The hex SHA-256 digest of `key`, the form configuration stores."""
    return _digest(key).hex()


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


def generate_key() -> str:
    """A new random API key (256 bits); the prefix lets secret scanners recognise it."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def parse_api_keys(spec: str) -> tuple[ApiKeyEntry, ...]:
    """Parse `tenant:sha256hex`, comma-separated. Errors never echo the value (it may be a key)."""
    entries: list[ApiKeyEntry] = []
    for number, item in enumerate(filter(None, (p.strip() for p in spec.split(","))), start=1):
        tenant, _, digest = item.partition(":")
        digest = digest.strip().lower()
        if not _TENANT.fullmatch(tenant.strip()) or not _DIGEST.fullmatch(digest):
            raise ConfigError(
                f"BRIDGE_API_KEYS entry {number} is not tenant:<SHA-256 hex of the key>; "
                "store the hash (`bridge hash-key`), never the key itself"
            )
        entries.append(ApiKeyEntry(tenant.strip(), digest))
    return tuple(entries)


def bearer(connection: ASGIConnection[Any, Any, Any, Any]) -> str | None:
    """The credentials of an `Authorization: Bearer ...` header, if there is one."""
    return bearer_credentials(connection.headers.get("authorization", ""))


def bearer_credentials(authorization: str) -> str | None:
    """The credentials of an `Authorization` header value if its scheme is Bearer."""
    scheme, _, value = authorization.partition(" ")
    value = value.strip()
    return value if scheme.lower() == "bearer" and value else None


class ApiKeys:
    """Checks presented API keys against the configured digests."""

    def __init__(self, entries: tuple[ApiKeyEntry, ...]) -> None:
        self._entries = [(entry.tenant, bytes.fromhex(entry.digest)) for entry in entries]

    @property
    def enabled(self) -> bool:
        """False when no key is configured: the service runs open."""
        return bool(self._entries)

    def tenant_of(self, key: str | None) -> str:
        """The tenant `key` belongs to; raise AccessDenied (401) for a missing or unknown key."""
        if not key:
            raise AccessDenied(
                "an API key is required (Authorization: Bearer <key>)", status_code=401
            )
        digest = _digest(key)
        found: str | None = None
        for tenant, expected in self._entries:  # check all, so timing does not tell which
            if hmac.compare_digest(digest, expected) and found is None:
                found = tenant
        if found is None:
            raise AccessDenied("the API key is not valid", status_code=401)
        return found

    async def guard(
        self, connection: ASGIConnection[Any, Any, Any, Any], handler: BaseRouteHandler
    ) -> None:
        """Litestar guard: require a key on every route not opted out; record its tenant."""
        if not self.enabled or handler.opt.get("auth") in OPEN_AUTH:
            return
        connection.state.tenant = self.tenant_of(bearer(connection))


def principal(connection: ASGIConnection[Any, Any, Any, Any]) -> str:
    """Whom limits and usage are charged to: the key's tenant, else the client's address."""
    tenant: str | None = connection.state.get("tenant")
    if tenant:
        return tenant
    client = connection.client
    return f"addr:{client.host if client else 'unknown'}"
