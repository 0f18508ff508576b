"""Prometheus metrics: the text exposition format, and a server that answers it.

The format (version 0.0.4) is a few lines of text per metric, so trioserve
writes it itself rather than depend on a client library. Every server is
one ``server`` label value: its kind and first address, as the start-up line
shows them.

With workers, each worker sends the supervisor a :class:`ServerSnapshot` per
server every :data:`SNAPSHOT_INTERVAL`, and the supervisor's
:class:`WorkerMetrics` renders the sum over workers under the usual names,
and each worker's own numbers under ``trioserve_worker_*`` names with a
``worker`` label. Keeping the two apart means ``sum(...)`` over a metric
never counts a request twice, and a dashboard made for one process works
unchanged for many.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Final

import attrs
import trio

from ._handlers import StreamRequestHandler
from ._names import format_address, listener_kind
from ._server import BaseServer
from ._socket_servers import TCPServer, UDPServer
from ._stats import DURATION_BUCKETS, RequestDurations

#: Every metric's name starts with this; per-worker ones with ``trioserve_worker_``.
PREFIX: Final = "trioserve_"
WORKER_PREFIX: Final = "trioserve_worker_"

#: Seconds between a worker's snapshots to the supervisor.
SNAPSHOT_INTERVAL: Final = 1.0

CONTENT_TYPE: Final = "text/plain; version=0.0.4; charset=utf-8"


@attrs.frozen
class _Metric:
    """How one :class:`ServerStats` field is exported."""

    field: str
    name: str
    type: str  # "counter" or "gauge"
    help: str


# One line per ServerStats field (a test checks that none is missing).
_STATS_METRICS: Final = (
    _Metric("accepted", "requests_accepted_total", "counter", "Requests accepted."),
    _Metric("active", "requests_active", "gauge", "Requests being handled now."),
    _Metric(
        "idle",
        "requests_idle",
        "gauge",
        "Of the active requests, stream connections idle between messages.",
    ),
    _Metric(
        "completed",
        "requests_completed_total",
        "counter",
        "Requests whose handler returned normally.",
    ),
    _Metric(
        "failed",
        "requests_failed_total",
        "counter",
        "Requests whose handler raised an unexpected exception.",
    ),
    _Metric(
        "rejected",
        "requests_rejected_total",
        "counter",
        "Requests refused by verify_request or max_connections_per_peer.",
    ),
    _Metric(
        "dropped",
        "requests_dropped_total",
        "counter",
        "Requests dropped before their handler ran (failed TLS handshakes).",
    ),
    _Metric(
        "timed_out",
        "requests_timed_out_total",
        "counter",
        "Requests that ran out of time.",
    ),
    _Metric(
        "disconnected",
        "requests_disconnected_total",
        "counter",
        "Requests ended by the peer resetting the connection.",
    ),
    _Metric(
        "cancelled",
        "requests_cancelled_total",
        "counter",
        "Requests cancelled before they finished.",
    ),
    _Metric(
        "malformed",
        "malformed_inputs_total",
        "counter",
        "Input dropped before a request was made of it.",
    ),
    _Metric(
        "accept_errors",
        "accept_errors_total",
        "counter",
        "Times accepting failed for lack of descriptors or memory.",
    ),
)
_OPEN_CONNECTIONS: Final = _Metric(
    "active",
    "connections_open",
    "gauge",
    "Connections open now (stream servers: one per active request).",
)
_DURATION: Final = "request_duration_seconds"
_DURATION_HELP: Final = "How long requests took, handshake to handler's end."
# Gauges say how things are now: those of a worker that has exited are gone.
_GAUGES: Final = frozenset(m.field for m in _STATS_METRICS if m.type == "gauge")


@attrs.frozen
class ServerSnapshot:
    """One server's numbers at one moment: what a worker sends the supervisor."""

    #: The ``server`` label: kind and first address, as in the start-up line.
    name: str
    #: Whether it serves streams (and so has connections).
    stream: bool
    #: :class:`ServerStats` as a dict.
    stats: dict[str, int]
    #: :attr:`RequestDurations.counts` (not cumulative) and its sum; empty
    #: for a server that does not time its requests.
    durations: tuple[int, ...]
    duration_sum: float

    @classmethod
    def of(cls, server: BaseServer) -> ServerSnapshot:
        """Take a snapshot of ``server``."""
        durations = server.request_durations
        return cls(
            name=server_name(server),
            stream=not isinstance(server, UDPServer),
            stats=attrs.asdict(server.stats),
            durations=() if durations is None else tuple(durations.counts),
            duration_sum=0.0 if durations is None else durations.sum,
        )

    def plus(self, other: ServerSnapshot, *, gauges: bool = True) -> ServerSnapshot:
        """This and ``other`` added up; ``gauges=False`` takes only this one's."""
        stats = {
            field: value + (other.stats[field] if gauges or field not in _GAUGES else 0)
            for field, value in self.stats.items()
        }
        return attrs.evolve(
            self,
            stats=stats,
            durations=tuple(
                map(sum, zip(self.durations, other.durations, strict=True))
            ),
            duration_sum=self.duration_sum + other.duration_sum,
        )

    def without_gauges(self) -> ServerSnapshot:
        """What lasts of a worker that exited: its counters, gauges at zero."""
        stats = {f: 0 if f in _GAUGES else v for f, v in self.stats.items()}
        return attrs.evolve(self, stats=stats)


def server_name(server: BaseServer) -> str:
    """The ``server`` label of ``server``: ``TCP 127.0.0.1:9000`` and the like."""
    address = getattr(server, "server_addresses", [server.server_address])[0]
    if not isinstance(server, TCPServer):
        return f"{type(server).__name__} {address!r}"
    return f"{listener_kind(server, address)} {format_address(address)}"


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _labels(labels: dict[str, str]) -> str:
    return ",".join(f'{name}="{_escape(value)}"' for name, value in labels.items())


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    return repr(value)


def _render(
    out: list[str], prefix: str, series: Sequence[tuple[dict[str, str], ServerSnapshot]]
) -> None:
    """Append the metric families of ``series`` (labels and a snapshot each)."""
    if not series:
        return
    for metric in (*_STATS_METRICS, _OPEN_CONNECTIONS):
        chosen = [
            (labels, snapshot)
            for labels, snapshot in series
            if metric is not _OPEN_CONNECTIONS or snapshot.stream
        ]
        if not chosen:
            continue
        name = prefix + metric.name
        out.append(f"# HELP {name} {metric.help}")
        out.append(f"# TYPE {name} {metric.type}")
        for labels, snapshot in chosen:
            out.append(f"{name}{{{_labels(labels)}}} {snapshot.stats[metric.field]}")
    timed = [(labels, snapshot) for labels, snapshot in series if snapshot.durations]
    if not timed:
        return
    name = prefix + _DURATION
    out.append(f"# HELP {name} {_DURATION_HELP}")
    out.append(f"# TYPE {name} histogram")
    for labels, snapshot in timed:
        cumulative = 0
        for bound, count in zip(
            (*DURATION_BUCKETS, math.inf), snapshot.durations, strict=True
        ):
            cumulative += count
            bucket = _labels({**labels, "le": _number(bound)})
            out.append(f"{name}_bucket{{{bucket}}} {cumulative}")
        out.append(f"{name}_sum{{{_labels(labels)}}} {_number(snapshot.duration_sum)}")
        out.append(f"{name}_count{{{_labels(labels)}}} {cumulative}")


def _text(out: list[str]) -> str:
    return "\n".join(out) + "\n" if out else ""


def time_requests(servers: Iterable[BaseServer]) -> None:
    """Have ``servers`` time their requests, for the duration histogram.

    Timing costs every request a little, so a server does it only once
    something will read the times (see :attr:`BaseServer.request_durations`).
    """
    for server in servers:
        if server.request_durations is None:
            server.request_durations = RequestDurations()


def render_metrics(servers: Iterable[BaseServer]) -> str:
    """The metrics of ``servers`` in Prometheus's text exposition format.

    For a service that has an HTTP server of its own: answer a scrape with
    this text and ``Content-Type: text/plain; version=0.0.4``. Each server's
    series carry a ``server`` label naming its kind and first address
    (``TCP 127.0.0.1:9000``). The metrics are:

    - a counter ``trioserve_requests_<outcome>_total`` for each outcome
      counted in :class:`ServerStats` (``accepted``, ``completed``,
      ``failed``, ``rejected``, ``dropped``, ``timed_out``,
      ``disconnected``, ``cancelled``), and ``trioserve_malformed_inputs_total``
      and ``trioserve_accept_errors_total``;
    - gauges ``trioserve_requests_active`` and ``trioserve_requests_idle``,
      and for stream servers ``trioserve_connections_open``;
    - a histogram ``trioserve_request_duration_seconds`` of
      :class:`RequestDurations`, for the servers that time their requests:
      those whose :attr:`~BaseServer.request_durations` is set
      (:func:`serve_metrics` sets it).
    """
    out: list[str] = []
    _render(out, PREFIX, [({"server": s.name}, s) for s in snapshots(servers)])
    return _text(out)


class WorkerMetrics:
    """The workers' latest snapshots, in the supervisor of :func:`serve_in_workers`.

    A worker's own series are labelled with its number and its pid: during
    a reload, a worker and the one replacing it run side by side under one
    number. A worker that exits (or is replaced) leaves its last counts in
    the sums, so that a counter summed over workers never goes back; its
    gauges and its own series leave with it, and its successor's series
    start from zero.
    """

    def __init__(self) -> None:
        self._latest: dict[tuple[int, int], list[ServerSnapshot]] = {}
        # The sums of the workers that have exited, gauges at zero.
        self._departed: list[ServerSnapshot] = []

    def update(self, worker: tuple[int, int], snapshots: list[ServerSnapshot]) -> None:
        """Keep ``snapshots`` as the latest of ``worker`` (its number and pid)."""
        self._latest[worker] = snapshots

    def departed(self, worker: tuple[int, int]) -> None:
        """``worker`` (its number and pid) exited: keep only its counts, in
        the sums."""
        last = self._latest.pop(worker, None)
        if last is None:
            return
        if not self._departed:
            self._departed = [s.without_gauges() for s in last]
        else:
            self._departed = [
                total.plus(s, gauges=False)
                for total, s in zip(self._departed, last, strict=True)
            ]

    def render(self) -> str:
        """The sums over workers and each worker's own series, as text."""
        workers = sorted(self._latest.items())
        totals = list(self._departed)
        for _, snapshots in workers:
            if not totals:
                totals = list(snapshots)
            else:
                totals = [
                    total.plus(s) for total, s in zip(totals, snapshots, strict=True)
                ]
        out: list[str] = []
        _render(out, PREFIX, [({"server": s.name}, s) for s in totals])
        _render(
            out,
            WORKER_PREFIX,
            [
                ({"server": s.name, "worker": str(number), "pid": str(pid)}, s)
                for (number, pid), snapshots in workers
                for s in snapshots
            ],
        )
        return _text(out)


def snapshots(servers: Iterable[BaseServer]) -> list[ServerSnapshot]:
    """A snapshot of each of ``servers``, as a worker sends them."""
    return [ServerSnapshot.of(server) for server in servers]


async def send_snapshots(
    servers: Sequence[BaseServer], send: Callable[[list[ServerSnapshot]], object]
) -> None:
    """In a worker: ``send`` snapshots of ``servers`` now and every interval."""
    while True:
        send(snapshots(servers))
        await trio.sleep(SNAPSHOT_INTERVAL)


# The one thing the handler answers, and its reasons.
_PATH: Final = b"/metrics"
_REASONS: Final = {
    200: "OK",
    400: "Bad Request",
    404: "Not Found",
    405: "Method Not Allowed",
}
# The most header lines a scrape may send.
_MAX_HEADERS: Final = 100


class _MetricsHandler(StreamRequestHandler):
    """HTTP/1.1 ``GET /metrics``, with keep-alive, as Prometheus scrapes."""

    timeout = 10.0
    max_line_length = 8192
    server: MetricsServer

    async def handle(self) -> None:
        while await self._answer_one():
            pass

    async def _answer_one(self) -> bool:
        """Answer one request; whether the connection stays open."""
        request_line = await self.rfile.readline()
        if not request_line:
            return False
        parts = request_line.split()
        headers = []
        for _ in range(_MAX_HEADERS):
            line = await self.rfile.readline()
            if line in (b"\r\n", b"\n", b""):
                break
            headers.append(line.lower())
        else:
            return await self._reply(400, b"too many header lines\n", keep=False)
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return await self._reply(400, b"not an HTTP/1 request\n", keep=False)
        method, target, version = parts
        # A body we would not read, or a client that asks: close after.
        keep = version == b"HTTP/1.1" and not any(
            h.startswith((b"content-length:", b"transfer-encoding:"))
            or (h.startswith(b"connection:") and b"close" in h)
            for h in headers
        )
        if method not in (b"GET", b"HEAD"):
            return await self._reply(405, b"only GET\n", keep=False, allow=True)
        if target.split(b"?", 1)[0] != _PATH:
            return await self._reply(404, b"metrics are at /metrics\n", keep=keep)
        body = self.server.render().encode()
        return await self._reply(200, body, keep=keep, head=method == b"HEAD")

    async def _reply(
        self,
        status: int,
        body: bytes,
        *,
        keep: bool,
        head: bool = False,
        allow: bool = False,
    ) -> bool:
        content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
        lines = [
            f"HTTP/1.1 {status} {_REASONS[status]}",
            f"Content-Type: {content_type}",
            f"Content-Length: {len(body)}",
        ]
        if allow:
            lines.append("Allow: GET, HEAD")
        if not keep:
            lines.append("Connection: close")
        await self.wfile.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        if not head:
            await self.wfile.write(body)
        await self.wfile.flush()
        return keep


class MetricsServer(TCPServer):
    """A small TCP server that answers ``GET /metrics`` with ``render()``."""

    # A scraper between scrapes is idle; let it go after a while.
    idle_timeout = 60.0
    shutdown_timeout = 1.0

    def __init__(
        self, server_address: tuple[str, int], render: Callable[[], str], **options: Any
    ) -> None:
        super().__init__(server_address, _MetricsHandler, **options)
        self.render = render


async def serve_metrics(
    servers: Sequence[BaseServer],
    host: str,
    port: int,
    *,
    task_status: trio.TaskStatus[Any] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve the metrics of ``servers`` to Prometheus at ``http://HOST:PORT/metrics``.

    Runs until cancelled. An HTTP/1.1 server of its own (a
    :class:`TCPServer`) answers ``GET /metrics`` with
    :func:`render_metrics` of ``servers``, fresh for each scrape, as
    ``Content-Type: text/plain; version=0.0.4``; connections stay open
    between scrapes, and other paths get 404. ``task_status.started()``
    gets the address it listens on, with port 0 resolved. The servers
    time their requests from then on (see
    :attr:`BaseServer.request_durations`).

    With :func:`serve_in_workers`, pass its ``metrics`` argument instead:
    the supervisor then serves the sum over workers and each worker's own
    series.

    Raises:
      OSError: binding ``(host, port)`` failed.
    """
    time_requests(servers)
    server = MetricsServer((host, port), lambda: render_metrics(servers))
    async with server:
        await server.serve_forever(task_status=task_status)
