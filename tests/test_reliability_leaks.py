"""Reliability: many short connections leak nothing.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import gc
import time

import pytest
import trio
import trio.testing
from support.reliability import (
    SOAK_TIMEOUT,
    assert_stats_add_up,
    memory_kib,
    params,
    report,
)
from support.servers import (
    connect,
    open_fds,
    read_to_eof,
    serving,
)

import trioserve


class OneLine(trioserve.StreamRequestHandler):
    """Answers one line, then closes: the server closes first, so the
    connection's TIME_WAIT stays on the server's side, not on the client's
    ephemeral ports."""

    async def handle(self) -> None:
        await self.wfile.write(await self.rfile.readline())


@pytest.mark.parametrize("connections", params((5000,), (100_000,)))
async def test_many_short_connections_leak_nothing(connections: int) -> None:
    workers, warm_up = 16, 500
    server = trioserve.TCPServer(("127.0.0.1", 0), OneLine)

    async def run(count: int) -> None:
        async def worker(share: int) -> None:
            for _ in range(share):
                async with await connect(server) as client:
                    await client.send_all(b"ping\n")
                    assert await read_to_eof(client) == b"ping\n"

        async with trio.open_nursery() as nursery:
            for number in range(workers):
                nursery.start_soon(
                    worker, count // workers + (number < count % workers)
                )

    with trio.fail_after(SOAK_TIMEOUT):
        async with serving(server):
            await run(warm_up)
            gc.collect()
            fds_before, rss_before = open_fds(), memory_kib("VmRSS")
            start = time.perf_counter()
            await run(connections)
            elapsed = time.perf_counter() - start
            gc.collect()
            fds_after, rss_after = open_fds(), memory_kib("VmRSS")
    assert fds_after == fds_before
    assert server.stats.completed == warm_up + connections
    assert_stats_add_up(server.stats)
    growth_mib = (rss_after - rss_before) / 1024
    assert growth_mib < 8, f"RSS grew {growth_mib:.1f} MiB"
    report(
        "short-connections",
        connections=connections,
        seconds=f"{elapsed:.1f}",
        per_s=f"{connections / elapsed:.0f}",
        fds=f"{fds_before}->{fds_after}",
        rss_MiB=f"{rss_before / 1024:.1f}->{rss_after / 1024:.1f}",
    )
