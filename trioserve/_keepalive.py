"""TCP keepalive on accepted connections: the setting, checked, and applied.

A connection whose peer vanished (a host powered off, a NAT that forgot the
flow) stays open for ever on a server that only reads: nothing arrives, and
nothing fails. TCP keepalive makes the kernel probe an idle connection and
reset it when the probes go unanswered, so the handler's read fails and its
request ends. The kernel's defaults (two hours idle, on Linux) are far too
slow for most services, hence a per-server setting.
"""

from __future__ import annotations

import math
import socket as stdlib_socket
from typing import Any, Final

import trio

#: ``(idle, interval, count)``, as a server holds it once checked.
TCPKeepalive = tuple[int, int, int]

#: What ``parse_tcp_keepalive`` fills in for a part left out: probe every
#: 10 seconds and give up after 6 unanswered probes, so a peer that vanished
#: is found a minute after the connection went idle.
DEFAULT_KEEPALIVE_INTERVAL: Final = 10
DEFAULT_KEEPALIVE_COUNT: Final = 6

# The largest values Linux takes (MAX_TCP_KEEPIDLE, MAX_TCP_KEEPINTVL and
# MAX_TCP_KEEPCNT in include/net/tcp.h). Checked when the server is made:
# past them every setsockopt on an accepted socket would fail instead.
MAX_KEEPALIVE_SECONDS: Final = 32767
MAX_KEEPALIVE_COUNT: Final = 127

# The option for the idle time: TCP_KEEPIDLE, or TCP_KEEPALIVE on macOS,
# which has the other two under their Linux names.
_IDLE_OPTION: Final[int | None] = getattr(
    stdlib_socket, "TCP_KEEPIDLE", getattr(stdlib_socket, "TCP_KEEPALIVE", None)
)
_INTERVAL_OPTION: Final[int | None] = getattr(stdlib_socket, "TCP_KEEPINTVL", None)
_COUNT_OPTION: Final[int | None] = getattr(stdlib_socket, "TCP_KEEPCNT", None)


def check_tcp_keepalive(value: Any) -> TCPKeepalive | None:
    """``value`` as a server holds it: None, or ``(idle, interval, count)``.

    ``idle`` and ``interval`` are seconds, any positive number, rounded up to
    whole seconds (the kernel counts in them); ``count`` is a positive
    integer.

    Raises:
      ValueError: ``value`` is not None or such a triple, or is beyond what
        the kernel takes, or this platform cannot set all three.
    """
    if value is None:
        return None
    if isinstance(value, (str, bytes)) or not _is_triple(value):
        raise ValueError(
            f"tcp_keepalive must be (idle, interval, count) or None, not {value!r}"
        )
    idle, interval, count = value
    for name, seconds in (("idle", idle), ("interval", interval)):
        if (
            isinstance(seconds, bool)
            or not isinstance(seconds, (int, float))
            or not 0 < seconds <= MAX_KEEPALIVE_SECONDS
        ):
            raise ValueError(
                f"tcp_keepalive's {name} must be a number of seconds above 0, "
                f"at most {MAX_KEEPALIVE_SECONDS}, not {seconds!r}"
            )
    if (
        isinstance(count, bool)
        or not isinstance(count, int)
        or not 0 < count <= MAX_KEEPALIVE_COUNT
    ):
        raise ValueError(
            f"tcp_keepalive's count must be an integer from 1 to "
            f"{MAX_KEEPALIVE_COUNT}, not {count!r}"
        )
    if None in (_IDLE_OPTION, _INTERVAL_OPTION, _COUNT_OPTION):
        raise ValueError("tcp_keepalive: this platform cannot set TCP keepalive times")
    return math.ceil(idle), math.ceil(interval), count


def _is_triple(value: Any) -> bool:
    try:
        return len(value) == 3
    except TypeError:
        return False


def parse_tcp_keepalive(text: str) -> TCPKeepalive:
    """``IDLE[,INTERVAL,COUNT]`` (as ``--tcp-keepalive`` takes it), checked.

    ``"60"`` is ``(60, 10, 6)``: a part left out is
    ``DEFAULT_KEEPALIVE_INTERVAL`` seconds between probes, and
    ``DEFAULT_KEEPALIVE_COUNT`` probes. ``"60,5,3"`` gives all three;
    seconds may have a fraction, rounded up. Spaces around parts are
    allowed.

    Raises:
      ValueError: anything else, with a message fit for a command line.
    """
    parts = [part.strip() for part in text.split(",")]
    if len(parts) not in (1, 3):
        raise ValueError(
            f"tcp keepalive must be IDLE or IDLE,INTERVAL,COUNT, not {text!r}"
        )
    if len(parts) == 1:
        parts += [str(DEFAULT_KEEPALIVE_INTERVAL), str(DEFAULT_KEEPALIVE_COUNT)]
    try:
        idle, interval, count = float(parts[0]), float(parts[1]), int(parts[2])
    except ValueError:
        raise ValueError(
            f"tcp keepalive must be IDLE[,INTERVAL,COUNT] in seconds, seconds and "
            f"a count, not {text!r}"
        ) from None
    checked = check_tcp_keepalive((idle, interval, count))
    assert checked is not None
    return checked


def set_tcp_keepalive(sock: trio.socket.SocketType, keepalive: TCPKeepalive) -> None:
    """Turn keepalive on for the TCP connection ``sock``, with these times."""
    idle, interval, count = keepalive
    assert _IDLE_OPTION is not None  # check_tcp_keepalive made sure
    assert _INTERVAL_OPTION is not None
    assert _COUNT_OPTION is not None
    sock.setsockopt(stdlib_socket.SOL_SOCKET, stdlib_socket.SO_KEEPALIVE, 1)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, _IDLE_OPTION, idle)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, _INTERVAL_OPTION, interval)
    sock.setsockopt(stdlib_socket.IPPROTO_TCP, _COUNT_OPTION, count)
