"""The seed systems under the security model (docs/security.md), through a real server with
API keys: producers need a key and are rate limited per key; reads by a minted id do not."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import websockets
from websockets.exceptions import InvalidStatus

from bridge.auth import hash_key
from tests.seed_server import recv
from tests.servers import BridgeProcess, bridge_env, serving

pytestmark = pytest.mark.integration

KEYS = {"alpha": f"bk_test_{uuid.uuid4().hex}", "beta": f"bk_test_{uuid.uuid4().hex}"}
RPM_PER_KEY = 3


@pytest.fixture(scope="module")
def server(redis_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[BridgeProcess]:
    """`bridge serve` with two API keys, 3 requests per minute per key, slow WebSocket refill."""
    prefix = f"test:{uuid.uuid4().hex[:12]}:"
    env = bridge_env(
        redis_url,
        prefix,
        BRIDGE_API_KEYS=",".join(f"{t}:{hash_key(k)}" for t, k in KEYS.items()),
        BRIDGE_RATE_KEY_RPM=str(RPM_PER_KEY),
        BRIDGE_WS_MESSAGES_PER_S="0.1",
        BRIDGE_WS_MESSAGE_BURST="2",
        BRIDGE_SEED_STREAMS="off",
    )
    with serving(
        ["serve"], env, str(tmp_path_factory.mktemp("logs") / "keys.log"), redis_url, prefix
    ) as process:
        yield process


@pytest.fixture
async def anonymous(server: BridgeProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.base_url, timeout=10) as http:
        yield http


def bearer(tenant: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {KEYS[tenant]}"}


async def test_job_submission_needs_a_key_but_reading_a_job_does_not(
    anonymous: httpx.AsyncClient,
) -> None:
    """Submit and cancel are 401 without a key; status, result and stream take the job id."""
    refused = await anonymous.post("/llm/submit", json={"text": "hi"})
    assert refused.status_code == 401
    assert (await anonymous.post("/llm/cancel/" + "0" * 32)).status_code == 401
    submitted = await anonymous.post("/llm/submit", json={"text": "hi"}, headers=bearer("alpha"))
    assert submitted.status_code == 200
    job_id = submitted.json()["job_id"]
    assert (await anonymous.get(f"/llm/status/{job_id}")).status_code == 200
    async with anonymous.stream("GET", f"/llm/stream/{job_id}") as stream:
        assert stream.status_code == 200


async def test_job_submissions_count_against_the_keys_rate_limit(
    anonymous: httpx.AsyncClient,
) -> None:
    """Each job is a generation under the per-key requests-per-minute limit: 429 past it."""
    statuses = []
    for _ in range(RPM_PER_KEY + 1):
        response = await anonymous.post("/llm/submit", json={"text": "x"}, headers=bearer("beta"))
        statuses.append(response.status_code)
    assert statuses == [200] * RPM_PER_KEY + [429]
    assert int(response.headers["retry-after"]) >= 1


async def test_the_page_is_public_and_generate_is_not(anonymous: httpx.AsyncClient) -> None:
    """`GET /` needs no key; `/generate` starts work, so it does."""
    assert (await anonymous.get("/")).status_code == 200
    assert (await anonymous.get("/generate?context=x")).status_code == 401


async def test_the_websocket_needs_a_key_and_limits_message_rate(server: BridgeProcess) -> None:
    """The upgrade is refused without a key; with one, messages past the burst are answered
    with an error naming the limit, and the connection stays."""
    url = server.base_url.replace("http://", "ws://") + "/ws/"
    with pytest.raises(InvalidStatus) as refused:
        async with websockets.connect(url):
            pass
    # an ASGI server answers a WebSocket refused before `accept` with 403
    assert refused.value.response.status_code == 403
    async with websockets.connect(url, additional_headers=bearer("alpha")) as ws:
        for _ in range(3):
            await ws.send(json.dumps({"type": "nope"}))
        replies = [await recv(ws) for _ in range(3)]
    assert [r["type"] for r in replies] == ["error", "error", "error"]
    assert replies[0]["message"].startswith("unknown message type")
    assert "WebSocket messages per second" in replies[2]["message"]
    assert replies[2]["retryAfter"] >= 1
