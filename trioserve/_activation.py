"""Sockets handed to this process by systemd (socket activation)."""

from __future__ import annotations

import os
import socket

# systemd passes the first socket as fd 3, after stdin, stdout and stderr.
SD_LISTEN_FDS_START = 3

_ENVIRONMENT = ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES")


def systemd_sockets(
    *, unset_environment: bool = True
) -> list[tuple[str, socket.socket]]:
    """The sockets systemd passed to this process, each with its name.

    Reads ``LISTEN_PID``, ``LISTEN_FDS`` and ``LISTEN_FDNAMES`` the way
    ``sd_listen_fds_with_names(3)`` does: the sockets are file descriptors
    3, 4, ..., named by the unit's ``FileDescriptorName=`` (``"unknown"``
    when unnamed). Returns an empty list when this process was not
    socket-activated, including when ``LISTEN_PID`` names another process
    (the variables were inherited from a parent they were meant for).

    Build servers on them with :meth:`TCPServer.from_socket` and kin.

    Args:
      unset_environment: Remove the variables afterwards, so that child
        processes do not take the sockets for theirs.
    """
    try:
        if os.environ.get("LISTEN_PID") != str(os.getpid()):
            return []
        count = int(os.environ.get("LISTEN_FDS", "0"))
        names = os.environ.get("LISTEN_FDNAMES", "").split(":")
        sockets = []
        for index in range(count):
            fd = SD_LISTEN_FDS_START + index
            # As sd_listen_fds() does: they are ours now, not our children's.
            os.set_inheritable(fd, False)
            name = names[index] if index < len(names) and names[index] else "unknown"
            sockets.append((name, socket.socket(fileno=fd)))
        return sockets
    finally:
        if unset_environment:
            for variable in _ENVIRONMENT:
                os.environ.pop(variable, None)
