"""Graceful shutdown as real clients meet it: SIGTERM in the middle of a load.

Each test serves one of the examples (``http_keepalive``, ``resp_store``,
counting their replies: see ``counting_handlers``) with ``python -m
trioserve serve``, loads it with 50 keep-alive connections, and sends
SIGTERM while they are busy. The promise under test (CONTRACT.md, "Shutdown
and cancellation"): every reply the server wrote reaches its client,
followed by a clean end of stream, never a reset; a request that reached
the server is served; an idle connection gets a short drain window to start
its next request; the server exits 0.

The terms (sent, answered, unanswered, clean end, reset, ragged end) are
defined in ``real_clients``. In short, a request is *unanswered* if the
client sent it on a connection it had not seen end, and the connection then
ended without its reply. The HTTP handler says goodbye (``Connection:
close``) once the server stops serving, so none of its requests may go
unanswered: each was either answered, or never sent because the client saw
the end of the connection first (a client may find its idle connection
ended; an HTTP client then retries on a new one). Clients that pause only
briefly between requests, far inside the drain window, must not even find
that: every one of them gets its goodbye. The Redis protocol has no
goodbye, so a command still in flight when the server closes may go
unanswered; what must hold there is that every reply written arrives, and
nothing is reset.

Then the same with the tools people measure servers with: ``wrk`` (HTTP and
HTTPS) must report no read errors, and ``redis-benchmark`` must never say
"Connection reset by peer". Those tests skip if the tool is not installed.
"""

from __future__ import annotations

import re
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import pytest
import trustme
from support.cli import EXIT_TIMEOUT, IO_TIMEOUT
from support.real_clients import (
    CLIENTS,
    HTTP,
    RESP,
    Outcome,
    Server,
    load_then_terminate,
    serving,
)

import trioserve

# How long a benchmark tool runs before SIGTERM: long enough that every
# connection is busy, short of the tool's own end (which the tests check).
TOOL_LOAD_BEFORE_SIGNAL = 1.0


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


@pytest.fixture
def tls_files(ca: trustme.CA, tmp_path: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, as PEM files."""
    cert = ca.issue_cert("127.0.0.1")
    cert_file, key_file = tmp_path / "cert.pem", tmp_path / "key.pem"
    cert.cert_chain_pems[0].write_to_path(str(cert_file))
    for extra in cert.cert_chain_pems[1:]:
        extra.write_to_path(str(cert_file), append=True)
    cert.private_key_pem.write_to_path(str(key_file))
    return cert_file, key_file


@pytest.fixture
def client_context(ca: trustme.CA) -> ssl.SSLContext:
    context = ssl.create_default_context()
    ca.configure_trust(context)
    return context


def assert_nothing_lost(outcome: Outcome) -> None:
    """Exit 0; every reply written arrived; no reset, no ragged end, no error."""
    counts = outcome.counts
    summary = outcome.summary()
    assert counts.answered > 0, summary
    assert outcome.status == 0, f"{summary}\n{outcome.stderr}"
    assert counts.errors == [], summary
    assert counts.resets == 0, summary
    assert counts.ragged_ends == 0, summary
    assert outcome.replies_lost == 0, f"{summary}\n{outcome.stderr}"


# -- our own clients ----------------------------------------------------------

# The clients either ask again at once, keeping the server busy, or pause
# briefly between requests, so that when SIGTERM comes many connections are
# idle with a request due soon. A pause this much shorter than the drain
# window (the time a connection idle at shutdown still has to start a
# request) must never find the connection gone.
DRAIN_WINDOW = getattr(trioserve.BaseServer, "drain_window", 0.25)
BRIEF_PAUSE = DRAIN_WINDOW / 25
PAUSES = [pytest.param(0.0, id="busy"), pytest.param(BRIEF_PAUSE, id="pausing")]


def assert_every_request_answered(outcome: Outcome) -> None:
    """Nothing lost, and no request sent went unanswered; with pauses well
    inside the drain window, no client found its connection ended."""
    assert_nothing_lost(outcome)
    counts = outcome.counts
    assert counts.unanswered == 0, outcome.summary()
    assert counts.goodbyes + counts.ended_before_sending == CLIENTS, outcome.summary()


@pytest.mark.parametrize("pause", PAUSES)
def test_http_keepalive_clients_all_answered_over_tcp(pause: float) -> None:
    with serving("HTTPHandler") as server:
        outcome = load_then_terminate(server, HTTP(think=pause))
    assert_every_request_answered(outcome)
    if pause:
        assert outcome.counts.ended_before_sending == 0, outcome.summary()


@pytest.mark.parametrize("pause", PAUSES)
def test_http_keepalive_clients_all_answered_over_tls(
    pause: float, tls_files: tuple[Path, Path], client_context: ssl.SSLContext
) -> None:
    with serving("HTTPHandler", tls=tls_files) as server:
        outcome = load_then_terminate(server, HTTP(think=pause), tls=client_context)
    assert_every_request_answered(outcome)
    if pause:
        assert outcome.counts.ended_before_sending == 0, outcome.summary()


def test_http_keepalive_clients_all_answered_with_workers() -> None:
    with serving("HTTPHandler", workers=2) as server:
        outcome = load_then_terminate(server, HTTP(think=BRIEF_PAUSE))
    assert_every_request_answered(outcome)
    assert outcome.counts.ended_before_sending == 0, outcome.summary()


@pytest.mark.parametrize("pipeline", [1, 16])
def test_resp_clients_get_every_reply_and_no_reset(pipeline: int) -> None:
    with serving("RESPHandler") as server:
        outcome = load_then_terminate(server, RESP(pipeline=pipeline))
    assert_nothing_lost(outcome)


# -- benchmark tools ----------------------------------------------------------


def tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.skip(f"{name} is not installed (Debian: apt install {name})")
    return path


def run_tool_then_terminate(server: Server, argv: list[str]) -> tuple[int, str]:
    """Run a benchmark tool; SIGTERM the server mid-run; the server's exit
    status and the tool's output."""
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    try:
        time.sleep(TOOL_LOAD_BEFORE_SIGNAL)  # a load to interrupt
        assert proc.poll() is None, f"{argv[0]} ended before the signal"
        status = server.terminate()
        output, _ = proc.communicate(timeout=EXIT_TIMEOUT)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return status, output


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_wrk_sees_no_read_errors(scheme: str, tls_files: tuple[Path, Path]) -> None:
    wrk = tool("wrk")
    tls = tls_files if scheme == "https" else None
    with serving("HTTPHandler", tls=tls) as server:
        host, port = server.address
        argv = [wrk, "-t2", "-c50", "-d3s", f"{scheme}://{host}:{port}/"]
        status, output = run_tool_then_terminate(server, argv)
        written = server.replies_written()
    assert status == 0, output
    requests = re.search(r"(\d+) requests in", output)
    assert requests is not None, output
    assert int(requests[1]) > 0, output
    # Every reply the server wrote reached wrk whole.
    assert int(requests[1]) == written, f"written {written}\n{output}"
    # wrk prints "Socket errors: connect C, read R, write W, timeout T" only
    # when there were some; connect errors after the server has gone are
    # expected, read errors mean a connection was reset.
    errors = re.search(r"read (\d+)", output)
    assert errors is None or int(errors[1]) == 0, f"written {written}\n{output}"


@pytest.mark.parametrize("pipeline", [1, 16])
def test_redis_benchmark_sees_no_reset(pipeline: int) -> None:
    redis_benchmark = tool("redis-benchmark")
    with serving("RESPHandler") as server:
        host, port = server.address
        argv = [redis_benchmark, "-h", host, "-p", str(port), "-c", "50"]
        argv += ["-n", "100000", "-t", "set", "-P", str(pipeline)]
        status, output = run_tool_then_terminate(server, argv)
    assert status == 0, output
    # At the end, redis-benchmark reports how the connection ended:
    # "Server closed the connection" is a clean end.
    assert "reset" not in output.lower(), output[-2000:]


# -- datagrams -----------------------------------------------------------------


def test_datagrams_in_flight_at_sigterm_all_get_their_reply() -> None:
    """UDP clients ping-pong; SIGTERM comes with a datagram in flight for each.

    A datagram server replies on the socket it listens on, so closing that
    socket at the signal (as stream servers close their listeners) would
    lose every reply still being worked on. Each client stops sending when
    the signal is sent and must then get the reply to its last datagram.
    """
    clients = 20
    # Sends happen under this lock, and the signal is sent holding it with
    # stop set: so every datagram counted as sent was sent before SIGTERM.
    sending = threading.Lock()
    stop = False
    counts = [[0, 0] for _ in range(clients)]  # sent, answered
    errors: list[BaseException] = []

    def client(number: int, address: tuple[str, int]) -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.settimeout(IO_TIMEOUT)
            sock.connect(address)
            try:
                while True:
                    payload = b"%d %d" % (number, counts[number][0])
                    with sending:
                        if stop:
                            return
                        sock.send(payload)
                        counts[number][0] += 1
                    if sock.recv(100) == payload:
                        counts[number][1] += 1
            except OSError as exc:
                errors.append(exc)

    with serving("SlowDatagramEcho", listener="--udp") as server:
        threads = [
            threading.Thread(target=client, args=(n, server.address), daemon=True)
            for n in range(clients)
        ]
        for thread in threads:
            thread.start()
        deadline = time.monotonic() + IO_TIMEOUT
        while any(answered < 2 for _, answered in counts):
            assert time.monotonic() < deadline, counts
            time.sleep(0.01)
        with sending:
            stop = True
            server.proc.send_signal(signal.SIGTERM)
        status = server.proc.wait(timeout=EXIT_TIMEOUT)
        for thread in threads:
            thread.join(IO_TIMEOUT)
        written = server.replies_written()
    assert status == 0, server.stderr.join()
    assert errors == []
    assert [sent - answered for sent, answered in counts] == [0] * clients
    assert written == sum(answered for _, answered in counts)
