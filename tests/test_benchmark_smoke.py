"""The benchmark harness, benchmarks/run.py, runs end to end.

A smoke test: it asserts nothing about speed, only that the harness builds
its C load generator, starts and stops the servers (one trioserve process,
and a supervisor with two workers, over TCP and UDP, and the asyncio
Protocol peer, on uvloop too where uvloop is installed), measures a load
with idle connections held beside it, and writes its report. A few seconds.
Besides it, what the harness derives from trials (targets) and reads back
(the committed results), without running a server.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RUN_PY = REPO / "benchmarks" / "run.py"
IDLE_HELD = 300

# The harness is the package benchmarks/, beside trioserve/ (not installed).
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from benchmarks import catalog, figures  # noqa: E402
from benchmarks.records import Results, TargetCheck, Trial  # noqa: E402
from benchmarks.report import report_again  # noqa: E402

linux_only = pytest.mark.skipif(
    sys.platform != "linux", reason="the harness needs Linux"
)
needs_cc = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")

# The peers the quick run measures beside trioserve: the new ones.
PEERS = ["asyncio-protocol"]
if importlib.util.find_spec("uvloop") is not None:
    PEERS.append("uvloop")

LATENCY_KEPT = "idle-10k+100: p99 <= 1.25x tcp-100's (latency kept)"


def latency_target(idle_open: int) -> TargetCheck:
    """The latency target, from one trial of tcp-100 and one of idle-10k+100
    with 10,000 idle connections asked for and idle_open of them held."""
    configs = [c for c in catalog.CONFIGS if c.name in ("tcp-100", "idle-10k+100")]
    servers = [catalog.server_named("trioserve")]
    trials = {
        "tcp-100": {"trioserve": [Trial(rps=1000.0, p50_us=90.0, p99_us=100.0)]},
        "idle-10k+100": {
            "trioserve": [
                Trial(
                    rps=990.0,
                    p50_us=91.0,
                    p99_us=101.0,
                    idle_conns=10000,
                    idle_open=idle_open,
                )
            ]
        },
    }
    summary = figures.summarize(trials, configs)
    ratio_table = figures.ratios(summary, configs, servers)
    idle_table = figures.idle_load(summary, configs)
    checks = figures.check_targets(summary, ratio_table, idle_table)
    [check] = [c for c in checks if c.target == LATENCY_KEPT]
    return check


def test_latency_is_kept_beside_idle_connections_all_held() -> None:
    check = latency_target(idle_open=10000)
    assert (check.subject, check.value, check.met) == ("trioserve", 1.01, True)


def test_latency_is_not_kept_where_the_idle_connections_were_dropped() -> None:
    # The active load's p99 is as good as without idle connections because
    # most of them were gone: the target is missed, and the report says why.
    check = latency_target(idle_open=2000)
    assert check.met is False
    assert check.shown == "1.01x (2000 of 10000 idle held)"


def test_a_target_for_one_subject_is_checked_for_it_alone() -> None:
    configs = [c for c in catalog.CONFIGS if c.name == "connect"]
    subjects = ["trioserve-lines", "trioserve", "trioserve-lines@base"]
    servers = [catalog.server_named(n) for n in [*subjects, "asyncio", "trio"]]
    rps = {"trioserve-lines": 900.0, "trioserve": 1100.0}
    rps |= {"trioserve-lines@base": 800.0, "asyncio": 1000.0, "trio": 500.0}
    trials = {"connect": {n: [Trial(rps=r)] for n, r in rps.items()}}
    summary = figures.summarize(trials, configs)
    checks = figures.check_targets(
        summary, figures.ratios(summary, configs, servers), {}
    )
    checked = {(c.target, c.subject): (c.shown, c.met) for c in checks}
    obvious = "obvious handler, connect: >= 1.0x asyncio streams"
    built_in = "built-in echo, connect: >= 1.0x asyncio streams"
    assert {k: v for k, v in checked.items() if k[0] in (obvious, built_in)} == {
        (obvious, "trioserve-lines"): ("0.90x", False),
        (obvious, "trioserve-lines@base"): ("0.80x", False),
        (built_in, "trioserve"): ("1.10x", True),
    }
    # A target for no subject in particular is checked for every one.
    keep = "connect: >= 1.0x hand-written Trio"
    assert {s for t, s in checked if t == keep} == set(subjects)


def test_every_committed_result_reports_again(tmp_path: Path) -> None:
    committed = sorted((REPO / "benchmarks" / "results").glob("*.json"))
    assert committed
    for path in committed:
        output = tmp_path / path.stem
        report_again(path, output, chart=False)
        again = json.loads((output / "latest.json").read_text())
        assert again["summary"] == json.loads(path.read_text())["summary"]
        assert "Round trips per second" in (output / "latest.md").read_text()
    # Read back, a run is the same records it was written from.
    results = Results.from_json(again)
    assert Results.from_json(results.to_json()) == results


@pytest.mark.timeout(180)
@linux_only
@needs_cc
def test_quick_run_with_workers_and_idle_connections(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "--only",
            f"trioserve,trioserve-2w,{','.join(PEERS)},tcp-100,udp-50,idle-10k+100",
            "--repeat=1",
            "--warmup=0",
            "--duration=0.2",
            f"--idle-held={IDLE_HELD}",
            "--no-chart",
            "--no-lock",
            f"--output={tmp_path}",
        ],
        capture_output=True,
        text=True,
        timeout=170,
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    results = json.loads((tmp_path / "latest.json").read_text())
    summary = results["summary"]
    for config in ("tcp-100", "udp-50", "idle-10k+100"):
        for server in ("trioserve", "trioserve-2w"):
            entry = summary[config][server]
            assert entry["median"] > 0
            assert entry["errors"] == 0
            # SIGTERM stops the server, and the supervisor its workers,
            # gracefully: exit status 0, no process left behind.
            assert entry["server_exits"] == [0]
            assert entry["server_leftovers"] == 0
        assert summary[config]["trioserve-2w"]["server_processes"] >= 3
        for peer in PEERS:
            assert summary[config][peer]["median"] > 0
            assert summary[config][peer]["errors"] == 0
    assert set(results["scaling"]["trioserve-2w"]["ratios"]) == {
        "tcp-100",
        "udp-50",
        "idle-10k+100",
    }
    for entry in results["idle_load"]["idle-10k+100"].values():
        assert entry["idle_conns"] == entry["idle_open"] == IDLE_HELD
        assert entry["p99_ratio"] > 0
    # Idle CPUs are kept polling for the run wherever the kernel allows it
    # (root), and the report says which way it ran.
    polling = "polling (cpu_dma_latency 0)"
    if os.access("/dev/cpu_dma_latency", os.W_OK):
        assert results["machine"]["cpu_idle"] == polling
        assert f"idle CPUs {polling}" in (tmp_path / "latest.md").read_text()
    else:
        assert results["machine"]["cpu_idle"] == "halting allowed"
    assert "NOT a scaling measurement" in done.stdout or (
        len(results["settings"]["cpus"]) >= 3
    )
