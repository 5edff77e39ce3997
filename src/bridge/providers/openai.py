"""OpenAI-compatible chat completions, streamed over SSE with one long-lived httpx client.

Every httpx failure is mapped to bridge's `ProviderError` tree in `_upstream_errors`, the
only place that knows httpx's exception classes. The API key goes only into the
Authorization header: it is scrubbed from anything the upstream says before that text
reaches an error message.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import httpx
import msgspec

from bridge.errors import ConfigError, ProviderError, ProviderTimeout, ProviderUnavailable
from bridge.providers.base import Delta, Finish, ProviderRequest, Usage
from bridge.providers.transport import StreamingTransport, raw_chunks

_MAX_LINE_BYTES = 1 << 20  # a longer SSE line means the upstream is not speaking SSE
_MAX_ERROR_BYTES = 64 * 1024
_MAX_DETAIL_CHARS = 500
_DRAIN_TIMEOUT_S = 1.0


class _Error(msgspec.Struct):
    message: str = ""


class _ErrorBody(msgspec.Struct):
    error: _Error | str | None = None


class _Delta(msgspec.Struct):
    content: str | None = None


class _Choice(msgspec.Struct):
    index: int = 0
    delta: _Delta | None = None
    finish_reason: str | None = None


class _Usage(msgspec.Struct):
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    total_tokens: int | None = None


class _Chunk(msgspec.Struct):
    choices: list[_Choice] | None = None
    usage: _Usage | None = None
    error: _Error | str | None = None


_chunk_decoder = msgspec.json.Decoder(_Chunk)
_error_decoder = msgspec.json.Decoder(_ErrorBody)


def _error_text(error: _Error | str | None) -> str:
    text = error.message if isinstance(error, _Error) else (error or "")
    return text.strip()[:_MAX_DETAIL_CHARS]


class _SSEChunks:
    """Turns the response bytes into delta texts, remembering the finish reason and usage."""

    def __init__(self, scrub: Callable[[str], str]) -> None:
        self._scrub = scrub
        self._pending = b""
        self.done = False  # `data: [DONE]` seen
        self.finish_reason: str | None = None
        self.usage: Usage | None = None

    def feed(self, data: bytes) -> Iterator[str]:
        """The delta texts of the complete lines in `data`; ignores anything after [DONE].

        A generator, so the texts before a bad line are yielded before its error is raised.
        """
        lines = (self._pending + data).split(b"\n")
        self._pending = lines.pop()
        if len(self._pending) > _MAX_LINE_BYTES:
            raise ProviderError("provider_protocol_error", "upstream sent an overlong SSE line")
        return self._lines(lines)

    def end(self) -> Iterator[str]:
        """The delta texts of a last line that had no newline, at the end of the body."""
        pending, self._pending = self._pending, b""
        return self._lines([pending])

    def finish(self) -> Finish:
        """The final event; a stream with neither [DONE] nor a finish reason was cut short."""
        if not self.done and self.finish_reason is None:
            raise ProviderError(
                "provider_protocol_error", "the stream ended without a finish reason or [DONE]"
            )
        return Finish(reason=self.finish_reason or "stop", usage=self.usage)

    def _lines(self, lines: list[bytes]) -> Iterator[str]:
        for line in lines:
            if self.done:
                return
            if line.startswith(b"data:"):
                text = self._event(line[5:].strip())
                if text:
                    yield text

    def _event(self, payload: bytes) -> str | None:
        if payload == b"[DONE]":
            self.done = True
            return None
        try:
            chunk = _chunk_decoder.decode(payload)
        except msgspec.DecodeError as exc:
            message = f"upstream sent a bad chunk: {exc}"
            raise ProviderError("provider_protocol_error", message) from exc
        if chunk.error is not None:
            detail = self._scrub(_error_text(chunk.error)) or "no message"
            raise ProviderError("provider_protocol_error", f"upstream error mid-stream: {detail}")
        if chunk.usage is not None:
            prompt = chunk.usage.prompt_tokens or 0
            completion = chunk.usage.completion_tokens or 0
            total = chunk.usage.total_tokens or prompt + completion
            self.usage = Usage(
                prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
            )
        text = None
        for choice in chunk.choices or ():
            if choice.index == 0:
                self.finish_reason = choice.finish_reason or self.finish_reason
                text = choice.delta.content if choice.delta is not None else None
        return text


@contextlib.contextmanager
def _upstream_errors(host: str, read_timeout_s: float | None) -> Iterator[None]:
    """Map httpx's exceptions to bridge's; httpx's messages carry no headers, so no key."""
    try:
        yield
    except httpx.ConnectTimeout as exc:
        raise ProviderTimeout(f"connecting to {host} timed out") from exc
    except httpx.PoolTimeout as exc:
        raise ProviderTimeout(f"no free connection to {host} in time") from exc
    except httpx.TimeoutException as exc:
        raise ProviderTimeout(f"{host} sent nothing for {read_timeout_s}s") from exc
    except httpx.ConnectError as exc:
        raise ProviderUnavailable(f"cannot connect to {host}: {exc}") from exc
    except (httpx.RemoteProtocolError, httpx.ReadError) as exc:
        message = f"the stream from {host} broke: {exc}"
        raise ProviderError("provider_stream_broken", message, retryable=True) from exc
    except httpx.TransportError as exc:
        raise ProviderUnavailable(f"request to {host} failed: {type(exc).__name__}") from exc
    except httpx.HTTPError as exc:
        message = f"bad response from {host}: {type(exc).__name__}: {exc}"
        raise ProviderError("provider_protocol_error", message) from exc


class OpenAIProvider:
    """Streams `POST {base_url}/chat/completions` from any OpenAI-compatible server.

    `client` lets tests or a host application share an httpx client; the provider then
    leaves closing it to its owner. Otherwise it owns one with explicit limits.
    """

    name = "openai"

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        connect_timeout_s: float,
        read_timeout_s: float,
        client: httpx.AsyncClient | None = None,
        *,
        max_connections: int = 256,
    ) -> None:
        try:
            url = httpx.URL(base_url.rstrip("/") + "/chat/completions")
        except httpx.InvalidURL as exc:
            raise ConfigError(f"OPENAI_BASE_URL is not a URL: {exc}") from None
        if url.scheme not in ("http", "https") or not url.host:
            raise ConfigError("OPENAI_BASE_URL must be an http(s) URL")
        self._url = url
        self._host = url.host if url.port is None else f"{url.host}:{url.port}"
        self._api_key = api_key or None
        self._headers = {"Accept": "text/event-stream", "Content-Type": "application/json"}
        if self._api_key:
            self._headers["Authorization"] = f"Bearer {self._api_key}"
        # the read timeout bounds the gap between two chunks, not the whole answer
        self._timeout = httpx.Timeout(
            connect=connect_timeout_s,
            read=read_timeout_s,
            write=read_timeout_s,
            pool=connect_timeout_s,
        )
        self._owns_client = client is None
        self._client = client or httpx.AsyncClient(
            timeout=self._timeout,
            transport=StreamingTransport(max_connections=max_connections, keepalive_expiry=30.0),
        )

    async def stream(self, request: ProviderRequest) -> AsyncIterator[Delta | Finish]:
        """Yield the upstream's deltas, then one `Finish`; failures raise `ProviderError`."""
        body: dict[str, Any] = {
            "model": request.model,
            "messages": request.messages,
            "stream": True,
            "stream_options": {"include_usage": True},
            **request.params,
        }
        try:
            content = msgspec.json.encode(body)
        except (TypeError, msgspec.EncodeError) as exc:
            raise ProviderError("provider_bad_request", f"params are not JSON: {exc}") from None
        sse = _SSEChunks(self._scrub)
        with _upstream_errors(self._host, self._timeout.read):
            async with self._client.stream(
                "POST", self._url, content=content, headers=self._headers, timeout=self._timeout
            ) as response:
                if not response.is_success:
                    raise await self._status_error(response)
                chunks = raw_chunks(response)
                async for data in chunks:
                    for text in sse.feed(data):
                        yield Delta(text)
                    if sse.done:
                        break
                else:
                    for text in sse.end():
                        yield Delta(text)
                yield sse.finish()
                if sse.done:
                    await _drain(chunks)

    async def aclose(self) -> None:
        """Close the httpx client if this provider created it."""
        if self._owns_client:
            await self._client.aclose()

    async def _status_error(self, response: httpx.Response) -> ProviderError:
        status = response.status_code
        raw = bytearray()
        async for data in response.aiter_bytes():
            raw += data
            if len(raw) >= _MAX_ERROR_BYTES:
                break
        try:
            detail = self._scrub(_error_text(_error_decoder.decode(raw).error))
        except msgspec.DecodeError:
            detail = ""
        said = f": {detail}" if detail else ""
        if status in (401, 403):
            message = f"upstream rejected the credentials (HTTP {status}){said}"
            return ProviderError("provider_auth", message, status=status)
        if status == 429:
            message = f"upstream rate limit (HTTP 429){said}"
            return ProviderError("provider_rate_limited", message, retryable=True, status=status)
        if 400 <= status < 500:
            message = detail or f"upstream refused the request (HTTP {status})"
            return ProviderError("provider_bad_request", message, status=status)
        message = f"upstream answered HTTP {status}{said}"
        return ProviderError("provider_http_error", message, retryable=status >= 500, status=status)

    def _scrub(self, text: str) -> str:
        return text.replace(self._api_key, "[redacted]") if self._api_key else text


async def _drain(chunks: AsyncIterator[bytes]) -> None:
    """Read what follows [DONE], normally just the body's end, so the connection is reused."""
    with contextlib.suppress(httpx.HTTPError, TimeoutError):
        async with asyncio.timeout(_DRAIN_TIMEOUT_S):
            async for _ in chunks:
                pass
