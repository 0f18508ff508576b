"""Soak trioserve: serve mixed, hostile load for a while, then shut down.

    python benchmarks/soak.py [--duration SECONDS] [--seed N] [client counts]

Starts a trioserve line-echo server on 127.0.0.1 in a subprocess (this
script again, with ``--role server``) and drives it from this process, for
``--duration`` seconds (default 30), with every kind of client at once:

- echo clients send batches of random lines in random-sized chunks while
  reading, and check that every byte comes back in order (SHA-256);
- slow clients trickle a byte every half second and must be cut off by the
  server's ``idle_timeout``;
- stuck clients send but never read, so the server's writes block, and must
  be cut off by the handler's ``timeout``;
- abrupt clients reset the connection (``SO_LINGER`` 0) at once, in the
  middle of a request, or in the middle of the reply;
- hostile clients send oversized lines and bodies without a newline (the
  server must close the connection without echoing) and binary garbage,
  NUL bytes and floods of empty lines (which must come back exactly).

Then it stops the load, waits for the server to let go of every connection,
sends SIGTERM (a graceful shutdown) and prints one summary line: requests
the server took and how each ended, the kinds of errors its
``handle_error`` saw, what the clients checked (bytes verified, corruption,
cut-offs), and the server's file descriptors and memory at start and end.

The exit status is 0 only if no data was corrupted, every client saw what
it should have, the server's errors were all of the expected kinds
(``LineTooLong``, ``TimeoutError``, ``BrokenResourceError``), its file
descriptors came back to where they started, and it shut down cleanly: exit
status 0 within its grace period, every request accounted for. Otherwise
it is 1, and the end of the server's log is printed to stderr.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import hashlib
import json
import logging
import os
import random
import selectors
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import trio

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

HOST = "127.0.0.1"

# The server's limits. The idle timeout cuts off slow clients, the handler
# timeout stuck ones; both are long enough that a busy machine does not make
# a well-behaved client look slow.
IDLE_TIMEOUT = 5.0
STALL_TIMEOUT = 5.0
SHUTDOWN_TIMEOUT = 5.0
MAX_LINE_LENGTH = 65536

# How long past its limit a slow or stuck client may wait to be cut off, and
# how long the server may take to exit after SIGTERM beyond its grace period,
# before the run counts as failed. Generous: they only catch hangs.
CUT_OFF_MARGIN = 10.0
EXIT_MARGIN = 10.0
# How long after the load stops the server may hold connections.
QUIESCE_TIMEOUT = 30.0
STARTUP_TIMEOUT = 20.0

# Errors the server is expected to report about this load; anything else
# fails the run.
EXPECTED_ERRORS = frozenset({"LineTooLong", "TimeoutError", "BrokenResourceError"})

# Replaces b"\n" so random bytes make one line.
NO_NEWLINE = bytes.maketrans(b"\n", b" ")

# Counters the clients keep; those in CLIENT_ERRORS fail the run.
CLIENT_ERRORS = (
    "corrupt",
    "echo_cut_short",
    "slow_not_cut",
    "stuck_not_cut",
    "hostile_echoed",
)


# -- the server (run as a subprocess) --------------------------------------------


def error_kind(error: BaseException | None) -> str:
    """A short name for an exception; a group names its leaves."""
    if isinstance(error, BaseExceptionGroup):
        leaves = ",".join(sorted({error_kind(leaf) for leaf in error.exceptions}))
        return f"{type(error).__name__}[{leaves}]"
    return type(error).__name__


def serve() -> int:
    import attrs

    import trioserve

    class SoakHandler(trioserve.StreamRequestHandler):
        timeout = STALL_TIMEOUT
        max_line_length = MAX_LINE_LENGTH

        async def handle(self) -> None:
            async for line in self.rfile:
                await self.wfile.write(line)

    class SoakServer(trioserve.TCPServer):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.errors: collections.Counter[str] = collections.Counter()

        async def handle_error(self, request: Any, client_address: Any) -> None:
            self.errors[error_kind(sys.exc_info()[1])] += 1
            await super().handle_error(request, client_address)

    logging.basicConfig(
        level=logging.INFO,
        stream=sys.stderr,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    server = SoakServer(
        (HOST, 0),
        SoakHandler,
        idle_timeout=IDLE_TIMEOUT,
        shutdown_timeout=SHUTDOWN_TIMEOUT,
    )
    graceful: list[bool] = []

    async def run(task_status: trio.TaskStatus[list[Any]]) -> None:
        served = trioserve.serve_until_signalled([server], task_status=task_status)
        graceful.append(await served)

    async def main() -> None:
        async with trio.open_nursery() as nursery:
            addresses = await nursery.start(run)
            print(f"port {addresses[0][1]}", flush=True)

    trio.run(main)
    summary = {
        "stats": attrs.asdict(server.stats),
        "errors": dict(server.errors),
        "graceful": graceful == [True],
    }
    print("stats " + json.dumps(summary), flush=True)
    return 0


# -- the clients -------------------------------------------------------------------


class Tally:
    """What the clients did and saw, by name; and the longest cut-offs."""

    def __init__(self) -> None:
        self.counts: collections.Counter[str] = collections.Counter()
        self.slow_cut_after: list[float] = []
        self.stuck_cut_after: list[float] = []

    def __getitem__(self, name: str) -> int:
        return self.counts[name]

    def add(self, name: str, amount: int = 1) -> None:
        self.counts[name] += amount


def random_chunk_size(rng: random.Random) -> int:
    return rng.randint(*rng.choice(((1, 16), (1, 1500), (1, 65536))))


def random_lines(rng: random.Random, total: int) -> bytes:
    """Random bytes (any but newline) cut into lines of up to 8 KiB."""
    lines = []
    size = 0
    while size < total:
        length = rng.randint(1, 8192)
        lines.append(rng.randbytes(length - 1).translate(NO_NEWLINE) + b"\n")
        size += length
    return b"".join(lines)


async def open_stream(port: int) -> trio.SocketStream:
    return await trio.open_tcp_stream(HOST, port)


async def reset(stream: trio.SocketStream) -> None:
    """Close abruptly: SO_LINGER 0 makes the kernel send RST, not FIN."""
    stream.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    await stream.aclose()


async def read_to_eof(stream: trio.SocketStream) -> bytes:
    """Everything until the server closes (or resets) the connection."""
    data = bytearray()
    with contextlib.suppress(trio.BrokenResourceError):
        while chunk := await stream.receive_some():
            data += chunk
    return bytes(data)


async def exchange(
    stream: trio.SocketStream,
    rng: random.Random,
    data: bytes,
    *,
    then_eof: bool,
) -> bytes | None:
    """Send ``data`` in random-sized chunks while reading; return what came back.

    With ``then_eof`` it half-closes and reads until the server closes;
    otherwise it reads until as many bytes came back as were sent. None if
    the server closed the connection before that.
    """
    received = bytearray()

    async def send() -> None:
        view = memoryview(data)
        with contextlib.suppress(trio.BrokenResourceError):
            while view:
                size = random_chunk_size(rng)
                await stream.send_all(view[:size])
                view = view[size:]
            if then_eof:
                await stream.send_eof()

    async def receive() -> None:
        with contextlib.suppress(trio.BrokenResourceError):
            while then_eof or len(received) < len(data):
                chunk = await stream.receive_some()
                if not chunk:
                    return
                received.extend(chunk)

    async with trio.open_nursery() as nursery:
        nursery.start_soon(send)
        nursery.start_soon(receive)
    if not then_eof and len(received) < len(data):
        return None
    return bytes(received)


async def echo_client(port: int, rng: random.Random, tally: Tally) -> None:
    """A few batches of random lines on one connection, each one checked."""
    async with await open_stream(port) as stream:
        for _ in range(rng.randint(1, 20)):
            data = random_lines(rng, rng.randint(1, 256 * 1024))
            echoed = await exchange(stream, rng, data, then_eof=False)
            if echoed is None:
                tally.add("echo_cut_short")
                return
            if hashlib.sha256(echoed).digest() != hashlib.sha256(data).digest():
                tally.add("corrupt")
                return
            tally.add("echo_lines", data.count(b"\n"))
            tally.add("bytes_verified", len(data))
        if rng.random() < 0.5:
            # Half-close: the server sees the end and closes too.
            await stream.send_eof()
            if await read_to_eof(stream):
                tally.add("corrupt")
                return
        tally.add("echo_connections")


async def slow_client(port: int, rng: random.Random, tally: Tally) -> None:
    """Trickles a line a byte at a time: the idle timeout must cut it off."""
    async with await open_stream(port) as stream:
        start = trio.current_time()

        async def trickle() -> None:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(b"x")
                    await trio.sleep(0.5)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(trickle)
            with trio.move_on_after(IDLE_TIMEOUT + CUT_OFF_MARGIN) as waiting:
                if await read_to_eof(stream):
                    tally.add("corrupt")  # nothing was a whole line
            nursery.cancel_scope.cancel()
        if waiting.cancelled_caught:
            tally.add("slow_not_cut")
        else:
            tally.add("slow_cut")
            tally.slow_cut_after.append(trio.current_time() - start)


async def stuck_client(port: int, rng: random.Random, tally: Tally) -> None:
    """Sends lines but never reads: the server's writes block, then time out."""
    sock = trio.socket.socket()
    # A small receive buffer, so the server's writes block sooner.
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    async with trio.SocketStream(sock) as stream:
        await sock.connect((HOST, port))
        start = trio.current_time()
        line = b"s" * 8191 + b"\n"
        with trio.move_on_after(STALL_TIMEOUT + CUT_OFF_MARGIN) as waiting:
            with contextlib.suppress(trio.BrokenResourceError):
                while True:
                    await stream.send_all(line)
        if waiting.cancelled_caught:
            tally.add("stuck_not_cut")
        else:
            tally.add("stuck_cut")
            tally.stuck_cut_after.append(trio.current_time() - start)


async def abrupt_client(port: int, rng: random.Random, tally: Tally) -> None:
    """Resets the connection at once, mid-request, or mid-reply."""
    mode = rng.choice(["at_once", "mid_request", "mid_response"])
    stream = await open_stream(port)
    try:
        if mode == "mid_request":
            await stream.send_all(b"half a li")
            await trio.sleep(0.01)
        elif mode == "mid_response":
            # Reads while it sends, as a client should; resets once the
            # server is well into its reply.
            async def send() -> None:
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all((b"r" * 65535 + b"\n") * 32)

            async with trio.open_nursery() as nursery:
                nursery.start_soon(send)
                received = 0
                while received < 256 * 1024:
                    chunk = await stream.receive_some()
                    if not chunk:
                        break
                    received += len(chunk)
                nursery.cancel_scope.cancel()
    finally:
        await reset(stream)
    tally.add(f"reset_{mode}")
    # A pause, so that resets do not crowd out the rest of the mix.
    await trio.sleep(rng.uniform(0, 0.02))


async def hostile_client(port: int, rng: random.Random, tally: Tally) -> None:
    """Oversized input must be refused; odd but valid input echoed exactly."""
    mode = rng.choice(["oversized", "body", "garbage", "empty_lines", "nul_line"])
    if mode == "oversized":
        data, refused = b"o" * 2**20 + b"\n", True
    elif mode == "body":
        data, refused = b"b" * (8 * 2**20), True
    elif mode == "garbage":
        # Random bytes: the newlines chance puts in them make the lines.
        data, refused = rng.randbytes(64 * 1024), False
    elif mode == "empty_lines":
        data, refused = b"\n" * 10_000, False
    else:
        data, refused = b"\0" * (MAX_LINE_LENGTH - 1) + b"\n", False
    async with await open_stream(port) as stream:
        echoed = await exchange(stream, rng, data, then_eof=True)
    if refused:
        tally.add("hostile_echoed" if echoed else "hostile_refused")
    elif echoed != data:
        tally.add("corrupt")
    else:
        tally.add("hostile_echoed_ok")
        tally.add("bytes_verified", len(data))


async def keep_running(
    client: Callable[[int, random.Random, Tally], Awaitable[None]],
    port: int,
    rng: random.Random,
    tally: Tally,
    stop_at: float,
    interruptible: bool,
) -> None:
    """Run ``client`` again and again until ``stop_at``.

    An interruptible client (slow, stuck: nothing to check half-way) is
    cancelled at ``stop_at``; the others finish what they started.
    """
    with trio.CancelScope(deadline=stop_at if interruptible else float("inf")):
        while trio.current_time() < stop_at:
            try:
                await client(port, rng, tally)
            except (OSError, trio.BrokenResourceError) as exc:
                # Connecting failed, say; count it, but go on.
                tally.add(f"client_error_{type(exc).__name__}")


async def drive(port: int, args: argparse.Namespace, tally: Tally) -> None:
    stop_at = trio.current_time() + args.duration
    kinds = [
        (echo_client, args.echo, False),
        (slow_client, args.slow, True),
        (stuck_client, args.stuck, True),
        (abrupt_client, args.abrupt, False),
        (hostile_client, args.hostile, False),
    ]
    clients = [
        (client, interruptible)
        for client, count, interruptible in kinds
        for _ in range(count)
    ]
    async with trio.open_nursery() as nursery:
        for number, (client, interruptible) in enumerate(clients):
            rng = random.Random(args.seed * 1_000_003 + number)
            nursery.start_soon(
                keep_running, client, port, rng, tally, stop_at, interruptible
            )


# -- the run -----------------------------------------------------------------------


def memory_kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise LookupError(field)


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def read_line(proc: subprocess.Popen[bytes], timeout: float) -> str:
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    data = b""
    deadline = time.monotonic() + timeout
    with selectors.DefaultSelector() as selector:
        selector.register(fd, selectors.EVENT_READ)
        while not data.endswith(b"\n"):
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not selector.select(remaining):
                raise TimeoutError("the server did not start")
            chunk = os.read(fd, 1)
            if not chunk:
                raise RuntimeError("the server exited before it served")
            data += chunk
    return data.decode().strip()


def warm_up(port: int) -> None:
    with socket.create_connection((HOST, port), timeout=STARTUP_TIMEOUT) as sock:
        sock.sendall(b"warm up\n")
        reply = b""
        while not reply.endswith(b"\n"):
            chunk = sock.recv(100)
            if not chunk:
                break
            reply += chunk
    if reply != b"warm up\n":
        raise RuntimeError(f"the server answered {reply!r}")


def wait_for_fds(pid: int, target: int, timeout: float) -> int:
    """Wait until the server holds ``target`` descriptors; return what it holds."""
    deadline = time.monotonic() + timeout
    while (count := open_fds(pid)) != target and time.monotonic() < deadline:
        time.sleep(0.1)
    return count


def mib(kib: int) -> str:
    return f"{kib / 1024:.1f}"


def soak(args: argparse.Namespace) -> int:
    argv = [sys.executable, "-W", "error::ResourceWarning", __file__, "--role=server"]
    with tempfile.TemporaryFile() as log:
        server = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=log
        )
        try:
            return run_against(server, log, args)
        finally:
            if server.poll() is None:
                server.kill()
            server.communicate()


def run_against(
    server: subprocess.Popen[bytes], log: Any, args: argparse.Namespace
) -> int:
    port = int(read_line(server, STARTUP_TIMEOUT).removeprefix("port "))
    # Idle, the server holds its listening socket and its own descriptors;
    # after each connection it must come back to that.
    fds_start = open_fds(server.pid)
    warm_up(port)
    wait_for_fds(server.pid, fds_start, QUIESCE_TIMEOUT)
    rss_start = memory_kib(server.pid, "VmRSS")

    tally = Tally()
    started = time.monotonic()
    trio.run(drive, port, args, tally)
    load_seconds = time.monotonic() - started

    # Every client has hung up; the server lets go of each connection as it
    # sees that.
    fds_end = wait_for_fds(server.pid, fds_start, QUIESCE_TIMEOUT)
    rss_end = memory_kib(server.pid, "VmRSS")
    rss_peak = memory_kib(server.pid, "VmHWM")

    stopping = time.monotonic()
    server.send_signal(signal.SIGTERM)
    try:
        stdout, _ = server.communicate(timeout=SHUTDOWN_TIMEOUT + EXIT_MARGIN)
    except subprocess.TimeoutExpired:
        stdout = b""
    shutdown_seconds = time.monotonic() - stopping
    line = stdout.decode().strip().rpartition("stats ")[2]
    result = json.loads(line) if line else {"stats": {}, "errors": {}}
    stats: dict[str, int] = result["stats"]
    errors: dict[str, int] = result["errors"]

    outcomes = [
        "completed",
        "timed_out",
        "disconnected",
        "failed",
        "rejected",
        "dropped",
        "cancelled",
    ]
    problems = []
    if server.returncode != 0:
        problems.append(f"server exit status {server.returncode}")
    if not result.get("graceful"):
        problems.append("shutdown not graceful")
    if stats and (
        stats["active"] != 0
        or stats["accepted"] != sum(stats[name] for name in outcomes)
    ):
        problems.append("requests unaccounted for")
    if unexpected := set(errors) - EXPECTED_ERRORS:
        problems.append(f"unexpected server errors {sorted(unexpected)}")
    if fds_end != fds_start:
        problems.append("server descriptors not freed")
    for name in CLIENT_ERRORS:
        if tally[name]:
            problems.append(f"{name} {tally[name]}")
    for name in sorted(tally.counts):
        if name.startswith("client_error_"):
            problems.append(f"{name} {tally[name]}")

    accepted = stats.get("accepted", 0)
    server_part = ", ".join(f"{name} {stats.get(name, 0)}" for name in outcomes)
    error_part = ", ".join(f"{kind} {count}" for kind, count in sorted(errors.items()))
    client_names = [
        "echo_lines",
        "corrupt",
        "echo_cut_short",
        "slow_cut",
        "slow_not_cut",
        "stuck_cut",
        "stuck_not_cut",
        "hostile_refused",
        "hostile_echoed_ok",
        "hostile_echoed",
    ]
    resets = sum(n for name, n in tally.counts.items() if name.startswith("reset_"))
    client_part = ", ".join(f"{name} {tally[name]}" for name in client_names)
    verified = tally["bytes_verified"]
    slowest_cut = max(tally.slow_cut_after + tally.stuck_cut_after, default=0.0)
    print(
        f"soak {'PASS' if not problems else 'FAIL'} {load_seconds:.1f} s"
        f" | server: requests {accepted} ({accepted / load_seconds:.0f}/s):"
        f" {server_part} | errors: {error_part or 'none'}"
        f" | clients: {client_part}, resets {resets}, slowest cut-off"
        f" {slowest_cut:.1f} s | verified {verified / 2**20:.1f} MiB"
        f" ({verified / 2**20 / load_seconds:.1f} MiB/s)"
        f" | server fds {fds_start}->{fds_end}, rss {mib(rss_start)}->"
        f"{mib(rss_end)} MiB (peak {mib(rss_peak)})"
        f" | shutdown {shutdown_seconds:.2f} s, exit {server.returncode}"
        + (f" | PROBLEMS: {'; '.join(problems)}" if problems else ""),
        flush=True,
    )
    if problems:
        log.seek(0)
        tail = log.read().decode(errors="replace").splitlines()[-40:]
        print("\n".join(["server log, last lines:", *tail]), file=sys.stderr)
        return 1
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Soak a trioserve server with mixed, hostile load.",
    )
    parser.add_argument("--duration", type=float, default=30.0, metavar="SECONDS")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--echo", type=int, default=24, help="echo clients")
    parser.add_argument("--slow", type=int, default=16, help="slowloris clients")
    parser.add_argument("--stuck", type=int, default=4, help="clients that never read")
    parser.add_argument("--abrupt", type=int, default=8, help="resetting clients")
    parser.add_argument("--hostile", type=int, default=4, help="hostile clients")
    parser.add_argument("--role", choices=["load", "server"], default="load")
    args = parser.parse_args()
    if args.role == "server":
        return serve()
    return soak(args)


if __name__ == "__main__":
    sys.exit(main())
