"""Break down what an idle connection holds in memory, by allocation site.

    python benchmarks/idle_breakdown.py [--conns 2000] [--server trioserve-lines]
                                        [--depth 12] [--top 30]

Serves in this process what ``run.py`` runs as ``trioserve-lines`` (the
obvious line echo, ``python -m trioserve serve trioserve_lines:LineEcho``)
or ``trioserve`` (``python -m trioserve echo``), with the command line's
defaults. A client process opens ``--conns`` connections over real sockets,
makes one round trip on each (a 64-byte line), and holds them idle, as
``idle-5000`` does. :mod:`tracemalloc` compares the server's Python
allocations before and after, and prints them per connection: by the line
that allocated them, and by the innermost trioserve, Trio or handler line
that led there. That is Python's own memory: the RSS figure of ``idle-5000``
adds the allocator's slack and the C libraries' own (OpenSSL's, say).
"""

from __future__ import annotations

import argparse
import collections
import gc
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

if not __package__:  # run as a script: the package is in this one's parent
    sys.path[0] = str(Path(__file__).resolve().parent.parent)

import trio
import trio.testing

from trioserve._cli import _build_parser, describe
from trioserve._server import BaseServer
from trioserve._service import make_servers

PEERS = Path(__file__).resolve().parent / "peers"

#: The command lines of the servers this can look into, as run.py runs them.
COMMANDS = {
    "trioserve-lines": ["serve", "trioserve_lines:LineEcho", "--tcp", "127.0.0.1:0"],
    "trioserve": ["echo", "--tcp", "127.0.0.1:0"],
}

# Connections opened before the first snapshot, so that what is made once
# (code objects, caches, the first connection's lazily built state) is left
# out of the figures.
WARMUP_CONNS = 50

# The client: opens N connections, one round trip each, then holds them
# until its standard input closes.
CLIENT = r"""
import socket, sys
conns, port = int(sys.argv[1]), int(sys.argv[2])
held = []
for _ in range(conns):
    sock = socket.create_connection(("127.0.0.1", port))
    sock.sendall(b"x" * 63 + b"\n")
    got = b""
    while len(got) < 64:
        got += sock.recv(64)
    held.append(sock)
print("ready", flush=True)
sys.stdin.read()
"""

# Where a frame counts as "ours" for the grouping by site.
OURS = ("trioserve", "/trio/", "peers")


async def _hold_idle(
    server: BaseServer, port: int, conns: int
) -> trio.Process:  # pragma: no cover - a tool
    client = await trio.lowlevel.open_process(
        [sys.executable, "-c", CLIENT, str(conns), str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    assert client.stdout is not None
    line = b""
    while not line.endswith(b"\n"):
        chunk = await client.stdout.receive_some(100)
        assert chunk, "the client died"
        line += chunk
    await trio.testing.wait_all_tasks_blocked(0.2)
    return client


def _site(trace: tracemalloc.Traceback) -> str:
    """The innermost frame of ours in ``trace``: the code that asked."""
    for frame in reversed(trace):  # innermost last, as tracemalloc orders
        if any(part in frame.filename for part in OURS):
            return f"{_short(frame.filename)}:{frame.lineno}"
    return "(elsewhere)"


def _short(filename: str) -> str:
    for marker in ("trioserve/", "trio/", "peers/", "lib/python"):
        at = filename.rfind(marker)
        if at >= 0:
            return filename[at:]
    return filename


async def _measure(
    server_name: str, conns: int, depth: int, top: int
) -> None:  # pragma: no cover - a tool
    sys.path.insert(0, str(PEERS))
    args = _build_parser().parse_args(COMMANDS[server_name])
    (server,) = make_servers(describe(args))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve_forever)
        port = server.server_address[1]
        warm = await _hold_idle(server, port, WARMUP_CONNS)
        tracemalloc.start(depth)
        gc.collect()
        before = tracemalloc.take_snapshot()
        client = await _hold_idle(server, port, conns)
        gc.collect()
        after = tracemalloc.take_snapshot()
        tracemalloc.stop()
        _report(before, after, conns, top)
        for process in (warm, client):
            assert process.stdin is not None
            await process.stdin.aclose()
            await process.wait()
        nursery.cancel_scope.cancel()


def _report(
    before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, conns: int, top: int
) -> None:
    stats = after.compare_to(before, "traceback")
    total = sum(stat.size_diff for stat in stats)
    print(f"{total / conns:8.1f} B per idle connection in all ({conns} held)\n")
    by_line: collections.Counter[str] = collections.Counter()
    by_site: collections.Counter[str] = collections.Counter()
    for stat in stats:
        frame = stat.traceback[-1]
        by_line[f"{_short(frame.filename)}:{frame.lineno}"] += stat.size_diff
        by_site[_site(stat.traceback)] += stat.size_diff
    for title, counter in (("allocating line", by_line), ("asked for by", by_site)):
        print(f"{'B/conn':>8}  {title}")
        for where, size in counter.most_common(top):
            if abs(size) / conns >= 1:
                print(f"{size / conns:8.1f}  {where}")
        print()


def main() -> None:  # pragma: no cover - a tool
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--conns", type=int, default=2000)
    parser.add_argument("--server", choices=sorted(COMMANDS), default="trioserve-lines")
    parser.add_argument("--depth", type=int, default=12, help="traceback frames kept")
    parser.add_argument("--top", type=int, default=30)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONPATH", str(PEERS))
    trio.run(_measure, args.server, args.conns, args.depth, args.top)


if __name__ == "__main__":
    main()
