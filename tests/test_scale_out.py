"""Two trioserve instances behind one HAProxy: one stops, and no client notices.

Two ``python -m trioserve echo`` processes (run as in ``test_cli.py``) serve
behind a real HAProxy that runs ``examples/deploy/haproxy-scale-out.cfg``
itself, with the addresses it takes from the environment set to free
loopback ports. Clients in Trio tasks keep sending lines through HAProxy:
short connections that carry one line each, and long-lived ones that carry
a line after another. Meanwhile the first instance gets SIGTERM. Every line
must come back intact, the stopped instance must exit 0 (at once: its
connections were idle), and the other must keep serving.

What a stopping instance does to each kind of client:

- A new connection HAProxy makes to it is refused (the instance closed its
  listening socket at once), and HAProxy retries it on the other instance,
  until its health checks take the stopped one out.
- A long-lived connection is let go, as idle connections are at shutdown: a
  line sent as it closes gets no reply, and the client sends it again on a
  new connection. That is the one resend allowed, once per long-lived client
  at most; a reply cut short, or a wrong one, is a failure.

The long-lived clients also show that both instances served: HAProxy
spreads them over the two, those on the stopped instance are let go and
those on the other never are; and the stopped instance's log counts them
among the connections it had open when SIGTERM came.
"""

from __future__ import annotations

import os
import re
import signal

import pytest
import trio
from support.cli import PROMPT_EXIT, Process, assert_clean, run_echo, running
from support.examples import EXAMPLES
from support.haproxy import HAPROXY, check_haproxy_config, wait_for_port
from support.servers import free_port

CONFIG = EXAMPLES / "deploy" / "haproxy-scale-out.cfg"
# The config's server names, in the order of their TRIOSERVE_BACKEND variables.
SERVER_NAMES = ("app1", "app2")

SHORT_CLIENTS = 8
LONG_CLIENTS = 4
# Between one client's requests: enough load to keep both instances busy,
# not so much that a slow machine falls behind.
PACING = 0.005
# Requests served before the stop, and then after HAProxy has taken the
# stopped instance out (the other one alone).
WARM_UP = 200
AFTERWARDS = 200
# While HAProxy still counts the stopped instance up (two failed health
# checks a second apart: at least a second), its connects are refused and
# retried elsewhere; this many requests at least must go through that way.
DURING_TAKE_OUT = 20
# Bounds a hang; a passing run takes about 3 s.
DEADLINE = 30.0


class Traffic:
    """Clients that send lines through HAProxy and check every echo."""

    def __init__(self, front: tuple[str, int]) -> None:
        self.front = front
        self.served = 0
        self.failures: list[str] = []
        # Per long-lived client: how often it was let go and sent a line again.
        self.resent = [0] * LONG_CLIENTS
        # What the test is at, for the failure messages; "done" ends the clients.
        self.phase = "before the stop"
        self._progress = trio.Condition()

    async def wait_for(self, served: int) -> None:
        """Wait until ``served`` requests have come back intact in all."""
        async with self._progress:
            while self.served < served:
                await self._progress.wait()

    async def _done(self, line: bytes, reply: bytes) -> None:
        if reply != line:
            self.failures.append(f"{self.phase}: sent {line!r}, got {reply!r}")
            return
        async with self._progress:
            self.served += 1
            self._progress.notify_all()

    async def connect(self) -> trio.SocketStream:
        return await trio.open_tcp_stream(*self.front)

    async def short_lived(self, client: int) -> None:
        """One connection per line: connect, send it, read the echo, close."""
        number = 0
        while self.phase != "done":
            line = f"short {client} {number}\n".encode()
            number += 1
            try:
                async with await self.connect() as stream:
                    reply = await round_trip(stream, line)
            except OSError as exc:
                self.failures.append(f"{self.phase}: {line!r}: no HAProxy: {exc!r}")
            else:
                await self._done(line, reply)
            await trio.sleep(PACING)

    async def long_lived(self, client: int, stream: trio.SocketStream) -> None:
        """One connection for line after line; another if the stop lets it go."""
        number = 0
        try:
            while self.phase != "done":
                line = f"long {client} {number}\n".encode()
                number += 1
                reply = await round_trip(stream, line)
                stopping = self.phase != "before the stop"
                if not reply and stopping and self.resent[client] == 0:
                    # Let go as idle, before this line reached the instance.
                    self.resent[client] += 1
                    await stream.aclose()
                    stream = await self.connect()
                    reply = await round_trip(stream, line)
                await self._done(line, reply)
                await trio.sleep(PACING)
        finally:
            await stream.aclose()


async def round_trip(stream: trio.SocketStream, line: bytes) -> bytes:
    """Send ``line``; return the reply, cut short if the connection ends first."""
    reply = b""
    try:
        await stream.send_all(line)
        while len(reply) < len(line):
            chunk = await stream.receive_some(len(line) - len(reply))
            if not chunk:
                break
            reply += chunk
    except trio.BrokenResourceError:
        pass  # Reset: what came so far is the reply.
    return reply


def connections_open(stderr: str) -> int:
    """The requests in flight and idle connections an instance logs at SIGTERM."""
    match = re.search(
        r"SIGTERM: shutting down; (\d+) requests? in flight and (\d+) idle", stderr
    )
    assert match, stderr
    return int(match[1]) + int(match[2])


@pytest.mark.skipif(
    HAPROXY is None, reason="haproxy is not installed (Debian: apt install haproxy)"
)
async def test_stopping_one_instance_behind_haproxy_fails_no_request() -> None:
    assert HAPROXY is not None
    options = ["--tcp", "127.0.0.1:0", "--proxy-protocol", "v2"]
    options += ["--trusted-proxy", "127.0.0.1", "--log-level", "debug"]
    with run_echo(*options) as first, run_echo(*options) as second:
        backends = []
        for cli in (first, second):
            [(_, host, port)] = await trio.to_thread.run_sync(cli.listeners, 1)
            backends.append(f"{host}:{port}")
        front = ("127.0.0.1", free_port())
        env = dict(
            os.environ,
            TRIOSERVE_FRONTEND=f"{front[0]}:{front[1]}",
            TRIOSERVE_BACKEND1=backends[0],
            TRIOSERVE_BACKEND2=backends[1],
        )
        await trio.to_thread.run_sync(check_haproxy_config, CONFIG, env)
        argv = [HAPROXY, "-db", "-f", str(CONFIG)]
        with running(Process, argv, env=env) as haproxy:
            await trio.to_thread.run_sync(wait_for_port, front[1], haproxy.proc)
            traffic = Traffic(front)
            with trio.fail_after(DEADLINE):
                async with trio.open_nursery() as nursery:
                    # One at a time, so that HAProxy (leastconn) spreads
                    # them over both instances.
                    for client in range(LONG_CLIENTS):
                        stream = await traffic.connect()
                        nursery.start_soon(traffic.long_lived, client, stream)
                    for client in range(SHORT_CLIENTS):
                        nursery.start_soon(traffic.short_lived, client)
                    await traffic.wait_for(WARM_UP)

                    traffic.phase = "stopping the first instance"
                    first.proc.send_signal(signal.SIGTERM)
                    rc = await trio.to_thread.run_sync(first.wait, PROMPT_EXIT)
                    exited_at = traffic.served
                    # Until its health checks fail, HAProxy still tries the
                    # stopped instance for new connections (leastconn: it
                    # has the fewest), is refused, and goes to the other.
                    down = f"Server trioserve/{SERVER_NAMES[0]} is DOWN"
                    await trio.to_thread.run_sync(haproxy.stderr.wait_for, down)
                    taken_out_at = traffic.served
                    traffic.phase = "first instance taken out"
                    await traffic.wait_for(taken_out_at + AFTERWARDS)
                    traffic.phase = "done"
            haproxy_log = "".join(haproxy.stderr.lines)
            assert second.proc.poll() is None, "the other instance stopped too"
            survivor_rc, _, survivor_stderr = second.stop(signal.SIGTERM)
        _, _, stopped_stderr = first.finish()

    assert not traffic.failures, (
        f"{len(traffic.failures)} of {traffic.served + len(traffic.failures)} "
        f"requests failed, first ones: {traffic.failures[:10]}\n"
        f"stopped instance's log:\n{stopped_stderr}"
    )
    assert rc == 0, stopped_stderr
    assert survivor_rc == 0, survivor_stderr
    assert_clean(stopped_stderr)
    assert_clean(survivor_stderr)
    # Both instances carried long-lived clients: those on the stopped one
    # were let go at the stop (once), those on the other never were.
    let_go = sum(1 for count in traffic.resent if count)
    assert 0 < let_go < LONG_CLIENTS, traffic.resent
    # The stopped instance says so too: each was open, busy or idle.
    assert connections_open(stopped_stderr) >= let_go, stopped_stderr
    assert taken_out_at - exited_at >= DURING_TAKE_OUT, (exited_at, taken_out_at)
    assert f"trioserve/{SERVER_NAMES[1]} is DOWN" not in haproxy_log, haproxy_log
