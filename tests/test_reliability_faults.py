"""Reliability: faults in handlers leave the server up and counted right.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any

import pytest
import trio
import trio.testing
from support.reliability import (
    assert_stats_add_up,
)
from support.servers import (
    connect,
    read_to_eof,
    roundtrip,
)

import trioserve

if sys.version_info < (3, 11):
    from exceptiongroup import ExceptionGroup


class Faulty(trioserve.StreamRequestHandler):
    """Misbehaves as its first line says; records what ran."""

    finish_timeout = 1.0
    events: dict[str, list[str]]

    async def setup(self) -> None:
        await super().setup()
        self.mode = (await self.rfile.readline()).strip().decode()
        self.events["setup"].append(self.mode)
        if self.mode == "setup":
            raise ValueError("setup failed")

    async def handle(self) -> None:
        mode = self.mode
        if mode == "handle":
            raise ValueError("handle failed")
        if mode == "group":
            raise ExceptionGroup("two failures", [ValueError("a"), KeyError("b")])
        if mode == "block":
            # Hogs the event loop: no checkpoint for 0.2 s of real time.
            time.sleep(0.2)  # noqa: ASYNC251
        if mode in ("swallow", "hang", "hang-finish"):
            await self.wfile.write(b"working\n")
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                if mode != "swallow":
                    raise
                self.events["swallowed"].append(mode)
            # Swallowed it and keeps going: the next checkpoint raises again.
            await trio.sleep(1)
        await self.wfile.write(f"ok {mode}\n".encode())
        if mode == "echo":
            async for line in self.rfile:
                await self.wfile.write(line)

    async def finish(self) -> None:
        self.events["finish"].append(self.mode)
        if self.mode == "finish":
            raise RuntimeError("finish failed")
        if self.mode == "hang-finish":
            await trio.sleep_forever()
        await super().finish()


async def test_handler_faults_leave_the_server_up_and_counted_right(
    autojump_clock: trio.testing.MockClock, caplog: pytest.LogCaptureFixture
) -> None:
    events: dict[str, list[str]] = {"setup": [], "finish": [], "swallowed": []}
    handler = type("FaultyHandler", (Faulty,), {"events": events})
    grace = 3.0
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=grace)
    failing = ["setup", "handle", "group", "finish"]
    stuck = ["swallow", "hang", "hang-finish"] * 2
    returned: list[float] = []

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await server.serve_forever(task_status=task_status)
        returned.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        normal = await connect(server)
        assert await roundtrip(normal, b"echo\n") == b"ok echo\n"
        # What each client gets back before the server closes its connection.
        replies = {"setup": b"", "handle": b"", "group": b""}
        replies |= {"finish": b"ok finish\n", "block": b"ok block\n"}
        for _ in range(3):
            for mode, reply in replies.items():
                async with await connect(server) as client:
                    await client.send_all(mode.encode() + b"\n")
                    assert await read_to_eof(client) == reply
                assert await roundtrip(normal, b"up?\n") == b"up?\n"
        clients = []
        for mode in stuck:
            clients.append(await connect(server))
            assert await roundtrip(clients[-1], mode.encode() + b"\n") == b"working\n"
        start = trio.current_time()
        await server.shutdown()
        stopped = trio.current_time()
        for client in [normal, *clients]:
            await client.aclose()
    await server.server_close()
    # The grace period, then the hanging finish() cut off at finish_timeout,
    # then the close lingering for a client that is not reading yet.
    assert stopped - start == pytest.approx(
        grace + Faulty.finish_timeout + server.drain_window, abs=0.05
    )
    assert returned == [stopped]
    stats = server.stats
    assert stats.failed == 3 * len(failing)
    assert stats.completed == 3 + 1  # the blocking ones and the normal client
    assert stats.cancelled == len(stuck)
    assert stats.timed_out == stats.disconnected == 0
    assert_stats_add_up(stats)
    # finish() ran for every request whose setup() returned.
    assert sorted(events["finish"]) == sorted(
        [mode for mode in events["setup"] if mode != "setup"]
    )
    assert events["swallowed"] == ["swallow", "swallow"]
    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert len(errors) == 3 * len(failing)
    cut_off = [r for r in caplog.records if "finish_timeout" in r.getMessage()]
    assert len(cut_off) == 2
