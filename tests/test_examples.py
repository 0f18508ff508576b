"""The examples in ``examples/``, each run as a real subprocess.

Every test starts an example on port 0, learns its real addresses from the
``listening: KIND ADDRESS`` lines it prints, talks to it over real sockets
(plain blocking ones, each with a timeout), then sends SIGTERM and checks
that it exits 0 with nothing alarming on stderr. The interpreter runs with
``-W error::ResourceWarning``; a subprocess still running at the end of a
test is killed in a ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cli import EXIT_TIMEOUT, IO_TIMEOUT, LineReader, running
from support.examples import (
    EXAMPLES,
    Example,
    LineClient,
    connect,
    counters,
    line_client,
    parse_address,
    run_example,
)
from support.servers import ipv6_loopback_available

# The examples stop gracefully on either.
STOP_SIGNALS = [signal.SIGTERM, signal.SIGINT]


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


# -- plain blocking clients --------------------------------------------------


def udp_ask(address: tuple[str, int], payload: bytes) -> bytes:
    family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as client:
        client.settimeout(IO_TIMEOUT)
        client.sendto(payload, address)
        data, source = client.recvfrom(65536)
    assert source[1] == address[1]
    return data


# -- tcp_echo, udp_echo, multi_protocol --------------------------------------


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=signal_name)
def test_tcp_echo(signum: int) -> None:
    with run_example("tcp_echo", "--port", "0") as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"hello\n") == b"hello\n"
            # Two lines in one send come back as two lines.
            client.send(b"one\ntwo\n")
            assert client.readline() == b"one\n"
            assert client.readline() == b"two\n"
            # A line split across sends comes back whole.
            client.send(b"spl")
            client.send(b"it\n")
            assert client.readline() == b"split\n"
            # An idle client sees end of stream when the shutdown starts.
            example.proc.send_signal(signum)
            assert client.readline() == b""
        _, stderr = example.finish()
    assert "shutting down" in stderr
    assert "KeyboardInterrupt" not in stderr


@pytest.mark.skipif(
    not ipv6_loopback_available(), reason="IPv6 loopback is unavailable"
)
@pytest.mark.parametrize(("name", "kind"), [("tcp_echo", "TCP"), ("udp_echo", "UDP")])
def test_echo_over_ipv6(name: str, kind: str) -> None:
    with run_example(name, "--host", "::1", "--port", "0") as example:
        address = example.listening(1)[kind]
        assert address[0] == "::1"
        if kind == "TCP":
            with line_client(address) as client:
                assert client.ask(b"over ipv6\n") == b"over ipv6\n"
        else:
            assert udp_ask(address, b"over ipv6") == b"over ipv6"
        example.stop()


def test_udp_echo() -> None:
    with run_example("udp_echo", "--port", "0") as example:
        address = example.listening(1)["UDP"]
        assert udp_ask(address, b"hello over udp") == b"hello over udp"
        assert udp_ask(address, b"two\nlines\n") == b"two\nlines\n"
        example.stop()


def test_multi_protocol_serves_one_body_over_three_transports(short_tmp: Path) -> None:
    unix_path = str(short_tmp / "shout.sock")
    args = ["--port", "0", "--udp-port", "0", "--unix", unix_path]
    with run_example("multi_protocol", *args) as example:
        listeners = example.listening(3)
        assert listeners["UNIX"] == unix_path
        for kind in ("TCP", "UNIX"):
            with line_client(listeners[kind]) as client:
                assert client.ask(f"hi over {kind}\n".encode()) == (
                    f"HI OVER {kind}\n".encode()
                )
                assert client.ask(b"again\n") == b"AGAIN\n"
        assert udp_ask(listeners["UDP"], b"hi\nover udp") == b"HI\nOVER UDP"
        example.stop()
    assert not Path(unix_path).exists(), "the socket file was left behind"


# -- chat ---------------------------------------------------------------------


def chat_name(client: LineClient) -> str:
    host, port = client.sock.getsockname()[:2]
    return f"{host}:{port}"


@contextlib.contextmanager
def chat_member(address: Any, *others: LineClient) -> Iterator[LineClient]:
    """Join the chat; return once the member and ``others`` have seen it join."""
    with line_client(address) as client:
        name = chat_name(client)
        assert client.readline() == f"* welcome, {name}\n".encode()
        for other in others:
            assert other.readline() == f"* {name} joined\n".encode()
        yield client


def test_chat_broadcasts_to_the_others_and_says_goodbye() -> None:
    with run_example("chat", "--port", "0") as example:
        address = example.listening(1)["TCP"]
        with chat_member(address) as alice, chat_member(address, alice) as bob:
            alice.send(b"hello\n")
            assert bob.readline() == f"{chat_name(alice)}: hello\n".encode()
            bob.send(b"hi\r\n")
            # Alice's next line is Bob's: her own message never came back.
            assert alice.readline() == f"{chat_name(bob)}: hi\n".encode()

            # A member that resets its connection leaves; the rest carry on.
            with chat_member(address, alice, bob) as carol:
                name = chat_name(carol)
                carol.sock.setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
                )
            assert alice.readline() == bob.readline() == f"* {name} left\n".encode()
            alice.send(b"still here\n")
            assert bob.readline() == f"{chat_name(alice)}: still here\n".encode()

            example.proc.send_signal(signal.SIGTERM)
            for member in (alice, bob):
                assert member.readline() == b"* the server is shutting down, goodbye\n"
                assert member.readline() == b""
            example.finish()


def test_chat_drops_a_member_that_stopped_reading() -> None:
    with run_example("chat", "--port", "0") as example:
        address = example.listening(1)["TCP"]
        with chat_member(address) as alice, chat_member(address, alice) as bob:
            with socket.socket() as stalled:
                # A small receive buffer that is never read: writes to this
                # member soon make no progress, and the chat must drop it.
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.settimeout(IO_TIMEOUT)
                stalled.connect(address)
                host, port = stalled.getsockname()[:2]
                left = f"* {host}:{port} left\n".encode()
                assert bob.readline() == f"* {host}:{port} joined\n".encode()
                assert alice.readline() == f"* {host}:{port} joined\n".encode()
                seen: list[bytes] = []
                message = b"x" * 60000 + b"\n"
                for _ in range(1000):  # bound: far more than any buffer holds
                    alice.send(message)
                    while (
                        line := bob.readline()
                    ) != f"{chat_name(alice)}: ".encode() + message:
                        assert line, "bob was disconnected"
                        seen.append(line)
                    if left in seen:
                        break
                else:
                    pytest.fail("the stalled member was never dropped")
                assert alice.readline() == left
                # Its connection was closed: it sees end of stream once it
                # reads what had reached it.
                while stalled.recv(1 << 20):
                    pass
            # Bob, who kept reading, is still served.
            alice.send(b"after\n")
            assert bob.readline() == f"{chat_name(alice)}: after\n".encode()
            example.stop()


# -- allow_list ---------------------------------------------------------------


def can_bind(host: str) -> bool:
    try:
        with socket.socket() as probe:
            probe.bind((host, 0))
    except OSError:
        return False
    return True


def test_allow_list_serves_allowed_clients_and_closes_the_others() -> None:
    # 127.0.0.2 is a loopback address too on Linux (not on macOS), but it is
    # not in 127.0.0.1's network.
    alias = can_bind("127.0.0.2")
    with run_example("allow_list", "--port", "0", "--allow", "127.0.0.2/32") as example:
        host, port = example.listening(1)["TCP"]
        with line_client((host, port)) as rejected:
            assert rejected.readline() == b""
        if alias:
            with socket.create_connection(
                (host, port), timeout=IO_TIMEOUT, source_address=("127.0.0.2", 0)
            ) as sock:
                allowed = LineClient(sock)
                assert allowed.ask(b"let me in\n") == b"let me in\n"
        stdout, stderr = example.stop()
    assert "rejected 127.0.0.1" in stderr
    assert f"served {int(alias)}, rejected 1" in stdout


def test_allow_list_default_allows_loopback() -> None:
    with run_example("allow_list", "--port", "0") as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"hello\n") == b"hello\n"
        stdout, _ = example.stop()
    assert "served 1, rejected 0" in stdout


# -- peer_uid -----------------------------------------------------------------


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED")
def test_peer_uid_serves_its_own_user(short_tmp: Path) -> None:
    path = str(short_tmp / "peer.sock")
    with run_example("peer_uid", "--path", path) as example:
        assert example.listening(1)["UNIX"] == path
        with line_client(path) as client:
            assert client.readline() == b"hello, uid %d\n" % os.geteuid()
            assert client.ask(b"it is me\n") == b"it is me\n"
        stdout, _ = example.stop()
    assert "served 1, rejected 0" in stdout


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="SO_PEERCRED")
def test_peer_uid_closes_other_users_unhandled(short_tmp: Path) -> None:
    path = str(short_tmp / "peer.sock")
    other = str(os.geteuid() + 1)
    with run_example("peer_uid", "--path", path, "--allow-uid", other) as example:
        example.listening(1)
        with line_client(path) as rejected:
            assert rejected.readline() == b""
        stdout, stderr = example.stop()
    assert "rejected PeerCredentials(pid=" in stderr
    assert f"uid={os.geteuid()}" in stderr
    assert "served 0, rejected 1" in stdout


# -- tls_echo -----------------------------------------------------------------


def test_tls_echo_verifies_against_the_written_ca(short_tmp: Path) -> None:
    cafile = short_tmp / "ca.pem"
    with run_example("tls_echo", "--port", "0", "--cafile", str(cafile)) as example:
        host, port = example.listening(1)["TLS"]
        trusting = ssl.create_default_context(cafile=str(cafile))
        with connect((host, port)) as raw:
            with trusting.wrap_socket(raw, server_hostname=host) as tls:
                client = LineClient(tls)
                assert client.ask(b"secret\n") == b"secret\n"
                assert client.ask(b"again\n") == b"again\n"
                assert tls.version() is not None
            # Closed without close_notify (Python's close() sends none): an
            # end of stream to the server, not an error with a traceback.
        # A client that does not trust the CA refuses the server.
        with connect((host, port)) as raw:
            with pytest.raises(ssl.SSLCertVerificationError):
                ssl.create_default_context().wrap_socket(raw, server_hostname=host)
        if openssl := shutil.which("openssl"):
            openssl_echo(openssl, host, port, cafile)
        example.stop()


def test_tls_echo_answers_a_clean_tls_shutdown(short_tmp: Path) -> None:
    cafile = short_tmp / "ca.pem"
    with run_example("tls_echo", "--port", "0", "--cafile", str(cafile)) as example:
        host, port = example.listening(1)["TLS"]
        context = ssl.create_default_context(cafile=str(cafile))
        with connect((host, port)) as raw:
            with context.wrap_socket(raw, server_hostname=host) as tls:
                assert LineClient(tls).ask(b"bye\n") == b"bye\n"
                # Sends our close_notify and waits for the server's: a
                # client can then tell a complete reply from a truncated one.
                tls.unwrap()
        example.stop()


def openssl_echo(openssl: str, host: str, port: int, cafile: Path) -> None:
    argv = [openssl, "s_client", "-quiet", "-no_ign_eof", "-verify_return_error"]
    argv += ["-connect", f"{host}:{port}", "-CAfile", str(cafile)]
    proc = subprocess.Popen(
        argv,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert proc.stdin is not None
        assert proc.stdout is not None
        reader = LineReader(proc.stdout)
        proc.stdin.write("hello from openssl\n")
        proc.stdin.flush()
        assert reader.next_line(IO_TIMEOUT) == "hello from openssl"
        proc.stdin.close()  # end of input: s_client closes and exits
        assert proc.wait(timeout=EXIT_TIMEOUT) == 0
        reader.join()
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=EXIT_TIMEOUT)
        assert proc.stdout is not None
        proc.stdout.close()


def test_tls_echo_default_cafile_is_a_temp_file_removed_at_exit() -> None:
    cafile = None
    try:
        with run_example("tls_echo", "--port", "0") as example:
            line = example.stdout.next_line()
            assert line is not None
            assert line.startswith("CA certificate: "), line
            cafile = Path(line.removeprefix("CA certificate: "))
            host, port = example.listening(1)["TLS"]
            context = ssl.create_default_context(cafile=str(cafile))
            with connect((host, port)) as raw:
                with context.wrap_socket(raw, server_hostname=host) as tls:
                    assert LineClient(tls).ask(b"hi\n") == b"hi\n"
            example.stop()
        assert not cafile.exists()
    finally:
        # A failed test kills the example before it can clean up.
        if cafile is not None:
            cafile.unlink(missing_ok=True)


# -- kv_store -----------------------------------------------------------------


def test_kv_store_commands_and_errors(short_tmp: Path) -> None:
    data = short_tmp / "kv.json"
    with run_example("kv_store", "--port", "0", "--data", str(data)) as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"GET greeting\n") == b"NOT_FOUND\n"
            assert client.ask(b"SET greeting hello,  world\r\n") == b"OK\n"
            assert client.ask(b"GET greeting\n") == b"VALUE hello,  world\n"
            assert client.ask(b"SET greeting hi\n") == b"OK\n"
            assert client.ask(b"GET greeting\n") == b"VALUE hi\n"
            # Malformed commands get an ERROR, and the connection goes on.
            for bad in (b"\n", b"FROB x\n", b"GET\n", b"SET lonely\n", b"\xff\xfe\n"):
                assert client.ask(bad).startswith(b"ERROR "), bad
            assert client.ask(b"DEL greeting\n") == b"OK\n"
            assert client.ask(b"DEL greeting\n") == b"NOT_FOUND\n"
            assert client.ask(b"GET greeting\n") == b"NOT_FOUND\n"
        # Another connection sees the same store.
        with line_client(address) as client:
            assert client.ask(b"SET shared yes\n") == b"OK\n"
        with line_client(address) as client:
            assert client.ask(b"GET shared\n") == b"VALUE yes\n"
        stdout, _ = example.stop()
    assert "saved 1 keys" in stdout


def test_kv_store_keeps_its_data_across_a_graceful_restart(short_tmp: Path) -> None:
    data = short_tmp / "kv.json"
    args = ["--port", "0", "--data", str(data)]
    with run_example("kv_store", *args) as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"SET city Zurich am See\n") == b"OK\n"
            assert client.ask("SET café crème\n".encode()) == b"OK\n"
            # SIGTERM with the client still connected and idle.
            example.stop()
    assert json.loads(data.read_text(encoding="utf-8")) == {
        "city": "Zurich am See",
        "café": "crème",
    }
    assert not Path(f"{data}.tmp").exists()
    with run_example("kv_store", *args) as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"GET city\n") == b"VALUE Zurich am See\n"
            assert client.ask("GET café\n".encode()) == "VALUE crème\n".encode()
        example.stop()


# -- http_keepalive, resp_store: also served by `python -m trioserve serve` ---


@contextlib.contextmanager
def serving_example(how: str, name: str, handler: str) -> Iterator[tuple[Example, Any]]:
    """Run example ``name`` as a script, or its ``handler`` with the command line.

    Yields the running process and its TCP address.
    """
    if how == "script":
        with run_example(name, "--port", "0") as example:
            yield example, example.listening(1)["TCP"]
        return
    argv = [sys.executable, "-W", "error::ResourceWarning", "-m", "trioserve"]
    argv += ["serve", f"{name}:{handler}", "--tcp", "127.0.0.1:0"]
    with running(Example, argv, cwd=EXAMPLES) as example:
        line = example.stdout.next_line()
        assert line is not None, example.stderr.join()
        assert line.startswith("trioserve: serving TCP on "), line
        yield example, parse_address(line.rpartition(" on ")[2])


HOW = ["script", "command-line"]


def http_exchange(
    client: LineClient, request: bytes
) -> tuple[bytes, dict[str, str], bytes]:
    """Send ``request``; return the reply's status line, headers and body line."""
    client.send(request)
    status = client.readline()
    headers = {}
    while (line := client.readline()) != b"\r\n":
        assert line.endswith(b"\r\n"), f"end of stream in the headers: {line!r}"
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.lower()] = value.strip()
    body = client.readline() if int(headers["content-length"]) else b""
    assert len(body) == int(headers["content-length"]), body
    return status, headers, body


@pytest.mark.parametrize("how", HOW)
def test_http_keepalive_serves_many_requests_per_connection(how: str) -> None:
    with serving_example(how, "http_keepalive", "HTTPHandler") as (example, address):
        with line_client(address) as client:
            for target in ("/", "/again"):
                request = f"GET {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode()
                status, headers, body = http_exchange(client, request)
                assert status == b"HTTP/1.1 200 OK\r\n"
                assert headers["connection"] == "keep-alive"
                assert body == f"Hello from trioserve: GET {target}\n".encode()
            post = b"POST /form HTTP/1.1\r\nContent-Length: 5\r\n\r\na=b&c"
            _, _, body = http_exchange(client, post)
            assert body == b"Hello from trioserve: POST /form\n"
            client.send(b"HEAD / HTTP/1.1\r\n\r\n")
            assert client.readline() == b"HTTP/1.1 200 OK\r\n"
            while client.readline() != b"\r\n":
                pass  # HEAD: the headers of a GET, and no body
            # The client may end the connection in its protocol, too.
            closing = b"GET /bye HTTP/1.1\r\nConnection: close\r\n\r\n"
            _, headers, _ = http_exchange(client, closing)
            assert headers["connection"] == "close"
            assert client.readline() == b""
        with line_client(address) as client:  # HTTP/1.0 closes by default
            _, headers, _ = http_exchange(client, b"GET / HTTP/1.0\r\n\r\n")
            assert headers["connection"] == "close"
            assert client.readline() == b""
        example.stop()


@pytest.mark.parametrize(
    ("request_bytes", "status"),
    [
        (b"GARBAGE\r\n\r\n", b"400"),
        (b"GET / HTTP/2.0\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nno colon\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nContent-Length: -1\r\n\r\n", b"400"),
        (b"GET / HTTP/1.1\r\nContent-Length: 9999999999\r\n\r\n", b"413"),
        (b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n", b"501"),
    ],
)
def test_http_keepalive_refuses_bad_requests_and_closes(
    request_bytes: bytes, status: bytes
) -> None:
    served = serving_example("script", "http_keepalive", "HTTPHandler")
    with served as (example, address):
        with line_client(address) as client:
            status_line, headers, _ = http_exchange(client, request_bytes)
            assert status_line.split()[1] == status
            assert headers["connection"] == "close"
            assert client.readline() == b""
        example.stop()


@pytest.mark.parametrize("how", HOW)
def test_http_keepalive_says_goodbye_when_shutting_down(how: str) -> None:
    with serving_example(how, "http_keepalive", "HTTPHandler") as (example, address):
        with line_client(address) as idle, line_client(address) as busy:
            request = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
            for client in (idle, busy):
                assert http_exchange(client, request)[1]["connection"] == "keep-alive"
            # A request half sent when the signal comes is answered, with
            # the goodbye; an idle connection just ends.
            busy.send(request[:-6])
            example.proc.send_signal(signal.SIGTERM)
            example.stderr.wait_for("shutting down")
            assert idle.readline() == b""
            busy.send(request[-6:])
            status, headers, _ = http_exchange(busy, b"")
            assert status == b"HTTP/1.1 200 OK\r\n"
            assert headers["connection"] == "close"
            assert busy.readline() == b""
        example.finish()


def resp_reply(client: LineClient) -> bytes:
    """One RESP reply, whole: a line, or a bulk string or array with its parts."""
    line = client.readline()
    if line[:1] == b"$" and line != b"$-1\r\n":
        # Bulk strings are binary: read by length, not by line.
        size = int(line[1:]) + 2
        while len(client.buffer) < size:
            chunk = client.sock.recv(65536)
            assert chunk, f"end of stream in a bulk string: {client.buffer!r}"
            client.buffer += chunk
        data, client.buffer = client.buffer[:size], client.buffer[size:]
        return line + data
    if line[:1] == b"*":
        return line + b"".join(resp_reply(client) for _ in range(int(line[1:])))
    return line


def resp_command(*words: bytes) -> bytes:
    parts = [b"$%d\r\n%s\r\n" % (len(word), word) for word in words]
    return b"*%d\r\n" % len(words) + b"".join(parts)


@pytest.mark.parametrize("how", HOW)
def test_resp_store_commands_and_pipelining(how: str) -> None:
    with serving_example(how, "resp_store", "RESPHandler") as (example, address):
        with line_client(address) as client:

            def ask(*words: bytes) -> bytes:
                client.send(resp_command(*words))
                return resp_reply(client)

            assert ask(b"PING") == b"+PONG\r\n"
            assert ask(b"ping", b"hi") == b"$2\r\nhi\r\n"
            assert ask(b"ECHO", b"a\r\nb") == b"$4\r\na\r\nb\r\n"
            assert ask(b"GET", b"greeting") == b"$-1\r\n"
            assert ask(b"SET", b"greeting", b"hello world") == b"+OK\r\n"
            assert ask(b"GET", b"greeting") == b"$11\r\nhello world\r\n"
            assert ask(b"DEL", b"greeting", b"other") == b":1\r\n"
            assert ask(b"CONFIG", b"GET", b"save") == b"*2\r\n$4\r\nsave\r\n$0\r\n\r\n"
            assert ask(b"CONFIG", b"GET", b"nothing") == b"*0\r\n"
            # Unknown commands and wrong arguments get an error; it carries on.
            assert ask(b"FROB").startswith(b"-ERR unknown command")
            assert ask(b"SET", b"lonely").startswith(b"-ERR ")
            # Inline commands, as typed by hand.
            client.send(b"PING\r\n\r\nSET k v\r\n")
            assert resp_reply(client) == b"+PONG\r\n"
            assert resp_reply(client) == b"+OK\r\n"
            # Pipelined: many commands in one send, replies in order.
            client.send(b"".join(resp_command(b"ECHO", b"%d" % n) for n in range(50)))
            for n in range(50):
                assert resp_reply(client) == b"$%d\r\n%d\r\n" % (len(str(n)), n)
            assert ask(b"QUIT") == b"+OK\r\n"
            assert client.readline() == b""
        with line_client(address) as client:  # the same store, on a new connection
            client.send(resp_command(b"GET", b"k"))
            assert resp_reply(client) == b"$1\r\nv\r\n"
        example.stop()


@pytest.mark.parametrize(
    "bad", [b"*x\r\n", b"*1\r\n:1\r\n", b"*1\r\n$3\r\nPINGPONG\r\n", b"*99999\r\n"]
)
def test_resp_store_closes_after_a_protocol_error(bad: bytes) -> None:
    with serving_example("script", "resp_store", "RESPHandler") as (example, address):
        with line_client(address) as client:
            client.send(bad)
            assert client.readline().startswith(b"-ERR Protocol error: ")
            assert client.readline() == b""
        example.stop()


# -- embedded -----------------------------------------------------------------


def wait_for_stats(example: Example, **expected: int) -> None:
    """Read stats lines until one shows the ``expected`` counters."""
    while True:
        line = example.stdout.wait_for("stats: ")
        if counters(line).items() >= expected.items():
            return


@pytest.mark.parametrize("signum", STOP_SIGNALS, ids=signal_name)
def test_embedded_serves_beside_a_stats_task(signum: int) -> None:
    with run_example("embedded", "--port", "0", "--interval", "0.1") as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"hello\n") == b"hello\n"
        # The application's other task reports while the server serves.
        wait_for_stats(example, accepted=1, active=0, completed=1)
        with line_client(address) as client:
            assert client.ask(b"again\n") == b"again\n"
            wait_for_stats(example, accepted=2, active=1)
            # The signal comes with the client connected and idle.
            example.proc.send_signal(signum)
            assert client.readline() == b""
        stdout, stderr = example.finish()
    [final] = [line for line in stdout.splitlines() if line.startswith("final stats")]
    assert (
        counters(final).items() >= {"accepted": 2, "active": 0, "completed": 2}.items()
    )
    assert f"{signal_name(signum)}: shutting down" in stderr


# -- trio_listeners -----------------------------------------------------------


def test_trio_listeners_serve_until_the_application_cancels() -> None:
    # The application's deadline cancels the server with a client connected
    # and idle: the client sees the connection close cleanly, finish() ran,
    # and the stats were readable from another task all along.
    argv = ["--port", "0", "--serve-for", "3", "--interval", "0.1"]
    with run_example("trio_listeners", *argv) as example:
        address = example.listening(1)["TCP"]
        with line_client(address) as client:
            assert client.ask(b"hello\n") == b"hello\n"
            wait_for_stats(example, accepted=1, active=1)
            assert client.readline() == b""
        stdout, stderr = example.finish()
    assert "closing ('127.0.0.1'," in stdout, stdout
    [final] = [line for line in stdout.splitlines() if line.startswith("final stats")]
    assert counters(final).items() >= {"accepted": 1, "cancelled": 1}.items()
    assert "Traceback" not in stderr, stderr


# -- all of them --------------------------------------------------------------

EXAMPLE_NAMES = [
    "allow_list",
    "chat",
    "embedded",
    "http_keepalive",
    "kv_store",
    "multi_protocol",
    "peer_uid",
    "resp_store",
    "tcp_echo",
    "tls_echo",
    "trio_listeners",
    "udp_echo",
]


def test_every_example_is_tested_here() -> None:
    assert sorted(path.stem for path in EXAMPLES.glob("*.py")) == EXAMPLE_NAMES


@pytest.mark.parametrize("name", EXAMPLE_NAMES)
def test_help_shows_how_to_try_it(name: str) -> None:
    with run_example(name, "--help") as example:
        rc = example.proc.wait(timeout=EXIT_TIMEOUT)
        stdout, stderr = example.stdout.join(), example.stderr.join()
    assert rc == 0, stderr
    assert "Try it" in stdout
    # Where it listens: a port, or (for a Unix socket alone) a path.
    assert "--port" in stdout or "--path" in stdout
    assert stderr == ""
