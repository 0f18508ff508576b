"""Real clients against a real ``python -m trioserve serve``, stopped mid-load.

A support module for the tests of graceful shutdown as clients meet it:

- :func:`serving` starts ``python -m trioserve serve support.counting_handlers:NAME``
  (see :mod:`counting_handlers`: the examples' handlers, counting the replies
  they write) on a free port, with TLS and worker processes if asked.
- :func:`load_then_terminate` runs ``CLIENTS`` keep-alive clients against it,
  each a thread with a blocking socket asking one request (or one pipelined
  batch) after another; once each has had replies, it lets the load run a
  moment, sends SIGTERM, and waits for the server to exit and the clients to
  end. It returns the exit status, what the clients counted, and the replies
  the server wrote.

How a client counts (:class:`Counts`): a request is *sent* once ``sendall``
has handed it to the socket, and *answered* once its whole reply has been
read. A connection ends in one of three ways: a *clean end* (``recv``
returns ``b""``; over TLS only after the server's close_notify), a *reset*
(``ECONNRESET`` or ``EPIPE``), or a *ragged end* (TLS closed without
close_notify). Requests sent and not answered when the connection ended are
*unanswered*. Before sending its next request a client looks, without
waiting, whether the connection has already ended; if it has, the client
sends nothing more (as an HTTP client does with a stale keep-alive
connection, retrying elsewhere), so a server that closed an idle connection
is not blamed for a request it never saw.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import random
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from support.cli import EXIT_TIMEOUT, IO_TIMEOUT, STARTUP_TIMEOUT, LineReader
from support.examples import EXAMPLES

TESTS = Path(__file__).resolve().parents[1]

CLIENTS = 50
# How long the load runs at full strength (every client has had a reply)
# before SIGTERM, so the signal lands with requests in every state.
LOAD_BEFORE_SIGNAL = 0.3

#: The environment variable naming the directory where each server process
#: leaves a file, named by its pid, with the replies it wrote (see
#: counting_handlers).
COUNTS_DIRECTORY = "TRIOSERVE_TEST_REPLIES_DIR"

SERVING_LINE = re.compile(
    r"^trioserve: serving (?:TCP|UDP)(?:\+TLS)? on (?P<host>[^:]+):(?P<port>\d+)$"
)


# -- the server ----------------------------------------------------------------


@dataclasses.dataclass
class Server:
    """A running ``python -m trioserve serve``."""

    proc: subprocess.Popen[str]
    address: tuple[str, int]
    stdout: LineReader
    stderr: LineReader
    # Where each of its processes writes how many replies it wrote.
    counts: Path

    def terminate(self) -> int:
        """SIGTERM; return the exit status (raises if it takes too long)."""
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout=EXIT_TIMEOUT)

    def replies_written(self) -> int:
        """The replies the server's processes wrote, once it has exited.

        Each process leaves a file with its count (a line on the shared
        stderr could be lost among the other processes' lines).
        """
        return sum(int(path.read_text()) for path in self.counts.iterdir())


@contextlib.contextmanager
def serving(
    handler: str,
    *,
    tls: tuple[Path, Path] | None = None,
    workers: int | None = None,
    listener: str = "--tcp",
) -> Iterator[Server]:
    """Serve ``support.counting_handlers:<handler>`` on a free port; kill it after.

    ``tls`` is a ``(certificate, key)`` pair of PEM files; ``listener`` is
    ``--tcp`` or ``--udp``.
    """
    argv = [
        sys.executable,
        "-m",
        "trioserve",
        "serve",
        f"support.counting_handlers:{handler}",
    ]
    argv += [listener, "127.0.0.1:0"]
    if tls is not None:
        argv += ["--tls-cert", str(tls[0]), "--tls-key", str(tls[1])]
    if workers is not None:
        argv += ["--workers", str(workers)]
    path = os.pathsep.join(filter(None, [str(EXAMPLES), os.environ.get("PYTHONPATH")]))
    counts = Path(tempfile.mkdtemp(prefix="trioserve-replies-"))
    env = {**os.environ, "PYTHONPATH": path, COUNTS_DIRECTORY: str(counts)}
    proc = subprocess.Popen(
        argv,
        cwd=TESTS,
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        stdout, stderr = LineReader(proc.stdout), LineReader(proc.stderr)
        try:
            line = stdout.wait_for("trioserve: serving", STARTUP_TIMEOUT)
            match = SERVING_LINE.match(line)
            assert match is not None, line
        except AssertionError as exc:
            proc.kill()
            raise AssertionError(f"{exc}; stderr: {stderr.join()}") from None
        address = (match["host"], int(match["port"]))
        yield Server(proc, address, stdout, stderr, counts)
    finally:
        shutil.rmtree(counts, ignore_errors=True)
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=EXIT_TIMEOUT)
        for pipe in (proc.stdout, proc.stderr):
            if pipe is not None:
                pipe.close()


# -- the clients ---------------------------------------------------------------


class EndOfStream(Exception):
    """The connection ended cleanly before the reply was whole."""


class Reader:
    """Buffered reads from a blocking socket; :exc:`EndOfStream` at its end."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = b""

    def _receive(self) -> None:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EndOfStream
        self.buffer += chunk

    def readline(self) -> bytes:
        while (end := self.buffer.find(b"\n") + 1) == 0:
            self._receive()
        line, self.buffer = self.buffer[:end], self.buffer[end:]
        return line

    def read(self, n: int) -> bytes:
        while len(self.buffer) < n:
            self._receive()
        data, self.buffer = self.buffer[:n], self.buffer[n:]
        return data

    def ended(self) -> bool:
        """Whether the connection has ended, looking without waiting.

        Raises what the socket raises (a reset), and :exc:`AssertionError`
        for bytes nobody asked for.
        """
        self.sock.settimeout(0)
        try:
            chunk = self.sock.recv(65536)
        except (BlockingIOError, ssl.SSLWantReadError):
            return False  # nothing, or only TLS records that carry no data
        finally:
            self.sock.settimeout(IO_TIMEOUT)
        assert not chunk, f"unsolicited bytes: {chunk[:80]!r}"
        return True


@dataclasses.dataclass
class Counts:
    """What clients counted; see the module's docstring for the terms."""

    sent: int = 0
    answered: int = 0
    unanswered: int = 0
    clean_ends: int = 0
    resets: int = 0
    ragged_ends: int = 0
    # Clean ends a client noticed before sending its next request.
    ended_before_sending: int = 0
    # HTTP: connections whose last reply said "Connection: close".
    goodbyes: int = 0
    # Anything else that ended a connection: a timeout, a protocol error.
    errors: list[str] = dataclasses.field(default_factory=list)

    def add(self, other: Counts) -> None:
        for field in dataclasses.fields(self):
            setattr(
                self, field.name, getattr(self, field.name) + getattr(other, field.name)
            )


@dataclasses.dataclass
class Protocol:
    """How a client asks and how it reads a reply.

    ``think``: the most seconds a client pauses between a reply and its next
    request (a random pause, as an application's between requests), so that
    connections are often idle, with a request due soon, when SIGTERM comes.
    """

    think: float = 0.0

    def batch(self, client: int, number: int) -> tuple[bytes, int]:
        """The next requests to send at once, and how many they are."""
        raise NotImplementedError

    def read_reply(self, reader: Reader) -> bool:
        """Read one whole reply; return whether it is the connection's last."""
        raise NotImplementedError


class HTTP(Protocol):
    """HTTP/1.1 GET requests, one at a time, on a keep-alive connection."""

    def batch(self, client: int, number: int) -> tuple[bytes, int]:
        request = f"GET /{client}/{number} HTTP/1.1\r\nHost: test\r\n\r\n"
        return request.encode(), 1

    def read_reply(self, reader: Reader) -> bool:
        status = reader.readline()
        assert status.startswith(b"HTTP/1.1 200 "), status
        headers = {}
        while (line := reader.readline()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.lower()] = value.strip().lower()
        reader.read(int(headers["content-length"]))
        return headers.get("connection") == "close"


@dataclasses.dataclass
class RESP(Protocol):
    """Redis ``SET`` commands, ``pipeline`` of them in flight at a time."""

    pipeline: int = 1

    def batch(self, client: int, number: int) -> tuple[bytes, int]:
        key, value = f"key:{client}".encode(), f"{number}".encode()
        command = b"*3\r\n$3\r\nSET\r\n$%d\r\n%s\r\n$%d\r\n%s\r\n" % (
            len(key),
            key,
            len(value),
            value,
        )
        return command * self.pipeline, self.pipeline

    def read_reply(self, reader: Reader) -> bool:
        reply = reader.readline()
        assert reply == b"+OK\r\n", reply
        return False


RESETS = (errno.ECONNRESET, errno.EPIPE)


def _client(
    number: int,
    address: tuple[str, int],
    protocol: Protocol,
    tls: ssl.SSLContext | None,
    answered: Callable[[], None],
) -> Counts:
    """One keep-alive client, until its connection ends; what it counted."""
    counts = Counts()
    sock = socket.create_connection(address, timeout=IO_TIMEOUT)
    in_flight = 0
    try:
        if tls is not None:
            # Ragged EOFs raise instead of looking like clean ones.
            sock = tls.wrap_socket(
                sock, server_hostname=address[0], suppress_ragged_eofs=False
            )
        reader = Reader(sock)
        pause = random.Random(number).uniform
        for batch in range(sys.maxsize):
            if batch > 0 and protocol.think:
                time.sleep(pause(0, protocol.think))
            if batch > 0 and reader.ended():
                counts.ended_before_sending += 1
                raise EndOfStream
            data, count = protocol.batch(number, batch)
            sock.sendall(data)
            in_flight = count
            counts.sent += count
            last = False
            while in_flight:
                last = protocol.read_reply(reader)
                in_flight -= 1
                counts.answered += 1
            if batch == 0:
                answered()
            if last:
                counts.goodbyes += 1
                extra = reader.read(1)  # raises EndOfStream at the clean end
                raise AssertionError(f"bytes after the last reply: {extra!r}")
    except EndOfStream:
        counts.clean_ends += 1
    except ssl.SSLEOFError:
        counts.ragged_ends += 1
    except OSError as exc:
        if exc.errno not in RESETS:
            counts.errors.append(f"client {number}: {exc!r}")
        else:
            counts.resets += 1
    except AssertionError as exc:
        counts.errors.append(f"client {number}: {exc}")
    finally:
        counts.unanswered += in_flight
        sock.close()
    return counts


@dataclasses.dataclass
class Outcome:
    """What a load stopped by SIGTERM came to."""

    status: int
    counts: Counts
    replies_written: int
    stderr: str

    @property
    def replies_lost(self) -> int:
        """Replies the server wrote that no client read."""
        return self.replies_written - self.counts.answered

    def summary(self) -> str:
        return (
            f"exit {self.status}, written {self.replies_written}, lost "
            f"{self.replies_lost}, {self.counts}"
        )


def load_then_terminate(
    server: Server,
    protocol: Protocol,
    *,
    tls: ssl.SSLContext | None = None,
    clients: int = CLIENTS,
) -> Outcome:
    """Load ``server`` with ``clients`` keep-alive clients; SIGTERM it mid-load."""
    results: list[Counts] = []
    lock = threading.Lock()
    # Set once a client has had its first reply, or has ended before it.
    going = [threading.Event() for _ in range(clients)]

    def run(number: int) -> None:
        try:
            counts = _client(number, server.address, protocol, tls, going[number].set)
        except BaseException as exc:  # a failure to connect, say
            counts = Counts(errors=[f"client {number}: {exc!r}"])
        finally:
            going[number].set()
        with lock:
            results.append(counts)

    threads = [
        threading.Thread(target=run, args=(number,), daemon=True)
        for number in range(clients)
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + STARTUP_TIMEOUT
    for event in going:
        if not event.wait(timeout=max(0.0, deadline - time.monotonic())):
            raise AssertionError("the clients did not all get a first reply")
    time.sleep(LOAD_BEFORE_SIGNAL)  # a load to interrupt, not synchronisation
    status = server.terminate()
    for thread in threads:
        thread.join(timeout=IO_TIMEOUT + 1)
    total = Counts()
    with lock:
        assert len(results) == clients, "a client did not end"
        for counts in results:
            total.add(counts)
    return Outcome(status, total, server.replies_written(), server.stderr.join())
