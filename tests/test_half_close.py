"""Half-close: ``await self.wfile.send_eof()`` while the handler reads on."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest
import trio
from support.servers import read_to_eof, roundtrip, serving, tls_contexts

import trioserve


class Recording(trioserve.TCPServer):
    """Keeps what its handler reports, and says when it has."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.reports: list[Any] = []
        self.reported = trio.Event()

    def report(self, *what: Any) -> None:
        self.reports.append(what)
        self.reported.set()


class RecordingUnix(Recording, trioserve.UnixStreamServer):
    pass


class AnswerThenListen(trioserve.StreamRequestHandler):
    """Answers, half-closes, then reads what the client still has to say."""

    # Buffered: send_eof must flush what is held back first.
    wbufsize = 65536
    # A stream handler's writer, not the protocol both kinds share.
    wfile: trioserve.AsyncBufferedWriter

    async def handle(self) -> None:
        await self.wfile.write(b"answer\n")
        await self.wfile.send_eof()
        await self.wfile.send_eof()  # again: nothing happens
        late = await self.rfile.read()
        try:
            await self.wfile.write(b"too late\n")
        except trio.ClosedResourceError as exc:
            outcome = str(exc)
        else:
            outcome = "written"
        assert isinstance(self.server, Recording)
        self.server.report(late, outcome)


@pytest.mark.parametrize("transport", ["tcp", "unix"])
async def test_send_eof_flushes_and_the_handler_reads_on(
    transport: str, short_tmp: Path
) -> None:
    server: Recording
    if transport == "tcp":
        server = Recording(("127.0.0.1", 0), AnswerThenListen)
    else:
        server = RecordingUnix(str(short_tmp / "half.sock"), AnswerThenListen)
    async with serving(server):
        with trio.fail_after(10):
            if transport == "tcp":
                host, port = server.server_address
                stream = await trio.open_tcp_stream(host, port)
            else:
                stream = await trio.open_unix_socket(server.server_address)
            async with stream:
                # The whole answer, then end-of-stream, on an open connection.
                assert await read_to_eof(stream) == b"answer\n"
                await stream.send_all(b"sent after the server's end\n")
                await stream.send_eof()
                await server.reported.wait()
    assert server.reports == [
        (b"sent after the server's end\n", "the write side was shut by send_eof()")
    ]


class HalfCloseOverTLS(trioserve.StreamRequestHandler):
    """Tries to half-close; reports what it got, then answers on."""

    wfile: trioserve.AsyncBufferedWriter

    async def handle(self) -> None:
        await self.wfile.write(b"before\n")
        assert isinstance(self.server, Recording)
        try:
            await self.wfile.send_eof()
        except io.UnsupportedOperation as exc:
            self.server.report(str(exc))
        await self.wfile.write(b"still open\n")


async def test_send_eof_on_tls_raises_a_clear_error() -> None:
    server_context, client_context = tls_contexts()
    server = Recording(("127.0.0.1", 0), HalfCloseOverTLS, ssl_context=server_context)
    async with serving(server):
        with trio.fail_after(10):
            host, port = server.server_address
            transport = await trio.open_tcp_stream(host, port)
            async with trio.SSLStream(
                transport, client_context, server_hostname="127.0.0.1"
            ) as stream:
                assert await roundtrip(stream, b"") == b"before\n"
                assert await roundtrip(stream, b"") == b"still open\n"
    [(message,)] = server.reports
    assert "TLS" in message
    assert "send_eof" in message
