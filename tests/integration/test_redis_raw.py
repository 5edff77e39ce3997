"""RawConnection: hand-packed commands on a dedicated connection, raw replies, clean failures."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis
from hypothesis import given
from hypothesis import strategies as st
from redis.connection import Connection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from bridge.redis_raw import RawConnection, pack
from bridge.redis_select import make_client
from bridge.settings import Settings
from tests.redis_fixtures import free_port

pytestmark = pytest.mark.integration


@given(st.lists(st.one_of(st.binary(), st.text(), st.integers(min_value=0))))
def test_pack_matches_redis_py(args: list[bytes | str | int]) -> None:
    """Our packing is byte for byte what redis-py sends for the same arguments."""
    # (the command name goes first: redis-py splits a first argument holding spaces)
    assert pack("EVALSHA", *args) == b"".join(Connection().pack_command("EVALSHA", *args))


async def test_pipelined_replies_come_back_in_order_with_errors_in_place(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Three commands in one write: the failing one's error sits in its place, and the
    connection stays usable for the next call."""
    raw = RawConnection(redis, name="TEST")
    key = f"{key_prefix}n"
    results = await raw.call(
        [pack("INCRBY", key, 2), pack("HGET", key, "f"), pack("INCRBY", key, 3)], 3
    )
    assert results[0] == 2
    assert isinstance(results[1], ResponseError)
    assert "WRONGTYPE" in str(results[1])
    assert results[2] == 5
    assert await raw.call(pack("GET", key)) == [b"5"]


async def test_a_timeout_disconnects_so_no_stale_reply_is_read_later(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A call that times out raises redis-py's TimeoutError; the late reply of that call is
    never taken for the next call's (the connection was dropped and is made anew)."""
    raw = RawConnection(redis, name="TEST")
    key = f"{key_prefix}list"
    with pytest.raises(RedisTimeoutError):
        await raw.call(pack("BLPOP", key, 1), timeout_s=0.1)
    await redis.rpush(key, "late")  # would answer the abandoned BLPOP on the old connection
    assert await raw.call(pack("LLEN", key)) == [1]
    assert await raw.call(pack("PING")) == [b"PONG"]


async def test_each_call_and_read_gets_its_own_deadline(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """One watchdog timer serves the connection's calls: a short deadline after a long one
    still fires in time, a read times out like a call, and a call outliving an earlier
    call's deadline is left alone (the watchdog moves on to the call under way)."""
    raw = RawConnection(redis, name="TEST")
    key = f"{key_prefix}list"
    assert await raw.call(pack("PING"), timeout_s=0.3) == [b"PONG"]  # armed at +0.3 s
    assert await raw.call(pack("BLPOP", key, "0.6"), timeout_s=5) == [None]  # runs past it
    assert await raw.call(pack("PING"), timeout_s=30) == [b"PONG"]  # armed at +30 s
    started = time.monotonic()
    with pytest.raises(RedisTimeoutError):
        await raw.call(pack("BLPOP", key, 5), timeout_s=0.2)
    assert time.monotonic() - started < 4  # its own 0.2 s, not the 30 s armed before
    await raw.send(pack("BLPOP", key, 5))
    with pytest.raises(RedisTimeoutError):
        await raw.read(timeout_s=0.2)
    await redis.rpush(key, "late")  # would answer an abandoned BLPOP
    assert await raw.call(pack("LLEN", key)) == [1]


async def test_cancellation_mid_call_leaves_the_connection_clean(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """A caller cancelled while waiting for a reply does not leave that reply behind."""
    raw = RawConnection(redis, name="TEST")
    key = f"{key_prefix}list"
    task = asyncio.create_task(raw.call(pack("BLPOP", key, 2)))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await redis.rpush(key, "x")
    assert await raw.call(pack("LPOP", key)) == [b"x"]


async def test_closing_the_client_closes_the_checked_out_connection(
    redis_url: str, settings: Settings
) -> None:
    """The connection belongs to the client's pool: the client's aclose() closes it too."""
    client = make_client(redis_url, settings)
    raw = RawConnection(client, name="TEST")
    assert await raw.call(pack("PING")) == [b"PONG"]
    conn = raw._conn
    assert conn is not None
    assert conn.is_connected
    await client.aclose()
    assert not conn.is_connected


async def test_send_now_read_later_keeps_replies_in_order(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Commands sent in one write are read one reply at a time, across other awaits: the
    fan-out reader sends a read and its next blocking read together."""
    raw = RawConnection(redis, name="TEST")
    key = f"{key_prefix}list"
    await raw.send(pack("PING") + pack("BLPOP", key, 2))
    assert await raw.read() == b"PONG"
    await redis.rpush(key, "x")  # answers the BLPOP already waiting on the server
    assert await raw.read() == [key.encode(), b"x"]


async def test_a_listener_takes_replies_as_they_arrive_and_read_gets_what_it_returns(
    redis: aioredis.Redis,
) -> None:
    """A listener sees each reply when none waits before it: a reply it returns None for is
    never read, what it returns is read in the reply's place, so is an exception it raises
    (as an error reply is); a reply arriving behind one still waiting is queued as it came (order
    is kept); and the listener serves the connection made after a reconnect."""
    seen: list[Any] = []

    def listener(reply: Any) -> Any:
        seen.append(reply)
        if reply == b"PONG":
            return None
        if reply == b"boom":
            raise ValueError("the listener failed")
        return ("kept", reply)

    raw = RawConnection(redis, name="TEST")
    raw.listen(listener)
    await raw.send(pack("PING") + pack("ECHO", "a"))
    assert await raw.read() == ("kept", b"a")
    assert seen == [b"PONG", b"a"]
    await raw.send(pack("ECHO", "boom"))
    failed = await raw.read()
    assert isinstance(failed, ValueError)
    assert str(failed) == "the listener failed"
    await raw.send(pack("ECHO", "x") + pack("ECHO", "y"))
    await asyncio.sleep(0.05)  # both replies arrive before the first is read
    assert await raw.read() == ("kept", b"x")
    assert await raw.read() == b"y"
    assert seen[-1] == b"x"
    (client_id,) = await raw.call(pack("CLIENT", "ID"))  # its reply went through the listener
    await redis.client_kill_filter(_id=client_id[1])
    for _ in range(100):
        if not raw.connected:
            break
        await asyncio.sleep(0.01)
    assert await raw.call(pack("ECHO", "z")) == [("kept", b"z")]


async def test_reading_before_anything_was_sent_is_an_error(redis: aioredis.Redis) -> None:
    with pytest.raises(RedisConnectionError):
        await RawConnection(redis, name="TEST").read()


async def test_a_connection_the_server_closed_is_made_anew_by_the_next_call(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """Killed while idle, the connection is noticed closed and the next call reconnects; a
    call under way when it is killed fails with redis-py's ConnectionError."""
    raw = RawConnection(redis, name="TEST")
    (first_id,) = await raw.call(pack("CLIENT", "ID"))
    await redis.client_kill_filter(_id=first_id)
    for _ in range(100):
        if not raw.connected:
            break
        await asyncio.sleep(0.01)
    assert not raw.connected
    (second_id,) = await raw.call(pack("CLIENT", "ID"))
    assert second_id != first_id
    blocked = asyncio.create_task(raw.call(pack("BLPOP", f"{key_prefix}list", 5)))
    await asyncio.sleep(0.1)
    await redis.client_kill_filter(_id=second_id)
    with pytest.raises(RedisConnectionError):
        await blocked
    assert await raw.call(pack("PING")) == [b"PONG"]


@pytest.fixture
def tls_redis(tmp_path: Path) -> Iterator[tuple[str, str]]:
    """A redis-server speaking TLS only, with a self-signed certificate: (URL, CA file).
    Skipped where redis-server or openssl is missing, or the server was built without TLS."""
    server, openssl = shutil.which("redis-server"), shutil.which("openssl")
    if server is None or openssl is None:
        pytest.skip("needs redis-server and openssl")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [
            *(openssl, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"),
            *("-keyout", str(key), "-out", str(cert), "-subj", "/CN=localhost"),
            *("-addext", "subjectAltName=IP:127.0.0.1"),
        ],
        check=True,
        capture_output=True,
    )
    port = free_port()
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                *(server, "--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"),
                *("--tls-cert-file", str(cert), "--tls-key-file", str(key)),
                *("--tls-ca-cert-file", str(cert), "--save", "", "--appendonly", "no"),
                *("--dir", str(tmp_path)),
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 10
        while True:
            if process.poll() is not None:
                pytest.skip(f"redis-server without TLS: {log.read_text()[-300:]}")
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield f"rediss://127.0.0.1:{port}", str(cert)
    finally:
        process.terminate()
        process.wait(timeout=10)


async def test_a_tls_connection_is_taken_over_like_a_plain_one(
    tls_redis: tuple[str, str],
) -> None:
    """Over TLS, the connection redis-py made (handshake included) carries the packed
    commands: pipelined replies, a reply larger than a TLS record, a read after a send, and
    closing the client closes it."""
    url, ca_file = tls_redis
    client = aioredis.Redis.from_url(url, ssl_ca_certs=ca_file)
    try:
        raw = RawConnection(client, name="TEST")
        big = "x" * 100_000
        assert await raw.call([pack("PING"), pack("ECHO", big)], 2) == [b"PONG", big.encode()]
        await raw.send(pack("BLPOP", "tls-list", "0.1"))
        assert await raw.read() is None
        assert raw.connected
    finally:
        await client.aclose()
    assert not raw.connected


async def test_a_server_that_accepts_but_never_answers_fails_the_call_in_time(
    settings: Settings,
) -> None:
    """Connecting includes redis-py's handshake: a server that takes the connection and
    says nothing fails the call within the client's timeouts, never hangs it."""

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await reader.read(-1)  # takes what it is sent, answers nothing
        finally:
            writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = make_client(f"redis://127.0.0.1:{port}", settings, socket_timeout=0.3, retries=0)
    try:
        raw = RawConnection(client, name="TEST")
        started = time.monotonic()
        with pytest.raises((RedisTimeoutError, RedisConnectionError)):
            await raw.call(pack("PING"), timeout_s=0.5)
        assert time.monotonic() - started < 5
        assert not raw.connected
    finally:
        await client.aclose()
        server.close()
        await server.wait_closed()


async def test_written_commands_are_due_until_answered_then_the_connection_stays(
    redis: aioredis.Redis, key_prefix: str
) -> None:
    """`write` gives its replies the connection's timeout: a reply that does not come in time
    closes the connection and `on_lost` hears a TimeoutError; once `answered` says every
    reply arrived, an idle connection outlives the timeout."""
    raw = RawConnection(redis, name="TEST", timeout_s=0.2)
    heard: list[Any] = []
    lost: list[Exception] = []
    replied, ended = asyncio.Event(), asyncio.Event()
    raw.listen(
        lambda reply: heard.append(reply) or replied.set(),
        lambda error: lost.append(error) or ended.set(),
    )
    await raw.connect()
    assert raw.write([pack("PING")])
    await asyncio.wait_for(replied.wait(), 5)
    raw.answered()
    await asyncio.sleep(0.5)
    assert raw.connected
    assert not lost
    assert raw.write([pack("BLPOP", f"{key_prefix}empty", 2)])
    await asyncio.wait_for(ended.wait(), 5)
    assert isinstance(lost[0], RedisTimeoutError)
    assert not raw.connected
    assert heard == [b"PONG"]
