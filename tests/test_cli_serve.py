"""The command line's ``serve`` command and its options, as a real subprocess."""

from __future__ import annotations

import contextlib
import functools
import json
import pickle
import shutil
import signal
import socket
import sys
import tempfile
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from support.cli import IO_TIMEOUT, EchoCLI, assert_clean, run_echo, running, tcp_echo

import trioserve
from trioserve._cli import (
    DEFAULT_IDLE_TIMEOUT,
    DEFAULT_TIMEOUT,
    _build_parser,
    describe,
    worker_servers,
)
from trioserve._service import UsageError, make_servers

HANDLERS = """
import trioserve


class Upper(trioserve.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(line.upper())


class UpperDatagram(trioserve.DatagramRequestHandler):
    async def handle(self):
        await self.wfile.write((await self.rfile.read()).upper())


class Silent(trioserve.StreamRequestHandler):
    pass  # handle() is the base class's, which does nothing


class OwnTimeout(trioserve.StreamRequestHandler):
    timeout = 7.0

    async def handle(self):
        pass


NOT_A_CLASS = 42
"""

# Modules that fail to import, each the user's bug: (name, source, the
# line the traceback must show, the exception's last line).
BROKEN_MODULES = {
    "raises": (
        'import trioserve\n\nraise RuntimeError("boom at import")\n',
        'raises.py", line 3, in <module>',
        "RuntimeError: boom at import",
    ),
    "bad_syntax": (
        "def broken(:\n    pass\n",
        'bad_syntax.py", line 1',
        "SyntaxError: invalid syntax",
    ),
    "needs_missing": (
        "import a_dependency_not_installed\n",
        'needs_missing.py", line 1, in <module>',
        "ModuleNotFoundError: No module named 'a_dependency_not_installed'",
    ),
}


@pytest.fixture
def workdir() -> Iterator[Path]:
    # Short, so Unix socket paths stay under the 108-byte limit.
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tsc"))
    (path / "my_handlers.py").write_text(textwrap.dedent(HANDLERS))
    for name, (source, _, _) in BROKEN_MODULES.items():
        (path / f"{name}.py").write_text(source)
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
        ("my_handlers:Silent", [], "does not override handle()"),
        ("trioserve:BaseRequestHandler", [], "does not override handle()"),
        ("trioserve:StreamRequestHandler", [], "does not override handle()"),
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


@pytest.mark.parametrize("option", ["--max-concurrent", "--max-requests"])
def test_max_concurrent_option_bounds_concurrency(option: str) -> None:
    # --max-requests is the old name, kept working.
    with run_echo("--tcp", "127.0.0.1:0", option, "1") as cli:
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


# -- the handler's module fails to import ------------------------------------


@pytest.mark.parametrize("module", sorted(BROKEN_MODULES))
def test_a_module_that_fails_to_import_shows_its_traceback_and_exits_3(
    workdir: Path, module: str
) -> None:
    _, where, last = BROKEN_MODULES[module]
    with run_echo(f"{module}:Handler", command="serve", cwd=str(workdir)) as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 3, stderr
    assert stdout == ""
    lines = stderr.splitlines()
    assert lines[0] == f"trioserve: error: importing {module!r} failed:", stderr
    assert where in stderr
    assert lines[-1] == last
    # The user's frames, not ours or importlib's.
    assert "importlib" not in stderr, stderr
    assert "_cli.py" not in stderr, stderr


# -- TLS files ----------------------------------------------------------------


@pytest.fixture(scope="module")
def pem_files() -> Iterator[Path]:
    trustme = pytest.importorskip("trustme")
    path = Path(tempfile.mkdtemp(prefix="tsc-tls"))
    ca = trustme.CA()
    cert, other = ca.issue_cert("127.0.0.1"), ca.issue_cert("127.0.0.2")
    cert.cert_chain_pems[0].write_to_path(str(path / "cert.pem"))
    cert.private_key_pem.write_to_path(str(path / "key.pem"))
    other.private_key_pem.write_to_path(str(path / "other-key.pem"))
    (path / "text.pem").write_text("not a certificate\n")
    encrypted = serialization.load_pem_private_key(
        cert.private_key_pem.bytes(), password=None
    ).private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.BestAvailableEncryption(b"secret"),
    )
    (path / "encrypted-key.pem").write_bytes(encrypted)
    yield path
    shutil.rmtree(path)


@pytest.mark.parametrize(
    ("cert", "key", "message"),
    [
        (
            "missing.pem",
            None,
            "cannot read {dir}/missing.pem (--tls-cert): No such file or directory",
        ),
        (
            "cert.pem",
            "missing.pem",
            "cannot read {dir}/missing.pem (--tls-key): No such file or directory",
        ),
        (".", None, "cannot read {dir}/. (--tls-cert): Is a directory"),
        (
            "cert.pem",
            None,
            "{dir}/cert.pem (--tls-cert) holds no private key; give it with --tls-key",
        ),
        (
            "text.pem",
            "key.pem",
            "{dir}/text.pem (--tls-cert) holds no valid PEM certificate",
        ),
        (
            "key.pem",
            "cert.pem",
            "{dir}/key.pem (--tls-cert) holds no valid PEM certificate",
        ),
        ("cert.pem", "text.pem", "{dir}/text.pem (--tls-key) holds no PEM private key"),
        (
            "cert.pem",
            "other-key.pem",
            "the private key in {dir}/other-key.pem (--tls-key) does not match "
            "the certificate in {dir}/cert.pem (--tls-cert)",
        ),
        (
            "cert.pem",
            "encrypted-key.pem",
            "the private key in {dir}/encrypted-key.pem (--tls-key) is encrypted",
        ),
    ],
)
def test_tls_file_errors_name_the_file_and_the_fault(
    pem_files: Path, cert: str, key: str | None, message: str
) -> None:
    options = ["--tls-cert", f"{pem_files}/{cert}"]
    if key is not None:
        options += ["--tls-key", f"{pem_files}/{key}"]
    with run_echo("--tcp", "127.0.0.1:0", *options) as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == ""
    assert_clean(stderr)
    [line] = stderr.splitlines()
    assert line.startswith("trioserve: error: cannot load the TLS certificate: ")
    assert message.format(dir=pem_files) in line
    assert "PEM lib" not in line


# -- the command line's default timeouts --------------------------------------


def test_default_timeouts_and_off(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert DEFAULT_IDLE_TIMEOUT < DEFAULT_TIMEOUT  # silent clients go quietly
    parser = _build_parser()
    cases = [
        (["echo"], DEFAULT_TIMEOUT, DEFAULT_IDLE_TIMEOUT),
        (["echo", "--timeout", "3", "--idle-timeout", "2"], 3.0, 2.0),
        (["echo", "--timeout", "off", "--idle-timeout", "off"], None, None),
        # A handler class's own timeout beats the command line's default...
        (["serve", "my_handlers:OwnTimeout"], 7.0, DEFAULT_IDLE_TIMEOUT),
        # ...but not an option given.
        (["serve", "my_handlers:OwnTimeout", "--timeout", "off"], None, 60.0),
    ]
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    for argv, timeout, idle_timeout in cases:
        [server] = make_servers(describe(parser.parse_args([*argv, "--tcp", ":0"])))
        handler = server.RequestHandlerClass
        assert issubclass(handler, trioserve.StreamRequestHandler), argv
        assert handler.timeout == timeout, argv
        assert server.idle_timeout == idle_timeout, argv
        assert server.request_timeout is None, argv


def test_the_arguments_make_a_frozen_description_the_workers_share(
    workdir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # What --workers hands each worker is a plain partial of a frozen
    # description: made from the arguments without changing them, equal each
    # time, and making the same servers after a trip through pickle.
    monkeypatch.chdir(workdir)
    monkeypatch.syspath_prepend(str(workdir))
    parser = _build_parser()
    for argv, kinds in [
        (["echo", "--max-concurrent", "5"], [trioserve.TCPServer, trioserve.UDPServer]),
        (["serve", "my_handlers:Upper", "--udp", ":0"], None),  # a usage error
        (["serve", "my_handlers:OwnTimeout", "--unix", "s"], [trioserve.TCPServer]),
    ]:
        args = parser.parse_args(argv)
        before = vars(args).copy()
        service = describe(args)
        assert vars(args) == before, argv
        assert describe(args) == service, argv
        factory = functools.partial(worker_servers, service, "info", "text")
        copy = pickle.loads(pickle.dumps(factory))
        assert copy.func is worker_servers
        assert copy.args == (service, "info", "text")
        if kinds is None:
            with pytest.raises(
                UsageError, match="--udp needs a DatagramRequestHandler"
            ):
                make_servers(copy.args[0])
            continue
        made = [make_servers(service), make_servers(copy.args[0])]
        seen = [
            [
                (
                    type(server),
                    getattr(server, "server_addresses", None),
                    server.max_concurrent_requests,
                    server.idle_timeout,
                    server.RequestHandlerClass.__mro__[1:],
                    getattr(server.RequestHandlerClass, "timeout", None),
                )
                for server in servers
            ]
            for servers in made
        ]
        assert seen[0] == seen[1], argv
        assert [type(server) for server in made[0]] == kinds, argv


def test_tcp_keepalive_option_reaches_the_stream_server_alone() -> None:
    parser = _build_parser()
    argv = ["echo", "--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0"]
    stream, datagram = make_servers(
        describe(parser.parse_args([*argv, "--tcp-keepalive", "30,5,4"]))
    )
    assert isinstance(stream, trioserve.TCPServer)
    assert not isinstance(stream, trioserve.UDPServer)
    assert stream.tcp_keepalive == (30, 5, 4)
    assert isinstance(datagram, trioserve.UDPServer)
    assert datagram.tcp_keepalive is None
    [default] = make_servers(
        describe(parser.parse_args(["echo", "--tcp", ":0", "--tcp-keepalive", "60"]))
    )
    assert isinstance(default, trioserve.TCPServer)
    assert default.tcp_keepalive == (60, 10, 6)
    with run_echo("--tcp", "127.0.0.1:0", "--tcp-keepalive", "60,x,3") as cli:
        rc, _, stderr = cli.finish()
    assert rc == 2
    assert stderr.startswith("trioserve echo: error: argument --tcp-keepalive:")


def run_with_short_defaults(
    *args: str, cwd: Path
) -> contextlib.AbstractContextManager[EchoCLI]:
    """The command line with its default timeouts made short enough to test."""
    code = (
        "import sys, trioserve._cli as cli; "
        "cli.DEFAULT_TIMEOUT = 0.6; cli.DEFAULT_IDLE_TIMEOUT = 0.3; "
        "sys.exit(cli.main())"
    )
    argv = [sys.executable, "-W", "error::ResourceWarning", "-c", code, *args]
    return running(EchoCLI, argv, cwd=str(cwd))


def test_default_idle_timeout_cuts_off_a_client_trickling_bytes(
    workdir: Path,
) -> None:
    # Slowloris: a byte every 50 ms, never a whole line. Every read makes
    # progress, so the handler's timeout alone would never end it.
    argv = ["serve", "my_handlers:Upper", "--tcp", "127.0.0.1:0"]
    with run_with_short_defaults(*argv, cwd=workdir) as cli:
        [(_, host, port)] = cli.listeners(1)
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
            client.settimeout(0.05)  # the pace of the trickle
            started = time.monotonic()
            while time.monotonic() - started < IO_TIMEOUT:
                try:
                    client.sendall(b"x")
                    if client.recv(100) == b"":
                        break
                except TimeoutError:
                    continue
                except ConnectionError:
                    break
            else:
                pytest.fail("a client trickling bytes was never cut off")
        cli.stderr.wait_for("message not complete within idle_timeout (0.3 s)")
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


def test_default_timeout_cuts_off_a_client_that_does_not_read() -> None:
    # It sends and never reads, so the echo's write back stalls. It delivers
    # its messages promptly, so the idle timeout alone would never end it.
    with run_with_short_defaults("echo", "--tcp", "127.0.0.1:0", cwd=Path()) as cli:
        [(_, host, port)] = cli.listeners(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(IO_TIMEOUT)
            client.connect((host, port))
            client.setblocking(False)
            chunk = b"x" * 65536
            sent = 0
            deadline = time.monotonic() + IO_TIMEOUT
            while sent < 64 * 1024 * 1024 and time.monotonic() < deadline:
                try:
                    sent += client.send(chunk)
                except BlockingIOError:
                    break  # the server stopped reading: its write is stuck
                except ConnectionError:
                    break
            line = cli.stderr.wait_for("request timed out from", timeout=IO_TIMEOUT)
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert "idle_timeout" not in line, line
    assert rc == 0, stderr
    assert_clean(stderr)
