"""systemd's notify protocol: telling the service manager how the service is.

A service of ``Type=notify`` is started with ``NOTIFY_SOCKET`` naming a Unix
datagram socket; the service sends it lines such as ``READY=1`` (done
starting) and ``STOPPING=1`` (shutting down), and a free-form ``STATUS=`` that
``systemctl status`` shows. With ``WatchdogSec=``, systemd also sets
``WATCHDOG_USEC`` and expects ``WATCHDOG=1`` more often than that, or kills
the service. The protocol is one datagram per message, so this needs no
library: see sd_notify(3).

Without ``NOTIFY_SOCKET`` every method here returns at once, having done
nothing.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable, Iterable, Iterator, Mapping

import attrs
import trio

from ._stats import ServerStats

LOGGER = logging.getLogger("trioserve")

#: The variables through which systemd talks to the service's main process.
#: Worker processes drop them: systemd knows the supervisor alone, so a
#: worker must not claim the service ready (nor its own code speak for it).
ENVIRONMENT = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")

# Without a watchdog, how often STATUS= is brought up to date (with one, at
# every ping). Status is for a person reading `systemctl status`: every few
# seconds is fresh enough, and costs the loop nothing it would notice.
STATUS_INTERVAL = 5.0


def forget_environment() -> None:
    """Remove systemd's notify variables from this process's environment."""
    for name in ENVIRONMENT:
        os.environ.pop(name, None)


def describe_counters(stats: Iterable[ServerStats]) -> str:
    """The servers' counters summed, for a status line.

    ``accepted``, ``active`` and ``completed`` always; the rest when not zero.
    """
    totals = dict.fromkeys(attrs.fields_dict(ServerStats), 0)
    for one in stats:
        for name, value in attrs.asdict(one).items():
            totals[name] += value
    always = ("accepted", "active", "completed")
    return ", ".join(
        f"{value} {name.replace('_', ' ')}"
        for name, value in totals.items()
        if value or name in always
    )


def _address(value: str) -> str | None:
    """Where NOTIFY_SOCKET points: a path, or ``@name`` for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    return None


def _watchdog_interval(environ: Mapping[str, str]) -> float | None:
    """Seconds between watchdog pings (half systemd's timeout), or None."""
    usec = environ.get("WATCHDOG_USEC")
    if usec is None:
        return None
    pid = environ.get("WATCHDOG_PID")
    if pid is not None and pid != str(os.getpid()):
        return None  # the watchdog is some other process's business
    try:
        interval = int(usec) / 2_000_000
    except ValueError:
        interval = 0
    if interval <= 0:
        LOGGER.warning("ignoring WATCHDOG_USEC=%r: not a positive integer", usec)
        return None
    return interval


@attrs.define(eq=False)
class Notifier:
    """Tells systemd, through ``NOTIFY_SOCKET``, what the service is doing.

    Made with :meth:`from_environment`. ``details`` gives the rest of the
    status line after the state ("serving; " ...), such as the counters.
    """

    #: The socket address to send to; None when not run by systemd.
    address: str | None
    #: Seconds between ``WATCHDOG=1`` pings; None without a watchdog.
    watchdog_interval: float | None
    details: Callable[[], str]
    state: str = "starting"
    _warned: bool = False
    _last_status: str | None = None

    @classmethod
    def from_environment(
        cls, details: Callable[[], str], environ: Mapping[str, str] = os.environ
    ) -> Notifier:
        value = environ.get("NOTIFY_SOCKET")
        if not value:
            return cls(None, None, details)
        address = _address(value)
        if address is None:
            LOGGER.warning(
                "ignoring NOTIFY_SOCKET=%r: neither an absolute path nor @name",
                value,
            )
            return cls(None, None, details)
        return cls(address, _watchdog_interval(environ), details)

    def ready(self) -> None:
        """Every listener serves: ``READY=1``."""
        self.state = "serving"
        self._send("READY=1")

    def stopping(self) -> None:
        """The shutdown has started: ``STOPPING=1``."""
        self.state = "stopping"
        self._send("STOPPING=1")

    def stopped(self) -> None:
        """Everything has stopped: the last status, with the final counters."""
        self.state = "stopped"
        self._send()

    @contextlib.contextmanager
    def reloading(self) -> Iterator[None]:
        """Around a reload: ``RELOADING=1`` on entry, ``READY=1`` on exit.

        ``Type=notify-reload`` services must send both. The exit sends
        ``READY=1`` also when the reload failed, as the service goes on
        serving as it was.
        """
        self.state = "reloading"
        monotonic_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec}")
        try:
            yield
        finally:
            self.ready()

    async def keep_alive(self) -> None:
        """Ping the watchdog and keep the status line current, until cancelled.

        Runs as a task of the event loop it vouches for: a loop that hangs
        stops the pings, and systemd restarts the service.
        """
        if self.address is None:
            return
        interval = self.watchdog_interval or STATUS_INTERVAL
        while True:
            await trio.sleep(interval)
            if self.watchdog_interval is not None:
                self._send("WATCHDOG=1")
            else:
                self._send()

    def _send(self, *assignments: str) -> None:
        """Send ``assignments`` and the status line, if it changed, in one datagram."""
        if self.address is None:
            return
        status = f"{self.state}; {self.details()}"
        if status != self._last_status:
            assignments = (*assignments, f"STATUS={status}")
        if not assignments:
            return
        message = "\n".join(assignments).encode()
        try:
            # A socket per message, as sd_notify does: nothing to keep open.
            # Non-blocking: a stuck systemd must not stall the event loop.
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
                sock.setblocking(False)
                sock.sendto(message, self.address)
        except OSError as exc:
            if not self._warned:
                self._warned = True
                LOGGER.warning(
                    "cannot notify systemd at NOTIFY_SOCKET (%s); "
                    "not logging this again: %s",
                    self.address.replace("\0", "@"),
                    exc,
                )
            return
        self._last_status = status
