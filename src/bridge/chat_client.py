"""`bridge chat`: start a chat against a running server and print tokens as they arrive.

A dropped connection is resumed with `Last-Event-ID`, as a browser's EventSource would.
"""

from __future__ import annotations

import argparse
import json
import sys
import uuid
from typing import Any

import httpx

from bridge.sse_client import SSEParser

TERMINAL = {"complete", "error", "cancelled"}
MAX_RECONNECTS = 10


async def run_chat(args: argparse.Namespace) -> int:
    """Run the `chat` command; returns the process exit code."""
    async with httpx.AsyncClient(base_url=args.url, timeout=httpx.Timeout(10.0, read=None)) as http:
        if args.resume:
            return await follow(
                http, args.resume, request_id=None, last_event_id=args.last_event_id
            )
        if not args.prompt:
            print("bridge chat: a prompt is required (or --resume STREAM_URL)", file=sys.stderr)
            return 2
        body = {
            "sessionId": args.session or f"cli_{uuid.uuid4().hex[:12]}",
            "modelId": args.model,
            "prompt": args.prompt,
        }
        try:
            response = await http.post("/api/chat/start", json=body)
        except httpx.HTTPError as exc:
            print(f"bridge chat: cannot reach {args.url}: {exc}", file=sys.stderr)
            return 1
        if response.status_code != 202:
            print(f"bridge chat: {response.status_code} {_detail(response)}", file=sys.stderr)
            return 1
        started = response.json()
        print(f"stream: {args.url}{started['streamUrl']}", file=sys.stderr)
        return await follow(http, started["streamUrl"], request_id=started["requestId"])


async def follow(
    http: httpx.AsyncClient,
    stream_url: str,
    *,
    request_id: str | None,
    last_event_id: str | None = None,
) -> int:
    """Print the tokens of `request_id` (or of the first generation seen) until its end."""
    for _ in range(MAX_RECONNECTS):
        headers = {"Last-Event-ID": last_event_id} if last_event_id else {}
        parser = SSEParser()
        try:
            async with http.stream("GET", stream_url, headers=headers) as response:
                if response.status_code != 200:
                    await response.aread()
                    print(
                        f"bridge chat: {response.status_code} {_detail(response)}", file=sys.stderr
                    )
                    return 1
                async for chunk in response.aiter_raw():
                    for event in parser.feed(chunk):
                        last_event_id = event.id or last_event_id
                        payload: dict[str, Any] = json.loads(event.data)
                        if request_id is None and "requestId" in payload:
                            request_id = payload["requestId"]
                        if payload.get("requestId") not in (None, request_id):
                            continue
                        outcome = _show(event.event, payload)
                        if outcome is not None:
                            return outcome
        except httpx.HTTPError as exc:
            print(f"\n[reconnecting: {exc}]", file=sys.stderr)
    print("bridge chat: gave up after repeated disconnects", file=sys.stderr)
    return 1


def _show(event: str, payload: dict[str, Any]) -> int | None:
    if event == "token":
        sys.stdout.write(payload["content"])
        sys.stdout.flush()
    elif event == "seam":
        print(f"\n[generation taken over: {payload.get('mode')}]", file=sys.stderr)
    elif event == "gap":
        print(f"\n[gap: {payload.get('reason')}]", file=sys.stderr)
    elif event in TERMINAL:
        sys.stdout.write("\n")
        if event == "complete":
            return 0
        print(f"[{event}: {payload.get('message') or payload.get('code') or ''}]", file=sys.stderr)
        return 1
    return None


def _detail(response: httpx.Response) -> str:
    try:
        return str(response.json().get("detail"))
    except ValueError:
        return response.text[:200]
