"""The default batch backend: a slow mock model with random delays and a fixed answer.

    python -m bridge.batching.mock_model [--delay-ms MIN-MAX] [--fail-after STEPS] FILE...

The protocol every batch backend speaks: its arguments are one file per request of the
batch, holding that request's context as UTF-8 (files, so no text needs escaping). It
writes to stdout one line per chunk, `<index>\\t<JSON string>`, where `<index>` is the
request's position (0-based), and `<index>\\tnull` once that request is done; it flushes
each line, so the bridge can stream it at once. Exit status 0 means success.

Like a batched model, the mock advances every request one step at a time: a random delay,
then one chunk for each request. The first chunk echoes the context (proof that it arrived
intact), the rest are fixed text.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

FIXED = (
    "The slow model has read your context",
    " and thought about it for a while.",
    " Here is its fixed answer:",
    " forty-two.",
)


def answer(context: str) -> list[str]:
    """The chunks the mock writes for `context`, in order."""
    return [f"You said: {context}\n", *FIXED]


def _delays(spec: str) -> tuple[float, float]:
    low, _, high = spec.partition("-")
    return float(low) / 1000, float(high or low) / 1000


def main(argv: list[str] | None = None) -> int:
    """Run the mock on the given files; returns the exit status."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--delay-ms", default="50-300", help="random delay before each step")
    parser.add_argument("--fail-after", type=int, default=None, help="exit 3 after N steps")
    parser.add_argument("files", nargs="+")
    args = parser.parse_args(argv)
    low, high = _delays(args.delay_ms)
    answers = [answer(Path(name).read_text(encoding="utf-8")) for name in args.files]
    for step in range(len(FIXED) + 1):
        if step == args.fail_after:
            print(f"mock model: failing after {step} steps as asked", file=sys.stderr)
            return 3
        time.sleep(random.uniform(low, high))
        for index, chunks in enumerate(answers):
            print(f"{index}\t{json.dumps(chunks[step])}", flush=True)
    for index in range(len(answers)):
        print(f"{index}\tnull", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
