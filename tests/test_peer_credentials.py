"""Unix peer credentials: ``peer_credentials`` and the handler's property."""

from __future__ import annotations

import os
import socket
import sys
from pathlib import Path
from typing import Any

import pytest
import trio
from support.servers import connect, roundtrip, serving, tls_contexts

import trioserve

linux_only = pytest.mark.skipif(
    not sys.platform.startswith("linux"), reason="SO_PEERCRED is Linux's"
)


class ReportCredentials(trioserve.StreamRequestHandler):
    """Answers with its client's credentials, or ``none``."""

    async def handle(self) -> None:
        credentials = self.peer_credentials
        if credentials is None:
            await self.wfile.write(b"none\n")
        else:
            await self.wfile.write(b"%d %d %d\n" % credentials)


class VerifyingServer(trioserve.UnixStreamServer):
    """Keeps what ``peer_credentials`` gave ``verify_request``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.verified: list[trioserve.PeerCredentials | None] = []

    async def verify_request(self, request: Any, client_address: Any) -> bool:
        self.verified.append(trioserve.peer_credentials(request))
        return True


@linux_only
async def test_a_unix_client_has_its_pid_uid_and_gid(short_tmp: Path) -> None:
    path = str(short_tmp / "creds.sock")
    server = VerifyingServer(path, ReportCredentials)
    ours = trioserve.PeerCredentials(os.getpid(), os.geteuid(), os.getegid())
    async with serving(server):
        with trio.fail_after(10):
            async with await trio.open_unix_socket(path) as stream:
                answer = await roundtrip(stream, b"")
    assert answer == b"%d %d %d\n" % ours
    assert server.verified == [ours]
    assert server.verified[0] is not None
    assert server.verified[0].uid == os.geteuid()


@linux_only
async def test_credentials_under_tls_on_a_unix_socket(short_tmp: Path) -> None:
    server_context, client_context = tls_contexts()
    path = str(short_tmp / "creds.sock")
    server = trioserve.UnixStreamServer(
        path, ReportCredentials, ssl_context=server_context
    )
    async with serving(server):
        with trio.fail_after(10):
            transport = await trio.open_unix_socket(path)
            async with trio.SSLStream(
                transport, client_context, server_hostname="127.0.0.1"
            ) as stream:
                answer = await roundtrip(stream, b"")
    assert answer == b"%d %d %d\n" % (os.getpid(), os.geteuid(), os.getegid())


async def test_a_tcp_client_has_none() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), ReportCredentials)
    async with serving(server):
        with trio.fail_after(10):
            async with await connect(server) as stream:
                assert await roundtrip(stream, b"") == b"none\n"


def test_sockets_without_credentials_and_things_that_are_not_sockets() -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as datagram:
        assert trioserve.peer_credentials(datagram) is None
    with pytest.raises(TypeError, match="socket"):
        trioserve.peer_credentials(b"not a socket")


@linux_only
def test_a_socket_pair() -> None:
    left, right = socket.socketpair()
    with left, right:
        credentials = trioserve.peer_credentials(trio.socket.from_stdlib_socket(left))
    assert credentials == (os.getpid(), os.geteuid(), os.getegid())


@pytest.mark.skipif(sys.platform.startswith("linux"), reason="elsewhere than Linux")
def test_elsewhere_a_unix_socket_raises() -> None:  # pragma: no cover
    left, right = socket.socketpair()
    with left, right, pytest.raises(NotImplementedError, match="Linux"):
        trioserve.peer_credentials(left)
