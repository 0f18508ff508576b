"""A port of CPython's ``Lib/test/test_socketserver.py`` to trioserve.

Each test names the CPython test it ports. The stdlib tests drive a
blocking server from a thread; here the server runs in a Trio task started
with ``nursery.start(server.serve_forever)`` and the clients are Trio
sockets and streams in the same run.

Deliberate differences from the stdlib, tested as trioserve documents them:

- every method that may wait is ``async def``;
- the socket is made, bound and activated lazily (``async with server``,
  ``serve_forever`` or ``handle_request``), not in the constructor, so a bind
  failure surfaces there; until then ``server.socket`` is a closed socket
  (``fileno() == -1``, as after ``server_close()``);
- ``TCPServer.allow_reuse_address`` is True and ``request_queue_size`` large;
- accepted TCP connections have ``TCP_NODELAY`` set;
- there are no Threading/Forking mix-ins: requests are always concurrent
  tasks, so the ``Threading*``/``Forking*`` variants have no counterpart;
- a ``BaseException`` escaping a handler leaves through the nursery that
  runs the request, so it may arrive wrapped in a ``BaseExceptionGroup``.
"""

from __future__ import annotations

import errno
import math
import os
import re
import shutil
import socket
import sys
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import trio
import trio.testing

import trioserve

if sys.version_info < (3, 11):  # pragma: no cover
    from exceptiongroup import BaseExceptionGroup

TEST_STR = b"hello world\n"
HOST = "127.0.0.1"
# Bounds every test that talks over a socket.
DEADLINE = 10
IN_USE = re.escape(os.strerror(errno.EADDRINUSE))

requires_proc_fd = pytest.mark.skipif(
    not os.path.isdir("/proc/self/fd"), reason="needs /proc/self/fd"
)


def count_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def contains_only(exc: BaseException, exc_type: type[BaseException]) -> bool:
    """Whether ``exc`` is ``exc_type``, or a group holding nothing else."""
    if isinstance(exc, BaseExceptionGroup):
        matched, rest = exc.split(exc_type)
        return matched is not None and rest is None
    return isinstance(exc, exc_type)


@pytest.fixture
def sockdir() -> Iterator[str]:
    # AF_UNIX paths are limited to 108 bytes; pytest's tmp_path can be longer.
    path = tempfile.mkdtemp(prefix="tsp", dir="/tmp")
    yield path
    shutil.rmtree(path, ignore_errors=True)


class AddressPicker:
    """Port of ``SocketServerTest.pickaddr``: port 0 or a fresh socket path."""

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self.count = 0

    def __call__(self, family: int) -> Any:
        if family == socket.AF_INET:
            return (HOST, 0)
        self.count += 1
        return os.path.join(self.directory, f"u{self.count}.sock")


# -- SocketServerTest: the echo round trip ----------------------------------


class EchoLine:
    """Port of ``make_server``'s ``MyHandler``: echo one line.

    Written as a mixin: the same body serves streams and datagrams.
    """

    rfile: Any
    wfile: Any

    async def handle(self) -> None:
        line = await self.rfile.readline()
        await self.wfile.write(line)


class StreamEcho(EchoLine, trioserve.StreamRequestHandler):
    pass


class DatagramEcho(EchoLine, trioserve.DatagramRequestHandler):
    pass


Examine = Callable[[int, Any, AddressPicker], Awaitable[None]]


async def stream_examine(family: int, addr: Any, pick: AddressPicker) -> None:
    """Port of ``SocketServerTest.stream_examine``."""
    # As in the stdlib, the client's socket is of the server class's family.
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        await sock.connect(addr)
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as stream:
        await stream.send_all(TEST_STR)
        buf = data = await stream.receive_some(100)
        while data and b"\n" not in buf:
            data = await stream.receive_some(100)
            buf += data
    assert buf == TEST_STR


async def dgram_examine(family: int, addr: Any, pick: AddressPicker) -> None:
    """Port of ``SocketServerTest.dgram_examine``.

    A Unix datagram client must bind a path of its own to get a reply.
    """
    with trio.socket.socket(family, socket.SOCK_DGRAM) as sock:
        if family == socket.AF_UNIX:
            await sock.bind(pick(family))
        await sock.sendto(TEST_STR, addr)
        buf = await sock.recv(100)
    assert buf == TEST_STR


async def run_server(
    svrcls: type[trioserve.TCPServer],
    hdlrbase: type[trioserve.BaseRequestHandler],
    examine: Examine,
    sockdir: str,
) -> None:
    """Port of ``SocketServerTest.run_server`` (and ``make_server``)."""
    errors: list[BaseException | None] = []

    class MyServer(svrcls):  # type: ignore[valid-type,misc]
        # The stdlib's MyServer re-raises from handle_error; recording the
        # exception and asserting there is none fails just as loudly.
        async def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    pick = AddressPicker(sockdir)
    # As in the stdlib: the address and the clients' sockets come from the
    # class's address_family (AF_INET for TCP and UDP, AF_UNIX for Unix).
    family = svrcls.address_family
    # Nothing is in flight when shutdown() is called, so it must return at
    # once without relying on the grace period: make that infinite.
    server = MyServer(pick(family), hdlrbase, shutdown_timeout=math.inf)
    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            # Short poll interval, as in the stdlib test.
            addr = await nursery.start(server.serve_forever, 0.01)
            assert addr == server.server_address
            assert server.server_address == server.socket.getsockname()
            assert server.is_serving()
            for _ in range(3):
                await examine(family, addr, pick)
            await server.shutdown()
            assert not server.is_serving()
        await server.server_close()
    assert server.socket.fileno() == -1
    assert errors == []
    if family == socket.AF_UNIX:
        # trioserve removes the socket file it made (the stdlib does not).
        assert not await trio.Path(addr).exists()


# Port of test_socketserver.SocketServerTest.test_TCPServer
async def test_TCPServer(sockdir: str) -> None:
    await run_server(trioserve.TCPServer, StreamEcho, stream_examine, sockdir)


# Port of test_socketserver.SocketServerTest.test_UnixStreamServer
async def test_UnixStreamServer(sockdir: str) -> None:
    await run_server(trioserve.UnixStreamServer, StreamEcho, stream_examine, sockdir)


# Port of test_socketserver.SocketServerTest.test_UDPServer
async def test_UDPServer(sockdir: str) -> None:
    await run_server(trioserve.UDPServer, DatagramEcho, dgram_examine, sockdir)


# Port of test_socketserver.SocketServerTest.test_UnixDatagramServer
async def test_UnixDatagramServer(sockdir: str) -> None:
    await run_server(trioserve.UnixDatagramServer, DatagramEcho, dgram_examine, sockdir)


# -- SocketServerTest: shutdown, close, bind leak, context manager ----------


# Port of test_socketserver.SocketServerTest.test_shutdown
# (Issue #2302: shutdown() should always make serve_forever() leave.)
async def test_shutdown() -> None:
    servers = [
        trioserve.TCPServer((HOST, 0), trioserve.StreamRequestHandler)
        for _ in range(20)
    ]
    returned: list[trioserve.TCPServer] = []

    async def serve(
        server: trioserve.TCPServer,
        *,
        task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        await server.serve_forever(0.01, task_status=task_status)
        returned.append(server)

    with trio.fail_after(DEADLINE):
        async with trio.open_nursery() as nursery:
            for server in servers:
                await nursery.start(serve, server)
                assert server.is_serving()
                # Shut down at once after start, as the stdlib test does.
                await server.shutdown()
                assert not server.is_serving()
                # shutdown() returns once serve_forever() has returned.
                assert returned[-1:] == [server]
        for server in servers:
            await server.server_close()
    # The nursery could only exit because every serve_forever returned.
    assert sorted(map(id, returned)) == sorted(map(id, servers))
    assert all(server.socket.fileno() == -1 for server in servers)


class SlowReply(trioserve.StreamRequestHandler):
    """Answers its first line after a second."""

    async def handle(self) -> None:
        await self.rfile.readline()
        await trio.sleep(1)
        await self.wfile.write(b"done\n")


# Not in CPython, whose shutdown() takes no timeout: shutdown(timeout=...)
# beats the shutdown_timeout attribute, whether shorter or longer.
@pytest.mark.parametrize(("attribute", "argument"), [(0.05, 3.0), (3.0, 0.05)])
async def test_shutdown_timeout_argument_beats_the_attribute(
    attribute: float, argument: float, autojump_clock: trio.testing.MockClock
) -> None:
    server = trioserve.TCPServer((HOST, 0), SlowReply, shutdown_timeout=attribute)
    received = []
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        client = await trio.open_tcp_stream(*server.server_address)

        async def read_then_close() -> None:
            async with client:
                data = b""
                while chunk := await client.receive_some():
                    data += chunk
                received.append(data)

        await client.send_all(b"go\n")
        nursery.start_soon(read_then_close)
        await trio.testing.wait_all_tasks_blocked()
        start = trio.current_time()
        await server.shutdown(timeout=argument)
        elapsed = trio.current_time() - start
    if argument > 1:
        assert received == [b"done\n"]
        assert elapsed == pytest.approx(1, abs=0.1)
    else:
        assert received == [b""]
        assert elapsed == pytest.approx(argument, abs=0.1)
    assert server.socket.fileno() == -1


# Port of test_socketserver.SocketServerTest.test_close_immediately
# Difference: no socket is open before binding (server.socket is a closed
# one), so closing an unbound server has nothing to close; it must still
# work, and twice, and leave server.socket closed as the stdlib does.
async def test_close_immediately() -> None:
    server = trioserve.TCPServer((HOST, 0), trioserve.BaseRequestHandler)
    assert server.socket.fileno() == -1
    await server.server_close()
    await server.server_close()
    assert server.socket.fileno() == server.fileno() == -1


# Port of test_socketserver.SocketServerTest.test_tcpserver_bind_leak
# (Issue #22435: the server socket was not closed if bind()/listen() failed.)
# Difference: the stdlib constructor raises; trioserve binds lazily, so the
# failure surfaces from serve_forever().
@requires_proc_fd
async def test_tcpserver_bind_leak() -> None:
    before = count_fds()
    for _ in range(1024):
        server = trioserve.TCPServer((HOST, -1), trioserve.StreamRequestHandler)
        with pytest.raises(OverflowError):
            await server.serve_forever()
        assert server.socket.fileno() == -1
        assert not server.is_serving()
    assert count_fds() == before


# Port of test_socketserver.SocketServerTest.test_tcpserver_bind_leak, with
# the failure the contract names: EADDRINUSE from binding over a live
# listener (SO_REUSEADDR, on by default here, must not allow that).
@requires_proc_fd
async def test_tcpserver_bind_leak_address_in_use() -> None:
    async with trioserve.TCPServer(
        (HOST, 0), trioserve.StreamRequestHandler
    ) as occupant:
        before = count_fds()
        for _ in range(256):
            server = trioserve.TCPServer(
                occupant.server_address, trioserve.StreamRequestHandler
            )
            with pytest.raises(OSError, match=IN_USE) as excinfo:
                await server.handle_request()
            assert excinfo.value.errno == errno.EADDRINUSE
            assert server.socket.fileno() == -1
        assert count_fds() == before


# Port of test_socketserver.SocketServerTest.test_tcpserver_bind_leak for a
# Unix server: a live server's path is in use, and the failed server neither
# leaks a socket nor removes the live server's socket file.
@requires_proc_fd
async def test_unixserver_bind_leak_address_in_use(sockdir: str) -> None:
    path = os.path.join(sockdir, "live.sock")
    async with trioserve.UnixStreamServer(path, StreamEcho) as occupant:
        before = count_fds()
        for _ in range(64):
            server = trioserve.UnixStreamServer(path, StreamEcho)
            with pytest.raises(OSError, match=IN_USE) as excinfo:
                await server.serve_forever()
            assert excinfo.value.errno == errno.EADDRINUSE
            assert server.socket.fileno() == -1
            await server.server_close()
        assert count_fds() == before
        assert await trio.Path(path).exists()
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(occupant.serve_forever)
                await stream_examine(socket.AF_UNIX, path, AddressPicker(sockdir))
                await occupant.shutdown()
    assert not await trio.Path(path).exists()


# Port of test_socketserver.SocketServerTest.test_context_manager
async def test_context_manager() -> None:
    server = trioserve.TCPServer((HOST, 0), trioserve.StreamRequestHandler)
    # Difference: construction does no I/O; `async with` binds and listens.
    assert server.socket.fileno() == -1
    async with server as entered:
        assert entered is server
        assert server.server_address[1] != 0
        assert server.server_address == server.socket.getsockname()
        assert server.fileno() == server.socket.fileno() >= 0
        # It listens: a client can connect before anything serves.
        with trio.fail_after(DEADLINE):
            client = await trio.open_tcp_stream(*server.server_address)
        await client.aclose()
    assert server.socket.fileno() == -1


async def enter_and_exit(server: trioserve.BaseServer) -> None:
    async with server:
        pytest.fail("a server whose bind failed must not be entered")


# Context-manager check in the style of test_context_manager, for a bind
# failure on entry: the OSError comes from `async with`, no socket is left.
async def test_context_manager_bind_failure() -> None:
    async with trioserve.TCPServer(
        (HOST, 0), trioserve.StreamRequestHandler
    ) as occupant:
        server = trioserve.TCPServer(
            occupant.server_address, trioserve.StreamRequestHandler
        )
        with pytest.raises(OSError, match=IN_USE) as excinfo:
            await enter_and_exit(server)
        assert excinfo.value.errno == errno.EADDRINUSE
        assert server.socket.fileno() == -1


# Port of test_socketserver.SocketServerTest.test_context_manager for the
# other server classes; Unix servers also remove their socket file.
@pytest.mark.parametrize(
    "svrcls",
    [trioserve.UDPServer, trioserve.UnixStreamServer, trioserve.UnixDatagramServer],
)
async def test_context_manager_other_servers(
    svrcls: type[trioserve.TCPServer], sockdir: str
) -> None:
    unix = svrcls.address_family == socket.AF_UNIX
    address = os.path.join(sockdir, "cm.sock") if unix else (HOST, 0)
    async with svrcls(address, trioserve.BaseRequestHandler) as server:
        assert server.socket.fileno() >= 0
        assert server.server_address == server.socket.getsockname()
        if isinstance(address, str):
            assert await trio.Path(address).exists()
    assert server.socket.fileno() == -1
    if isinstance(address, str):
        assert not await trio.Path(address).exists()
    await server.server_close()  # idempotent


# -- ErrorHandlerTest --------------------------------------------------------


class BadHandler(trioserve.BaseRequestHandler):
    """Port of ``BadHandler``: log the call, then raise the server's exception."""

    async def handle(self) -> None:
        server: ErrorTestServer = self.server  # type: ignore[assignment]
        server.log.append("Handler called")
        raise server.exception("Test error")


class ErrorTestServer(trioserve.TCPServer):
    """Port of ``BaseErrorTestServer``, minus the work in its constructor."""

    def __init__(self, exception: type[BaseException]) -> None:
        super().__init__((HOST, 0), BadHandler)
        self.exception = exception
        self.log: list[str] = []
        self.errors: list[tuple[BaseException | None, Any]] = []

    async def handle_error(self, request: Any, client_address: Any) -> None:
        self.log.append("Error handled")
        self.errors.append((sys.exc_info()[1], client_address))


async def connect_and_close(server: trioserve.TCPServer) -> Any:
    """Queue a connection in the backlog, like ``socket.create_connection``."""
    with trio.fail_after(DEADLINE):
        stream = await trio.open_tcp_stream(*server.server_address[:2])
    address = stream.socket.getsockname()
    await stream.aclose()
    return address


# Port of test_socketserver.ErrorHandlerTest.test_sync_handled
async def test_sync_handled() -> None:
    async with ErrorTestServer(ValueError) as server:
        client_address = await connect_and_close(server)
        with trio.fail_after(DEADLINE):
            await server.handle_request()
    assert server.log == ["Handler called", "Error handled"]
    [(exc, address)] = server.errors
    assert isinstance(exc, ValueError)
    assert str(exc) == "Test error"
    assert address == client_address


# Port of test_socketserver.ErrorHandlerTest.test_sync_not_handled (and
# KeyboardInterrupt, its sibling). Difference: the exception leaves through
# the nursery that runs the request, so it may come wrapped in a group; it
# must hold the exception and nothing else.
@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt])
async def test_sync_not_handled(exception: type[BaseException]) -> None:
    async with ErrorTestServer(exception) as server:
        await connect_and_close(server)
        with trio.fail_after(DEADLINE), pytest.raises(BaseException) as excinfo:  # noqa: PT011
            await server.handle_request()
    assert contains_only(excinfo.value, exception)
    assert server.log == ["Handler called"]
    assert server.socket.fileno() == -1


# Port of test_socketserver.ErrorHandlerTest.test_threading_handled: with
# concurrent request tasks (trioserve's only mode), a handler's ValueError
# reaches handle_error and the server keeps serving.
async def test_serve_forever_handled() -> None:
    async with ErrorTestServer(ValueError) as server:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                first = await connect_and_close(server)
                second = await connect_and_close(server)
                while len(server.errors) < 2:
                    await trio.testing.wait_all_tasks_blocked()
                assert server.is_serving()
                await server.shutdown()
    assert server.log == ["Handler called", "Error handled"] * 2
    assert [type(exc) for exc, _ in server.errors] == [ValueError, ValueError]
    assert sorted(address for _, address in server.errors) == sorted([first, second])


# The same, checking the server still *answers* after an error: one request
# makes the handler raise, the next one is echoed.
async def test_serve_forever_keeps_serving_after_error() -> None:
    class MaybeBad(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"boom\n":
                raise ValueError("boom")
            await self.wfile.write(line)

    errors: list[BaseException | None] = []

    class Server(trioserve.TCPServer):
        async def handle_error(self, request: Any, client_address: Any) -> None:
            errors.append(sys.exc_info()[1])

    async with Server((HOST, 0), MaybeBad) as server:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve_forever)
                async with await trio.open_tcp_stream(*addr) as bad:
                    await bad.send_all(b"boom\n")
                    # The failed request's connection is closed.
                    assert await bad.receive_some(100) == b""
                assert [type(exc) for exc in errors] == [ValueError]
                await stream_examine(socket.AF_INET, addr, AddressPicker("/"))
                assert server.is_serving()
                await server.shutdown()
    assert len(errors) == 1


# Port of test_socketserver.ErrorHandlerTest.test_threading_not_handled:
# a SystemExit/KeyboardInterrupt from a concurrent request task is not
# swallowed: it ends serve_forever, on its own (the other tasks were only
# cancelled), so it is not wrapped in an exception group.
@pytest.mark.parametrize("exception", [SystemExit, KeyboardInterrupt])
async def test_serve_forever_not_handled(exception: type[BaseException]) -> None:
    async with ErrorTestServer(exception) as server:
        # Queued in the listen backlog before serving starts.
        await connect_and_close(server)
        with trio.fail_after(DEADLINE), pytest.raises(exception) as excinfo:
            await server.serve_forever()
    assert type(excinfo.value) is exception
    assert server.log == ["Handler called"]
    assert not server.is_serving()
    assert server.socket.fileno() == -1


# -- SocketWriterTest --------------------------------------------------------


# Port of test_socketserver.SocketWriterTest.test_basics. Difference: rfile
# and wfile are async buffered files over a Trio stream, with no fileno();
# the request is a trio.SocketStream, and it has TCP_NODELAY set.
async def test_socket_writer_basics() -> None:
    seen: dict[str, Any] = {}

    class Handler(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            seen["wfile"] = self.wfile
            seen["rfile"] = self.rfile
            seen["connection"] = self.connection
            seen["request"] = self.request
            sock = self.connection.socket  # type: ignore[attr-defined]
            seen["nodelay"] = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen["fileno"] = sock.fileno()

    async with trioserve.TCPServer((HOST, 0), Handler) as server:
        await connect_and_close(server)
        with trio.fail_after(DEADLINE):
            await server.handle_request()
        server_fd = server.fileno()
    assert isinstance(seen["wfile"], trioserve.AsyncBufferedWriter)
    assert isinstance(seen["rfile"], trioserve.AsyncBufferedReader)
    assert isinstance(seen["request"], trio.SocketStream)
    assert seen["connection"] is seen["request"]
    assert seen["nodelay"] != 0
    assert seen["fileno"] >= 0
    assert seen["fileno"] != server_fd
    # The request was closed once handled.
    assert seen["request"].socket.fileno() == -1


# Port of test_socketserver.SocketWriterTest.test_write: wfile.write() sends
# at once (no flush needed), returns the length, and a large write is not
# truncated. Difference: there is no signal interruption to provoke (Trio
# retries EINTR itself); writes of bytearray and memoryview are checked too.
async def test_socket_writer_write() -> None:
    big = 4 * 1024 * 1024
    results: dict[str, Any] = {}

    class Handler(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            results["sent1"] = await self.wfile.write(b"write data\n")
            # Should be sent immediately, without requiring flush().
            results["received"] = await self.rfile.readline()
            results["sent2"] = await self.wfile.write(b"\0" * big)
            results["sent3"] = await self.wfile.write(bytearray(b"ba\n"))
            results["sent4"] = await self.wfile.write(memoryview(b"xxmv\n")[2:])

    async def run_client(addr: Any) -> None:
        async with await trio.open_tcp_stream(*addr[:2]) as stream:
            buf = b""
            while b"\n" not in buf:
                data = await stream.receive_some(100)
                assert data, "end of stream before the first line"
                buf += data
            line, _, rest = buf.partition(b"\n")
            results["response1"] = line + b"\n"
            await stream.send_all(b"client response\n")
            chunks = [rest]
            while data := await stream.receive_some():
                chunks.append(data)
            results["received2"] = b"".join(chunks)

    async with trioserve.TCPServer((HOST, 0), Handler) as server:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(run_client, server.server_address)
                await server.handle_request()
    assert results["response1"] == b"write data\n"
    assert results["sent1"] == len(results["response1"])
    assert results["received"] == b"client response\n"
    assert results["sent2"] == big
    assert results["sent3"] == 3
    assert results["sent4"] == 3
    received2 = results["received2"]
    assert len(received2) == big + 6
    assert received2[-6:] == b"ba\nmv\n"
    assert received2[:big].count(0) == big


# -- MiscTestCase --------------------------------------------------------------


# Port of test_socketserver.MiscTestCase.test_all: the package's __all__
# lists exactly the public objects it defines. Difference: trioserve has no
# Threading*/Forking* names; the core socketserver names must all exist.
def test_all() -> None:
    expected = [
        name
        for name in dir(trioserve)
        if not name.startswith("_")
        and getattr(getattr(trioserve, name), "__module__", "").startswith("trioserve")
    ]
    assert sorted(trioserve.__all__) == sorted(expected)
    for name in (
        "BaseServer",
        "TCPServer",
        "UDPServer",
        "UnixStreamServer",
        "UnixDatagramServer",
        "BaseRequestHandler",
        "StreamRequestHandler",
        "DatagramRequestHandler",
    ):
        assert name in trioserve.__all__


class RecordingHandler(trioserve.StreamRequestHandler):
    """Records the requests it handles: none, behind RejectingServer."""

    handled: list[Any]

    async def handle(self) -> None:
        self.handled.append(self.client_address)


class RejectingServer(trioserve.TCPServer):
    """Rejects every request and records the ones it shuts down."""

    shut: list[Any]

    async def verify_request(self, request: Any, client_address: Any) -> bool:
        return False

    async def shutdown_request(self, request: Any) -> None:
        self.shut.append(request)
        await super().shutdown_request(request)


def rejecting_server() -> RejectingServer:
    handler = type("Handler", (RecordingHandler,), {"handled": []})
    server = RejectingServer((HOST, 0), handler)
    server.shut = []
    return server


# Port of test_socketserver.MiscTestCase.
# test_shutdown_request_called_if_verify_request_false
# (Issue #26309: shutdown_request must be called even if verify_request is
# False.) Also checks the handler never runs and the client sees the close.
async def test_shutdown_request_called_if_verify_request_false() -> None:
    async with rejecting_server() as server:
        with trio.fail_after(DEADLINE):
            async with await trio.open_tcp_stream(*server.server_address) as client:
                await server.handle_request()
                # The rejected connection was closed: end of stream.
                assert await client.receive_some(100) == b""
    assert len(server.shut) == 1
    assert server.shut[0].socket.fileno() == -1
    assert server.RequestHandlerClass.handled == []  # type: ignore[attr-defined]


# The same under serve_forever: every rejected request is shut down.
async def test_shutdown_request_called_if_verify_request_false_serving() -> None:
    async with rejecting_server() as server:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve_forever)
                for _ in range(3):
                    async with await trio.open_tcp_stream(*addr) as client:
                        assert await client.receive_some(100) == b""
                await server.shutdown()
    assert len(server.shut) == 3
    assert all(request.socket.fileno() == -1 for request in server.shut)
    assert server.RequestHandlerClass.handled == []  # type: ignore[attr-defined]


# Port of test_socketserver.MiscTestCase.test_threads_reaped (#37193): the
# stdlib checks request threads are not kept. Here there are no threads;
# the analogue is that handle_request() returns only once its request has
# been handled to completion and closed, leaving nothing behind.
async def test_handle_request_completes_each_request() -> None:
    finished: list[Any] = []
    closed: list[Any] = []

    class Handler(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            await self.rfile.readline()

        async def finish(self) -> None:
            await super().finish()
            finished.append(self.client_address)

    class Server(trioserve.TCPServer):
        async def shutdown_request(self, request: Any) -> None:
            await super().shutdown_request(request)
            closed.append(request)

    async with Server((HOST, 0), Handler) as server:
        with trio.fail_after(DEADLINE):
            for n in range(10):
                async with await trio.open_tcp_stream(*server.server_address) as client:
                    await client.send_all(b"line\n")
                    await server.handle_request()
                    assert len(finished) == len(closed) == n + 1
                    assert closed[-1].socket.fileno() == -1
    assert server._serving is None


# -- handle_request and the server timeout -------------------------------------
# The stdlib's BaseServer.handle_request honours `timeout` and calls
# handle_timeout(); test_socketserver has no test of it, so these follow the
# stdlib's documented behaviour.


class TimeoutServer(trioserve.TCPServer):
    timeout: float | None = 5.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.timeouts = 0

    async def handle_timeout(self) -> None:
        self.timeouts += 1


async def test_handle_request_timeout_calls_handle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with TimeoutServer((HOST, 0), StreamEcho) as server:
        start = trio.current_time()
        await server.handle_request()
        elapsed = trio.current_time() - start
        assert server.timeouts == 1
        assert 5.0 <= elapsed < 5.5
        # And again: each call waits its own timeout.
        await server.handle_request()
        assert server.timeouts == 2
        assert server._serving is None


async def test_handle_request_timeout_none_waits_forever(
    autojump_clock: trio.testing.MockClock,
) -> None:
    async with TimeoutServer((HOST, 0), StreamEcho) as server:
        server.timeout = None
        with trio.move_on_after(1000) as scope:
            await server.handle_request()
        assert scope.cancelled_caught
        assert server.timeouts == 0


async def test_handle_request_within_timeout_handles_it() -> None:
    async with TimeoutServer((HOST, 0), StreamEcho) as server:
        server.timeout = 30.0
        with trio.fail_after(DEADLINE):
            async with await trio.open_tcp_stream(*server.server_address) as client:
                await client.send_all(TEST_STR)
                await server.handle_request()
                assert await client.receive_some(100) == TEST_STR
        assert server.timeouts == 0


# Not in test_socketserver (the stdlib's shutdown() only stops serve_forever
# and would block if nothing serves): trioserve documents that a shutdown()
# while handle_request() waits for a request makes handle_request() return at
# once, and the server stays usable.
# Regression: handle_request() used to raise UnboundLocalError (its local
# 'accepted' was never bound) when shutdown() cancelled its wait.
async def test_shutdown_during_handle_request() -> None:
    async with trioserve.TCPServer((HOST, 0), StreamEcho) as server:
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle_request)
                await trio.testing.wait_all_tasks_blocked()
                await server.shutdown()
            # Still usable: the next handle_request() serves a request.
            async with await trio.open_tcp_stream(*server.server_address) as client:
                await client.send_all(TEST_STR)
                await server.handle_request()
                assert await client.receive_some(100) == TEST_STR


# -- Documented differences from the stdlib -----------------------------------


def test_class_attribute_differences() -> None:
    # socketserver: allow_reuse_address False, request_queue_size 5.
    assert trioserve.TCPServer.allow_reuse_address is True
    assert trioserve.TCPServer.request_queue_size > 5
    # As in socketserver: off for UDP and Unix sockets.
    assert trioserve.UDPServer.allow_reuse_address is False
    assert trioserve.UnixStreamServer.allow_reuse_address is False
    assert trioserve.UnixDatagramServer.allow_reuse_address is False
    assert trioserve.UDPServer.max_packet_size == 8192
    assert trioserve.BaseServer.timeout is None
    assert trioserve.UDPServer.socket_type == socket.SOCK_DGRAM
    # As in socketserver.
    assert trioserve.TCPServer.address_family == socket.AF_INET
    assert trioserve.UDPServer.address_family == socket.AF_INET
    assert trioserve.UnixStreamServer.address_family == socket.AF_UNIX
    assert trioserve.UnixDatagramServer.address_family == socket.AF_UNIX


async def test_tcp_server_sets_reuse_address_and_backlog() -> None:
    async with trioserve.TCPServer((HOST, 0), trioserve.StreamRequestHandler) as server:
        reuse = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR)
        assert reuse != 0
        assert server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)


async def test_bind_and_activate_false_makes_socket_at_once() -> None:
    # As in socketserver, bind_and_activate=False leaves binding to the
    # caller; the socket exists at once so options can be set on it.
    server = trioserve.TCPServer(
        (HOST, 0), trioserve.StreamRequestHandler, bind_and_activate=False
    )
    try:
        assert server.socket.fileno() >= 0
        await server.server_bind()
        await server.server_activate()
        assert server.server_address[1] != 0
        with trio.fail_after(DEADLINE):
            async with trio.open_nursery() as nursery:
                addr = await nursery.start(server.serve_forever)
                assert addr == server.server_address
                await server.shutdown()
    finally:
        await server.server_close()
    assert server.socket.fileno() == -1
