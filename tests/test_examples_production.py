"""The examples in ``examples/production/``, each run as a real subprocess.

As in ``test_examples.py`` (whose helpers these tests use): every example is
started on port 0, learns its addresses from its ``listening:`` lines, is
talked to over real loopback sockets with timeouts, and must exit 0 on
SIGTERM with no traceback or ResourceWarning. ``behind_haproxy`` runs behind
a real HAProxy, with the configuration in ``examples/deploy/haproxy.cfg``.

The limits are shown acting in real time: small values, and margins of
several seconds above them, since the clock that matters is the example's.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import EXIT_TIMEOUT, IO_TIMEOUT
from support.examples import (
    EXAMPLES,
    LISTENING_LINE,
    Example,
    LineClient,
    connect,
    counters,
    line_client,
    parse_address,
    run_example,
)
from support.haproxy import HAPROXY, check_haproxy_config
from support.proxy_headers import build_v1, build_v2
from support.servers import free_port, ipv6_loopback_available

PRODUCTION = EXAMPLES / "production"
HAPROXY_CFG = EXAMPLES / "deploy" / "haproxy.cfg"

# How far past a limit its effect may come: a loaded machine is slow, but a
# limit that did not act at all would take far longer than this.
LATE = 5.0


def run(name: str, *args: str) -> contextlib.AbstractContextManager[Example]:
    return run_example(f"production/{name}", *args)


def listeners(example: Example, count: int) -> list[tuple[str, Any]]:
    """Read ``count`` listening lines; ``[(kind, address), ...]`` in order."""
    found: list[tuple[str, Any]] = []
    while len(found) < count:
        line = example.stdout.next_line()
        assert line is not None, f"exited early: {example.stderr.join()!r}"
        if match := LISTENING_LINE.match(line):
            found.append((match["kind"], parse_address(match["address"])))
    return found


def final_stats(stdout: str) -> dict[str, int]:
    [line] = [line for line in stdout.splitlines() if line.startswith("stats: ")]
    return counters(line)


def show(address: Any) -> str:
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def closed(sock: socket.socket) -> bool:
    """Whether the peer has closed: end of stream or a reset, within IO_TIMEOUT."""
    try:
        return sock.recv(100) == b""
    except ConnectionResetError:
        return True


# -- behind_haproxy -----------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    [
        build_v1(("203.0.113.7", 56324), ("192.0.2.1", 9000)),
        build_v2(("203.0.113.7", 56324), ("192.0.2.1", 9000)),
    ],
    ids=["v1", "v2"],
)
def test_behind_haproxy_takes_the_address_a_trusted_proxy_sends(header: bytes) -> None:
    # What HAProxy does, done by hand: the header, then the connection's data.
    with run("behind_haproxy", "--port", "0") as example:
        [(_, address)] = listeners(example, 1)
        with line_client(address) as client:
            client.send(header + b"first line\n")
            assert client.readline() == b"hello 203.0.113.7:56324\n"
            assert client.readline() == b"first line\n"
        stdout, stderr = example.stop()
    assert "greeting 203.0.113.7:56324" in stderr
    assert "served 1, dropped 0" in stdout


def test_behind_haproxy_closes_peers_it_does_not_trust() -> None:
    args = ["--port", "0", "--trusted-proxy", "10.0.0.0/8"]
    with run("behind_haproxy", *args) as example:
        [(_, address)] = listeners(example, 1)
        with connect(address) as client:
            client.sendall(build_v1(("203.0.113.7", 1), ("192.0.2.1", 2)))
            assert closed(client)
        stdout, stderr = example.stop()
    assert "not a trusted proxy" in stderr
    assert "greeting" not in stderr
    assert "served 0, dropped 1" in stdout


def haproxy_config(send_proxy: str, directory: Path) -> Path:
    """examples/deploy/haproxy.cfg itself, or a copy using ``send_proxy``."""
    if send_proxy == "send-proxy-v2":
        return HAPROXY_CFG
    text = HAPROXY_CFG.read_text(encoding="utf-8")
    server_line = re.compile(r"^(\s*server \S+ \S+ )send-proxy-v2\b", re.MULTILINE)
    text, count = server_line.subn(rf"\g<1>{send_proxy}", text)
    assert count == 1, "haproxy.cfg should have one server line with send-proxy-v2"
    config = directory / "haproxy.cfg"
    config.write_text(text, encoding="utf-8")
    return config


@contextlib.contextmanager
def running_haproxy(config: Path, front_port: int, backend: Any) -> Iterator[None]:
    """HAProxy with ``config``, listening on ``front_port``, relaying to ``backend``."""
    assert HAPROXY is not None
    env = dict(
        os.environ,
        TRIOSERVE_FRONTEND=f"127.0.0.1:{front_port}",
        TRIOSERVE_BACKEND=show(backend),
    )
    check_haproxy_config(config, env)
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(
            [HAPROXY, "-db", "-f", str(config)],
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            yield
        except BaseException:
            # Say what HAProxy said, for a failure that came from it.
            proc.kill()
            proc.wait(timeout=EXIT_TIMEOUT)
            log.seek(0)
            print(f"HAProxy's output:\n{log.read()}")
            raise
        finally:
            if proc.poll() is None:
                proc.terminate()
            try:
                proc.wait(timeout=EXIT_TIMEOUT)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=EXIT_TIMEOUT)


def connect_when_listening(address: tuple[str, int]) -> socket.socket:
    """Connect as soon as HAProxy listens.

    No probe connection first: one that closed at once would still reach the
    server, and be counted there.
    """
    deadline = time.monotonic() + 10
    while True:
        try:
            return socket.create_connection(address, timeout=IO_TIMEOUT)
        except ConnectionRefusedError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


@pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian: apt install haproxy)"
)
@pytest.mark.parametrize("send_proxy", ["send-proxy", "send-proxy-v2"])
def test_behind_a_real_haproxy_the_handler_sees_the_real_client(
    send_proxy: str, short_tmp: Path
) -> None:
    config = haproxy_config(send_proxy, short_tmp)
    with run("behind_haproxy", "--port", "0") as example:
        [(_, backend)] = listeners(example, 1)
        front = ("127.0.0.1", free_port())
        with running_haproxy(config, front[1], backend):
            with connect_when_listening(front) as sock:
                client = LineClient(sock)
                # This client's own address and port, which only the PROXY
                # header can have told the server: its peer is HAProxy.
                me = show(sock.getsockname())
                assert client.readline() == f"hello {me}\n".encode()
                assert client.ask(b"through haproxy\n") == b"through haproxy\n"
            # Going around HAProxy: no header, so the connection is closed.
            with connect(backend) as direct:
                direct.sendall(b"hello?\n")
                assert closed(direct)
        stdout, stderr = example.stop()
    assert f"greeting {me}" in stderr
    assert "not a PROXY protocol header" in stderr
    [served, dropped] = map(int, re.findall(r"served (\d+), dropped (\d+)", stdout)[0])
    # HAProxy's health checks send a header too, and are served, not dropped.
    assert served >= 1
    assert dropped == 1, stderr


# -- many_listeners -----------------------------------------------------------


def test_many_listeners_share_one_bound_one_shutdown_and_one_stats(
    short_tmp: Path,
) -> None:
    unix_path = str(short_tmp / "many.sock")
    ipv6 = ipv6_loopback_available()
    count = 3 if ipv6 else 2
    # One slot per listener: a request on each fills the bound.
    args = ["--port", "0", "--unix", unix_path, "--max-requests", str(count)]
    with run("many_listeners", *args) as example:
        found = listeners(example, count)
        assert [kind for kind, _ in found] == ["TCP"] * (count - 1) + ["UNIX"]
        addresses = [address for _, address in found]
        assert addresses[0][0] == "127.0.0.1"
        if ipv6:
            assert addresses[1][0] == "::1"
        assert addresses[-1] == unix_path
        with contextlib.ExitStack() as stack:
            clients = [stack.enter_context(line_client(a)) for a in addresses]
            for client in clients:
                assert client.ask(b"one handler for all\n") == b"one handler for all\n"
            # The bound is full, whichever listener a client comes to: this
            # one waits in the backlog.
            with line_client(addresses[0]) as waiting:
                waiting.send(b"waiting\n")
                waiting.sock.settimeout(1.0)
                with pytest.raises(TimeoutError):
                    waiting.readline()
                waiting.sock.settimeout(IO_TIMEOUT)
                stack.close()  # the others leave: their slots come free
                assert waiting.readline() == b"waiting\n"
                # One signal lets the idle client of every listener go.
                example.proc.send_signal(signal.SIGTERM)
                assert waiting.readline() == b""
        stdout, _ = example.finish()
    stats = final_stats(stdout)
    assert stats["accepted"] == stats["completed"] == count + 1, stats
    assert not Path(unix_path).exists(), "the socket file was left behind"


def test_many_listeners_idle_listeners_hold_no_slots(short_tmp: Path) -> None:
    unix_path = str(short_tmp / "many.sock")
    args = ["--port", "0", "--ipv6-host", "", "--unix", unix_path]
    with run("many_listeners", *args, "--max-requests", "2") as example:
        tcp, _ = (address for _, address in listeners(example, 2))
        try:
            with line_client(tcp) as first, line_client(tcp) as second:
                assert first.ask(b"first\n") == b"first\n"
                # One request in flight, and a bound of two: room for this.
                second.send(b"second\n")
                second.sock.settimeout(2.0)
                assert second.readline() == b"second\n"
        finally:
            example.stop()


def test_many_listeners_without_ipv6(short_tmp: Path) -> None:
    unix_path = str(short_tmp / "many.sock")
    args = ["--port", "0", "--ipv6-host", "", "--unix", unix_path]
    with run("many_listeners", *args) as example:
        found = listeners(example, 2)
        assert [kind for kind, _ in found] == ["TCP", "UNIX"]
        for _, address in found:
            with line_client(address) as client:
                assert client.ask(b"hi\n") == b"hi\n"
        stdout, _ = example.stop()
    assert final_stats(stdout)["completed"] == 2


# -- limits -------------------------------------------------------------------


def limits(
    request_timeout: float = 60, idle_timeout: float = 60, max_per_peer: int = 100
) -> contextlib.AbstractContextManager[Example]:
    return run(
        "limits",
        "--port",
        "0",
        "--request-timeout",
        str(request_timeout),
        "--idle-timeout",
        str(idle_timeout),
        "--max-per-peer",
        str(max_per_peer),
    )


def test_limits_request_timeout_cuts_off_a_busy_client() -> None:
    with limits(request_timeout=1.5) as example:
        [(_, address)] = listeners(example, 1)
        start = time.monotonic()
        with line_client(address) as client:
            answered = 0
            for _ in range(200):  # bound: 20 s of lines, far past the deadline
                try:
                    reply = client.ask(b"busy\n")
                except (BrokenPipeError, ConnectionResetError):
                    break
                if not reply:
                    break
                assert reply == b"busy\n"
                answered += 1
                time.sleep(0.1)
            else:
                pytest.fail("the busy client was never cut off")
        elapsed = time.monotonic() - start
        stdout, stderr = example.stop()
    # Busy all along, so only the whole-request deadline can have ended it.
    assert 1.5 <= elapsed < 1.5 + LATE, elapsed
    assert answered >= 3
    assert "cut off: request not done within request_timeout (1.5 s)" in stderr
    stats = final_stats(stdout)
    assert (stats["timed_out"], stats["completed"]) == (1, 0), stats


def test_limits_idle_timeout_lets_a_quiet_client_go() -> None:
    with limits(idle_timeout=1.0) as example:
        [(_, address)] = listeners(example, 1)
        with line_client(address) as client:
            # Lines 0.3 s apart for longer than the idle timeout: the limit
            # is on each wait, not on the connection.
            for _ in range(6):
                assert client.ask(b"still here\n") == b"still here\n"
                time.sleep(0.3)
            # The server's wait for the next line starts after this reply.
            quiet_since = time.monotonic()
            assert client.ask(b"last\n") == b"last\n"
            assert client.readline() == b""
            quiet = time.monotonic() - quiet_since
        stdout, stderr = example.stop()
    assert 1.0 <= quiet < 1.0 + LATE, quiet
    assert "nothing sent for 1.0 s (idle_timeout): let go" in stderr
    stats = final_stats(stdout)
    assert (stats["completed"], stats["timed_out"]) == (1, 0), stats


def test_limits_idle_timeout_cuts_off_a_trickling_client() -> None:
    with limits(idle_timeout=1.0) as example:
        [(_, address)] = listeners(example, 1)
        start = time.monotonic()  # before the server's first read starts
        with connect(address) as client:
            # Slowloris: a byte every 0.2 s, and the line never ends.
            client.settimeout(0.2)
            for _ in range(100):  # bound: 20 s
                try:
                    client.sendall(b"x")
                    if client.recv(100) == b"":
                        break
                except TimeoutError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    break
            else:
                pytest.fail("the trickling client was never cut off")
            elapsed = time.monotonic() - start
        stdout, stderr = example.stop()
    assert 1.0 <= elapsed < 1.0 + LATE, elapsed
    assert "cut off: message not complete within idle_timeout (1.0 s)" in stderr
    stats = final_stats(stdout)
    assert (stats["timed_out"], stats["completed"]) == (1, 0), stats


def test_limits_max_per_peer_refuses_one_connection_too_many() -> None:
    with limits(max_per_peer=2) as example:
        [(_, address)] = listeners(example, 1)
        with line_client(address) as first, line_client(address) as second:
            assert first.ask(b"one\n") == b"one\n"
            assert second.ask(b"two\n") == b"two\n"
            # A third from the same host is closed at once, unhandled.
            with connect(address) as third:
                assert closed(third)
            example.stderr.wait_for("at max_connections_per_peer")
        # The limit counts connections open now: with those two gone, the
        # host may connect again (once the server has seen them close).
        for _ in range(50):  # bound: 5 s
            with line_client(address) as again:
                try:
                    reply = again.ask(b"again\n")
                except ConnectionResetError:
                    reply = b""
            if reply:
                break
            time.sleep(0.1)
        assert reply == b"again\n"
        stdout, _ = example.stop()
    stats = final_stats(stdout)
    assert stats["completed"] == 3, stats
    assert stats["rejected"] >= 1, stats
    assert stats["accepted"] == stats["completed"] + stats["rejected"], stats


# -- workers ------------------------------------------------------------------


def test_workers_share_the_connections_and_stop_gracefully() -> None:
    with run("workers", "--port", "0", "--workers", "2") as example:
        [(kind, address)] = listeners(example, 1)
        assert kind == "TCP"
        workers = set()
        for number in range(40):
            with line_client(address) as client:
                reply = client.ask(b"%d\n" % number)
            worker, _, echoed = reply.partition(b": ")
            assert echoed == b"%d\n" % number
            workers.add(worker)
        # Two workers, and the kernel spread 40 connections over both.
        assert len(workers) == 2, workers
        _, stderr = example.stop()
    assert stderr.count("stopped after") == 2, stderr


# -- all of them --------------------------------------------------------------

EXAMPLE_NAMES = ["behind_haproxy", "limits", "many_listeners", "workers"]


def test_every_production_example_is_tested_here() -> None:
    assert sorted(path.stem for path in PRODUCTION.glob("*.py")) == EXAMPLE_NAMES


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_help_shows_how_to_try_it(name: str) -> None:
    with run(name, "--help") as example:
        rc = example.proc.wait(timeout=EXIT_TIMEOUT)
        stdout, stderr = example.stdout.join(), example.stderr.join()
    assert rc == 0, stderr
    assert "Try it" in stdout
    assert f"python examples/production/{name}.py" in stdout
    assert "--port" in stdout
    assert stderr == ""
