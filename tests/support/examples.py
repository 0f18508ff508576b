"""The examples in ``examples/``, run as child processes, and blocking clients.

:func:`run_example` starts ``examples/NAME.py``; :class:`Example` reads the
``listening: KIND ADDRESS`` lines it prints and stops it, checking for a
clean exit. :class:`LineClient` talks to it over a plain blocking socket.
"""

from __future__ import annotations

import contextlib
import re
import signal
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from support.cli import EXIT_TIMEOUT, IO_TIMEOUT, Process, assert_clean, running

REPO = Path(__file__).resolve().parents[2]
EXAMPLES = REPO / "examples"

LISTENING_LINE = re.compile(r"^listening: (?P<kind>TCP|UDP|UNIX|TLS) (?P<address>.+)$")


def parse_address(text: str) -> Any:
    """``HOST:PORT`` or ``[V6]:PORT`` as ``(host, port)``; a path as itself."""
    match = re.fullmatch(
        r"\[(?P<v6>[^\]]+)\]:(?P<p6>\d+)|(?P<v4>[^:/]+):(?P<p4>\d+)", text
    )
    if match is None:
        return text
    host, port = match["v6"] or match["v4"], int(match["p6"] or match["p4"])
    assert port != 0, text
    return host, port


class Example(Process):
    """A running example and its output."""

    def listening(self, count: int) -> dict[str, Any]:
        """Read stdout up to ``count`` listening lines; return ``{kind: address}``."""
        found: dict[str, Any] = {}
        while len(found) < count:
            line = self.stdout.next_line()
            assert line is not None, (
                f"exited before listening: rc={self.proc.wait(EXIT_TIMEOUT)}, "
                f"stderr={self.stderr.join()!r}"
            )
            if match := LISTENING_LINE.match(line):
                found[match["kind"]] = parse_address(match["address"])
        return found

    def stop(self, signum: int = signal.SIGTERM) -> tuple[str, str]:
        """Send ``signum``; check for a clean exit 0; return ``(stdout, stderr)``."""
        self.proc.send_signal(signum)
        return self.finish()

    def finish(self) -> tuple[str, str]:
        """Wait for a clean exit 0; return ``(stdout, stderr)``."""
        rc = self.proc.wait(timeout=EXIT_TIMEOUT)
        stdout, stderr = self.stdout.join(), self.stderr.join()
        assert rc == 0, stderr
        assert_clean(stderr)
        return stdout, stderr


def run_example(name: str, *args: str) -> contextlib.AbstractContextManager[Example]:
    argv = [sys.executable, "-W", "error::ResourceWarning", f"examples/{name}.py"]
    return running(Example, [*argv, *args], cwd=REPO)


def connect(address: Any) -> socket.socket:
    if isinstance(address, str):
        client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        client.settimeout(IO_TIMEOUT)
        try:
            client.connect(address)
        except BaseException:
            client.close()
            raise
        return client
    return socket.create_connection(address, timeout=IO_TIMEOUT)


class LineClient:
    """A stream client that reads whole lines, each within ``IO_TIMEOUT``."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def readline(self) -> bytes:
        """The next line with its newline; what is left (maybe b"") at EOF."""
        while b"\n" not in self.buffer:
            chunk = self.sock.recv(65536)
            if not chunk:
                line, self.buffer = self.buffer, b""
                return line
            self.buffer += chunk
        line, _, self.buffer = self.buffer.partition(b"\n")
        return line + b"\n"

    def ask(self, line: bytes) -> bytes:
        self.send(line)
        return self.readline()


@contextlib.contextmanager
def line_client(address: Any) -> Iterator[LineClient]:
    with connect(address) as sock:
        yield LineClient(sock)


def counters(line: str) -> dict[str, int]:
    """``stats: ServerStats(accepted=1, active=0, ...)`` as a dict."""
    return {name: int(value) for name, value in re.findall(r"(\w+)=(\d+)", line)}
