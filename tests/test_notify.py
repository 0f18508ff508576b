"""systemd notify: READY, STOPPING, STATUS, RELOADING and watchdog pings.

A real Unix datagram socket (:class:`support.systemd.FakeSystemd`) stands in
for systemd's notify socket, and tells which process sent each message.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio
import trio.testing
from support.cli import assert_clean, run_echo, tcp_echo
from support.servers import Echo
from support.systemd import FakeSystemd

import trioserve
from trioserve._notify import Notifier

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_PASSCRED"), reason="the tests expect Linux"
)


@pytest.fixture(params=["path", "abstract"])
def systemd(request: pytest.FixtureRequest, short_tmp: Path) -> Iterator[FakeSystemd]:
    if request.param == "path":
        name = str(short_tmp / "notify")
    else:
        name = f"@trioserve-test-{os.getpid()}-{id(request)}"
    fake = FakeSystemd(name)
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def path_systemd(short_tmp: Path) -> Iterator[FakeSystemd]:
    fake = FakeSystemd(str(short_tmp / "notify"))
    try:
        yield fake
    finally:
        fake.close()


@pytest.fixture
def notify_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    """A clean slate: none of systemd's variables, whatever runs the tests."""
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


async def echo_once(address: tuple[str, int]) -> None:
    stream = await trio.open_tcp_stream(*address)
    async with stream:
        await stream.send_all(b"hello\n")
        assert await stream.receive_some() == b"hello\n"


async def test_ready_once_listening_then_stopping(
    systemd: FakeSystemd, notify_env: pytest.MonkeyPatch
) -> None:
    notify_env.setenv("NOTIFY_SOCKET", systemd.notify_socket)
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trioserve.serve_until_signalled, [server])
            ready = await systemd.receive()
            assert ready == {
                "READY": "1",
                "STATUS": "serving; 0 accepted, 0 active, 0 completed",
            }
            # READY means serving: a client gets its answer.
            await echo_once(server.server_address)
            os.kill(os.getpid(), signal.SIGTERM)
            stopping = await systemd.receive()
            assert stopping["STOPPING"] == "1"
            assert stopping["STATUS"].startswith("stopping; 1 accepted")
        # Gone: the last word is the final count.
        assert await systemd.receive() == {
            "STATUS": "stopped; 1 accepted, 0 active, 1 completed"
        }
        assert not systemd.pending()


async def test_watchdog_pings_at_half_the_interval(
    autojump_clock: trio.testing.MockClock,
    path_systemd: FakeSystemd,
    notify_env: pytest.MonkeyPatch,
) -> None:
    notify_env.setenv("NOTIFY_SOCKET", path_systemd.notify_socket)
    notify_env.setenv("WATCHDOG_USEC", "200000")
    notify_env.setenv("WATCHDOG_PID", str(os.getpid()))
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trioserve.serve_until_signalled, [server])
            assert "READY" in await path_systemd.receive()
            start = trio.current_time()
            for n in range(1, 6):
                assert (await path_systemd.receive())["WATCHDOG"] == "1"
                assert trio.current_time() - start == pytest.approx(0.1 * n)
            # A status that changed rides along with the next ping.
            await echo_once(server.server_address)
            ping = await path_systemd.receive()
            assert ping["WATCHDOG"] == "1"
            assert ping["STATUS"] == "serving; 1 accepted, 0 active, 1 completed"
            nursery.cancel_scope.cancel()


async def test_no_watchdog_for_another_pid(
    autojump_clock: trio.testing.MockClock,
    path_systemd: FakeSystemd,
    notify_env: pytest.MonkeyPatch,
) -> None:
    notify_env.setenv("NOTIFY_SOCKET", path_systemd.notify_socket)
    notify_env.setenv("WATCHDOG_USEC", "200000")
    notify_env.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    with trio.fail_after(60):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trioserve.serve_until_signalled, [server])
            assert "READY" in await path_systemd.receive()
            await trio.sleep(30)
            # Nothing changed, and the watchdog is not ours: not a word.
            assert not path_systemd.pending()
            nursery.cancel_scope.cancel()


async def test_a_notify_socket_gone_is_logged_once_and_harms_nothing(
    autojump_clock: trio.testing.MockClock,
    short_tmp: Path,
    notify_env: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    notify_env.setenv("NOTIFY_SOCKET", str(short_tmp / "nobody-here"))
    notify_env.setenv("WATCHDOG_USEC", "20000")
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo)
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            await nursery.start(trioserve.serve_until_signalled, [server])
            await echo_once(server.server_address)
            # A hundred watchdog pings fail meanwhile.
            await trio.sleep(1)
            os.kill(os.getpid(), signal.SIGTERM)
    warnings = [r for r in caplog.records if "NOTIFY_SOCKET" in r.getMessage()]
    assert len(warnings) == 1, caplog.text
    assert warnings[0].levelno == logging.WARNING
    assert "nobody-here" in warnings[0].getMessage()


def test_a_bad_notify_socket_is_refused_with_a_warning(
    notify_env: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    notifier = Notifier.from_environment(
        lambda: "", {"NOTIFY_SOCKET": "relative/path", "WATCHDOG_USEC": "5"}
    )
    assert notifier.address is None
    assert "relative/path" in caplog.text
    notifier = Notifier.from_environment(
        lambda: "", {"NOTIFY_SOCKET": "/run/x", "WATCHDOG_USEC": "soon"}
    )
    assert notifier.watchdog_interval is None
    assert "WATCHDOG_USEC='soon'" in caplog.text


async def test_reloading_then_ready(path_systemd: FakeSystemd) -> None:
    notifier = Notifier.from_environment(
        lambda: "2 workers", {"NOTIFY_SOCKET": path_systemd.notify_socket}
    )
    with trio.fail_after(10):
        reloading: dict[str, str] = {}

        async def reload_that_fails() -> None:
            with notifier.reloading():
                reloading.update(await path_systemd.receive())
                raise RuntimeError("the new configuration is broken")

        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        with pytest.raises(RuntimeError):
            await reload_that_fails()
        after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        assert reloading["RELOADING"] == "1"
        assert before <= int(reloading["MONOTONIC_USEC"]) <= after
        assert reloading["STATUS"] == "reloading; 2 workers"
        # Failed or not, the service serves on: systemd must hear READY=1.
        assert await path_systemd.receive() == {
            "READY": "1",
            "STATUS": "serving; 2 workers",
        }


def test_command_line_is_ready_then_stopping(path_systemd: FakeSystemd) -> None:
    env = path_systemd.environment()
    with run_echo("--tcp", "127.0.0.1:0", env=env) as cli:
        ((_, host, port),) = cli.listeners(1)
        ready, pid = path_systemd.receive_blocking()
        assert pid == cli.proc.pid
        assert ready["READY"] == "1"
        tcp_echo(host, port, b"hello\n")
        cli.proc.send_signal(signal.SIGTERM)
        stopping, _ = path_systemd.receive_blocking()
        rc, _, stderr = cli.finish()
    assert rc == 0, stderr
    assert_clean(stderr)
    assert stopping["STOPPING"] == "1"
    assert stopping["STATUS"].startswith("stopping; 1 accepted")


def test_workers_only_the_supervisor_notifies(path_systemd: FakeSystemd) -> None:
    env = path_systemd.environment()
    with run_echo("--tcp", "127.0.0.1:0", "--workers", "2", env=env) as cli:
        ((_, host, port),) = cli.listeners(1)
        ready, pid = path_systemd.receive_blocking()
        assert ready == {"READY": "1", "STATUS": "serving; 2 workers"}
        assert pid == cli.proc.pid
        for _ in range(10):
            tcp_echo(host, port, b"hello\n")
        cli.proc.send_signal(signal.SIGTERM)
        rc, _, stderr = cli.finish()
    assert rc == 0, stderr
    assert_clean(stderr)
    messages = []
    while path_systemd.pending():
        messages.append(path_systemd.receive_blocking())
    assert messages[0] == ({"STOPPING": "1", "STATUS": "stopping; 2 workers"}, pid)
    # The workers served, and said nothing: they do not speak for the service.
    assert {sender for _, sender in messages} == {pid}
    assert not any("READY" in fields for fields, _ in messages)


def test_a_reload_of_the_workers_is_reloading_then_ready(
    path_systemd: FakeSystemd,
) -> None:
    # Type=notify-reload: SIGHUP gets RELOADING=1 (with the monotonic time)
    # at once, and READY=1 once the new workers serve.
    env = path_systemd.environment()
    with run_echo("--tcp", "127.0.0.1:0", "--workers", "2", env=env) as cli:
        ((_, host, port),) = cli.listeners(1)
        ready, pid = path_systemd.receive_blocking()
        assert ready["READY"] == "1"
        before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        cli.proc.send_signal(signal.SIGHUP)
        reloading, _ = path_systemd.receive_blocking()
        assert reloading["RELOADING"] == "1"
        assert int(reloading["MONOTONIC_USEC"]) >= before
        ready, sender = path_systemd.receive_blocking()
        assert ready["READY"] == "1"
        assert sender == pid
        cli.stderr.wait_for("reloaded: 2 new workers serve")
        tcp_echo(host, port, b"after the reload\n")
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
