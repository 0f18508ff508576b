"""The benchmark harness, benchmarks/run.py, runs end to end.

A smoke test: it asserts nothing about speed, only that the harness builds
its C load generator, starts and stops the servers (one trioserve process,
and a supervisor with two workers, over TCP and UDP), measures a load with
idle connections held beside it, and writes its report. A few seconds.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

RUN_PY = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"
IDLE_HELD = 300

pytestmark = [
    pytest.mark.skipif(sys.platform != "linux", reason="the harness needs Linux"),
    pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler (cc)"),
]


@pytest.mark.timeout(180)
def test_quick_run_with_workers_and_idle_connections(tmp_path: Path) -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(RUN_PY),
            "--only",
            "trioserve,trioserve-2w,tcp-100,udp-50,idle-10k+100",
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
