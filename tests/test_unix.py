"""Unix socket servers: UnixStreamServer and UnixDatagramServer."""

from __future__ import annotations

import errno
import os
import socket
import stat
import sys
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
import trio
from support.servers import DatagramEcho, Echo

import trioserve

# Bounds every wait on a peer, so a broken server fails the test instead of
# hanging it.
IO_TIMEOUT = 5.0

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "AF_UNIX"), reason="needs Unix sockets"
)


class RecordingServer(trioserve.UnixStreamServer):
    """Remembers the client_address of every request it handles."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.client_addresses: list[Any] = []


class RecordAddress(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        assert isinstance(self.server, RecordingServer)
        self.server.client_addresses.append(self.client_address)
        await self.wfile.write(b"recorded\n")


@asynccontextmanager
async def serving(server: trioserve.BaseServer) -> AsyncIterator[Any]:
    """Serve in a nursery; shut down and close on the way out."""
    try:
        async with trio.open_nursery() as nursery:
            address = await nursery.start(server.serve_forever)
            try:
                yield address
            finally:
                with trio.fail_after(IO_TIMEOUT):
                    await server.shutdown()
    finally:
        await server.server_close()


async def stream_echo(path: str | bytes | Path, payload: bytes) -> None:
    """Send ``payload`` over a Unix stream connection; expect it back."""
    with trio.fail_after(IO_TIMEOUT):
        stream = await trio.open_unix_socket(path)
        async with stream:
            await stream.send_all(payload)
            received = b""
            while len(received) < len(payload):
                chunk = await stream.receive_some()
                assert chunk, f"end of stream after {received!r}"
                received += chunk
    assert received == payload


async def datagram_echo(server_path: str, client_path: str, payload: bytes) -> None:
    """Send ``payload`` from a socket bound at ``client_path``; expect it back."""
    with (
        trio.fail_after(IO_TIMEOUT),
        trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client,
    ):
        await client.bind(client_path)
        await client.sendto(payload, server_path)
        data, source = await client.recvfrom(65536)
    assert data == payload
    assert source == server_path


def make_stale_socket_file(path: str, kind: socket.SocketKind) -> None:
    """Leave a socket file at ``path`` that nobody listens on."""
    with socket.socket(socket.AF_UNIX, kind) as dead:
        dead.bind(path)
    assert stat.S_ISSOCK(os.stat(path).st_mode)


def exists(path: str | bytes | Path) -> bool:
    return os.path.lexists(path)


def write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def is_socket_file(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except FileNotFoundError:
        return False


# -- echo ------------------------------------------------------------------


async def test_unix_stream_echo(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    server = trioserve.UnixStreamServer(path, Echo)
    async with serving(server) as address:
        assert address == path
        assert server.server_address == path
        assert server.fileno() == server.socket.fileno() >= 0
        assert is_socket_file(path)
        await stream_echo(path, b"one\ntwo\nthree\n")
        # A second connection, while the first is gone, is served too.
        await stream_echo(path, b"again\n")
        assert server.stats.completed >= 1
    assert server.stats.failed == 0


async def test_unix_stream_echo_concurrent_clients(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    server = trioserve.UnixStreamServer(path, Echo)
    async with serving(server):
        with trio.fail_after(IO_TIMEOUT):
            first = await trio.open_unix_socket(path)
            second = await trio.open_unix_socket(path)
            async with first, second:
                # Both connections are open at once and both are answered:
                # the requests run concurrently.
                await first.send_all(b"first\n")
                await second.send_all(b"second\n")
                assert await second.receive_some() == b"second\n"
                assert await first.receive_some() == b"first\n"


async def test_unix_stream_accepts_path_like_and_bytes(short_tmp: Path) -> None:
    for address in (Path(short_tmp) / "p", os.fsencode(os.path.join(short_tmp, "b"))):
        server = trioserve.UnixStreamServer(address, Echo)
        async with serving(server):
            await stream_echo(address, b"path-like\n")
        assert not exists(address)


async def test_unix_datagram_echo(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "d")
    server = trioserve.UnixDatagramServer(path, DatagramEcho)
    async with serving(server) as address:
        assert address == path
        assert is_socket_file(path)
        await datagram_echo(path, os.path.join(short_tmp, "c1"), b"hello\n")
        await datagram_echo(path, os.path.join(short_tmp, "c2"), b"a\nb\nno newline")
    assert server.stats.completed == 2
    assert server.stats.failed == 0
    assert not exists(path)


async def test_unix_datagram_unbound_client_gets_no_reply_and_no_error(
    short_tmp: Path,
) -> None:
    path = os.path.join(short_tmp, "d")
    server = trioserve.UnixDatagramServer(path, DatagramEcho)
    async with serving(server):
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unbound:
            await unbound.sendto(b"nobody to answer\n", path)
        # The server goes on serving a client that did bind.
        await datagram_echo(path, os.path.join(short_tmp, "c"), b"still here\n")
    # shutdown() waited for both requests: neither failed.
    assert server.stats.accepted == 2
    assert server.stats.completed == 2
    assert server.stats.failed == 0


# -- the socket file ---------------------------------------------------------


async def test_server_close_removes_socket_file_and_is_idempotent(
    short_tmp: Path,
) -> None:
    path = os.path.join(short_tmp, "s")
    server = trioserve.UnixStreamServer(path, Echo)
    assert not exists(path)  # construction does no I/O
    async with server:
        assert is_socket_file(path)
    assert not exists(path)
    await server.server_close()
    await server.server_close()
    assert not exists(path)


async def test_server_close_after_serving_removes_socket_file(short_tmp: Path) -> None:
    for cls, handler, name in (
        (trioserve.UnixStreamServer, Echo, "s"),
        (trioserve.UnixDatagramServer, DatagramEcho, "d"),
    ):
        path = os.path.join(short_tmp, name)
        server = cls(path, handler)
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            assert is_socket_file(path)
            await server.shutdown()
        # shutdown() alone keeps the socket (serve_forever may run again).
        assert is_socket_file(path)
        await server.server_close()
        assert not exists(path)
        await server.server_close()


async def test_bind_and_activate_false_still_manages_the_file(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    make_stale_socket_file(path, socket.SOCK_STREAM)
    server = trioserve.UnixStreamServer(path, Echo, bind_and_activate=False)
    try:
        await server.server_bind()
        await server.server_activate()
        async with serving(server):
            await stream_echo(path, b"manual bind\n")
    finally:
        await server.server_close()
    assert not exists(path)


async def test_stale_stream_socket_file_is_replaced(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    make_stale_socket_file(path, socket.SOCK_STREAM)
    server = trioserve.UnixStreamServer(path, Echo)
    async with serving(server):
        assert is_socket_file(path)
        await stream_echo(path, b"over the stale file\n")
    assert not exists(path)


async def test_stale_datagram_socket_file_is_replaced(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "d")
    make_stale_socket_file(path, socket.SOCK_DGRAM)
    server = trioserve.UnixDatagramServer(path, DatagramEcho)
    async with serving(server):
        await datagram_echo(path, os.path.join(short_tmp, "c"), b"stale gone\n")
    assert not exists(path)


async def test_live_trioserve_server_keeps_its_path(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    live = trioserve.UnixStreamServer(path, Echo)
    async with serving(live):
        inode = os.stat(path).st_ino
        intruder = trioserve.UnixStreamServer(path, Echo)
        with pytest.raises(OSError, match=r".") as excinfo:
            async with intruder:
                pytest.fail("bound over a live server")
        assert excinfo.value.errno == errno.EADDRINUSE
        # The failed server holds no socket, and closing it is harmless...
        assert intruder.socket.fileno() == -1
        await intruder.server_close()
        # ...and leaves the live server's file and service alone.
        assert is_socket_file(path)
        assert os.stat(path).st_ino == inode
        await stream_echo(path, b"still serving\n")
    assert not exists(path)


async def test_live_trioserve_server_blocks_serve_forever_too(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    live = trioserve.UnixStreamServer(path, Echo)
    async with serving(live):
        intruder = trioserve.UnixStreamServer(path, Echo)
        with pytest.raises(OSError, match=r".") as excinfo:
            with trio.fail_after(IO_TIMEOUT):
                await intruder.serve_forever()
        assert excinfo.value.errno == errno.EADDRINUSE
        await intruder.server_close()
        await stream_echo(path, b"unharmed\n")


async def test_live_plain_listener_keeps_its_path(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen()
        listener.settimeout(IO_TIMEOUT)
        server = trioserve.UnixStreamServer(path, Echo)
        with pytest.raises(OSError, match=r".") as excinfo:
            async with server:
                pytest.fail("bound over a live listener")
        assert excinfo.value.errno == errno.EADDRINUSE
        await server.server_close()
        assert is_socket_file(path)
        # The listener still takes connections at that path.
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as client:
            client.settimeout(IO_TIMEOUT)
            client.connect(path)
            client.sendall(b"hello listener")
            # The stale check may have left a probe connection in the
            # backlog first; ours is the one that carries data.
            for _ in range(2):
                conn, _ = listener.accept()
                with conn:
                    conn.settimeout(IO_TIMEOUT)
                    data = conn.recv(100)
                if data:
                    break
            assert data == b"hello listener"


async def test_live_plain_datagram_socket_keeps_its_path(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "d")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as owner:
        owner.bind(path)
        owner.settimeout(IO_TIMEOUT)
        server = trioserve.UnixDatagramServer(path, DatagramEcho)
        with pytest.raises(OSError, match=r".") as excinfo:
            async with server:
                pytest.fail("bound over a live datagram socket")
        assert excinfo.value.errno == errno.EADDRINUSE
        await server.server_close()
        assert is_socket_file(path)
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as client:
            client.sendto(b"for the owner", path)
        assert owner.recv(100) == b"for the owner"


async def test_regular_file_at_path_is_left_alone(short_tmp: Path) -> None:
    for cls, handler in (
        (trioserve.UnixStreamServer, Echo),
        (trioserve.UnixDatagramServer, DatagramEcho),
    ):
        path = os.path.join(short_tmp, "precious")
        write_bytes(path, b"do not delete me")
        server = cls(path, handler)
        with pytest.raises(OSError, match=r".") as excinfo:
            async with server:
                pytest.fail("bound over a regular file")
        assert excinfo.value.errno == errno.EADDRINUSE
        await server.server_close()
        assert read_bytes(path) == b"do not delete me"
        os.unlink(path)


async def test_server_close_keeps_a_file_that_replaced_its_own(
    short_tmp: Path,
) -> None:
    path = os.path.join(short_tmp, "s")
    server = trioserve.UnixStreamServer(path, Echo)
    async with serving(server):
        os.unlink(path)
        write_bytes(path, b"replacement")
    # serving() has shut down and closed the server.
    assert read_bytes(path) == b"replacement"


async def test_server_close_keeps_the_socket_of_a_newer_server(
    short_tmp: Path,
) -> None:
    path = os.path.join(short_tmp, "s")
    old = trioserve.UnixStreamServer(path, Echo)
    async with old:
        # Someone removes the old server's file and starts a new server there.
        os.unlink(path)
        new = trioserve.UnixStreamServer(path, Echo)
        async with serving(new):
            await old.server_close()
            assert is_socket_file(path)
            await stream_echo(path, b"the new one\n")
    assert not exists(path)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux only")
async def test_abstract_namespace_has_no_file(short_tmp: Path) -> None:
    name = "\0trioserve-test-" + os.path.basename(short_tmp)
    server = trioserve.UnixStreamServer(name, Echo)
    async with serving(server):
        await stream_echo(name, b"abstract\n")
    assert os.listdir(short_tmp) == []


# -- client_address ----------------------------------------------------------


async def test_client_address_of_unix_stream_connections(short_tmp: Path) -> None:
    path = os.path.join(short_tmp, "s")
    client_path = os.path.join(short_tmp, "c")
    server = RecordingServer(path, RecordAddress)
    async with serving(server):
        with trio.fail_after(IO_TIMEOUT):
            # An unbound client has no name: the stdlib reports "".
            async with await trio.open_unix_socket(path) as stream:
                assert await stream.receive_some() == b"recorded\n"
            # A client that bound a path is known by it.
            sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            async with trio.SocketStream(sock) as stream:
                await sock.bind(client_path)
                await sock.connect(path)
                assert await stream.receive_some() == b"recorded\n"
    assert server.client_addresses == ["", client_path]
