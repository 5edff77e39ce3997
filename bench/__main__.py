"""`python -m bench`: run the scenarios, print the table, write JSON, Markdown and SVG charts.

    python -m bench                      # S1-S5, 3 runs each, medians; bench/results/<date>/
    python -m bench -s S1 -s S4 -r 1     # a selection, one run
    python -m bench --smoke              # a few sessions and tokens per scenario (CI)

Every run of a scenario gets fresh processes (Redis, fake upstream, bridge), so no run
inherits another's memory or keys; runs are interleaved (S1 S2 ... S1 S2 ...) so drift in
the machine's load spreads over all scenarios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import os
import platform
import resource
import subprocess
import sys
from pathlib import Path
from typing import Any

import psutil

from bench import report
from bench.floor import redis_floor, upstream_floor
from bench.progress import Progress
from bench.scenarios import (
    SCENARIOS,
    SMOKE,
    Scenario,
    run_idle,
    run_ramp,
    run_tokens,
    shapes_of,
    warm_up,
)
from bench.stack import LAYOUTS, ROOT, Stack
from bridge.cli import run_async


async def run_scenario(stack: Stack, scenario: Scenario, progress: Progress) -> dict[str, Any]:
    """The floors measured on this stack, then the scenario itself."""
    await warm_up(stack, progress)
    if scenario.kind == "idle":
        return await run_idle(stack, scenario, progress)
    shape = scenario.shape
    sessions = scenario.steps[0] if scenario.steps else shape.sessions
    floor = {
        "upstream": await upstream_floor(stack, sessions * shape.connections, shape.rate, progress),
        "redis": await redis_floor(stack, sessions, shape.rate, progress),
    }
    if scenario.kind == "ramp":
        figures = await run_ramp(stack, scenario, progress)
    else:
        figures = await run_tokens(stack, shape, progress)
    return figures | {"floor": floor}


def _one_line(name: str, figures: dict[str, Any]) -> str:
    if "capacity_sessions" in figures:
        return f"{name}: capacity {figures['capacity_sessions']} sessions"
    if "open_all_s" in figures:
        return (
            f"{name}: {figures['opened']} open in {figures['open_all_s']} s, "
            f"{figures['memory_kib_per_connection']} KiB/conn"
        )
    added, cpu = figures["added_ms"], figures["cpu_us_per_token"]
    return (
        f"{name}: p50 {added['p50']} ms p99 {added['p99']} ms, lost {figures['lost']}, "
        f"dup {figures['duplicates']}, bridge {cpu['bridge']} us/token"
    )


def machine() -> str:
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.partition(":")[2].strip()
                break
    memory = psutil.virtual_memory().total / 2**30
    return f"{platform.node()} ({os.cpu_count()} cores, {model}, {memory:.0f} GiB)"


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def _commit() -> str:
    with contextlib.suppress(OSError, subprocess.CalledProcessError):
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, check=True
        )
        return out.stdout.decode().strip()
    return "unknown"


async def run_bench(args: argparse.Namespace) -> Path:
    table = SMOKE if args.smoke else SCENARIOS
    scenarios = [table[name] for name in args.scenario or sorted(table)]
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%d-%H%M%S")
    out_dir = Path(args.out) / stamp
    meta: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "python": platform.python_version(),
        "commit": _commit(),
        "layout": args.layout,
        "repeats": args.repeats,
        "smoke": args.smoke,
        "load_before": _load(),
    }
    progress = Progress(quiet=args.quiet)
    ticker = asyncio.create_task(progress.run())
    runs: dict[str, list[dict[str, Any]]] = {s.name: [] for s in scenarios}
    try:
        for repeat in range(1, args.repeats + 1):
            for scenario in scenarios:
                label = f"run {repeat}/{args.repeats} {scenario.name} {scenario.title}"
                progress.begin(label)
                logs = out_dir / "logs" / f"{scenario.name}-{repeat}"
                stack = Stack(logs, shapes_of(scenarios), layout=args.layout)
                try:
                    await stack.start()
                    figures = await run_scenario(stack, scenario, progress)
                finally:
                    await stack.stop()
                runs[scenario.name].append(figures | {"load": _load()})
                progress.say(f"{label}: {_one_line(scenario.name, figures)} (load {_load()})")
    finally:
        ticker.cancel()
    meta["load_after"] = _load()
    json_path, text = report.write(out_dir, meta, runs)
    print(text)
    print(f"results: {json_path}")
    return json_path


def _raise_file_limit() -> None:
    """Thousands of sockets: lift the soft descriptor limit to the hard one (children too)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "-s",
        "--scenario",
        action="append",
        choices=sorted(SCENARIOS),
        help="a scenario to run (repeatable; default: all)",
    )
    parser.add_argument("-r", "--repeats", type=int, default=3, help="runs per scenario")
    parser.add_argument(
        "-o",
        "--out",
        default=str(ROOT / "bench" / "results"),
        help="results directory (a dated folder is made inside)",
    )
    parser.add_argument(
        "--layout",
        choices=LAYOUTS,
        default="split",
        help="split: serve --no-worker + worker; single: serve with its worker",
    )
    parser.add_argument("--smoke", action="store_true", help="tiny scenarios: seconds, for CI")
    parser.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error("--repeats must be at least 1")
    _raise_file_limit()
    run_async(run_bench(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
