"""The command line's ``serve`` command and its options, as a real subprocess."""

from __future__ import annotations

import json
import shutil
import signal
import socket
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from test_cli import IO_TIMEOUT, assert_clean, run_echo, tcp_echo

HANDLERS = """
import trioserve


class Upper(trioserve.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(line.upper())


class UpperDatagram(trioserve.DatagramRequestHandler):
    async def handle(self):
        await self.wfile.write((await self.rfile.read()).upper())


NOT_A_CLASS = 42
"""


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, so Unix socket paths stay under the 108-byte limit.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tsc"))
    (path / "my_handlers.py").write_text(textwrap.dedent(HANDLERS))
    yield path
    shutil.rmtree(path)


def announced(line: str | None) -> tuple[str, str]:
    """``(kind, address)`` from a "trioserve: serving KIND on ADDRESS" line."""
    assert line is not None
    prefix, _, address = line.partition(" on ")
    assert prefix.startswith("trioserve: serving "), line
    return prefix.removeprefix("trioserve: serving "), address


def host_port(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    return host, int(port)


def test_serve_runs_a_user_stream_handler(workdir: Path) -> None:
    with run_echo(
        "my_handlers:Upper", "--tcp", "127.0.0.1:0", command="serve", cwd=str(workdir)
    ) as cli:
        kind, address = announced(cli.stdout.next_line())
        assert kind == "TCP"
        with socket.create_connection(host_port(address), timeout=IO_TIMEOUT) as client:
            client.sendall(b"shout\n")
            assert client.recv(100) == b"SHOUT\n"
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


def test_serve_runs_a_user_datagram_handler(workdir: Path) -> None:
    with run_echo(
        "my_handlers:UpperDatagram",
        "--udp",
        "127.0.0.1:0",
        command="serve",
        cwd=str(workdir),
    ) as cli:
        kind, address = announced(cli.stdout.next_line())
        assert kind == "UDP"
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            client.settimeout(IO_TIMEOUT)
            client.sendto(b"quiet", host_port(address))
            assert client.recv(100) == b"QUIET"
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr


@pytest.mark.parametrize(
    ("handler", "extra", "message"),
    [
        ("no_such_module:Handler", [], "cannot import 'no_such_module'"),
        ("my_handlers:Missing", [], "has no 'Missing'"),
        ("my_handlers:NOT_A_CLASS", [], "not a trioserve request handler"),
        ("my_handlers", [], "not package.module:ClassName"),
        ("my_handlers:Upper", ["--udp", "127.0.0.1:0"], "--udp needs a Datagram"),
        ("my_handlers:UpperDatagram", ["--tcp", "127.0.0.1:0"], "--tcp needs a Stream"),
    ],
)
def test_serve_refuses_bad_handlers_in_one_line(
    workdir: Path, handler: str, extra: list[str], message: str
) -> None:
    with run_echo(handler, *extra, command="serve", cwd=str(workdir)) as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2
    assert stdout == ""
    assert stderr.count("\n") == 1, stderr
    assert stderr.startswith("trioserve: error: ")
    assert message in stderr
    assert_clean(stderr)


def test_unix_stream_and_datagram_listeners(workdir: Path) -> None:
    stream_path = workdir / "echo.sock"
    dgram_path = workdir / "echo.dgram"
    with run_echo("--unix", str(stream_path), "--unix-dgram", str(dgram_path)) as cli:
        first = announced(cli.stdout.next_line())
        second = announced(cli.stdout.next_line())
        assert {first, second} == {
            ("UNIX", str(stream_path)),
            ("UNIX-DGRAM", str(dgram_path)),
        }
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(IO_TIMEOUT)
            client.connect(str(stream_path))
            client.sendall(b"over a unix stream\n")
            assert client.recv(100) == b"over a unix stream\n"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.settimeout(IO_TIMEOUT)
            client.bind(str(workdir / "client.dgram"))
            client.sendto(b"over a unix datagram", str(dgram_path))
            assert client.recv(100) == b"over a unix datagram"
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    # The servers removed the socket files they made.
    assert not stream_path.exists()
    assert not dgram_path.exists()


def test_json_log_format() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--log-format", "json") as cli:
        cli.listeners(1)
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    records = [json.loads(line) for line in stderr.splitlines()]
    assert any("shutting down" in record["message"] for record in records)
    assert all({"time", "level", "logger", "message"} <= set(r) for r in records)


def test_sighup_is_not_fatal() -> None:
    with run_echo("--tcp", "127.0.0.1:0") as cli:
        [(_, host, port)] = cli.listeners(1)
        cli.proc.send_signal(signal.SIGHUP)
        cli.stderr.wait_for("SIGHUP")
        tcp_echo(host, port, b"still serving\n")
        assert cli.proc.poll() is None
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr


def test_idle_timeout_option_closes_silent_connections() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--timeout", "0.2") as cli:
        [(_, host, port)] = cli.listeners(1)
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
            client.sendall(b"hello\n")
            assert client.recv(100) == b"hello\n"
            start = time.monotonic()
            assert client.recv(100) == b""  # closed by the server, not by us
            assert time.monotonic() - start < IO_TIMEOUT
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert "request timed out from" in stderr


def test_max_requests_option_bounds_concurrency() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--max-requests", "1") as cli:
        [(_, host, port)] = cli.listeners(1)
        first = socket.create_connection((host, port), timeout=IO_TIMEOUT)
        with first, socket.create_connection((host, port), timeout=0.5) as second:
            first.sendall(b"one\n")
            assert first.recv(100) == b"one\n"
            second.sendall(b"two\n")
            # The bound holds the second connection in the backlog...
            with pytest.raises(TimeoutError):
                second.recv(100)
            first.close()
            # ...until the first one ends.
            second.settimeout(IO_TIMEOUT)
            assert second.recv(100) == b"two\n"
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr


def test_shutdown_timeout_option_bounds_the_grace() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--shutdown-timeout", "0.3") as cli:
        [(_, host, port)] = cli.listeners(1)
        with (
            socket.create_connection((host, port), timeout=IO_TIMEOUT) as idle,
            socket.create_connection((host, port), timeout=IO_TIMEOUT) as stuck,
        ):
            # A keep-alive connection between messages: not a request.
            idle.sendall(b"hello\n")
            assert idle.recv(100) == b"hello\n"
            stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            # One round trip first: the server has accepted and is handling.
            stuck.sendall(b"ready\n")
            assert stuck.recv(100) == b"ready\n"
            # Never read: the echo's writes fill both socket buffers and block,
            # so the request is busy, not idle, when the signal comes.
            stuck.setblocking(False)
            chunk = b"x" * 65536
            sent = 0
            deadline = time.monotonic() + IO_TIMEOUT
            while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
                try:
                    sent += stuck.send(chunk)
                except BlockingIOError:
                    break
            start = time.monotonic()
            rc, _, stderr = cli.stop(signal.SIGTERM)
            elapsed = time.monotonic() - start
    assert rc == 0, stderr
    assert "1 request in flight and 1 idle connection, with up to 0.3 s" in stderr
    assert "shutdown cancelled 1 request still running at its deadline" in stderr
    assert 0.3 <= elapsed < 4, elapsed


def test_serve_help_exits_0() -> None:
    with run_echo("--help", command="serve") as cli:
        rc, stdout, _ = cli.finish()
    assert rc == 0
    assert "package.module:ClassName" in stdout
