"""HAProxy, a real one, in front of a server under test (Debian: apt haproxy)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

HAPROXY = shutil.which("haproxy")


def check_haproxy_config(config: Path, env: Mapping[str, str] | None = None) -> None:
    """``haproxy -c``: a bad configuration fails with HAProxy's own words."""
    assert HAPROXY is not None
    check = subprocess.run(
        [HAPROXY, "-c", "-f", str(config)],
        capture_output=True,
        timeout=30,
        check=False,
        env=env,
    )
    assert check.returncode == 0, check.stderr + check.stdout


def run_haproxy(config: Path) -> subprocess.Popen[bytes]:
    """Check ``config``, then run HAProxy with it in the foreground."""
    assert HAPROXY is not None
    check_haproxy_config(config)
    return subprocess.Popen(
        [HAPROXY, "-db", "-f", str(config)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )


def wait_for_port(
    port: int,
    proc: subprocess.Popen[bytes] | subprocess.Popen[str],
    *,
    greeted: bool = False,
) -> None:
    """Wait until HAProxy listens on ``port``, probing it with connections.

    With ``greeted``, the backend's handler speaks first, and a probe waits
    for its first byte before it hangs up: then HAProxy has surely relayed
    the probe whole, PROXY header and all. A probe that hangs up at once may
    make HAProxy abandon its backend connection before the header, which the
    server counts in ``stats.dropped``.
    """
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else b""
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as probe:
                if greeted:
                    assert probe.recv(1)
                return
        except OSError:
            time.sleep(0.05)
    raise AssertionError(f"HAProxy never listened on {port}")
