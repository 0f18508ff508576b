"""SIGHUP: fresh workers take over under load; TLS files are loaded again.

Real processes (``python -m trioserve``), real clients in threads, and
``openssl s_client`` to see which certificate a new handshake gets.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from support.cli import IO_TIMEOUT, EchoCLI, assert_clean, run_echo

pytestmark = pytest.mark.skipif(
    not hasattr(socket, "SO_REUSEPORT"), reason="the tests expect Linux"
)

# Each reply names the handler's version. The two versions differ in length
# too, so that a byte-code cache keyed by size and mtime cannot serve the old.
HANDLER = """
import trioserve

VERSION = {version!r}


class Versioned(trioserve.StreamRequestHandler):
    async def handle(self):
        async for line in self.rfile:
            await self.wfile.write(VERSION + b" " + line)
"""

RELOADED = "reloaded: 2 new workers serve"
STOPPED = re.compile(r"worker \d+ \(pid (\d+)\) stopped after")
STARTED = re.compile(r"worker \d+ started \(pid (\d+)\)")


@pytest.fixture
def workdir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(dir="/tmp", prefix="tsr"))
    write_handler(path, b"v1")
    yield path
    shutil.rmtree(path)


def write_handler(workdir: Path, version: bytes, *, broken: bool = False) -> None:
    text = textwrap.dedent(HANDLER.format(version=version))
    if broken:
        text += '\nraise RuntimeError("this version is broken on purpose")\n'
    new = workdir / "versioned.py.new"
    new.write_text(text)
    os.replace(new, workdir / "versioned.py")


def started_pid(cli: EchoCLI) -> str:
    match = STARTED.search(cli.stderr.wait_for("started (pid"))
    assert match
    return match[1]


def serve(workdir: Path, *args: str) -> contextlib.AbstractContextManager[EchoCLI]:
    return run_echo(
        "versioned:Versioned",
        "--tcp",
        "127.0.0.1:0",
        *args,
        command="serve",
        cwd=str(workdir),
    )


class Load:
    """Clients in threads, asking and counting until told to stop.

    Some connect for every request; others keep their connection and, when
    the server ends it cleanly (end of stream, no reply), ask again on a new
    one, as keep-alive clients do. A refused connection, a reset, a timeout
    or a cut reply is a failure.
    """

    def __init__(self, address: tuple[str, int]) -> None:
        self.address = address
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        self.replies: list[tuple[float, bytes]] = []
        self.failures: list[str] = []
        self.goodbyes = 0
        self.threads = [
            threading.Thread(target=target, daemon=True)
            for target in [self._per_request] * 3 + [self._keep_alive] * 2
        ]

    def __enter__(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stopping.set()
        for thread in self.threads:
            thread.join(IO_TIMEOUT * 2)

    def _record(self, reply: bytes) -> None:
        with self.lock:
            if reply.endswith(b" ping\n"):
                self.replies.append((time.monotonic(), reply.split()[0]))
            else:
                self.failures.append(f"cut reply {reply!r}")

    def _fail(self, what: str) -> None:
        with self.lock:
            self.failures.append(what)

    def _per_request(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(self.address, timeout=IO_TIMEOUT) as sock:
                    sock.sendall(b"ping\n")
                    reply = sock.makefile("rb").readline()
            except OSError as exc:
                self._fail(repr(exc))
                continue
            self._record(reply)

    def _keep_alive(self) -> None:
        while not self.stopping.is_set():
            try:
                with socket.create_connection(self.address, timeout=IO_TIMEOUT) as sock:
                    replies = sock.makefile("rb")
                    while not self.stopping.is_set():
                        sock.sendall(b"ping\n")
                        reply = replies.readline()
                        if not reply:  # a planned goodbye: ask again
                            with self.lock:
                                self.goodbyes += 1
                            break
                        self._record(reply)
            except OSError as exc:
                self._fail(repr(exc))

    def count(self, version: bytes, since: float = 0.0) -> int:
        with self.lock:
            return sum(1 for at, v in self.replies if v == version and at >= since)

    def versions_since(self, since: float) -> set[bytes]:
        with self.lock:
            return {v for at, v in self.replies if at >= since}

    def wait_for(self, version: bytes, count: int, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while self.count(version) < count:
            assert time.monotonic() < deadline, (version, self.count(version))
            time.sleep(0.01)


def test_sighup_swaps_workers_under_load_without_a_failed_request(
    workdir: Path,
) -> None:
    with serve(workdir, "--workers", "2") as cli:
        [(_, host, port)] = cli.listeners(1)
        old = {started_pid(cli) for _ in range(2)}
        with Load((host, port)) as load:
            load.wait_for(b"v1", 200)
            write_handler(workdir, b"v2-reloaded")
            cli.proc.send_signal(signal.SIGHUP)
            cli.stderr.wait_for(RELOADED, timeout=30)
            stopped: set[str] = set()
            while stopped != old:
                line = cli.stderr.wait_for("stopped after", timeout=30)
                match = STOPPED.search(line)
                assert match, line
                stopped.add(match[1])
            # Every old worker is gone: whatever answers now is new.
            swapped = time.monotonic()
            load.wait_for(b"v2-reloaded", load.count(b"v2-reloaded") + 200)
        assert load.failures == [], load.failures[:5]
        assert load.versions_since(swapped) == {b"v2-reloaded"}
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


def test_a_reload_whose_workers_cannot_start_keeps_the_old_ones(
    workdir: Path,
) -> None:
    with serve(workdir, "--workers", "2") as cli:
        [(_, host, port)] = cli.listeners(1)
        with Load((host, port)) as load:
            load.wait_for(b"v1", 50)
            write_handler(workdir, b"v2-broken", broken=True)
            cli.proc.send_signal(signal.SIGHUP)
            cli.stderr.wait_for("reload failed, the old workers keep serving")
            since = time.monotonic()
            load.wait_for(b"v1", load.count(b"v1") + 100)
        assert load.failures == [], load.failures[:5]
        assert load.versions_since(since) == {b"v1"}
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    # Why it failed is there: the new worker's traceback.
    assert "this version is broken on purpose" in stderr


def server_certificate(host: str, port: int) -> str:
    """The PEM certificate a new TLS handshake gets, as openssl s_client sees it."""
    result = subprocess.run(
        ["openssl", "s_client", "-connect", f"{host}:{port}"],
        input="",
        capture_output=True,
        text=True,
        timeout=IO_TIMEOUT * 2,
        check=False,
    )
    match = re.search(
        r"-----BEGIN CERTIFICATE-----.*?-----END CERTIFICATE-----\n",
        result.stdout,
        re.DOTALL,
    )
    assert match, result.stdout + result.stderr
    return match[0]


@pytest.mark.parametrize("workers", [None, "2"], ids=["one-process", "workers"])
def test_sighup_loads_a_new_certificate_for_new_handshakes(
    workdir: Path, workers: str | None
) -> None:
    trustme = pytest.importorskip("trustme")
    if shutil.which("openssl") is None:
        pytest.skip("openssl is not installed")
    ca = trustme.CA()
    first, second = ca.issue_cert("localhost"), ca.issue_cert("localhost")
    pem = workdir / "server.pem"

    def install(cert: object) -> None:
        new = workdir / "server.pem.new"
        cert.private_key_and_cert_chain_pem.write_to_path(str(new))  # type: ignore[attr-defined]
        os.replace(new, pem)

    def leaf(cert: object) -> str:
        return cert.cert_chain_pems[0].bytes().decode()  # type: ignore[attr-defined,no-any-return]

    install(first)
    args = ["--tls-cert", str(pem)] + (
        [] if workers is None else ["--workers", workers]
    )
    with serve(workdir, *args) as cli:
        [(kind, host, port)] = cli.listeners(1)
        assert kind == "TCP+TLS"
        assert server_certificate(host, port) == leaf(first)
        install(second)
        cli.proc.send_signal(signal.SIGHUP)
        cli.stderr.wait_for(
            "reloaded the TLS certificate" if workers is None else RELOADED
        )
        assert server_certificate(host, port) == leaf(second)
        # A certificate that cannot be used is refused; the one served stays.
        pem.write_text("not a certificate\n")
        cli.proc.send_signal(signal.SIGHUP)
        cli.stderr.wait_for(
            "keeping the old TLS certificate"
            if workers is None
            else "reload failed, the old workers keep serving"
        )
        assert server_certificate(host, port) == leaf(second)
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
