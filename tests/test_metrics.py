"""Prometheus metrics: scraped over real TCP connections after real requests."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path

import attrs
import pytest
import trio
from support.cli import IO_TIMEOUT, EchoCLI, assert_clean, run_echo

import trioserve

PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None, reason="promtool not installed (Debian package prometheus)"
)

SERIES = re.compile(r"^(?P<name>[a-z_]+)\{(?P<labels>.*)\} (?P<value>\S+)$")
LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')

Series = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Series:
    """Every sample of an exposition: (name, labels) -> value."""
    samples: Series = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        match = SERIES.match(line)
        assert match, f"not a sample: {line!r}"
        labels = frozenset(LABEL.findall(match["labels"]))
        samples[match["name"], labels] = float(match["value"])
    return samples


def value(samples: Series, name: str, **labels: str) -> float:
    return samples[name, frozenset(labels.items())]


def promtool_check(text: str) -> None:
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "metrics"],
        input=text.encode(),
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert checked.stdout + checked.stderr == b""  # not even a lint warning


def http_get(address: tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    """One HTTP/1.1 GET that closes; returns (head, body)."""
    with socket.create_connection(address, timeout=IO_TIMEOUT) as client:
        client.sendall(
            f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode()
        )
        reply = b""
        while chunk := client.recv(65536):
            reply += chunk
    head, _, body = reply.decode().partition("\r\n\r\n")
    return head, body


async def scrape(address: tuple[str, int], path: str = "/metrics") -> tuple[str, str]:
    return await trio.to_thread.run_sync(http_get, address, path)


class Echo(trioserve.StreamRequestHandler):
    async def handle(self) -> None:
        async for line in self.rfile:
            if line.startswith(b"sleep "):
                await trio.sleep(float(line.split()[1]))
            await self.wfile.write(line)


class EchoDatagram(trioserve.DatagramRequestHandler):
    async def handle(self) -> None:
        await self.wfile.write(await self.rfile.read())


async def ask_tcp(address: tuple[str, int], line: bytes) -> None:
    client = await trio.open_tcp_stream(*address)
    async with client:
        await client.send_all(line)
        assert await client.receive_some() == line


async def ask_udp(address: tuple[str, int]) -> None:
    with trio.socket.socket(type=socket.SOCK_DGRAM) as client:
        await client.sendto(b"ping", address)
        assert await client.recv(100) == b"ping"


async def until(condition: Callable[[], bool]) -> None:
    # Counters have no event to wait on: the handler ends when the
    # client's end-of-stream arrives.
    while not condition():  # noqa: ASYNC110
        await trio.sleep(0.01)


@asynccontextmanager
async def tcp_udp_and_metrics() -> AsyncIterator[
    tuple[trioserve.TCPServer, trioserve.UDPServer, tuple[str, int]]
]:
    """A TCP and a UDP echo server serving, and their metrics endpoint."""
    async with (
        trio.open_nursery() as nursery,
        trioserve.TCPServer(("127.0.0.1", 0), Echo) as tcp,
        trioserve.UDPServer(("127.0.0.1", 0), EchoDatagram) as udp,
    ):
        await nursery.start(tcp.serve_forever)
        await nursery.start(udp.serve_forever)
        metrics = await nursery.start(
            trioserve.serve_metrics, [tcp, udp], "127.0.0.1", 0
        )
        yield tcp, udp, metrics
        nursery.cancel_scope.cancel()


async def test_a_scrape_counts_real_requests_and_their_durations() -> None:
    with trio.fail_after(20):
        async with tcp_udp_and_metrics() as (tcp, udp, metrics):
            for _ in range(3):
                await ask_tcp(tcp.server_address, b"hello\n")
            for _ in range(2):
                await ask_tcp(tcp.server_address, b"sleep 0.3\n")
            for _ in range(4):
                await ask_udp(udp.server_address)
            await until(lambda: tcp.stats.completed == 5 and udp.stats.completed == 4)
            head, body = await scrape(metrics)
    assert head.startswith("HTTP/1.1 200 OK\r\n")
    assert "Content-Type: text/plain; version=0.0.4" in head
    samples = parse(body)
    tcp_name = f"TCP 127.0.0.1:{tcp.server_address[1]}"
    udp_name = f"UDP 127.0.0.1:{udp.server_address[1]}"
    for name, requests in ((tcp_name, 5), (udp_name, 4)):
        assert value(samples, "trioserve_requests_accepted_total", server=name) == (
            requests
        )
        assert value(samples, "trioserve_requests_completed_total", server=name) == (
            requests
        )
        assert value(samples, "trioserve_requests_active", server=name) == 0
        count = value(samples, "trioserve_request_duration_seconds_count", server=name)
        assert count == requests
        inf = value(
            samples, "trioserve_request_duration_seconds_bucket", server=name, le="+Inf"
        )
        assert inf == requests
    # Connections are a stream server's only.
    assert value(samples, "trioserve_connections_open", server=tcp_name) == 0
    assert ("trioserve_connections_open", frozenset({("server", udp_name)})) not in (
        samples
    )

    # The two that slept 0.3 s are above the 0.25 s bound; all are within 60 s.
    def bucket(le: str) -> float:
        return value(
            samples, "trioserve_request_duration_seconds_bucket", server=tcp_name, le=le
        )

    assert bucket("0.25") <= 3
    assert bucket("60.0") == 5
    assert (
        value(samples, "trioserve_request_duration_seconds_sum", server=tcp_name) >= 0.6
    )
    # Buckets are cumulative.
    bounds = [*map(str, trioserve.RequestDurations.bounds), "+Inf"]
    counts = [bucket(le) for le in bounds]
    assert counts == sorted(counts)


async def test_only_a_server_asked_to_times_its_requests() -> None:
    # Timing costs every request: a server times nothing until something
    # will read the times, and setting request_durations while it serves
    # starts timing from the next request.
    with trio.fail_after(20):
        async with (
            trio.open_nursery() as nursery,
            trioserve.TCPServer(("127.0.0.1", 0), Echo) as tcp,
        ):
            await nursery.start(tcp.serve_forever)
            await ask_tcp(tcp.server_address, b"untimed\n")
            await until(lambda: tcp.stats.completed == 1)
            assert tcp.request_durations is None
            samples = parse(trioserve.render_metrics([tcp]))
            assert not any(
                name.startswith("trioserve_request_duration") for name, _ in samples
            )
            tcp.request_durations = trioserve.RequestDurations()
            await ask_tcp(tcp.server_address, b"timed\n")
            await until(lambda: tcp.stats.completed == 2)
            assert tcp.request_durations.count == 1
            nursery.cancel_scope.cancel()


def test_a_bound_is_its_bucket_s_inclusive_upper_end() -> None:
    durations = trioserve.RequestDurations()
    for seconds in (0.001, 0.0011, 60.0, 61.0):
        durations.observe(seconds)
    assert durations.counts[0] == 1  # le=0.001
    assert durations.counts[1] == 1  # le=0.0025
    assert durations.counts[-2] == 1  # le=60
    assert durations.counts[-1] == 1  # +Inf only
    assert durations.count == 4
    assert durations.sum == pytest.approx(121.0021)


async def test_every_server_stats_counter_is_exported() -> None:
    server = trioserve.TCPServer(("127.0.0.1", 0), Echo, bind_and_activate=False)
    await server.server_close()
    fields = [field.name for field in attrs.fields(trioserve.ServerStats)]
    for number, name in enumerate(fields, start=1):
        setattr(server.stats, name, number)
    samples = parse(trioserve.render_metrics([server]))
    exported: dict[float, set[str]] = {}
    for (name, _), sample_value in samples.items():
        if not name.startswith("trioserve_request_duration_seconds"):
            exported.setdefault(sample_value, set()).add(name)
    # Each counter's distinct value appears under a name that says it.
    for number, field in enumerate(fields, start=1):
        assert any(field in name for name in exported[number]), (field, exported)


async def test_label_values_are_escaped() -> None:
    server = trioserve.UnixStreamServer(
        '/tmp/a "quoted"\\path\n', Echo, bind_and_activate=False
    )
    await server.server_close()
    text = trioserve.render_metrics([server])
    assert 'server="UNIX /tmp/a \\"quoted\\"\\\\path\\n"' in text
    if PROMTOOL is not None:
        promtool_check(text)


@needs_promtool
async def test_promtool_accepts_a_single_process_s_metrics() -> None:
    with trio.fail_after(20):
        async with tcp_udp_and_metrics() as (tcp, udp, metrics):
            await ask_tcp(tcp.server_address, b"hello\n")
            await ask_udp(udp.server_address)
            _, body = await scrape(metrics)
    promtool_check(body)


async def test_the_endpoint_keeps_the_connection_and_answers_404_and_405() -> None:
    with trio.fail_after(20):
        async with (
            trio.open_nursery() as nursery,
            trioserve.TCPServer(("127.0.0.1", 0), Echo) as tcp,
        ):
            metrics = await nursery.start(
                trioserve.serve_metrics, [tcp], "127.0.0.1", 0
            )
            client = await trio.open_tcp_stream(*metrics)
            async with client:
                stream = trioserve.AsyncBufferedReader(client)
                replies = []
                for request in (
                    b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /other HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"GET /metrics?x=1 HTTP/1.1\r\nHost: x\r\n\r\n",
                    b"POST /metrics HTTP/1.1\r\nContent-Length: 0\r\n\r\n",
                ):
                    await client.send_all(request)
                    status = await stream.readline()
                    headers = {}
                    while (line := await stream.readline()) != b"\r\n":
                        name, _, text = line.decode().partition(":")
                        headers[name.lower()] = text.strip()
                    body = await stream.read(int(headers["content-length"]))
                    replies.append((status.split()[1], headers, body))
                # 405 closes the connection.
                assert await stream.read() == b""
            nursery.cancel_scope.cancel()
    (first, second, third, fourth) = replies
    assert first[0] == b"200"
    assert b"trioserve_requests_accepted_total" in first[2]
    assert second[0] == b"404"
    assert third[0] == b"200"
    assert fourth[0] == b"405"
    assert fourth[1]["connection"] == "close"


# -- the command line ------------------------------------------------------


def metrics_address(cli: EchoCLI, listeners: int) -> tuple[tuple[str, int], ...]:
    """The listeners' addresses, then the metrics address, from the start-up."""
    found = cli.listeners(listeners + 1)
    assert found[-1][0] == "METRICS"
    return tuple((host, port) for _, host, port in found)


def echo_once(address: tuple[str, int]) -> None:
    with socket.create_connection(address, timeout=IO_TIMEOUT) as client:
        client.sendall(b"hi\n")
        assert client.makefile("rb").readline() == b"hi\n"


def scrape_until(
    address: tuple[str, int], name: str, wanted: float, **labels: str
) -> Series:
    """Scrape until the sample reaches ``wanted`` (workers report each second)."""
    deadline = time.monotonic() + 15
    while True:
        head, body = http_get(address)
        assert head.startswith("HTTP/1.1 200"), head
        samples = parse(body)
        if samples.get((name, frozenset(labels.items()))) == wanted:
            return samples
        assert time.monotonic() < deadline, body
        time.sleep(0.1)


def test_cli_metrics_in_one_process() -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--metrics", "127.0.0.1:0") as cli:
        tcp, metrics = metrics_address(cli, 1)
        for _ in range(3):
            echo_once(tcp)
        server = f"TCP 127.0.0.1:{tcp[1]}"
        samples = scrape_until(
            metrics, "trioserve_requests_completed_total", 3, server=server
        )
        assert value(samples, "trioserve_requests_accepted_total", server=server) == 3
        _, body = http_get(metrics)
        head, _ = http_get(metrics, "/")
        assert head.startswith("HTTP/1.1 404")
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)
    # The metrics server does not count itself: one server's series only.
    assert {dict(labels)["server"] for _, labels in parse(body)} == {server}
    if PROMTOOL is not None:
        promtool_check(body)


STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")


def test_cli_metrics_with_workers_sum_and_per_worker_series() -> None:
    with run_echo(
        "--tcp", "127.0.0.1:0", "--workers", "2", "--metrics", "127.0.0.1:0"
    ) as cli:
        tcp, metrics = metrics_address(cli, 1)
        pids: dict[str, int] = {}
        while len(pids) < 2:
            match = STARTED.search(cli.stderr.wait_for("started (pid"))
            assert match
            pids[match[1]] = int(match[2])
        for _ in range(20):
            echo_once(tcp)
        server = f"TCP 127.0.0.1:{tcp[1]}"
        completed = "trioserve_requests_completed_total"
        per_worker = "trioserve_worker_requests_completed_total"
        samples = scrape_until(metrics, completed, 20, server=server)
        workers = {
            dict(labels)["worker"]: count
            for (name, labels), count in samples.items()
            if name == per_worker
        }
        assert set(workers) == {"1", "2"}
        assert sum(workers.values()) == 20
        text = http_get(metrics)[1]
        if PROMTOOL is not None:
            promtool_check(text)

        # Each worker's series carry its pid too.
        assert {
            (dict(labels)["worker"], dict(labels)["pid"])
            for (name, labels) in samples
            if name == per_worker
        } == {(number, str(pid)) for number, pid in pids.items()}

        # A worker that exits leaves its counts in the sum; its successor's
        # own series start from zero, under its own pid.
        os.kill(pids["1"], signal.SIGTERM)
        match = STARTED.search(cli.stderr.wait_for("worker 1 started"))
        assert match
        samples = scrape_until(
            metrics, per_worker, 0, server=server, worker="1", pid=match[2]
        )
        assert value(samples, completed, server=server) == 20
        assert not any(
            dict(labels).get("pid") == str(pids["1"]) for (_, labels) in samples
        )
        rc, _, stderr = cli.stop(signal.SIGTERM)
    assert rc == 0, stderr
    assert_clean(stderr)


@pytest.mark.parametrize(
    ("address", "message"),
    [
        ("nonsense", "is not HOST:PORT"),
        ("127.0.0.1:99999", "port must be 0 to 65535"),
        ("999.1.1.1:9", "is not a valid IPv4 address"),
    ],
)
def test_a_bad_metrics_address_exits_2(address: str, message: str) -> None:
    with run_echo("--tcp", "127.0.0.1:0", "--metrics", address) as cli:
        rc, _, stderr = cli.finish()
    assert rc == 2
    assert f"argument --metrics: {address!r}" in stderr
    assert message in stderr


@pytest.mark.parametrize("workers", [[], ["--workers", "2"]])
def test_a_metrics_address_in_use_exits_2(workers: list[str]) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        with run_echo(
            "--tcp", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}", *workers
        ) as cli:
            rc, stdout, stderr = cli.finish()
    assert rc == 2, stderr
    assert "cannot serve" in stderr
    assert "in use" in stderr
    assert "serving" not in stdout
    assert "started (pid" not in stderr  # no worker started


@needs_promtool
def test_the_documented_scrape_config_is_valid() -> None:
    config = Path(__file__).parent.parent / "examples/deploy/prometheus.yml"
    assert PROMTOOL is not None
    checked = subprocess.run(
        [PROMTOOL, "check", "config", "--syntax-only", str(config)],
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert checked.returncode == 0, checked.stdout + checked.stderr


def test_help_shows_the_metrics_option() -> None:
    with run_echo("--help") as cli:
        rc, stdout, _ = cli.finish()
    assert rc == 0
    assert "--metrics HOST:PORT" in stdout
