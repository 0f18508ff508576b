"""Worker processes: one service on every core, under a supervisor."""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket as stdlib_socket
import sys
import weakref
from collections.abc import Callable, Sequence
from multiprocessing.connection import Connection
from typing import Any, Final, Literal

import attrs
import trio

from ._listeners import Listener, new_socket
from ._metrics import (
    MetricsServer,
    WorkerMetrics,
    send_snapshots,
    snapshots,
    time_requests,
)
from ._notify import Notifier, forget_environment
from ._server import BaseServer, counted
from ._signals import WATCHED_SIGNALS, follow_stop_signals, serve_until_signalled
from ._socket_servers import TCPServer

if sys.version_info < (3, 11):
    from exceptiongroup import BaseExceptionGroup

LOGGER = logging.getLogger("trioserve")

#: What makes a worker's servers: called once in the supervisor, to learn the
#: addresses to bind, and once in each worker process.
ServerFactory = Callable[[], Sequence[BaseServer]]

# Workers are started fresh ("spawn"), never forked: a fork would copy the
# supervisor's Trio run and threads into a process that must run its own.
_CONTEXT: Final = multiprocessing.get_context("spawn")

# A worker that dies sooner than this after it started is failing, not just
# unlucky: each such death in a row doubles the pause before the next start,
# from RESTART_DELAY up to RESTART_DELAY_MAX, so a crash loop costs little.
STABLE_AFTER: Final = 10.0
RESTART_DELAY: Final = 0.1
RESTART_DELAY_MAX: Final = 10.0

# Beyond the servers' shutdown_timeout, how long workers get to exit after a
# graceful stop: finish() (bounded by the handlers' finish_timeout), closing,
# and the interpreter's exit. Workers still running then are killed.
EXIT_GRACE: Final = 5.0

# Linux spreads the connections (and datagrams) of SO_REUSEPORT sockets over
# them evenly; other systems give them all to one socket or do not have it.
REUSE_PORT_BALANCES: Final = sys.platform == "linux" and hasattr(
    stdlib_socket, "SO_REUSEPORT"
)


def usable_cores() -> int:
    """The number of cores this process may run on (what ``"auto"`` means)."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@attrs.define(eq=False)
class _Listener:
    """One listening address of one server, as the supervisor holds it."""

    server: TCPServer
    family: int
    address: Any
    # The one socket every worker shares; None where each worker gets a
    # socket of its own on the same address, with SO_REUSEPORT.
    shared: trio.socket.SocketType | None = None
    # A bound SO_REUSEPORT socket no worker has yet (the one bound to learn
    # the real address of port 0).
    spare: trio.socket.SocketType | None = None

    async def socket_for_worker(self) -> trio.socket.SocketType:
        """A listening socket to hand a worker: the shared one, or a new one."""
        if self.shared is not None:
            return self.shared
        sock, self.spare = self.spare, None
        if sock is None:
            server = self.server
            listener = Listener(new_socket(self.family, server.socket_type))
            try:
                await listener.bind(
                    self.address,
                    reuse_address=server.allow_reuse_address,
                    reuse_port=True,
                )
            except BaseException:
                listener.close()
                raise
            listener.listen(server.request_queue_size)
            sock = listener.socket
        return sock


async def _bind_listeners(server: TCPServer, reuse_port: bool) -> list[_Listener]:
    """Bind ``server``'s addresses once, in the supervisor.

    A server that binds by itself (``binding`` "lazy") is bound here: IP
    listeners get SO_REUSEPORT under ``reuse_port``, so that each worker can
    have a socket of its own; the rest (Unix sockets, which have no such
    option) are shared. Any other server's sockets are shared as they are:
    those it was handed (``from_socket``), those already bound, and those of
    one made with ``bind_and_activate=False``, which is bound here through
    its own ``server_bind()`` and ``server_activate()``, as its caller would
    have done, so that options set on its socket and overrides of those
    hooks take effect.
    """
    if server.binding == "manual":
        await server.server_bind()
        await server.server_activate()
    if server.binding != "lazy":
        return [
            _Listener(server, sock.family, sock.getsockname(), shared=sock)
            for sock in server.sockets
        ]
    server.allow_reuse_port = reuse_port
    # Binds and listens, as `async with server` does (a failure leaves no
    # socket open), and sets the addresses the start-up line reports, with
    # port 0 resolved. The sockets go to the workers; the server itself
    # never serves here.
    await server.__aenter__()
    listeners: list[_Listener] = []
    for sock, address in zip(server.sockets, server.server_addresses, strict=True):
        listener = _Listener(server, sock.family, address)
        ip = sock.family in (stdlib_socket.AF_INET, stdlib_socket.AF_INET6)
        if reuse_port and ip:
            listener.spare = sock
        else:
            listener.shared = sock
        listeners.append(listener)
    return listeners


def _close_listeners(listeners: list[list[_Listener]]) -> None:
    for server_listeners in listeners:
        for listener in server_listeners:
            for sock in (listener.shared, listener.spare):
                if sock is not None:
                    sock.close()
            listener.shared = listener.spare = None


@attrs.define(eq=False)
class _SlotSockets:
    """The listening sockets of one worker slot, as the supervisor holds them.

    A worker and, during a reload, its successor use the same sockets: the
    old worker's close then leaves every connection in their backlogs to the
    new one, where closing an ``SO_REUSEPORT`` socket would reset them. The
    sockets of the slot's own (not shared) are closed when no worker uses
    them any more.
    """

    sockets: list[list[trio.socket.SocketType]]
    own: list[trio.socket.SocketType]
    users: int = 0

    def release(self) -> None:
        self.users -= 1
        if self.users == 0:
            self.close()

    def close(self) -> None:
        for sock in self.own:
            sock.close()


@attrs.define(eq=False)
class _Worker:
    """A worker process and the channel it reports on."""

    number: int
    process: Any  # multiprocessing's SpawnProcess, which is not typed
    status: Connection
    sockets: _SlotSockets
    # Told to stop by a reload that replaced it: not to be restarted.
    retired: bool = False

    @property
    def pid(self) -> int:
        return int(self.process.pid)


class _Supervisor:
    """Keeps ``count`` workers running until it is told to stop."""

    def __init__(
        self,
        make_servers: ServerFactory,
        listeners: list[list[_Listener]],
        count: int,
        shutdown_timeout: float,
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.make_servers = make_servers
        self.listeners = listeners
        self.count = count
        self.shutdown_timeout = shutdown_timeout
        self.workers: set[_Worker] = set()
        # Where workers' metrics go; None: workers send none.
        self.metrics = metrics
        # Tells systemd how the service is doing (when NOTIFY_SOCKET is set).
        self.notifier = Notifier.from_environment(
            lambda: counted(len(self.workers), "worker")
        )
        self.stopping = False
        self.reloading = False
        # Each reload's workers are one generation newer; a worker of an
        # older one that dies is not replaced.
        self.generation = 0
        # False once a worker ends a graceful stop other than cleanly.
        self.clean = True
        # Set whenever a worker exits.
        self.exited = trio.Event()

    async def _slot_sockets(self) -> _SlotSockets:
        # Loops, not a nested comprehension: Python 3.10 refuses an await in
        # the inner one.
        sockets: list[list[trio.socket.SocketType]] = []
        for server_listeners in self.listeners:
            sockets.append(
                [await listener.socket_for_worker() for listener in server_listeners]
            )
        shared = {
            id(listener.shared)
            for listeners in self.listeners
            for listener in listeners
        }
        own = [sock for socks in sockets for sock in socks if id(sock) not in shared]
        return _SlotSockets(sockets, own)

    async def _spawn(self, number: int, slot: _SlotSockets | None) -> _Worker:
        if slot is None:
            slot = await self._slot_sockets()
        # multiprocessing passes stdlib sockets to the new process by their
        # file descriptors: hand it duplicates, closed once it has its own.
        sockets = [
            [stdlib_socket.socket(fileno=os.dup(sock.fileno())) for sock in socks]
            for socks in slot.sockets
        ]
        status, report = _CONTEXT.Pipe(duplex=False)
        process = _CONTEXT.Process(
            target=_worker_main,
            args=(self.make_servers, number, sockets, report, self.metrics is not None),
            name=f"trioserve-worker-{number}",
        )
        slot.users += 1
        try:
            process.start()
        except BaseException:
            slot.release()
            raise
        finally:
            report.close()
            for duplicates in sockets:
                for duplicate in duplicates:
                    duplicate.close()
        worker = _Worker(number, process, status, slot)
        self.workers.add(worker)
        LOGGER.info("worker %d started (pid %d)", number, worker.pid)
        if self.stopping:  # while we were starting it
            os.kill(worker.pid, signal.SIGTERM)
        return worker

    async def keep_running(
        self,
        number: int,
        slot: _SlotSockets | None = None,
        generation: int = 0,
        *,
        task_status: trio.TaskStatus[_Worker],
    ) -> None:
        """Run worker ``number``; start a new one each time it dies, until stopped.

        The first one listens on ``slot``'s sockets, if given (a reload's
        new worker takes over its predecessor's); a replacement for one that
        died gets new sockets. ``task_status.started()`` once the first
        worker serves. If that one dies before it serves, starting is
        hopeless: raise RuntimeError.
        """
        quick_deaths = 0
        first = True
        while not self.stopping:
            worker = await self._spawn(number, slot if first else None)
            started_at = trio.current_time()
            ready = await self._watch(worker, task_status if first else None)
            if first and not ready:
                raise RuntimeError(
                    f"worker {number} {_exit_reason(worker)} before it started serving"
                )
            first = False
            if self.stopping or worker.retired:
                if worker.process.exitcode != 0:
                    self.clean = False
                return
            if generation < self.generation:
                return  # replaced by a reload while it was dying
            lived = trio.current_time() - started_at
            quick_deaths = quick_deaths + 1 if lived < STABLE_AFTER else 0
            delay = min(RESTART_DELAY_MAX, RESTART_DELAY * 2**quick_deaths)
            LOGGER.error(
                "worker %d (pid %d) %s after %.1f s; starting another in %.1f s",
                number,
                worker.pid,
                _exit_reason(worker),
                lived,
                delay,
            )
            await trio.sleep(delay)

    async def _watch(
        self, worker: _Worker, task_status: trio.TaskStatus[_Worker] | None
    ) -> bool:
        """Follow the worker's reports until it exits; whether it served."""
        ready = False
        try:
            while True:
                await trio.lowlevel.wait_readable(worker.status.fileno())
                try:
                    kind, detail = worker.status.recv()
                except EOFError:  # it exited
                    break
                if kind == "ready":
                    ready = True
                    if task_status is not None:
                        task_status.started(worker)
                elif kind == "metrics":
                    if self.metrics is not None:
                        self.metrics.update((worker.number, worker.pid), detail)
                elif kind == "stats":
                    LOGGER.info(
                        "worker %d (pid %d) stopped after %s",
                        worker.number,
                        worker.pid,
                        _describe(detail),
                    )
            await trio.lowlevel.wait_readable(worker.process.sentinel)
            worker.process.join()
        finally:
            worker.status.close()
            worker.sockets.release()
            if self.metrics is not None:
                self.metrics.departed((worker.number, worker.pid))
            self.workers.discard(worker)
            self.exited.set()
        return ready

    async def start(self, nursery: trio.Nursery) -> None:
        """Start the workers one at a time, each once the one before serves.

        The start-up then reports a service that answers, and a worker that
        cannot start stops us (RuntimeError).
        """
        for number in range(1, self.count + 1):
            await nursery.start(self.keep_running, number)

    async def reload(self, nursery: trio.Nursery) -> bool:
        """Replace every worker with a fresh one; whether they all serve.

        The new workers start one at a time, each on its predecessor's
        sockets. Once all of them serve, the old ones are stopped gracefully.
        If one cannot start, the new ones are stopped and the old ones keep
        serving.
        """
        if self.stopping or self.reloading:
            LOGGER.warning("a reload or a stop is under way: not reloading")
            return False
        with self.notifier.reloading():
            return await self._reload(nursery)

    async def _reload(self, nursery: trio.Nursery) -> bool:
        self.reloading = True
        old = sorted(self.workers, key=lambda worker: worker.number)
        LOGGER.warning("reloading: starting %d new workers", self.count)
        new: list[_Worker] = []
        generation = self.generation + 1
        try:
            for worker in old:
                new.append(
                    await nursery.start(
                        self.keep_running, worker.number, worker.sockets, generation
                    )
                )
        except RuntimeError as exc:
            LOGGER.error("reload failed, the old workers keep serving: %s", exc)
            self._retire(new)
            return False
        except BaseException:  # cancelled: leave the service as it was
            self._retire(new)
            raise
        finally:
            self.reloading = False
        LOGGER.warning("reloaded: %d new workers serve; stopping the old", len(new))
        self.generation = generation
        self._retire(old)
        return True

    def _retire(self, workers: list[_Worker]) -> None:
        """Stop ``workers`` gracefully, for good."""
        for worker in workers:
            if worker.retired:
                continue
            worker.retired = True
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signal.SIGTERM)

    def signal_all(self, signum: int, *, retired: bool = True) -> None:
        for worker in self.workers:
            if worker.retired and not retired:
                continue
            # One that has just exited is its watcher's business.
            with contextlib.suppress(ProcessLookupError):
                os.kill(worker.pid, signum)

    async def stop(self, done: trio.CancelScope) -> None:
        """Stop every worker gracefully; kill those still running past the grace."""
        self.stopping = True
        # A retired worker is stopping already: a second SIGTERM would
        # force it.
        self.signal_all(signal.SIGTERM, retired=False)
        # Workers close their listening sockets at once; so must we, or a
        # socket would go on filling its backlog with clients nobody will
        # serve, instead of refusing them.
        _close_listeners(self.listeners)
        for worker in self.workers:
            worker.sockets.close()
        with trio.move_on_after(self.shutdown_timeout + EXIT_GRACE):
            await self._all_exited()
        if self.workers:
            LOGGER.error(
                "%d workers still running after the grace period: killing them",
                len(self.workers),
            )
            self.clean = False
            self.signal_all(signal.SIGKILL)
            await self._all_exited()
        done.cancel()

    async def _all_exited(self) -> None:
        while self.workers:
            self.exited = trio.Event()
            await self.exited.wait()


@attrs.define(eq=False)
class WorkerControl:
    """Reloads the workers of a running :func:`serve_in_workers` from Python.

    Pass one as its ``control`` argument; while it serves,
    ``await control.reload()`` does what SIGHUP does.
    """

    async def reload(self) -> bool:
        """Replace every worker with a fresh one, without dropping a client.

        Fresh workers call ``make_servers`` again, so they import the
        handler's module again and load the TLS files again. They start one
        at a time, each on the listening sockets of the one it replaces;
        once all of them serve, the old ones are shut down gracefully.

        Returns:
          True once the new workers serve (the old ones are then stopping);
          False if one of them could not start, in which case the new ones
          are stopped and the old ones keep serving (the reason is logged),
          or if a reload or a stop is already under way.

        Raises:
          RuntimeError: ``serve_in_workers`` is not serving with this control.
        """
        serving = _CONTROLLED.get(self)
        if serving is None:
            raise RuntimeError("serve_in_workers is not serving with this control")
        supervisor, nursery = serving
        return await supervisor.reload(nursery)


# What each WorkerControl controls while its serve_in_workers serves.
_CONTROLLED: weakref.WeakKeyDictionary[
    WorkerControl, tuple[_Supervisor, trio.Nursery]
] = weakref.WeakKeyDictionary()


def _exit_reason(worker: _Worker) -> str:
    code = worker.process.exitcode
    if code is not None and code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    return f"exited with status {code}"


def _describe(stats: list[dict[str, int]]) -> str:
    totals = {
        name: sum(server[name] for server in stats)
        for name in ("accepted", "completed", "failed", "cancelled")
    }
    return ", ".join(f"{value} {name}" for name, value in totals.items())


def _worker_main(
    make_servers: ServerFactory,
    number: int,
    sockets: list[list[stdlib_socket.socket]],
    report: Connection,
    metrics: bool = False,
) -> None:
    """A worker process's main: serve on the sockets given until told to stop."""
    # Out of the terminal's process group: Ctrl-C reaches the supervisor
    # alone, which tells us once. Two SIGINTs would force the shutdown.
    os.setpgid(0, 0)
    # systemd knows the supervisor alone: it says when the service is ready.
    forget_environment()
    try:
        made = list(make_servers())
        servers = [server for server in made if isinstance(server, TCPServer)]
        listeners = [len(server.server_addresses) for server in servers]
        if len(servers) != len(made) or listeners != [len(s) for s in sockets]:
            raise RuntimeError("make_servers() made different servers in a worker")
        for server, socks in zip(servers, sockets, strict=True):
            server.adopt_sockets(socks)
    except BaseException:
        for socks in sockets:
            for sock in socks:
                sock.close()
        raise
    graceful = trio.run(_serve_worker, servers, report, metrics)
    sys.exit(0 if graceful else 1)


class _ReportReady:
    """A task status that tells the supervisor the worker serves."""

    def __init__(self, report: Connection) -> None:
        self.report = report

    def started(self, value: object = None) -> None:
        self.report.send(("ready", None))


async def _serve_worker(
    servers: Sequence[BaseServer], report: Connection, metrics: bool = False
) -> bool:
    def send_metrics(snapshots: object) -> None:
        report.send(("metrics", snapshots))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(_stop_when_orphaned)
        if metrics:
            time_requests(servers)
            nursery.start_soon(send_snapshots, servers, send_metrics)
        graceful = await serve_until_signalled(
            servers, task_status=_ReportReady(report)
        )
        nursery.cancel_scope.cancel()
    if metrics:  # the final counts
        send_metrics(snapshots(servers))
    report.send(("stats", [attrs.asdict(server.stats) for server in servers]))
    report.close()
    return graceful


async def _stop_when_orphaned() -> None:
    """If the supervisor dies, shut down as if it had sent SIGTERM."""
    parent = multiprocessing.parent_process()
    assert parent is not None
    await trio.lowlevel.wait_readable(parent.sentinel)
    LOGGER.error("the supervisor has gone: shutting down")
    os.kill(os.getpid(), signal.SIGTERM)


async def serve_in_workers(
    make_servers: ServerFactory,
    workers: int | Literal["auto"] = "auto",
    *,
    reuse_port: bool | None = None,
    announce: Callable[[Sequence[TCPServer]], object] | None = None,
    control: WorkerControl | None = None,
    metrics: tuple[str, int] | None = None,
    task_status: trio.TaskStatus[list[Any]] = trio.TASK_STATUS_IGNORED,
) -> bool:
    """Serve in ``workers`` processes until SIGINT or SIGTERM; supervise them.

    Trio runs on one core. This runs the servers that ``make_servers()``
    returns in several processes, each with its own Trio run, so that a
    service uses every core; the calling process becomes their supervisor.

    ``make_servers`` is called once here, to learn what to listen on: every
    address is bound here, once (so a bad address fails before any worker
    starts, and port 0 means one port for all), then each worker process
    calls ``make_servers()`` again and serves its servers on the sockets it
    is handed, with :func:`serve_until_signalled`. It must therefore be
    picklable (a module-level function, or a :func:`functools.partial` of
    one) and make the same servers each time; as it runs first thing in
    each worker, it is the place for per-process set-up such as logging.
    Workers are started fresh (multiprocessing's "spawn"), so the main
    module must guard its entry point with ``if __name__ == "__main__":``.

    How workers share the load: on Linux, every worker gets its own socket
    on each IP address, with ``SO_REUSEPORT``, and the kernel spreads new
    connections and datagrams over them evenly. Unix sockets, and every
    socket where ``reuse_port`` is false, are bound once and shared by all
    workers.

    A worker that dies is replaced: at once if it had run a while, after a
    pause that doubles with each death in a row (up to 10 s) if it keeps
    dying young; each death is logged at ERROR. The first SIGINT or SIGTERM
    stops them all gracefully (each worker gets SIGTERM, lets its requests
    in flight finish within the servers' ``shutdown_timeout``, and reports
    its counters, which are logged); workers still running 5 s past that
    are killed. A second signal is passed on, and cancels what is still
    running. SIGHUP reloads: a fresh set of workers (which import the
    handler's module and load the TLS files again) takes over without
    dropping a client, as :meth:`WorkerControl.reload` describes; a reload
    whose new workers cannot start leaves the old ones serving. If the
    supervisor itself dies, its workers shut down gracefully.

    Under systemd (``NOTIFY_SOCKET``), the supervisor tells systemd
    ``READY=1`` once every worker serves, ``STOPPING=1`` at the first
    signal and the number of workers in ``STATUS=``, and pings the
    watchdog; the workers are started without systemd's notify variables,
    so that they never speak for the service.

    Must be called from the main thread.

    Args:
      make_servers: Returns the servers (:class:`TCPServer` and kin) that
        each worker runs. Those that bind by themselves are bound here as
        described above. One made with ``bind_and_activate=False`` is bound
        here through its own :meth:`~TCPServer.server_bind` and
        :meth:`~TCPServer.server_activate` (so options you set on its
        socket in ``make_servers``, and overrides of those hooks, take
        effect; ``make_servers`` cannot await them itself), and one made
        with :meth:`~TCPServer.from_socket` keeps its socket: every worker
        then shares those sockets, without ``SO_REUSEPORT``.
      workers: How many worker processes, or ``"auto"`` for one per usable
        core.
      reuse_port: Give each worker its own ``SO_REUSEPORT`` socket for IP
        addresses; ``None`` does so where the kernel balances them (Linux).
      announce: Called once every worker serves, just before
        ``task_status.started()``, with the servers ``make_servers`` made
        here. They are bound, so their ``server_addresses`` are the real
        addresses of every listener (``task_status.started()`` reports each
        server's first), with port 0 resolved. With ``metrics``, the
        metrics server (a :class:`TCPServer`) comes last.
      control: A :class:`WorkerControl` to reload the workers from Python.
      metrics: ``(host, port)`` where the supervisor serves Prometheus
        metrics (see :func:`serve_metrics`): the sums over workers under
        the usual names, and each worker's own series as
        ``trioserve_worker_*`` with ``worker`` and ``pid`` labels. Workers
        report their numbers every second and as they exit; the sums keep
        the counts of workers that have exited, so they never go back.

    Returns:
      True if every worker shut down gracefully; False if a second signal
      forced the shutdown or a worker had to be killed.

    Raises:
      OSError: binding an address failed.
      RuntimeError: a worker exited before it started serving.
    """
    count = usable_cores() if workers == "auto" else workers
    if count < 1:
        raise ValueError(f"workers must be at least 1, not {count}")
    if reuse_port is None:
        reuse_port = REUSE_PORT_BALANCES
    templates = _templates(make_servers)
    listeners: list[list[_Listener]] = []
    collector: WorkerMetrics | None = None
    metrics_server: MetricsServer | None = None
    if metrics is not None:
        collector = WorkerMetrics()
        metrics_server = MetricsServer(metrics, collector.render)
    try:
        with trio.open_signal_receiver(*WATCHED_SIGNALS) as signals:
            for server in templates:
                listeners.append(await _bind_listeners(server, reuse_port))
            if metrics_server is not None:
                # Bound before any worker starts, as the listeners are.
                await metrics_server.__aenter__()
            timeout = max((server.shutdown_timeout for server in templates), default=0)
            supervisor = _Supervisor(make_servers, listeners, count, timeout, collector)
            forced = await _supervise(
                supervisor,
                signals,
                templates,
                announce,
                control,
                task_status,
                metrics_server,
            )
    except BaseExceptionGroup as group:
        # A worker that could not start: report that, not the group.
        _, others = group.split(RuntimeError)
        if others is None and len(group.exceptions) == 1:
            raise group.exceptions[0] from None
        raise
    finally:
        _close_listeners(listeners)
        for server in templates:
            await server.server_close()  # removes the Unix socket files
        if metrics_server is not None:
            await metrics_server.server_close()
    return supervisor.clean and not forced


def _templates(make_servers: ServerFactory) -> list[TCPServer]:
    """The servers ``make_servers`` makes in the supervisor: socket servers."""
    templates: list[TCPServer] = []
    for server in make_servers():
        if not isinstance(server, TCPServer):
            raise TypeError(f"{server!r} has no sockets to share with workers")
        templates.append(server)
    return templates


async def _supervise(
    supervisor: _Supervisor,
    signals: Any,
    templates: list[TCPServer],
    announce: Callable[[Sequence[TCPServer]], object] | None,
    control: WorkerControl | None,
    task_status: trio.TaskStatus[list[Any]],
    metrics_server: MetricsServer | None = None,
) -> bool:
    """Start the workers, then stop them on the first signal; whether forced."""
    forced = False
    notifier = supervisor.notifier
    async with trio.open_nursery() as nursery:
        await supervisor.start(nursery)
        if control is not None:
            _CONTROLLED[control] = (supervisor, nursery)
        announced = list(templates)
        if metrics_server is not None:
            await nursery.start(metrics_server.serve_forever)
            announced.append(metrics_server)
        if announce is not None:
            announce(announced)
        task_status.started([server.server_address for server in templates])
        notifier.ready()
        nursery.start_soon(notifier.keep_alive)

        async def stop(name: str) -> None:
            notifier.stopping()
            LOGGER.warning(
                "%s: stopping %d workers; requests in flight get up to %s s",
                name,
                len(supervisor.workers),
                supervisor.shutdown_timeout,
            )
            nursery.start_soon(supervisor.stop, nursery.cancel_scope)
            await trio.lowlevel.checkpoint()

        def force(name: str) -> None:
            nonlocal forced
            LOGGER.warning("%s again: workers cancel every request", name)
            forced = True
            supervisor.signal_all(signal.SIGTERM)

        def reload(name: str) -> None:
            LOGGER.warning("%s: reloading the workers", name)
            nursery.start_soon(supervisor.reload, nursery)

        try:
            await follow_stop_signals(signals, stop, force, reload)
        finally:
            if control is not None:
                del _CONTROLLED[control]
    return forced
