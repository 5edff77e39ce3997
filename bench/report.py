"""Turning runs into results: medians, targets, the readable table, JSON and SVG charts."""

from __future__ import annotations

import json
import operator
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.charts import percentile_chart
from bench.stats import median_of

Figures = dict[str, Any]


@dataclass(frozen=True)
class Target:
    """One performance target: where its figure is, how it compares, the limit."""

    scenario: str
    label: str
    path: tuple[str, ...]
    compare: Callable[[float, float], bool]
    limit: float

    def figure(self, summary: Figures) -> float | None:
        value: Any = summary
        for key in self.path:
            if not isinstance(value, dict) or key not in value:
                return None
            value = value[key]
        return float(value)


_LE, _GE, _LT = operator.le, operator.ge, operator.lt
#: bridge Redis connections allowed during S5: two pools of 64 and two blocking readers
REDIS_CLIENTS_LIMIT = 2 * 64 + 2

TARGETS = (
    Target("S1", "added latency p99 (ms) <= 5", ("added_ms", "p99"), _LE, 5),
    Target("S1", "bridge CPU us/token <= 120", ("cpu_us_per_token", "bridge"), _LE, 120),
    Target("S2", "added latency p99 (ms) <= 25", ("added_ms", "p99"), _LE, 25),
    Target("S2", "bridge CPU us/token <= 40", ("cpu_us_per_token", "bridge"), _LE, 40),
    Target("S3", "sessions within limits >= 300", ("capacity_sessions",), _GE, 300),
    Target("S4", "lost tokens = 0", ("lost",), _LE, 0),
    Target("S4", "duplicate tokens = 0", ("duplicates",), _LE, 0),
    Target("S4", "first token after reconnect p99 (ms) <= 10",
           ("reconnect_first_token_ms", "p99"), _LE, 10),
    Target("S5", "bridge memory KiB/connection <= 10", ("memory_kib_per_connection",), _LE, 10),
    Target("S5", f"Redis connections <= {REDIS_CLIENTS_LIMIT} (not one per SSE)",
           ("redis_clients_during",), _LE, REDIS_CLIENTS_LIMIT),
    Target("S5", "connections refused = 0", ("refused",), _LE, 0),
    Target("S5", "2,000 connections open in < 2 s", ("open_all_s",), _LT, 2),
)  # fmt: skip


def summarize(runs: dict[str, list[Figures]]) -> dict[str, Figures]:
    """Medians per scenario over its repeats."""
    return {name: median_of(results) for name, results in runs.items() if results}


def check_targets(summary: dict[str, Figures]) -> list[dict[str, Any]]:
    rows = []
    for target in TARGETS:
        if target.scenario not in summary:
            continue
        value = target.figure(summary[target.scenario])
        met = value is not None and target.compare(value, target.limit)
        rows.append({"scenario": target.scenario, "target": target.label, "median": value,
                     "met": met})  # fmt: skip
    return rows


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:.0f}"
    return str(value)


def _table(head: list[str], rows: list[list[Any]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(_cell(v) for v in row) + " |" for row in rows]
    return [*lines, ""]


def _ratio(value: float, floor: float) -> float | None:
    return round(value / floor, 1) if floor > 0 else None


def markdown(meta: Figures, summary: dict[str, Figures], runs: dict[str, list[Figures]]) -> str:
    """The readable report: targets, latency, CPU per token, the ramp and idle figures."""
    out = [
        f"Date {meta['date']}, machine {meta['machine']}, layout `{meta['layout']}`, "
        f"medians of {meta['repeats']} run(s); load average {meta['load_before']} before, "
        f"{meta['load_after']} after.",
        "",
        "**Targets**",
        "",
    ]
    targets = check_targets(summary)
    out += _table(
        ["scenario", "target", "median", "met"],
        [[t["scenario"], t["target"], t["median"], "yes" if t["met"] else "NO"] for t in targets],
    )
    latency_rows, cpu_rows = [], []
    for name, fig in summary.items():
        if "added_ms" not in fig:
            continue
        floor = fig.get("floor", {})
        up, rd = (
            floor.get("upstream", {}).get("added_ms", {}),
            floor.get("redis", {}).get("added_ms", {}),
        )
        floor50 = up.get("p50", 0.0) + rd.get("p50", 0.0)
        floor99 = up.get("p99", 0.0) + rd.get("p99", 0.0)
        added = fig["added_ms"]
        latency_rows.append([
            name, added["p50"], added["p99"], added["p999"], floor50, floor99,
            _ratio(added["p50"], floor50), _ratio(added["p99"], floor99),
            fig["ttft_ms"]["p50"], fig["ttft_ms"]["p99"],
            fig["lost"], fig["duplicates"], fig["out_of_order"], fig["incomplete"],
        ])  # fmt: skip
        cpu = fig["cpu_us_per_token"]
        cpu_rows.append([
            name, cpu.get("serve"), cpu.get("worker"), cpu.get("bridge"), cpu.get("redis"),
            cpu.get("upstream"), cpu.get("loadgen"),
            _ratio(cpu.get("bridge") or 0.0, cpu.get("upstream") or 0.0),
            fig["tokens_per_s"], fig.get("pace"),
        ])  # fmt: skip
    if latency_rows:
        out += [
            "**Added latency (ms)**: receive time minus the upstream's write time; floor ="
            " upstream read directly + Redis XADD->XREAD wake-up; ratio = bridge / floor",
            "",
        ]
        out += _table(
            ["scenario", "p50", "p99", "p99.9", "floor p50", "floor p99", "x p50", "x p99",
             "TTFT p50", "TTFT p99", "lost", "dup", "order", "incomplete"],
            latency_rows,
        )  # fmt: skip
        out += [
            "**CPU microseconds per delivered token**; x upstream = bridge / upstream, the"
            " fake upstream's code being the same in every run (it moves less with the"
            " machine's speed); pace: the rate the answers were generated at, as a fraction"
            " of the scenario's",
            "",
        ]
        out += _table(
            ["scenario", "serve", "worker", "bridge", "redis", "upstream", "loadgen",
             "x upstream", "tokens/s", "pace"],
            cpu_rows,
        )  # fmt: skip
    if "S4" in summary and "reconnect_first_token_ms" in summary["S4"]:
        reconnect = summary["S4"]["reconnect_first_token_ms"]
        out += [f"**S4 resume**: {summary['S4'].get('reconnects')} reconnects; first token after "
                f"reconnect p50 {reconnect['p50']} ms, p99 {reconnect['p99']} ms.", ""]  # fmt: skip
    for index, run in enumerate(runs.get("S3", []), 1):
        out += [f"**S3 ramp, run {index}**: capacity {run['capacity_sessions']} sessions", ""]
        out += _table(
            ["sessions", "passed", "concurrent", "p50 ms", "p99 ms", "lost", "incomplete",
             "tokens/s", "pace", "bridge us/token"],
            [[s["sessions"], s["passed"], s.get("concurrent"), s["added_ms"]["p50"],
              s["added_ms"]["p99"], s["lost"], s["incomplete"], s["tokens_per_s"], s.get("pace"),
              s["cpu_us_per_token"]["bridge"]]
             for s in run["steps"]],
        )  # fmt: skip
    if "S5" in summary:
        idle = summary["S5"]
        cpu = idle["idle_cpu_percent"]
        out += ["**S5 idle**", ""]
        out += _table(
            ["connections", "opened", "open all (s)", "open p99 (ms)", "KiB/conn",
             "Redis conns before", "Redis conns during", "idle CPU % serve", "idle CPU % redis"],
            [[idle["connections"], idle["opened"], idle["open_all_s"], idle["open_ms"]["p99"],
              idle["memory_kib_per_connection"], idle["redis_clients_before"],
              idle["redis_clients_during"], cpu.get("serve"), cpu.get("redis")]],
        )  # fmt: skip
    return "\n".join(out)


def charts(runs: dict[str, list[Figures]]) -> dict[str, str]:
    """One SVG per scenario: file name -> SVG text."""
    svgs = {}
    for name, results in runs.items():
        series: list[tuple[str, list[tuple[float, float]]]] = []
        if name == "S3":
            for step in results[0]["steps"]:
                series.append((f"{step['sessions']} sessions", step["curve"]))
            svgs[name] = percentile_chart(
                f"{name} ramp: added latency by step (run 1)", series, limit=("p99 limit", 250)
            )
        elif name == "S5":
            series = [(f"run {i}", r["curve"]) for i, r in enumerate(results, 1)]
            svgs[name] = percentile_chart(
                f"{name} idle: time until each connection opened",
                series,
                y_label="ms since the first connect",
                limit=("2 s", 2000),
            )
        else:
            for i, r in enumerate(results, 1):
                series.append((f"bridge, run {i}", r["curve"]))
            for i, r in enumerate(results, 1):
                series.append((f"upstream floor, run {i}", r["floor"]["upstream"]["curve"]))
            svgs[name] = percentile_chart(f"{name}: added latency per token", series)
    return {f"{name}.svg": svg for name, svg in svgs.items()}


def write(out_dir: Path, meta: Figures, runs: dict[str, list[Figures]]) -> tuple[Path, str]:
    """Write results.json, summary.md and the charts; returns the JSON path and the table."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarize(runs)
    document = {"meta": meta, "targets": check_targets(summary), "summary": summary, "runs": runs}
    json_path = out_dir / "results.json"
    json_path.write_text(json.dumps(document, indent=1) + "\n")
    table = markdown(meta, summary, runs)
    (out_dir / "summary.md").write_text(table + "\n")
    for file_name, svg in charts(runs).items():
        (out_dir / file_name).write_text(svg)
    return json_path, table
