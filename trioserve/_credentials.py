"""Who is at the other end of a Unix socket: the peer's pid, uid and gid.

The kernel records them when the peer connects (``SO_PEERCRED``), so they
cannot be forged by what the peer sends: a Unix-socket service can
authorise by user without passwords, as PostgreSQL's ``peer`` method and
D-Bus do.
"""

from __future__ import annotations

import socket as stdlib_socket
import struct
import sys
from typing import Any, NamedTuple

from ._socketio import socket_under

# struct ucred: pid_t, uid_t and gid_t, 32 bits each on Linux.
_UCRED = struct.Struct("iII")


class PeerCredentials(NamedTuple):
    """The process at the other end of a Unix stream connection.

    As it was when it connected (``SO_PEERCRED``): a process that changed
    its user since, or passed the socket on, still shows these.
    """

    #: Its process id.
    pid: int
    #: Its effective user id.
    uid: int
    #: Its effective group id.
    gid: int


def peer_credentials(connection: Any) -> PeerCredentials | None:
    """The credentials of the peer of a Unix stream connection.

    Takes what a stream server hands out: a request (a
    :class:`trio.SocketStream`, as :meth:`~trioserve.BaseServer.verify_request`
    gets it), a :class:`trio.SSLStream` over one, or a socket (Trio's or the
    stdlib's). A handler has it as
    :attr:`~trioserve.StreamRequestHandler.peer_credentials`.

    Returns:
      ``PeerCredentials(pid, uid, gid)`` for a Unix stream socket; None for
      any other socket (TCP, datagram), which carries no credentials.

    Raises:
      NotImplementedError: a Unix stream socket on a system other than
        Linux, where ``SO_PEERCRED`` is not available.
      TypeError: ``connection`` is not a socket or a stream over one.
      OSError: the socket is closed.
    """
    sock = socket_under(connection)
    if sock is None:
        raise TypeError(
            f"peer_credentials needs a socket or a stream over one, not {connection!r}"
        )
    if sock.family != stdlib_socket.AF_UNIX or sock.type != stdlib_socket.SOCK_STREAM:
        return None
    if not sys.platform.startswith("linux"):
        raise NotImplementedError(
            "peer_credentials needs SO_PEERCRED, which only Linux has"
        )
    raw = sock.getsockopt(
        stdlib_socket.SOL_SOCKET, stdlib_socket.SO_PEERCRED, _UCRED.size
    )
    return PeerCredentials(*_UCRED.unpack(raw))
