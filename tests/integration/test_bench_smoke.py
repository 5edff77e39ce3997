"""The benchmark suite keeps working: a smoke run of every scenario, a few sessions each.

Timing is never asserted here (benchmarks are not pass/fail tests); correctness is.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]


def run_module(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    """`python -m <args>` from this checkout, without the caller's bridge settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BRIDGE_", "OPENAI_"))}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(ROOT)])
    return subprocess.run(
        [sys.executable, "-m", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def table_rows(stdout: str) -> list[list[str]]:
    """The cells of a Markdown table printed after its header and rule lines."""
    return [line.split("|")[1:-1] for line in stdout.splitlines()[2:]]


def test_bench_smoke_run_completes_without_loss(tmp_path: Path) -> None:
    """`python -m bench --smoke` runs S1-S5 on its own processes and writes its results."""
    done = run_module(
        "bench", "--smoke", "--repeats", "1", "--quiet", "--out", str(tmp_path), timeout=280
    )
    assert done.returncode == 0, done.stderr[-4000:]
    [results] = tmp_path.glob("*/results.json")
    document = json.loads(results.read_text())
    runs = document["runs"]
    assert sorted(runs) == ["S1", "S2", "S3", "S4", "S5"]
    for name in ("S1", "S2", "S4"):
        [run] = runs[name]
        assert (name, run["lost"], run["duplicates"], run["incomplete"]) == (name, 0, 0, 0)
        assert run["delivered"] == run["expected"]
        assert run["pace"] > 0  # the rate the answers were generated at was measured
    assert runs["S4"][0]["reconnects"] == runs["S4"][0]["connections"]
    [ramp] = runs["S3"]
    assert ramp["steps"], ramp
    for step in ramp["steps"]:  # a step may fail on latency (a busy machine), never on loss
        assert (step["lost"], step["duplicates"], step["incomplete"]) == (0, 0, 0), step
        assert step["pace"] > 0, step
        assert step["concurrent"] >= 1, step
    [idle] = runs["S5"]
    assert idle["alive_after_hold"] == idle["connections"]
    assert (results.parent / "summary.md").read_text().startswith("Date ")
    assert {p.name for p in results.parent.glob("*.svg")} == {f"S{i}.svg" for i in range(1, 6)}


def test_fanout_cost_smoke_run_prints_every_design() -> None:
    """`python -m bench.fanout_cost` runs (a few entries) and reports, per design, Redis time
    in commands and of CPU per entry."""
    done = run_module("bench.fanout_cost", "--entries", "50", "--sessions", "5", "50")
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert [int(row[0]) for row in rows] == [5, 50]
    for row in rows:
        figures = [float(part) for cell in row[1:] for part in cell.split(" / ")]
        assert len(figures) == 6, row
        assert all(figure > 0 for figure in figures), row


@pytest.mark.parametrize(("recent_s", "source"), [("0", "redis"), ("600", "memory")])
def test_reconnect_cost_smoke_run_reports_both_modes(recent_s: str, source: str) -> None:
    """`python -m bench.reconnect_cost` runs (a few sessions) and reports a row per mode,
    with every catch-up answered by the source `--recent-s` chooses."""
    done = run_module(
        "bench.reconnect_cost", "--sessions", "3", "--rounds", "2", "--recent-s", recent_s
    )
    assert done.returncode == 0, done.stderr
    rows = table_rows(done.stdout)
    assert [row[0].strip() for row in rows] == ["one at a time", "bursts of 3"]
    assert all(float(row[1]) > 0 for row in rows)  # a token came after every reconnect
    assert all(int(row[3]) >= 0 for row in rows)  # CPU is read in 10 ms ticks: may be 0 here
    assert [row[4].strip() for row in rows] == [f"6 {source}", f"6 {source}"]


def test_writer_cost_smoke_run_reports_every_write() -> None:
    """`python -m bench.writer_cost` runs (a few streams) and every token reached every one:
    each ASGI stream writes its start, the first comment, one write per token and its end;
    each push stream one write per token (counted once live)."""
    done = run_module(
        "bench.writer_cost",
        "--sessions",
        "2",
        "--connections",
        "3",
        "--tokens",
        "5",
        "--rounds",
        "1",
    )
    assert done.returncode == 0, done.stderr
    asgi, push, messages = table_rows(done.stdout)
    assert [asgi[0].strip(), asgi[1].strip()] == ["ASGI (a task each)", "2 x 3"]
    assert int(asgi[3]) == 2 * 3 * (2 + 5 + 1)
    assert float(asgi[4]) > 0
    assert [push[0].strip(), push[1].strip()] == ["push (bridge serve)", "2 x 3"]
    assert int(push[3]) == 2 * 3 * 5
    assert float(push[4]) > 0
    assert messages[0].strip() == "push, from the fan-out's messages"
    assert int(messages[3]) == 2 * 3 * 5  # every message parsed and delivered to every stream
    assert float(messages[4]) > 0


def test_worker_cost_smoke_run_writes_every_token() -> None:
    """`python -m bench.worker_cost` runs (two answers of five tokens) and reports a figure;
    it fails if any answer lost a token on its way to Redis."""
    done = run_module(
        "bench.worker_cost", "--sessions", "2", "--tokens", "5", "--delay-ms", "0", "--rounds", "1"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("worker CPU per token: ")
    assert float(done.stdout.split()[4]) > 0
