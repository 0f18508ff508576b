"""One server, several listeners: shared nursery, bound, shutdown and counters."""

from __future__ import annotations

import errno
import os
import socket
import tempfile
from collections.abc import Iterator

import pytest
import trio
import trio.testing
from test_server import Echo, _has_ipv6_loopback, roundtrip, serving

import trioserve


@pytest.fixture
def sock_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(dir="/tmp", prefix="tsl")
    yield path
    for name in os.listdir(path):
        os.unlink(os.path.join(path, name))
    os.rmdir(path)


async def open_stream(address: object) -> trio.SocketStream:
    if isinstance(address, str):
        return await trio.open_unix_socket(address)
    assert isinstance(address, tuple)
    return await trio.open_tcp_stream(address[0], address[1])


async def test_tcp_and_unix_listeners_share_one_server(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s")
    extra: list[object] = [path]
    if _has_ipv6_loopback():
        extra.insert(0, ("::1", 0))
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, extra_addresses=extra)
    async with serving(server):
        assert len(server.server_addresses) == len(server.sockets) == 1 + len(extra)
        assert server.server_addresses[0] == server.server_address
        assert server.server_addresses[-1] == path
        assert all(address[1] != 0 for address in server.server_addresses[:-1])
        for address in server.server_addresses:
            async with await open_stream(address) as client:
                assert await roundtrip(client, b"hi\n") == b"hi\n"
        await trio.testing.wait_all_tasks_blocked()  # the handlers saw EOF
        assert server.stats.completed == len(server.server_addresses)
    # One server_close closed every listener and removed the socket file.
    assert all(sock.fileno() == -1 for sock in server.sockets)
    assert not await trio.Path(path).exists()


async def test_listeners_share_one_concurrency_bound(sock_dir: str) -> None:
    release = trio.Event()

    class Holder(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            await release.wait()
            await self.wfile.write(line)

    path = os.path.join(sock_dir, "s")
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Holder, extra_addresses=[path], max_concurrent_requests=1
    )
    async with serving(server):
        async with (
            await open_stream(server.server_address) as tcp,
            await open_stream(path) as unix,
        ):
            await tcp.send_all(b"tcp\n")
            await unix.send_all(b"unix\n")
            await trio.testing.wait_all_tasks_blocked()
            # One slot for both listeners: the second connection waits.
            assert (server.stats.accepted, server.stats.active) == (1, 1)
            release.set()
            assert await roundtrip(tcp, b"") == b"tcp\n"
            assert await roundtrip(unix, b"") == b"unix\n"


async def test_one_shutdown_lets_idle_clients_of_every_listener_go(
    sock_dir: str,
) -> None:
    path = os.path.join(sock_dir, "s")
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, extra_addresses=[path])
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        clients = [await open_stream(a) for a in server.server_addresses]
        for client in clients:
            assert await roundtrip(client, b"x\n") == b"x\n"
        with trio.fail_after(5):
            await server.shutdown()
        for client in clients:
            with trio.fail_after(5):
                assert await client.receive_some() == b""
            await client.aclose()
    await server.server_close()
    assert not server.is_serving()


async def test_udp_and_unix_datagram_listeners(sock_dir: str) -> None:
    class Upper(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write((await self.rfile.read()).upper())

    path = os.path.join(sock_dir, "d")
    server = trioserve.UDPServer(("127.0.0.1", 0), Upper, extra_addresses=[path])
    async with serving(server):
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp:
            await udp.sendto(b"udp", server.server_address)
            with trio.fail_after(5):
                assert await udp.recv(100) == b"UDP"
        with trio.socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as unix:
            await unix.bind(os.path.join(sock_dir, "client"))
            await unix.sendto(b"unix", path)
            with trio.fail_after(5):
                assert await unix.recv(100) == b"UNIX"
    assert server.stats.completed == 2


async def test_handle_request_takes_the_first_request_from_any_listener(
    sock_dir: str,
) -> None:
    path = os.path.join(sock_dir, "s")
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, extra_addresses=[path])
    async with server:
        for address in (path, server.server_address):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(server.handle_request)
                async with await open_stream(address) as client:
                    assert await roundtrip(client, b"one\n") == b"one\n"
    assert server.stats.completed == 2


async def test_a_failing_extra_listener_leaves_nothing_open(sock_dir: str) -> None:
    path = os.path.join(sock_dir, "s")
    fds = len(os.listdir("/proc/self/fd"))
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        server = trioserve.TCPServer(
            path, Echo, extra_addresses=[squatter.getsockname()]
        )
        assert server.address_family == socket.AF_UNIX  # from the path
        with pytest.raises(OSError, match="could not bind") as caught:
            async with server:
                pass
    assert caught.value.errno == errno.EADDRINUSE
    assert not await trio.Path(path).exists()  # the first listener's file went
    assert len(os.listdir("/proc/self/fd")) == fds


async def test_requests_ready_on_several_listeners_at_once_are_all_served(
    sock_dir: str,
) -> None:
    # Both listeners have a connection waiting before serving starts, so
    # both win the race for the first request; neither may be lost.
    path = os.path.join(sock_dir, "s")
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Echo, extra_addresses=[path], max_concurrent_requests=1
    )
    async with server:
        tcp = await open_stream(server.server_address)
        unix = await open_stream(path)
        async with tcp, unix, trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            # Whole requests: with a bound of 1 either may go first.
            for client in (tcp, unix):
                await client.send_all(b"both\n")
                await client.send_eof()
            for client in (tcp, unix):
                reply = b""
                with trio.fail_after(5):
                    while chunk := await client.receive_some():
                        reply += chunk
                assert reply == b"both\n"
            await server.shutdown()
    assert server.stats.completed == 2
