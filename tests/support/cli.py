"""The command line, ``python -m trioserve``, run as a child process.

:func:`running` starts any command with its stdout and stderr read line by
line in threads (so reads have a timeout) and kills it on the way out;
:func:`run_echo` starts ``python -m trioserve echo`` (or another command) with
``-W error::ResourceWarning``; :class:`EchoCLI` reads its "serving" lines.
Plain blocking clients (:func:`tcp_echo`, :func:`udp_echo`) talk to it.
"""

from __future__ import annotations

import contextlib
import queue
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TypeVar

# How long to wait for the service to start, reply, or exit. Generous: these
# bound hangs, they are not what a passing test waits for.
STARTUP_TIMEOUT = 10.0
IO_TIMEOUT = 5.0
EXIT_TIMEOUT = 10.0
# The default shutdown_timeout is 5 s: a service that exits within this after
# SIGTERM did not wait out the grace period.
PROMPT_EXIT = 3.0

SERVING_LINE = re.compile(
    r"^trioserve: serving (?P<kind>TCP(?:\+TLS)?|UDP|METRICS) on "
    r"(?:\[(?P<host6>[^\]]+)\]|(?P<host4>[^:\[\]]+)):(?P<port>\d+)$"
)


class LineReader:
    """Reads a pipe line by line in a thread, so reads can have a timeout."""

    def __init__(self, stream: object) -> None:
        self.lines: list[str] = []
        self._queue: queue.Queue[str | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
        self._thread.start()

    def _run(self, stream: Iterator[str]) -> None:
        for line in stream:
            self.lines.append(line)
            self._queue.put(line)
        self._queue.put(None)

    def next_line(self, timeout: float = STARTUP_TIMEOUT) -> str | None:
        """The next line, without its newline; None at end of file."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(
                f"no line within {timeout} s; so far: {self.lines!r}"
            ) from None
        return None if line is None else line.rstrip("\n")

    def wait_for(self, text: str, timeout: float = STARTUP_TIMEOUT) -> str:
        """Read lines until one contains ``text``; return it."""
        deadline = time.monotonic() + timeout
        while True:
            line = self.next_line(max(0.0, deadline - time.monotonic()))
            if line is None:
                raise AssertionError(f"{text!r} never came; got {self.lines!r}")
            if text in line:
                return line

    def join(self, timeout: float = EXIT_TIMEOUT) -> str:
        """Wait for end of file; return everything read."""
        self._thread.join(timeout)
        assert not self._thread.is_alive(), "the pipe never reached end of file"
        return "".join(self.lines)


class Process:
    """A running subprocess, its output read line by line in threads."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        assert proc.stderr is not None
        self.stdout = LineReader(proc.stdout)
        self.stderr = LineReader(proc.stderr)


ProcessT = TypeVar("ProcessT", bound=Process)


@contextlib.contextmanager
def running(
    wrapper: type[ProcessT], argv: list[str], **popen: Any
) -> Iterator[ProcessT]:
    """Run ``argv``; kill it on the way out if it is still running."""
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )
    process = None
    try:
        process = wrapper(proc)
        yield process
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=EXIT_TIMEOUT)
        if process is not None:
            # The readers see end of file now that the process is gone;
            # let them finish before closing the pipes under them.
            process.stdout.join()
            process.stderr.join()
        assert proc.stdout is not None
        assert proc.stderr is not None
        proc.stdout.close()
        proc.stderr.close()


class EchoCLI(Process):
    """A running ``python -m trioserve echo`` and its output."""

    def listeners(self, count: int) -> list[tuple[str, str, int]]:
        """Read ``count`` "serving" lines; return ``(kind, host, port)`` each."""
        found = []
        for _ in range(count):
            line = self.stdout.next_line()
            assert line is not None, (
                f"exited before serving: rc={self.proc.wait(EXIT_TIMEOUT)}, "
                f"stderr={self.stderr.join()!r}"
            )
            match = SERVING_LINE.match(line)
            assert match, f"not a serving line: {line!r}"
            host = match["host6"] or match["host4"]
            port = int(match["port"])
            assert port != 0, line
            found.append((match["kind"], host, port))
        return found

    def wait(self, timeout: float = EXIT_TIMEOUT) -> int:
        return self.proc.wait(timeout=timeout)

    def finish(self, timeout: float = EXIT_TIMEOUT) -> tuple[int, str, str]:
        """Wait for exit; return ``(returncode, stdout, stderr)``."""
        rc = self.wait(timeout)
        return rc, self.stdout.join(), self.stderr.join()

    def stop(self, signum: int, timeout: float = EXIT_TIMEOUT) -> tuple[int, str, str]:
        self.proc.send_signal(signum)
        return self.finish(timeout)


def run_echo(
    *args: str,
    command: str = "echo",
    cwd: str | None = None,
    env: dict[str, str] | None = None,
) -> contextlib.AbstractContextManager[EchoCLI]:
    """``python -m trioserve COMMAND ARGS``; ``env`` replaces the environment."""
    argv = [sys.executable, "-W", "error::ResourceWarning", "-m", "trioserve"]
    if command:
        argv.append(command)
    return running(EchoCLI, [*argv, *args], cwd=cwd, env=env)


def assert_clean(stderr: str) -> None:
    assert "Traceback" not in stderr, stderr
    assert "ResourceWarning" not in stderr, stderr


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def tcp_echo(host: str, port: int, payload: bytes) -> None:
    with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
        client.sendall(payload)
        received = b""
        while len(received) < len(payload):
            chunk = client.recv(65536)
            assert chunk, f"connection closed after {received!r}"
            received += chunk
        assert received == payload


def udp_echo(host: str, port: int, payload: bytes) -> None:
    with socket.socket(family_of(host), socket.SOCK_DGRAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.sendto(payload, (host, port))
        data, source = client.recvfrom(65536)
        assert data == payload
        assert source[1] == port
