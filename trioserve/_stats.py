"""Counters a user can read while the server runs."""

from __future__ import annotations

import attrs


@attrs.define
class ServerStats:
    """What a server has done so far; read it at any time as ``server.stats``.

    Every accepted request ends in exactly one of ``rejected``, ``dropped``,
    ``completed``, ``failed``, ``timed_out``, ``disconnected`` or
    ``cancelled``, or is still ``active``: ``accepted`` is their sum.

    The counters accumulate over the server's life, across restarts of
    ``serve_forever``.
    """

    #: Requests taken from the listening socket (connections or datagrams).
    accepted: int = 0
    #: Requests being handled right now.
    active: int = 0
    #: Of the ``active`` requests, the stream connections idle right now:
    #: their handler waits in ``rfile`` for the first byte of a new message.
    #: ``active - idle`` is the requests really in flight.
    idle: int = 0
    #: Requests whose handler returned normally.
    completed: int = 0
    #: Requests whose handler (or ``verify_request``) raised an exception
    #: other than :exc:`TimeoutError` and :exc:`trio.BrokenResourceError`;
    #: ``handle_error`` saw each of them.
    failed: int = 0
    #: Requests refused by ``verify_request`` or by ``max_connections_per_peer``.
    rejected: int = 0
    #: Requests dropped before their handler ran, without troubling
    #: ``handle_error``: a TLS handshake that failed or timed out.
    dropped: int = 0
    #: Requests that ran out of time and raised :exc:`TimeoutError`: a read
    #: or write that made no progress for the handler's ``timeout``, a
    #: message not complete within ``idle_timeout``, or a request past its
    #: ``request_timeout``.
    timed_out: int = 0
    #: Requests ended by :exc:`trio.BrokenResourceError`: the peer reset the
    #: connection or vanished mid-request.
    disconnected: int = 0
    #: Requests cancelled before they finished: still running when the
    #: shutdown grace period ran out, or when the server was cancelled.
    cancelled: int = 0
    #: Input dropped before any request was made of it, such as a datagram
    #: longer than ``max_packet_size``. Not counted in ``accepted``.
    malformed: int = 0
    #: Times accepting a connection (or receiving a datagram) failed because
    #: the process or the system ran out of something: file descriptors
    #: (``EMFILE``, ``ENFILE``) or memory (``ENOMEM``, ``ENOBUFS``). The
    #: server pauses and tries again; a count that keeps growing means it
    #: needs a higher descriptor limit (``ulimit -n``) or fewer connections.
    #: Not counted in ``accepted``.
    accept_errors: int = 0
