"""One epoll for a server's waiting readers: a wait without a cancel scope.

A connection's reader waits for its next message inside a cancel scope:
the scope is how the shutdown's drain window, ``idle_timeout`` and
``timeout`` end the wait. On an idle connection that scope, and the stack
of coroutines under Trio's ``wait_readable``, are most of what the
connection holds, and entering and leaving the scope is a large part of a
short connection's cost (see benchmarks/README.md, "What an idle connection
holds").

Where the platform has epoll, a server instead parks its readers' waits
with one :class:`ReadinessWatcher`: each wait arms its socket in the
watcher's own epoll and parks its task with
``trio.lowlevel.wait_task_rescheduled``; the watcher, one task that waits
for the epoll to become readable, wakes each reader whose socket is ready,
and each whose deadline has passed. The deadlines live in one heap, not in
a scope per wait. Anything else (TLS, another platform, a reader with no
server) waits in a scope, as :class:`~trioserve._streams.WaitRules` says.
"""

from __future__ import annotations

import heapq
import itertools
import math
import select
import socket
from collections.abc import Awaitable

import outcome
import trio

from ._stats import ServerStats

# The heap keeps entries of waits that are over until they reach its top;
# once it holds this many times the waits parked (and at least
# _COMPACT_MINIMUM entries), it is rebuilt from the live ones.
_COMPACT_RATIO = 2
_COMPACT_MINIMUM = 64

#: Seconds between the watcher's looks for parked sockets that another task
#: closed. The kernel drops a closed socket from the epoll without an event,
#: so this is how such a wait learns of it (Trio's own wait learns at once).
CLOSED_SOCKET_SWEEP = 1.0


class _Parked:
    """One parked wait; Trio calls it to abort the wait when its task is cancelled.

    Being its own abort function, it costs a wait no closure.
    """

    __slots__ = ("fd", "idle", "over", "sock", "task", "watcher")

    def __init__(
        self,
        watcher: ReadinessWatcher,
        sock: socket.socket,
        fd: int,
        task: trio.lowlevel.Task,
        idle: bool,
    ) -> None:
        self.watcher = watcher
        self.sock = sock
        self.fd = fd
        self.task = task
        #: Whether the shutdown's drain window ends it.
        self.idle = idle
        #: Whether it has been woken or aborted: its heap entries are stale.
        self.over = False

    def __call__(self, raise_cancel: object) -> trio.lowlevel.Abort:
        self.watcher.forget(self)
        return trio.lowlevel.Abort.SUCCEEDED


async def _ended_at_once() -> bool:
    # The caller has just checkpointed (see receive_when_ready): this is
    # where a scope whose deadline has passed would have ended the wait.
    return False


class ReadinessWatcher:
    """Parks a server's readers until their socket is readable or their time is up.

    Between :meth:`start` and :meth:`stop` (a serving's length),
    :attr:`running` is True and readers may park; otherwise they wait in a
    cancel scope instead. One task may wait on a socket at a time.

    A wait whose socket another task closes is woken within
    :data:`CLOSED_SOCKET_SWEEP` seconds (or at once, if a new socket gets
    its number first), and its reader then meets the closed socket:
    :exc:`trio.ClosedResourceError`, as in Trio's own wait.
    """

    __slots__ = (
        "_deadlines",
        "_drain_deadline",
        "_epoll",
        "_next_sweep",
        "_order",
        "_parked",
        "_sleep",
        "_stats",
        "_stopped",
        "running",
    )

    def __init__(self, stats: ServerStats) -> None:
        self._epoll: select.epoll | None = None
        # The parked waits, by file descriptor.
        self._parked: dict[int, _Parked] = {}
        # (deadline, order, parked): when waits end, as a heap. ``order``
        # breaks ties, since _Parked does not compare.
        self._deadlines: list[tuple[float, int, _Parked]] = []
        self._order = itertools.count()
        # When idle waits end: never until the shutdown starts.
        self._drain_deadline = math.inf
        # When the watcher next looks for closed sockets, while any wait is
        # parked.
        self._next_sweep = math.inf
        # The scope the watcher sleeps in; its deadline the heap's top.
        self._sleep: trio.CancelScope | None = None
        # Cancelled by stop(): the watcher task's own scope.
        self._stopped = trio.CancelScope()
        self._stats = stats
        #: Whether readers may park: between start() and stop().
        self.running = False

    @staticmethod
    def supported() -> bool:
        """Whether this platform has epoll, which the watcher needs."""
        return hasattr(select, "epoll")

    def start(self) -> None:
        """Start the watcher task; readers may park from now on.

        The task is a system task, not one of the serving's nursery: that
        nursery's end waits for its requests, and the watcher must outlast
        them without an extra nursery around the serving, which would change
        how the serving's errors propagate.
        """
        self._epoll = select.epoll()
        self.running = True
        trio.lowlevel.spawn_system_task(
            self._watch, self._epoll, name=f"{__name__}.ReadinessWatcher"
        )

    def stop(self) -> None:
        """Stop the watcher: readers park no more, and those parked look again."""
        self.running = False
        self._stopped.cancel()

    def drain(self, deadline: float) -> None:
        """Idle waits, parked now or later, end at ``deadline``."""
        self._drain_deadline = deadline
        for parked in self._parked.values():
            if parked.idle:
                self._add_deadline(deadline, parked)

    def wait_readable(
        self, sock: socket.socket, deadline: float, idle: bool
    ) -> Awaitable[bool]:
        """Park until ``sock`` is readable (True) or ``deadline`` passes (False).

        An ``idle`` wait also ends when the shutdown's drain window is over.
        Not a coroutine itself but Trio's wait: the one coroutine of a
        parked reader's wait. Only while :attr:`running`.
        """
        if idle and self._drain_deadline < deadline:
            deadline = self._drain_deadline
        if deadline != math.inf and deadline <= trio.current_time():
            return _ended_at_once()
        fd = sock.fileno()
        parked_before = self._parked.get(fd)
        if parked_before is not None:
            if parked_before.sock is sock:
                raise trio.BusyResourceError(
                    "another task is already waiting for this socket"
                )
            # Its socket was closed and the number given to this one.
            self._wake(parked_before, True)
        elif not self._parked:
            self._schedule_sweep()
        epoll = self._epoll
        assert epoll is not None
        try:
            epoll.modify(fd, select.EPOLLIN | select.EPOLLONESHOT)
        except FileNotFoundError:
            # Not yet in the epoll (or closed and its number reused).
            epoll.register(fd, select.EPOLLIN | select.EPOLLONESHOT)
        parked = self._parked[fd] = _Parked(
            self, sock, fd, trio.lowlevel.current_task(), idle
        )
        if idle:
            self._stats.idle += 1
        if deadline != math.inf:
            self._add_deadline(deadline, parked)
        # Returned for the caller to await: see the docstring.
        return trio.lowlevel.wait_task_rescheduled(parked)  # noqa: ASYNC105

    def _add_deadline(self, deadline: float, parked: _Parked) -> None:
        deadlines = self._deadlines
        heapq.heappush(deadlines, (deadline, next(self._order), parked))
        self._wake_watcher_by(deadline)
        if len(deadlines) > max(_COMPACT_MINIMUM, _COMPACT_RATIO * len(self._parked)):
            self._deadlines = deadlines = [
                entry for entry in deadlines if not entry[2].over
            ]
            heapq.heapify(deadlines)

    def _wake_watcher_by(self, when: float) -> None:
        sleep = self._sleep
        if sleep is not None and when < sleep.deadline:
            sleep.deadline = when

    def _schedule_sweep(self) -> None:
        """The first wait parks: look for closed sockets in a while."""
        self._next_sweep = trio.current_time() + CLOSED_SOCKET_SWEEP
        self._wake_watcher_by(self._next_sweep)

    def forget(self, parked: _Parked) -> None:
        """The wait is over: it is no longer parked."""
        parked.over = True
        del self._parked[parked.fd]
        if parked.idle:
            self._stats.idle -= 1

    def _wake(self, parked: _Parked, readable: bool) -> None:
        """Wake a parked wait: its socket is readable, or its time is up."""
        self.forget(parked)
        # An outcome is used once: a new one each time.
        trio.lowlevel.reschedule(parked.task, outcome.Value(readable))

    def _next_deadline(self) -> float:
        """When the watcher must next wake: a wait ends, or it is time to sweep."""
        deadlines = self._deadlines
        while deadlines and deadlines[0][2].over:
            heapq.heappop(deadlines)
        first = deadlines[0][0] if deadlines else math.inf
        return min(first, self._next_sweep)

    def _expire(self) -> None:
        """End every wait whose deadline has passed; sweep if it is time."""
        now = trio.current_time()
        deadlines = self._deadlines
        while deadlines and deadlines[0][0] <= now:
            parked = heapq.heappop(deadlines)[2]
            if not parked.over:
                self._wake(parked, False)
        if now >= self._next_sweep:
            for parked in [p for p in self._parked.values() if p.sock.fileno() < 0]:
                self._wake(parked, True)
            self._next_sweep = now + CLOSED_SOCKET_SWEEP if self._parked else math.inf

    async def _watch(self, epoll: select.epoll) -> None:
        try:
            with self._stopped:
                while True:
                    with trio.CancelScope(deadline=self._next_deadline()) as sleep:
                        self._sleep = sleep
                        while True:
                            await trio.lowlevel.wait_readable(epoll)
                            for fd, _ in epoll.poll(0):
                                parked = self._parked.get(fd)
                                if parked is not None:
                                    self._wake(parked, True)
                    self._sleep = None
                    self._expire()
        finally:
            self.running = False
            self._sleep = None
            # Waits still parked look at their sockets again and, finding
            # the watcher gone, wait in a scope of their own.
            for parked in list(self._parked.values()):
                self._wake(parked, True)
            epoll.close()
