"""Reliability: hostile and random input closes only the offender; memory stays bounded.

The harness, and how to run the long (soak) variants: ``support/reliability.py``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import random
from collections.abc import Iterator

import hypothesis
import hypothesis.strategies as st
import pytest
import trio
import trio.testing
from support.reliability import (
    IO_TIMEOUT,
    RELIABILITY_SERVER,
    SOAK_TIMEOUT,
    CountingTCPServer,
    assert_stats_add_up,
    child,
    memory_kib,
    params,
    report,
)
from support.servers import (
    Echo,
    connect,
    read_to_eof,
    roundtrip,
    serving,
    tls_contexts,
)


async def send_hostile(port: int, pieces: Iterator[bytes]) -> tuple[bytes, int]:
    """Send ``pieces`` while reading; return what came back and bytes sent.

    Stops sending when the server closes or resets the connection, and
    reads until it does.
    """
    echoed = bytearray()
    sent = 0
    async with await trio.open_tcp_stream("127.0.0.1", port) as client:

        async def read() -> None:
            echoed.extend(await read_to_eof(client))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read)
            try:
                for piece in pieces:
                    await client.send_all(piece)
                    sent += len(piece)
                await client.send_eof()
            except trio.BrokenResourceError:
                pass
    return bytes(echoed), sent


def repeat(piece: bytes, total: int) -> Iterator[bytes]:
    for _ in range(total // len(piece)):
        yield piece


@pytest.mark.parametrize("body_mib", params((20,), (100,)))
async def test_hostile_input_closes_the_offender_and_memory_stays_bounded(
    body_mib: int,
) -> None:
    limit = 65536  # the handler's max_line_length
    rng = random.Random(6)
    no_newline = rng.randbytes(2**20).replace(b"\n", b"?")
    with child(str(RELIABILITY_SERVER)) as server:
        port = int(server.line().removeprefix("port "))
        with trio.fail_after(SOAK_TIMEOUT):
            async with await trio.open_tcp_stream("127.0.0.1", port) as normal:
                assert await roundtrip(normal, b"hello\n") == b"hello\n"
                baseline = memory_kib("VmHWM", server.pid)
                offenders = 0

                # An oversized line, then one just over the limit.
                for line in (b"a" * 2**20 + b"\n", b"b" * limit + b"\n"):
                    echoed, _ = await send_hostile(port, iter([line]))
                    assert echoed == b""
                    offenders += 1
                    assert await roundtrip(normal, b"ok\n") == b"ok\n"

                # A line exactly at the limit, of NUL bytes, is echoed.
                line = b"\0" * (limit - 1) + b"\n"
                assert await send_hostile(port, iter([line])) == (line, len(line))

                # Binary garbage: random bytes, with the newlines chance puts
                # in them, comes back exactly (the last line at end of stream).
                garbage = rng.randbytes(256 * 1024)
                assert (await send_hostile(port, iter([garbage])))[0] == garbage

                # A large body without a newline is cut off: the server
                # never holds it (see the peak memory below); it closes the
                # connection, discarding the rest while it lingers.
                body = body_mib * 2**20
                echoed, _ = await send_hostile(port, repeat(no_newline[:65536], body))
                assert echoed == b""
                offenders += 1

                # Several at once, while the normal client goes on.
                async with trio.open_nursery() as nursery:
                    for _ in range(8):
                        nursery.start_soon(
                            send_hostile, port, repeat(no_newline, 20 * 2**20)
                        )
                    offenders += 8
                    for number in range(5):
                        line = b"during %d\n" % number
                        assert await roundtrip(normal, line) == line
                assert await roundtrip(normal, b"bye\n") == b"bye\n"
                peak = memory_kib("VmHWM", server.pid)
                rss = memory_kib("VmRSS", server.pid)
        returncode, stdout, stderr = server.stop()
    assert returncode == 0, stderr
    stats = json.loads(stdout.strip().rpartition("stats ")[2])
    assert stats["failed"] == offenders, stats
    assert stats["disconnected"] == 0, stats
    assert stats["completed"] == stats["accepted"] - offenders, stats
    # One clear line per offender, with the client's address and the
    # reason; no traceback, since the fault is the peer's, not the server's.
    assert stderr.count("WARNING trioserve: line too long from") == offenders
    too_long = f"line longer than max_line_length ({limit} bytes)"
    assert stderr.count(too_long) == offenders, stderr[-3000:]
    assert stderr.count("Traceback") == 0
    growth_mib = (peak - baseline) / 1024
    assert growth_mib < 64, f"peak memory grew {growth_mib:.1f} MiB"
    report(
        "hostile",
        body_MiB=body_mib,
        offenders=offenders,
        baseline_peak_MiB=f"{baseline / 1024:.1f}",
        peak_MiB=f"{peak / 1024:.1f}",
        peak_growth_MiB=f"{growth_mib:.1f}",
        rss_end_MiB=f"{rss / 1024:.1f}",
    )


async def test_garbage_instead_of_tls_or_proxy_header_is_dropped(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="trioserve")
    server_context, client_context = tls_contexts()
    rng = random.Random(7)
    tls = CountingTCPServer(("127.0.0.1", 0), Echo, ssl_context=server_context)
    proxied = CountingTCPServer(
        ("127.0.0.1", 0), Echo, proxy_protocol="auto", trusted_proxies=["127.0.0.1"]
    )
    garbage = [rng.randbytes(rng.randint(1, 4096)) for _ in range(20)]
    # Bytes that begin like a header and then go wrong, or never end.
    garbage += [b"PROXY TCP4 1.2.3.4 garbage\r\n", b"PROXY " + b"9" * 200]
    garbage += [b"\r\n\r\n\0\r\nQUIT\n" + rng.randbytes(100)]
    with trio.fail_after(IO_TIMEOUT):
        async with serving(tls), serving(proxied):
            for server in (tls, proxied):
                for data in garbage:
                    async with await connect(server) as client:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await client.send_all(data)
                            await client.send_eof()
                        # A TLS server may send an alert before it closes.
                        if await read_to_eof(client) and server is proxied:
                            pytest.fail("the PROXY server answered garbage")
                await server.closed.wait_for(len(garbage))
            # Both still serve well-behaved clients.
            host, port = tls.server_address
            async with await trio.open_ssl_over_tcp_stream(
                host, port, ssl_context=client_context
            ) as good:
                assert await roundtrip(good, b"fine\n") == b"fine\n"
            async with await connect(proxied) as good:
                header = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n"
                assert await roundtrip(good, header + b"fine\n") == b"fine\n"
    for server in (tls, proxied):
        assert server.stats.dropped == len(garbage), server.stats
        assert server.stats.completed == 1
        assert_stats_add_up(server.stats)
    assert [r for r in caplog.records if r.levelno >= logging.ERROR] == []


# Random bytes, some starting like a PROXY header, against a live server that
# reads a PROXY header ("auto": v1 or v2) and then lines of at most 64 bytes.
PROXY_V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
fuzz_payloads = st.tuples(
    st.sampled_from([b"", b"PROXY ", b"PROXY TCP4 ", PROXY_V2_SIGNATURE]),
    st.binary(max_size=600),
).map(b"".join)


@hypothesis.settings(max_examples=40, deadline=None, database=None)
@hypothesis.given(payloads=st.lists(fuzz_payloads, min_size=1, max_size=4))
def test_random_bytes_never_upset_a_proxy_and_line_server(
    payloads: list[bytes],
) -> None:
    class Short(Echo):
        max_line_length = 64

    async def main() -> None:
        server = CountingTCPServer(
            ("127.0.0.1", 0),
            Short,
            proxy_protocol="auto",
            trusted_proxies=["127.0.0.1"],
            handshake_timeout=5,
        )
        with trio.fail_after(IO_TIMEOUT):
            async with serving(server):
                for payload in payloads:
                    async with await connect(server) as client:
                        with contextlib.suppress(trio.BrokenResourceError):
                            await client.send_all(payload)
                            await client.send_eof()
                        echoed = await read_to_eof(client)
                    # Whatever came back is lines the payload held.
                    assert echoed in payload
                await server.closed.wait_for(len(payloads))
                async with await connect(server) as good:
                    header = b"PROXY TCP4 192.0.2.1 127.0.0.1 4000 80\r\n"
                    assert await roundtrip(good, header + b"fine\n") == b"fine\n"
        stats = server.stats
        assert stats.accepted == len(payloads) + 1
        assert stats.disconnected == stats.timed_out == stats.cancelled == 0
        assert_stats_add_up(stats)

    trio.run(main)
