"""The command line, ``python -m trioserve echo``, run as a real subprocess.

Every test starts the service on port 0, learns the real ports from the
"serving" lines it prints on stdout, talks to it with plain blocking sockets
(each with a timeout), and kills the subprocess in a ``finally`` if it is
still running. The interpreter runs with ``-W error::ResourceWarning``, and
every test that lets it exit checks that stderr has no ResourceWarning and no
traceback.
"""

from __future__ import annotations

import errno
import re
import select
import signal
import socket
import time

import pytest
from support.cli import (
    IO_TIMEOUT,
    PROMPT_EXIT,
    assert_clean,
    run_echo,
    tcp_echo,
    udp_echo,
)
from support.servers import ipv6_loopback_available

import trioserve
from trioserve._cli import DEFAULT_IDLE_TIMEOUT, DEFAULT_TIMEOUT, parse_host_port

# -- serving and signals ---------------------------------------------------


def test_tcp_and_udp_echo_then_sigterm_exits_0() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0") as cli:
        listeners = cli.listeners(2)
        assert sorted(kind for kind, _, _ in listeners) == ["TCP", "UDP"]
        for kind, host, port in listeners:
            assert host == "127.0.0.1"
            if kind == "TCP":
                tcp_echo(host, port, b"hello over tcp\n")
                tcp_echo(host, port, b"no newline, several KiB " * 400)
            else:
                udp_echo(host, port, b"hello over udp\n")
        rc, stdout, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    assert re.search(r"SIGTERM: shutting down", stderr), stderr
    # Nothing but the two serving lines on stdout.
    assert len(stdout.splitlines()) == 2, stdout


def test_sigint_exits_0_without_keyboard_interrupt() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--udp", "127.0.0.1:0") as cli:
        for kind, host, port in cli.listeners(2):
            if kind == "TCP":
                tcp_echo(host, port, b"ping\n")
            else:
                udp_echo(host, port, b"ping\n")
        rc, _, stderr = cli.stop(signal.SIGINT)
    assert rc == 0, stderr
    assert_clean(stderr)
    assert "KeyboardInterrupt" not in stderr
    assert "SIGINT: shutting down" in stderr, stderr


def test_only_tcp_serves_only_tcp() -> None:
    with run_echo("--tcp", "127.0.0.1:0") as cli:
        [(kind, host, port)] = cli.listeners(1)
        assert kind == "TCP"
        tcp_echo(host, port, b"just tcp\n")
        rc, stdout, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    serving = [line for line in stdout.splitlines() if "serving" in line]
    assert len(serving) == 1, stdout


def test_only_udp_serves_only_udp() -> None:
    with run_echo("--udp", "127.0.0.1:0") as cli:
        [(kind, host, port)] = cli.listeners(1)
        assert kind == "UDP"
        udp_echo(host, port, b"just udp")
        rc, stdout, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    assert len([ln for ln in stdout.splitlines() if "serving" in ln]) == 1, stdout


def test_two_tcp_options_give_two_listeners() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--tcp", "127.0.0.1:0") as cli:
        listeners = cli.listeners(2)
        assert [kind for kind, _, _ in listeners] == ["TCP", "TCP"]
        ports = {port for _, _, port in listeners}
        assert len(ports) == 2, listeners
        for _, host, port in listeners:
            tcp_echo(host, port, f"to {port}\n".encode())
        rc, stdout, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    assert len(stdout.splitlines()) == 2, stdout


@pytest.mark.skipif(
    not ipv6_loopback_available(), reason="IPv6 loopback is unavailable"
)
def test_ipv6_tcp_and_udp() -> None:
    with run_echo("--tcp", "[::1]:0", "--udp", "[::1]:0") as cli:
        listeners = cli.listeners(2)
        for kind, host, port in listeners:
            assert host == "::1"
            if kind == "TCP":
                tcp_echo(host, port, b"over ipv6\n")
            else:
                udp_echo(host, port, b"over ipv6")
        rc, stdout, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    assert "[::1]:" in stdout


def test_idle_client_sees_eof_on_sigterm_and_exit_is_prompt() -> None:
    with run_echo("--tcp", "127.0.0.1:0") as cli:
        [(_, host, port)] = cli.listeners(1)
        with socket.create_connection((host, port), timeout=IO_TIMEOUT) as client:
            # One round trip proves the handler runs; it is now idle, waiting
            # for the next byte.
            client.sendall(b"first\n")
            assert client.recv(100) == b"first\n"
            started = time.monotonic()
            cli.proc.send_signal(signal.SIGTERM)
            assert client.recv(100) == b""
            rc = cli.wait(timeout=PROMPT_EXIT)
            elapsed = time.monotonic() - started
        _, _, stderr = cli.finish()
    assert rc == 0, stderr
    assert elapsed < PROMPT_EXIT
    assert_clean(stderr)
    # The handler was waiting for a message: an idle connection, not a
    # request in flight.
    assert (
        "SIGTERM: shutting down; 0 requests in flight and 1 idle connection" in stderr
    ), stderr


def test_second_signal_cancels_busy_requests_and_exits_1() -> None:
    with run_echo("--tcp", "127.0.0.1:0") as cli:
        [(_, host, port)] = cli.listeners(1)
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as client:
            # A client that sends but never reads: the echo handler ends up
            # stuck in a write, mid-request, so the first SIGTERM's grace
            # period applies to it and only a second signal ends it.
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
            client.settimeout(IO_TIMEOUT)
            client.connect((host, port))
            client.setblocking(False)
            chunk = b"x" * 65536
            sent = 0
            while sent < 512 * 1024 * 1024:  # bound: far more than any buffer
                try:
                    sent += client.send(chunk)
                except BlockingIOError:
                    # Full: wait a little for room; none means the server
                    # stopped reading because its write back is stuck.
                    _, writable, _ = select.select([], [client], [], 0.5)
                    if not writable:
                        break
            else:
                pytest.fail("the server never stopped reading")
            cli.proc.send_signal(signal.SIGTERM)
            cli.stderr.wait_for("SIGTERM: shutting down; 1 request in flight")
            assert cli.proc.poll() is None, "a busy request did not get its grace"
            cli.proc.send_signal(signal.SIGTERM)
            rc = cli.wait(timeout=PROMPT_EXIT)
        _, _, stderr = cli.finish()
    assert rc == 1, stderr
    assert "SIGTERM again: cancelling every request" in stderr, stderr
    assert_clean(stderr)


# -- bad arguments and addresses -------------------------------------------


@pytest.mark.parametrize(
    ("option", "value", "why"),
    [
        ("--tcp", "nonsense", "is not HOST:PORT"),
        ("--tcp", "127.0.0.1:99999", "port must be 0 to 65535"),
        ("--tcp", "127.0.0.1:http", "the port 'http' is not a number"),
        ("--tcp", "127.0.0.1:abc", "the port 'abc' is not a number"),
        ("--tcp", "127.0.0.1:-1", "the port '-1' is not a number"),
        ("--tcp", "999.1.1.1:80", "'999.1.1.1' is not a valid IPv4 address"),
        ("--tcp", "1.2.3:80", "'1.2.3' is not a valid IPv4 address"),
        ("--tcp", "[::zz]:80", "'::zz' is not a valid IPv6 address"),
        ("--tcp", "bad host:80", "'bad host' is not a valid host name or IP"),
        ("--tcp", "-x.example:80", "'-x.example' is not a valid host name or IP"),
        ("--udp", "nonsense", "is not HOST:PORT"),
    ],
)
def test_bad_address_exits_2_with_one_error_line(
    option: str, value: str, why: str
) -> None:
    with run_echo(f"{option}={value}") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == ""
    assert_clean(stderr)
    # The error first, then where to look; not a screenful of usage.
    error, hint = stderr.splitlines()
    assert error.startswith(f"trioserve echo: error: argument {option}: "), stderr
    assert repr(value) in error
    assert why in error
    assert hint == "(run 'trioserve echo --help' for the options)"


@pytest.mark.parametrize(
    ("text", "address"),
    [
        ("127.0.0.1:80", ("127.0.0.1", 80)),
        ("[::1]:0", ("::1", 0)),
        ("::1:9999", ("::1", 9999)),
        ("localhost:9999", ("localhost", 9999)),
        ("my-host.example.:443", ("my-host.example.", 443)),
        ("10.0.0.1:65535", ("10.0.0.1", 65535)),
        # An empty host is every interface.
        (":9999", ("", 9999)),
        ("[]:9999", ("", 9999)),
    ],
)
def test_good_addresses_parse(text: str, address: tuple[str, int]) -> None:
    assert parse_host_port(text) == address


def test_an_unknown_option_is_one_line_and_a_hint() -> None:
    with run_echo("--no-such-option") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2
    assert stdout == ""
    assert stderr.splitlines() == [
        "trioserve: error: unrecognized arguments: --no-such-option",
        "(run 'trioserve --help' for the options)",
    ]


def test_address_in_use_exits_2_with_message() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with run_echo("--tcp", f"127.0.0.1:{port}") as cli:
            rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == ""
    assert_clean(stderr)
    lines = stderr.splitlines()
    assert len(lines) == 1, stderr
    assert lines[0].startswith("trioserve: error: cannot serve:"), stderr
    assert "address already in use" in stderr.lower(), stderr


def test_address_in_use_on_a_later_listener_serves_nothing() -> None:
    # The listeners all bind before any serves: the first, good one must not
    # report itself serving when the second cannot bind.
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as busy:
        busy.bind(("127.0.0.1", 0))
        port = busy.getsockname()[1]
        with run_echo("--tcp", "127.0.0.1:0", "--udp", f"127.0.0.1:{port}") as cli:
            rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == "", stdout
    assert_clean(stderr)
    assert "address already in use" in stderr.lower(), stderr


def test_address_not_on_this_host_exits_2() -> None:
    # 192.0.2.0/24 is TEST-NET-1, documentation only: no host has it.
    with run_echo("--tcp", "192.0.2.1:0") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert stdout == ""
    assert_clean(stderr)
    assert stderr.startswith("trioserve: error: cannot serve:"), stderr
    assert f"[Errno {errno.EADDRNOTAVAIL}]" in stderr, stderr


# -- informational options -------------------------------------------------


def test_version() -> None:
    with run_echo("--version", command="") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 0, stderr
    assert stdout.strip() == f"trioserve {trioserve.__version__}"


def test_echo_help_exits_0() -> None:
    with run_echo("--help") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 0, stderr
    assert "--tcp" in stdout
    assert "--udp" in stdout
    assert stderr == ""
    help_text = " ".join(stdout.split())  # argparse wraps lines anywhere
    assert ":PORT for all interfaces" in help_text
    # The timeouts a deployment runs with unless told otherwise.
    assert f"(default {DEFAULT_TIMEOUT:g}, or the handler class's own" in help_text
    assert f"(default {DEFAULT_IDLE_TIMEOUT:g}; 'off' for none)" in help_text
    assert "--max-concurrent N" in help_text
    assert "--max-requests" not in help_text  # the old name, hidden
    assert "3 if the handler's module raised an exception" in help_text


def test_no_command_exits_2() -> None:
    with run_echo(command="") as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2
    assert stdout == ""
    assert stderr.splitlines() == [
        "trioserve: error: the following arguments are required: COMMAND",
        "(run 'trioserve --help' for the options)",
    ]
