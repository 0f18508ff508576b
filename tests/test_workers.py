"""Worker processes: ``--workers N`` and ``serve_in_workers``, as real processes.

Each worker answers with its process id, so a client can tell which worker
served it. Worker ids come from the supervisor's "worker N started (pid P)"
log lines.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import tempfile
import textwrap
import time
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
from support.cli import IO_TIMEOUT, EchoCLI, assert_clean, run_echo
from support.servers import ipv6_loopback_available

import trioserve

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="the tests expect Linux"
)

HANDLERS = """
import multiprocessing
import os

import trio
import trioserve


class Pid(trioserve.StreamRequestHandler):
    '''Replies "PID LINE"; "slow SECONDS" first says "PID started", then waits.'''

    async def handle(self):
        pid = b"%d " % os.getpid()
        async for line in self.rfile:
            if line.startswith(b"slow "):
                await self.wfile.write(pid + b"started\\n")
                await trio.sleep(float(line.split()[1]))
            await self.wfile.write(pid + line)


class PidDatagram(trioserve.DatagramRequestHandler):
    async def handle(self):
        await self.wfile.write(b"%d " % os.getpid() + await self.rfile.read())
"""

# Fails in worker processes only: the supervisor, which imports it first,
# starts fine.
BROKEN_IN_WORKERS = """
import multiprocessing

from my_handlers import Pid

if multiprocessing.parent_process() is not None:
    raise ImportError("this module does not load in workers")
"""

STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")
STOPPED = re.compile(r"worker (\d+) \(pid (\d+)\) stopped after (\d+) accepted")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tsw"))
    (path / "my_handlers.py").write_text(textwrap.dedent(HANDLERS))
    (path / "broken_handlers.py").write_text(textwrap.dedent(BROKEN_IN_WORKERS))
    yield path
    shutil.rmtree(path)


def serve_workers(
    workdir: Path, *args: str, handler: str = "my_handlers:Pid"
) -> contextlib.AbstractContextManager[EchoCLI]:
    return run_echo(handler, *args, command="serve", cwd=str(workdir))


def worker_pids(cli: EchoCLI, count: int) -> dict[int, int]:
    """Worker number -> pid, from the first ``count`` start-up lines."""
    pids: dict[int, int] = {}
    while len(pids) < count:
        match = STARTED.search(cli.stderr.wait_for("started (pid"))
        assert match
        pids[int(match[1])] = int(match[2])
    return pids


def ask(address: tuple[str, int], line: bytes = b"hello\n") -> int:
    """Send one line on a new connection; return the pid that answered."""
    with socket.create_connection(address, timeout=IO_TIMEOUT) as client:
        client.sendall(line)
        reply = client.makefile("rb").readline()
    pid, _, echoed = reply.partition(b" ")
    assert echoed == line, reply
    return int(pid)


def connection_to(address: tuple[str, int], pid: int) -> socket.socket:
    """A connection that worker ``pid`` serves, with one exchange done."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        client = socket.create_connection(address, timeout=IO_TIMEOUT)
        client.sendall(b"ping\n")
        with client.makefile("rb") as replies:
            answered = int(replies.readline().split()[0])
        if answered == pid:
            return client
        client.close()
    raise AssertionError(f"worker {pid} never took a connection")


def wait_until_dead(pid: int) -> None:
    """Until ``pid`` has exited and closed its sockets (a zombie counts)."""
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            status = Path(f"/proc/{pid}/status").read_text()
        except FileNotFoundError:
            return
        if "State:\tZ" in status:
            return
        time.sleep(0.01)
    raise AssertionError(f"process {pid} still running")


def tcp_address(cli: EchoCLI) -> tuple[str, int]:
    ((kind, host, port),) = cli.listeners(1)
    assert kind == "TCP"
    return host, port


def test_two_workers_share_the_load_and_report_their_counters(workdir: Path) -> None:
    with serve_workers(workdir, "--tcp", "127.0.0.1:0", "--workers", "2") as cli:
        address = tcp_address(cli)
        pids = worker_pids(cli, 2)
        answered = [ask(address) for _ in range(100)]
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    # The kernel spreads connections over both workers' sockets.
    assert set(answered) == set(pids.values())
    stopped = {int(m[2]): int(m[3]) for m in STOPPED.finditer(stderr)}
    assert stopped == {pid: answered.count(pid) for pid in pids.values()}
    # Each worker's own log lines say which worker wrote them.
    for number in pids:
        assert (
            f"trioserve [trioserve-worker-{number}]: SIGTERM: shutting down" in stderr
        )


def test_udp_and_unix_listeners_are_served_by_workers(workdir: Path) -> None:
    path = workdir / "pid.sock"
    with (
        serve_workers(
            workdir,
            "--udp",
            "127.0.0.1:0",
            "--workers",
            "2",
            handler="my_handlers:PidDatagram",
        ) as udp,
        serve_workers(workdir, "--unix", str(path), "--workers", "2") as unix,
    ):
        ((kind, host, port),) = udp.listeners(1)
        assert kind == "UDP"
        udp_pids = set(worker_pids(udp, 2).values())
        unix.stdout.wait_for("serving UNIX")
        unix_pids = set(worker_pids(unix, 2).values())
        answered = set()
        for number in range(50):
            with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
                client.settimeout(IO_TIMEOUT)
                client.sendto(b"%d" % number, (host, port))
                pid, _, echoed = client.recv(100).partition(b" ")
            assert echoed == b"%d" % number
            answered.add(int(pid))
        # Each client's datagrams go to one worker; 50 clients reach both.
        assert answered == udp_pids
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(IO_TIMEOUT)
            client.connect(str(path))
            client.sendall(b"unix\n")
            pid, _, echoed = client.makefile("rb").readline().partition(b" ")
        # One Unix socket, shared: whichever worker accepted it.
        assert echoed == b"unix\n"
        assert int(pid) in unix_pids
        for cli in (udp, unix):
            rc, _, stderr = cli.stop(signal.SIGTERM)
            assert rc == 0, stderr
            assert_clean(stderr)
    assert not path.exists()


def test_a_killed_worker_is_replaced_and_the_service_keeps_answering(
    workdir: Path,
) -> None:
    with serve_workers(workdir, "--tcp", "127.0.0.1:0", "--workers", "2") as cli:
        address = tcp_address(cli)
        pids = worker_pids(cli, 2)
        # A conversation with worker 2, under way while worker 1 dies.
        survivor = connection_to(address, pids[2])
        with survivor, survivor.makefile("rb") as replies:
            os.kill(pids[1], signal.SIGKILL)
            wait_until_dead(pids[1])
            # From now on every request is answered, by worker 2 until the
            # new worker 1 serves, then by both.
            deadline = time.monotonic() + 10
            answered: set[int] = set()
            while len(answered) < 2:
                assert time.monotonic() < deadline, answered
                answered.add(ask(address))
            survivor.sendall(b"still there\n")
            assert replies.readline() == b"%d still there\n" % pids[2]
        replaced = worker_pids(cli, 1)
        assert replaced.keys() == {1}
        assert answered == {pids[2], replaced[1]}
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert f"worker 1 (pid {pids[1]}) was killed by SIGKILL" in stderr
    assert_clean(stderr)


def test_graceful_stop_lets_requests_in_flight_in_every_worker_finish(
    workdir: Path,
) -> None:
    with serve_workers(workdir, "--tcp", "127.0.0.1:0", "--workers", "2") as cli:
        address = tcp_address(cli)
        pids = set(worker_pids(cli, 2).values())
        clients = [
            socket.create_connection(address, timeout=IO_TIMEOUT) for _ in range(20)
        ]
        replies = [client.makefile("rb") for client in clients]
        busy = set()
        for client, reply in zip(clients, replies, strict=True):
            client.sendall(b"slow 1\n")
            pid, _, said = reply.readline().partition(b" ")
            assert said == b"started\n"
            busy.add(int(pid))
        assert busy == pids
        cli.proc.send_signal(signal.SIGTERM)
        for client, reply in zip(clients, replies, strict=True):
            assert reply.readline().endswith(b" slow 1\n")
            assert reply.readline() == b""  # then let go
            reply.close()
            client.close()
        rc, _, stderr = cli.finish()
    assert rc == 0, stderr
    assert_clean(stderr)


def test_workers_shut_down_when_the_supervisor_dies(workdir: Path) -> None:
    with serve_workers(workdir, "--tcp", "127.0.0.1:0", "--workers", "2") as cli:
        tcp_address(cli)
        pids = worker_pids(cli, 2)
        cli.proc.kill()
        cli.wait()
        for pid in pids.values():
            wait_until_dead(pid)


def test_a_worker_that_cannot_start_stops_the_service(workdir: Path) -> None:
    with serve_workers(
        workdir, "--tcp", "127.0.0.1:0", "--workers", "2", handler="broken_handlers:Pid"
    ) as cli:
        rc, stdout, stderr = cli.finish()
    assert rc == 2
    assert stdout == ""
    assert stderr.endswith(
        "trioserve: error: cannot serve: "
        "worker 1 exited with status 1 before it started serving\n"
    )
    assert "ResourceWarning" not in stderr


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--workers", "0"], "is not a whole number >= 1"),
        (["--workers", "many"], "is not a whole number >= 1"),
        (["--workers", "2", "--fd", "0"], "--workers cannot serve --fd"),
    ],
)
def test_bad_worker_options_exit_2(args: list[str], message: str) -> None:
    with run_echo(*args) as cli:
        rc, _, stderr = cli.finish()
    assert rc == 2
    assert message in stderr


async def test_serve_in_workers_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        await trioserve.serve_in_workers(list, 0)
    with pytest.raises(TypeError, match="no sockets"):
        await trioserve.serve_in_workers(
            lambda: [trioserve.BaseServer(None, trioserve.BaseRequestHandler)], 1
        )


class PidEcho(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            await self.wfile.write(b"%d %s" % (os.getpid(), line))


def make_pid_echo() -> list[trioserve.BaseServer]:
    # Module level, so that spawned workers can import it.
    return [trioserve.TCPServer(("127.0.0.1", 0), PidEcho)]


async def test_serve_in_workers_with_one_shared_socket() -> None:
    # Where SO_REUSEPORT is not used, the workers accept on one socket that
    # the supervisor bound.
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            serve = partial(
                trioserve.serve_in_workers, make_pid_echo, 2, reuse_port=False
            )
            graceful = None

            async def supervise(*, task_status: trio.TaskStatus[list[Any]]) -> None:
                nonlocal graceful
                graceful = await serve(task_status=task_status)

            [address] = await nursery.start(supervise)
            answered = [await trio.to_thread.run_sync(ask, address) for _ in range(20)]
            assert os.getpid() not in answered
            assert 1 <= len(set(answered)) <= 2
            os.kill(os.getpid(), signal.SIGTERM)
    assert graceful is True


async def test_worker_control_reloads_the_workers_from_python() -> None:
    # What SIGHUP does, awaited: once reload() returns True, fresh workers
    # serve, and the old ones are on their way out.
    control = trioserve.WorkerControl()
    with pytest.raises(RuntimeError, match="not serving"):
        await control.reload()
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            serve = partial(
                trioserve.serve_in_workers, make_pid_echo, 2, control=control
            )
            graceful = None

            async def supervise(*, task_status: trio.TaskStatus[list[Any]]) -> None:
                nonlocal graceful
                graceful = await serve(task_status=task_status)

            [address] = await nursery.start(supervise)
            before = {await trio.to_thread.run_sync(ask, address) for _ in range(20)}
            assert await control.reload() is True
            # The old workers may still finish what they had; wait until
            # none of them answers a new connection.
            while True:
                after = {await trio.to_thread.run_sync(ask, address) for _ in range(20)}
                if not after & before:
                    break
            assert len(after) <= 2
            os.kill(os.getpid(), signal.SIGTERM)
    assert graceful is True
    with pytest.raises(RuntimeError, match="not serving"):
        await control.reload()


class KeepaliveEcho(trioserve.StreamRequestHandler):
    """Replies "PID KEEPALIVE LINE": the connection inherits SO_KEEPALIVE
    from the listening socket it came from."""

    async def handle(self) -> None:
        assert isinstance(self.connection, trio.SocketStream)
        sock = self.connection.socket
        keepalive = sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
        async for line in self.rfile:
            await self.wfile.write(b"%d %d %s" % (os.getpid(), keepalive, line))


def make_unbound_keepalive_echo() -> list[trioserve.BaseServer]:
    # What bind_and_activate=False is for: options on the socket before
    # binding, which only the supervisor's server_bind() can honour.
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), KeepaliveEcho, bind_and_activate=False
    )
    server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    return [server]


async def test_serve_in_workers_binds_a_server_made_not_to_bind_itself() -> None:
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            serve = partial(trioserve.serve_in_workers, make_unbound_keepalive_echo, 2)
            graceful = None

            async def supervise(*, task_status: trio.TaskStatus[list[Any]]) -> None:
                nonlocal graceful
                graceful = await serve(task_status=task_status)

            [address] = await nursery.start(supervise)
            assert address[1] != 0

            def ask_keepalive() -> tuple[int, int]:
                with socket.create_connection(address, timeout=IO_TIMEOUT) as client:
                    client.sendall(b"hi\n")
                    pid, keepalive, line = client.makefile("rb").readline().split()
                assert line == b"hi"
                return int(pid), int(keepalive)

            answers = [await trio.to_thread.run_sync(ask_keepalive) for _ in range(10)]
            assert os.getpid() not in {pid for pid, _ in answers}
            # Every worker serves the socket the option was set on.
            assert {keepalive for _, keepalive in answers} == {1}
            os.kill(os.getpid(), signal.SIGTERM)
    assert graceful is True


def make_every_interface_pid_echo() -> list[trioserve.BaseServer]:
    return [trioserve.TCPServer(("", 0), PidEcho)]


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
async def test_workers_serve_both_families_of_an_empty_host_on_one_port() -> None:
    # Each worker binds its own SO_REUSEPORT socket on 0.0.0.0 and on ::,
    # on the port the supervisor's first bind got.
    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            serve = partial(
                trioserve.serve_in_workers, make_every_interface_pid_echo, 2
            )
            graceful = None

            async def supervise(*, task_status: trio.TaskStatus[list[Any]]) -> None:
                nonlocal graceful
                graceful = await serve(task_status=task_status)

            [(host, port)] = await nursery.start(supervise)
            assert (host, port != 0) == ("0.0.0.0", True)
            for address in [("127.0.0.1", port), ("::1", port)]:
                answered = [
                    await trio.to_thread.run_sync(ask, address) for _ in range(4)
                ]
                assert os.getpid() not in answered
            os.kill(os.getpid(), signal.SIGTERM)
    assert graceful is True


def test_an_address_in_use_fails_before_any_worker_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        with run_echo("--tcp", f"{host}:{port}", "--workers", "2") as cli:
            rc, stdout, stderr = cli.finish()
    assert rc == 2
    assert stdout == ""
    assert stderr.startswith("trioserve: error: cannot serve: ")
    assert "Address already in use" in stderr
    assert "worker" not in stderr


def test_a_second_address_in_use_leaves_nothing_bound() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        host, port = taken.getsockname()
        with run_echo(
            "--tcp", "127.0.0.1:0", "--tcp", f"{host}:{port}", "--workers", "2"
        ) as cli:
            rc, _, stderr = cli.finish()
    assert rc == 2
    assert "Address already in use" in stderr
    assert_clean(stderr)
