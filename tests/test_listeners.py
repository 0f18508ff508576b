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
from support.servers import Echo, ipv6_loopback_available, roundtrip, serving

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
    if ipv6_loopback_available():
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


async def test_a_connection_waiting_above_the_bound_is_served_at_shutdown() -> None:
    # Each listener's accept task holds the one connection it took while the
    # bound is reached. A shutdown then must not drop it: it reached the
    # server, so it waits on for a slot, within the grace period.
    release = trio.Event()

    class Holder(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"hold\n":
                await release.wait()
            await self.wfile.write(line)

    server = trioserve.TCPServer(("127.0.0.1", 0), Holder, max_concurrent_requests=1)
    with trio.fail_after(10):
        async with serving(server):
            async with (
                await open_stream(server.server_address) as held,
                await open_stream(server.server_address) as waiting,
            ):
                await held.send_all(b"hold\n")
                await waiting.send_all(b"waiting\n")
                await trio.testing.wait_all_tasks_blocked()
                assert (server.stats.accepted, server.stats.active) == (1, 1)
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(server.shutdown)
                    await trio.testing.wait_all_tasks_blocked()
                    release.set()
                    assert await roundtrip(held, b"") == b"hold\n"
                    assert await roundtrip(waiting, b"") == b"waiting\n"
    assert server.stats.completed == 2


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


async def test_handle_request_serves_every_request_its_listeners_took(
    sock_dir: str,
) -> None:
    # Both listeners have a connection waiting when handle_request starts,
    # so both accept before the first request stops the other: the one
    # call serves both, and resets neither.
    path = os.path.join(sock_dir, "s")
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, extra_addresses=[path])
    async with server:
        tcp = await open_stream(server.server_address)
        unix = await open_stream(path)
        async with tcp, unix:
            for client in (tcp, unix):
                await client.send_all(b"both\n")
                await client.send_eof()
            with trio.fail_after(5):
                await server.handle_request()
            for client in (tcp, unix):
                reply = b""
                with trio.fail_after(5):
                    while chunk := await client.receive_some():
                        reply += chunk
                assert reply == b"both\n"
    assert (server.stats.accepted, server.stats.completed) == (2, 2)


# -- address families, and both families on one port -------------------------

requires_ipv6 = pytest.mark.skipif(
    not ipv6_loopback_available(), reason="this machine has no IPv6 loopback (::1)"
)


class PeerHost(trioserve.StreamRequestHandler):
    """Replies with the client's host, as the server saw it."""

    async def handle(self) -> None:
        await self.wfile.write(self.client_address[0].encode() + b"\n")


class DatagramPeerHost(trioserve.DatagramRequestHandler):
    async def handle(self) -> None:
        await self.wfile.write(self.client_address[0].encode())


async def peer_host_over_stream(family: int, address: tuple[str, int]) -> bytes:
    """Connect from a socket of ``family``, as the stdlib's own tests do."""
    sock = trio.socket.socket(family, socket.SOCK_STREAM)
    try:
        with trio.fail_after(5):
            await sock.connect(address)
    except BaseException:
        sock.close()
        raise
    async with trio.SocketStream(sock) as client:
        return await roundtrip(client, b"")


async def peer_host_over_datagram(family: int, address: tuple[str, int]) -> bytes:
    with trio.socket.socket(family, socket.SOCK_DGRAM) as client:
        await client.sendto(b"?", address)
        with trio.fail_after(5):
            return await client.recv(100)


def v6only(sock: trio.socket.SocketType) -> int:
    return sock.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY)


@requires_ipv6
async def test_an_ipv6_host_needs_no_subclass_and_a_v6_subclass_still_works() -> None:
    class V6Server(trioserve.TCPServer):
        address_family = socket.AF_INET6

    literal = trioserve.TCPServer(("::1", 0), PeerHost)
    assert trioserve.TCPServer.address_family == socket.AF_INET
    assert literal.address_family == socket.AF_INET6
    # Host "" in an AF_INET6 class means "::" alone, as in socketserver.
    subclassed = V6Server(("", 0), PeerHost)
    assert subclassed.server_addresses == [("", 0)]
    for server in (literal, subclassed):
        async with serving(server):
            port = server.server_address[1]
            reply = await peer_host_over_stream(server.address_family, ("::1", port))
            assert reply == b"::1\n"
            assert v6only(server.socket) == 1


@requires_ipv6
@pytest.mark.parametrize("server_class", [trioserve.TCPServer, trioserve.UDPServer])
async def test_ipv4_and_ipv6_servers_share_a_port(
    server_class: type[trioserve.TCPServer],
) -> None:
    stream = server_class.socket_type == socket.SOCK_STREAM
    handler = PeerHost if stream else DatagramPeerHost
    ask = peer_host_over_stream if stream else peer_host_over_datagram
    ipv4 = server_class(("0.0.0.0", 0), handler)
    async with serving(ipv4):
        port = ipv4.server_address[1]
        # IPv6 listeners are IPv6-only, so "::" leaves the IPv4 port alone.
        async with serving(server_class(("::", port), handler)) as ipv6:
            assert v6only(ipv6.socket) == 1
            end = b"\n" if stream else b""
            assert await ask(socket.AF_INET, ("127.0.0.1", port)) == b"127.0.0.1" + end
            assert await ask(socket.AF_INET6, ("::1", port)) == b"::1" + end
    assert (ipv4.stats.completed, ipv6.stats.completed) == (1, 1)


@requires_ipv6
@pytest.mark.parametrize("host", ["", None])
@pytest.mark.parametrize("server_class", [trioserve.TCPServer, trioserve.UDPServer])
async def test_empty_host_listens_on_both_families_on_one_port(
    server_class: type[trioserve.TCPServer], host: str | None
) -> None:
    stream = server_class.socket_type == socket.SOCK_STREAM
    handler = PeerHost if stream else DatagramPeerHost
    ask = peer_host_over_stream if stream else peer_host_over_datagram
    server = server_class((host, 0), handler)
    # Known from construction on: two listeners, IPv4 first.
    assert server.server_address == ("0.0.0.0", 0)
    assert server.extra_addresses == [("::", 0)]
    async with serving(server):
        port = server.server_address[1]
        assert port != 0
        assert server.server_addresses == [("0.0.0.0", port), ("::", port, 0, 0)]
        assert v6only(server.sockets[1]) == 1
        # Each family reaches its own listener: no IPv4-mapped addresses.
        end = b"\n" if stream else b""
        assert await ask(socket.AF_INET, ("127.0.0.1", port)) == b"127.0.0.1" + end
        assert await ask(socket.AF_INET6, ("::1", port)) == b"::1" + end
    assert server.stats.completed == 2


async def test_empty_host_without_ipv6_is_ipv4_alone(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(trioserve._listeners, "_has_ipv6", lambda: False)
    server = trioserve.TCPServer(("", 0), Echo)
    assert server.server_addresses == [("0.0.0.0", 0)]
    async with serving(server):
        async with await open_stream(("127.0.0.1", server.server_address[1])) as c:
            assert await roundtrip(c, b"v4\n") == b"v4\n"


@requires_ipv6
async def test_a_server_bind_override_may_make_a_dual_stack_listener() -> None:
    # http.server's DualStackServer idiom: IPV6_V6ONLY off in server_bind.
    class DualStack(trioserve.TCPServer):
        address_family = socket.AF_INET6

        async def server_bind(self) -> None:
            self.socket.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
            await super().server_bind()

    async with serving(DualStack(("", 0), PeerHost)) as server:
        port = server.server_address[1]
        reply = await peer_host_over_stream(socket.AF_INET, ("127.0.0.1", port))
        assert reply == b"::ffff:127.0.0.1\n"


# -- server.binding ------------------------------------------------------------


async def test_binding_says_where_the_server_is(sock_dir: str) -> None:
    lazy = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    assert lazy.binding == "lazy"
    async with lazy:
        # mypy keeps the narrowing to "lazy" across the await.
        assert lazy.binding == "bound"  # type: ignore[comparison-overlap]
    assert lazy.binding == "closed"

    manual = trioserve.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    assert manual.binding == "manual"
    try:
        await manual.server_bind()
        assert manual.binding == "bound"
    finally:
        await manual.server_close()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        adopted = trioserve.TCPServer.from_socket(sock.detach(), Echo)
    assert adopted.binding == "adopted"
    await adopted.server_close()
    assert adopted.binding == "closed"


async def test_a_failed_bind_leaves_the_server_lazy_and_able_to_retry(
    sock_dir: str,
) -> None:
    path = os.path.join(sock_dir, "s")
    with socket.socket(socket.AF_UNIX) as squatter:
        squatter.bind(path)
        squatter.listen()
        server = trioserve.UnixStreamServer(path, Echo)
        with pytest.raises(OSError, match="could not bind"):
            async with server:
                pass
        assert server.binding == "lazy"
        assert server.socket.fileno() == -1
        assert server.socket.family == socket.AF_UNIX
    os.unlink(path)
    async with serving(server):
        assert server.binding == "bound"  # type: ignore[comparison-overlap]
        async with await open_stream(path) as client:
            assert await roundtrip(client, b"again\n") == b"again\n"


def test_socket_is_read_and_made_outside_a_trio_run() -> None:
    # Servers are often made before trio.run, and serve_in_workers' factory
    # makes them there: reading server.socket, or bind_and_activate=False's
    # socket, must not need a run.
    lazy = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    assert getattr(lazy, "socket", None) is lazy.socket
    assert lazy.socket.fileno() == lazy.fileno() == -1
    manual = trioserve.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    manual.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    assert manual.socket.fileno() >= 0
    trio.run(manual.server_close)
    assert manual.socket.fileno() == -1
