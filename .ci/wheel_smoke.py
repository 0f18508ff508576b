"""Check an installed trioserve wheel: import it, serve echo, one round trip.

Run it with the Python of a fresh venv that has only the wheel installed,
from a directory outside the checkout, so nothing can come from the source
tree: a module or data file missing from the wheel fails here.

    cd /tmp && /path/to/venv/bin/python /path/to/checkout/.ci/wheel_smoke.py

It starts ``python -m trioserve echo --tcp 127.0.0.1:0``, reads the
"trioserve: serving TCP on HOST:PORT" line, sends a line and checks the
echo, then sends SIGINT and checks for a graceful exit (status 0).
Standard library only; exits non-zero with the reason on any failure.
"""

from __future__ import annotations

import importlib.metadata
import selectors
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TIMEOUT = 30.0
MESSAGE = b"hello from the wheel\n"


def fail(message: str, server: subprocess.Popen[bytes] | None = None) -> None:
    print(f"wheel smoke check FAILED: {message}", file=sys.stderr)
    if server is not None:
        server.kill()
        _, stderr = server.communicate()
        print(stderr.decode(errors="replace"), file=sys.stderr)
    sys.exit(1)


def check_installed() -> None:
    import trioserve

    package = Path(trioserve.__file__).resolve().parent
    if not package.is_relative_to(Path(sys.prefix).resolve()):
        fail(f"trioserve was imported from {package}, not from {sys.prefix}")
    if not (package / "py.typed").is_file():
        fail(f"{package} has no py.typed")
    installed = importlib.metadata.version("trioserve")
    if installed != trioserve.__version__:
        fail(f"metadata says {installed}, __version__ {trioserve.__version__}")
    print(f"trioserve {installed} from {package}")


def read_line(server: subprocess.Popen[bytes], deadline: float) -> bytes:
    assert server.stdout is not None
    line = b""
    with selectors.DefaultSelector() as selector:
        selector.register(server.stdout, selectors.EVENT_READ)
        while not line.endswith(b"\n"):
            if not selector.select(max(0.0, deadline - time.monotonic())):
                fail("no 'serving' line in time", server)
            byte = server.stdout.read(1)
            if not byte:
                fail(f"the server exited before serving: {line!r}", server)
            line += byte
    return line


def round_trip(server: subprocess.Popen[bytes]) -> None:
    line = read_line(server, time.monotonic() + TIMEOUT).decode().strip()
    prefix = "trioserve: serving TCP on "
    if not line.startswith(prefix):
        fail(f"unexpected first line {line!r}", server)
    host, _, port = line.removeprefix(prefix).rpartition(":")
    with socket.create_connection((host, int(port)), timeout=TIMEOUT) as client:
        client.sendall(MESSAGE)
        echoed = b""
        while not echoed.endswith(b"\n"):
            chunk = client.recv(4096)
            if not chunk:
                break
            echoed += chunk
    if echoed != MESSAGE:
        fail(f"sent {MESSAGE!r}, got back {echoed!r}", server)
    print(f"echo round trip on {host}:{port}: ok")


def main() -> None:
    check_installed()
    argv = [sys.executable, "-m", "trioserve", "echo", "--tcp", "127.0.0.1:0"]
    # Unbuffered, so that what select() reports is what read() has not taken;
    # in an empty directory, as "python -m" imports from its working directory.
    with tempfile.TemporaryDirectory() as empty:
        server = subprocess.Popen(
            argv,
            cwd=empty,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            bufsize=0,
        )
        serve_once(server)


def serve_once(server: subprocess.Popen[bytes]) -> None:
    try:
        round_trip(server)
        server.send_signal(signal.SIGINT)
        try:
            _, stderr = server.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            fail("no exit within 30 s of SIGINT", server)
        if server.returncode != 0:
            fail(f"exit status {server.returncode}: {stderr.decode()}")
        print("SIGINT: graceful exit, status 0")
    finally:
        if server.poll() is None:
            server.kill()
            server.communicate()


if __name__ == "__main__":
    main()
