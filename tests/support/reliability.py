"""The reliability tests' harness: sizes, measurements, servers, a child process.

The reliability tests (``test_reliability_*.py``) check integrity under load,
slow, stuck and abrupt peers, resource exhaustion, hostile input, handler
faults, shutdown under load, and leaks. Every test talks to a real server
over 127.0.0.1 (or a Unix socket), bounded in count and in time. The long
variants (the sizes issue 6 names) are the ``soak`` parameters (see
:func:`params`), skipped unless ``TRIOSERVE_SOAK=1``::

    TRIOSERVE_SOAK=1 python -m pytest tests/test_reliability_*.py -rP

Tests that measure something print one ``RELIABILITY ...`` line (see
:func:`report`; shown with ``-rP`` or ``-s``): throughput, file descriptors
and memory before and after.

Tests that need to measure the server alone (its peak memory, its file
descriptors under a low ``RLIMIT_NOFILE``) run it as a :class:`Child`: the
``python -m trioserve echo`` command, or ``reliability_server.py`` beside
this file, a line-echo service.
"""

from __future__ import annotations

import contextlib
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

import trioserve

SOAK = bool(os.environ.get("TRIOSERVE_SOAK"))
soak_only = pytest.mark.skipif(not SOAK, reason="soak test: set TRIOSERVE_SOAK=1")

# Seconds a soak variant may take: it moves hundreds of MiB or makes 100,000
# connections through one Python process on a machine that may be busy.
SOAK_TIMEOUT = 900

# Bounds on waits that a passing test never reaches (they only turn a hang
# into a failure), generous because the machine may be busy.
IO_TIMEOUT = 30.0
STARTUP_TIMEOUT = 20.0

RELIABILITY_SERVER = Path(__file__).with_name("reliability_server.py")


def params(default: tuple[Any, ...], soak: tuple[Any, ...]) -> list[Any]:
    """The default sizes, and the soak sizes skipped unless TRIOSERVE_SOAK=1."""
    return [
        pytest.param(*default, id="default"),
        pytest.param(
            *soak,
            id="soak",
            marks=[pytest.mark.soak, soak_only, pytest.mark.timeout(SOAK_TIMEOUT)],
        ),
    ]


def report(name: str, **numbers: object) -> None:
    """Print the numbers a test measured, on one line (see ``-rP``)."""
    shown = " ".join(f"{key}={value}" for key, value in numbers.items())
    print(f"RELIABILITY {name}: {shown}")


def memory_kib(field: str, pid: int | str = "self") -> int:
    """A ``/proc/PID/status`` memory field in KiB: VmRSS now, VmHWM its peak."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def process_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# Chunk sizes come from three ranges, so tiny writes mix with large ones.
CHUNK_RANGES = ((1, 16), (1, 1500), (1, 65536))


def random_chunk_size(rng: random.Random) -> int:
    """A write's size: tiny, packet-sized or large, at random."""
    return rng.randint(*rng.choice(CHUNK_RANGES))


def assert_stats_add_up(stats: trioserve.ServerStats) -> None:
    """Every accepted request ended in exactly one way, and none is running."""
    ended = (
        stats.rejected
        + stats.dropped
        + stats.completed
        + stats.failed
        + stats.timed_out
        + stats.disconnected
        + stats.cancelled
    )
    assert stats.active == 0, stats
    assert stats.accepted == ended, stats


def count_tasks() -> int:
    """How many Trio tasks exist in this run, the root task's tree included."""

    def walk(task: trio.lowlevel.Task) -> int:
        return 1 + sum(
            walk(child)
            for nursery in task.child_nurseries
            for child in nursery.child_tasks
        )

    root = trio.lowlevel.current_root_task()
    assert root is not None
    return walk(root)


class ClosedRequests:
    """Counts requests the server has closed; lets a test wait for a number."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = trio.Event()

    def add(self) -> None:
        self.count += 1
        self._changed.set()
        self._changed = trio.Event()

    async def wait_for(self, count: int) -> None:
        while self.count < count:
            await self._changed.wait()


class CountingTCPServer(trioserve.TCPServer):
    """A TCPServer that counts requests once they are closed.

    ``shutdown_request`` is awaited last in every request's task, after the
    counters in ``stats`` are updated, so waiting for ``closed`` is waiting
    for the server to be done with those requests.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.closed = ClosedRequests()

    async def shutdown_request(self, request: Any) -> None:
        try:
            await super().shutdown_request(request)
        finally:
            self.closed.add()


class ByteEcho(trioserve.StreamRequestHandler):
    """Echoes every byte as it arrives, whatever the framing."""

    async def handle(self) -> None:
        while chunk := await self.rfile.read1():
            await self.wfile.write(chunk)


async def reset(stream: trio.abc.Stream) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    if isinstance(stream, trio.SSLStream):
        stream = stream.transport_stream
    assert isinstance(stream, trio.SocketStream)
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


def cpu_seconds(pid: int) -> float:
    """User and system CPU time the process has used."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Child:
    """A server subprocess: its stdout line by line, its stderr in a file."""

    def __init__(self, argv: list[str]) -> None:
        # Closed in close(); a file, not a pipe, so nobody has to drain it.
        self._stderr = tempfile.TemporaryFile()  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=self._stderr
        )
        self.pid = self.proc.pid
        self._stdout = b""

    def line(self, timeout: float = STARTUP_TIMEOUT) -> str:
        """The next line on stdout, without its newline."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        deadline = time.monotonic() + timeout
        with selectors.DefaultSelector() as selector:
            selector.register(fd, selectors.EVENT_READ)
            while b"\n" not in self._stdout:
                remaining = deadline - time.monotonic()
                assert remaining > 0, f"no line in {timeout} s: {self.stderr()}"
                if selector.select(remaining):
                    data = os.read(fd, 65536)
                    assert data, f"stdout closed: {self.stderr()}"
                    self._stdout += data
        line, _, self._stdout = self._stdout.partition(b"\n")
        return line.decode()

    def stderr(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")

    def stop(self, timeout: float = IO_TIMEOUT) -> tuple[int, str, str]:
        """SIGTERM, then wait; return ``(returncode, rest of stdout, stderr)``."""
        self.proc.send_signal(signal.SIGTERM)
        out, _ = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, (self._stdout + out).decode(), self.stderr()

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.communicate(timeout=IO_TIMEOUT)
        self._stderr.close()


@contextlib.contextmanager
def child(*args: str) -> Iterator[Child]:
    process = Child([sys.executable, "-W", "error::ResourceWarning", *args])
    try:
        yield process
    finally:
        process.close()
