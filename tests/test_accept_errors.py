"""How the accept loop meets errors, after Trio's serve_listeners tests.

Like trio's test_highlevel_serve_listeners (test_serve_listeners_accept_capacity_error
and test_serve_listeners_accept_unrecognized_error), these wrap the real
listening socket in one whose accept() fails a few times before it recovers.
"""

from __future__ import annotations

import contextlib
import errno
import itertools
import logging
import os
from typing import Any

import pytest
import trio
import trio.testing
from support.servers import Echo, connect, roundtrip

import trioserve


class FlakyListener:
    """The server's real trio socket, but accept() first raises ``errors``."""

    def __init__(self, real: trio.socket.SocketType, errors: list[OSError]) -> None:
        self.real = real
        self.errors = errors
        self.failed_at: list[float] = []

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        await trio.lowlevel.checkpoint()
        if self.errors:
            self.failed_at.append(trio.current_time())
            raise self.errors.pop(0)
        return await self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


def gaps_between(times: list[float]) -> list[float]:
    return [b - a for a, b in itertools.pairwise(times)]


async def serve_with_flaky_accept(
    errors: list[OSError],
) -> tuple[trioserve.TCPServer, FlakyListener]:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    await server.__aenter__()
    flaky = FlakyListener(server.socket, errors)
    server._listeners[0].socket = flaky  # type: ignore[assignment]
    return server, flaky


@pytest.mark.parametrize(
    "code", [errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM]
)
async def test_out_of_resources_is_logged_and_retried_after_a_pause(
    code: int,
    autojump_clock: trio.testing.MockClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    server, flaky = await serve_with_flaky_accept([OSError(code, "pressure")] * 3)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await roundtrip(client, b"served\n") == b"served\n"
            assert server.is_serving()
            await server.shutdown()
    finally:
        await server.server_close()
    # The pause doubles while the errors go on; the log has the first.
    gaps = gaps_between(flaky.failed_at)
    assert gaps == [pytest.approx(0.1), pytest.approx(0.2)]
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) == 1
    assert errno.errorcode[code] in errors[0].getMessage()
    assert server.stats.accept_errors == 3


class ExhaustedListener:
    """The server's real trio socket, but accept() fails with EMFILE until ``until``.

    As a process out of descriptors sees it: every accept fails, however
    often it is tried, until some are freed.
    """

    def __init__(self, real: trio.socket.SocketType, until: float) -> None:
        self.real = real
        self.until = until
        self.failed_at: list[float] = []

    async def accept(self) -> tuple[trio.socket.SocketType, Any]:
        await trio.lowlevel.checkpoint()
        if trio.current_time() < self.until:
            self.failed_at.append(trio.current_time())
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        return await self.real.accept()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.real, name)


async def test_a_long_descriptor_shortage_neither_floods_the_log_nor_spins(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    # An hour out of descriptors used to log 36,000 lines, one per 0.1 s.
    shortage = 600.0
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server:
        start = trio.current_time()
        exhausted = ExhaustedListener(server.socket, start + shortage)
        server._listeners[0].socket = exhausted  # type: ignore[assignment]
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            # A client waits in the backlog all along.
            async with await connect(server) as client:
                await client.send_all(b"waited\n")
                with trio.fail_after(shortage + 10):
                    assert await client.receive_some() == b"waited\n"
                served_at = trio.current_time()
            await server.shutdown()
    failures = exhausted.failed_at
    gaps = gaps_between(failures)
    # The pause doubles from 0.1 s up to 1 s, and stays there.
    assert gaps[:5] == pytest.approx([0.1, 0.2, 0.4, 0.8, 1.0])
    assert gaps[5:] == pytest.approx([1.0] * len(gaps[5:]))
    assert server.stats.accept_errors == len(failures)
    assert len(failures) <= shortage + 5  # one try a second, not ten
    # Served within a second of descriptors being free again.
    assert start + shortage <= served_at <= start + shortage + 1.0
    # The first line at once, then one per 10 s saying how many it stands for.
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert len(errors) <= shortage / 10 + 1
    assert "EMFILE" in errors[0]
    assert "more like it" in errors[1]
    held_back = sum(int(m.split("(")[-1].split()[0]) for m in errors[1:])
    assert len(errors) + held_back <= len(failures)


async def test_accepting_again_starts_the_pause_over(
    autojump_clock: trio.testing.MockClock,
) -> None:
    emfile = OSError(errno.EMFILE, "pressure")
    server, flaky = await serve_with_flaky_accept([emfile] * 4)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await roundtrip(client, b"one\n") == b"one\n"
            # The loop already waits in the real accept: the shortage comes
            # after the next connection.
            flaky.errors.extend([emfile] * 2)
            async with await connect(server) as client:
                assert await roundtrip(client, b"two\n") == b"two\n"
            async with await connect(server) as client:
                assert await roundtrip(client, b"three\n") == b"three\n"
            await server.shutdown()
    finally:
        await server.server_close()
    times = flaky.failed_at
    gaps = gaps_between(times)
    # 0.1, 0.2, 0.4; then the fourth waits 0.8 s, accepting works again,
    # and the next shortage starts from 0.1 s, not 1 s.
    assert len(times) == 6
    assert gaps[:3] == pytest.approx([0.1, 0.2, 0.4])
    assert gaps[4] == pytest.approx(0.1)


@pytest.mark.parametrize("code", [errno.ECONNABORTED, errno.EPROTO, errno.ENETDOWN])
async def test_per_connection_errors_are_skipped_without_pausing(
    code: int, autojump_clock: trio.testing.MockClock
) -> None:
    server, flaky = await serve_with_flaky_accept([OSError(code, "gone")] * 3)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve_forever)
            async with await connect(server) as client:
                assert await roundtrip(client, b"served\n") == b"served\n"
            await server.shutdown()
    finally:
        await server.server_close()
    assert len(flaky.failed_at) == 3
    assert flaky.failed_at[-1] == flaky.failed_at[0]


async def test_closed_listening_socket_ends_the_loop_cleanly() -> None:
    server, _ = await serve_with_flaky_accept([OSError(errno.EBADF, "closed")])
    try:
        with trio.fail_after(10):
            await server.serve_forever()
    finally:
        await server.server_close()
    assert not server.is_serving()


async def test_unrecognised_accept_error_propagates() -> None:
    server, _ = await serve_with_flaky_accept([OSError(errno.EINVAL, "nonsense")])
    try:
        with pytest.RaisesGroup(
            pytest.RaisesExc(OSError, check=lambda e: e.errno == errno.EINVAL),
            flatten_subgroups=True,
        ):
            await server.serve_forever()
    finally:
        await server.server_close()


async def test_handle_request_retries_too(
    autojump_clock: trio.testing.MockClock,
) -> None:
    server, flaky = await serve_with_flaky_accept(
        [OSError(errno.EMFILE, "pressure"), OSError(errno.ECONNABORTED, "gone")]
    )
    try:
        async with trio.open_nursery() as nursery, await connect(server) as client:
            nursery.start_soon(server.handle_request)
            assert await roundtrip(client, b"one\n") == b"one\n"
    finally:
        await server.server_close()
    assert len(flaky.failed_at) == 2
    assert server.stats.accepted == 1


async def test_real_descriptor_exhaustion_recovers(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The real thing: use up every descriptor the process may have, so the
    # server's accept() fails with EMFILE, then free them and check that the
    # waiting client is served.
    resource = pytest.importorskip("resource")
    limits = resource.getrlimit(resource.RLIMIT_NOFILE)
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    async with server, trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        with trio.socket.socket() as waiting:
            highest = max(int(fd) for fd in os.listdir("/proc/self/fd"))
            resource.setrlimit(resource.RLIMIT_NOFILE, (highest + 1, limits[1]))
            fillers = []
            try:
                with contextlib.suppress(OSError):
                    while True:
                        fillers.append(os.dup(0))
                await waiting.connect(server.server_address)
                # The accept loop hits EMFILE, logs it and sleeps before trying
                # again: all tasks blocked means it has got that far.
                await trio.testing.wait_all_tasks_blocked()
                assert "EMFILE" in caplog.text
                assert server.stats.accepted == 0
            finally:
                for fd in fillers:
                    os.close(fd)
                resource.setrlimit(resource.RLIMIT_NOFILE, limits)
            async with trio.SocketStream(waiting) as stream:
                assert await roundtrip(stream, b"served\n") == b"served\n"
        await server.shutdown()
    assert server.stats.accepted == 1
