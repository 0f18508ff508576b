"""Reliability: running out of file descriptors, and connection floods beyond the bound.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import selectors
import socket
import time
from collections.abc import Callable

import pytest
from support.reliability import (
    IO_TIMEOUT,
    child,
    cpu_seconds,
    params,
    process_fds,
    report,
)

# Runs ``python -m trioserve`` with RLIMIT_NOFILE lowered first (in the child
# itself, so the test process needs no preexec_fn).
LIMITED_CLI = (
    "import resource, runpy, sys; "
    "resource.setrlimit(resource.RLIMIT_NOFILE, ({limit}, {limit})); "
    "runpy.run_module('trioserve', run_name='__main__', alter_sys=True)"
)


def cli_port(line: str) -> int:
    assert line.startswith("trioserve: serving TCP on 127.0.0.1:"), line
    return int(line.rpartition(":")[2])


def wait_until(predicate: Callable[[], bool], what: str) -> None:
    """Poll another process's state (its fds, its log) until ``predicate``."""
    deadline = time.monotonic() + IO_TIMEOUT
    while not predicate():
        assert time.monotonic() < deadline, f"never happened: {what}"
        time.sleep(0.01)


def blocking_line(sock: socket.socket) -> bytes:
    """Read up to and including a newline (or to end of stream)."""
    data = b""
    while not data.endswith(b"\n"):
        chunk = sock.recv(4096)
        if not chunk:
            break
        data += chunk
    return data


def test_running_out_of_file_descriptors_is_survived() -> None:
    limit = 64
    with child(
        "-c", LIMITED_CLI.format(limit=limit), "echo", "--tcp", "127.0.0.1:0"
    ) as (server):
        port = cli_port(server.line())
        idle_fds = process_fds(server.pid)
        # Each connection it accepts costs the server one descriptor.
        room = limit - idle_fds
        clients: list[socket.socket] = []
        try:
            for number in range(room + 20):
                client = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                clients.append(client)
                client.sendall(b"hi %d\n" % number)
            wait_until(lambda: "EMFILE" in server.stderr(), "EMFILE logged")
            # Those it could accept are served: the first `room` ones, in
            # order of arrival.
            for number, client in enumerate(clients[:room]):
                assert blocking_line(client) == b"hi %d\n" % number
            assert process_fds(server.pid) == limit
            # Out of descriptors, it pauses between attempts to accept
            # instead of spinning: watch it for a second.
            cpu_before = cpu_seconds(server.pid)
            logged_before = server.stderr().count("EMFILE")
            time.sleep(1.0)
            cpu_used = cpu_seconds(server.pid) - cpu_before
            retries = server.stderr().count("EMFILE") - logged_before
            assert cpu_used < 0.5, f"{cpu_used:.2f} s of CPU in 1 s at EMFILE"
            assert server.proc.poll() is None
            # Release them all; the server accepts again, also the clients
            # that waited in the backlog (and have gone by now).
        finally:
            for client in clients:
                client.close()
        wait_until(lambda: process_fds(server.pid) == idle_fds, "fds freed")
        with socket.create_connection(("127.0.0.1", port), IO_TIMEOUT) as client:
            client.sendall(b"served again\n")
            assert blocking_line(client) == b"served again\n"
        wait_until(lambda: process_fds(server.pid) == idle_fds, "fds freed")
        returncode, _, stderr = server.stop()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    emfile_lines = [line for line in stderr.splitlines() if "EMFILE" in line]
    assert all(" ERROR " in line for line in emfile_lines), emfile_lines
    report(
        "emfile",
        limit=limit,
        idle_fds=idle_fds,
        served_at_limit=room,
        emfile_log_lines=len(emfile_lines),
        retries_in_1s=retries,
        cpu_in_1s=f"{cpu_used:.2f}",
    )


@pytest.mark.parametrize("waiting", params((300,), (2000,)))
def test_connection_flood_beyond_max_requests_waits_in_the_backlog(
    waiting: int,
) -> None:
    bound = 10
    with child(
        "-m", "trioserve", "echo", "--tcp", "127.0.0.1:0", "--max-requests", str(bound)
    ) as server:
        port = cli_port(server.line())
        holders: list[socket.socket] = []
        waiters: list[socket.socket] = []
        try:
            for number in range(bound):
                holder = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                holders.append(holder)
                holder.sendall(b"hold %d\n" % number)
                assert blocking_line(holder) == b"hold %d\n" % number
            for number in range(waiting):
                waiter = socket.create_connection(("127.0.0.1", port), IO_TIMEOUT)
                waiters.append(waiter)
                waiter.sendall(b"wait %d\n" % number)
            with selectors.DefaultSelector() as selector:
                for number, waiter in enumerate(waiters):
                    selector.register(waiter, selectors.EVENT_READ, number)
                # At the bound, nobody else is served (a slow server would
                # only make this pass more easily).
                assert selector.select(timeout=0.5) == []
                for holder in holders:
                    holder.close()
                # Each waiter, once answered, hangs up and frees its slot.
                served = 0
                deadline = time.monotonic() + IO_TIMEOUT + waiting / 100
                while served < waiting:
                    remaining = deadline - time.monotonic()
                    assert remaining > 0, f"only {served} of {waiting} served"
                    for key, _ in selector.select(remaining):
                        number = key.data
                        selector.unregister(key.fileobj)
                        assert blocking_line(waiters[number]) == b"wait %d\n" % number
                        waiters[number].close()
                        served += 1
        finally:
            for sock in holders + waiters:
                sock.close()
        returncode, _, stderr = server.stop()
    assert returncode == 0, stderr
    assert "Traceback" not in stderr, stderr
    assert served == waiting
