"""Fleet-wide rate limits and quotas in Redis, shared by every process.

Algorithm: a sliding-window counter per limit and subject (one hash: window index, count in
this window, count in the previous one). The estimate is `previous * (unelapsed share of the
window) + current`, which smooths the burst a fixed window allows at its boundary, in O(1)
memory. Time comes from Redis (`TIME` inside the script), so processes with skewed clocks
agree, and each check-and-count is one atomic Lua call over all the limits it involves: a
request is counted against every limit or against none.

Limits (0 turns one off): requests per minute per API key tenant (`addr:<ip>` when the service
runs open) and per session; tokens per minute per tenant and per session, charged while the
worker streams (`TokenMeter`); unfinished generations per session.
"""

from __future__ import annotations

from typing import Any

import msgspec
from redis.asyncio import Redis

from bridge.errors import RateLimited
from bridge.settings import Settings
from bridge.streams.keys import Keys

WINDOW_MS = 60_000
TOKEN_BLOCK = 16  # tokens reserved per round trip while generating; the unused rest is refunded
ADMISSION_GRACE_MS = 30_000  # an admitted generation may take this long to show up in Redis
ADMISSION_RETRY_S = 5

WINDOW_SCRIPT = """
-- KEYS: one counter hash per limit.
-- ARGV: window ms, mode ('all' | 'upto'), then per limit: max, cost.
-- 'all': every limit must fit its cost (cost 0: must not be exhausted); all counted or none.
-- 'upto': grant as much of the first cost (<= it) as every limit allows, at least 1.
-- Returns {granted, retry ms, number of the limit that refused (0: none)}.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local window = tonumber(ARGV[1])
local index = math.floor(now / window)
local elapsed = now - index * window
local left = (window - elapsed) / window
local counts, refusal, retry = {}, 0, 0
local grant = tonumber(ARGV[4])

local function wait_ms(c, p, need, max)
  local excess = p * left + c + need - max
  if p > 0 and excess <= p * left then return math.ceil(excess * window / p) end
  local after = c + need - max  -- at the boundary this window becomes the previous one
  if after <= 0 then return window - elapsed end
  if c <= 0 or need > max then return 2 * window end
  return window - elapsed + math.ceil(after * window / c)
end

for i = 1, #KEYS do
  local max, cost = tonumber(ARGV[1 + 2 * i]), tonumber(ARGV[2 + 2 * i])
  local h = redis.call('HMGET', KEYS[i], 'w', 'c', 'p')
  local w, c, p = tonumber(h[1]), tonumber(h[2]) or 0, tonumber(h[3]) or 0
  if w == index - 1 then p, c = c, 0 elseif w ~= index then c, p = 0, 0 end
  counts[i] = {c, p}
  local estimate = p * left + c
  local need = math.max(cost, 1)
  if ARGV[2] == 'upto' then
    grant = math.min(grant, math.floor(max - estimate))
    need = 1
  end
  if estimate + need > max then
    local wait = wait_ms(c, p, need, max)
    if wait > retry then retry, refusal = wait, i end
  end
end
if refusal > 0 then return {0, retry, refusal} end
for i = 1, #KEYS do
  local cost = tonumber(ARGV[2 + 2 * i])
  if ARGV[2] == 'upto' then cost = grant end
  redis.call('HSET', KEYS[i], 'w', index, 'c', counts[i][1] + cost, 'p', counts[i][2])
  redis.call('PEXPIRE', KEYS[i], 2 * window)
end
if ARGV[2] == 'upto' then return {grant, 0, 0} end
return {1, 0, 0}
"""

REFUND_SCRIPT = """
-- KEYS: counter hashes. ARGV: window ms, amount. Takes back an unused reservation (if the
-- window rolled over since, the newer count is credited: off by at most one block, briefly).
local t = redis.call('TIME')
local index = math.floor((tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)) / ARGV[1])
for i = 1, #KEYS do
  local h = redis.call('HMGET', KEYS[i], 'w', 'c')
  local w, c = tonumber(h[1]), tonumber(h[2])
  if w and c and w >= index - 1 then
    redis.call('HSET', KEYS[i], 'c', math.max(c - tonumber(ARGV[2]), 0))
  end
end
return 0
"""

ADMIT_SCRIPT = """
-- KEYS[1]: the session's active set. ARGV: max, request id, generation key prefix,
-- lease ms, admission grace ms. Forgets generations that ended (terminal status, expired
-- hash, or lease over), then admits the new one if there is room. Returns 1 or 0.
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - tonumber(ARGV[4]))
local members = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
for i = 1, #members, 2 do
  local status = redis.call('HGET', ARGV[3] .. members[i], 'status')
  local young = tonumber(members[i + 1]) > now - tonumber(ARGV[5])
  if status == 'complete' or status == 'error' or status == 'cancelled'
     or (not status and not young) then
    redis.call('ZREM', KEYS[1], members[i])
  end
end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[1]) then return 0 end
redis.call('ZADD', KEYS[1], now, ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
return 1
"""


class Limit(msgspec.Struct, frozen=True):
    """One limit on one subject: what clients are told, its counter key, its maximum."""

    name: str
    key: str
    maximum: int


class RateLimiter:
    """Checks and counts the limits of `settings` in Redis."""

    def __init__(self, redis: Redis, keys: Keys, settings: Settings) -> None:
        self._redis = redis
        self._keys = keys
        self._settings = settings
        self._window = redis.register_script(WINDOW_SCRIPT)
        self._refund = redis.register_script(REFUND_SCRIPT)
        self._admit = redis.register_script(ADMIT_SCRIPT)

    def limits(self, unit: str, principal: str, session: str) -> list[Limit]:
        """The configured per-minute limits of `unit` (requests | tokens) that apply."""
        s = self._settings
        by_key, by_session = {
            "requests": (s.rate_key_rpm, s.rate_session_rpm),
            "tokens": (s.rate_key_tpm, s.rate_session_tpm),
        }[unit]
        limits = []
        if by_key and principal:
            name = f"{unit} per minute per API key"
            limits.append(Limit(name, self._keys.rate(unit, f"k:{principal}"), by_key))
        if by_session:
            name = f"{unit} per minute per session"
            limits.append(Limit(name, self._keys.rate(unit, f"s:{session}"), by_session))
        return limits

    async def admit_request(self, principal: str, session: str) -> None:
        """Count one request of `principal` on `session`; raise RateLimited over a limit."""
        limits = self.limits("requests", principal, session)
        await self.count(limits, [1] * len(limits))

    async def admit_generation(self, principal: str, session: str, request_id: str) -> None:
        """Count a request that starts a generation; raise RateLimited over a limit.

        Token limits are only checked here (some budget must be left to start); the worker
        charges the tokens as they are produced, through a `TokenMeter`.
        """
        requests = self.limits("requests", principal, session)
        tokens = self.limits("tokens", principal, session)
        await self.count([*requests, *tokens], [1] * len(requests) + [0] * len(tokens))
        maximum = self._settings.max_generations_per_session
        if not maximum:
            return
        lease_ms = int(self._settings.generation_deadline_s * 1000) + ADMISSION_GRACE_MS
        admitted = await self._admit(
            keys=[self._keys.active_generations(session)],
            args=[maximum, request_id, self._keys.generation(""), lease_ms, ADMISSION_GRACE_MS],
        )
        if not admitted:
            raise RateLimited(
                "concurrent generations per session",
                ADMISSION_RETRY_S,
                f"this session already runs {maximum} generations; retry when one has ended",
            )

    async def count(self, limits: list[Limit], costs: list[int], *, upto: bool = False) -> int:
        """Check and count `costs` against `limits` in one atomic step; return what was granted.

        `upto`: grant as much of `costs[0]` as every limit allows (at least 1). Otherwise all
        costs are counted or, if one limit refuses, none; a cost of 0 only checks that its
        limit is not exhausted. Raises RateLimited naming the limit that refused.
        """
        if not limits:
            return costs[0] if upto and costs else 1
        args: list[Any] = [WINDOW_MS, "upto" if upto else "all"]
        for limit, cost in zip(limits, costs, strict=True):
            args += [limit.maximum, cost]
        granted, retry_ms, refused = await self._window(
            keys=[limit.key for limit in limits], args=args
        )
        if refused:
            raise RateLimited(limits[refused - 1].name, retry_ms / 1000)
        return int(granted)

    async def refund(self, limits: list[Limit], amount: int) -> None:
        """Take back `amount` counted but unused (a reservation's rest)."""
        if limits and amount > 0:
            await self._refund(keys=[limit.key for limit in limits], args=[WINDOW_MS, amount])

    def meter(self, principal: str, session: str) -> TokenMeter:
        """A meter for one generation of `principal` in `session`."""
        return TokenMeter(self, self.limits("tokens", principal, session), principal)

    async def record_usage(self, principal: str, tokens: int) -> None:
        """Add one generation and its `tokens` to the principal's usage counters."""
        key = self._keys.tenant_usage(principal)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.hincrby(key, "generations", 1)
            pipe.hincrby(key, "completionTokens", tokens)
            await pipe.execute()


class TokenMeter:
    """Charges one generation's tokens to its tokens-per-minute limits while it streams.

    Tokens are reserved `TOKEN_BLOCK` at a time (one round trip per block, not per token);
    `settle()` refunds the unused rest and records the principal's usage, so what stays
    counted is exactly what was produced. When a limit refuses, `take()` returns False: the
    worker stops the generation with an `error` event built by `exceeded()`.
    """

    def __init__(self, limiter: RateLimiter, limits: list[Limit], principal: str) -> None:
        self._limiter = limiter
        self._limits = limits
        self._principal = principal
        self._reserved = 0
        self.spent = 0
        self.refusal: RateLimited | None = None

    async def take(self) -> bool:
        """Charge one token; False if a limit has no room left for it."""
        if self._limits and self._reserved == 0:
            try:
                self._reserved = await self._limiter.count(
                    self._limits, [TOKEN_BLOCK] * len(self._limits), upto=True
                )
            except RateLimited as refusal:
                self.refusal = refusal
                return False
        self._reserved = max(self._reserved - 1, 0)
        self.spent += 1
        return True

    def exceeded(self) -> dict[str, Any]:
        """The `error` event payload after a refusal: the limit, when to retry, usage so far."""
        refusal = self.refusal or RateLimited("tokens per minute", 60)
        return {
            "code": "rate_limited",
            "message": f"stopped after {self.spent} tokens: {refusal.detail}",
            "limit": refusal.limit,
            "retryAfter": refusal.retry_after_s,
            "usage": {"completionTokens": self.spent},
        }

    async def settle(self) -> None:
        """Refund the unused reservation and record usage (call once, when the generation ends)."""
        reserved, self._reserved = self._reserved, 0
        await self._limiter.refund(self._limits, reserved)
        if self._principal:
            await self._limiter.record_usage(self._principal, self.spent)
