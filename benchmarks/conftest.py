"""Prints, after a benchmark run, each group's times as ratios to the group's peer.

Every benchmark declares ``benchmark.group`` and marks its peer with ``extra_info["peer"] = True``.
Absolute times on shared machines mean little; the ratio within one run is what we report.
"""

from __future__ import annotations

from collections import defaultdict


def pytest_terminal_summary(terminalreporter, config):  # noqa: ANN001, ANN201
    session = getattr(config, "_benchmarksession", None)
    benchmarks = [b for b in getattr(session, "benchmarks", []) if getattr(b, "stats", None)]
    if not benchmarks:
        return
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench.group].append(bench)
    terminalreporter.section("ratios to the peer (median time / peer median time; < 1 means faster)")
    for group, items in groups.items():
        peers = [b for b in items if b.extra_info.get("peer")]
        if len(peers) != 1:
            terminalreporter.write_line(f"{group}: needs exactly one peer, found {len(peers)}")
            continue
        peer_median = peers[0].stats.median
        for bench in items:
            ratio = bench.stats.median / peer_median
            terminalreporter.write_line(f"{group:32s} {bench.name:48s} {bench.stats.median * 1e3:10.2f} ms  ratio {ratio:6.3f}")
            for label, values in bench.extra_info.get("quality", {}).items():  # how good the result is, beside its cost
                shown = "  ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in values.items())
                terminalreporter.write_line(f"{'':32s}   quality of {label}: {shown}")
