"""Servers on sockets made elsewhere: from_socket, --fd, systemd activation."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import trio
from support.cli import IO_TIMEOUT, EchoCLI, assert_clean, running, tcp_echo, udp_echo
from support.servers import Echo, connect, roundtrip, serving

import trioserve


async def test_from_socket_serves_on_a_bound_stream_socket() -> None:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = trioserve.TCPServer.from_socket(sock, Echo, max_concurrent_requests=4)
    assert server.server_address == sock.getsockname()
    assert server.max_concurrent_requests == 4
    async with serving(server), await connect(server) as client:
        assert await roundtrip(client, b"inherited\n") == b"inherited\n"
    assert sock.fileno() == -1  # the server took it over and closed it


async def test_from_socket_takes_a_file_descriptor_for_udp() -> None:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", 0))

    class UdpEcho(trioserve.DatagramRequestHandler):
        async def handle(self) -> None:
            await self.wfile.write(await self.rfile.read())

    server = trioserve.UDPServer.from_socket(sock.detach(), UdpEcho)
    async with serving(server):
        with trio.socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as client:
            await client.sendto(b"by fd", server.server_address)
            with trio.fail_after(5):
                assert await client.recv(100) == b"by fd"


async def test_from_socket_refuses_the_wrong_kind_of_socket() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.bind(("127.0.0.1", 0))
        with pytest.raises(ValueError, match="needs a stream socket"):
            trioserve.TCPServer.from_socket(sock, Echo)
        assert sock.fileno() != -1  # still the caller's


async def test_from_socket_leaves_an_inherited_unix_socket_file() -> None:
    directory = tempfile.mkdtemp(dir="/tmp")
    path = os.path.join(directory, "s")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    server = trioserve.UnixStreamServer.from_socket(sock, Echo)
    async with serving(server):
        with socket.socket(socket.AF_UNIX) as client:
            client.settimeout(5)
            await trio.to_thread.run_sync(client.connect, path)
    # Not made by the server, so not removed by it.
    assert await trio.Path(path).is_socket()
    os.unlink(path)
    os.rmdir(directory)


def stop_cleanly(cli: EchoCLI) -> None:
    rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


def test_cli_serves_inherited_file_descriptors() -> None:
    tcp = socket.socket()
    tcp.bind(("127.0.0.1", 0))
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    with tcp, udp:
        argv = [sys.executable, "-m", "trioserve", "echo"]
        argv += ["--fd", str(tcp.fileno()), "--fd", str(udp.fileno())]
        with running(EchoCLI, argv, pass_fds=(tcp.fileno(), udp.fileno())) as cli:
            kinds = {kind for kind, _, _ in cli.listeners(2)}
            assert kinds == {"TCP", "UDP"}
            tcp_echo(
                tcp.getsockname()[0], tcp.getsockname()[1], b"over an inherited fd\n"
            )
            udp_echo(
                udp.getsockname()[0],
                udp.getsockname()[1],
                b"datagram over an inherited fd",
            )
            stop_cleanly(cli)


def test_cli_uses_systemd_socket_activation() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        fd = sock.fileno()
        # systemd puts the socket at fd 3 and sets LISTEN_PID to the
        # service's own pid: a tiny launcher that execs the service does both.
        launcher = (
            "import os, sys; "
            f"os.dup2({fd}, 3); os.close({fd}); "
            "os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS='1', "
            "LISTEN_FDNAMES='web'); "
            "os.execv(sys.executable, [sys.executable, '-m', 'trioserve', 'echo'])"
        )
        with running(EchoCLI, [sys.executable, "-c", launcher], pass_fds=(fd,)) as cli:
            [(kind, host, port)] = cli.listeners(1)
            assert (kind, (host, port)) == ("TCP", sock.getsockname())
            tcp_echo(host, port, b"socket activated\n")
            stop_cleanly(cli)


def test_systemd_sockets_ignores_variables_meant_for_another_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("LISTEN_PID", str(os.getpid() + 1))
    monkeypatch.setenv("LISTEN_FDS", "1")
    assert trioserve.systemd_sockets() == []
    assert "LISTEN_FDS" not in os.environ


def test_cli_tls_options(tmp_path: Path) -> None:
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    cert_file, ca_file = tmp_path / "cert.pem", tmp_path / "ca.pem"
    cert.private_key_and_cert_chain_pem.write_to_path(str(cert_file))
    ca.cert_pem.write_to_path(str(ca_file))
    argv = [sys.executable, "-m", "trioserve", "echo", "--tcp", "127.0.0.1:0"]
    with running(
        EchoCLI, [*argv, "--tls-cert", str(cert_file), "--handshake-timeout", "5"]
    ) as cli:
        line = cli.stdout.next_line()
        assert line is not None
        assert line.startswith("trioserve: serving TCP+TLS on 127.0.0.1:")
        port = int(line.rpartition(":")[2])
        import ssl

        context = ssl.create_default_context(cafile=str(ca_file))
        with (
            socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as raw,
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"encrypted echo\n")
            assert tls.recv(100) == b"encrypted echo\n"
        stop_cleanly(cli)


def test_cli_bad_tls_certificate_is_a_usage_error(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    argv = [sys.executable, "-m", "trioserve", "echo", "--tcp", "127.0.0.1:0"]
    result = subprocess.run(
        [*argv, "--tls-cert", str(missing)],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert result.returncode == 2
    assert result.stderr.startswith("trioserve: error: cannot load the TLS certificate")
