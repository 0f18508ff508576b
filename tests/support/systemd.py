"""systemd's side of the notify protocol: the socket ``NOTIFY_SOCKET`` names.

:class:`FakeSystemd` binds a real Unix datagram socket, at a path or in the
abstract namespace (``@name``), and asks the kernel for each sender's
credentials (``SO_PASSCRED``), so a test can tell which process sent a
message, as systemd does.
"""

from __future__ import annotations

import os
import select
import socket
import struct

import trio

from support.cli import IO_TIMEOUT

CREDENTIALS = struct.Struct("3i")  # struct ucred: pid, uid, gid


class FakeSystemd:
    """The receiving end of ``NOTIFY_SOCKET``: a path, or ``@name``."""

    def __init__(self, notify_socket: str) -> None:
        self.notify_socket = notify_socket
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
        self.sock.setblocking(False)
        self.sock.bind(notify_socket.replace("@", "\0", 1))

    def close(self) -> None:
        self.sock.close()

    def environment(self, **more: str) -> dict[str, str]:
        """This process's environment, as systemd would give a service."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_")}
        return {**env, "NOTIFY_SOCKET": self.notify_socket, **more}

    def _read(self) -> tuple[dict[str, str], int]:
        data, ancillary, _, _ = self.sock.recvmsg(
            4096, socket.CMSG_SPACE(CREDENTIALS.size)
        )
        pid = 0
        for level, kind, value in ancillary:
            if level == socket.SOL_SOCKET and kind == socket.SCM_CREDENTIALS:
                pid = CREDENTIALS.unpack(value[: CREDENTIALS.size])[0]
        assert pid, "no sender credentials"
        fields = dict(line.split("=", 1) for line in data.decode().split("\n"))
        return fields, pid

    async def receive(self) -> dict[str, str]:
        """The next message's fields, in Trio."""
        await trio.lowlevel.wait_readable(self.sock)
        return self._read()[0]

    def receive_blocking(
        self, timeout: float = IO_TIMEOUT
    ) -> tuple[dict[str, str], int]:
        """The next message's fields and its sender's pid, within ``timeout``."""
        readable, _, _ = select.select([self.sock], [], [], timeout)
        assert readable, f"no notification within {timeout} s"
        return self._read()

    def pending(self) -> bool:
        return bool(select.select([self.sock], [], [], 0)[0])
