"""Reliability: graceful shutdown under load, silent peers, start and stop.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import gc
import time
from typing import Any

import pytest
import trio
import trio.testing
from support.reliability import (
    IO_TIMEOUT,
    assert_stats_add_up,
    count_tasks,
    memory_kib,
    params,
    report,
)
from support.servers import (
    Echo,
    connect,
    open_fds,
    read_to_eof,
    roundtrip,
    serving,
    tls_contexts,
)

import trioserve


class Worker(trioserve.StreamRequestHandler):
    """``work SECONDS`` takes that long (virtual time), then says ``done``."""

    record: dict[str, int]

    async def setup(self) -> None:
        await super().setup()
        self.record["setup"] += 1

    async def handle(self) -> None:
        async for line in self.rfile:
            self.record["started"] += 1
            await trio.sleep(float(line.split()[1]))
            await self.wfile.write(b"done\n")
            self.record["done"] += 1

    async def finish(self) -> None:
        await trio.sleep(0.01)  # a checkpoint: needs finish()'s shield
        self.record["finish"] += 1
        await super().finish()


@pytest.mark.parametrize("busy", params((200,), (1000,)))
async def test_graceful_shutdown_under_load(
    busy: int, autojump_clock: trio.testing.MockClock
) -> None:
    grace, idle, partial = 5.0, 20, 20
    record = dict.fromkeys(["setup", "started", "done", "finish"], 0)
    handler = type("WorkerHandler", (Worker,), {"record": record})
    fds_before, tasks_before = open_fds(), count_tasks()
    server = trioserve.TCPServer(("127.0.0.1", 0), handler, shutdown_timeout=grace)
    returned: list[float] = []
    # Half the busy requests need less than the grace period, half more.
    durations = [(number % 10) + 0.5 for number in range(busy)]
    expected_done = sum(duration < grace for duration in durations)

    async def serve(task_status: trio.TaskStatus[Any]) -> None:
        await server.serve_forever(task_status=task_status)
        returned.append(trio.current_time())

    replies: dict[str, list[bytes]] = {"busy": [], "idle": [], "partial": []}

    async def client(kind: str, duration: float) -> None:
        async with await connect(server) as stream:
            if kind == "idle":
                assert await roundtrip(stream, b"work 0\n") == b"done\n"
                connected.append(kind)
            elif kind == "partial":
                await stream.send_all(b"work ")
                connected.append(kind)
                await shutting_down.wait()
                await trio.sleep(1)  # in the middle of a message: it may finish
                await stream.send_all(b"0.5\n")
            else:
                await stream.send_all(b"work %f\n" % duration)
                connected.append(kind)
            replies[kind].append(await read_to_eof(stream))

    connected: list[str] = []
    shutting_down = trio.Event()
    async with trio.open_nursery() as nursery:
        await nursery.start(serve)
        async with trio.open_nursery() as clients:
            for duration in durations:
                clients.start_soon(client, "busy", duration)
            for _ in range(idle):
                clients.start_soon(client, "idle", 0)
            for _ in range(partial):
                clients.start_soon(client, "partial", 0)
            await trio.testing.wait_all_tasks_blocked()
            assert len(connected) == busy + idle + partial
            assert server.stats.active == busy + idle + partial
            start = trio.current_time()
            shutting_down.set()
            await server.shutdown()
            stopped = trio.current_time()
    await server.server_close()
    # Requests cut off at the grace period; finish() (0.01 s) runs after.
    assert stopped - start == pytest.approx(grace + 0.01, abs=0.02)
    assert returned == [stopped]
    # Every request that started either completed or was cancelled, and
    # finish() ran for each.
    assert record["setup"] == record["finish"] == busy + idle + partial
    assert record["done"] == expected_done + idle + partial
    stats = server.stats
    assert stats.completed == expected_done + idle + partial
    assert stats.cancelled == busy - expected_done
    assert_stats_add_up(stats)
    assert sorted(replies["busy"]) == sorted(
        [b"done\n" if duration < grace else b"" for duration in durations]
    )
    assert replies["idle"] == [b""] * idle
    assert replies["partial"] == [b"done\n"] * partial
    assert open_fds() == fds_before
    assert count_tasks() == tasks_before


@pytest.mark.parametrize(
    "kind",
    [
        "plain",
        "tls",
        "proxy",
    ],
)
async def test_a_connection_that_sent_nothing_does_not_hold_up_shutdown(
    kind: str, autojump_clock: trio.testing.MockClock
) -> None:
    # A port scanner, a load balancer's TCP check, a browser's preconnect.
    server_context, _ = tls_contexts()
    choices: dict[str, dict[str, Any]] = {
        "plain": {},
        "tls": {"ssl_context": server_context},
        "proxy": {"proxy_protocol": "v1", "trusted_proxies": ["127.0.0.1"]},
    }
    options = choices[kind]
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, shutdown_timeout=5, **options)
    received = b"not read"

    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        silent = await connect(server)

        async def read_then_close() -> None:
            nonlocal received
            received = await read_to_eof(silent)
            await silent.aclose()

        nursery.start_soon(read_then_close)
        await trio.testing.wait_all_tasks_blocked()
        assert server.stats.active == 1
        start = trio.current_time()
        await server.shutdown()
        elapsed = trio.current_time() - start
    await server.server_close()
    assert received == b""
    # Only the drain window for a first message on its way, not the grace.
    assert elapsed == pytest.approx(server.drain_window, abs=0.05)
    assert server.stats.cancelled == 0


async def test_start_stop_200_times_leaks_nothing() -> None:
    async def cycle() -> None:
        server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
        async with serving(server), await connect(server) as client:
            assert await roundtrip(client, b"ping\n") == b"ping\n"

    with trio.fail_after(IO_TIMEOUT * 2):
        for _ in range(20):  # warm up caches and allocators
            await cycle()
        gc.collect()
        fds_before, rss_before = open_fds(), memory_kib("VmRSS")
        tasks_before = count_tasks()
        start = time.perf_counter()
        for _ in range(200):
            await cycle()
        elapsed = time.perf_counter() - start
        gc.collect()
        fds_after, rss_after = open_fds(), memory_kib("VmRSS")
    assert fds_after == fds_before
    assert count_tasks() == tasks_before
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB over 200 cycles"
    report(
        "start-stop",
        cycles=200,
        seconds=f"{elapsed:.2f}",
        fds=f"{fds_before}->{fds_after}",
        rss_MiB=f"{rss_before / 1024:.1f}->{rss_after / 1024:.1f}",
    )
