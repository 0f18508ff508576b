"""Serving: binding, concurrency, the concurrency bound, hooks, errors, counters."""

from __future__ import annotations

import collections
import contextvars
import errno
import functools
import logging
import socket
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, Protocol

import pytest
import trio
import trio.testing
from support.servers import (
    Echo,
    connect,
    ipv6_loopback_available,
    open_fds,
    roundtrip,
    serving,
)

import trioserve

# -- binding -----------------------------------------------------------------


async def test_construction_does_no_io_and_bind_failure_leaves_nothing_open() -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        before = open_fds()
        server = trioserve.TCPServer(("127.0.0.1", port), Echo)
        assert open_fds() == before
        # Not bound yet: a closed socket, which holds no descriptor.
        assert server.socket.fileno() == -1
        assert open_fds() == before
        with pytest.raises(OSError, match="in use") as caught:
            async with server:
                pytest.fail("the body must not run when binding fails")
        assert caught.value.errno == errno.EADDRINUSE
        assert open_fds() == before
        assert server.socket.fileno() == -1


async def test_async_with_binds_and_reports_real_address() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server:
        host, port = server.server_address
        assert (host, port != 0) == ("127.0.0.1", True)
        assert server.fileno() == server.socket.fileno() >= 0
        # Listening already: the kernel completes the handshake into the
        # backlog before anything accepts.
        with socket.create_connection((host, port), timeout=5):
            pass
    assert server.socket.fileno() == -1


async def test_serve_forever_binds_and_reports_address_to_start() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        started_with = await nursery.start(server.serve_forever)
        assert started_with == server.server_address
        assert started_with[1] != 0
        assert server.is_serving()
        async with await connect(server) as client:
            assert await roundtrip(client, b"hi\n") == b"hi\n"
        await server.shutdown()
    assert not server.is_serving()
    await server.server_close()


async def test_handle_request_binds_first() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        nursery.start_soon(server.handle_request)
        await trio.testing.wait_all_tasks_blocked()
        async with await connect(server) as client:
            assert await roundtrip(client, b"once\n") == b"once\n"
    await server.server_close()


async def test_closed_server_cannot_serve_again() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server:
        pass
    await server.server_close()  # idempotent
    with pytest.raises(trio.ClosedResourceError):
        await server.serve_forever()


def test_class_attributes() -> None:
    assert trioserve.TCPServer.request_queue_size >= 4096
    assert trioserve.TCPServer.timeout is None
    assert trioserve.TCPServer.allow_reuse_port is False
    assert trioserve.TCPServer.socket_type == socket.SOCK_STREAM
    assert trioserve.UDPServer.max_packet_size == 8192
    assert trioserve.UDPServer.socket_type == socket.SOCK_DGRAM
    assert trioserve.UnixStreamServer.address_family == socket.AF_UNIX
    assert trioserve.UnixDatagramServer.address_family == socket.AF_UNIX
    assert trioserve.BaseServer.max_concurrent_requests is None
    for cls in (
        trioserve.TCPServer,
        trioserve.UDPServer,
        trioserve.UnixStreamServer,
        trioserve.UnixDatagramServer,
    ):
        assert issubclass(cls, trioserve.BaseServer)


def test_constructor_options_override_class_attributes() -> None:
    server = trioserve.TCPServer(
        ("127.0.0.1", 0), Echo, max_concurrent_requests=3, shutdown_timeout=1.5
    )
    assert (server.max_concurrent_requests, server.shutdown_timeout) == (3, 1.5)
    with pytest.raises(ValueError, match="max_concurrent_requests"):
        trioserve.TCPServer(("127.0.0.1", 0), Echo, max_concurrent_requests=0)


def test_address_family_from_address() -> None:
    assert trioserve.TCPServer(("127.0.0.1", 0), Echo).address_family == socket.AF_INET
    assert trioserve.TCPServer(("::1", 0), Echo).address_family == socket.AF_INET6
    assert trioserve.TCPServer(("localhost", 0), Echo).address_family == socket.AF_INET

    class V6Server(trioserve.TCPServer):
        address_family = socket.AF_INET6

    assert V6Server(("", 0), Echo).address_family == socket.AF_INET6


@pytest.mark.skipif(not ipv6_loopback_available(), reason="no IPv6 loopback here")
async def test_ipv6_echo() -> None:
    async with serving(trioserve.TCPServer(("::1", 0), Echo)) as server:
        assert server.server_address[0] == "::1"
        async with await connect(server) as client:
            assert await roundtrip(client, b"six\n") == b"six\n"


async def test_allow_reuse_port_lets_two_servers_share_a_port() -> None:
    class Shared(trioserve.TCPServer):
        allow_reuse_port = True

    async with Shared(("127.0.0.1", 0), Echo) as first:
        async with Shared(first.server_address, Echo) as second:
            assert second.server_address == first.server_address
            reuse = socket.SO_REUSEPORT
            assert second.socket.getsockopt(socket.SOL_SOCKET, reuse) != 0


async def test_bind_and_activate_false_lets_the_caller_prepare_the_socket() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    try:
        server.socket.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        await server.server_bind()
        await server.server_activate()
        async with serving(server):
            keepalive = server.socket.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE)
            assert keepalive != 0
            async with await connect(server) as client:
                assert await roundtrip(client, b"x\n") == b"x\n"
    finally:
        await server.server_close()


async def test_tcp_nodelay_is_on_for_requests() -> None:
    seen: list[int] = []

    class Probe(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            assert isinstance(self.connection, trio.SocketStream)
            option = (socket.IPPROTO_TCP, socket.TCP_NODELAY)
            seen.append(self.connection.socket.getsockopt(*option))

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Probe)) as server:
        async with await connect(server) as client:
            assert await client.receive_some() == b""
    assert len(seen) == 1
    assert seen[0] != 0


# -- concurrency -------------------------------------------------------------


async def test_requests_run_concurrently() -> None:
    # The first handler can only return once the second has started, which
    # deadlocks unless both run at once.
    second_started = trio.Event()
    order: list[str] = []

    class Waiter(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            if await self.rfile.readline() == b"first\n":
                await second_started.wait()
                order.append("first")
            else:
                second_started.set()
                order.append("second")
            await self.wfile.write(b"done\n")

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Waiter)) as server:
        async with await connect(server) as one, await connect(server) as two:
            await one.send_all(b"first\n")
            await trio.testing.wait_all_tasks_blocked()
            assert await roundtrip(two, b"second\n") == b"done\n"
            assert await roundtrip(one, b"") == b"done\n"
    assert order == ["second", "first"]


async def test_max_concurrent_requests_stops_accepting_at_the_bound() -> None:
    release = trio.Event()

    class Holder(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"hold\n":
                await release.wait()
            await self.wfile.write(line)

    server = trioserve.TCPServer(("127.0.0.1", 0), Holder, max_concurrent_requests=2)
    async with serving(server):
        async with (
            await connect(server) as a,
            await connect(server) as b,
            await connect(server) as c,
        ):
            await a.send_all(b"hold\n")
            await b.send_all(b"hold\n")
            await c.send_all(b"next\n")
            await trio.testing.wait_all_tasks_blocked()
            # The third connection waits in the kernel's backlog, not in a task.
            assert (server.stats.accepted, server.stats.active) == (2, 2)
            release.set()
            assert await roundtrip(c, b"") == b"next\n"
            assert await roundtrip(a, b"") == b"hold\n"
            assert await roundtrip(b, b"") == b"hold\n"
        assert server.stats.accepted == 3


async def test_concurrent_serve_forever_is_refused() -> None:
    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Echo)) as server:
        with pytest.raises(RuntimeError, match="already serving"):
            await server.serve_forever()
        with pytest.raises(RuntimeError, match="already serving"):
            await server.handle_request()


async def test_serve_forever_can_run_again_after_shutdown() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server:
        for word in (b"one\n", b"two\n"):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve_forever)
                async with await connect(server) as client:
                    assert await roundtrip(client, word) == word
                await server.shutdown()
    assert server.stats.completed == 2


# -- hooks -------------------------------------------------------------------


async def test_verify_request_false_closes_without_handling() -> None:
    handled: list[object] = []

    class Picky(trioserve.TCPServer):
        async def verify_request(self, request: object, client_address: object) -> bool:
            return False

    class Record(trioserve.StreamRequestHandler):
        async def setup(self) -> None:
            handled.append(self.client_address)

    async with serving(Picky(("127.0.0.1", 0), Record)) as server:
        async with await connect(server) as client:
            with trio.fail_after(5):
                assert await client.receive_some() == b""
        assert (server.stats.accepted, server.stats.rejected) == (1, 1)
    assert handled == []


async def test_verify_request_sees_client_address() -> None:
    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Echo)) as server:
        seen: list[object] = []

        async def verify(request: object, client_address: object) -> bool:
            seen.append(client_address)
            return True

        server.verify_request = verify  # type: ignore[method-assign]
        async with await connect(server) as client:
            assert await roundtrip(client, b"a\n") == b"a\n"
            assert seen == [client.socket.getsockname()]


async def test_a_hook_wrapping_a_default_one_is_still_awaited() -> None:
    # functools.wraps copies the default hook's attributes, the marks that
    # let the server skip it among them; the wrapper must not pass for the
    # hook it wraps.
    calls: list[str] = []

    def logged(hook: Any) -> Any:
        @functools.wraps(hook)
        async def wrapper(*args: Any) -> Any:
            calls.append(hook.__name__)
            return await hook(*args)

        return wrapper

    class Logged(trioserve.TCPServer):
        verify_request = logged(trioserve.TCPServer.verify_request)
        process_request = logged(trioserve.TCPServer.process_request)
        finish_request = logged(trioserve.TCPServer.finish_request)
        shutdown_request = logged(trioserve.TCPServer.shutdown_request)

    async with serving(Logged(("127.0.0.1", 0), Echo)) as server:
        async with await connect(server) as client:
            assert await roundtrip(client, b"a\n") == b"a\n"
    # Serving has ended, so the request has been shut down.
    assert calls == [
        "verify_request",
        "process_request",
        "finish_request",
        "shutdown_request",
    ]


@pytest.mark.parametrize(
    ("error", "counter", "level", "phrase"),
    [
        (
            trio.BrokenResourceError("reset"),
            "disconnected",
            logging.DEBUG,
            "connection lost mid-request from",
        ),
        (TimeoutError("slow"), "timed_out", logging.INFO, "request timed out from"),
        (
            trioserve.LineTooLong("long"),
            "failed",
            logging.WARNING,
            "line too long from",
        ),
        (RuntimeError("bug"), "failed", logging.ERROR, "exception while handling"),
    ],
)
async def test_an_error_from_verify_request_is_counted_as_it_is_logged(
    error: Exception,
    counter: str,
    level: int,
    phrase: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # One table classifies what ends a request, for the counters and for
    # handle_error's log line alike, whichever hook raised it.
    class Raising(trioserve.TCPServer):
        async def verify_request(self, request: object, client_address: object) -> bool:
            raise error

    caplog.set_level(logging.DEBUG, logger="trioserve")
    async with serving(Raising(("127.0.0.1", 0), Echo)) as server:
        async with await connect(server) as client:
            with trio.fail_after(5):
                assert await client.receive_some() == b""
    counts = {
        name: getattr(server.stats, name)
        for name in ("failed", "timed_out", "disconnected")
    }
    assert counts == {name: int(name == counter) for name in counts}
    [record] = [r for r in caplog.records if phrase in r.getMessage()]
    assert record.levelno == level
    assert (record.exc_info is not None) == (level == logging.ERROR)


async def test_service_actions_run_every_poll_interval(
    autojump_clock: trio.testing.MockClock,
) -> None:
    calls: list[float] = []

    class Ticking(trioserve.TCPServer):
        async def service_actions(self) -> None:
            calls.append(trio.current_time())

    server = Ticking(("127.0.0.1", 0), Echo)
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever, 0.25)
        start = trio.current_time()
        await trio.sleep(5)
        await server.shutdown()
    await server.server_close()
    gaps = [b - a for a, b in zip([start, *calls], calls, strict=False)]
    assert len(calls) >= 19
    assert max(gaps) <= 0.25 + 1e-6


async def test_handle_request_handles_one_request_to_completion() -> None:
    finished = trio.Event()

    class Slow(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(await self.rfile.readline())
            # Still running after the client has its reply: handle_request
            # must not return before this is done.
            await self.rfile.readline()

        async def finish(self) -> None:
            finished.set()

    server = trioserve.TCPServer(("127.0.0.1", 0), Slow)
    async with server:
        async with trio.open_nursery() as nursery, await connect(server) as client:
            nursery.start_soon(server.handle_request)
            assert await roundtrip(client, b"hello\n") == b"hello\n"
            await trio.testing.wait_all_tasks_blocked()
            assert not finished.is_set()
            await client.send_all(b"bye\n")
        assert finished.is_set()
        assert server.stats.completed == 1


async def test_handle_request_timeout_calls_handle_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    timeouts: list[float] = []

    class Impatient(trioserve.TCPServer):
        timeout = 3.0

        async def handle_timeout(self) -> None:
            timeouts.append(trio.current_time())

    async with Impatient(("127.0.0.1", 0), Echo) as server:
        start = trio.current_time()
        await server.handle_request()
    assert timeouts == [pytest.approx(start + 3.0)]
    assert server.stats.accepted == 0


# -- errors ------------------------------------------------------------------


async def test_handler_exception_is_logged_with_client_address_and_serving_goes_on(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class Faulty(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"boom\n":
                raise ZeroDivisionError("the handler failed")
            await self.wfile.write(line)

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Faulty)) as server:
        async with await connect(server) as client:
            address = client.socket.getsockname()
            assert await roundtrip(client, b"boom\n") == b""
        async with await connect(server) as client:
            assert await roundtrip(client, b"fine\n") == b"fine\n"
    records = [r for r in caplog.records if r.name == "trioserve"]
    assert len(records) == 1
    assert records[0].levelno == logging.ERROR
    assert repr(address) in records[0].getMessage()
    assert records[0].exc_info is not None
    assert records[0].exc_info[0] is ZeroDivisionError
    assert (server.stats.failed, server.stats.completed) == (1, 1)


async def test_handle_error_is_awaited_inside_the_except_block() -> None:
    import sys

    seen: list[BaseException | None] = []

    class Recording(trioserve.TCPServer):
        async def handle_error(self, request: object, client_address: object) -> None:
            await trio.lowlevel.checkpoint()
            seen.append(sys.exc_info()[1])

    class Faulty(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            raise KeyError("missing")

    async with serving(Recording(("127.0.0.1", 0), Faulty)) as server:
        async with await connect(server) as client:
            assert await roundtrip(client, b"") == b""
    assert len(seen) == 1
    assert isinstance(seen[0], KeyError)


async def test_exception_group_from_handler_nursery_does_not_stop_the_server() -> None:
    class Grouped(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            async def fail(exc: Exception) -> None:
                raise exc

            if await self.rfile.readline() == b"group\n":
                async with trio.open_nursery() as nursery:
                    nursery.start_soon(fail, ValueError("one"))
                    nursery.start_soon(fail, OSError("two"))
            await self.wfile.write(b"ok\n")

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Grouped)) as server:
        async with await connect(server) as client:
            assert await roundtrip(client, b"group\n") == b""
        async with await connect(server) as client:
            assert await roundtrip(client, b"plain\n") == b"ok\n"
        assert server.is_serving()
    assert (server.stats.failed, server.stats.completed) == (1, 1)


async def test_keyboard_interrupt_from_a_handler_propagates() -> None:
    class Interrupting(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            raise KeyboardInterrupt

    server = trioserve.TCPServer(("127.0.0.1", 0), Interrupting)
    with pytest.RaisesGroup(KeyboardInterrupt, flatten_subgroups=True):
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                with trio.fail_after(5):
                    await client.receive_some()
    await server.server_close()


async def test_finish_runs_when_handle_raises_but_not_when_setup_raises() -> None:
    calls: list[str] = []

    class Lifecycle(trioserve.StreamRequestHandler):
        async def setup(self) -> None:
            await super().setup()
            line = await self.rfile.readline()
            calls.append(f"setup {line!r}")
            if line == b"bad setup\n":
                raise RuntimeError("setup failed")

        async def handle(self) -> None:
            calls.append("handle")
            raise RuntimeError("handle failed")

        async def finish(self) -> None:
            calls.append("finish")

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Lifecycle)) as server:
        async with await connect(server) as client:
            assert await roundtrip(client, b"bad setup\n") == b""
        async with await connect(server) as client:
            assert await roundtrip(client, b"good\n") == b""
    assert calls == [
        "setup b'bad setup\\n'",
        "setup b'good\\n'",
        "handle",
        "finish",
    ]
    assert server.stats.failed == 2


async def test_finish_is_bounded_by_finish_timeout(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    class Stuck(trioserve.StreamRequestHandler):
        finish_timeout = 1.5

        async def finish(self) -> None:
            await trio.sleep_forever()

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Stuck)) as server:
        async with await connect(server) as client:
            start = trio.current_time()
            await client.send_eof()
            assert await roundtrip(client, b"") == b""
            assert trio.current_time() - start == pytest.approx(1.5)
    assert "finish_timeout" in caplog.text
    assert server.stats.completed == 1


async def test_line_too_long_closes_only_that_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    class ShortLines(Echo):
        max_line_length = 1024

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), ShortLines)) as server:
        async with await connect(server) as good, await connect(server) as bad:
            assert await roundtrip(good, b"before\n") == b"before\n"
            await bad.send_all(b"x" * 5000)
            with trio.fail_after(5):
                while True:
                    try:
                        if not await bad.receive_some():
                            break
                    except trio.BrokenResourceError:
                        break  # closed with our bytes unread: a reset
            assert await roundtrip(good, b"after\n") == b"after\n"
    assert server.stats.failed == 1
    assert "line too long from" in caplog.text


async def test_handler_timeout_raises_timeout_error_and_is_counted(
    autojump_clock: trio.testing.MockClock,
) -> None:
    class Patient(Echo):
        timeout = 30.0

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Patient)) as server:
        async with await connect(server) as client:
            start = trio.current_time()
            assert await roundtrip(client, b"hello\n") == b"hello\n"
            with trio.fail_after(60):
                assert await client.receive_some() == b""
            assert trio.current_time() - start == pytest.approx(30.0)
    assert (server.stats.timed_out, server.stats.failed) == (1, 0)


async def test_counters_add_up() -> None:
    class Mixed(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            line = await self.rfile.readline()
            if line == b"fail\n":
                raise ValueError(line)
            if line == b"timeout\n":
                raise TimeoutError
            await self.wfile.write(line)

    class Picky(trioserve.TCPServer):
        async def verify_request(self, request: object, client_address: object) -> bool:
            return self.stats.accepted != 1

    async with serving(Picky(("127.0.0.1", 0), Mixed)) as server:
        for line in (b"rejected\n", b"ok\n", b"fail\n", b"timeout\n", b"ok\n"):
            async with await connect(server) as client:
                await roundtrip(client, line)
                assert server.stats.active in (0, 1)
        await trio.testing.wait_all_tasks_blocked()
        stats = server.stats
        assert (stats.accepted, stats.rejected, stats.completed) == (5, 1, 2)
        assert (stats.failed, stats.timed_out, stats.active) == (1, 1, 0)
        assert stats.accepted == (
            stats.rejected
            + stats.dropped
            + stats.disconnected
            + stats.completed
            + stats.failed
            + stats.timed_out
            + stats.cancelled
            + stats.active
        )


# -- datagrams ---------------------------------------------------------------


class _LineFiles(Protocol):
    """What EchoLines needs of the handler it is mixed into."""

    @property
    def rfile(self) -> trioserve.AsyncBufferedReader: ...
    @property
    def wfile(self) -> trioserve.AsyncBufferedWriter | trioserve.AsyncPacketWriter: ...


class EchoLines:
    """One handle() body for streams and datagrams, as CONTRACT.md promises."""

    async def handle(self: _LineFiles) -> None:
        async for line in self.rfile:
            await self.wfile.write(line.upper())


class StreamUpper(EchoLines, trioserve.StreamRequestHandler):
    pass


class DatagramUpper(EchoLines, trioserve.DatagramRequestHandler):
    pass


@asynccontextmanager
async def udp_client() -> AsyncIterator[trio.socket.SocketType]:
    with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        await sock.bind(("127.0.0.1", 0))
        yield sock


async def test_one_mixin_handler_serves_tcp_and_udp() -> None:
    tcp = trioserve.TCPServer(("127.0.0.1", 0), StreamUpper)
    udp = trioserve.UDPServer(("127.0.0.1", 0), DatagramUpper)
    async with serving(tcp), serving(udp), udp_client() as client:
        async with await connect(tcp) as stream:
            assert await roundtrip(stream, b"tcp\n") == b"TCP\n"
        await client.sendto(b"udp\nline two\n", udp.server_address)
        with trio.fail_after(5):
            reply, address = await client.recvfrom(100)
        assert (reply, address) == (b"UDP\nLINE TWO\n", udp.server_address)


async def test_datagram_handler_sends_nothing_when_nothing_is_written() -> None:
    handled = trio.Event()

    class Silent(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            if await self.rfile.read() == b"quiet":
                handled.set()
            else:
                await self.wfile.write(b"spoke")

    udp = trioserve.UDPServer(("127.0.0.1", 0), Silent)
    async with serving(udp), udp_client() as client:
        await client.sendto(b"quiet", udp.server_address)
        await client.sendto(b"loud", udp.server_address)
        with trio.fail_after(5):
            await handled.wait()
            assert await client.recv(100) == b"spoke"
        # Only one reply came: the socket has nothing more to read.
        with pytest.raises(BlockingIOError):
            client._sock.recv(100)  # type: ignore[attr-defined]


async def test_datagram_handler_attributes() -> None:
    seen: list[tuple[bytes, object]] = []

    class Look(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            seen.append((self.packet, self.socket))
            await self.wfile.write(b"seen")

    udp = trioserve.UDPServer(("127.0.0.1", 0), Look)
    async with serving(udp), udp_client() as client:
        await client.sendto(b"payload", udp.server_address)
        with trio.fail_after(5):
            reply, _ = await client.recvfrom(100)
    assert reply == b"seen"
    assert seen == [(b"payload", udp.socket)]


# With no bound the server's accept loop receives for itself; with one it
# goes through get_request. Both must draw the line at max_packet_size.
@pytest.mark.parametrize("max_concurrent_requests", [None, 4])
async def test_oversized_datagram_is_dropped_and_counted(
    caplog: pytest.LogCaptureFixture, max_concurrent_requests: int | None
) -> None:
    class Small(trioserve.UDPServer):
        max_packet_size = 64

    udp = Small(
        ("127.0.0.1", 0),
        DatagramUpper,
        max_concurrent_requests=max_concurrent_requests,
    )
    fits = b"f" * 63 + b"\n"
    async with serving(udp), udp_client() as client:
        await client.sendto(b"x" * 65, udp.server_address)
        await client.sendto(fits, udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == fits.upper()
    assert (udp.stats.malformed, udp.stats.accepted, udp.stats.completed) == (1, 1, 1)
    assert "max_packet_size" in caplog.text


async def test_a_flood_of_dropped_datagrams_is_logged_once_per_interval(
    caplog: pytest.LogCaptureFixture, mock_clock: trio.testing.MockClock
) -> None:
    class Small(trioserve.UDPServer):
        max_packet_size = 64

    def drop_warnings() -> list[str]:
        return [
            r.getMessage()
            for r in caplog.records
            if "longer than max_packet_size" in r.getMessage()
        ]

    udp = Small(("127.0.0.1", 0), DatagramUpper)
    async with serving(udp), udp_client() as client:
        for _ in range(50):
            await client.sendto(b"x" * 65, udp.server_address)
        # Datagrams from one client are handled in order: once this one is
        # answered, the 50 before it have all been dropped.
        await client.sendto(b"fits\n", udp.server_address)
        assert await client.recv(100) == b"FITS\n"
        assert len(drop_warnings()) == 1
        mock_clock.jump(10)
        await client.sendto(b"x" * 65, udp.server_address)
        await client.sendto(b"fits\n", udp.server_address)
        assert await client.recv(100) == b"FITS\n"
    first, second = drop_warnings()
    assert "more like it" not in first
    assert second.endswith("(49 more like it since the last one were not logged)")
    assert udp.stats.malformed == 51
    assert udp.stats.completed == 2


async def test_a_peer_that_resets_mid_response_is_logged_at_debug_and_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    import struct

    caplog.set_level(logging.DEBUG, logger="trioserve")
    started, ended = trio.Event(), trio.Event()

    class Firehose(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            if await self.rfile.readline() == b"go\n":
                started.set()
                while True:  # until the peer is gone
                    await self.wfile.write(b"x" * 65536)
            await self.wfile.write(b"ok\n")

        async def finish(self) -> None:
            if started.is_set():
                ended.set()

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Firehose)) as server:
        client = await connect(server)
        await client.send_all(b"go\n")
        await started.wait()
        # SO_LINGER with a zero timeout: close sends a reset, not a FIN.
        linger = struct.pack("ii", 1, 0)
        client.socket.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
        await client.aclose()
        with trio.fail_after(5):
            await ended.wait()
        async with await connect(server) as other:
            assert await roundtrip(other, b"\n") == b"ok\n"
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.disconnected == 1
    assert server.stats.disconnected == 1
    assert server.stats.failed == 0
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []
    assert "connection lost mid-request" in caplog.text


async def test_a_datagram_handler_that_waits_does_not_hold_up_the_next() -> None:
    # Each datagram starts in the task that received it; the first one waits,
    # so it keeps that task and a new one goes on receiving.
    release = trio.Event()
    seen: list[bytes] = []

    class Waiting(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            seen.append(self.packet)
            if self.packet == b"first":
                await release.wait()
            await self.wfile.write(self.packet.upper())

    udp = trioserve.UDPServer(("127.0.0.1", 0), Waiting)
    async with serving(udp), udp_client() as client:
        await client.sendto(b"first", udp.server_address)
        await client.sendto(b"second", udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == b"SECOND"
        assert seen == [b"first", b"second"]
        release.set()
        with trio.fail_after(5):
            assert await client.recv(100) == b"FIRST"
        await client.sendto(b"third", udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == b"THIRD"
    assert udp.stats.completed == 3


class _SpawnCounter(trio.abc.Instrument):
    def __init__(self) -> None:
        self.spawned = 0

    def task_spawned(self, task: trio.lowlevel.Task) -> None:
        self.spawned += 1


async def test_a_datagram_handler_that_never_waits_gets_no_task_of_its_own() -> None:
    # What eager start is for: the obvious handler (read the packet, write
    # the reply) is done before it would wait, in the receiving task.
    class Upper(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            async for line in self.rfile:
                await self.wfile.write(line.upper())

    rounds = 50
    counter = _SpawnCounter()
    udp = trioserve.UDPServer(("127.0.0.1", 0), Upper)
    async with serving(udp), udp_client() as client:
        await trio.testing.wait_all_tasks_blocked()
        trio.lowlevel.add_instrument(counter)
        try:
            for n in range(rounds):
                await client.sendto(b"line %d\n" % n, udp.server_address)
                with trio.fail_after(5):
                    assert await client.recv(100) == b"LINE %d\n" % n
        finally:
            trio.lowlevel.remove_instrument(counter)
    assert udp.stats.completed == rounds
    assert counter.spawned == 0


async def test_datagram_requests_started_in_place_keep_their_context_apart() -> None:
    # A request started in place sees the context as a new task would: what
    # one request sets, the next does not see, whether it waited or not.
    request_id: contextvars.ContextVar[bytes] = contextvars.ContextVar("request_id")
    seen: list[bytes | None] = []

    class Tagging(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            seen.append(request_id.get(None))
            request_id.set(self.packet)
            if self.packet == b"wait":
                await trio.lowlevel.checkpoint()
            seen.append(request_id.get(None))
            await self.wfile.write(self.packet)

    udp = trioserve.UDPServer(("127.0.0.1", 0), Tagging)
    async with serving(udp), udp_client() as client:
        for word in (b"one", b"wait", b"two"):
            await client.sendto(word, udp.server_address)
            with trio.fail_after(5):
                assert await client.recv(100) == word
    assert seen == [None, b"one", None, b"wait", None, b"two"]


async def test_a_waiting_datagram_handler_gets_the_shutdown_grace_period() -> None:
    # Started in the receiving task, it is still a request, not part of
    # accepting: the shutdown stops the receiving, and lets it finish.
    started = trio.Event()
    release = trio.Event()

    class Slow(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            started.set()
            await release.wait()
            await self.wfile.write(b"done")

    udp = trioserve.UDPServer(("127.0.0.1", 0), Slow, shutdown_timeout=30)
    async with trio.open_nursery() as nursery, udp_client() as client:
        await nursery.start(udp.serve_forever)
        await client.sendto(b"go", udp.server_address)
        with trio.fail_after(5):
            await started.wait()
        nursery.start_soon(udp.shutdown)
        await trio.testing.wait_all_tasks_blocked()
        assert not udp.is_serving()
        release.set()
        with trio.fail_after(5):
            assert await client.recv(100) == b"done"
    assert udp.stats.completed == 1
    assert udp.stats.cancelled == 0
    await udp.server_close()


async def test_a_datagram_handler_may_shut_the_server_down() -> None:
    # From inside a request started in place, shutdown() starts the
    # shutdown and returns; the request ends as usual.
    class Stopping(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            await self.server.shutdown()
            await self.wfile.write(b"bye")

    udp = trioserve.UDPServer(("127.0.0.1", 0), Stopping)
    async with udp, udp_client() as client:
        async with trio.open_nursery() as nursery:
            await nursery.start(udp.serve_forever)
            await client.sendto(b"stop", udp.server_address)
            with trio.fail_after(5):
                assert await client.recv(100) == b"bye"
        # serve_forever returned.
    assert udp.stats.completed == 1
    assert not udp.is_serving()


async def test_a_verify_request_that_waits_does_not_hold_up_accepting() -> None:
    # The request keeps the accept task it started in; a new one accepts.
    release = trio.Event()
    verifying = trio.Event()

    class Checking(trioserve.TCPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            if not verifying.is_set():
                verifying.set()
                await release.wait()
            return True

    server = Checking(("127.0.0.1", 0), Echo)
    async with serving(server):
        async with await connect(server) as slow:
            with trio.fail_after(5):
                await verifying.wait()
            async with await connect(server) as quick:
                with trio.fail_after(5):
                    assert await roundtrip(quick, b"hi\n") == b"hi\n"
            release.set()
            with trio.fail_after(5):
                assert await roundtrip(slow, b"late\n") == b"late\n"
    assert server.stats.completed == 2


def test_inline_is_deprecated() -> None:
    with pytest.warns(DeprecationWarning, match="inline has no effect"):

        class Inline(trioserve.DatagramRequestHandler):
            inline = True


class Ticker:
    """Counts the turns the scheduler gives it, for as long as it runs."""

    def __init__(self) -> None:
        self.ticks = 0

    async def run(self) -> None:
        while True:
            self.ticks += 1
            await trio.lowlevel.checkpoint()


async def test_a_datagram_flood_cannot_starve_other_tasks() -> None:
    # Ready datagrams are received without waiting, so without a checkpoint
    # now and then a flood would hold the scheduler until the socket drained.
    from trioserve._socketio import READY_OPERATIONS_PER_CHECKPOINT

    ticker = Ticker()
    ticks_seen: list[int] = []

    class Counting(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            ticks_seen.append(ticker.ticks)
            await self.wfile.write(self.packet)

    flood = 4 * READY_OPERATIONS_PER_CHECKPOINT
    udp = trioserve.UDPServer(("127.0.0.1", 0), Counting)
    async with serving(udp), trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        with trio.socket.from_stdlib_socket(sender) as client:
            # Sent without a checkpoint between: all wait in the server's
            # socket before it runs again.
            for n in range(flood):
                sender.sendto(b"%d" % n, udp.server_address)
            with trio.fail_after(5):
                replies = [await client.recv(100) for _ in range(flood)]
        nursery.cancel_scope.cancel()
    assert sorted(replies) == sorted(b"%d" % n for n in range(flood))
    assert len(ticks_seen) == flood
    # The ticker ran while the flood was served, not only after it. The
    # checkpoint comes after every so many datagrams are handled, so the
    # last one is seen by no handler, and Trio may run the ticker a batch
    # late: one tick less each.
    checkpoints = flood // READY_OPERATIONS_PER_CHECKPOINT
    assert ticks_seen[-1] - ticks_seen[0] >= checkpoints - 2


async def test_a_backlog_is_accepted_in_stretches_that_cannot_starve_others() -> None:
    # Connections already waiting in the backlog are accepted without a
    # checkpoint each (as Trio's accept would take), but with one every so
    # many, so other tasks still run while a backlog drains.
    from trioserve._socketio import READY_OPERATIONS_PER_CHECKPOINT

    ticker = Ticker()
    ticks_seen: list[int] = []
    all_taken = trio.Event()

    class Counting(trioserve.TCPServer):
        async def verify_request(self, request: Any, client_address: Any) -> bool:
            # Runs in the accept task, as each connection is taken.
            ticks_seen.append(ticker.ticks)
            if len(ticks_seen) == flood:
                all_taken.set()
            return True

    flood = 4 * READY_OPERATIONS_PER_CHECKPOINT
    server = Counting(("127.0.0.1", 0), trioserve.BaseRequestHandler)
    async with serving(server), trio.open_nursery() as nursery:
        nursery.start_soon(ticker.run)
        # Connected without a checkpoint between: all wait in the backlog
        # before the server runs again.
        clients = [
            socket.create_connection(server.server_address) for _ in range(flood)
        ]
        try:
            with trio.fail_after(5):
                await all_taken.wait()
        finally:
            for client in clients:
                client.close()
        nursery.cancel_scope.cancel()
    # The ticker ran while the backlog drained, not only after it...
    checkpoints = flood // READY_OPERATIONS_PER_CHECKPOINT
    assert ticks_seen[-1] - ticks_seen[0] >= checkpoints - 2
    # ...but not between every two connections.
    assert len(set(ticks_seen)) <= checkpoints + 2


async def answer_at_once(
    client: socket.socket,
    address: Any,
    rounds: int,
    waits: collections.Counter[int],
    server_fd: int,
) -> int:
    """How often the server waited while a prompt client sent ``rounds``.

    The client sends each datagram as soon as the last one's echo is in,
    without a checkpoint between, like a client in another process. The
    server is waiting when it starts and when it is done.
    """
    waited_before = waits[server_fd]
    for n in range(rounds):
        client.sendto(b"%d" % n, address)
        await trio.lowlevel.wait_readable(client)
        assert client.recv(100) == b"%d" % n
    await trio.testing.wait_all_tasks_blocked()
    return waits[server_fd] - waited_before


async def test_an_emptied_datagram_socket_is_looked_at_again_before_a_wait(
    readable_waits: collections.Counter[int],
) -> None:
    # As for streams (see test_streams): a server whose socket ran dry
    # checkpoints and receives again before it waits, and by the second look
    # a prompt client has sent its next datagram, whichever order Trio runs
    # the batch in. The one wait is for the client's silence after the last
    # datagram; without the looks there would be one per datagram.
    class Echo(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(self.packet)

    rounds = 100
    udp = trioserve.UDPServer(("127.0.0.1", 0), Echo)
    client = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    client.setblocking(False)
    with client:
        async with serving(udp):
            await trio.testing.wait_all_tasks_blocked()
            with trio.fail_after(5):
                waits = await answer_at_once(
                    client, udp.server_address, rounds, readable_waits, udp.fileno()
                )
    assert udp.stats.completed == rounds
    assert waits == 1


async def test_an_overridden_get_request_still_receives_every_datagram() -> None:
    # The accept loop receives for itself only with get_request as it is.
    received: list[bytes] = []

    class Recording(trioserve.UDPServer):
        async def get_request(
            self, listener: trio.socket.SocketType | None = None
        ) -> tuple[object, object]:
            request, client_address = await super().get_request(listener)
            received.append(request[0])
            return request, client_address

    udp = Recording(("127.0.0.1", 0), DatagramUpper)
    async with serving(udp), udp_client() as client:
        for word in (b"one\n", b"two\n"):
            await client.sendto(word, udp.server_address)
            with trio.fail_after(5):
                assert await client.recv(100) == word.upper()
    assert received == [b"one\n", b"two\n"]


async def test_udp_hooks_overridden_or_set_on_the_instance_are_awaited() -> None:
    # The server skips verify_request, shutdown_request and close_request
    # while they are the defaults that do nothing, and does what
    # process_request and finish_request would do without awaiting them; an
    # override must still run, once per datagram, as socketserver's does.
    # Set on the instance too, after serving has started.
    calls: list[tuple[str, bytes]] = []

    class Hooked(trioserve.UDPServer):
        async def close_request(self, request: Any) -> None:
            calls.append(("close", request[0]))

    udp = Hooked(("127.0.0.1", 0), DatagramUpper)
    async with serving(udp), udp_client() as client:
        await client.sendto(b"one\n", udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == b"ONE\n"

        async def verify(request: Any, client_address: Any) -> bool:
            calls.append(("verify", request[0]))
            data: bytes = request[0]
            return data != b"no\n"

        async def shutdown_request(request: Any) -> None:
            calls.append(("shutdown", request[0]))
            await trioserve.UDPServer.shutdown_request(udp, request)

        udp.verify_request = verify  # type: ignore[method-assign]
        udp.shutdown_request = shutdown_request  # type: ignore[method-assign]
        for word in (b"no\n", b"two\n"):
            await client.sendto(word, udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == b"TWO\n"

        async def process_request(request: Any, client_address: Any) -> None:
            calls.append(("process", request[0]))
            await trioserve.UDPServer.process_request(udp, request, client_address)

        async def finish_request(request: Any, client_address: Any) -> None:
            calls.append(("finish", request[0]))
            await trioserve.UDPServer.finish_request(udp, request, client_address)

        udp.process_request = process_request  # type: ignore[method-assign]
        udp.finish_request = finish_request  # type: ignore[method-assign]
        await client.sendto(b"three\n", udp.server_address)
        with trio.fail_after(5):
            assert await client.recv(100) == b"THREE\n"
    assert calls == [
        ("close", b"one\n"),
        ("verify", b"no\n"),
        ("shutdown", b"no\n"),
        ("close", b"no\n"),
        ("verify", b"two\n"),
        ("shutdown", b"two\n"),
        ("close", b"two\n"),
        ("verify", b"three\n"),
        ("process", b"three\n"),
        ("finish", b"three\n"),
        ("shutdown", b"three\n"),
        ("close", b"three\n"),
    ]
    assert udp.stats.rejected == 1
    assert udp.stats.completed == 3


async def test_request_tasks_share_one_name() -> None:
    # The name Trio would give each task, as one string, not one per task:
    # each is held for as long as its connection stays open.
    names: list[str] = []

    class Named(trioserve.StreamRequestHandler):
        async def handle(self) -> None:
            names.append(trio.lowlevel.current_task().name)

    async with serving(trioserve.TCPServer(("127.0.0.1", 0), Named)) as server:
        for _ in range(2):
            with trio.fail_after(5):
                async with await connect(server) as stream:
                    await stream.send_eof()
                    assert await stream.receive_some() == b""
    assert names[0] == "trioserve._server.BaseServer._request_task"
    assert names[0] is names[1]
