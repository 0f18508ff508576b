"""Counters a user can read while the server runs."""

from __future__ import annotations

from bisect import bisect_left
from typing import ClassVar, Final

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


#: The upper bounds, in seconds, of :class:`RequestDurations`' buckets: from
#: a quick datagram (a millisecond) to a long-lived connection (a minute).
DURATION_BUCKETS: Final = (
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)


class RequestDurations:
    """How long requests took: a histogram; read it as ``server.request_durations``.

    A request's duration runs from the start of its run (before a TLS
    handshake or a PROXY header) to the end of its handler, whatever ended
    it; for a stream handler that is the whole connection. Closing the
    connection afterwards is not counted. Requests that never ran (those
    ``verify_request`` or ``max_connections_per_peer`` refused) are not
    counted either. Durations are real time (:func:`time.perf_counter`),
    not Trio's clock.
    """

    __slots__ = ("counts", "sum")

    #: The upper bound of each bucket but the last, in seconds.
    bounds: ClassVar[tuple[float, ...]] = DURATION_BUCKETS

    def __init__(self) -> None:
        #: How many requests fell in each bucket (not cumulative): in
        #: ``counts[i]`` those that took more than ``bounds[i - 1]`` and at
        #: most ``bounds[i]`` seconds; in the last, those that took longer
        #: than every bound.
        self.counts = [0] * (len(self.bounds) + 1)
        #: The seconds all requests took together.
        self.sum = 0.0

    def observe(self, seconds: float) -> None:
        """Count a request that took ``seconds``."""
        # bisect_left: a bound is the bucket's inclusive upper end.
        self.counts[bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        """How many requests were counted."""
        return sum(self.counts)
